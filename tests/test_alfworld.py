"""ALFWorld adapter: real engine, generated and hand-written games in the dataset's layout."""

import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT

pytest.importorskip("alfworld")
pytest.importorskip("fast_downward")

import alfworld.gen.goal_library as goal_library  # noqa: E402
import textworld  # noqa: E402
from alfworld.agents.environment.alfred_tw_env import AlfredDemangler  # noqa: E402
from alfworld.agents.utils.misc import add_task_to_grammar  # noqa: E402
from alfworld.info import ALFRED_PDDL_PATH, ALFRED_TWL2_PATH  # noqa: E402
from textworld.envs import PddlEnv  # noqa: E402

import envs  # noqa: E402
from envs import alfworld_gen  # noqa: E402
from envs.alfworld import ALFWorldEnv, find_games  # noqa: E402

SMALL = {"pick_train": 2, "pick_unseen": 2, "examine": 1}
INTRO = "You are in the middle of a room. Looking quickly around you, you see"


@pytest.fixture(scope="module")
def games_dir(tmp_path_factory):
    return alfworld_gen.generate(tmp_path_factory.mktemp("alfworld") / "data", seed=0, counts=SMALL)


def play_expert(env, **reset_kwargs):
    obs, info = env.reset(**reset_kwargs)
    terminated = truncated = False
    reward, steps = 0.0, 0
    while not (terminated or truncated):
        assert info["expert_action"] in info["admissible_actions"]
        obs, reward, terminated, truncated, info = env.step(info["expert_action"])
        steps += 1
    return reward, terminated, truncated, info, steps


@pytest.mark.parametrize("task", ["pick", "examine"])
def test_expert_solves_generated_games(games_dir, task):
    env = envs.make(f"alfworld-{task}", data_dir=games_dir, expert=True)
    for index in range(env.num_games):
        reward, terminated, truncated, info, steps = play_expert(env, options={"game_index": index})
        assert reward == 1.0 and terminated and not truncated
        assert info["won"] and info["success"] and info["expert_action"] is None
        walkthrough = json.loads(Path(info["game_file"]).read_text())["walkthrough"]
        assert steps == len(walkthrough)


def test_reset_observation_and_go_to_every_receptacle(games_dir):
    env = ALFWorldEnv("pick", data_dir=games_dir)
    obs, info = env.reset(seed=0)
    assert obs.startswith(INTRO) and "Your task is to: " in obs and "Welcome" not in obs
    assert info["task"] == obs.split("Your task is to: ")[1] and info["task"].endswith(".")
    seen = obs[len(INTRO) :].split(".\n\nYour task")[0].replace(", and ", ", ").split(", ")
    receptacles = [item.strip().removeprefix("a ").removeprefix("an ") for item in seen]
    problem = json.loads(Path(info["game_file"]).read_text())["pddl_problem"]
    assert len(receptacles) == problem.split("(:init")[0].count(" - receptacle")
    for receptacle in receptacles:
        assert f"go to {receptacle}" in info["admissible_actions"]
    assert info["admissible_actions"] == sorted(info["admissible_actions"])
    assert info["expert_action"] is None  # expert=False by default
    assert env.expert_action() in info["admissible_actions"]  # but available on demand


def write_game(folder: Path, problem: str, traj_data: dict, solvable=True) -> Path:
    folder.mkdir(parents=True)
    grammar = add_task_to_grammar(Path(ALFRED_TWL2_PATH).read_text(), traj_data, goal_desc_human_anns_prob=1.0)
    game = {"pddl_domain": Path(ALFRED_PDDL_PATH).read_text(), "grammar": grammar, "pddl_problem": problem}
    if solvable is not None:
        game["solvable"] = solvable
    (folder / "game.tw-pddl").write_text(json.dumps(game))
    (folder / "traj_data.json").write_text(json.dumps(traj_data))
    return folder / "game.tw-pddl"


def _id(name, x, y, z):
    return f"{name}|{x:+06.2f}|{y:+06.2f}|{z:+06.2f}".replace("|", "_bar_").replace("+", "_plus_").replace(
        "-", "_minus_"
    ).replace(".", "_dot_")


def handwritten_pick_problem() -> str:
    """The problem of specs/alfworld.md: a bedroom where the cellphone is on sidetable 1."""
    receptacles = [("ArmChair", 1), ("Bed", 2), ("SideTable", 3), ("SideTable", 4), ("Drawer", 5), ("Drawer", 6),
                   ("GarbageCan", 7)]
    objects = [("CellPhone", 4), ("Book", 2), ("CD", 5), ("KeyChain", 3)]  # (type, index of its receptacle)
    rids = {i: _id(name, i, 0.5, -i) for name, i in receptacles}
    lines = ["agent1 - agent", "loc_bar_0_bar_0_bar_0_bar_0 - location"]
    facts = ["(atLocation agent1 loc_bar_0_bar_0_bar_0_bar_0)"]
    for name, i in receptacles:
        lines += [f"{rids[i]} - receptacle", f"loc_bar_{i}_bar_1_bar_2_bar_30 - location", f"{name}Type - rtype"]
        facts += [f"(receptacleType {rids[i]} {name}Type)",
                  f"(receptacleAtLocation {rids[i]} loc_bar_{i}_bar_1_bar_2_bar_30)"]
        if name == "Drawer":
            facts.append(f"(openable {rids[i]})")
    for k, (name, i) in enumerate(objects):
        oid = _id(name, i + 0.25, 0.75, k)
        lines += [f"{oid} - object", f"{name}Type - otype"]
        facts += [f"(objectType {oid} {name}Type)", f"(pickupable {oid})", f"(inReceptacle {oid} {rids[i]})",
                  f"(objectAtLocation {oid} loc_bar_{i}_bar_1_bar_2_bar_30)"]
        facts += [f"(canContain {r}Type {name}Type)" for r in ("ArmChair", "Bed", "SideTable", "Drawer", "GarbageCan")]
    goal = ("(:goal (exists (?r - receptacle) (exists (?o - object) (and (inReceptacle ?o ?r) "
            "(objectType ?o CellPhoneType) (receptacleType ?r ArmChairType)))))")
    lines = list(dict.fromkeys(lines))
    return (f"(define (problem handwritten)\n(:domain alfred)\n(:objects\n{chr(10).join(lines)}\n)\n"
            f"(:init\n{chr(10).join(dict.fromkeys(facts))}\n)\n{goal}\n)")


def traj(task_type, obj, parent="", toggle="", desc="put a cellphone in armchair"):
    return {
        "task_type": task_type,
        "pddl_params": {"object_target": obj, "parent_target": parent, "mrecep_target": "",
                        "toggle_target": toggle, "object_sliced": False},
        "turk_annotations": {"anns": [{"task_desc": desc}]},
    }


def test_handwritten_game_matches_spec_word_for_word(tmp_path):
    folder = tmp_path / "json_2.1.1" / "train" / "pick_and_place_simple-CellPhone-None-ArmChair-301" / "trial_T1"
    write_game(folder, handwritten_pick_problem(), traj("pick_and_place_simple", "CellPhone", "ArmChair"))
    env = ALFWorldEnv("pick", data_dir=tmp_path, expert=True)
    obs, info = env.reset(seed=0)
    assert obs == (
        "You are in the middle of a room. Looking quickly around you, you see a armchair 1, a bed 1, a drawer 2, "
        "a drawer 1, a garbagecan 1, a sidetable 2, and a sidetable 1.\n\nYour task is to: put a cellphone in armchair."
    )
    assert info["task"] == "put a cellphone in armchair."
    plan = ["go to sidetable 1", "take cellphone 1 from sidetable 1", "go to armchair 1",
            "move cellphone 1 to armchair 1"]
    feedback = []
    for action in plan:
        assert info["expert_action"] == action
        obs, reward, terminated, truncated, info = env.step(action)
        feedback.append(obs)
    assert feedback[0] == "You arrive at sidetable 1. On the sidetable 1, you see a cellphone 1."
    assert feedback[-1] == "You move the cellphone 1 to the armchair 1."
    assert (reward, terminated, truncated, info["won"]) == (1.0, True, False, True)


def copy_game(src_game: Path, dst_folder: Path, solvable="keep") -> Path:
    shutil.copytree(src_game.parent, dst_folder)
    if solvable != "keep":
        game = json.loads((dst_folder / "game.tw-pddl").read_text())
        if solvable is None:
            del game["solvable"]
        else:
            game["solvable"] = solvable
        (dst_folder / "game.tw-pddl").write_text(json.dumps(game))
    return dst_folder / "game.tw-pddl"


def test_dataset_layout_goes_through_the_real_data_path(games_dir, tmp_path, monkeypatch):
    """Mimic alfworld-download's tree, with every kind of trajectory ALFWorld's loader skips."""
    pick = [Path(f) for f in find_games(games_dir, "train", "pick")]
    examine = [Path(f) for f in find_games(games_dir, "train", "examine")]
    unseen = [Path(f) for f in find_games(games_dir, "unseen", "pick")]
    train_dir, unseen_dir = tmp_path / "json_2.1.1" / "train", tmp_path / "json_2.1.1" / "valid_unseen"
    expected_pick = [
        copy_game(pick[1], train_dir / "pick_and_place_simple-A-None-B-10" / "trial_T2"),
        copy_game(pick[0], train_dir / "pick_and_place_simple-A-None-B-10" / "trial_T1"),
        copy_game(pick[0], train_dir / "pick_and_place_simple-C-None-D-2" / "trial_T1"),
    ]
    expected_examine = [copy_game(examine[0], train_dir / "look_at_obj_in_light-E-None-DeskLamp-301" / "trial_T1")]
    expected_unseen = [copy_game(unseen[0], unseen_dir / "pick_and_place_simple-F-None-G-3" / "trial_T1")]
    copy_game(pick[0], train_dir / "pick_and_place_with_movable_recep-A-Bowl-B-10" / "trial_T1")
    copy_game(pick[0], train_dir / "pick_and_place_simple-AppleSliced-None-B-10" / "trial_T1")
    copy_game(pick[0], train_dir / "pick_and_place_simple-H-None-B-10" / "trial_unsolvable", solvable=False)
    copy_game(pick[0], train_dir / "pick_and_place_simple-H-None-B-10" / "trial_unchecked", solvable=None)
    no_game = train_dir / "pick_and_place_simple-H-None-B-10" / "trial_no_game"
    copy_game(pick[0], no_game).unlink()

    env = ALFWorldEnv("pick", split="train", data_dir=tmp_path)
    assert env.game_files == sorted(str(p) for p in expected_pick) and env.num_games == 3
    assert ALFWorldEnv("examine", split="train", data_dir=tmp_path).game_files == [str(expected_examine[0])]
    assert ALFWorldEnv("pick", split="valid_unseen", data_dir=tmp_path).game_files == [str(expected_unseen[0])]

    monkeypatch.setenv("ALFWORLD_DATA", str(tmp_path))
    env = envs.make("alfworld-pick", split="unseen")
    assert env.game_files == [str(expected_unseen[0])]
    assert play_expert(ALFWorldEnv("pick", split="unseen", expert=True), seed=3)[0] == 1.0


def pick_pairs(env):
    pairs = set()
    for game_file in env.game_files:
        params = json.loads((Path(game_file).parent / "traj_data.json").read_text())["pddl_params"]
        pairs.add((params["object_target"], params["parent_target"]))
    return pairs


def test_unseen_shares_no_goal_pair_with_train(games_dir):
    train = pick_pairs(ALFWorldEnv("pick", split="train", data_dir=games_dir))
    unseen = pick_pairs(ALFWorldEnv("pick", split="unseen", data_dir=games_dir))
    assert len(train) == SMALL["pick_train"] and len(unseen) == SMALL["pick_unseen"] and not train & unseen

    tasks = alfworld_gen.plan_tasks(seed=0)  # the default set, without building it
    by_split = {}
    for t in tasks:
        by_split.setdefault((t.task_type, t.split), []).append((t.obj, t.target))
    full_train = by_split[(alfworld_gen.PICK, "train")]
    full_unseen = by_split[(alfworld_gen.PICK, "valid_unseen")]
    assert (len(full_train), len(full_unseen), len(by_split[(alfworld_gen.EXAMINE, "train")])) == (28, 26, 11)
    assert not set(full_train) & set(full_unseen) and len(set(full_unseen)) == 26
    assert set(alfworld_gen.PAPER_PICK_PAIRS) <= set(full_train)
    assert all(t in tasks for t in alfworld_gen.plan_tasks(seed=0, counts=SMALL))  # small sets are prefixes


def test_bad_data_dir_gives_clear_errors(tmp_path, games_dir):
    with pytest.raises(FileNotFoundError, match=r"missing does not exist; .*alfworld-download: <data_dir>/json_2"):
        ALFWorldEnv("pick", data_dir=tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="has no json_2.1.1 folder"):
        ALFWorldEnv("pick", data_dir=tmp_path)
    (tmp_path / "json_2.1.1" / "train" / "some_task" / "trial").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="valid_unseen"):
        ALFWorldEnv("pick", split="unseen", data_dir=tmp_path)
    with pytest.raises(ValueError, match="no solvable pick_and_place_simple games"):
        ALFWorldEnv("pick", data_dir=tmp_path)
    (tmp_path / "json_2.1.1" / "train" / "some_task" / "trial" / "traj_data.json").write_text("{not json")
    with pytest.raises(ValueError, match="malformed ALFWorld file .*traj_data.json"):
        ALFWorldEnv("pick", data_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown ALFWorld split"):
        ALFWorldEnv("pick", split="test", data_dir=games_dir)
    with pytest.raises(ValueError, match="no solvable look_at_obj_in_light games"):
        ALFWorldEnv("examine", split="unseen", data_dir=games_dir)  # the generated set has no examine unseen


def test_generation_is_seeded_and_deterministic(tmp_path):
    one = {"pick_train": 1, "pick_unseen": 0, "examine": 0}

    def files(root):
        return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    a = files(alfworld_gen.generate(tmp_path / "a", seed=5, counts=one))
    b = files(alfworld_gen.generate(tmp_path / "b", seed=5, counts=one))
    c = files(alfworld_gen.generate(tmp_path / "c", seed=6, counts=one))
    assert a == b and len(a) == 2 and a != c
    game = json.loads(next(v for k, v in a.items() if k.name == "game.tw-pddl"))
    assert game["solvable"] is True and game["walkthrough"]
    assert "(canContain ArmChairType CellPhoneType)" in game["pddl_problem"]


def test_default_generated_set_is_cached(tmp_path, monkeypatch):
    monkeypatch.delenv("ALFWORLD_DATA", raising=False)
    monkeypatch.setenv("LLMPRIOR_CACHE", str(tmp_path))
    monkeypatch.setattr(alfworld_gen, "DEFAULT_COUNTS", {"pick_train": 1, "pick_unseen": 1, "examine": 1})
    sets = tmp_path / "alfworld" / f"{alfworld_gen.GENERATOR_VERSION}-seed0"
    env = envs.make("alfworld-examine")
    assert env.data_dir == sets / "examine" and env.num_games == 1
    assert [p.name for p in sets.iterdir()] == ["examine"]  # only the group asked for is generated
    assert envs.make("alfworld-pick", split="unseen").data_dir == sets / "pick_unseen"

    def no_regeneration(*args, **kwargs):
        raise AssertionError("the cached set was generated again")

    monkeypatch.setattr(alfworld_gen, "generate", no_regeneration)
    assert envs.make("alfworld-examine").num_games == 1
    assert sorted(p.name for p in sets.iterdir()) == ["examine", "pick_unseen"]  # no temporary folder left
    with pytest.raises(ValueError, match="no look_at_obj_in_light valid_unseen games"):
        envs.make("alfworld-examine", split="unseen")


def test_episode_order_truncation_and_action_checks(games_dir):
    env = ALFWorldEnv("pick", split="unseen", data_dir=games_dir, max_steps=3)
    first = [env.reset(seed=7)[1]["game_index"]] + [env.reset()[1]["game_index"] for _ in range(env.num_games - 1)]
    assert sorted(first) == list(range(env.num_games))
    assert env.reset(seed=7)[1]["game_index"] == first[0]
    assert env.reset(options={"game_index": 1})[1]["game_file"] == env.game_files[1]

    with pytest.raises(ValueError, match="not admissible"):
        env.step("fly to the moon")
    for step in range(3):
        obs, reward, terminated, truncated, info = env.step("look")
        assert reward == 0.0 and not terminated and truncated == (step == 2)
    with pytest.raises(RuntimeError):
        env.step("look")
    obs, info = env.reset()
    assert env.step(info["admissible_actions"].index("inventory"))[0] == "You are not carrying anything."


def test_engine_matches_textworld_stock_engine(games_dir):
    """Caching the parsed game and the grammar's parses must not change a word of TextWorld's text."""
    env = ALFWorldEnv("pick", data_dir=games_dir)
    stock = AlfredDemangler(PddlEnv(textworld.EnvInfos(won=True, admissible_commands=True)))
    rng = random.Random(0)
    for index in range(env.num_games):
        obs, info = env.reset(options={"game_index": index})
        stock.load(info["game_file"])
        state = stock.reset()
        for _ in range(8):
            assert state["admissible_commands"] == info["admissible_actions"]
            assert state.feedback.replace("-= Welcome to TextWorld, ALFRED! =-", "").strip() == obs
            env.expert_action()  # planning must leave the game state alone
            action = rng.choice(info["admissible_actions"])
            obs, _, _, _, info = env.step(action)
            state, _, _ = stock.step(action)


def real_layout_with_task_alternatives(games_dir: Path, root: Path) -> Path:
    """The generated pick games (train and unseen) in one train split of alfworld-download's tree, each grammar's
    #task# rule holding every templated wording of its task ("put a cellphone in armchair.", "put some cellphone on
    armchair."): text that a drawn rule would vary."""
    for k, game_file in enumerate(find_games(games_dir, "train", "pick") + find_games(games_dir, "unseen", "pick")):
        params = json.loads((Path(game_file).parent / "traj_data.json").read_text())["pddl_params"]
        task_folder = f"pick_and_place_simple-{params['object_target']}-None-{params['parent_target']}-{k}"
        folder = root / "json_2.1.1" / "train" / task_folder / "trial_T1"
        copy_game(Path(game_file), folder)
        wordings = [t.format(obj=params["object_target"].lower(), recep=params["parent_target"].lower(), toggle="",
                             mrecep="") for t in goal_library.gdict[alfworld_gen.PICK]["templates"]]
        rules = ", ".join(json.dumps({"rhs": f"Your task is to: {w}."}) for w in wordings)
        game = json.loads((folder / "game.tw-pddl").read_text())
        game["grammar"], n = re.subn(r'\{\s*"rhs": "Your task is to: [^"]*"\s*\}', rules, game["grammar"])
        assert n == 1 and len(wordings) > 1
        (folder / "game.tw-pddl").write_text(json.dumps(game))
    return root


PLAY_SEEDED_EPISODES = """
import json, random, sys
from envs.alfworld import ALFWorldEnv
env, rng, record = ALFWorldEnv("pick", data_dir=sys.argv[1]), random.Random(0), []
for episode in range(env.num_games + 2):
    obs, info = env.reset(seed=3 if episode == 0 else None)
    record.append([info["game_file"], obs, info["task"], info["admissible_actions"]])
    for _ in range(3):
        obs, _, _, _, info = env.step(rng.choice(info["admissible_actions"]))
        record.append([obs, info["admissible_actions"]])
print(json.dumps(record))
"""


def test_same_seed_same_text_in_every_process(games_dir, tmp_path):
    """reset(seed=s) and the episodes after it must read the same in any process: the prior's caches, the
    Q-network's inputs and the offline datasets are keyed by this text."""
    data_dir = real_layout_with_task_alternatives(games_dir, tmp_path)
    records = []
    for hash_seed in ("0", "1", "random"):
        out = subprocess.run(
            [sys.executable, "-c", PLAY_SEEDED_EPISODES, str(data_dir)], cwd=ROOT, capture_output=True, text=True,
            timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": hash_seed},
        )
        assert out.returncode == 0, out.stderr
        records.append(json.loads(out.stdout))
    assert records[1] == records[0] and records[2] == records[0]
    episodes = [r for r in records[0] if len(r) == 4]
    assert len({game_file for game_file, *_ in episodes}) == 4  # every game was played
    for game_file, obs, task, _ in episodes:
        # TextWorld takes a symbol's first applicable rule: the first wording, whatever the process
        params = json.loads((Path(game_file).parent / "traj_data.json").read_text())["pddl_params"]
        assert task == f"put a {params['object_target'].lower()} in {params['parent_target'].lower()}."
        assert obs.endswith(f"Your task is to: {task}")


def test_cli_runs_expert_and_random_agents(games_dir):
    for agent, max_steps, expected in (("expert", "61", "success 1/1"), ("random", "5", "episode 0:")):
        out = subprocess.run(
            [sys.executable, "-m", "envs.alfworld", "--task", "examine", "--agent", agent, "--episodes", "1",
             "--max-steps", max_steps, "--data-dir", str(games_dir)],
            cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert out.returncode == 0, out.stderr
        assert expected in out.stdout and "steps/s" in out.stdout
