"""The one interface every text environment in this package speaks.

Observations and actions are strings. ``reset(seed=...)`` returns ``(obs, info)`` and ``step(action)``
returns ``(obs, reward, terminated, truncated, info)``, as in gymnasium. Every ``info`` carries:

- ``"admissible_actions"``: list[str], the actions valid in the current state (order is the env's own,
  e.g. the Overcooked slot order; ALFWorld's alphabetical order);
- ``"task"``: the task sentence;
- ``"expert_action"``: the optimal next action string, or ``None`` where no expert runs (ALFWorld with
  ``expert=False``, or a finished episode);
- ``"success"``: whether the episode has reached its goal.

The action space is ``gymnasium.spaces.Text``: ``step`` takes an action string from
``info["admissible_actions"]``; an ``int`` is accepted as an index into that list. Anything else raises a
``ValueError`` that names the admissible actions: an RL agent silently stepping with a no-op hides bugs.
Calling ``step`` after ``terminated or truncated`` raises ``RuntimeError``; call ``reset`` first.

Two class attributes say what an env offers beyond that (an env from elsewhere may declare them too, docs/envs.md):
``splits``, the game splits its ``split=`` keyword takes (a script also evaluates on ``split="unseen"`` where it is
one), and ``costly_expert``, true where the expert's action costs a search per step, so that the env computes it only
when its ``expert=`` keyword asks.
"""

from __future__ import annotations

import os
import string
from pathlib import Path
from typing import Any, Sequence

import gymnasium as gym
from gymnasium import spaces

# Text spaces default to alphanumerics; our strings hold punctuation, newlines and digits.
CHARSET = string.printable


def cache_dir() -> Path:
    """``$LLMPRIOR_CACHE`` (default ``~/.cache/llmprior``), where generated games are kept: the folder of
    ``llmprior.models.cache_dir``, read here because ``envs`` imports nothing of ``llmprior``."""
    return Path(os.environ.get("LLMPRIOR_CACHE") or Path.home() / ".cache" / "llmprior")


def text_space(max_length: int = 8192) -> spaces.Text:
    return spaces.Text(max_length=max_length, min_length=0, charset=CHARSET)


class TextEnv(gym.Env):
    """Base class: action resolution, validation and the finished-episode guard."""

    metadata = {"render_modes": ["ansi"]}
    splits: tuple[str, ...] = ()
    costly_expert = False

    def __init__(self) -> None:
        self.observation_space = text_space()
        self.action_space = text_space(512)
        self._episode_over = True  # step() before reset() is an error too

    # -- subclasses use these -------------------------------------------------------------------
    def _resolve_action(self, action: Any, admissible: Sequence[str]) -> str:
        """Turn ``action`` (string or index) into an admissible action string, or raise ValueError."""
        if self._episode_over:
            raise RuntimeError("step() called on a finished episode (or before reset()); call reset() first")
        if isinstance(action, bool):  # bool is an int subclass; True is never a meaningful index
            raise ValueError(f"action must be a string or an index, got {action!r}")
        if isinstance(action, (int,)) or (hasattr(action, "__index__") and not isinstance(action, str)):
            index = int(action)
            if not 0 <= index < len(admissible):
                raise ValueError(
                    f"action index {index} out of range for {len(admissible)} admissible actions: {list(admissible)}"
                )
            return admissible[index]
        if isinstance(action, str):
            if action in admissible:
                return action
            raise ValueError(f"action {action!r} is not admissible; admissible actions: {list(admissible)}")
        raise ValueError(f"action must be a string or an index, got {type(action).__name__}: {action!r}")

    def _finish_step(self, terminated: bool, truncated: bool) -> None:
        self._episode_over = bool(terminated or truncated)

    def _start_episode(self) -> None:
        self._episode_over = False

    # -- public helpers -------------------------------------------------------------------------
    def expert_action(self) -> str | None:
        """The optimal next action in the current state (None when the env has no expert)."""
        return None


class GameOrder:
    """Which game each episode of an env with a set of games plays: ``reset(seed=s)`` draws a fresh permutation of the
    games from ``s`` and plays its first game; later ``reset()`` calls walk the permutation, then draw another.
    ``options={"game_index": i}`` plays game ``i``."""

    def __init__(self, num_games: int) -> None:
        self.num_games = num_games
        self._order: list[int] = []
        self._cursor = 0

    def next(self, rng, seeded: bool, options: dict | None) -> int:
        """The game of a new episode; ``rng`` is the env's ``np_random``, just reseeded if ``seeded``."""
        if seeded or not self._order:
            self._reshuffle(rng)
        if options and "game_index" in options:
            index = int(options["game_index"])
            if not 0 <= index < self.num_games:
                raise ValueError(f"game_index {index} out of range for {self.num_games} games")
            return index
        if self._cursor == len(self._order):
            self._reshuffle(rng)
        self._cursor += 1
        return self._order[self._cursor - 1]

    def _reshuffle(self, rng) -> None:
        self._order = [int(i) for i in rng.permutation(self.num_games)]
        self._cursor = 0
