"""The cost of the prior: seconds per state of `dist` scoring, next to two floors.

Along noisy expert episodes of each env (the scripts' prompts, the env's default history), it times for every state:
- `floor`: one forward over the prompt, keeping the last position's logits (what any scoring must at least do);
- `floor_head`: the prompt's forward, then the LM head (over vocabulary chunks, as the tree runs it) at as many
  positions as the actions' token trie scores: the arithmetic any exact scoring of these actions must do;
- `tree`: llmprior's `TransformersBackend.score` (the prompt and the actions' token trie in one forward under a tree
  attention mask, the LM head only at the prompt's end and the nodes whose next token is scored), as the scripts run
  it: the keys and values of a prompt prefix that an earlier state of the run shares are reused (`reused` is the
  fraction of prompt tokens that did not run), so it can be faster than `floor`;
- `whole`: the same with that reuse off (every prompt token runs);
- `padded`: the previous implementation, the backend's fallback: every action in one padded batch against the
  prompt's cache, the LM head at every position;
and checks that whole, padded and tree give the same scores. `map` sampling (k = 5 free-form samples of 10 tokens)
is timed with --modes map. With --llamacpp, `map` sampling is timed through the `openai` backend too, against
llama.cpp's OpenAI-compatible server serving the same GGUF file with as many threads (`pip install
"llama-cpp-python[server]"`; its `dist` scoring is refused, see `OpenAIBackend`). Wall-clock with OMP_NUM_THREADS threads (set it; 1 is the
measured default), first state excluded.

    OMP_NUM_THREADS=1 python benchmarks/prior_speed.py                       # embedded Gemma, 4 envs, 20 states each
    OMP_NUM_THREADS=2 python benchmarks/prior_speed.py --envs alfworld-pick --states 10
    OMP_NUM_THREADS=1 python benchmarks/prior_speed.py --modes dist map --llamacpp   # and llama.cpp's server
    OMP_NUM_THREADS=1 python benchmarks/prior_speed.py --history 0     # the datasets' prompts: no past steps

Writes results/prior_speed.csv (a row per env, model, thread count, backend and history; rows of other selections are
kept).
"""

import os
import sys
import time
from typing import Optional

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import _key, common_parser, git_commit, markdown_table, merge_rows, write_csv  # noqa: E402

ENTRY = "prior_speed"
BUDGET = {"smoke": dict(envs=["overcooked-tomato"], states=3),
          "small": dict(envs=["overcooked-tomato", "overcooked-salad", "frozenlake", "alfworld-pick"], states=20),
          "paper": dict(envs=["overcooked-tomato", "overcooked-salad", "frozenlake", "alfworld-pick"], states=50)}
KEY = ["env", "model", "threads", "backend", "history"]  # history: None = the env's default


def states_of(env_spec: str, n: int, seed: int = 10_001, steps: Optional[int] = None) -> list[tuple[str, list[str]]]:
    """(prompt, admissible actions) of the first n states of noisy expert episodes (a random action half the time);
    the prompts carry the env's default history (`steps` None) or that many past steps."""
    import envs
    from llmprior.prompts import build_prompt, default_history

    env, env_id = envs.make_env(env_spec, expert=True), envs.registered_id(env_spec)
    rng, out, episode = np.random.default_rng(seed), [], 0
    while len(out) < n:
        obs, info = env.reset(seed=seed + episode)
        history, done = [], False
        while not done and len(out) < n:
            admissible = list(info["admissible_actions"])
            h = default_history(env_id) if steps is None else steps
            out.append((build_prompt(env_id, info["task"], obs, admissible, history[-h:] if h else []), admissible))
            expert = info.get("expert_action")
            action = expert if expert is not None and rng.random() < 0.5 else admissible[rng.integers(len(admissible))]
            history.append((obs, action))
            obs, _, terminated, truncated, info = env.step(action)
            done = terminated or truncated
        episode += 1
    return out


def padded_scores(backend, prompt: str, actions: list[str]) -> np.ndarray:
    """The previous scoring, kept in the backend as its fallback: every action in one padded batch against the
    prompt's repeated cache, the LM head at every position."""
    backend._tree_fits = lambda length: False  # this instance only
    try:
        return backend.score(prompt, actions)[0]
    finally:
        del backend._tree_fits


def floor(backend, prompt: str) -> None:
    import torch

    with torch.no_grad():
        backend.model(input_ids=torch.tensor([backend.tokenizer(prompt).input_ids]), logits_to_keep=1)


def scored_rows(backend, prompt: str, actions: list[str]) -> int:
    """Positions whose next-token distribution the trie needs: the prompt's end and every inner trie node."""
    from llmprior.backends import continuation_ids

    prefixes = {tuple(ids[:j]) for ids in (continuation_ids(backend.tokenizer, prompt, a)[1] for a in actions)
                for j in range(len(ids))}  # fmt: skip
    return len(prefixes)  # the empty prefix is the prompt's end


def floor_head(backend, prompt: str, rows: int) -> None:
    import torch

    with torch.no_grad():
        hidden = backend.model.model(input_ids=torch.tensor([backend.tokenizer(prompt).input_ids])).last_hidden_state
        backend._log_probs(hidden[0, -1:].expand(rows, -1), list(range(rows)), [0] * rows)


def prompt_tokens(backend, states) -> int:
    """Mean prompt length in tokens over the timed states (the first, a warm-up, not counted)."""
    return round(float(np.mean([len(backend.tokenizer(prompt).input_ids) for prompt, _ in states[1:]])))


def timed(fn, *args) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def llamacpp_row(model: str, env_id: str, states, threads: int) -> dict:
    """The openai backend against llama.cpp's server on the model's GGUF: seconds per state of map sampling (its
    dist scoring is refused: llama-cpp-python's echo logprobs are one token off)."""
    from llmprior.backends import OpenAIBackend, serve_llamacpp

    before = os.environ.get("OPENAI_BASE_URL")
    with serve_llamacpp(model, threads=threads) as url:
        os.environ["OPENAI_BASE_URL"] = url  # where OpenAIBackend looks
        try:
            server = OpenAIBackend(None)
            t_map = [timed(server.sample, prompt, 5, i)[0] for i, (prompt, _) in enumerate(states)][1:]
        finally:
            if before is None:
                del os.environ["OPENAI_BASE_URL"]
            else:
                os.environ["OPENAI_BASE_URL"] = before
    return {"env": env_id, "model": model, "threads": threads, "backend": "llamacpp", "states": len(states) - 1,
            "actions_per_state": round(float(np.mean([len(a) for _, a in states[1:]])), 1),
            "map_s": round(float(np.mean(t_map)), 3)}  # fmt: skip


def main(argv=None) -> int:
    parser = common_parser(__doc__)
    parser.add_argument("--envs", nargs="+", default=None)
    parser.add_argument("--models", nargs="+", default=["gemma"])
    parser.add_argument("--states", type=int, default=None)
    parser.add_argument("--modes", nargs="+", choices=["dist", "map"], default=["dist"])
    parser.add_argument("--llamacpp", action="store_true", help="also time map sampling on llama.cpp's server")
    parser.add_argument("--history", type=int, default=None,
                        help="past steps in the prompts (default: each env's, as the scripts run; the datasets use 0)")
    args = parser.parse_args(argv)
    b = BUDGET[args.budget]
    envs_, n = args.envs or b["envs"], args.states or b["states"]
    if args.dry_run:
        print(f"would time {args.models} on {envs_}, {n} states each, modes {args.modes}")
        return 0
    import torch

    from llmprior.backends import TransformersBackend

    threads, commit, rows = torch.get_num_threads(), git_commit(), []
    command = f"OMP_NUM_THREADS={threads} python benchmarks/prior_speed.py " + " ".join(argv if argv is not None
                                                                                       else sys.argv[1:])
    for model in args.models:
        backend = TransformersBackend(model, torch.device("cpu"))
        for env_id in envs_:
            states = states_of(env_id, n + 1, steps=args.history)
            times: dict[str, list[float]] = {"floor": [], "floor_head": [], "tree": [], "whole": [], "padded": [],
                                             "map": []}  # fmt: skip
            worst, worst_reuse, budget = 0.0, 0.0, backend.prefix_budget
            backend._prefixes.clear()  # each env starts as a run does
            for i, (prompt, actions) in enumerate(states):
                t_floor, _ = timed(floor, backend, prompt)
                t_floor_head, _ = timed(floor_head, backend, prompt, scored_rows(backend, prompt, actions))
                backend.prefix_budget = 0
                t_whole, (whole, _) = timed(backend.score, prompt, actions)
                backend.prefix_budget = budget
                if i == 1:  # the first state warms up
                    backend.prefix_tokens_reused = backend.prompt_tokens_scored = 0
                t_tree, (tree, _) = timed(backend.score, prompt, actions)
                t_padded, padded = timed(padded_scores, backend, prompt, actions)
                worst = max(worst, float(np.abs(whole - padded).max()))
                worst_reuse = max(worst_reuse, float(np.abs(tree - whole).max()))
                t_map = timed(backend.sample, prompt, 5, i)[0] if "map" in args.modes else None
                if i:
                    for name, t in (("floor", t_floor), ("floor_head", t_floor_head), ("tree", t_tree),
                                    ("whole", t_whole), ("padded", t_padded), ("map", t_map)):
                        if t is not None:
                            times[name].append(t)
            mean = {name: float(np.mean(t)) if t else None for name, t in times.items()}
            rows.append({"env": env_id, "model": model, "threads": threads, "backend": "transformers",
                         "history": args.history, "states": n, "prompt_tokens": prompt_tokens(backend, states),
                         "actions_per_state": round(float(np.mean([len(a) for _, a in states[1:]])), 1),
                         "floor_s": round(mean["floor"], 3), "floor_head_s": round(mean["floor_head"], 3),
                         "dist_s": round(mean["tree"], 3), "dist_whole_s": round(mean["whole"], 3),
                         "dist_padded_s": round(mean["padded"], 3),
                         "reused": round(backend.prefix_tokens_reused / max(backend.prompt_tokens_scored, 1), 3),
                         "tree_over_floor": round(mean["tree"] / mean["floor"], 2),
                         "tree_over_floor_head": round(mean["tree"] / mean["floor_head"], 2),
                         "map_s": None if mean["map"] is None else round(mean["map"], 3),
                         "max_score_difference": worst, "reuse_score_difference": worst_reuse, "commit": commit,
                         "command": command})  # fmt: skip
            print(" ".join(f"{k} {v}" for k, v in rows[-1].items()), flush=True)
            if args.llamacpp:
                rows.append(llamacpp_row(model, env_id, states, threads) | {"commit": commit, "command": command})
                print(" ".join(f"{k} {v}" for k, v in rows[-1].items()), flush=True)
    path = os.path.join(args.results_dir, f"{ENTRY}{'' if args.budget == 'small' else '_' + args.budget}.csv")
    rows = merge_rows(path, rows, KEY, {_key(r, KEY) for r in rows})
    write_csv(rows, path)
    print(markdown_table(rows, ["env", "model", "threads", "backend", "history", "prompt_tokens", "actions_per_state",
                                "floor_s", "floor_head_s", "dist_s", "dist_whole_s", "reused", "dist_padded_s", "tree_over_floor",
                                "tree_over_floor_head", "map_s", "max_score_difference",
                                "reuse_score_difference"]))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
