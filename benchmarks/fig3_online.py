"""Fig. 3 (online): DQN vs DQN-Prior (and GFlan, GFlan-Prior) — eval return and success vs env steps.

Writes results/fig3_online.csv (one row per run: steps to eval success >= 0.9, final and best return, LLM queries,
coverage, wall-clock, peak memory, command, commit) and results/fig3_online_curves.csv (every evaluation), then
prints mean ± standard error over seeds. `python benchmarks/plot.py` draws results/fig3_online.png.

    python benchmarks/fig3_online.py                      # --budget small: Tomato, FrozenLake, ALFWorld-Pick, CPU
    python benchmarks/fig3_online.py --budget paper -- --prior.model Qwen/Qwen1.5-7B --prior.backend vllm
    python benchmarks/fig3_online.py --envs alfworld-pick --algos dqn dqn_prior --seeds 1
    python benchmarks/fig3_online.py --envs overcooked-salad -- --eval-freq 1000 --eval-episodes 5  # later flags win

Budgets (env steps per run; the paper trains Tomato 200 episodes, Salad 300, ALFWorld 1000, i.e. about the
`paper` sizes below):
    smoke  overcooked-tomato; dqn, dqn_prior, gflan_prior; seed 1; 24 steps
    small  overcooked-tomato, frozenlake, alfworld-pick; dqn, dqn_prior; seeds 1 2 3; 3000 steps; Tomato and
           FrozenLake evaluated every 100 steps with 10 episodes, ALFWorld-Pick every 500 with 5 seen + 5 unseen
           games, TextWorld-Treasure (`--envs textworld-treasure`) every 250 with 10 + 10 (the settings of
           benchmarks/prior_sweep.py, so a run here sits on that figure's axis)
    paper  all five envs; dqn, dqn_prior, gflan, gflan_prior; seeds 1 2 3; Tomato 6000, FrozenLake 5000,
           Salad 15000, ALFWorld 61000 steps; eval every 500 with 10 episodes
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (Job, aggregate, common_parser, first_step_reaching, fmt, markdown_table, results_path,  # noqa: E402
                    run_jobs, save_results)  # fmt: skip

ENTRY = "fig3_online"
ALGOS = {  # algo -> (script, arguments)
    "dqn": ("dqn_prior.py", ["--k", "0"]),
    "dqn_prior": ("dqn_prior.py", ["--k", "5"]),
    "gflan": ("gflan_prior.py", ["--k", "0"]),
    "gflan_prior": ("gflan_prior.py", ["--k", "5"]),
    "gflan_prior_subas": ("gflan_prior.py", ["--k", "5", "--kl-coef", "0", "--sub-action-space"]),  # Eq. 26
}
PAPER_STEPS = {"overcooked-tomato": 6000, "frozenlake": 5000, "overcooked-salad": 15000, "alfworld-pick": 61000,
               "alfworld-examine": 61000}  # fmt: skip
BUDGET = {
    "smoke": dict(envs=["overcooked-tomato"], algos=["dqn", "dqn_prior", "gflan_prior"], seeds=[1], steps=24,
                  eval_freq=24, eval_episodes=1),
    "small": dict(envs=["overcooked-tomato", "frozenlake", "alfworld-pick"], algos=["dqn", "dqn_prior"],
                  seeds=[1, 2, 3], steps=3000,
                  eval_freq={"alfworld-pick": 500, "textworld-treasure": 250, "other": 100},
                  eval_episodes={"alfworld-pick": 5, "other": 10}),
    "paper": dict(envs=list(PAPER_STEPS), algos=["dqn", "dqn_prior", "gflan", "gflan_prior"], seeds=[1, 2, 3],
                  steps=None, eval_freq=500, eval_episodes=10),
}  # fmt: skip


def jobs_for(budget: str, envs=None, algos=None, seeds=None, steps=None) -> list[Job]:
    b = BUDGET[budget]

    def per_env(setting, env):  # a number, or {env: number, "other": number}
        return setting.get(env, setting["other"]) if isinstance(setting, dict) else setting

    jobs = []
    for env in envs or b["envs"]:
        n = steps or b["steps"] or PAPER_STEPS.get(env)
        if n is None:
            raise SystemExit(f"--budget {budget} has no length for {env}: pass --steps")
        for algo in algos or b["algos"]:
            script, algo_args = ALGOS[algo]
            for seed in seeds or b["seeds"]:
                extra = []
                if script == "gflan_prior.py" and budget == "smoke":  # one PPO update: 2 envs x 12 steps
                    extra = ["--num-envs", "2", "--num-steps", "12", "--num-minibatches", "2", "--update-epochs", "1"]
                if script == "dqn_prior.py" and budget == "smoke":
                    extra = ["--learning-starts", "8"]
                jobs.append(Job({"env": env, "algo": algo, "seed": seed}, script, [
                    "--env", env, "--seed", seed, "--exp-name", algo, "--total-timesteps", n,
                    "--eval-freq", per_env(b["eval_freq"], env), "--eval-episodes", per_env(b["eval_episodes"], env),
                    *algo_args, *extra]))  # fmt: skip
    return jobs


def run_row(run: dict) -> dict:
    s = run["summary"]
    return {"steps": s["global_step"], "steps_to_success": first_step_reaching(run["evals"], "eval/success_rate", 0.9),
            "final_return": s.get("eval/return_mean"), "final_success": s.get("eval/success_rate"),
            "best_return": s.get("best_eval_return"), "prior_queries": s.get("prior_queries"),
            "prior_coverage": s.get("prior_coverage")}  # fmt: skip


def main(argv=None) -> int:
    parser = common_parser(__doc__)
    parser.add_argument("--envs", nargs="+", default=None)
    parser.add_argument("--algos", nargs="+", choices=list(ALGOS), default=None)
    parser.add_argument("--steps", type=int, default=None, help="override the budget's env steps per run")
    args = parser.parse_args(argv)
    jobs = jobs_for(args.budget, args.envs, args.algos, args.seeds, args.steps)
    entry_dir = os.path.join(args.runs_dir, ENTRY, args.budget)
    failed = [] if args.collect_only else run_jobs(jobs, entry_dir, args.extra, args.dry_run)
    if args.dry_run:
        return 0
    rows = save_results(jobs, entry_dir, run_row, results_path(args.results_dir, ENTRY, args.budget), curves=True)
    if rows:
        table = aggregate(rows, ["env", "algo"], ["final_return", "final_success", "best_return", "steps_to_success",
                                                  "prior_queries", "prior_coverage", "wall_clock_s"])  # fmt: skip
        for t in table:
            reached = sum(r["steps_to_success"] is not None for r in rows if (r["env"], r["algo"]) == (t["env"], t["algo"]))
            t.update(final=fmt(t["final_return_mean"], t["final_return_se"]),
                     success=fmt(t["final_success_mean"], t["final_success_se"]),
                     reached=f"{reached}/{t['n']}", to_success=fmt(t["steps_to_success_mean"], t["steps_to_success_se"], 0),
                     queries=fmt(t["prior_queries_mean"], t["prior_queries_se"], 0),
                     coverage=fmt(t["prior_coverage_mean"], t["prior_coverage_se"]),
                     minutes=fmt(t["wall_clock_s_mean"] / 60, t["wall_clock_s_se"] / 60, 1))  # fmt: skip
        print(markdown_table(table, ["env", "algo", "n", "final", "success", "reached", "to_success", "queries",
                                     "coverage", "minutes"],
                             ["env", "algo", "seeds", "final return", "final success", "reached success >= 0.9",
                              "steps to success (those that did)", "LLM queries", "prior coverage", "minutes"]))  # fmt: skip
    if failed:
        print(f"failed: {' '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
