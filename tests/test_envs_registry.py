import gymnasium as gym
import pytest

import envs


def test_unknown_env_id_lists_valid_ids():
    with pytest.raises(ValueError) as err:
        envs.make("overcooked-pasta")
    for env_id in ("overcooked-tomato", "overcooked-salad", "frozenlake", "frozenlake-8x8", "alfworld-pick"):
        assert env_id in str(err.value)


def test_gymnasium_registration():
    env = gym.make("llmprior/frozenlake-v0")
    obs, info = env.reset(seed=0)
    assert "position (0, 0)" in obs and info["admissible_actions"]


def test_step_before_reset_raises():
    with pytest.raises(RuntimeError):
        envs.make("frozenlake").step("Go Left")
