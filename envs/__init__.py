"""Text environments for RL with LLM priors: ``envs.make(env_id, **kwargs)``.

Every env speaks the interface documented in :mod:`envs.core`: string observations, string actions
(or an index into ``info["admissible_actions"]``), ``info["task"]``, ``info["expert_action"]``.

The ids are also registered with gymnasium as ``llmprior/<id>-v0`` (e.g.
``gymnasium.make("llmprior/overcooked-tomato-v0")``); ``envs.make`` is the direct way and skips
gymnasium's passive checker, which does not understand a state-dependent text action set.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

import gymnasium as gym

from envs.core import TextEnv

# id -> ("module:Class", default kwargs). Modules are imported on first use so that, e.g., the
# Overcooked envs work without ALFWorld's engine installed.
_REGISTRY: dict[str, tuple[str, dict[str, Any]]] = {
    "overcooked-tomato": ("envs.overcooked:OvercookedEnv", {"task": "tomato"}),
    "overcooked-salad": ("envs.overcooked:OvercookedEnv", {"task": "salad"}),
    "frozenlake": ("envs.frozenlake:FrozenLakeTextEnv", {"map_name": "4x4"}),
    "frozenlake-8x8": ("envs.frozenlake:FrozenLakeTextEnv", {"map_name": "8x8"}),
    "alfworld-pick": ("envs.alfworld:ALFWorldEnv", {"task_type": "pick"}),
    "alfworld-examine": ("envs.alfworld:ALFWorldEnv", {"task_type": "examine"}),
    "babyai-gotoredball": ("envs.babyai:BabyAITextEnv", {"level": "GoToRedBall", "max_steps": 30}),
}

ENV_IDS: tuple[str, ...] = tuple(_REGISTRY)


def _load(target: str) -> Callable[..., TextEnv]:
    module_name, class_name = target.split(":")
    return getattr(importlib.import_module(module_name), class_name)


def make(env_id: str, **kwargs: Any) -> TextEnv:
    """Build a text env by id; keyword arguments override the id's defaults."""
    if env_id not in _REGISTRY:
        raise ValueError(f"unknown env id {env_id!r}; valid ids: {', '.join(ENV_IDS)}")
    target, defaults = _REGISTRY[env_id]
    return _load(target)(**{**defaults, **kwargs})


def _register_with_gymnasium() -> None:
    for env_id, (target, defaults) in _REGISTRY.items():
        gym_id = f"llmprior/{env_id}-v0"
        if gym_id not in gym.registry:
            gym.register(id=gym_id, entry_point=target, kwargs=dict(defaults), disable_env_checker=True)


_register_with_gymnasium()

__all__ = ["ENV_IDS", "TextEnv", "make"]
