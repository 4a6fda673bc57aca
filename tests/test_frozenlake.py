import pytest

import envs
from envs.frozenlake import ACTIONS

START_OBS = (
    "You are in a 4x4 grid where each cell is either a frozen cell (F) indicating a safe position, You must avoid "
    "to reach a hole (H), and the goal (G) that we aim to reach. Input: Currently the agent is at position (0, 0), "
    "which direction need to take? Admissible actions: Go Left leads to position (0, 0), start position. "
    "Go Right leads to position (0, 1), a frozen cell (F). Go Up leads to position (0, 0), start position. "
    "Go Down leads to position (1, 0), a frozen cell (F)."
)


def test_start_text_is_the_papers():
    env = envs.make("frozenlake")
    obs, info = env.reset(seed=0)
    assert obs == START_OBS
    assert info["admissible_actions"] == ["Go Left", "Go Right", "Go Up", "Go Down"]
    assert info["task"]


def test_text_next_to_a_hole():
    # 4x4 map: SFFF / FHFH / FFFH / HFFG. From (1, 0) going right falls into the hole at (1, 1).
    env = envs.make("frozenlake")
    env.reset(seed=0)
    obs, reward, terminated, truncated, _ = env.step("Go Down")
    assert (reward, terminated, truncated) == (0.0, False, False)
    assert "Currently the agent is at position (1, 0)," in obs
    assert obs.endswith(
        "Go Left leads to position (1, 0), a frozen cell (F). Go Right leads to position (1, 1), a hole (H). "
        "Go Up leads to position (0, 0), start position. Go Down leads to position (2, 0), a frozen cell (F)."
    )
    obs, reward, terminated, truncated, info = env.step("Go Right")
    assert (reward, terminated, truncated, info["success"]) == (-1.0, True, False, False)


def test_goal_gives_plus_one():
    env = envs.make("frozenlake")
    env.reset(seed=0)
    for action in ["Go Down", "Go Down", "Go Right", "Go Right", "Go Down"]:
        _, reward, terminated, _, info = env.step(action)
        assert reward == 0.0 and not terminated
    obs, reward, terminated, truncated, info = env.step("Go Right")
    assert (reward, terminated, truncated, info["success"]) == (1.0, True, False, True)
    assert "position (3, 3)" in obs
    assert info["expert_action"] is None


@pytest.mark.parametrize("env_id, optimal_length", [("frozenlake", 6), ("frozenlake-8x8", 14)])
def test_expert_solves_the_map(env_id, optimal_length):
    env = envs.make(env_id)
    _, info = env.reset(seed=0)
    total, steps = 0.0, 0
    while True:
        _, reward, terminated, truncated, info = env.step(info["expert_action"])
        total, steps = total + reward, steps + 1
        if terminated or truncated:
            break
    assert (total, steps, info["success"]) == (1.0, optimal_length, True)


def test_truncation_at_horizon_and_step_after_end_raises():
    env = envs.make("frozenlake", max_steps=3)
    env.reset(seed=0)
    for i in range(3):
        _, _, terminated, truncated, _ = env.step("Go Left")
    assert (terminated, truncated) == (False, True)
    with pytest.raises(RuntimeError):
        env.step("Go Left")


def test_same_seed_same_episode():
    def rollout():
        env = envs.make("frozenlake-8x8")
        out = [env.reset(seed=3)[0]]
        for a in [1, 2, 2, 3, 0]:
            out.append(env.step(a)[0])
        return out

    assert rollout() == rollout()


def test_bad_action_and_index():
    env = envs.make("frozenlake")
    env.reset(seed=0)
    with pytest.raises(ValueError, match="Go Left"):
        env.step("go left please")
    with pytest.raises(ValueError, match="out of range"):
        env.step(4)
    obs, *_ = env.step(ACTIONS.index("Go Down"))
    assert "position (1, 0)" in obs


def test_random_map_is_seeded():
    a = envs.make("frozenlake", random_map_size=5, map_seed=7).desc
    b = envs.make("frozenlake", random_map_size=5, map_seed=7).desc
    assert a == b and len(a) == 5
    # Without map_seed the map is seed 0's, not a new one in each process.
    unseeded = envs.make("frozenlake", random_map_size=5).desc
    assert unseeded == envs.make("frozenlake", random_map_size=5, map_seed=0).desc
