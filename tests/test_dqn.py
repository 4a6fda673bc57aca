"""dqn_prior.py: pure functions against hand-computed values, and subprocess runs of the script."""

import glob
import http.server
import json
import os

import numpy as np
import pytest
import torch
from helpers import script_runner, serve_http, summary_of

from dqn_prior import DATASET_FORMAT, ReplayBuffer, select_action, td_loss, td_target


def test_td_target_hand_computed():
    rewards = torch.tensor([1.0, 0.5, -0.1, 0.0])
    terminated = torch.tensor([1.0, 0.0, 0.0, 0.0])
    next_q = torch.tensor([[9.0, 9.0], [2.0, 3.0], [-1.0, 7.0], [5.0, 5.0]])
    # row 2: the larger Q (7.0) belongs to a padded slot and must not be used; row 3 has no candidate
    next_mask = torch.tensor([[True, True], [True, True], [True, False], [False, False]])
    y = td_target(rewards, terminated, next_q, next_mask, gamma=0.9)
    expected = torch.tensor([1.0, 0.5 + 0.9 * 3.0, -0.1 + 0.9 * -1.0, 0.0])
    assert torch.allclose(y, expected)


def test_td_loss_reductions():
    q = torch.tensor([1.0, 2.0], requires_grad=True)
    y = torch.tensor([0.0, 4.0])
    assert td_loss(q, y, "mean").item() == pytest.approx((1 + 4) / 2)
    assert td_loss(q, y, "sum").item() == pytest.approx(5.0)


def test_softmax_acting_at_zero_temperature_is_greedy():
    rng = np.random.default_rng(0)
    q = np.array([0.1, 0.9, 0.3])
    assert all(select_action(q, 0.0, 0.0, rng) == 1 for _ in range(20))
    assert all(select_action(q, 1e-6, 0.0, rng) == 1 for _ in range(20))


def test_softmax_acting_matches_the_boltzmann_distribution():
    rng = np.random.default_rng(0)
    q = np.array([0.0, np.log(3.0)])  # α = 1 → probabilities 1/4, 3/4
    picks = [select_action(q, 1.0, 0.0, rng) for _ in range(4000)]
    assert np.mean(picks) == pytest.approx(0.75, abs=0.03)


def test_epsilon_greedy_explores():
    rng = np.random.default_rng(0)
    q = np.array([0.0, 10.0])
    picks = [select_action(q, 0.0, 1.0, rng) for _ in range(2000)]
    assert np.mean(picks) == pytest.approx(0.5, abs=0.05)


def test_replay_buffer_keeps_next_candidate_sets():
    rb = ReplayBuffer(capacity=3, max_candidates=3)
    rb.add(0, 1.0, False, [4, 5])
    rb.add(1, 0.0, True, [])
    sample = rb.sample(64, np.random.default_rng(0))
    for sa, mask, nxt in zip(sample["sa"], sample["next_mask"], sample["next_sa"]):
        if sa == 0:
            assert mask.tolist() == [True, True, False] and nxt[:2].tolist() == [4, 5]
        else:
            assert not mask.any()
    for i in range(5):  # ring buffer: oldest entries are overwritten
        rb.add(10 + i, 0.0, False, [1])
    assert rb.size == 3 and sorted(rb.sa.tolist()) == [12, 13, 14]


run_script = script_runner("dqn_prior.py")


def test_plain_dqn_smoke_resume_and_dataset(tmp_path):
    """--k 0 trains; a run resumed from a mid-episode checkpoint ends with exactly the same Q-network."""
    common = ["--env", "frozenlake", "--k", "0", "--eval-freq", "100", "--eval-episodes", "2",
              "--checkpoint-freq", "70", "--runs-dir", str(tmp_path)]  # fmt: skip
    full = summary_of(run_script(*common, "--total-timesteps", "200", "--exp-name", "full"))
    assert full["global_step"] == 200 and full["prior_queries"] == 0
    part = run_script(*common, "--total-timesteps", "70", "--exp-name", "part",
                      "--save-dataset", str(tmp_path / "part.jsonl"))  # fmt: skip
    ckpt = glob.glob(str(tmp_path / "*part*" / "checkpoint.pt"))[0]
    resumed = summary_of(run_script("--resume", ckpt, "--total-timesteps", "200"))
    assert resumed["global_step"] == 200
    a = torch.load(glob.glob(str(tmp_path / "*full*" / "q_network.pt"))[0])
    b = torch.load(glob.glob(str(tmp_path / "*part*" / "q_network.pt"))[0])
    assert all(torch.equal(a[k], b[k]) for k in a)
    lines = (tmp_path / "part.jsonl").read_text().splitlines()
    header = json.loads(lines[0])
    assert (header["format"], header["env"], header["k"]) == (DATASET_FORMAT, "frozenlake", 0)
    assert len(lines) == 1 + 200  # the resumed run carried on the same dataset
    record = json.loads(lines[1])
    assert record["action"] in record["admissible"] and record["proposals"] is None
    # --load-model with no env steps only evaluates: the saved Q gives the run's final evaluation again
    q_path = glob.glob(str(tmp_path / "*full*" / "q_network.pt"))[0]
    again = summary_of(run_script(*common, "--total-timesteps", "0", "--exp-name", "evalonly", "--load-model", q_path))
    assert again["global_step"] == 0 and again["eval/return_mean"] == full["eval/return_mean"]
    # --eval-k 0 acts over every admissible action even where the run was given a prior mode
    zero = summary_of(run_script(*common, "--total-timesteps", "0", "--exp-name", "evalk0", "--load-model", q_path,
                                 "--eval-k", "0", "--eval-prior.mode", "dist"))  # fmt: skip
    assert zero["eval/return_mean"] == full["eval/return_mean"] and zero["prior_queries"] == 0


def test_unknown_env_is_a_clear_error(tmp_path):
    result = run_script("--env", "nope", "--k", "0", "--runs-dir", str(tmp_path), check=False)
    assert result.returncode != 0 and "valid ids" in result.stderr


class FlakyServer(http.server.BaseHTTPRequestHandler):
    """An OpenAI-compatible completions server that answers `budget` requests, then drops every connection."""

    budget = 0
    authorization: list[str] = []  # the Authorization header of every request

    def log_message(self, *args):
        pass

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FlakyServer.authorization.append(self.headers.get("Authorization"))
        if FlakyServer.budget <= 0:
            self.close_connection = True  # the client sees the connection drop, as when a server dies
            return
        FlakyServer.budget -= 1
        texts = ["Go Right", "Go Down", "I would go down", "left", "Go Up"]
        data = json.dumps({"choices": [{"index": i, "text": texts[i % 5]} for i in range(req["n"])]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def test_llm_server_failure_is_clear_and_loses_nothing(tmp_path):
    """The server dies mid-run: the script names the server, checkpoints, and a resume (server back) goes on. The
    API key reaches the server but no file the run writes; the resuming command line gives it again."""
    with serve_http(FlakyServer) as server:
        FlakyServer.budget, FlakyServer.authorization = 6, []
        prior = ["--prior.backend", "openai", "--prior.base-url", f"http://127.0.0.1:{server.server_port}/v1",
                 "--prior.model", "fake", "--prior.mode", "map", "--prior.unmatched", "last",
                 "--prior.cache", "memory", "--prior.max-retries", "1", "--prior.timeout", "5",
                 "--prior.api-key", "sk-test-secret"]  # fmt: skip
        failed = run_script("--env", "frozenlake", "--k", "3", "--total-timesteps", "60", "--runs-dir", str(tmp_path),
                            "--learning-starts", "5", "--train-frequency", "2", *prior, check=False)  # fmt: skip
        assert failed.returncode != 0
        assert "could not reach the OpenAI-compatible server" in failed.stderr
        assert f"127.0.0.1:{server.server_port}" in failed.stderr and "--resume" in failed.stderr
        ckpt_path = glob.glob(str(tmp_path / "*" / "checkpoint.pt"))[0]
        ckpt = torch.load(ckpt_path, weights_only=False)
        assert 0 < ckpt["global_step"] < 60 and ckpt["buffer"]["size"] == ckpt["global_step"]
        assert FlakyServer.authorization and set(FlakyServer.authorization) == {"Bearer sk-test-secret"}
        files = [p for p in glob.glob(str(tmp_path / "**" / "*"), recursive=True) if os.path.isfile(p)]
        written = [open(p, "rb").read() for p in files]  # args.json, TensorBoard events, checkpoint
        assert written and not any(b"sk-test-secret" in data for data in written)
        FlakyServer.budget, FlakyServer.authorization = 10_000, []
        resumed = run_script("--resume", ckpt_path, "--total-timesteps", "60", "--prior.api-key", "sk-test-secret")
        assert summary_of(resumed)["global_step"] == 60 and "sk-test-secret" not in resumed.stdout + resumed.stderr
        assert set(FlakyServer.authorization) == {"Bearer sk-test-secret"}


@pytest.fixture(scope="module")
def shared_prior_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("prior") / "proposals.sqlite")


@pytest.mark.slow
@pytest.mark.parametrize("env_id", ["overcooked-tomato", "overcooked-salad", "frozenlake", "alfworld-pick",
                                    "alfworld-examine"])  # fmt: skip
def test_dqn_prior_with_the_real_embedded_models(env_id, tmp_path, shared_prior_cache):
    """Gemma-3-270M proposes, all-MiniLM-L6-v2 encodes: every env trains and evaluates end to end."""
    steps = "40" if env_id.startswith("alfworld") else "120"  # an ALFWorld prompt scores ~30 actions: keep CI short
    result = run_script("--env", env_id, "--total-timesteps", steps, "--eval-freq", steps, "--eval-episodes", "1",
                        "--learning-starts", "20", "--coverage", "True", "--runs-dir", str(tmp_path),
                        "--prior.cache-path", shared_prior_cache)  # fmt: skip
    summary = summary_of(result)
    assert summary["global_step"] == int(steps)
    assert summary["prior_queries"] > 0 and 0.0 <= summary["prior_cache_hit_rate"] <= 1.0
    assert 0.0 <= summary["prior_coverage"] <= 1.0
    assert "coverage" in result.stdout and "LLM queries" in result.stdout
    if env_id.startswith("alfworld"):
        assert "eval_unseen/success_rate" in summary or env_id == "alfworld-examine"


def test_embedding_cache_serves_later_encoders_without_the_model(tmp_path):
    """The frozen encoder's vectors persist by (encoder, pooling, text): a second encoder on the same strings gets
    exactly the same rows without calling its model; another pooling is another key."""
    from dqn_prior import EmbeddingCache, TextEncoder

    path = str(tmp_path / "emb.sqlite")
    texts = ["Observation: a,  Action: b.", "Observation: c,  Action: d.", "Observation: a,  Action: b."]
    first = TextEncoder("all-MiniLM-L6-v2", torch.device("cpu"), cache=EmbeddingCache("minilm|mean", path))
    ids = first.ids(texts)
    assert ids == [0, 1, 0] and first.table.shape == (2, first.dim)
    second = TextEncoder("all-MiniLM-L6-v2", torch.device("cpu"), cache=EmbeddingCache("minilm|mean", path))
    second._encode = None  # any encoder call now fails
    assert second.ids(texts[::-1]) == [0, 1, 0] and torch.equal(second.table, first.table[[0, 1]])
    other = EmbeddingCache("minilm|cls", path)
    assert other.get_many(texts) == {} and len(EmbeddingCache("minilm|mean", path).get_many(texts)) == 2
