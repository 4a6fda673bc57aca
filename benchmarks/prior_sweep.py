"""Performance against prior quality (beyond the paper): how good must the prior be for DQN-Prior / CQL-Prior to help?

The prior is the synthetic one (`--prior.backend synthetic --prior.synthetic-q Q`): p_Q(a|s) = Q·1[a = a*(s)] +
(1 − Q)/|A(s)|, a* the env's expert action, sampled k = 5 times per state like an LLM. Q = 0 is a uniform prior,
Q = 1 proposes only the expert's action. Each Q is compared with the prior-free baseline of the same script:

- online (dqn_prior.py): DQN-Prior at each Q and DQN (`--k 0`) on Tomato, FrozenLake, ALFWorld-Pick and TextWorld's
  Treasure Hunter (level 15), or any `--envs` (an env no budget names runs with the budget's `online_other`); env
  steps to an evaluation success >= 0.9, and the final success (does it hold?);
- offline (cql_prior.py): CQL-Prior and DQN-Prior (`--cql-beta 0`) at each Q and CQL (`--k 0`) on Salad(1000)
  and ALFWorld-Pick(1500), each dataset built by build_dataset.py with the same transitions (same seed) and the
  proposals of p_Q; final and best return.

`benchmarks/prior_quality.py` puts a real LLM on the same axis (its `equivalent_q`), and `plot.py` marks it.

    python benchmarks/prior_sweep.py                                  # --budget small (CPU, no LLM)
    python benchmarks/prior_sweep.py --parts online --envs overcooked-tomato --seeds 1

Budgets:
    smoke  online Tomato 24 env steps, offline Salad(40) 10 gradient steps; Q in {0, 1}; seed 1
    small  Q in {0, 0.25, 0.5, 0.75, 1}; seeds 1 2 3. Online: Tomato and FrozenLake 3000 env steps (evaluation
           every 100 with 10 episodes), ALFWorld-Pick 3000 (every 500, 5 seen and 5 unseen games), TextWorld-Treasure
           3000 (every 250, 10 seen and 10 unseen games). Offline: 5000 gradient steps; Salad(1000) evaluated every 500
           with 10 episodes, ALFWorld-Pick(1500) every 1000 with 5 (+5 unseen)
    paper  as small with the paper's lengths: Tomato 6000, FrozenLake 5000 and ALFWorld-Pick 20000 env steps
           (TextWorld-Treasure 10000); 10000 gradient steps on Salad(1000) and ALFWorld-Pick(6500); 10 evaluation
           episodes

Writes results/prior_sweep.csv and results/prior_sweep_curves.csv (one row per run / evaluation, with the command and
commit); `python benchmarks/plot.py` draws results/prior_sweep.png.
"""

import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (ROOT, Job, aggregate, common_parser, dataset_spec, first_step_reaching, fmt,  # noqa: E402
                    markdown_table, results_path, run_jobs, save_results)  # fmt: skip
from table1_offline import dataset_path, ensure_datasets  # noqa: E402

ENTRY = "prior_sweep"
ONLINE = {"DQN-Prior": ["--k", "5"], "DQN": ["--k", "0"]}  # dqn_prior.py
# cql_prior.py. CQL twice: with the default balance (TD summed over the batch, the authors' code, under which CQL-Prior
# does best) and with β against the batch-mean TD, a ~128x stronger penalty, under which CQL over every action does
# best (docs/cql_prior.md): each baseline at its better setting.
OFFLINE = {"CQL-Prior": [], "DQN-Prior": ["--cql-beta", "0"], "CQL": ["--k", "0"],
           "CQL (mean TD)": ["--k", "0", "--loss-reduction", "mean"]}  # fmt: skip
BASELINES = ("DQN", "CQL", "CQL (mean TD)")  # prior-free: one run per seed, not one per Q
BUDGET = {
    "smoke": dict(qs=[0.0, 1.0], seeds=[1],
                  online={"overcooked-tomato": dict(steps=24, eval_freq=24, eval_episodes=1)},
                  online_other=dict(steps=24, eval_freq=24, eval_episodes=1),
                  offline={"overcooked-salad:40": dict(steps=10, eval_freq=10, eval_episodes=1)}),
    "small": dict(qs=[0.0, 0.25, 0.5, 0.75, 1.0], seeds=[1, 2, 3],
                  online={"overcooked-tomato": dict(steps=3000, eval_freq=100, eval_episodes=10),
                          "frozenlake": dict(steps=3000, eval_freq=100, eval_episodes=10),
                          "alfworld-pick": dict(steps=3000, eval_freq=500, eval_episodes=5),
                          "textworld-treasure": dict(steps=3000, eval_freq=250, eval_episodes=10)},
                  online_other=dict(steps=3000, eval_freq=100, eval_episodes=10),
                  offline={"overcooked-salad:1000": dict(steps=5000, eval_freq=500, eval_episodes=10),
                           "alfworld-pick:1500": dict(steps=5000, eval_freq=1000, eval_episodes=5)}),
    "paper": dict(qs=[0.0, 0.25, 0.5, 0.75, 1.0], seeds=[1, 2, 3],
                  online={"overcooked-tomato": dict(steps=6000, eval_freq=200, eval_episodes=10),
                          "frozenlake": dict(steps=5000, eval_freq=200, eval_episodes=10),
                          "alfworld-pick": dict(steps=20000, eval_freq=1000, eval_episodes=10),
                          "textworld-treasure": dict(steps=10000, eval_freq=500, eval_episodes=10)},
                  online_other=dict(steps=5000, eval_freq=200, eval_episodes=10),
                  offline={"overcooked-salad:1000": dict(steps=10000, eval_freq=500, eval_episodes=10),
                           "alfworld-pick:6500": dict(steps=10000, eval_freq=1000, eval_episodes=10)}),
}  # fmt: skip
# Every env a budget names; any other (an env from elsewhere, other keywords) runs online with `online_other`.
KNOWN_ENVS = {env for b in BUDGET.values() for env in (*b["online"], *(dataset_spec(s)[0] for s in b["offline"]))}


def synthetic(q: float) -> list[str]:
    return ["--prior.backend", "synthetic", "--prior.synthetic-q", f"{q:g}"]


def online_jobs(b: dict, envs: list[str], qs: list[float], seeds: list[int]) -> list[Job]:
    jobs = []
    for env in envs:
        if env not in b["online"] and env in KNOWN_ENVS:
            continue  # another budget's, or an offline dataset's
        run = b["online"].get(env, b["online_other"])
        common = ["--env", env, "--total-timesteps", run["steps"], "--eval-freq", run["eval_freq"],
                  "--eval-episodes", run["eval_episodes"]]  # fmt: skip
        if run["steps"] < 100:  # smoke: learn before the run ends
            common += ["--learning-starts", "8"]
        for algo, algo_args in ONLINE.items():
            for q in [None] if algo in BASELINES else qs:
                for seed in seeds:
                    args = [*common, "--seed", seed, "--exp-name", algo.lower(), *algo_args]
                    jobs.append(Job({"part": "online", "env": env, "algo": algo, "q": q, "seed": seed},
                                    "dqn_prior.py", args + (synthetic(q) if q is not None else [])))  # fmt: skip
    return jobs


def offline_jobs(b: dict, envs: list[str], qs: list[float], seeds: list[int], data_dir: str) -> list[Job]:
    jobs = []
    for spec, run in b["offline"].items():
        if dataset_spec(spec)[0] not in envs:
            continue
        common = ["--total-steps", run["steps"], "--eval-freq", run["eval_freq"], "--eval-episodes",
                  run["eval_episodes"]]  # fmt: skip
        for algo, algo_args in OFFLINE.items():
            for q in [None] if algo in BASELINES else qs:
                data_q = qs[0] if q is None else q  # a baseline ignores the stored proposals: any dataset will do
                for seed in seeds:
                    args = ["--dataset", dataset_path(data_dir, spec, synthetic(data_q)), *common, "--seed", seed,
                            "--exp-name", re.sub(r"\W+", "-", algo.lower()).strip("-"), *algo_args,
                            *(synthetic(q) if q is not None else [])]  # fmt: skip
                    jobs.append(Job({"part": "offline", "env": spec, "algo": algo, "q": q, "seed": seed},
                                    "cql_prior.py", args))  # fmt: skip
    return jobs


def run_row(run: dict) -> dict:
    s = run["summary"]
    return {"steps": s.get("global_step"),
            "steps_to_success": first_step_reaching(run["evals"], "eval/success_rate", 0.9),
            "final_success": s.get("eval/success_rate"), "final_return": s.get("eval/return_mean"),
            "best_return": s.get("best_eval_return"), "unseen_success": s.get("eval_unseen/success_rate"),
            "prior_coverage": s.get("prior_coverage", s.get("data_action_coverage"))}  # fmt: skip


def main(argv=None) -> int:
    parser = common_parser(__doc__)
    parser.add_argument("--parts", nargs="+", choices=["online", "offline"], default=["online", "offline"])
    parser.add_argument("--envs", nargs="+", default=["overcooked-tomato", "frozenlake", "overcooked-salad",
                                                       "alfworld-pick", "textworld-treasure"])  # fmt: skip
    parser.add_argument("--qs", nargs="+", type=float, default=None, help="override the budget's prior qualities")
    parser.add_argument("--data-dir", default=os.path.join(ROOT, "data"))
    args = parser.parse_args(argv)
    if args.extra:
        parser.error("prior_sweep.py runs the synthetic prior at each Q; it takes no extra script arguments")
    b = BUDGET[args.budget]
    qs, seeds = args.qs or b["qs"], args.seeds or b["seeds"]
    jobs, failed = [], []
    if "online" in args.parts:
        jobs += online_jobs(b, args.envs, qs, seeds)
    if "offline" in args.parts:
        specs = [s for s in b["offline"] if dataset_spec(s)[0] in args.envs]
        if not args.collect_only:
            for q in qs:
                failed += ensure_datasets(specs, args.data_dir, synthetic(q), args.dry_run)
        jobs += offline_jobs(b, args.envs, qs, seeds, args.data_dir)
    entry_dir = os.path.join(args.runs_dir, ENTRY, args.budget)
    if not args.collect_only:
        failed += run_jobs(jobs, entry_dir, [], args.dry_run)
    if args.dry_run:
        return 0
    rows = save_results(jobs, entry_dir, run_row, results_path(args.results_dir, ENTRY, args.budget), curves=True)
    if rows:
        table = aggregate(rows, ["part", "env", "algo", "q"], ["steps_to_success", "final_success", "final_return",
                                                                "best_return", "unseen_success", "prior_coverage"])
        for t in table:
            members = [r for r in rows if (r["part"], r["env"], r["algo"], r["q"]) == (t["part"], t["env"],
                                                                                         t["algo"], t["q"])]
            reached = [r["steps_to_success"] for r in members if r["steps_to_success"] is not None]
            t.update(q="–" if t["q"] is None else t["q"], reached=f"{len(reached)}/{t['n']}",
                     to_success=", ".join(map(str, reached)) or "–",
                     success=fmt(t["final_success_mean"], t["final_success_se"]),
                     final=fmt(t["final_return_mean"], t["final_return_se"]),
                     best=fmt(t["best_return_mean"], t["best_return_se"]),
                     unseen=fmt(t["unseen_success_mean"], t["unseen_success_se"]),
                     coverage=fmt(t["prior_coverage_mean"], t["prior_coverage_se"]))  # fmt: skip
        print(markdown_table(table, ["part", "env", "algo", "q", "n", "reached", "to_success", "success", "unseen",
                                     "final", "best", "coverage"],
                             ["part", "env / dataset", "algo", "Q", "seeds", "reached success >= 0.9",
                              "at step", "final success", "final success, unseen", "final return", "best return",
                              "prior coverage"]))  # fmt: skip
    if failed:
        print(f"failed: {' '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
