"""envs.make / envs.make_env: registered ids, keyword arguments, `module:Class` and gymnasium ids, and the protocol
check of an env from elsewhere (docs/envs.md), each failure one line that names what to fix."""

import sys
import textwrap

import gymnasium as gym
import pytest

import envs
from envs.core import GameOrder
from llmprior.runs import file_name


def test_unknown_env_id_lists_valid_ids():
    with pytest.raises(ValueError) as err:
        envs.make("overcooked-pasta")
    for env_id in ("overcooked-tomato", "overcooked-salad", "frozenlake", "frozenlake-8x8", "alfworld-pick",
                   "textworld-coin", "textworld-treasure", "textworld-cooking"):  # fmt: skip
        assert env_id in str(err.value)
    assert str(err.value).startswith("overcooked-pasta: unknown")


def test_gymnasium_registration():
    env = gym.make("llmprior/frozenlake-v0")
    obs, info = env.reset(seed=0)
    assert "position (0, 0)" in obs and info["admissible_actions"]


def test_step_before_reset_raises():
    with pytest.raises(RuntimeError):
        envs.make("frozenlake").step("Go Left")


def test_keywords_are_python_literals_else_text():
    assert envs.parse("textworld-coin,level=5") == ("textworld-coin", {"level": 5})
    assert envs.parse(" mod.sub:MyEnv , size=4, name=big,flag=True, path=/data/x ") == (
        "mod.sub:MyEnv", {"size": 4, "name": "big", "flag": True, "path": "/data/x"})  # fmt: skip
    # a comma not followed by `name=` belongs to the value
    assert envs.parse("frozenlake,desc=['SF', 'FG'],max_steps=9") == ("frozenlake", {"desc": ["SF", "FG"],
                                                                                      "max_steps": 9})
    assert envs.parse("llmprior/overcooked-salad-v0,horizon=30") == ("overcooked-salad", {"horizon": 30})
    for bad in ("", ",max_steps=5", "overcooked-tomato,5", "textworld-coin,level=5,level=6"):
        with pytest.raises(envs.EnvSpecError):
            envs.parse(bad)


def test_registered_id_is_what_the_prompts_key_on():
    assert envs.registered_id("overcooked-salad,horizon=30") == "overcooked-salad"
    assert envs.registered_id("llmprior/alfworld-pick-v0") == "alfworld-pick"
    # an env from elsewhere gets the generic prompt, whatever its name starts with
    for foreign in ("alfworld_fork:Env", "overcooked2:Kitchen,size=3", "CartPole-v1", "nope", ",bad"):
        assert envs.registered_id(foreign) == ""


def test_keywords_reach_the_constructor_and_override_defaults():
    env = envs.make_env("frozenlake,map_name='8x8',max_steps=7")
    assert env.max_steps == 7 and env.nrow == 8
    assert envs.make("frozenlake,max_steps=7", max_steps=3).max_steps == 3  # an argument beats the spec
    assert envs.make_env("llmprior/frozenlake-v0").max_steps == envs.make("frozenlake").max_steps


@pytest.mark.parametrize("spec, message", [
    ("nope", "nope: unknown; one of overcooked-tomato"),
    ("no_such_module_xyz:Env", "cannot import 'no_such_module_xyz'"),
    ("json:NoSuchClass", "module 'json' has no class 'NoSuchClass'"),
    ("nobody/Nothing-v0", "no gymnasium id 'nobody/Nothing-v0' is registered; name the module"),
    ("frozenlake,bogus=1", "TypeError: FrozenLakeTextEnv.__init__() got an unexpected keyword argument 'bogus'"),
    ("overcooked-tomato,task='pasta'", "ValueError: unknown Overcooked task 'pasta'"),
    ("CartPole-v1", "reset() returned a ndarray observation; the protocol's are strings"),
])  # fmt: skip
def test_a_spec_that_names_no_env_is_one_line(spec, message):
    with pytest.raises(envs.EnvSpecError) as err:
        envs.make_env(spec)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_split_the_env_does_not_have_is_refused():
    with pytest.raises(envs.EnvSpecError, match="frozenlake: has no game split 'unseen'"):
        envs.make_env("frozenlake", split="unseen")
    assert envs.game_splits(envs.make("frozenlake")) == ()


FOREIGN = '''
import gymnasium as gym

class Env(gym.Env):
    """One step to the goal; MISSING names an info key it leaves out."""
    MISSING = None

    def __init__(self, size=2, text=True):
        self.size, self.text = size, text

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return "start" if self.text else ["start"], self._info()

    def step(self, action):
        return "goal", 1.0, True, False, self._info()

    def _info(self):
        info = {"admissible_actions": [f"go {i}" for i in range(self.size)], "task": "reach the goal",
                "expert_action": "go 0", "success": False}
        return {k: v for k, v in info.items() if k != self.MISSING}

class NoTask(Env):
    MISSING = "task"

class NoActions(Env):
    MISSING = "admissible_actions"

class NoExpert(Env):
    MISSING = "expert_action"

class Costly(Env):
    costly_expert = True  # its expert is computed only when `expert=True` asks

    def __init__(self, expert=False):
        super().__init__()
        self.expert = expert

gym.register("foreign/Env-v0", entry_point=Env)
'''


@pytest.fixture
def foreign(tmp_path, monkeypatch):
    (tmp_path / "foreign_env.py").write_text(textwrap.dedent(FOREIGN))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("foreign_env", None)
    gym.registry.pop("foreign/Env-v0", None)


def test_a_foreign_env_as_module_class_and_as_gymnasium_id(foreign):
    env = envs.make_env("foreign_env:Env,size=3", expert=True)
    assert env.reset(seed=1)[1]["admissible_actions"] == ["go 0", "go 1", "go 2"]
    wrapped = envs.make_env("foreign_env:foreign/Env-v0,size=4")  # gymnasium's form: the module registers the id
    assert wrapped.reset(seed=1)[1]["admissible_actions"] == [f"go {i}" for i in range(4)]
    assert envs.make_env("foreign/Env-v0").unwrapped.size == 2  # registered in this process by now
    assert envs.registered_id("foreign_env:Env") == ""


@pytest.mark.parametrize("spec, expert, message", [
    ("foreign_env:NoActions", False, "foreign_env:NoActions: the info of reset() has no 'admissible_actions'"),
    ("foreign_env:NoTask", False, "the info of reset() has no 'task'"),
    ("foreign_env:Env,text=False", False, "reset() returned a list observation"),
    ("foreign_env:Env,size=0", False, "an empty 'admissible_actions'"),
    ("foreign_env:NoExpert", True, "the info of reset() has no 'expert_action' (an optimal next action), which this "
                                   "run needs"),
])  # fmt: skip
def test_what_a_foreign_env_lacks_is_named(foreign, spec, expert, message):
    with pytest.raises(envs.EnvSpecError) as err:
        envs.make_env(spec, expert=expert)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_the_expert_is_optional_where_the_run_does_not_need_it(foreign):
    env = envs.make_env("foreign_env:NoExpert")
    assert "expert_action" not in env.reset(seed=0)[1]


def test_an_env_with_a_costly_expert_computes_it_only_when_asked(foreign):
    assert envs.make_env("foreign_env:Costly").expert is False
    assert envs.make_env("foreign_env:Costly", expert=True).expert is True
    assert not hasattr(envs.make_env("foreign_env:Env", expert=True), "expert")  # a cheap one is never told


def test_run_folder_names_stay_file_names():
    assert file_name("mymodule:MyEnv,size=4") == "mymodule-MyEnv-size-4"
    assert file_name("llmprior/frozenlake-v0") == "llmprior-frozenlake-v0"
    assert file_name("textworld-coin,level=5,desc=['a', 'b']") == "textworld-coin-level-5-desc-a-b"
    assert file_name("overcooked-tomato") == "overcooked-tomato"


def test_game_order_walks_a_permutation_and_reseeds():
    import numpy as np

    order = GameOrder(4)
    first = [order.next(np.random.default_rng(0), i == 0, None) for i in range(4)]
    assert sorted(first) == [0, 1, 2, 3]
    assert order.next(np.random.default_rng(0), True, None) == first[0]  # a new seed starts a new permutation
    assert order.next(np.random.default_rng(0), False, {"game_index": 3}) == 3
    with pytest.raises(ValueError, match="out of range"):
        order.next(np.random.default_rng(0), False, {"game_index": 4})
