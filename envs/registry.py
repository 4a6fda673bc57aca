"""What an `--env` names: the registered ids, `package.module:ClassName`, gymnasium ids, keyword arguments, and the
check that an env from elsewhere speaks the protocol of :mod:`envs.core` (docs/envs.md).

A spec is ``ENV[,key=value,...]``. ENV is one of

- a registered id (``ENV_IDS``: ``overcooked-tomato``, ..., ``textworld-coin``), or ``llmprior/<id>-v0``, its
  gymnasium name;
- ``package.module:ClassName``: any class (or function) that builds an env speaking the protocol; a plain
  ``gymnasium.Env`` will do, nothing of this project needs subclassing;
- a gymnasium id: ``Name-v0`` or ``namespace/Name-v0`` once registered, or ``module:Name-v0``, which imports
  ``module`` first (gymnasium's own form). ``module:Name`` is a class where ``module`` has one of that name.

Each value is a Python literal (``ast.literal_eval``: ``5``, ``True``, ``'big'``, ``[1, 2]``), else the text itself:
``textworld-coin,level=5``, ``mymodule:MyEnv,size=4,name=big``. A comma followed by ``name=`` starts the next keyword,
so a value may hold commas (``desc=['SF','FG']``).
"""

from __future__ import annotations

import ast
import importlib
import re
from typing import Any, Callable

import gymnasium as gym

# id -> ("module:Class", default kwargs). Modules are imported on first use so that, e.g., the Overcooked envs work
# without ALFWorld's engine installed.
REGISTRY: dict[str, tuple[str, dict[str, Any]]] = {
    "overcooked-tomato": ("envs.overcooked:OvercookedEnv", {"task": "tomato"}),
    "overcooked-salad": ("envs.overcooked:OvercookedEnv", {"task": "salad"}),
    "frozenlake": ("envs.frozenlake:FrozenLakeTextEnv", {"map_name": "4x4"}),
    "frozenlake-8x8": ("envs.frozenlake:FrozenLakeTextEnv", {"map_name": "8x8"}),
    "alfworld-pick": ("envs.alfworld:ALFWorldEnv", {"task_type": "pick"}),
    "alfworld-examine": ("envs.alfworld:ALFWorldEnv", {"task_type": "examine"}),
    "babyai-gotoredball": ("envs.babyai:BabyAITextEnv", {"level": "GoToRedBall", "max_steps": 30}),
    "textworld-coin": ("envs.textworld:TextWorldEnv", {"family": "coin"}),
    "textworld-treasure": ("envs.textworld:TextWorldEnv", {"family": "treasure"}),
    "textworld-cooking": ("envs.textworld:TextWorldEnv", {"family": "cooking"}),
}
ENV_IDS: tuple[str, ...] = tuple(REGISTRY)
GYM_PREFIX, GYM_SUFFIX = "llmprior/", "-v0"  # a registered id's gymnasium name: llmprior/<id>-v0

# A comma that starts the next `name=value` (and not one inside a value such as [1, 2]).
_NEXT_KEYWORD = re.compile(r",\s*(?=[A-Za-z_]\w*\s*=)")


class EnvSpecError(ValueError):
    """A spec that names no env, keywords it refuses, or an env that does not speak the protocol: one line that says
    what to fix."""


def parse(spec: str) -> tuple[str, dict[str, Any]]:
    """``"mymodule:MyEnv,size=4"`` -> ``("mymodule:MyEnv", {"size": 4})``; a registered id's gymnasium name becomes
    the id."""
    env, *pairs = _NEXT_KEYWORD.split(spec.strip())
    env = env.strip()
    if not env or "," in env:
        raise EnvSpecError("expected ENV[,key=value,...], e.g. textworld-coin,level=5 (docs/envs.md)")
    if env.startswith(GYM_PREFIX) and env.endswith(GYM_SUFFIX) and env[len(GYM_PREFIX) : -len(GYM_SUFFIX)] in REGISTRY:
        env = env[len(GYM_PREFIX) : -len(GYM_SUFFIX)]
    kwargs: dict[str, Any] = {}
    for pair in pairs:
        key, value = (part.strip() for part in pair.split("=", 1))
        if key in kwargs:
            raise EnvSpecError(f"keyword {key!r} given twice")
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):  # not a Python literal: the text itself (name=big, path=/data/x)
            kwargs[key] = value
    return env, kwargs


def registered_id(spec: str) -> str:
    """The registered id a spec names, keywords dropped (``overcooked-salad,horizon=30`` -> ``overcooked-salad``), or
    "" for any other env: what the prompts and the per-family settings key on (llmprior/prompts.py). Never raises."""
    try:
        env = parse(spec)[0]
    except EnvSpecError:
        return ""
    return env if env in REGISTRY else ""


def _load(target: str) -> Callable[..., gym.Env]:
    module_name, name = target.split(":")
    return getattr(importlib.import_module(module_name), name)


def _builder(env: str) -> tuple[Callable[..., gym.Env], dict[str, Any], Any]:
    """-> (a callable that builds the env from keyword arguments, its default keywords, the class whose attributes
    say what it offers: `splits`, `costly_expert`)."""
    if env in REGISTRY:
        target, defaults = REGISTRY[env]
        cls = _load(target)
        return cls, dict(defaults), cls
    if ":" in env:
        module_name, name = env.split(":", 1)
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise EnvSpecError(f"cannot import {module_name!r} ({err}); is its folder on PYTHONPATH?") from err
        if name.isidentifier() and callable(getattr(module, name, None)):
            return getattr(module, name), {}, getattr(module, name)
        if name not in gym.registry:  # gymnasium's own `module:Name-v0`: importing the module registered it
            raise EnvSpecError(f"module {module_name!r} has no class {name!r}, and it registers no gymnasium id "
                               f"{name!r}")  # fmt: skip
        env = name
    if env not in gym.registry:
        if "/" in env or re.search(r"-v\d+$", env):
            raise EnvSpecError(f"no gymnasium id {env!r} is registered; name the module that registers it: "
                               f"`module:{env}`")  # fmt: skip
        raise EnvSpecError(f"unknown; one of {', '.join(ENV_IDS)}, a `package.module:ClassName` or a gymnasium id "
                           "(docs/envs.md)")  # fmt: skip
    entry_point = gym.spec(env).entry_point
    cls = gym.envs.registration.load_env_creator(entry_point) if isinstance(entry_point, str) else entry_point

    def make_gym(**kwargs: Any) -> gym.Env:
        # gymnasium's passive checker does not understand a text action set that changes with the state
        return gym.make(env, disable_env_checker=True, **kwargs)

    return make_gym, {}, cls


def make(spec: str, **kwargs: Any) -> gym.Env:
    """Build the env of a spec; keyword arguments override the spec's and the registered id's defaults. Raises
    EnvSpecError ("<spec>: <what is wrong>") on a spec that names no env; the constructor's own errors pass through."""
    try:
        env, spec_kwargs = parse(spec)
        build, defaults, _ = _builder(env)
    except EnvSpecError as err:
        raise EnvSpecError(f"{spec}: {err}") from err.__cause__
    return build(**{**defaults, **spec_kwargs, **kwargs})


def make_env(spec: str, split: str | None = None, expert: bool = False) -> gym.Env:
    """The env of a script's ``--env``. ``split`` (e.g. "unseen") picks a game split of an env that has them (its
    class's ``splits``); ``expert``: the run needs ``info["expert_action"]`` at every state (the synthetic prior,
    build_dataset.py's expert episodes), which an env whose expert costs a search (``costly_expert``, e.g. ALFWorld's
    planner) computes only when its ``expert=`` keyword asks. An env from outside ENV_IDS is reset (seed 0) and
    stepped once to check that it speaks the protocol. Every failure is an EnvSpecError of one line, "<spec>: <what is
    wrong>"."""
    try:
        return _make_checked(spec, split, expert)
    except EnvSpecError as err:
        raise EnvSpecError(f"{spec}: {err}") from err.__cause__


def _make_checked(spec: str, split: str | None, expert: bool) -> gym.Env:
    env, spec_kwargs = parse(spec)
    build, defaults, cls = _builder(env)
    kwargs = {**defaults, **spec_kwargs}
    if split is not None:
        splits = tuple(getattr(cls, "splits", ()))
        if split not in splits:
            raise EnvSpecError(f"has no game split {split!r} (its class's `splits`: {', '.join(splits) or 'none'})")
        kwargs["split"] = split
    if getattr(cls, "costly_expert", False):
        kwargs["expert"] = expert
    try:
        made = build(**kwargs)
    except Exception as err:  # bad keywords (TypeError), bad values (ValueError), a missing data folder, ...
        raise EnvSpecError(f"{type(err).__name__}: {err}") from err
    if env not in REGISTRY:
        check_protocol(made, expert)
    return made


def game_splits(env: gym.Env) -> tuple[str, ...]:
    """The game splits an env's `split=` takes (its class's `splits`, e.g. ("train", "unseen")); () for most envs."""
    return tuple(getattr(env.unwrapped, "splits", ()))


def check_protocol(env: gym.Env, expert: bool = False) -> None:
    """Reset (seed 0) and one step with the first admissible action, checking what the scripts read: string
    observations, ``info["admissible_actions"]`` (a list of strings), ``info["task"]`` (a string), and with
    ``expert`` an ``info["expert_action"]`` among the admissible actions. Raises EnvSpecError naming what is
    missing."""
    obs, info = _call(env.reset, "reset(seed=0)", 2, seed=0)
    _check_state("reset()", obs, info)
    admissible = info["admissible_actions"]
    if not admissible:
        raise EnvSpecError("the info of reset() has an empty 'admissible_actions': nothing to act with")
    if expert and info.get("expert_action") not in admissible:
        missing = "has no 'expert_action'" if info.get("expert_action") is None else (
            "has an 'expert_action' that is not admissible")
        raise EnvSpecError(f"the info of reset() {missing} (an optimal next action), which this run needs: the "
                           "synthetic prior proposes it and build_dataset.py's expert episodes follow it")  # fmt: skip
    obs, reward, _, _, info = _call(env.step, f"step({admissible[0]!r})", 5, admissible[0])
    _check_state("step()", obs, info)
    try:
        float(reward)
    except (TypeError, ValueError):
        raise EnvSpecError(f"step() returned the reward {reward!r}, not a number") from None


def _call(method: Callable, what: str, size: int, *args: Any, **kwargs: Any) -> tuple:
    try:
        out = method(*args, **kwargs)
    except Exception as err:
        raise EnvSpecError(f"{what} failed: {type(err).__name__}: {err}") from err
    if not isinstance(out, tuple) or len(out) != size:
        raise EnvSpecError(f"{what} returned {type(out).__name__}, not a tuple of {size} as gymnasium's API")
    return out


def _check_state(where: str, obs: Any, info: Any) -> None:
    if not isinstance(obs, str):
        raise EnvSpecError(f"{where} returned a {type(obs).__name__} observation; the protocol's are strings")
    if not isinstance(info, dict):
        raise EnvSpecError(f"{where} returned a {type(info).__name__} info; the protocol's is a dict")
    if "admissible_actions" not in info:
        raise EnvSpecError(f"the info of {where} has no 'admissible_actions' (the list of valid action strings)")
    actions = info["admissible_actions"]
    if not isinstance(actions, (list, tuple)) or not all(isinstance(a, str) for a in actions):
        raise EnvSpecError(f"the info of {where} has an 'admissible_actions' that is not a list of strings")
    if not isinstance(info.get("task"), str):
        problem = "no 'task'" if "task" not in info else "a 'task' that is not a string"
        raise EnvSpecError(f"the info of {where} has {problem} (the task sentence, '' if there is none)")


def register_with_gymnasium() -> None:
    for env_id, (target, defaults) in REGISTRY.items():
        gym_id = f"{GYM_PREFIX}{env_id}{GYM_SUFFIX}"
        if gym_id not in gym.registry:
            gym.register(id=gym_id, entry_point=target, kwargs=dict(defaults), disable_env_checker=True)


__all__ = ["ENV_IDS", "EnvSpecError", "check_protocol", "game_splits", "make", "make_env", "parse", "registered_id"]
