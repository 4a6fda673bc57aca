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
from collections import Counter, OrderedDict, defaultdict
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fast_downward
import textworld
from alfworld.agents.environment.alfred_tw_env import AlfredDemangler
from textworld.core import GameState
from textworld.envs import PddlEnv
from textworld.envs.pddl import logic as pddl_logic
from textworld.envs.pddl import textgen
from textworld.envs.pddl.textgen import ContextSensitiveGrammar
from textworld.logic import Proposition, Variable

from envs import alfworld_gen
from envs.core import TextEnv

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


# -- the engine ---------------------------------------------------------------------------------------
@dataclass
class _ParsedGame:
    """What TextWorld recomputes on every load or reset but depends only on the game file."""

    data: dict
    logic: pddl_logic.GameLogic
    task: Any  # Fast Downward's parsed and normalised task
    sas: str
    sas_replan: str
    init_facts: list[Proposition]


# TatSu parses of grammar templates and rule conditions, shared by all games (the strings recur).
_TEMPLATES: dict[str, list] = {}
_CONDITIONS: dict[str, textworld.logic.Rule] = {}


def _condition(text: str) -> textworld.logic.Rule:
    if text not in _CONDITIONS:
        _CONDITIONS[text] = textworld.logic.Rule.parse_conjunctive_query(text)
    return _CONDITIONS[text]


def _derive_conditional(symbol: textgen.ConditionalSymbol) -> list:
    """textgen.ConditionalSymbol.derive (and its `query`) with the condition parsed once: TatSu parsed it again at
    every use, about a quarter of an ALFWorld step."""
    context = textgen.copy_context(symbol.context)
    contexts = [context]
    if symbol.given:
        contexts = []
        for mapping in context["state"].all_assignments(_condition(symbol.given), context["mapping"]):
            matched = textgen.copy_context(context)
            matched["variables"].update({ph.name: matched["entity_infos"][var.name] for ph, var in mapping.items()})
            matched["mapping"].update(mapping)
            contexts.append(matched)
    return [symbol.expression.copy(c) for c in contexts]


class _MemoGrammar(ContextSensitiveGrammar):
    """TextWorld's text grammar, parsing each template and rule condition once rather than at every use.

    TatSu re-parsed the same few dozen strings for every admissible command at every step: about 60% of
    step time. ``derive`` and ``replace`` are the stock methods with the parses memoised.
    """

    def __init__(self, grammar: ContextSensitiveGrammar) -> None:
        super().__init__()
        self.update(grammar)

    def replace(self, start):
        rules = self._rules.get(str(start))
        if not rules:
            raise textgen.CSGUnknownSymbolError(start)
        mapping = start.context["mapping"]
        state = start.context["state"]
        applicable = [
            rule for rule in rules
            if not rule.condition or any(True for _ in state.all_assignments(_condition(rule.condition), mapping))
        ]
        # The first applicable rule, as TextWorld: drawing one would make the text vary between processes.
        symbols = deepcopy(applicable[0].rhs)
        for symbol in symbols:
            symbol.context = textgen.copy_context(start.context)
        return symbols

    def derive(self, start: str, context={}) -> str:
        if start not in _TEMPLATES:
            _TEMPLATES[start] = textgen._parse_and_convert(start, rule_name="symbols")
        derivation = deepcopy(_TEMPLATES[start])[::-1]  # symbols carry per-use context: never share them
        for symbol in derivation:
            symbol.context = textgen.copy_context(context)
        derived = []
        while derivation:
            symbol = derivation.pop()
            if isinstance(symbol, textgen.TerminalSymbol):
                derived.append(symbol)
            elif isinstance(symbol, textgen.NonterminalSymbol):
                derivation += self.replace(symbol)[::-1]
            elif isinstance(symbol, textgen.ConditionalSymbol):
                derivation += _derive_conditional(symbol)[::-1]
            elif isinstance(symbol, textgen.ListSymbol) and isinstance(symbol.symbol, textgen.ConditionalSymbol):
                symbol.symbol.context = symbol.context
                derivation += textgen.display_list(_derive_conditional(symbol.symbol), symbol.context)[::-1]
            elif isinstance(symbol, (textgen.EvalSymbol, textgen.ListSymbol)):
                derivation += symbol.derive()[::-1]
            else:
                raise NotImplementedError(f"Unknown symbol: {type(symbol)}")
        return "".join(map(str, derived))


def _parse_game(game_file: str) -> _ParsedGame:
    with open(game_file) as f:
        data = json.load(f)
    logic = pddl_logic.GameLogic(domain=data["pddl_domain"], grammar=data["grammar"])
    logic.grammar = _MemoGrammar(logic.grammar)
    task, sas = fast_downward.pddl2sas(logic.domain, data["pddl_problem"])
    _, sas_replan = fast_downward.pddl2sas(logic.domain, data["pddl_problem"], optimize=True)
    for type_ in task.types:
        try:
            logic.types.add(textworld.logic.Type(type_.name, type_.supertype_names))
        except ValueError:  # already known, as in textworld's PddlState
            pass
    name2type = {o.name: o.type_name for o in task.objects}
    init_facts = []
    for atom in task.init:
        # As textworld's PddlState: PDDL atoms become facts; "=" atoms, the cost and distances do not.
        if isinstance(atom, fast_downward.translate.pddl.conditions.Atom):
            if atom.predicate != "=":
                init_facts.append(Proposition(atom.predicate, [Variable(a, name2type[a]) for a in atom.args]))
        elif isinstance(atom, fast_downward.translate.pddl.f_expression.Assign):
            name = str(atom.expression.value)
            if atom.fluent.symbol != "total-cost" and not name.isdigit():
                init_facts.append(Proposition(name, [Variable(a, name2type[a]) for a in atom.fluent.args]))
    return _ParsedGame(data, logic, task, sas, sas_replan, init_facts)


class _PddlState(pddl_logic.PddlState):
    """textworld's PddlState built from a parsed game.

    The stock constructor runs Fast Downward's translator twice (parse domain and problem, ground, write
    SAS) on every reset, which is most of TextWorld's reset time; here that is done once per game file.
    The rest mirrors the stock constructor.
    """

    def __init__(self, downward_lib, game: _ParsedGame) -> None:
        self._facts, self._vars_by_name = defaultdict(set), {}
        self._vars_by_type, self._var_counts = defaultdict(set), Counter()
        self._logic = game.logic
        self.downward_lib = downward_lib
        self.pddl_problem = game.data["pddl_problem"]
        self.task, self.sas, self.sas_replan = game.task, game.sas, game.sas_replan
        self._actions = {a.name: a for a in self.task.actions}
        self.downward_lib.load_sas(self.sas.encode("utf-8"))
        self.downward_lib.load_sas_replan(self.sas_replan.encode("utf-8"))
        self.name2type = {o.name: o.type_name for o in self.task.objects}
        self.add_facts(game.init_facts)
        atoms = (pddl_logic.Atom * self.downward_lib.get_state_size())()
        self.downward_lib.get_state(atoms)
        self.add_facts([fact for fact in (a.get_fact(self.name2type) for a in atoms) if not fact.is_negation])


class _CachedPddlEnv(PddlEnv):
    """TextWorld's PddlEnv that keeps the parsed games of its last ``cache_size`` game files.

    One instance holds one copy of Fast Downward's library (whose search state is global), so it is
    created once per ALFWorldEnv and reused across resets and games.
    """

    def __init__(self, infos: textworld.EnvInfos, cache_size: int) -> None:
        super().__init__(infos)
        self._parsed: OrderedDict[str, _ParsedGame] = OrderedDict()
        self._cache_size = cache_size
        self._game: _ParsedGame | None = None

    def load(self, game_file: str) -> None:
        if game_file in self._parsed:
            self._parsed.move_to_end(game_file)
        else:
            self._parsed[game_file] = _parse_game(game_file)
            if len(self._parsed) > self._cache_size:
                self._parsed.popitem(last=False)
        self._game = self._parsed[game_file]
        self._game_file, self._game_data = game_file, self._game.data
        self.walkthrough = self._game_data.get("walkthrough")
        self._logic = self._game.logic
        self._pddl_state = _PddlState(self.downward_lib, self._game)
        self._entity_infos = self._get_entity_infos()

    def reset(self) -> GameState:
        # PddlEnv.reset, with the cached translation instead of a fresh PddlState.
        self._pddl_state = _PddlState(self.downward_lib, self._game)
        self.prev_state, self.state = None, GameState()
        self._last_action, self._moves = None, 0
        context = {"state": self._pddl_state, "facts": list(self._pddl_state.facts), "variables": {},
                   "mapping": {}, "entity_infos": self._entity_infos}
        self.state.feedback = self._logic.grammar.derive("#intro#", context)
        self.state.raw = self.state.feedback
        self._gather_infos()
        return self.state

    def plan(self) -> list[str]:
        """The planner's optimal command sequence from the current state ([] once the goal holds)."""
        return self._pddl_state.replan(self._entity_infos)


def make_engine(cache_size: int = 128) -> textworld.core.Wrapper:
    """TextWorld's ALFWorld engine (PddlEnv + AlfredDemangler) with parsing done once per game file.

    ``load(game_file)``, ``reset()`` and ``step(command)`` as in TextWorld; ``plan()`` gives the planner's
    commands from the current state.
    """
    return AlfredDemangler(_CachedPddlEnv(textworld.EnvInfos(won=True, admissible_commands=True), cache_size))


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
        self._order: list[int] = []
        self._cursor = 0
        self._state: GameState | None = None
        self._game_index = -1
        self._task = ""
        self._steps = 0

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[str, dict[str, Any]]:
        super().reset(seed=seed)
        if seed is not None or not self._order:
            self._reshuffle()
        if options and "game_index" in options:
            index = int(options["game_index"])
            if not 0 <= index < self.num_games:
                raise ValueError(f"game_index {index} out of range for {self.num_games} games")
        else:
            if self._cursor == len(self._order):
                self._reshuffle()
            index = self._order[self._cursor]
            self._cursor += 1
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

    def _reshuffle(self) -> None:
        self._order = [int(i) for i in self.np_random.permutation(self.num_games)]
        self._cursor = 0

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
