"""Fig. 3 / Table 12 on this machine: env steps for DQN-Prior and DQN to reach eval success >= 0.9.

Runs `dqn_prior.py` for every (env, algo, seed) not already finished (resumable: a finished run has a
summary.json under --runs-dir), then writes one CSV row per run and prints a markdown table.

    python benchmarks/dqn_fig3.py --envs overcooked-tomato frozenlake --seeds 1 2 3 --total-timesteps 1000
"""

import argparse
import csv
import glob
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALGOS = {"dqn": ["--k", "0"], "dqn_prior": ["--k", "5"], "dqn_prior_t1": ["--k", "5", "--prior.dist-temperature", "1"]}


def finished_run(runs_dir: str, env: str, algo: str, seed: int):
    for path in glob.glob(os.path.join(runs_dir, f"{env}__{algo}__{seed}__*", "summary.json")):
        return os.path.dirname(path)
    return None


def steps_to_success(run_dir: str, threshold: float) -> int | None:
    with open(os.path.join(run_dir, "eval.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if row["eval/success_rate"] >= threshold:
                return row["global_step"]
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envs", nargs="+", default=["overcooked-tomato", "frozenlake"])
    parser.add_argument("--algos", nargs="+", default=["dqn", "dqn_prior"], choices=list(ALGOS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--total-timesteps", type=int, default=1000)
    parser.add_argument("--eval-freq", type=int, default=100)
    parser.add_argument("--eval-episodes", type=int, default=1, help="1 suffices where env and prior are deterministic")
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--runs-dir", default=os.path.join(ROOT, "runs", "fig3"))
    parser.add_argument("--out", default=os.path.join(ROOT, "results", "dqn_fig3.csv"))
    parser.add_argument("extra", nargs="*", help="more dqn_prior.py arguments, after --")
    args = parser.parse_args()

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    rows = []
    for env in args.envs:
        for algo in args.algos:
            for seed in args.seeds:
                cmd = [sys.executable, "dqn_prior.py", "--env", env, "--seed", str(seed), "--exp-name", algo,
                       "--total-timesteps", str(args.total_timesteps), "--eval-freq", str(args.eval_freq),
                       "--eval-episodes", str(args.eval_episodes), "--runs-dir", args.runs_dir,
                       *ALGOS[algo], *args.extra]  # fmt: skip
                run_dir = finished_run(args.runs_dir, env, algo, seed)
                if run_dir is None:
                    print("running: " + " ".join(cmd[1:]), flush=True)
                    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
                    run_dir = finished_run(args.runs_dir, env, algo, seed)
                summary = json.load(open(os.path.join(run_dir, "summary.json")))
                rows.append({
                    "env": env, "algo": algo, "seed": seed, "steps_to_success": steps_to_success(run_dir, args.threshold),
                    "final_success": summary["eval/success_rate"], "final_return": summary["eval/return_mean"],
                    "wall_clock_s": round(summary["wall_clock_s"], 1), "prior_queries": summary["prior_queries"],
                    "prior_cache_hit_rate": summary["prior_cache_hit_rate"], "prior_coverage": summary["prior_coverage"],
                    "command": "python " + " ".join(cmd[1:]), "commit": commit})  # fmt: skip
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print("| env | algo | seed | steps to success >= %.1f | final success | wall-clock s | LLM queries | cache hit | coverage |" % args.threshold)
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['env']} | {r['algo']} | {r['seed']} | {r['steps_to_success']} | {r['final_success']:.2f} | "
              f"{r['wall_clock_s']} | {r['prior_queries']} | {r['prior_cache_hit_rate']} | {r['prior_coverage']} |")


if __name__ == "__main__":
    main()
