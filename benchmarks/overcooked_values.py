"""Why an Overcooked time limit must end the TD target: value iteration on the macro-action MDP.

A wrong delivery in text Overcooked costs −0.1 and sends the food back unchopped, so chopping it again earns the +0.2
bonus again (envs/overcooked.py keeps this quirk of TWOSOME's env). This entry enumerates every state reachable by
macro actions (envs.overcooked's own Kitchen, the same code the env steps with) and solves it exactly:

- infinite horizon, discount γ (what Q-learning that bootstraps through the episode cap converges to): the start
  state's value, and what the greedy policy of that value gets in a real, capped episode (31 macro actions on
  Tomato, 51 on Salad): does it serve the dish, and its undiscounted return;
- the same for the planner's policy (the env's expert: fewest macro actions to a correct delivery).

    python benchmarks/overcooked_values.py            # Tomato and Salad, γ in {0.99, 0.98, 0.95}

Writes results/overcooked_values.csv. No model, no training: about 10 s.
"""

import os
import sys
from collections import deque

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import common_parser, git_commit, markdown_table, write_csv  # noqa: E402

from envs.overcooked import _KITCHENS, _PLANNERS, MACRO_CAPS  # noqa: E402

ENTRY = "overcooked_values"


def macro_graph(task: str) -> tuple[tuple, dict, dict]:
    """(start key, {state key: [(slot, reward, next key or None on a successful delivery)]}, {state key: World})
    over every state reachable by macro actions."""
    kitchen = _KITCHENS[task]
    start = kitchen.initial_world()
    worlds, edges, queue = {start.key(): start}, {}, deque([start.key()])
    while queue:
        key = queue.popleft()
        edges[key] = []
        for slot in range(len(kitchen.macros)):
            w = worlds[key].copy()
            reward, _, success = kitchen.run_macro(w, slot)
            nxt = None if success else w.key()
            edges[key].append((slot, reward, nxt))
            if nxt is not None and nxt not in worlds:
                worlds[nxt] = w
                queue.append(nxt)
    return start.key(), edges, worlds


def value_iteration(edges: dict, gamma: float, tol: float = 1e-10) -> dict:
    values = dict.fromkeys(edges, 0.0)
    while True:
        new = {s: max(r + (0.0 if n is None else gamma * values[n]) for _, r, n in out) for s, out in edges.items()}
        if max(abs(new[s] - values[s]) for s in edges) < tol:
            return new
        values = new


def capped_episode(start, edges: dict, policy, cap: int) -> tuple[bool, float]:
    """(served, undiscounted return) of a deterministic policy over one episode of `cap` macro actions."""
    state, total = start, 0.0
    for _ in range(cap):
        _, reward, nxt = policy(state)
        total += reward
        if nxt is None:
            return True, total
        state = nxt
    return False, total


def main(argv=None) -> int:
    parser = common_parser(__doc__)
    parser.add_argument("--gammas", nargs="+", type=float, default=[0.99, 0.98, 0.95])
    args = parser.parse_args(argv)
    if args.dry_run:
        print(f"would solve Tomato and Salad at gamma {args.gammas}")
        return 0
    rows, commit = [], git_commit()
    for task in ("tomato", "salad"):
        start, edges, worlds = macro_graph(task)
        cap = MACRO_CAPS[task]
        planner = _PLANNERS[task]
        served, ret = capped_episode(start, edges, lambda s: edges[s][planner.slot(worlds[s])], cap)
        rows.append({"env": f"overcooked-{task}", "states": len(edges), "policy": "planner (the env's expert)",
                     "gamma": None, "start_value": None, "serves_within_cap": served, "capped_return": round(ret, 3),
                     "commit": commit})  # fmt: skip
        for gamma in args.gammas:
            values = value_iteration(edges, gamma)

            def greedy(s, values=values, gamma=gamma):
                return max(edges[s], key=lambda e: e[1] + (0.0 if e[2] is None else gamma * values[e[2]]))

            served, ret = capped_episode(start, edges, greedy, cap)
            rows.append({"env": f"overcooked-{task}", "states": len(edges),
                         "policy": "greedy in the infinite-horizon values", "gamma": gamma,
                         "start_value": round(values[start], 3), "serves_within_cap": served,
                         "capped_return": round(ret, 3), "commit": commit})  # fmt: skip
    write_csv(rows, os.path.join(args.results_dir, f"{ENTRY}.csv"))
    print(markdown_table(rows, ["env", "states", "policy", "gamma", "start_value", "serves_within_cap",
                                "capped_return"]))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
