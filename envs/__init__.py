"""Text environments for RL with LLM priors: ``envs.make(env_id, **kwargs)``.

Every env speaks the interface documented in :mod:`envs.core`: string observations, string actions
(or an index into ``info["admissible_actions"]``), ``info["task"]``, ``info["expert_action"]``.

The ids are also registered with gymnasium as ``llmprior/<id>-v0`` (e.g.
``gymnasium.make("llmprior/overcooked-tomato-v0")``); ``envs.make`` is the direct way and skips
gymnasium's passive checker, which does not understand a state-dependent text action set.

``envs.make`` and the scripts' ``--env`` (``envs.make_env``) also take keyword arguments and envs from elsewhere:
``frozenlake,max_steps=30``, ``package.module:ClassName``, a gymnasium id (:mod:`envs.registry`, docs/envs.md).
"""

from __future__ import annotations

from envs.core import TextEnv
from envs.registry import (ENV_IDS, EnvSpecError, check_protocol, game_splits, make, make_env, parse,  # noqa: F401
                           register_with_gymnasium, registered_id)  # fmt: skip

register_with_gymnasium()

__all__ = ["ENV_IDS", "EnvSpecError", "TextEnv", "check_protocol", "game_splits", "make", "make_env", "parse",
           "registered_id"]  # fmt: skip
