"""Text FrozenLake (paper App. 9.1): gymnasium's ``FrozenLake-v1`` told in words.

Deterministic (``is_slippery=False``) 4x4 or 8x8 maps, or a seeded random map. Rewards follow the
paper's shaping: +1 at the goal, -1 for falling into a hole (gymnasium gives 0 there). The
observation and the "Go X leads to ..." descriptions are the paper's sentences; the description of
the four moves is part of the observation, because it is what tells a language model where a hole is.

Horizon: 20 moves on 4x4 (the authors' leftover config), 100 on 8x8 (gymnasium's own limit).
"""

from __future__ import annotations

from collections import deque
from typing import Any

from gymnasium.envs.toy_text.frozen_lake import MAPS, generate_random_map

from envs.core import TextEnv

# gymnasium's action indices: left 0, down 1, right 2, up 3. The paper lists them in this order.
ACTIONS: tuple[str, ...] = ("Go Left", "Go Right", "Go Up", "Go Down")
_MOVES = {"Go Left": (0, -1), "Go Down": (1, 0), "Go Right": (0, 1), "Go Up": (-1, 0)}
_CELL_TEXT = {"S": "start position", "F": "a frozen cell (F)", "H": "a hole (H)", "G": "the goal (G)"}
TASK = "Reach the goal (G) without falling into a hole (H)."


class FrozenLakeTextEnv(TextEnv):
    def __init__(
        self,
        map_name: str | None = "4x4",
        desc: list[str] | None = None,
        random_map_size: int | None = None,
        map_seed: int = 0,
        max_steps: int | None = None,
    ) -> None:
        super().__init__()
        if desc is None and random_map_size is not None:
            # Never unseeded: gymnasium would draw a new map in every process.
            desc = generate_random_map(size=random_map_size, seed=map_seed)
        if desc is None:
            if map_name not in MAPS:
                raise ValueError(f"unknown FrozenLake map {map_name!r}; choose one of {sorted(MAPS)} or pass desc=")
            desc = MAPS[map_name]
        self.desc = [str(row) for row in desc]
        self.nrow, self.ncol = len(self.desc), len(self.desc[0])
        self.max_steps = max_steps if max_steps is not None else (20 if self.nrow <= 4 else 100)
        self.start = next((r, c) for r in range(self.nrow) for c in range(self.ncol) if self.desc[r][c] == "S")
        self._distance = self._distances_to_goal()
        self.pos = self.start
        self.steps = 0

    # -- text ----------------------------------------------------------------------------------
    def _move(self, pos: tuple[int, int], action: str) -> tuple[int, int]:
        dr, dc = _MOVES[action]
        return min(max(pos[0] + dr, 0), self.nrow - 1), min(max(pos[1] + dc, 0), self.ncol - 1)

    def _observation(self) -> str:
        r, c = self.pos
        obs = (
            f"You are in a {self.nrow}x{self.ncol} grid where each cell is either a frozen cell (F) indicating a safe "
            "position, You must avoid to reach a hole (H), and the goal (G) that we aim to reach. "
            f"Input: Currently the agent is at position ({r}, {c}), which direction need to take?"
        )
        leads = " ".join(
            f"{a} leads to position ({nr}, {nc}), {_CELL_TEXT[self.desc[nr][nc]]}."
            for a in ACTIONS
            for nr, nc in [self._move(self.pos, a)]
        )
        return f"{obs} Admissible actions: {leads}"

    def _info(self) -> dict[str, Any]:
        over = self._episode_over
        return {
            "admissible_actions": list(ACTIONS),
            "task": TASK,
            "expert_action": None if over else self.expert_action(),
            "success": self.desc[self.pos[0]][self.pos[1]] == "G",
            "position": self.pos,
        }

    # -- expert ----------------------------------------------------------------------------------
    def _distances_to_goal(self) -> dict[tuple[int, int], int]:
        """BFS from the goal over non-hole cells (moves are reversible on a grid)."""
        goal = next((r, c) for r in range(self.nrow) for c in range(self.ncol) if self.desc[r][c] == "G")
        dist, queue = {goal: 0}, deque([goal])
        while queue:
            cell = queue.popleft()
            for a in ACTIONS:
                nxt = self._move(cell, a)
                if nxt not in dist and self.desc[nxt[0]][nxt[1]] != "H":
                    dist[nxt] = dist[cell] + 1
                    queue.append(nxt)
        return dist

    def expert_action(self) -> str | None:
        """A move on a shortest hole-free path to the goal (first in ACTIONS order on ties)."""
        here = self._distance.get(self.pos)
        if here is None or here == 0:
            return None
        return next(a for a in ACTIONS if self._distance.get(self._move(self.pos, a), here) == here - 1)

    # -- gymnasium API -----------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[str, dict[str, Any]]:
        super().reset(seed=seed)  # no randomness in a fixed, non-slippery map; seeds np_random anyway
        self.pos, self.steps = self.start, 0
        self._start_episode()
        return self._observation(), self._info()

    def step(self, action: str | int) -> tuple[str, float, bool, bool, dict[str, Any]]:
        action = self._resolve_action(action, ACTIONS)
        self.pos = self._move(self.pos, action)
        self.steps += 1
        cell = self.desc[self.pos[0]][self.pos[1]]
        reward = {"G": 1.0, "H": -1.0}.get(cell, 0.0)
        terminated = cell in "GH"
        truncated = not terminated and self.steps >= self.max_steps
        self._finish_step(terminated, truncated)
        return self._observation(), reward, terminated, truncated, self._info()

    def render(self) -> str:
        rows = [list(row) for row in self.desc]
        rows[self.pos[0]][self.pos[1]] = "A"
        return "\n".join("".join(row) for row in rows)


__all__ = ["ACTIONS", "FrozenLakeTextEnv"]
