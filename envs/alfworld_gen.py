"""A seeded generator of ALFWorld games in the real dataset's format, for when the dataset is absent.

ALFWorld's 3,553 games (``alfworld-download``) cannot be fetched everywhere, CI included. This module
writes games the real engine loads unchanged: each game is a folder holding ``game.tw-pddl`` (ALFWorld's
own PDDL domain and text grammar, a PDDL problem, ``"solvable": true`` and the planner's walkthrough) and
``traj_data.json`` (task type, ``pddl_params``, the task sentence), laid out as
``json_2.1.1/<split>/<task_type>-<Object>-None-<Receptacle>-<scene>/<trial>/``. So a generated set is a
valid ``ALFWORLD_DATA`` folder and goes through the same loader as the real games.

Rooms copy ALFRED's four room kinds (kitchen, living room, bedroom, bathroom) with several instances of
drawers, cabinets, shelves and side tables; which receptacle may hold which object comes from ALFRED's
own table (``alfworld.gen.constants.VAL_RECEPTACLE_OBJECTS``), which is also where the ``canContain``
facts come from (without them Fast Downward proves every goal unreachable). Goals and task sentences are
ALFWorld's goal library (``alfworld.gen.goal_library``).

Default sets (the paper's online ALFWorld setting): pick train = 28 tasks, whose (object, receptacle)
pairs include the 18 distinct pairs of the authors' 26 pick tasks; pick unseen = 26 tasks whose pairs
never occur in train; examine = 11 tasks (hold an object under a desk lamp), in the train split.
Every game is loaded by TextWorld and solved by the PDDL planner before it is kept.

    python -m envs.alfworld_gen               # fill the cache that envs.alfworld reads (all three groups)
    python -m envs.alfworld_gen --out /tmp/alfworld_data --seed 0   # one ALFWORLD_DATA-style folder
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import alfworld.gen.constants as alfred
import alfworld.gen.goal_library as goal_library

from envs.core import cache_dir

# Bump when generated games change, so that stale caches are not reused.
GENERATOR_VERSION = "gen1"
DEFAULT_COUNTS = {"pick_train": 28, "pick_unseen": 26, "examine": 11}

PICK = "pick_and_place_simple"
EXAMINE = "look_at_obj_in_light"
# (task type, split folder) -> its count in DEFAULT_COUNTS, which also names its cache folder.
GROUPS = {(PICK, "train"): "pick_train", (PICK, "valid_unseen"): "pick_unseen", (EXAMINE, "train"): "examine"}

# Receptacle types with (min, max) instance counts, and the object types found there, after ALFRED's
# FloorPlans. ALFRED scene numbers per room kind (alfworld.gen.constants.SCENE_TYPE) name the folders.
ROOMS: dict[str, dict] = {
    "kitchen": {
        "scenes": range(1, 31),
        "receptacles": {
            "Cabinet": (4, 9), "CoffeeMachine": (1, 1), "CounterTop": (1, 3), "DiningTable": (0, 1),
            "Drawer": (2, 6), "Fridge": (1, 1), "GarbageCan": (1, 1), "Microwave": (1, 1), "Shelf": (0, 3),
            "SinkBasin": (1, 1), "StoveBurner": (4, 4), "Toaster": (1, 1),
        },
        "objects": [
            "Apple", "Bowl", "Bread", "ButterKnife", "Cup", "DishSponge", "Egg", "Fork", "Kettle", "Knife",
            "Ladle", "Lettuce", "Mug", "Pan", "PepperShaker", "Plate", "Pot", "Potato", "SaltShaker",
            "SoapBottle", "Spatula", "Spoon", "Tomato", "WineBottle",
        ],
    },
    "livingroom": {
        "scenes": range(201, 231),
        "receptacles": {
            "ArmChair": (0, 2), "Cabinet": (0, 4), "CoffeeTable": (1, 1), "DiningTable": (0, 1),
            "Drawer": (1, 4), "Dresser": (0, 1), "GarbageCan": (1, 1), "Ottoman": (0, 1), "Safe": (0, 1),
            "Shelf": (0, 5), "SideTable": (1, 3), "Sofa": (1, 1), "TVStand": (0, 1),
        },
        "objects": [
            "Book", "Bowl", "Box", "Candle", "CellPhone", "CreditCard", "KeyChain", "Laptop", "Newspaper",
            "Pillow", "Plate", "RemoteControl", "Statue", "TissueBox", "Vase", "Watch", "WateringCan",
        ],
    },
    "bedroom": {
        "scenes": range(301, 331),
        "receptacles": {
            "ArmChair": (0, 1), "Bed": (1, 1), "Desk": (0, 1), "Drawer": (2, 6), "Dresser": (0, 1),
            "GarbageCan": (1, 1), "LaundryHamper": (0, 1), "Safe": (0, 1), "Shelf": (0, 6),
            "SideTable": (1, 2),
        },
        "objects": [
            "AlarmClock", "BaseballBat", "BasketBall", "Book", "Bowl", "Box", "CD", "Candle", "CellPhone",
            "Cloth", "CreditCard", "KeyChain", "Laptop", "Mug", "Pen", "Pencil", "Pillow", "TennisRacket",
            "Vase", "Watch",
        ],
    },
    "bathroom": {
        "scenes": range(401, 431),
        "receptacles": {
            "BathtubBasin": (0, 1), "Cabinet": (1, 4), "Cart": (0, 1), "CounterTop": (1, 1), "Drawer": (0, 4),
            "GarbageCan": (1, 1), "HandTowelHolder": (0, 2), "Shelf": (0, 3), "SinkBasin": (1, 2),
            "Toilet": (1, 1), "ToiletPaperHanger": (1, 1), "TowelHolder": (0, 1),
        },
        "objects": [
            "Candle", "Cloth", "DishSponge", "HandTowel", "Plunger", "SoapBar", "SoapBottle", "SprayBottle",
            "TissueBox", "ToiletPaper", "Towel",
        ],
    },
}

# The desk lamp of ALFRED's look-at-in-light tasks stands on one of these.
LAMP = "DeskLamp"
LAMP_HOLDERS = ("Desk", "SideTable", "Dresser")
EXAMINE_ROOMS = ("bedroom", "livingroom")  # ALFRED's alfworld.gen.constants.GOALS_VALID for this goal

# The distinct (object, receptacle) pairs of the authors' 26 pick tasks; they are the core of train.
PAPER_PICK_PAIRS: tuple[tuple[str, str], ...] = (
    ("CellPhone", "ArmChair"), ("Candle", "SideTable"), ("Candle", "Toilet"), ("SoapBottle", "Toilet"),
    ("CellPhone", "Bed"), ("Cloth", "Toilet"), ("CellPhone", "Desk"), ("CellPhone", "Drawer"),
    ("SprayBottle", "CounterTop"), ("Pillow", "Sofa"), ("SoapBottle", "Cart"), ("SprayBottle", "Toilet"),
    ("Laptop", "ArmChair"), ("HandTowel", "GarbageCan"), ("Box", "ArmChair"), ("CD", "Dresser"),
    ("Fork", "Drawer"), ("Mug", "SideTable"),
)

# Receptacles that make no sensible pick target: ALFRED's toaster only takes bread slices.
_NO_PICK_TARGET = {"Toaster"}


@dataclass(frozen=True)
class TaskSpec:
    """One game to generate: its split and goal; ``index`` (with the seed) seeds its room."""

    split: str  # folder under json_2.1.1: "train" or "valid_unseen"
    task_type: str  # PICK or EXAMINE
    obj: str
    target: str  # the receptacle type (pick) or the lamp type (examine)
    index: int


@dataclass
class _Room:
    kind: str
    scene: int
    receptacles: list[tuple[str, str, str]] = field(default_factory=list)  # (id, type, location)
    objects: list[tuple[str, str, str, str]] = field(default_factory=list)  # (id, type, receptacle id, location)
    start: str = ""


def _mangle(text: str) -> str:
    """ALFRED's id escaping (PlannedGameState.fix_pddl_str_chars), which AlfredDemangler undoes."""
    for char, name in (("|", "_bar_"), ("+", "_plus_"), ("-", "_minus_"), (".", "_dot_"), (",", "_comma_")):
        text = text.replace(char, name)
    return text


def _can_contain(receptacle: str, obj: str) -> bool:
    return obj in alfred.VAL_RECEPTACLE_OBJECTS.get(receptacle, ())


def _pick_pairs() -> list[tuple[str, str]]:
    """Every plausible (object, receptacle type) pick goal over the four room kinds, sorted."""
    pairs = {
        (obj, recep)
        for room in ROOMS.values()
        for recep in room["receptacles"]
        if recep not in _NO_PICK_TARGET
        for obj in room["objects"]
        if _can_contain(recep, obj) and _room_kinds_for(obj, recep)
    }
    return sorted(pairs)


def _room_kinds_for(obj: str, recep: str) -> list[str]:
    """Room kinds holding ``recep`` and ``obj`` with somewhere else to put ``obj`` at the start."""
    kinds = []
    for kind, room in ROOMS.items():
        if recep in room["receptacles"] and obj in room["objects"]:
            if any(_can_contain(other, obj) for other in room["receptacles"] if other != recep):
                kinds.append(kind)
    return kinds


def plan_tasks(seed: int = 0, counts: dict[str, int] | None = None) -> list[TaskSpec]:
    """The task list of a generated set: which goal each game gets, before any room is drawn.

    Train pairs are the paper's pairs first, then others; unseen pairs come after the default train
    pool, so no unseen (object, receptacle) pair occurs in train, and smaller counts give a prefix of
    the default tasks.
    """
    counts = {**DEFAULT_COUNTS, **(counts or {})}
    rng = random.Random(f"{GENERATOR_VERSION}-tasks-{seed}")
    others = [p for p in _pick_pairs() if p not in PAPER_PICK_PAIRS]
    rng.shuffle(others)
    n_train, n_unseen = counts["pick_train"], counts["pick_unseen"]
    n_pool = max(n_train, DEFAULT_COUNTS["pick_train"]) - len(PAPER_PICK_PAIRS)
    train_pairs = (list(PAPER_PICK_PAIRS) + others[:n_pool])[:n_train]
    unseen_pairs = others[n_pool : n_pool + n_unseen]
    if len(unseen_pairs) < n_unseen:
        raise ValueError(f"only {len(others) - n_pool} plausible pick pairs left for {n_unseen} unseen tasks")

    examine_objects = sorted({obj for kind in EXAMINE_ROOMS for obj in ROOMS[kind]["objects"]})
    rng.shuffle(examine_objects)
    if counts["examine"] > len(examine_objects):
        raise ValueError(f"at most {len(examine_objects)} examine tasks (one per object type)")

    tasks = [TaskSpec("train", PICK, o, r, i) for i, (o, r) in enumerate(train_pairs)]
    tasks += [TaskSpec("valid_unseen", PICK, o, r, i) for i, (o, r) in enumerate(unseen_pairs)]
    tasks += [TaskSpec("train", EXAMINE, o, LAMP, i) for i, o in enumerate(examine_objects[: counts["examine"]])]
    return tasks


class _Coordinates:
    """Unique ALFRED-style positions ("+01.25|+00.90|-02.10") and navigation points."""

    def __init__(self, rng: random.Random) -> None:
        self.rng, self.used = rng, set()

    def point(self, near: tuple[float, float, float] | None = None) -> tuple[float, float, float]:
        while True:
            if near is None:
                xyz = (self.rng.uniform(-3, 3), self.rng.uniform(0, 2), self.rng.uniform(-3, 3))
            else:
                xyz = tuple(c + self.rng.uniform(-0.4, 0.4) for c in near)
            xyz = tuple(round(c, 2) for c in xyz)
            if xyz not in self.used:
                self.used.add(xyz)
                return xyz

    def location(self) -> str:
        while True:
            # ALFRED's navigation points: x, z on a grid, a rotation index and a camera horizon.
            rng = self.rng
            loc = (rng.randint(-9, 9), rng.randint(-9, 9), rng.randint(0, 3), rng.choice((0, 30, 45, 60)))
            if loc not in self.used:
                self.used.add(loc)
                return _mangle("loc|" + "|".join(str(v) for v in loc))


def _fmt(xyz: Iterable[float]) -> str:
    return "|".join(f"{c:+06.2f}" for c in xyz)


def _receptacle_id(rtype: str, xyz: tuple[float, float, float]) -> str:
    # ALFRED names basins after their sink or tub ("Sink|...|SinkBasin"); the demangler relies on it.
    if rtype.endswith("Basin"):
        return _mangle(f"{rtype[: -len('Basin')]}|{_fmt(xyz)}|{rtype}")
    return _mangle(f"{rtype}|{_fmt(xyz)}")


def _draw_room(spec: TaskSpec, rng: random.Random) -> _Room:
    if spec.task_type == PICK:
        kind = rng.choice(_room_kinds_for(spec.obj, spec.target))
        required = spec.target
    else:
        kind = rng.choice([k for k in EXAMINE_ROOMS if spec.obj in ROOMS[k]["objects"]])
        required = rng.choice([h for h in LAMP_HOLDERS if h in ROOMS[kind]["receptacles"]])
    layout = ROOMS[kind]
    room = _Room(kind=kind, scene=rng.choice(layout["scenes"]))
    coords = _Coordinates(rng)
    centres = {}
    for rtype, (low, high) in sorted(layout["receptacles"].items()):
        n = rng.randint(max(low, 1 if rtype == required else 0), high)
        for _ in range(n):
            xyz = coords.point()
            rid = _receptacle_id(rtype, xyz)
            centres[rid] = xyz
            room.receptacles.append((rid, rtype, coords.location()))
    room.start = coords.location()
    location = {rid: loc for rid, _, loc in room.receptacles}

    def place(otype: str, forbidden: set[str]) -> None:
        holders = [(rid, rt) for rid, rt, _ in room.receptacles if rt not in forbidden and _can_contain(rt, otype)]
        rid, _ = rng.choice(holders)
        oid = _mangle(f"{otype}|{_fmt(coords.point(near=centres[rid]))}")
        room.objects.append((oid, otype, rid, location[rid]))

    # The goal object never starts in a receptacle of the goal type, or the task would be solved at
    # reset; ALFRED also draws 1-3 copies of it (constants.PICKUP_REPEAT_MAX).
    forbidden = {spec.target} if spec.task_type == PICK else set()
    for _ in range(rng.randint(1, 3)):
        place(spec.obj, forbidden)
    if spec.task_type == EXAMINE:
        lamp_holder = rng.choice([rid for rid, rt, _ in room.receptacles if rt == required])
        lamp_id = _mangle(f"{LAMP}|{_fmt(coords.point(near=centres[lamp_holder]))}")
        room.objects.append((lamp_id, LAMP, lamp_holder, location[lamp_holder]))
    distractors = [o for o in layout["objects"] if o != spec.obj]
    for otype in rng.sample(distractors, k=min(len(distractors), rng.randint(5, 9))):
        if any(_can_contain(rt, otype) for _, rt, _ in room.receptacles):
            for _ in range(rng.randint(1, alfred.MAX_NUM_OF_OBJ_INSTANCES)):
                place(otype, forbidden if otype == spec.obj else set())
    return room


def _goal_pddl(spec: TaskSpec) -> str:
    if spec.task_type == PICK:
        goal = goal_library.gdict[PICK]["pddl"].format(obj=spec.obj, recep=spec.target, toggle="", mrecep="")
    else:
        goal = goal_library.gdict[EXAMINE]["pddl"].format(obj=spec.obj, recep="", toggle=spec.target, mrecep="")
    return goal.replace("#", "-")  # the library writes "?r # receptacle"; ALFRED swaps '#' for '-'


def _problem(spec: TaskSpec, room: _Room, name: str) -> str:
    rtypes = sorted({rt for _, rt, _ in room.receptacles})
    otypes = sorted({ot for _, ot, _, _ in room.objects})
    declarations = ["agent1 - agent"]
    declarations += [f"{t}Type - otype" for t in otypes] + [f"{t}Type - rtype" for t in rtypes]
    declarations += [f"{oid} - object" for oid, _, _, _ in room.objects]
    declarations += [f"{rid} - receptacle" for rid, _, _ in room.receptacles]
    declarations += [f"{loc} - location" for _, _, loc in room.receptacles] + [f"{room.start} - location"]

    facts = []
    for rid, rtype, loc in room.receptacles:
        facts += [f"(receptacleType {rid} {rtype}Type)", f"(receptacleAtLocation {rid} {loc})"]
        if rtype in alfred.OPENABLE_CLASS_SET:
            facts.append(f"(openable {rid})")
    for oid, otype, rid, loc in room.objects:
        facts += [f"(objectType {oid} {otype}Type)", f"(inReceptacle {oid} {rid})", f"(objectAtLocation {oid} {loc})"]
        lamp = otype in alfred.VAL_ACTION_OBJECTS["Toggleable"]
        facts.append(f"(toggleable {oid})" if lamp else f"(pickupable {oid})")
    facts += [f"(canContain {rt}Type {ot}Type)" for rt in rtypes for ot in otypes if _can_contain(rt, ot)]
    facts.append(f"(atLocation agent1 {room.start})")

    indent = "\n        "
    return (
        f"(define (problem {name})\n(:domain alfred)\n(:objects{indent}{indent.join(declarations)}\n        )\n"
        f"(:init{indent}{indent.join(facts)}\n        )\n{_goal_pddl(spec)}"
    )


def _traj_data(spec: TaskSpec, room: _Room, task_id: str, task_desc: str) -> dict:
    return {
        "task_id": task_id,
        "task_type": spec.task_type,
        "pddl_params": {
            "object_target": spec.obj,
            "parent_target": spec.target if spec.task_type == PICK else "",
            "mrecep_target": "",
            "toggle_target": spec.target if spec.task_type == EXAMINE else "",
            "object_sliced": False,
        },
        "scene": {"scene_num": room.scene, "room_kind": room.kind},
        "turk_annotations": {"anns": [{"task_desc": task_desc}]},
        "generator": {"name": "llmprior", "version": GENERATOR_VERSION},
    }


def _task_sentence(spec: TaskSpec, rng: random.Random) -> str:
    # What alfworld.agents.utils.misc.get_templated_task_desc writes, drawn from our rng rather than
    # the global `random` it uses, so that generation is reproducible.
    template = rng.choice(goal_library.gdict[spec.task_type]["templates"])
    target = spec.target.lower()
    return template.format(obj=spec.obj.lower(), recep=target, toggle=target, mrecep="")


def solve(game_file: str | os.PathLike, engine=None) -> list[str] | None:
    """Load a game in TextWorld and play the PDDL planner's plan; return the plan if it wins, else None."""
    engine = engine or _make_engine()
    try:
        engine.load(str(game_file))
        state = engine.reset()
        plan = engine.plan()
        for command in plan:
            state, _, _ = engine.step(command)
    except KeyError:  # Fast Downward's dummy task for a provably unreachable goal has no 'val1'
        return None
    return plan if plan and state["won"] else None


def _make_engine():
    # envs.alfworld imports this module; its engine is TextWorld's PddlEnv without the repeated parsing.
    from envs.alfworld_engine import make_engine

    return make_engine(cache_size=1)


def _write_game(spec: TaskSpec, seed: int, split_dir: Path, domain: str, grammar: str, engine) -> Path:
    for attempt in range(20):
        rng = random.Random(f"{GENERATOR_VERSION}-game-{seed}-{spec.split}-{spec.task_type}-{spec.index}-{attempt}")
        room = _draw_room(spec, rng)
        task_desc = _task_sentence(spec, rng)
        trial = f"trial_{GENERATOR_VERSION}_s{seed}_{spec.index:03d}"
        folder = split_dir / f"{spec.task_type}-{spec.obj}-None-{spec.target}-{room.scene}" / trial
        folder.mkdir(parents=True)
        game = {
            "pddl_domain": domain,
            "grammar": grammar.replace("UNKNOWN GOAL", task_desc),
            "pddl_problem": _problem(spec, room, f"plan_{trial}"),
            "solvable": None,
            "walkthrough": None,
        }
        game_file = folder / "game.tw-pddl"
        game_file.write_text(json.dumps(game))
        (folder / "traj_data.json").write_text(json.dumps(_traj_data(spec, room, trial, task_desc), indent=2))
        plan = solve(game_file, engine)
        if plan is not None:
            game["solvable"], game["walkthrough"] = True, plan
            game_file.write_text(json.dumps(game))
            return folder
        shutil.rmtree(folder)
    raise RuntimeError(f"could not generate a solvable game for {spec}")


def generate(out_dir: str | os.PathLike, seed: int = 0, counts: dict[str, int] | None = None) -> Path:
    """Write a generated game set to ``out_dir`` (which must not exist) atomically; return ``out_dir``.

    ``counts`` overrides DEFAULT_COUNTS (keys pick_train, pick_unseen, examine). The same seed and
    counts give byte-identical files.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists; generate() writes a fresh folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    from alfworld.info import ALFRED_PDDL_PATH, ALFRED_TWL2_PATH

    domain, grammar = Path(ALFRED_PDDL_PATH).read_text(), Path(ALFRED_TWL2_PATH).read_text()
    engine = _make_engine()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    specs = plan_tasks(seed, counts)
    start = last = time.perf_counter()
    try:
        for i, spec in enumerate(specs):
            _write_game(spec, seed, tmp / "json_2.1.1" / spec.split, domain, grammar, engine)
            if time.perf_counter() - last >= 30 or i == 0:  # each game is checked solvable: ~1 s
                last = time.perf_counter()
                print(f"generating ALFWorld games into {out_dir}: {i + 1}/{len(specs)}, "
                      f"{(last - start) / (i + 1) * (len(specs) - i - 1):.0f} s left", flush=True)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def cache_root() -> Path:
    return cache_dir() / "alfworld"


def default_games_dir(task_type: str, split: str, seed: int = 0) -> Path:
    """The cached default games of one (task type, split), generated on first use.

    Each of the three groups (pick train, pick unseen, examine) is its own ALFWORLD_DATA-style folder
    under ``<cache>/<version>-seed<seed>/``, so that a run on examine does not wait for 54 pick games.
    Another process may generate the same group at the same time: the loser of the rename drops its copy.
    """
    group = GROUPS.get((task_type, split))
    if group is None:
        have = ", ".join(f"{t} {s}" for t, s in GROUPS)
        raise ValueError(f"the generated ALFWorld set has no {task_type} {split} games (it has: {have}); "
                         f"pass data_dir= or set ALFWORLD_DATA for other splits")
    out_dir = cache_root() / f"{GENERATOR_VERSION}-seed{seed}" / group
    if not out_dir.exists():
        try:
            generate(out_dir, seed, {name: (DEFAULT_COUNTS[name] if name == group else 0) for name in DEFAULT_COUNTS})
        except OSError:
            if not out_dir.exists():
                raise
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="output folder (default: fill the cache used by envs.alfworld)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    outs = [generate(args.out, args.seed)] if args.out else [default_games_dir(t, s, args.seed) for t, s in GROUPS]
    for out in outs:
        n = sum(1 for _ in out.glob("json_2.1.1/*/*/*/game.tw-pddl"))
        print(f"{n} games in {out}")
    print(f"{time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
