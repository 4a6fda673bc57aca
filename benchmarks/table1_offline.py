"""Table 1 (offline): DQN, CQL, DQN-Prior, CQL-Prior and BC on Salad(N) and ALFWorld-Pick datasets.

Builds each dataset once with build_dataset.py (proposals of the LLM prior stored in it, so training needs no LLM),
then trains every method on it with cql_prior.py / bc.py. Writes results/table1_offline.csv (one row per run:
final and best eval return, the step of the best, how often the data action is among the proposals, command,
commit), results/table1_offline_curves.csv, and prints the table next to the paper's numbers plus the smallest
dataset on which each method reaches return >= 1.0 (the paper: CQL-Prior at ~1000 transitions, CQL at 12000+).

    python benchmarks/table1_offline.py                                   # --budget small (CPU)
    python benchmarks/table1_offline.py --datasets alfworld-pick:6500 --build-workers 2
    python benchmarks/table1_offline.py --budget paper -- --prior.model Qwen/Qwen1.5-7B --prior.backend vllm

Budgets:
    smoke  Salad(40); all five methods; seed 1; 10 gradient steps, 1 eval episode
    small  Salad(1000), Salad(4000), ALFWorld-Pick(1500); DQN, CQL, DQN-Prior, CQL-Prior; seeds 1 2 3; 5000
           gradient steps, eval every 500 (ALFWorld: 2500) with 3 episodes. No BC: its LM policy trains at 0.03
           steps/s here (batch 32, Salad prompts, one core; 0.06-0.13 on two cores, the faster once the frozen-trunk
           cache holds every state), an hour per run; `--methods BC` adds it (100 steps).
           ALFWorld-Pick is cut to 1500 transitions here; the paper's 6500 (2752 distinct states, ~2.5 s of
           Gemma-3-270M each on one core) is `--datasets alfworld-pick:6500 --build-workers 2`: about an hour of
           proposals on a cold cache with two cores, 40 minutes measured with a warm one
    paper  Salad(1000, 4000, 8000, 12000, 24000), ALFWorld-Pick(6500); seeds 1 2 3; 10000 gradient steps (the
           authors'), eval every 500 with 10 episodes; BC 2000 steps

`--prior.*` arguments after `--` go to the dataset builder too (a dataset's stored proposals come from that prior);
the dataset's file name then carries a hash of them.
"""

import hashlib
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (ROOT, Job, aggregate, common_parser, dataset_spec, fmt, hide_secrets, markdown_table,  # noqa: E402
                    name_part, prior_args, results_path, run_jobs, save_results, show_path)  # fmt: skip

ENTRY = "table1_offline"
METHODS = {  # method -> (script, arguments)
    "DQN": ("cql_prior.py", ["--k", "0", "--cql-beta", "0"]),
    "CQL": ("cql_prior.py", ["--k", "0"]),
    # CQL with β against the batch-mean TD (a ~128x stronger penalty): its better setting (docs/cql_prior.md)
    "CQL (mean TD)": ("cql_prior.py", ["--k", "0", "--loss-reduction", "mean"]),
    "DQN-Prior": ("cql_prior.py", ["--cql-beta", "0"]),
    "CQL-Prior": ("cql_prior.py", []),
    "BC": ("bc.py", []),
}
PAPER = {  # Table 1 of the paper (mean return; Qwen1.5-7B prior, k=5)
    "overcooked-salad:1000": {"DQN": 0.14, "CQL": 0.32, "DQN-Prior": 0.98, "CQL-Prior": 1.01, "BC": 0.57},
    "overcooked-salad:4000": {"DQN": 0.31, "CQL": 0.32, "DQN-Prior": 0.81, "CQL-Prior": 1.19},
    "overcooked-salad:24000": {"DQN": 0.32, "CQL": 1.33, "CQL-Prior": 1.31},
    "alfworld-pick:6500": {"DQN": 0.27, "CQL": 0.03, "DQN-Prior": 0.49, "CQL-Prior": 0.80, "BC": 0.31},
}
BUDGET = {
    "smoke": dict(datasets=["overcooked-salad:40"], methods=list(METHODS), seeds=[1], steps=10, bc_steps=2, eval_freq=10, bc_eval_freq=2,
                  eval_episodes=1, alfworld_eval_freq=10),
    "small": dict(datasets=["overcooked-salad:1000", "overcooked-salad:4000", "alfworld-pick:1500"],
                  methods=["DQN", "CQL", "CQL (mean TD)", "DQN-Prior", "CQL-Prior"], seeds=[1, 2, 3],
                  steps=5000, bc_steps=100, eval_freq=500, bc_eval_freq=50, eval_episodes=3, alfworld_eval_freq=2500),
    "paper": dict(datasets=[f"overcooked-salad:{n}" for n in (1000, 4000, 8000, 12000, 24000)] + ["alfworld-pick:6500"],
                  methods=list(METHODS), seeds=[1, 2, 3], steps=10_000, bc_steps=2000, eval_freq=500, bc_eval_freq=250, eval_episodes=10,
                  alfworld_eval_freq=500),
}  # fmt: skip


def dataset_path(data_dir: str, spec: str, extra: list[str]) -> str:
    env, n = dataset_spec(spec)
    tag = "_" + hashlib.sha1(" ".join(prior_args(extra)).encode()).hexdigest()[:8] if prior_args(extra) else ""
    return os.path.join(data_dir, f"{name_part(env)}_{n}{tag}.jsonl")


def build_command(spec: str, path: str, extra: list[str], workers: int = 1) -> list[str]:
    env, n = dataset_spec(spec)
    # prompt history 0: most transitions share a prompt, i.e. one LLM query per distinct state
    return ["build_dataset.py", "--env", env, "--transitions", str(n), "--out", path, "--workers", str(workers),
            "--history", "0", *prior_args(extra)]  # fmt: skip


def ensure_datasets(specs: list[str], data_dir: str, extra: list[str], dry_run: bool, workers: int = 1) -> list[str]:
    """Build the missing datasets (build_dataset.py writes atomically, so a file that exists is complete)."""
    failed = []
    for spec in specs:
        path = dataset_path(data_dir, spec, extra)
        if os.path.exists(path):
            continue
        cmd = build_command(spec, path, extra, workers)
        shown = "python " + " ".join(map(show_path, hide_secrets(cmd)))
        print(("" if dry_run else "building dataset: ") + shown, flush=True)
        if dry_run:
            continue
        os.makedirs(data_dir, exist_ok=True)
        with open(path + ".log", "a") as log:
            if subprocess.run([sys.executable, *cmd], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode:
                print(f"        FAILED; see {path}.log", flush=True)
                failed.append(spec)
    return failed


def jobs_for(budget: str, specs: list[str], methods: list[str], seeds: list[int], data_dir: str, extra: list[str],
             steps=None) -> list[Job]:  # fmt: skip
    b = BUDGET[budget]
    jobs = []
    for spec in specs:
        path = dataset_path(data_dir, spec, extra)
        for method in methods:
            script, method_args = METHODS[method]
            bc = script == "bc.py"
            n_steps = (b["bc_steps"] if bc else steps or b["steps"])
            # an ALFWorld evaluation meets unseen games, i.e. new prompts for the LLM: evaluate less often
            eval_freq = b["alfworld_eval_freq"] if spec.startswith("alfworld") else b["eval_freq"]
            for seed in seeds:
                jobs.append(Job({"dataset": spec, "method": method, "seed": seed}, script, [
                    "--dataset", path, "--seed", seed, "--exp-name", method.lower(), "--total-steps", n_steps,
                    "--eval-freq", b["bc_eval_freq"] if bc else eval_freq, "--eval-episodes", b["eval_episodes"],
                    *method_args]))  # fmt: skip
    return jobs


def run_row(run: dict) -> dict:
    s = run["summary"]
    return {"transitions": s.get("transitions"), "gradient_steps": s.get("global_step", s.get("step")),
            "final_return": s.get("eval/return_mean"), "final_success": s.get("eval/success_rate"),
            "best_return": s.get("best_eval_return"), "best_step": s.get("best_eval_step"),
            "unseen_success": s.get("eval_unseen/success_rate"),
            "data_action_in_proposals": s.get("data_action_coverage"),
            "eval_prior_queries": s.get("prior_queries")}  # fmt: skip


def paper_row(spec: str) -> dict:
    """The paper's Table 1 row for a dataset; for an ALFWorld-Pick of another size, its Pick (6572) row."""
    if spec in PAPER:
        return PAPER[spec]
    return PAPER["alfworld-pick:6500"] if spec.startswith("alfworld-pick:") else {}


def smallest_reaching(table: list[dict], metric: str, threshold: float) -> dict:
    """method -> the smallest Salad(N) whose mean `metric` reaches the threshold (None if none does)."""
    out = {}
    for t in table:
        env, n = dataset_spec(t["dataset"])
        reached = env == "overcooked-salad" and t[f"{metric}_mean"] >= threshold
        best = out.get(t["method"])
        out[t["method"]] = min(best, n) if reached and best is not None else (n if reached else best)
    return out


def main(argv=None) -> int:
    parser = common_parser(__doc__)
    parser.add_argument("--datasets", nargs="+", default=None, help="env:transitions, e.g. overcooked-salad:1000")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=None, help="override the budget's")
    parser.add_argument("--steps", type=int, default=None, help="override the budget's gradient steps (not BC's)")
    parser.add_argument("--data-dir", default=os.path.join(ROOT, "data"))
    parser.add_argument("--build-workers", type=int, default=1,
                        help="processes storing a new dataset's proposals (build_dataset.py --workers; one per core)")
    args = parser.parse_args(argv)
    b = BUDGET[args.budget]
    specs, seeds = args.datasets or b["datasets"], args.seeds or b["seeds"]
    failed = [] if args.collect_only else ensure_datasets(specs, args.data_dir, args.extra, args.dry_run,
                                                                args.build_workers)
    specs = [s for s in specs if s not in failed]
    jobs = jobs_for(args.budget, specs, args.methods or b["methods"], seeds, args.data_dir, args.extra, args.steps)
    entry_dir = os.path.join(args.runs_dir, ENTRY, args.budget)
    if not args.collect_only:
        failed += run_jobs(jobs, entry_dir, args.extra, args.dry_run)
    if args.dry_run:
        return 0
    rows = save_results(jobs, entry_dir, run_row, results_path(args.results_dir, ENTRY, args.budget), curves=True)
    if rows:
        table = aggregate(rows, ["dataset", "method"], ["final_return", "best_return", "final_success",
                                                         "unseen_success", "data_action_in_proposals",
                                                         "transitions"])  # fmt: skip
        for t in table:
            t.update(final=fmt(t["final_return_mean"], t["final_return_se"]),
                     best=fmt(t["best_return_mean"], t["best_return_se"]),
                     success=fmt(t["final_success_mean"], t["final_success_se"]),
                     unseen=fmt(t["unseen_success_mean"], t["unseen_success_se"]),
                     paper=paper_row(t["dataset"]).get(t["method"]),
                     transitions=int(t["transitions_mean"]))  # fmt: skip
        print(markdown_table(table, ["dataset", "transitions", "method", "n", "final", "best", "success", "unseen",
                                     "paper"],
                             ["dataset", "transitions", "method", "seeds", "final return", "best return",
                              "final success", "final success, unseen games", "paper (return)"]))  # fmt: skip
        for metric in ("final_return", "best_return"):
            print(f"smallest Salad(N) with mean {metric.replace('_', ' ')} >= 1.0: "
                  + ", ".join(f"{m} {n}" for m, n in smallest_reaching(table, metric, 1.0).items()))  # fmt: skip
    if failed:
        print(f"failed: {' '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
