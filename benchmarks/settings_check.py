"""The settings that decide whether a good prior helps, each measured with a synthetic prior of known quality.

A prior that knows the task must make the prior-based agents succeed; three defaults of the code the paper's effect
was hidden behind, each tried both ways (beyond the paper; docs/results.md has the tables):

- `time_limit` (Tomato, online): does the episode cap end the TD target (the authors' `done`) or bootstrap
  (`--bootstrap-time-limit`)? And does evaluation act greedily over the proposals (`--eval-alpha 0`) or sample the
  learned policy softmax(Q/α) (`--eval-alpha 0.1`, α of training)? DQN-Prior with p_Q, Q = 0.5, and DQN.
- `eval_alfworld` (ALFWorld-Pick, online): greedy against sampled evaluation for DQN-Prior (Q = 0.5) and DQN.
- `cql_balance` (Salad(1000), offline): the TD term summed over the batch (the authors' code; the penalty a batch
  mean) against averaged (β then weighs ~128x more), at Q = 1, 0.5 and 0.25, greedy and sampled evaluation; CQL over
  every action, and offline DQN-Prior, the same way.

    python benchmarks/settings_check.py                       # --budget small: all three
    python benchmarks/settings_check.py --parts time_limit --seeds 1

Budgets:
    smoke  one run of each part, a few steps
    small  time_limit 1500 env steps, evaluation every 100 (10 episodes), seeds 1 2 3; eval_alfworld 3000 env steps,
           evaluation every 500 (5 seen and 5 unseen games), seed 1; cql_balance 5000 gradient steps, evaluation
           every 500 (10 episodes), seeds 1 2 3
    paper  as small

Writes results/settings_check.csv and results/settings_check_curves.csv.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (ROOT, Job, aggregate, common_parser, first_step_reaching, fmt, markdown_table,  # noqa: E402
                    results_path, run_jobs, save_results)  # fmt: skip
from table1_offline import dataset_path, ensure_datasets  # noqa: E402

ENTRY = "settings_check"
SYNTHETIC = ["--prior.backend", "synthetic", "--prior.cache", "memory"]
PARTS = ("time_limit", "eval_alfworld", "cql_balance")
BUDGET = {
    "smoke": dict(seeds=[1], alf_seeds=[1], tomato=(24, 24, 1), alfworld=(12, 12, 1), salad=("overcooked-salad:40",
                  10, 10, 1)),  # fmt: skip
    "small": dict(seeds=[1, 2, 3], alf_seeds=[1], tomato=(1500, 100, 10), alfworld=(3000, 500, 5),
                  salad=("overcooked-salad:1000", 5000, 500, 10)),  # fmt: skip
}
BUDGET["paper"] = BUDGET["small"]


def time_limit_jobs(b: dict) -> list[Job]:
    steps, freq, episodes = b["tomato"]
    jobs = []
    for seed in b["seeds"]:
        for boot in (True, False):
            for eval_alpha in (0, 0.1):
                for algo, algo_args in (("DQN-Prior", [*SYNTHETIC, "--prior.synthetic-q", "0.5"]), ("DQN", ["--k", "0"])):
                    args = ["--env", "overcooked-tomato", *algo_args, "--total-timesteps", steps, "--eval-freq", freq,
                            "--eval-episodes", episodes, "--eval-alpha", eval_alpha, "--seed", seed,
                            *(["--bootstrap-time-limit"] if boot else []), "--exp-name", "time-limit"]  # fmt: skip
                    if steps < 100:
                        args += ["--learning-starts", "8"]
                    key = {"part": "time_limit", "algo": algo, "q": 0.5 if algo == "DQN-Prior" else None,
                           "setting": f"bootstrap {'on' if boot else 'off'}, eval alpha {eval_alpha}", "seed": seed}
                    jobs.append(Job(key, "dqn_prior.py", args))
    return jobs


def eval_alfworld_jobs(b: dict) -> list[Job]:
    steps, freq, episodes = b["alfworld"]
    jobs = []
    for seed in b["alf_seeds"]:
        for eval_alpha in (0, 0.1):
            for algo, algo_args in (("DQN-Prior", [*SYNTHETIC, "--prior.synthetic-q", "0.5"]), ("DQN", ["--k", "0"])):
                args = ["--env", "alfworld-pick", *algo_args, "--total-timesteps", steps, "--eval-freq", freq,
                        "--eval-episodes", episodes, "--eval-alpha", eval_alpha, "--seed", seed, "--exp-name",
                        "eval-alfworld"]  # fmt: skip
                key = {"part": "eval_alfworld", "algo": algo, "q": 0.5 if algo == "DQN-Prior" else None,
                       "setting": f"eval alpha {eval_alpha}", "seed": seed}
                jobs.append(Job(key, "dqn_prior.py", args))
    return jobs


def cql_balance_jobs(b: dict, data_dir: str) -> list[Job]:
    spec, steps, freq, episodes = b["salad"]
    grid = [("CQL-Prior", q, reduction, eval_alpha) for q in (1.0, 0.5, 0.25) for reduction in ("sum", "mean")
            for eval_alpha in (0, 0.1)]  # fmt: skip
    grid += [("CQL", None, reduction, eval_alpha) for reduction in ("sum", "mean") for eval_alpha in (0, 0.1)]
    grid += [("DQN-Prior", q, "mean", eval_alpha) for q in (1.0, 0.5) for eval_alpha in (0, 0.1)]
    jobs = []
    for seed in b["seeds"]:
        for algo, q, reduction, eval_alpha in grid:
            data_q = 1.0 if q is None else q
            prior = ["--k", "0"] if q is None else [*SYNTHETIC, "--prior.synthetic-q", f"{q:g}"]
            args = ["--dataset", dataset_path(data_dir, spec, synthetic(data_q)), *prior, "--total-steps", steps,
                    "--eval-freq", freq, "--eval-episodes", episodes, "--loss-reduction", reduction, "--eval-alpha",
                    eval_alpha, "--seed", seed, "--exp-name", "cql-balance",
                    *(["--cql-beta", "0"] if algo == "DQN-Prior" else [])]  # fmt: skip
            key = {"part": "cql_balance", "algo": algo, "q": q,
                   "setting": f"TD {reduction}, eval alpha {eval_alpha}", "seed": seed}
            jobs.append(Job(key, "cql_prior.py", args))
    return jobs


def synthetic(q: float) -> list[str]:
    return ["--prior.backend", "synthetic", "--prior.synthetic-q", f"{q:g}"]


def run_row(run: dict) -> dict:
    s, evals = run["summary"], run["evals"]
    return {"steps_to_success": first_step_reaching(evals, "eval/success_rate", 0.9),
            "final_success": s.get("eval/success_rate"), "final_return": s.get("eval/return_mean"),
            "best_return": s.get("best_eval_return"), "unseen_success": s.get("eval_unseen/success_rate"),
            "evals_at_success": sum((e.get("eval/success_rate") or 0) >= 0.9 for e in evals),
            "evals": len(evals)}  # fmt: skip


def main(argv=None) -> int:
    parser = common_parser(__doc__)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--data-dir", default=os.path.join(ROOT, "data"))
    args = parser.parse_args(argv)
    if args.extra:
        parser.error("settings_check.py runs the synthetic prior; it takes no extra script arguments")
    b = dict(BUDGET[args.budget])
    if args.seeds:
        b["seeds"] = b["alf_seeds"] = args.seeds
    jobs, failed = [], []
    if "time_limit" in args.parts:
        jobs += time_limit_jobs(b)
    if "eval_alfworld" in args.parts:
        jobs += eval_alfworld_jobs(b)
    if "cql_balance" in args.parts:
        if not args.collect_only:
            for q in (1.0, 0.5, 0.25):
                failed += ensure_datasets([b["salad"][0]], args.data_dir, synthetic(q), args.dry_run)
        jobs += cql_balance_jobs(b, args.data_dir)
    entry_dir = os.path.join(args.runs_dir, ENTRY, args.budget)
    if not args.collect_only:
        failed += run_jobs(jobs, entry_dir, [], args.dry_run)
    if args.dry_run:
        return 0
    rows = save_results(jobs, entry_dir, run_row, results_path(args.results_dir, ENTRY, args.budget), curves=True)
    if rows:
        table = aggregate(rows, ["part", "algo", "q", "setting"], ["final_success", "final_return", "best_return",
                                                                    "unseen_success"])  # fmt: skip
        for t in table:
            members = [r for r in rows if all(r[c] == t[c] for c in ("part", "algo", "q", "setting"))]
            t.update(q="–" if t["q"] is None else t["q"],
                     held=", ".join(f"{r['evals_at_success']}/{r['evals']}" for r in members),
                     success=fmt(t["final_success_mean"], t["final_success_se"]),
                     final=fmt(t["final_return_mean"], t["final_return_se"]),
                     unseen=fmt(t["unseen_success_mean"], t["unseen_success_se"]))  # fmt: skip
        print(markdown_table(table, ["part", "algo", "q", "setting", "n", "success", "unseen", "final", "held"],
                             ["part", "algo", "Q", "setting", "seeds", "final success", "final success, unseen",
                              "final return", "evaluations at success >= 0.9 (per seed)"]))  # fmt: skip
    if failed:
        print(f"failed: {' '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
