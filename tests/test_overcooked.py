"""Text Overcooked: golden trajectories against /work/shared/specs/overcooked.md, word for word."""

import pytest

import envs
from envs.overcooked import OvercookedEnv

TOMATO_TASK = "Your task is to serve the dish of a bowl only containing chopped tomato."
SALAD_TASK = "Your task is to serve the dish of a bowl only containing chopped tomato and lettuce."
ONE_BOARD = "There is a fixed cutting board in the room."
TWO_BOARDS = "There are two fixed cutting boards in the room."
EMPTY_HANDS = "Currently you don't have anything in hand."

TOMATO_BASE = ["pick up the tomato", "take the bowl", "walk to the cutting board", "serve nothing", "chop nothing"]
TOMATO_CARRY_TOMATO = [
    "pick up the tomato", "take the bowl", "put the tomato on the cutting board", "serve the dish", "chop nothing"
]
TOMATO_AT_BOARD = [
    "pick up the tomato", "take the bowl", "walk to the cutting board", "serve nothing", "chop the tomato"
]
TOMATO_CARRY_BOWL = [
    "put the tomato in the bowl", "take the bowl", "put the bowl on the cutting board", "serve the dish", "chop nothing"
]

SALAD_BASE = [
    "pick up the tomato", "pick up the lettuce", "pick up the onion", "take the empty bowl",
    "walk to the first cutting board", "walk to the second cutting board", "serve nothing", "chop nothing",
]


def salad_actions(**slots):
    actions = list(SALAD_BASE)
    for index, text in slots.items():
        actions[int(index[1:])] = text
    return actions


def discounted(step_rewards):
    return sum(0.99**t * r for t, r in enumerate(step_rewards))


def walk(n):
    """Reward of a macro of n primitive steps with nothing but the step penalty."""
    return discounted([-0.001] * n)


# The spec's reference plan, measured on TWOSOME: (action, reward, primitive steps, observation, actions).
TOMATO_GOLDEN = [
    (
        "pick up the tomato", -0.00199, 2,
        f"{TOMATO_TASK} {ONE_BOARD} Currently you are carrying an unchopped tomato in hand.",
        TOMATO_CARRY_TOMATO,
    ),
    (
        "put the tomato on the cutting board", -0.00490099501, 5,
        f"{TOMATO_TASK} {ONE_BOARD} An unchopped tomato is on the cutting board. "
        "Currently you are standing in front of the cutting board without anything in hand.",
        TOMATO_AT_BOARD,
    ),
    (
        "chop the tomato", 0.1930499, 3,
        f"{TOMATO_TASK} {ONE_BOARD} A chopped tomato is on the cutting board. "
        "Currently you are standing in front of the cutting board without anything in hand.",
        TOMATO_AT_BOARD,  # "chop the tomato" stays on offer once the tomato is chopped
    ),
    (
        # The chopped tomato on the board is out of view from the bowl, and not mentioned.
        "take the bowl", -0.008648275251635909, 9,
        f"{TOMATO_TASK} {ONE_BOARD} Currently you are carrying a bowl in hand.",
        TOMATO_CARRY_BOWL,
    ),
    (
        "put the tomato in the bowl", -0.008648275251635909, 9,
        f"{TOMATO_TASK} {ONE_BOARD} Currently you are standing in front of the cutting board, "
        "carrying a bowl containing chopped tomato in hand.",
        TOMATO_CARRY_BOWL,
    ),
    (
        "serve the dish", 0.9771299, 3,
        f"{TOMATO_TASK} {ONE_BOARD} {EMPTY_HANDS}",
        TOMATO_BASE,
    ),
]

SALAD_GOLDEN = [
    (
        "pick up the tomato", walk(2), 2,
        f"{SALAD_TASK} {TWO_BOARDS} You notice a lettuce and an onion on the different tables. "
        "Currently you are carrying an unchopped tomato in hand.",
        salad_actions(
            s4="put the tomato on the first cutting board", s5="put the tomato on the second cutting board",
            s6="serve the dish",
        ),
    ),
    (
        "put the tomato on the first cutting board", walk(5), 5,
        f"{SALAD_TASK} {TWO_BOARDS} An unchopped tomato is on the first cutting board. "
        "Currently you are standing in front of the first cutting board without anything in hand.",
        salad_actions(s7="chop the tomato"),
    ),
    (
        "chop the tomato", discounted([-0.001, -0.001, 0.199]), 3,
        f"{SALAD_TASK} {TWO_BOARDS} A chopped tomato is on the first cutting board. "
        "Currently you are standing in front of the first cutting board without anything in hand.",
        salad_actions(s7="chop the tomato"),
    ),
    (
        "pick up the lettuce", walk(5), 5,
        f"{SALAD_TASK} {TWO_BOARDS} You notice an onion on the table. "
        "Currently you are carrying an unchopped lettuce in hand.",
        salad_actions(
            s4="put the lettuce on the first cutting board", s5="put the lettuce on the second cutting board",
            s6="serve the dish",
        ),
    ),
    (
        "put the lettuce on the second cutting board", walk(6), 6,
        f"{SALAD_TASK} {TWO_BOARDS} A chopped tomato is on the first cutting board. "
        "An unchopped lettuce is on the second cutting board. "
        "Currently you are standing in front of the second cutting board without anything in hand.",
        salad_actions(s7="chop the lettuce"),
    ),
    (
        "chop the lettuce", discounted([-0.001, -0.001, 0.199]), 3,
        f"{SALAD_TASK} {TWO_BOARDS} A chopped tomato is on the first cutting board. "
        "A chopped lettuce is on the second cutting board. "
        "Currently you are standing in front of the second cutting board without anything in hand.",
        salad_actions(s7="chop the lettuce"),
    ),
    (
        "take the empty bowl", walk(8), 8,
        f"{SALAD_TASK} {TWO_BOARDS} Currently you are carrying a bowl in hand.",
        salad_actions(
            s0="put the tomato in the bowl", s1="put the lettuce in the bowl", s2="put the onion in the bowl",
            s4="put the bowl on the first cutting board", s5="put the bowl on the second cutting board",
            s6="serve the dish",
        ),
    ),
    (
        "put the tomato in the bowl", walk(9), 9,
        f"{SALAD_TASK} {TWO_BOARDS} A chopped lettuce is on the second cutting board. "
        "Currently you are standing in front of the first cutting board, "
        "carrying a bowl containing chopped tomato in hand.",
        salad_actions(
            s0="put the tomato in the bowl", s1="put the lettuce in the bowl", s2="put the onion in the bowl",
            s3="take the bowl", s4="put the bowl on the first cutting board",
            s5="put the bowl on the second cutting board", s6="serve the dish",
        ),
    ),
    (
        "put the lettuce in the bowl", walk(2), 2,
        f"{SALAD_TASK} {TWO_BOARDS} Currently you are standing in front of the second cutting board, "
        "carrying a bowl containing chopped tomato and lettuce in hand.",
        salad_actions(
            s0="put the tomato in the bowl", s1="put the lettuce in the bowl", s2="put the onion in the bowl",
            s3="take the bowl", s4="put the bowl on the first cutting board",
            s5="put the bowl on the second cutting board", s6="serve the dish",
        ),
    ),
    (
        "serve the dish", discounted([-0.001, 0.999]), 2,
        f"{SALAD_TASK} {TWO_BOARDS} {EMPTY_HANDS}",
        SALAD_BASE,
    ),
]


def run_golden(env, golden):
    total_steps = 0
    for i, (action, reward, steps, obs, actions) in enumerate(golden):
        last = i == len(golden) - 1
        got_obs, got_reward, terminated, truncated, info = env.step(action)
        total_steps += steps
        assert got_obs == obs, action
        assert info["admissible_actions"] == actions, action
        assert got_reward == pytest.approx(reward, abs=1e-9), action
        assert info["primitive_steps"] == steps, action
        assert info["total_primitive_steps"] == total_steps
        assert (terminated, truncated, info["success"]) == (last, False, last), action


def test_tomato_golden_trajectory():
    env = envs.make("overcooked-tomato")
    obs, info = env.reset(seed=0)
    # The paper's App. 9.1 example, word for word.
    assert obs == f"{TOMATO_TASK} {ONE_BOARD} You notice a tomato on the table. {EMPTY_HANDS}"
    assert info["task"] == TOMATO_TASK
    assert info["admissible_actions"] == TOMATO_BASE
    assert (info["primitive_steps"], info["total_primitive_steps"], info["success"]) == (0, 0, False)
    run_golden(env, TOMATO_GOLDEN)


def test_salad_golden_trajectory():
    env = envs.make("overcooked-salad")
    obs, info = env.reset(seed=0)
    assert obs == (
        f"{SALAD_TASK} {TWO_BOARDS} You notice a tomato, a lettuce and an onion on the different tables. {EMPTY_HANDS}"
    )
    assert info["task"] == SALAD_TASK
    assert info["admissible_actions"] == SALAD_BASE
    run_golden(env, SALAD_GOLDEN)


def test_wrong_delivery_penalises_and_puts_the_food_back():
    env = envs.make("overcooked-tomato")
    env.reset(seed=0)
    env.step("pick up the tomato")
    obs, reward, terminated, truncated, info = env.step("serve the dish")
    assert reward == pytest.approx(-0.100941480149401, abs=1e-12)
    assert info["primitive_steps"] == 7
    assert (terminated, truncated, info["success"]) == (False, False, False)
    assert obs == f"{TOMATO_TASK} {ONE_BOARD} {EMPTY_HANDS}"
    world = env.world
    assert (world.holding, world.pos["tomato"], world.chops["tomato"]) == (None, (0, 5), 0)
    # The tomato is on its counter again: picking it up from the delivery takes the long walk back.
    _, reward, _, _, info = env.step("pick up the tomato")
    assert (info["primitive_steps"], reward) == (7, pytest.approx(walk(7)))


def test_wrong_bowl_goes_back_empty_and_the_chop_bonus_comes_again():
    env = envs.make("overcooked-salad")
    env.reset(seed=0)
    for action in ["pick up the tomato", "put the tomato on the first cutting board", "chop the tomato",
                   "pick up the lettuce", "put the lettuce on the second cutting board", "chop the lettuce",
                   "take the empty bowl", "put the tomato in the bowl"]:
        env.step(action)
    _, reward, terminated, _, info = env.step("serve the dish")  # tomato without lettuce
    assert reward == pytest.approx(discounted([-0.001, -0.001, -0.101]))
    assert not terminated and not info["success"]
    world = env.world
    assert world.pos["bowl"] == (6, 5) and world.in_bowl == frozenset()
    assert world.pos["tomato"] == (0, 5) and world.chops["tomato"] == 0
    # Only what was delivered goes back (as in TWOSOME): the chopped lettuce stays on its board.
    assert world.boards == [None, "lettuce"] and world.chops["lettuce"] == 3
    env.step("pick up the tomato")
    env.step("put the tomato on the first cutting board")
    _, reward, _, _, _ = env.step("chop the tomato")
    assert reward == pytest.approx(discounted([-0.001, -0.001, 0.199]))


def test_unchopped_tomato_is_not_picked_up_from_the_board():
    env = envs.make("overcooked-tomato")
    env.reset(seed=0)
    env.step("pick up the tomato")
    env.step("put the tomato on the cutting board")
    # Next to the board already: a one-step no-op.
    obs, reward, _, _, info = env.step("pick up the tomato")
    assert (info["primitive_steps"], reward) == (1, pytest.approx(-0.001))
    assert env.world.boards == ["tomato"] and env.world.holding is None
    # From afar: walks back and stops in front of the board, without bumping into it.
    env.step("take the bowl")
    obs, reward, _, _, info = env.step("put the tomato in the bowl")
    assert info["primitive_steps"] == 8 and env.world.agent == (1, 1)
    assert env.world.boards == ["tomato"] and env.world.holding == "bowl" and env.world.in_bowl == frozenset()
    assert obs == (
        f"{TOMATO_TASK} {ONE_BOARD} An unchopped tomato is on the cutting board. "
        "Currently you are standing in front of the cutting board, carrying a bowl in hand."
    )


def test_partial_observability_hides_the_bowl_from_the_start():
    env = envs.make("overcooked-tomato")
    obs, _ = env.reset(seed=0)
    assert "tomato" in obs.replace(TOMATO_TASK, "") and "bowl" not in obs.replace(TOMATO_TASK, "")
    obs, _, _, _, _ = env.step("serve nothing")  # to the front of the delivery, (3, 1): sees nothing movable
    assert obs == f"{TOMATO_TASK} {ONE_BOARD} {EMPTY_HANDS}"
    assert env.world.agent == (3, 1)


def test_navigation_goes_to_the_last_seen_position():
    env = envs.make("overcooked-tomato")
    env.reset(seed=0)
    assert env.world.memory == {"tomato": (0, 5), "bowl": (6, 5)}  # initial positions, seen or not
    env.step("take the bowl")
    env.step("put the bowl on the cutting board")
    obs, _, _, _, info = env.step("pick up the tomato")
    # The bowl on the board is out of view and not mentioned, but remembered there.
    assert obs == f"{TOMATO_TASK} {ONE_BOARD} Currently you are carrying an unchopped tomato in hand."
    assert env.world.memory["bowl"] == (1, 0)
    # With unchopped food in hand "take the bowl" walks to the board and stops in front of it.
    obs, _, _, _, info = env.step("take the bowl")
    assert info["primitive_steps"] == 5 and env.world.agent == (1, 1) and env.world.holding == "tomato"
    assert obs == (
        f"{TOMATO_TASK} {ONE_BOARD} A bowl is on the cutting board. "
        "Currently you are standing in front of the cutting board, carrying an unchopped tomato in hand."
    )


@pytest.mark.parametrize(("env_id", "macros"), [("overcooked-tomato", 6), ("overcooked-salad", 10)])
def test_expert_solves_from_reset(env_id, macros):
    env = envs.make(env_id)
    _, info = env.reset(seed=0)
    total, steps = 0.0, 0
    terminated = truncated = False
    while not (terminated or truncated):
        assert info["expert_action"] == env.expert_action() in info["admissible_actions"]
        _, reward, terminated, truncated, info = env.step(info["expert_action"])
        total += reward
        steps += 1
    assert terminated and not truncated and info["success"] and steps == macros
    assert total > 1.0  # +1 delivery and the +0.2 bonuses, less the step penalties
    assert info["expert_action"] is None and env.expert_action() is None


def test_tomato_expert_follows_the_reference_plan():
    env = envs.make("overcooked-tomato")
    _, info = env.reset(seed=0)
    for action, *_ in TOMATO_GOLDEN:
        assert info["expert_action"] == action
        _, _, _, _, info = env.step(action)


def test_expert_recovers_from_a_detour():
    env = envs.make("overcooked-salad")
    env.reset(seed=0)
    env.step("pick up the onion")
    _, _, _, _, info = env.step("put the onion on the first cutting board")
    for _ in range(60):
        _, _, terminated, truncated, info = env.step(info["expert_action"])
        if terminated or truncated:
            break
    assert terminated and info["success"]


def test_same_seed_same_episode():
    def episode(seed):
        env = envs.make("overcooked-salad")
        obs, info = env.reset(seed=seed)
        trace = [obs]
        for action in [0, 4, 7, 3, 0, 6, 1, 5, 7]:
            obs, reward, terminated, truncated, info = env.step(action)
            trace.append((obs, reward, terminated, truncated, info["primitive_steps"], info["admissible_actions"]))
        return trace

    assert episode(0) == episode(0) == episode(123)


def test_step_after_termination_raises():
    env = envs.make("overcooked-tomato")
    env.reset(seed=0)
    for action, *_ in TOMATO_GOLDEN:
        env.step(action)
    with pytest.raises(RuntimeError):
        env.step("pick up the tomato")
    env.reset(seed=0)  # and reset starts over
    assert env.step("pick up the tomato")[1] == pytest.approx(-0.00199)


def test_step_before_reset_raises():
    with pytest.raises(RuntimeError):
        OvercookedEnv("salad").step(0)


def test_non_admissible_action_names_the_admissible_ones():
    env = envs.make("overcooked-tomato")
    env.reset(seed=0)
    with pytest.raises(ValueError) as err:
        env.step("put the tomato in the bowl")  # offered only while holding the bowl
    for action in TOMATO_BASE:
        assert action in str(err.value)
    with pytest.raises(ValueError):
        env.step(5)


def test_integer_index_is_an_admissible_action():
    env = envs.make("overcooked-tomato")
    env.reset(seed=0)
    obs, reward, _, _, info = env.step(0)
    assert (obs, info["admissible_actions"]) == (TOMATO_GOLDEN[0][3], TOMATO_CARRY_TOMATO)
    obs, _, _, _, _ = env.step(2)  # now "put the tomato on the cutting board"
    assert obs == TOMATO_GOLDEN[1][3]


def test_macro_cap_truncates():
    for task, cap in [("tomato", 31), ("salad", 51)]:
        env = OvercookedEnv(task)
        env.reset(seed=0)
        for i in range(cap):
            _, reward, terminated, truncated, info = env.step("chop nothing")  # one "stay" step each
            assert (reward, info["primitive_steps"]) == (pytest.approx(-0.001), 1)
            assert (terminated, truncated) == (False, i == cap - 1)
        assert info["expert_action"] is None
    env = OvercookedEnv("tomato", max_macro_steps=2)
    env.reset(seed=0)
    assert env.step("chop nothing")[3] is False and env.step("chop nothing")[3] is True


def test_horizon_cuts_the_last_macro():
    env = OvercookedEnv("tomato", horizon=4)
    env.reset(seed=0)
    obs, reward, terminated, truncated, info = env.step("take the bowl")  # 6 steps uncut
    assert (terminated, truncated, info["primitive_steps"], info["total_primitive_steps"]) == (False, True, 4, 4)
    assert reward == pytest.approx(walk(4)) and env.world.holding is None
    env = OvercookedEnv("tomato", max_macro_steps=1000)
    env.reset(seed=0)
    for i in range(200):
        _, _, _, truncated, info = env.step("chop nothing")
        assert truncated == (i == 199)
    assert info["total_primitive_steps"] == 200


def test_render_shows_the_grid():
    env = envs.make("overcooked-tomato")
    env.reset(seed=0)
    assert env.render() == "\n".join(["#####T#", "K...A.#", "#.....#", "D.....#", "#.....#", "#.....#", "#####B#"])
