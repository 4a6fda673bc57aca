"""Text BabyAI ("go to the red ball", horizon 30): GLAM's phrases word for word, rewards, horizon, expert."""

import gymnasium as gym
import pytest
from minigrid.core.world_object import Ball, Box, Door, Key

import envs
from envs.babyai import ACTIONS, describe

SEED0_OBS = (
    "You see a wall 6 steps forward, You see a wall 2 steps left, You see a purple key 1 step left and 2 steps "
    "forward, You see a yellow key 1 step left and 1 step forward, You see a grey ball 1 step right and 5 steps "
    "forward, You see a blue key 1 step right and 2 steps forward, You see a grey ball 1 step right and 1 step "
    "forward, You see a green key 2 steps right and 4 steps forward, You see a red box 2 steps right and 2 steps "
    "forward, You see a red ball 3 steps right and 4 steps forward"
)


def test_start_text_and_info():
    env = envs.make("babyai-gotoredball")
    obs, info = env.reset(seed=0)
    assert obs == SEED0_OBS
    assert info["admissible_actions"] == ["turn left", "turn right", "go forward", "pick up", "drop", "toggle"]
    assert info["task"] == "go to the red ball" and info["expert_action"] == "turn right" and not info["success"]


def test_phrases_on_a_hand_made_room():
    """The agent at the bottom of an emptied 8x8 room facing up (its 7x7 view spans columns 0-6: the right wall is
    out of sight); every phrase form, in GLAM's order."""
    env = envs.make("babyai-gotoredball")
    env.reset(seed=0)
    grid = env.env.grid
    for x in range(1, 7):
        for y in range(1, 7):
            grid.set(x, y, None)
    grid.set(3, 4, Ball("red"))  # straight ahead: hides the wall in front
    grid.set(1, 6, Key("green"))  # on the agent's row, to the left: hides the wall on the left
    grid.set(4, 5, Ball("yellow"))
    grid.set(5, 3, Door("blue", is_open=False, is_locked=True))
    grid.set(6, 1, Door("grey", is_open=True))
    env.env.agent_pos, env.env.agent_dir = (3, 6), 3
    env.env.carrying = Box("purple")
    assert describe(env.env.gen_obs()["image"], env.env.carrying) == [
        "You carry a purple box",
        "You see a green key 2 steps left",
        "You see a red ball 2 steps forward",
        "You see a yellow ball 1 step right and 1 step forward",
        "You see a locked blue door 2 steps right and 3 steps forward",
        "You see an open grey door 3 steps right and 5 steps forward",
    ]
    grid.set(3, 4, None)
    grid.set(1, 6, None)
    env.env.carrying = None
    assert describe(env.env.gen_obs()["image"])[:3] == [
        "You see a wall 6 steps forward",
        "You see a wall 3 steps left",
        "You see a yellow ball 1 step right and 1 step forward",
    ]
    grid.set(4, 5, None)
    env.env.agent_pos = (4, 6)  # the right wall comes into view, the left one leaves it
    phrases = describe(env.env.gen_obs()["image"])
    assert phrases[:2] == ["You see a wall 6 steps forward", "You see a wall 3 steps right"]


def test_expert_reaches_the_red_ball_and_the_reward_is_minigrids():
    env = envs.make("babyai-gotoredball")
    for seed in range(20):
        _, info = env.reset(seed=seed)
        steps = 0
        while True:
            _, reward, terminated, truncated, info = env.step(info["expert_action"])
            steps += 1
            if terminated or truncated:
                break
        assert terminated and info["success"] and info["expert_action"] is None
        assert reward == pytest.approx(1 - 0.9 * steps / 30)


def test_reward_scale_gives_glams_shaping():
    env = envs.make("babyai-gotoredball", reward_scale=20.0)
    _, info = env.reset(seed=0)
    steps = 0
    while True:
        _, reward, terminated, truncated, info = env.step(info["expert_action"])
        steps += 1
        if terminated or truncated:
            break
    assert reward == pytest.approx(20 * (1 - 0.9 * steps / 30))


def test_horizon_30_truncates_without_reward_and_then_refuses_steps():
    env = envs.make("babyai-gotoredball")
    env.reset(seed=0)
    for i in range(30):
        _, reward, terminated, truncated, info = env.step("turn left")
        assert reward == 0.0 and not terminated
    assert truncated and not info["success"]
    with pytest.raises(RuntimeError):
        env.step("turn left")


def test_actions_by_string_or_index_and_bad_action():
    env = envs.make("babyai-gotoredball")
    env.reset(seed=0)
    obs_a = env.step("turn right")[0]
    env.reset(seed=0)
    assert env.step(ACTIONS.index("turn right"))[0] == obs_a
    with pytest.raises(ValueError, match="admissible"):
        env.step("done")


def test_same_seed_same_episode_and_gymnasium_id():
    def rollout(env):
        out = [env.reset(seed=5)[0]]
        for a in ["go forward", "turn left", "go forward", "pick up"]:
            out.append(env.step(a)[0])
        return out

    assert rollout(envs.make("babyai-gotoredball")) == rollout(envs.make("babyai-gotoredball"))
    assert "babyai-gotoredball" in envs.ENV_IDS
    obs, info = gym.make("llmprior/babyai-gotoredball-v0").reset(seed=0)
    assert obs == SEED0_OBS and info["task"] == "go to the red ball"
