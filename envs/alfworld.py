"""ALFWorld pick and examine (the paper's hardest tasks), driving TextWorld's PDDL engine directly.

Games come from the real dataset when ``data_dir`` or ``$ALFWORLD_DATA`` names it (the layout written by
``alfworld-download``: ``json_2.1.1/<split>/<task>/<trial>/{game.tw-pddl, traj_data.json}``), selected as
ALFWorld's own loader (``AlfredTWEnv.collect_game_files``) does: by task type, skipping movable-receptacle
and sliced-object trajectories, games without a ``solvable`` key and unsolvable games. Otherwise they
come from :mod:`envs.alfworld_gen`, a seeded generator that writes games in the same format into a cache
folder, which is then read by the same loader.

Observation: TextWorld's text with the "-= Welcome to TextWorld, ALFRED! =-" banner removed, e.g. at reset
"You are in the middle of a room. Looking quickly around you, you see a armchair 1, ... .\\n\\nYour task
is to: put a cellphone in armchair." and after a step "You arrive at sidetable 1. On the sidetable 1, you
see a cellphone 1." ``info["task"]`` is the goal sentence ("put a cellphone in armchair."),
``info["admissible_actions"]`` TextWorld's admissible commands (alphabetical). Reward 1.0 when the goal
holds (``terminated``), else 0; reaching ``max_steps`` (61, the authors' cap) is ``truncated``.

Expert: the PDDL planner (Fast Downward, as ALFWorld's ``AlfredExpert(PLANNER)``); no hand-coded expert.
With ``expert=True`` every ``info["expert_action"]`` holds the planner's next action (one search per
step). With ``expert=False`` (the default, for training) it is None, but ``env.expert_action()`` still
computes it on demand.

Reproducibility: the text is a function of the game file and the game state. TextWorld's PDDL grammar takes
the first applicable rule of each symbol (it draws nothing), objects are numbered in sorted id order, and
``reset(seed=...)`` picks the games; so a seed gives the same observations, tasks and admissible actions in any
process, whatever ``PYTHONHASHSEED``. A task's wording is fixed when its game file is written:
``alfworld-generate`` (``add_task_to_grammar``) draws "put a cellphone in armchair." or "put some cellphone on
armchair." from Python's global ``random``, so a data folder rewritten in every process without seeding ``random``
changes the wording from one process to the next. Write the data once (or seed ``random``) and reuse it.

Differences from ALFWorld's loader: games are sorted by path (``os.walk``'s order is the filesystem's);
the movable/sliced filter looks at the path below the split folder, not the whole path, so a data folder
named e.g. ``~/Sliced`` does not hide every game.

    python -m envs.alfworld --task pick --agent expert --episodes 5
    python -m envs.alfworld --task examine --agent random --episodes 20 --split train
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path
from typing import Any

from textworld.core import GameState

from envs import alfworld_gen
from envs.alfworld_engine import make_engine
from envs.core import GameOrder, TextEnv

TASK_TYPES = {"pick": alfworld_gen.PICK, "examine": alfworld_gen.EXAMINE}
# Our split names, ALFWorld's folder names, and the names in ALFWorld's config files.
SPLITS = {
    "train": "train",
    "seen": "valid_seen",
    "unseen": "valid_unseen",
    "valid_seen": "valid_seen",
    "valid_unseen": "valid_unseen",
    "eval_in_distribution": "valid_seen",
    "eval_out_of_distribution": "valid_unseen",
}
BANNER = "-= Welcome to TextWorld, ALFRED! =-"
TASK_PREFIX = "Your task is to: "
DATASET_LAYOUT = "<data_dir>/json_2.1.1/{train,valid_seen,valid_unseen}/<task>/<trial>/{game.tw-pddl,traj_data.json}"


def split_folder(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown ALFWorld split {split!r}; valid: {', '.join(SPLITS)}")
    return SPLITS[split]


def _user_data_dir() -> Path | None:
    """``$ALFWORLD_DATA`` when a user set it.

    Importing ``alfworld`` sets ``ALFWORLD_DATA`` to ``~/.cache/alfworld`` (and creates it) when it is
    unset, so that value without a dataset in it means "not given".
    """
    value = os.environ.get("ALFWORLD_DATA")
    if not value:
        return None
    path = Path(value).expanduser()
    if path == Path("~/.cache/alfworld").expanduser() and not (path / "json_2.1.1").exists():
        return None
    return path


def find_games(data_dir: str | os.PathLike, split: str, task_type: str) -> list[str]:
    """The solvable ``game.tw-pddl`` files of ``task_type`` ("pick"/"examine" or ALFWorld's name) in a split.

    Raises FileNotFoundError when the folder is not laid out like the dataset, ValueError on a malformed
    ``traj_data.json`` or ``game.tw-pddl`` and when no game of the task type is left.
    """
    data_dir = Path(data_dir).expanduser()
    alfred_type = TASK_TYPES.get(task_type, task_type)
    folder = split_folder(split)
    root = data_dir / "json_2.1.1" if data_dir.name != "json_2.1.1" else data_dir
    split_dir = root / folder
    if not split_dir.is_dir():
        if not data_dir.is_dir():
            problem = "does not exist"
        elif not root.is_dir():
            problem = "has no json_2.1.1 folder"
        else:
            present = sorted(p.name for p in root.iterdir() if p.is_dir())
            problem = f"has no json_2.1.1/{folder} folder (found: {', '.join(present) or 'nothing'})"
        raise FileNotFoundError(
            f"ALFWorld data folder {data_dir} {problem}; expected the layout written by alfworld-download: "
            f"{DATASET_LAYOUT}"
        )

    games = []
    for here, _, files in os.walk(split_dir):
        if "traj_data.json" not in files:
            continue
        relative = os.path.relpath(here, split_dir)
        if "movable" in relative or "Sliced" in relative:
            continue
        traj = _read_json(Path(here) / "traj_data.json")
        if "task_type" not in traj:
            raise ValueError(f"{here}/traj_data.json has no 'task_type'; is {data_dir} an ALFWorld data folder?")
        if traj["task_type"] != alfred_type:
            continue
        game_file = Path(here) / "game.tw-pddl"
        if not game_file.exists():
            continue
        if _read_json(game_file).get("solvable"):  # absent or False: ALFWorld skips both
            games.append(str(game_file))
    games.sort()  # os.walk's order is the filesystem's
    if not games:
        raise ValueError(
            f"no solvable {alfred_type} games under {split_dir} (game.tw-pddl files are written by "
            f"alfworld-generate; expected layout: {DATASET_LAYOUT})"
        )
    return games


def _read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"malformed ALFWorld file {path}: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"malformed ALFWorld file {path}: expected a JSON object")
    return data


def _clean(text: str) -> str:
    return text.replace(BANNER, "").strip()


class ALFWorldEnv(TextEnv):
    """ALFWorld pick ("pick_and_place_simple") or examine ("look_at_obj_in_light") games.

    Args:
        task_type: "pick" or "examine".
        split: "train", "unseen" (valid_unseen), "seen" (valid_seen), or ALFWorld's folder names.
            The generated set has pick train (28), pick unseen (26) and examine train (11).
        data_dir: an ALFWorld data folder (holding ``json_2.1.1``); default ``$ALFWORLD_DATA``, else the
            generated set.
        max_steps: episode cap; reaching it truncates (61, the authors' setting).
        seed: seed of the generated game set, not of episodes (``reset(seed=...)`` orders those); keep it
            fixed so that every run sees the same tasks. Unused with real data.
        expert: put the planner's next action in every ``info["expert_action"]`` (one planner search
            per step; for dataset building and prior-coverage measurement).
        cache_size: how many parsed game files to keep in memory.

    Episodes: ``reset(seed=s)`` draws a fresh permutation of the games from ``s`` and plays its first game;
    later ``reset()`` calls walk the permutation, then draw another. ``options={"game_index": i}`` plays
    ``game_files[i]``.
    """

    splits = tuple(SPLITS)
    costly_expert = True  # one planner search per step

    def __init__(
        self,
        task_type: str = "pick",
        split: str = "train",
        data_dir: str | os.PathLike | None = None,
        max_steps: int = 61,
        seed: int = 0,
        expert: bool = False,
        cache_size: int = 128,
    ) -> None:
        super().__init__()
        if task_type not in TASK_TYPES:
            raise ValueError(f"unknown ALFWorld task type {task_type!r}; valid: {', '.join(TASK_TYPES)}")
        self.task_type, self.split = task_type, split_folder(split)
        if data_dir is None:
            data_dir = _user_data_dir() or alfworld_gen.default_games_dir(TASK_TYPES[task_type], self.split, seed)
        self.data_dir = Path(data_dir).expanduser()
        self.game_files = find_games(self.data_dir, self.split, task_type)
        self.num_games = len(self.game_files)
        self.max_steps, self.expert = max_steps, expert
        self._engine = make_engine(cache_size)
        self._loaded: str | None = None
        self._games = GameOrder(self.num_games)
        self._state: GameState | None = None
        self._game_index = -1
        self._task = ""
        self._steps = 0

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[str, dict[str, Any]]:
        super().reset(seed=seed)
        index = self._games.next(self.np_random, seed is not None, options)
        game_file = self.game_files[index]
        if game_file != self._loaded:
            self._engine.load(game_file)
            self._loaded = game_file
        self._state = self._engine.reset()
        self._game_index, self._steps = index, 0
        obs = _clean(self._state.feedback)
        self._task = obs.split(TASK_PREFIX, 1)[1].strip() if TASK_PREFIX in obs else ""
        self._start_episode()
        return obs, self._info()

    def step(self, action: str | int) -> tuple[str, float, bool, bool, dict[str, Any]]:
        command = self._resolve_action(action, self._state["admissible_commands"] if self._state else [])
        self._state, _, _ = self._engine.step(command)
        self._steps += 1
        won = bool(self._state["won"])
        truncated = not won and self._steps >= self.max_steps
        self._finish_step(won, truncated)
        return _clean(self._state.feedback), 1.0 if won else 0.0, won, truncated, self._info()

    def expert_action(self) -> str | None:
        """The planner's next action, computed now whatever ``expert`` says; None once the episode is over."""
        if self._episode_over:
            return None
        plan = self._engine.plan()
        return plan[0] if plan else None

    def _info(self) -> dict[str, Any]:
        won = bool(self._state["won"])
        return {
            "admissible_actions": list(self._state["admissible_commands"]),
            "task": self._task,
            "expert_action": self.expert_action() if self.expert else None,
            "success": won,
            "won": won,
            "game_file": self.game_files[self._game_index],
            "game_index": self._game_index,
        }


# -- command line: a random agent or the planner, with timings ------------------------------------------
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Play ALFWorld games with a random agent or the planner.")
    parser.add_argument("--task", choices=sorted(TASK_TYPES), default="pick")
    parser.add_argument("--agent", choices=("random", "expert"), default="random")
    parser.add_argument("--episodes", type=int, default=5)
    parser.add_argument("--split", default="train")
    parser.add_argument("--data-dir", help="ALFWorld data folder (default: $ALFWORLD_DATA, else generated games)")
    parser.add_argument("--seed", type=int, default=0, help="episode seed (the generated set always uses seed 0)")
    parser.add_argument("--max-steps", type=int, default=61)
    parser.add_argument("--verbose", action="store_true", help="print every observation and action")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    env = ALFWorldEnv(args.task, split=args.split, data_dir=args.data_dir, max_steps=args.max_steps)
    print(f"{env.num_games} {args.task} games in {env.data_dir} / {env.split} ({time.perf_counter() - start:.1f}s)")
    rng = random.Random(args.seed)
    reset_time = step_time = 0.0
    steps = wins = 0
    for episode in range(args.episodes):
        tick = time.perf_counter()
        obs, info = env.reset(seed=args.seed if episode == 0 else None)
        reset_time += time.perf_counter() - tick
        if args.verbose:
            print(obs)
        done, ret, length = False, 0.0, 0
        while not done:
            action = env.expert_action() if args.agent == "expert" else rng.choice(info["admissible_actions"])
            tick = time.perf_counter()
            obs, reward, terminated, truncated, info = env.step(action)
            step_time += time.perf_counter() - tick
            ret, length, done = ret + reward, length + 1, terminated or truncated
            if args.verbose:
                print(f"> {action}\n{obs}")
        steps, wins = steps + length, wins + int(info["success"])
        print(f"episode {episode}: return {ret:.0f} in {length} steps  [{info['task']}]  {info['game_file']}")
    print(
        f"success {wins}/{args.episodes}; mean reset {reset_time / args.episodes * 1000:.0f} ms; "
        f"{steps / step_time:.0f} steps/s over {steps} steps (planner time excluded)"
    )


if __name__ == "__main__":
    main()
