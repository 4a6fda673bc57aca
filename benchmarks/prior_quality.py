"""Prior quality: how good is an LLM prior on each env, on the scale of the synthetic prior of prior_sweep.py?

For each (env, LLM, mode) it runs `build_dataset.py` on expert and noisy-expert episodes (half each, the noisy ones
acting at random half of the time, so that states off the expert's path count too; the eval seed 10001), storing
k_max proposals per state, and reads from its header:
- coverage@k: the share of states whose expert action is among the first k proposals (the k draws are independent,
  so a prefix is a k-sample; for `topk`, the top k);
- expert_prob: the probability the proposal distribution gives the expert's action (`dist` and `topk` modes, at the
  run's temperature and mix, i.e. what the agent samples), next to uniform_prob, 1/|A(s)|, and the expert action's
  mean rank among the scored actions;
- equivalent_q: the quality Q of the synthetic prior p_Q = Q·1[a*] + (1 − Q)·uniform with the same mean expert
  probability, Q = (expert_prob − uniform_prob) / (1 − uniform_prob); below 0 is worse than uniform;
- seconds per LLM query, on the benchmark's own cache file (so a query is a query);
- coverage@5_by_verb: coverage@5 by the first word of the expert's action, `verb:coverage/states` (where on a task
  the prior helps: ALFWorld's `take` against its `go to`, split into `go-named`, to a receptacle the task names,
  and `go-search`, to where the expert knows the object lies).

    python benchmarks/prior_quality.py                                        # --budget small: 5 envs, 2 LLMs
    python benchmarks/prior_quality.py --models gemma --label pmi -- --prior.score-normalize pmi
    python benchmarks/prior_quality.py --models Qwen/Qwen1.5-7B --backend vllm --modes dist constrained

Arguments after `--` are more `--prior.*` settings for every build; `--label` names them in the CSV.

Budgets:
    smoke  overcooked-tomato, at least 5 states, the given --models in dist mode, k in {1, 5}
    small  overcooked-tomato, overcooked-salad, frozenlake, alfworld-pick, textworld-treasure; at least 40 states
           each; gemma and smollm2; dist; k in {1, 3, 5, 10}
    paper  as small with at least 200 states per env and the modes dist, map, constrained

Writes results/prior_quality.csv (rows of other labels and selections are kept).
"""

import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (ROOT, _key, common_parser, git_commit, hide_secrets, markdown_table, merge_rows,  # noqa: E402
                    name_part, prior_args, show_path, write_csv)  # fmt: skip

ENTRY = "prior_quality"
BUDGET = {
    "smoke": dict(envs=["overcooked-tomato"], states=5, models=["gemma"], modes=["dist"], ks=[1, 5]),
    "small": dict(envs=["overcooked-tomato", "overcooked-salad", "frozenlake", "alfworld-pick", "textworld-treasure"],
                  states=40, models=["gemma", "smollm2"], modes=["dist"], ks=[1, 3, 5, 10]),
    "paper": dict(envs=["overcooked-tomato", "overcooked-salad", "frozenlake", "alfworld-pick", "textworld-treasure"],
                  states=200,
                  models=["gemma", "smollm2"], modes=["dist", "map", "constrained"], ks=[1, 3, 5, 10]),
}  # fmt: skip
KEY = ["env", "model", "mode", "label"]


def measure(env_id: str, model: str, mode: str, states: int, ks: list[int], backend: str, extra: list[str],
            out: str, cache: str, seed: int) -> tuple[dict, str]:  # fmt: skip
    """Build the expert dataset and read the prior's quality from it -> (row, the command)."""
    cmd = ["build_dataset.py", "--env", env_id, "--transitions", str(states), "--mix.expert", "0.5", "--mix.noisy",
           "0.5", "--mix.random", "0", "--success-share", "None", "--seed", str(seed), "--k", str(max(ks)),
           "--out", out, "--prior.model", model, "--prior.mode", mode, "--prior.backend", backend, "--prior.cache",
           cache, *prior_args(extra)]  # fmt: skip
    result = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"build_dataset.py failed for {env_id} {model} {mode}:\n{result.stderr[-2000:]}")
    with open(out) as f:
        header = json.loads(f.readline())
    row = {f"coverage@{k}": round(header["expert_coverage_at_k"][k - 1], 3) for k in ks}
    p, u = header["expert_action_prob"], header["uniform_prob"]
    row.update(expert_prob=None if p is None else round(p, 3), uniform_prob=round(u, 3),
               equivalent_q=None if p is None else round((p - u) / (1 - u), 3),
               expert_rank=None if header["expert_action_rank"] is None else round(header["expert_action_rank"], 2),
               llm_queries=header["prior_queries"], prior=header["prior"],
               seconds_per_query=None if header["prior_seconds_per_query"] is None else
               round(header["prior_seconds_per_query"], 2))  # fmt: skip
    k = 5 if 5 in ks else max(ks)  # the scripts' default k
    row[f"coverage@{k}_by_verb"] = " ".join(f"{verb}:{cov[k - 1]:.2f}/{n}" for verb, (n, cov)
                                             in (header["expert_coverage_by_verb"] or {}).items())  # fmt: skip
    return {"states": header["transitions"], **row}, "python " + " ".join(map(show_path, hide_secrets(cmd)))


def main(argv=None) -> int:
    parser = common_parser(__doc__)
    parser.add_argument("--envs", nargs="+", default=None)
    parser.add_argument("--models", nargs="+", default=None, help="gemma, smollm2, a .gguf file, an HF id")
    parser.add_argument("--modes", nargs="+", choices=["dist", "map", "constrained", "topk"], default=None)
    parser.add_argument("--ks", nargs="+", type=int, default=None)
    parser.add_argument("--states", type=int, default=None, help="at least this many expert states per env")
    parser.add_argument("--backend", default="transformers", choices=["transformers", "vllm", "openai"])
    parser.add_argument("--label", default="default", help="names the extra --prior.* settings in the CSV")
    args = parser.parse_args(argv)
    b = BUDGET[args.budget]
    envs_, models, modes = args.envs or b["envs"], args.models or b["models"], args.modes or b["modes"]
    ks, states, seed = args.ks or b["ks"], args.states or b["states"], 10_000 + (args.seeds or [1])[0]
    folder = os.path.join(args.runs_dir, ENTRY, args.budget, args.label)
    cache = os.path.join(folder, "priors.sqlite")
    if args.dry_run:
        print(f"would measure {envs_} x {models} x {modes}, k {ks}, {states}+ expert states, cache {cache}")
        return 0
    os.makedirs(folder, exist_ok=True)
    commit, rows = git_commit(), []
    for model in models:
        for mode in modes:
            for env_id in envs_:
                out = os.path.join(folder, f"{name_part(env_id)}__{os.path.basename(model)}__{mode}.jsonl")
                row, command = measure(env_id, model, mode, states, ks, args.backend, args.extra, out, cache, seed)
                rows.append({"env": env_id, "model": model, "mode": mode, "label": args.label, **row,
                             "command": command, "commit": commit})  # fmt: skip
                print(" ".join(f"{k} {v}" for k, v in rows[-1].items() if k not in ("command", "commit")), flush=True)
    path = os.path.join(args.results_dir, f"{ENTRY}{'' if args.budget == 'small' else '_' + args.budget}.csv")
    rows = merge_rows(path, rows, KEY, {_key(r, KEY) for r in rows})
    write_csv(rows, path)
    print(markdown_table(rows, ["env", "model", "mode", "label", "states", *[f"coverage@{k}" for k in ks],
                                "expert_prob", "uniform_prob", "equivalent_q", "expert_rank", "seconds_per_query"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
