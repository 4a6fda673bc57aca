"""Text BabyAI (paper App. 9.4: GFlan-Prior vs GFlan on "go to the red ball", horizon 30).

minigrid's ``BabyAI-GoToRedBall-v0`` level (an 8x8 room, the red ball and 7 distractors, a random layout per
episode) told in words as GLAM's BabyAI-Text does (Carta et al. 2023): from the agent's partial, egocentric 7x7 view,
a list of phrases joined by ", ":

- "You carry a {color} {type}" when the agent holds an object;
- "You see a wall N step(s) forward|left|right" for the first wall straight ahead, to the left and to the right
  (only when nothing stands between the agent and that wall);
- "You see a {color} {type} N step(s) left|right and M step(s) forward" for every visible object, with only the
  non-zero offsets ("You see a red ball 2 steps forward", "You see a grey key 1 step right"); a door also says its
  state ("You see a closed blue door ...", "You see an open ...", "You see a locked ...").

Phrases come in GLAM's order: carried object, walls (forward, left, right), then objects column by column from the
left of the view, near to far. Actions are GLAM's six: "turn left", "turn right", "go forward", "pick up", "drop",
"toggle" (minigrid's "done" is not offered).

Reward: minigrid's own, 1 - 0.9 * steps / max_steps on success and 0 otherwise, times ``reward_scale``. GLAM multiplied
it by 20 (``reward_scale=20``); the default 1 keeps returns on the same [0, 1] scale as the other envs here, so that
the same PPO settings fit all of them. Horizon: 30 actions (the paper), passed to minigrid as ``max_steps`` so that
the success reward is computed against the same horizon.

``info["expert_action"]`` comes from a breadth-first search over (cell, direction) states to the nearest state that
faces the target: an optimal next action. minigrid's own ``BabyAIBot`` was tried first; it raises
``DisappearedBoxError`` once an exploring agent has toggled a box (8 times in 200 mostly random episodes), and it
carries state across steps, so it is not used.
"""

from __future__ import annotations

import contextlib
import io
from collections import deque
from typing import Any

from minigrid.core.constants import DIR_TO_VEC
from minigrid.envs.babyai.goto import GoToRedBall

from envs.core import TextEnv

ACTIONS: tuple[str, ...] = ("turn left", "turn right", "go forward", "pick up", "drop", "toggle")
LEVELS = {"GoToRedBall": GoToRedBall}
_DOOR_STATES = {0: "open", 1: "closed", 2: "locked"}


def _steps(n: int, direction: str) -> str:
    return f"{n} step{'s' if n > 1 else ''} {direction}"


def describe(image, carrying=None) -> list[str]:
    """GLAM's phrases for an egocentric minigrid view: ``image[x][y]`` = (object, color, state) indices, the agent at
    the bottom centre facing up (decreasing y)."""
    from minigrid.core.constants import IDX_TO_COLOR, IDX_TO_OBJECT

    width, height = image.shape[0], image.shape[1]
    ax, ay = width // 2, height - 1
    phrases = []
    if carrying is not None:
        phrases.append(f"You carry a {carrying.color} {carrying.type}")

    def first_in_line(cells) -> None:
        for distance, (x, y, direction) in enumerate(cells, start=1):
            kind = IDX_TO_OBJECT[int(image[x][y][0])]
            if kind in ("unseen", "empty"):
                continue
            if kind == "wall":
                phrases.append(f"You see a wall {_steps(distance, direction)}")
            return

    first_in_line([(ax, y, "forward") for y in range(ay - 1, -1, -1)])
    first_in_line([(x, ay, "left") for x in range(ax - 1, -1, -1)])
    first_in_line([(x, ay, "right") for x in range(ax + 1, width)])

    for x in range(width):
        for y in range(height):
            kind = IDX_TO_OBJECT[int(image[x][y][0])]
            if (x, y) == (ax, ay) or kind in ("unseen", "empty", "wall", "agent"):
                continue
            color = IDX_TO_COLOR[int(image[x][y][1])]
            if kind == "door":
                state = _DOOR_STATES[int(image[x][y][2])]
                name = f"{'an' if state == 'open' else 'a'} {state} {color} door"
            else:
                name = f"a {color} {kind}"
            offsets = []
            if x != ax:
                offsets.append(_steps(abs(x - ax), "left" if x < ax else "right"))
            if y != ay:
                offsets.append(_steps(ay - y, "forward"))
            phrases.append(f"You see {name} {' and '.join(offsets)}")
    return phrases


class BabyAITextEnv(TextEnv):
    def __init__(self, level: str = "GoToRedBall", max_steps: int = 30, reward_scale: float = 1.0,
                 expert: bool = True, **level_kwargs: Any) -> None:  # fmt: skip
        super().__init__()
        if level not in LEVELS:
            raise ValueError(f"unknown BabyAI level {level!r}; choose one of {sorted(LEVELS)}")
        self.env = LEVELS[level](max_steps=max_steps, **level_kwargs)
        self.reward_scale, self.expert = reward_scale, expert
        self._success = False

    # -- text ----------------------------------------------------------------------------------
    def _observation(self, raw: dict) -> str:
        return ", ".join(describe(raw["image"], self.env.carrying))

    def _info(self) -> dict[str, Any]:
        return {
            "admissible_actions": list(ACTIONS),
            "task": self.env.mission,
            "expert_action": None if self._episode_over or not self.expert else self.expert_action(),
            "success": self._success,
        }

    # -- expert ----------------------------------------------------------------------------------
    def _targets(self) -> set[tuple[int, int]]:
        desc = self.env.instrs.desc
        return {
            (x, y)
            for x in range(self.env.grid.width)
            for y in range(self.env.grid.height)
            for obj in [self.env.grid.get(x, y)]
            if obj is not None and obj.type == desc.type and desc.color in (None, obj.color)
        }

    def expert_action(self) -> str | None:
        """First action of a shortest turn/forward path to a state facing the target (None when none exists)."""
        targets = self._targets()
        env = self.env

        def faces_target(x: int, y: int, d: int) -> bool:
            return (x + DIR_TO_VEC[d][0], y + DIR_TO_VEC[d][1]) in targets

        start = (int(env.agent_pos[0]), int(env.agent_pos[1]), int(env.agent_dir))
        if faces_target(*start):
            return "go forward"  # blocked by the target itself: the agent stays facing it, which succeeds
        first: dict[tuple[int, int, int], str] = {start: ""}
        queue = deque([start])
        while queue:
            x, y, d = queue.popleft()
            moves = [("turn left", (x, y, (d - 1) % 4)), ("turn right", (x, y, (d + 1) % 4))]
            fx, fy = x + DIR_TO_VEC[d][0], y + DIR_TO_VEC[d][1]
            cell = env.grid.get(fx, fy)
            if cell is None or cell.can_overlap():
                moves.append(("go forward", (fx, fy, d)))
            for action, state in moves:
                if state in first:
                    continue
                first[state] = first[(x, y, d)] or action
                if faces_target(*state):
                    return first[state]
                queue.append(state)
        return None

    # -- gymnasium API -----------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[str, dict[str, Any]]:
        super().reset(seed=seed)
        # minigrid prints "Sampling rejected: unreachable object" while it rejects layouts; keep stdout clean.
        with contextlib.redirect_stdout(io.StringIO()):
            raw, _ = self.env.reset(seed=seed)
        self._success = False
        self._start_episode()
        return self._observation(raw), self._info()

    def step(self, action: str | int) -> tuple[str, float, bool, bool, dict[str, Any]]:
        action = self._resolve_action(action, ACTIONS)
        raw, reward, terminated, truncated, _ = self.env.step(ACTIONS.index(action))
        self._success = bool(terminated and reward > 0)
        truncated = bool(truncated and not terminated)
        self._finish_step(bool(terminated), truncated)
        return self._observation(raw), float(reward) * self.reward_scale, bool(terminated), truncated, self._info()

    def render(self) -> str:
        return str(self.env)


__all__ = ["ACTIONS", "BabyAITextEnv", "describe"]
