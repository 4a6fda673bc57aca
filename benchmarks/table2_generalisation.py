"""Table 2 (generalisation): a Q-network trained with one prior (k=5) acting with other k and other LLMs.

Trains CQL-Prior on the ALFWorld-Pick dataset (built as in table1_offline.py, with the training prior), then
evaluates the trained Q without further training (`cql_prior.py --total-steps 0 --load-model ...`) with
k in {1, 5, 10, 15} and each evaluation prior, on the seen (train) and unseen ALFWorld-Pick games. k=1 is the LLM
alone: the Q-network has nothing to choose from. Writes results/table2_generalisation.csv and prints the table.

    python benchmarks/table2_generalisation.py                                   # --budget small (CPU)
    python benchmarks/table2_generalisation.py --eval-models embedded smollm2 Qwen/Qwen1.5-4B
    python benchmarks/table2_generalisation.py --budget paper -- --prior.model Qwen/Qwen1.5-7B --prior.backend vllm

`embedded` is the training prior's model (the embedded Gemma-3-270M unless `-- --prior.model` says otherwise);
any other name goes to `--eval-prior-model` (e.g. `smollm2`, the other embedded LLM, or a hub id).

Budgets:
    smoke  Salad(40) (no unseen split), 10 gradient steps, k in {1, 2}, the training prior, 1 episode
    small  ALFWorld-Pick(1500) (see table1_offline.py), seed 1, 5000 gradient steps; k in {1, 5, 10, 15}; embedded
           and smollm2; 3 episodes per split
    paper  ALFWorld-Pick(6500), seeds 1 2 3, 10000 gradient steps; k in {1, 5, 10, 15}; the training prior and
           --eval-models; 26 episodes per split (the paper's 26 tasks)
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (ROOT, Job, aggregate, common_parser, fmt, markdown_table, results_path, run_dir_of, run_jobs,  # noqa: E402
                    save_results)  # fmt: skip
from table1_offline import dataset_path, ensure_datasets  # noqa: E402

ENTRY = "table2_generalisation"
BUDGET = {
    "smoke": dict(dataset="overcooked-salad:40", seeds=[1], steps=10, ks=[1, 2], models=["embedded"], episodes=1),
    "small": dict(dataset="alfworld-pick:1500", seeds=[1], steps=5000, ks=[1, 5, 10, 15],
                  models=["embedded", "smollm2"], episodes=3),
    "paper": dict(dataset="alfworld-pick:6500", seeds=[1, 2, 3], steps=10_000, ks=[1, 5, 10, 15],
                  models=["embedded"], episodes=26),
}  # fmt: skip
PAPER = {  # Table 2, CQL-Prior trained with Qwen1.5-7B, k=5, evaluated with the same LLM: seen / unseen tasks
    ("seen", 1): 0.19, ("seen", 5): 0.80, ("seen", 10): 0.81, ("seen", 15): 0.77,
    ("unseen", 1): 0.04, ("unseen", 5): 0.46, ("unseen", 10): 0.50, ("unseen", 15): 0.50,
}  # fmt: skip


def train_jobs(b: dict, spec: str, path: str, seeds: list[int], steps: int) -> list[Job]:
    return [Job({"stage": "train", "dataset": spec, "seed": seed}, "cql_prior.py", [
        "--dataset", path, "--seed", seed, "--exp-name", "cql-prior", "--total-steps", steps, "--eval-freq",
        max(steps // 4, 1), "--eval-episodes", b["episodes"]]) for seed in seeds]  # fmt: skip


def eval_jobs(b: dict, spec: str, path: str, trained: dict, ks: list[int], models: list[str]) -> list[Job]:
    """`trained`: seed -> the trained run folder (None before training: the dry run shows a placeholder)."""
    jobs = []
    for seed, run_dir in trained.items():
        q = os.path.join(run_dir, "q_network.pt") if run_dir else f"<the seed-{seed} training run>/q_network.pt"
        for model in models:
            for k in ks:
                model_args = [] if model == "embedded" else ["--eval-prior-model", model]
                key = {"stage": "eval", "dataset": spec, "seed": seed, "eval_model": model, "eval_k": k}
                jobs.append(Job(key, "cql_prior.py", [
                    "--dataset", path, "--seed", seed, "--exp-name", f"eval-k{k}", "--total-steps", 0,
                    "--load-model", q, "--eval-k", k, *model_args, "--eval-episodes", b["episodes"]]))  # fmt: skip
    return jobs


def eval_row(run: dict) -> dict:
    s = run["summary"]
    return {"seen_return": s.get("eval/return_mean"), "seen_success": s.get("eval/success_rate"),
            "unseen_return": s.get("eval_unseen/return_mean"), "unseen_success": s.get("eval_unseen/success_rate"),
            "eval_prior_queries": s.get("prior_queries")}  # fmt: skip


def main(argv=None) -> int:
    parser = common_parser(__doc__)
    parser.add_argument("--dataset", default=None, help="env:transitions (default: the budget's)")
    parser.add_argument("--ks", nargs="+", type=int, default=None)
    parser.add_argument("--eval-models", nargs="+", default=None, help="`embedded` = the training prior's model")
    parser.add_argument("--steps", type=int, default=None, help="override the budget's gradient steps")
    parser.add_argument("--data-dir", default=os.path.join(ROOT, "data"))
    args = parser.parse_args(argv)
    b = BUDGET[args.budget]
    spec, seeds = args.dataset or b["dataset"], args.seeds or b["seeds"]
    failed = [] if args.collect_only else ensure_datasets([spec], args.data_dir, args.extra, args.dry_run)
    if failed:
        print(f"failed: dataset {spec}", file=sys.stderr)
        return 1
    path = dataset_path(args.data_dir, spec, args.extra)
    entry_dir = os.path.join(args.runs_dir, ENTRY, args.budget)
    train = train_jobs(b, spec, path, seeds, args.steps or b["steps"])
    if not args.collect_only:
        failed += run_jobs(train, entry_dir, args.extra, args.dry_run)
    trained = {job.key["seed"]: run_dir_of(os.path.join(entry_dir, job.name)) for job in train
               if job.name not in failed}  # fmt: skip
    evals = eval_jobs(b, spec, path, trained, args.ks or b["ks"], args.eval_models or b["models"])
    if not args.collect_only:
        failed += run_jobs(evals, entry_dir, args.extra, args.dry_run)
    if args.dry_run:
        return 0
    rows = save_results(evals, entry_dir, eval_row, results_path(args.results_dir, ENTRY, args.budget))
    if rows:
        table = aggregate(rows, ["dataset", "eval_model", "eval_k"], ["seen_return", "seen_success", "unseen_return",
                                                            "unseen_success"])  # fmt: skip
        for t in table:
            t.update(seen=fmt(t["seen_success_mean"], t["seen_success_se"]),
                     unseen=fmt(t["unseen_success_mean"], t["unseen_success_se"]),
                     seen_r=fmt(t["seen_return_mean"], t["seen_return_se"]),
                     paper_seen=PAPER.get(("seen", t["eval_k"])) if t["dataset"].startswith("alfworld-pick") else None,
                     paper_unseen=PAPER.get(("unseen", t["eval_k"])) if t["dataset"].startswith("alfworld-pick") else None)
        print(markdown_table(table, ["dataset", "eval_model", "eval_k", "n", "seen", "unseen", "seen_r", "paper_seen",
                                     "paper_unseen"],
                             ["dataset", "eval LLM", "k", "seeds", "seen success", "unseen success", "seen return",
                              "paper seen (Qwen-7B)", "paper unseen (Qwen-7B)"]))  # fmt: skip
    if failed:
        print(f"failed: {' '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
