"""docs/envs.md's example env, a plain gymnasium.Env from outside this project, runs through the scripts via PYTHONPATH
(`module:Class` and gymnasium-id forms, keywords); the same env without `admissible_actions` is one line on stderr,
exit status 2 and no run folder."""

import os
import re

import pytest
from helpers import ROOT, last_json, run_script, summary_of


@pytest.fixture(scope="module")
def guess_dir(tmp_path_factory):
    """A folder holding docs/envs.md's example as guess.py."""
    doc = open(os.path.join(ROOT, "docs", "envs.md")).read()
    code = re.search(r"```python\n(.*?)```", doc, re.S).group(1)
    assert "class GuessNumber(gym.Env)" in code and "import envs" not in code and "llmprior" not in code
    assert len(code.strip().splitlines()) <= 35  # "about 30 lines"
    folder = tmp_path_factory.mktemp("guess")
    (folder / "guess.py").write_text(code)
    return folder


def test_the_docs_example_trains_builds_a_dataset_and_trains_offline(guess_dir, tmp_path):
    path = {"PYTHONPATH": str(guess_dir)}
    result = run_script("dqn_prior.py", "--env", "guess:GuessNumber,size=4", "--prior.backend", "synthetic",
                        "--prior.cache", "memory", "--total-timesteps", "40", "--eval-freq", "40", "--eval-episodes",
                        "3", "--learning-starts", "10", "--runs-dir", str(tmp_path / "runs"), env=path)  # fmt: skip
    summary = summary_of(result)
    # the synthetic prior at Q = 1 proposes the expert's binary search: every evaluation episode finds the number
    assert summary["eval/success_rate"] == 1.0 and summary["prior_coverage"] == 1.0
    assert summary["run_name"].startswith("guess-GuessNumber-size-4__dqn_prior__1__")
    assert os.listdir(tmp_path / "runs") == [summary["run_name"]]

    data = str(tmp_path / "guess.jsonl")
    built = last_json(run_script("build_dataset.py", "--env", "guess:guess/GuessNumber-v0,size=4", "--transitions",
                                 "30", "--k", "2", "--prior.backend", "synthetic", "--prior.cache", "memory", "--out",
                                 data, env=path), "dataset ")  # fmt: skip
    assert built["env"] == "guess:guess/GuessNumber-v0,size=4" and built["transitions"] >= 30
    assert built["expert_coverage_at_k"] == [1.0, 1.0]
    # cql_prior.py makes the env again from the dataset's header
    offline = summary_of(run_script("cql_prior.py", "--dataset", data, "--k", "2", "--prior.backend", "synthetic",
                                    "--prior.cache", "memory", "--total-steps", "10", "--eval-freq", "10",
                                    "--eval-episodes", "2", "--runs-dir", str(tmp_path / "offline"), env=path))
    assert offline["run_name"].startswith("guess-guess-GuessNumber-v0-size-4__cql_prior__")


@pytest.mark.parametrize("script, argv", [
    ("dqn_prior.py", ["--total-timesteps", "10"]),
    ("build_dataset.py", ["--transitions", "10"]),
])  # fmt: skip
def test_without_admissible_actions_it_is_one_line_before_anything_loads(guess_dir, tmp_path, script, argv):
    code = (guess_dir / "guess.py").read_text()
    assert code.count('"admissible_actions": ') == 1
    (tmp_path / "noactions.py").write_text(code.replace('"admissible_actions": ', '"actions": '))
    out = tmp_path / "out"
    out.mkdir()
    # a model that cannot load shows that nothing loaded: the env was refused first
    result = run_script(script, "--env", "noactions:GuessNumber", "--prior.model", "/nonexistent.gguf", *argv,
                        *(["--runs-dir", str(out)] if script == "dqn_prior.py" else ["--out", str(out / "d.jsonl")]),
                        check=False, env={"PYTHONPATH": str(tmp_path)})  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert result.stderr.startswith("error: --env noactions:GuessNumber: the info of reset() has no "
                                    "'admissible_actions'")  # fmt: skip
    assert not os.listdir(out)
