"""Prior quality: coverage@k of each LLM and prior mode against the env experts — does C^k(s) hold the right action?

Walks the expert's trajectories (the env's BFS / planner expert, eval seeds), builds the prompt each script would
build at every state (the env's default history of (observation, action) pairs), draws k_max proposals with
dqn_prior.py's LLMPrior and reports, per (env, LLM, mode): coverage@k = the share of states whose expert action is
among the first k proposals (the k draws are independent, so a prefix is a k-sample), the prior's mean probability
of the expert action (`dist` scores; the same forward serves both), how often `map` outputs named no admissible
action, and seconds per LLM query. This is the number that predicts whether DQN-Prior / CQL-Prior can help.

    python benchmarks/prior_quality.py                               # --budget small: 4 envs, 2 LLMs, 3 modes
    python benchmarks/prior_quality.py --models Qwen/Qwen1.5-7B --backend vllm --modes dist constrained

Budgets:
    smoke  overcooked-tomato, 1 expert episode, the embedded prior in dist mode, k in {1, 5}
    small  overcooked-tomato, overcooked-salad, frozenlake, alfworld-pick; 1 episode each; embedded (Gemma-3-270M)
           and smollm2; modes dist, map, constrained; k in {1, 3, 5, 10}
    paper  as small with 10 episodes; pass the paper's LLMs with --models

Proposals and scores go through the prior's disk cache (--cache-path; default: a file inside --runs-dir, so the
query counts and timings are this benchmark's own). Writes results/prior_quality.csv.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import common_parser, git_commit, markdown_table, write_csv  # noqa: E402

ENTRY = "prior_quality"
BUDGET = {
    "smoke": dict(envs=["overcooked-tomato"], episodes=1, models=["embedded"], modes=["dist"], ks=[1, 5]),
    "small": dict(envs=["overcooked-tomato", "overcooked-salad", "frozenlake", "alfworld-pick"], episodes=1,
                  models=["embedded", "smollm2"], modes=["dist", "map", "constrained"], ks=[1, 3, 5, 10]),
    "paper": dict(envs=["overcooked-tomato", "overcooked-salad", "frozenlake", "alfworld-pick"], episodes=10,
                  models=["embedded", "smollm2"], modes=["dist", "map", "constrained"], ks=[1, 3, 5, 10]),
}  # fmt: skip


def expert_states(env_id: str, episodes: int, seed: int) -> list[dict]:
    """Every state along the expert's episodes: task, observation, admissible actions, history, expert action."""
    from dqn_prior import default_history, make_env

    env = make_env(env_id, expert=True)
    n_hist, states = default_history(env_id), []
    for ep in range(episodes):
        obs, info = env.reset(seed=seed + ep)
        history, done = [], False
        while not done:
            expert = info.get("expert_action")
            if expert is None:
                raise RuntimeError(f"{env_id} gave no expert action at step {len(history)} of episode {ep}")
            states.append({"task": info["task"], "obs": obs, "admissible": list(info["admissible_actions"]),
                           "history": history[-n_hist:] if n_hist else [], "expert": expert})  # fmt: skip
            next_obs, _, terminated, truncated, info = env.step(expert)
            history.append((obs, expert))
            obs, done = next_obs, terminated or truncated
    return states


def measure(env_id: str, states: list[dict], prior, ks: list[int]) -> dict:
    from dqn_prior import build_prompt

    hits = {k: 0 for k in ks}
    probs, start = [], time.time()
    for s in states:
        prompt = build_prompt(env_id, s["task"], s["obs"], s["admissible"], s["history"])
        proposals = prior.propose(prompt, s["admissible"], max(ks))
        for k in ks:
            hits[k] += s["expert"] in proposals[:k]
        if prior.args.mode == "dist":  # its scores are cached: no second forward
            probs.append(float(prior.action_probs(prompt, s["admissible"])[s["admissible"].index(s["expert"])]))
    seconds = time.time() - start
    row = {f"coverage@{k}": round(hits[k] / len(states), 3) for k in ks}
    row.update(expert_prob=round(sum(probs) / len(probs), 3) if probs else None,
               uniform_prob=round(sum(1 / len(s["admissible"]) for s in states) / len(states), 3),
               unmatched_rate=round(prior.unmatched_rate, 3) if prior.args.mode == "map" else None,
               llm_queries=prior.queries, seconds_per_query=round(seconds / prior.queries, 2) if prior.queries else None)
    return row


def main(argv=None) -> int:
    parser = common_parser(__doc__)
    parser.add_argument("--envs", nargs="+", default=None)
    parser.add_argument("--models", nargs="+", default=None, help="`embedded` = Gemma-3-270M; smollm2; any HF id")
    parser.add_argument("--modes", nargs="+", choices=["dist", "map", "constrained"], default=None)
    parser.add_argument("--ks", nargs="+", type=int, default=None)
    parser.add_argument("--episodes", type=int, default=None)
    parser.add_argument("--backend", default="transformers", choices=["transformers", "vllm", "openai"])
    parser.add_argument("--cache-path", default=None)
    args = parser.parse_args(argv)
    if args.extra:
        parser.error("prior_quality.py takes its settings as options (--models, --modes, --backend), not after --")
    b = BUDGET[args.budget]
    envs_, models, modes = args.envs or b["envs"], args.models or b["models"], args.modes or b["modes"]
    ks, episodes, seed = args.ks or b["ks"], args.episodes or b["episodes"], (args.seeds or [1])[0]
    cache_path = args.cache_path or os.path.join(args.runs_dir, ENTRY, args.budget, "proposals.sqlite")
    if args.dry_run:
        print(f"would measure {envs_} x {models} x {modes}, k {ks}, {episodes} expert episodes, cache {cache_path}")
        return 0
    from dqn_prior import LLMPrior, PriorArgs

    commit, rows = git_commit(), []
    os.makedirs(os.path.dirname(cache_path), exist_ok=True)
    states = {env_id: expert_states(env_id, episodes, 10_000 + seed) for env_id in envs_}  # the scripts' eval seeds
    for model in models:
        for mode in modes:  # one model load per (LLM, mode), then every env
            prior = LLMPrior(PriorArgs(model=None if model == "embedded" else model, backend=args.backend, mode=mode,
                                       cache="disk", cache_path=cache_path), seed=seed)  # fmt: skip
            for env_id in envs_:
                prior.queries, prior.free_outputs, prior.unmatched_outputs = 0, 0, 0
                row = {"env": env_id, "model": model, "mode": mode, "states": len(states[env_id]),
                       "prior": prior.identity, **measure(env_id, states[env_id], prior, ks), "seed": seed,
                       "commit": commit}  # fmt: skip
                print(" ".join(f"{k} {v}" for k, v in row.items() if k != "commit"), flush=True)
                rows.append(row)
            prior.cache.close()
            del prior
    rows.sort(key=lambda r: (envs_.index(r["env"]), models.index(r["model"]), modes.index(r["mode"])))
    suffix = "" if args.budget == "small" else f"_{args.budget}"
    write_csv(rows, os.path.join(args.results_dir, f"{ENTRY}{suffix}.csv"))
    cols = ["env", "model", "mode", "states", *[f"coverage@{k}" for k in ks], "expert_prob", "uniform_prob",
            "unmatched_rate", "seconds_per_query"]  # fmt: skip
    print(markdown_table(rows, cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
