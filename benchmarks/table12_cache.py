"""Table 12 (cost): DQN-Prior with and without the proposal cache — wall-clock, LLM queries, peak memory.

    per-step  --prior.cache off --prior.per-visit
                                     the LLM is asked at every step and k fresh proposals are drawn from its
                                     answer (the paper's "DQN-Prior (query LLM per step)")
    memory    --prior.cache memory   proposals drawn once per prompt within the run (the paper's "DQN-Prior (Cache)")
    disk      --prior.cache disk     the same, persisted in a fresh SQLite file (what the scripts do by default)
    warm      --prior.cache disk     a second run on the disk variant's file: proposals any earlier run drew are free

The three cached variants draw a state's proposals once, as a deterministic function of (seed, prompt), so they learn
exactly the same Q and only their cost differs; per-step draws anew at every visit, so it learns differently
(and sees more of the admissible actions). Each variant gets its own cache
file inside its job folder, so nothing is inherited from earlier runs or other benchmarks. Peak memory is the run's
maximum resident set size (CPU; on a GPU box read nvidia-smi as well). Writes results/table12_cache.csv.

    python benchmarks/table12_cache.py                         # --budget small: Tomato, 300 steps, seed 1
    python benchmarks/table12_cache.py --budget paper -- --prior.model Qwen/Qwen1.5-7B --prior.backend vllm

Budgets: smoke 12 steps; small 300 steps; paper 6000 steps (Tomato's 200 episodes). Seed 1, overcooked-tomato.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (Job, common_parser, first_step_reaching, markdown_table, results_path, run_jobs,  # noqa: E402
                    save_results)  # fmt: skip

ENTRY = "table12_cache"
VARIANTS = {"per-step": "off", "memory": "memory", "disk": "disk"}
PER_STEP = ["--prior.per-visit"]  # fresh proposals at each visit, as the paper's per-step queries gave
BUDGET = {"smoke": dict(steps=12, eval_freq=12, extra=["--learning-starts", "4"]),
          "small": dict(steps=300, eval_freq=100, extra=[]),
          "paper": dict(steps=6000, eval_freq=500, extra=[])}  # fmt: skip
PAPER = {"per-step": (31.1, 2933), "memory": (13.8, 434)}  # minutes, LLM queries (Qwen1.5-7B, 2x A100)


def jobs_for(budget: str, entry_dir: str, env: str, seeds: list[int]) -> list[Job]:
    b = BUDGET[budget]
    jobs = []
    for seed in seeds:
        disk_cache = os.path.join(entry_dir, f"cache_seed{seed}.sqlite")  # shared by `disk` and `warm` only
        for variant, kind in [*VARIANTS.items(), ("warm", "disk")]:
            cache = ["--prior.cache", disk_cache if kind == "disk" else kind]
            cache += PER_STEP if variant == "per-step" else []
            jobs.append(Job({"variant": variant, "env": env, "seed": seed}, "dqn_prior.py", [
                "--env", env, "--seed", seed, "--exp-name", f"cache-{variant}", "--total-timesteps", b["steps"],
                "--eval-freq", b["eval_freq"], "--eval-episodes", 1, "--k", 5, *cache, *b["extra"]]))  # fmt: skip
    return jobs


def run_row(run: dict) -> dict:
    s = run["summary"]
    return {"steps": s["global_step"], "training_wall_clock_s": round(s["wall_clock_s"], 1),
            "prior_queries": s["prior_queries"],
            "prior_cache_hit_rate": round(s["prior_cache_hit_rate"], 3) if s.get("prior_cache_hit_rate") is not None else None,
            "final_return": round(s["eval/return_mean"], 4) if s.get("eval/return_mean") is not None else None,
            "steps_to_success": first_step_reaching(run["evals"], "eval/success_rate", 0.9)}  # fmt: skip


def main(argv=None) -> int:
    parser = common_parser(__doc__)
    parser.add_argument("--env", default="overcooked-tomato")
    args = parser.parse_args(argv)
    entry_dir = os.path.join(args.runs_dir, ENTRY, args.budget)
    jobs = jobs_for(args.budget, entry_dir, args.env, args.seeds or [1])
    if any("--prior.cache" in a for a in args.extra):
        parser.error("the variants set --prior.cache themselves")
    failed = [] if args.collect_only else run_jobs(jobs, entry_dir, args.extra, args.dry_run)
    if args.dry_run:
        return 0
    rows = save_results(jobs, entry_dir, run_row, results_path(args.results_dir, ENTRY, args.budget))
    if rows:
        for r in rows:
            r["seconds"] = f"{r['training_wall_clock_s']:.0f}"
            r["paper"] = "{} min, {} queries".format(*PAPER[r["variant"]]) if r["variant"] in PAPER else None
        print(markdown_table(rows, ["variant", "env", "seed", "steps", "seconds", "prior_queries",
                                    "prior_cache_hit_rate", "peak_rss_mb", "final_return", "paper"],
                             ["variant", "env", "seed", "env steps", "training s", "LLM queries", "cache hit",
                              "peak RSS MB", "final return", "paper (to converge, 7B)"]))  # fmt: skip
    if failed:
        print(f"failed: {' '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
