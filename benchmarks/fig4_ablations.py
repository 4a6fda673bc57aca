"""Fig. 4b-d (ablations): k proposals and KL coefficient α of GFlan-Prior, softmax temperature α of DQN-Prior,
and two that the paper does not show: DQN-Prior's k and its update-to-data ratio.

    4b              gflan_prior.py --k {1, 3, 5, 10}                   (k proposals approximate the KL to the prior)
    4c              gflan_prior.py --kl-coef {0, 0.001, 0.01, 0.1, 1}  (0 is GFlan)
    4d              dqn_prior.py --alpha {0, 0.03, 0.1, 0.3, 1}        (softmax(Q/α) over the proposals; 0 is greedy)
    dqn_k           dqn_prior.py --k {1, 3, 5, 10}                     (the action set C^k(s) of DQN-Prior)
    gradient_steps  dqn_prior.py --gradient-steps {5, 20, 50}          (every --train-frequency 10 env steps: 0.5, 2
                                                                        and 5 updates per env step)

Writes results/fig4_ablations.csv (one row per run) and results/fig4_ablations_curves.csv; prints final return
and success, mean ± standard error over seeds, per ablation value. `python benchmarks/plot.py` draws the curves.

    python benchmarks/fig4_ablations.py                       # --budget small: see Budgets
    python benchmarks/fig4_ablations.py --ablations alpha --env overcooked-salad --seeds 1 2 3 4 5
    python benchmarks/fig4_ablations.py --budget paper -- --prior.model Qwen/Qwen1.5-7B --prior.backend vllm

Budgets:
    smoke  each ablation at one value (the KL at two: 0 and 0.001), overcooked-tomato, seed 1, 24 env steps
    small  4d, dqn_k and gradient_steps on overcooked-tomato (1000 steps, seeds 1 2 3); 4b and 4c on frozenlake
           (1024 steps, seed 1; a PPO update of the LM policy takes 20-45 s on this CPU)
    paper  all values, overcooked-tomato, seeds 1 2 3; 6000 steps (DQN-Prior), 20000 (GFlan-Prior)
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (Job, aggregate, common_parser, fmt, markdown_table, results_path, run_jobs,  # noqa: E402
                    save_results)  # fmt: skip

ENTRY = "fig4_ablations"
ABLATIONS = {  # name -> (script, flag, values, fixed arguments)
    "k": ("gflan_prior.py", "--k", [1, 3, 5, 10], []),
    "kl": ("gflan_prior.py", "--kl-coef", [0, 0.001, 0.01, 0.1, 1], ["--k", "5"]),
    "alpha": ("dqn_prior.py", "--alpha", [0, 0.03, 0.1, 0.3, 1], ["--k", "5"]),
    "dqn_k": ("dqn_prior.py", "--k", [1, 3, 5, 10], []),
    "gradient_steps": ("dqn_prior.py", "--gradient-steps", [5, 20, 50], ["--k", "5"]),
}
SMOKE_ARGS = {"gflan_prior.py": ["--num-envs", "2", "--num-steps", "12", "--num-minibatches", "2", "--update-epochs",
                                 "1"], "dqn_prior.py": ["--learning-starts", "8"]}  # fmt: skip
BUDGET = {  # ablation -> (env, values, seeds, env steps, eval every, eval episodes)
    # smoke: one value per ablation, two for the KL (0 is GFlan, the script without a prior)
    "smoke": {a: ("overcooked-tomato", v[2][: 2 if a == "kl" else 1], [1], 24, 24, 1) for a, v in ABLATIONS.items()},
    "small": {**{a: ("overcooked-tomato", ABLATIONS[a][2], [1, 2, 3], 1000, 100, 1)
                 for a in ("alpha", "dqn_k", "gradient_steps")},
              "k": ("frozenlake", [1, 5], [1], 1024, 256, 3),
              "kl": ("frozenlake", [0, 0.01, 1], [1], 1024, 256, 3)},
    "paper": {**{a: ("overcooked-tomato", ABLATIONS[a][2], [1, 2, 3], 6000, 500, 10)
                 for a in ("alpha", "dqn_k", "gradient_steps")},
              "k": ("overcooked-tomato", ABLATIONS["k"][2], [1, 2, 3], 20000, 1024, 10),
              "kl": ("overcooked-tomato", ABLATIONS["kl"][2], [1, 2, 3], 20000, 1024, 10)},
}  # fmt: skip


def jobs_for(budget: str, ablations: list[str], env=None, seeds=None, steps=None, values=None) -> list[Job]:
    jobs = []
    for name in ablations:
        script, flag, _, fixed = ABLATIONS[name]
        b_env, b_values, b_seeds, b_steps, eval_freq, episodes = BUDGET[budget][name]
        for value in values or b_values:
            for seed in seeds or b_seeds:
                e = env or b_env
                # a KL coefficient of 0 is GFlan: no prior at all
                setting = ["--k", "0"] if name == "kl" and value == 0 else [*fixed, flag, value]
                jobs.append(Job({"ablation": name, "value": value, "env": e, "seed": seed}, script, [
                    "--env", e, "--seed", seed, "--exp-name", f"{name}{value}", "--total-timesteps", steps or b_steps,
                    "--eval-freq", eval_freq, "--eval-episodes", episodes, *setting,
                    *(SMOKE_ARGS[script] if budget == "smoke" else [])]))  # fmt: skip
    return jobs


def run_row(run: dict) -> dict:
    s = run["summary"]
    return {"steps": s["global_step"], "final_return": s.get("eval/return_mean"),
            "final_success": s.get("eval/success_rate"), "best_return": s.get("best_eval_return"),
            "prior_coverage": s.get("prior_coverage")}  # fmt: skip


def main(argv=None) -> int:
    parser = common_parser(__doc__)
    parser.add_argument("--ablations", nargs="+", choices=list(ABLATIONS), default=list(ABLATIONS))
    parser.add_argument("--env", default=None, help="override the budget's env")
    parser.add_argument("--steps", type=int, default=None, help="override the budget's env steps")
    parser.add_argument("--values", nargs="+", type=float, default=None,
                        help="override the ablation's values (one ablation at a time)")
    args = parser.parse_args(argv)
    if args.values and len(args.ablations) != 1:
        parser.error("--values needs exactly one --ablations")
    values = [int(v) if v.is_integer() else v for v in args.values] if args.values else None  # `--k 5`, not 5.0
    jobs = jobs_for(args.budget, args.ablations, args.env, args.seeds, args.steps, values)
    entry_dir = os.path.join(args.runs_dir, ENTRY, args.budget)
    failed = [] if args.collect_only else run_jobs(jobs, entry_dir, args.extra, args.dry_run)
    if args.dry_run:
        return 0
    rows = save_results(jobs, entry_dir, run_row, results_path(args.results_dir, ENTRY, args.budget), curves=True)
    if rows:
        table = aggregate(rows, ["ablation", "env", "value"], ["final_return", "final_success", "best_return"])
        for t in table:
            t.update(final=fmt(t["final_return_mean"], t["final_return_se"]),
                     success=fmt(t["final_success_mean"], t["final_success_se"]),
                     best=fmt(t["best_return_mean"], t["best_return_se"]))  # fmt: skip
        print(markdown_table(table, ["ablation", "env", "value", "n", "final", "success", "best"],
                             ["ablation", "env", "value", "seeds", "final return", "final success", "best return"]))
    if failed:
        print(f"failed: {' '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
