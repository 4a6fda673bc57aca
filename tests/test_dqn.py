"""dqn_prior.py: pure functions against hand-computed values; runs of the script, stopped and resumed at every phase
(training, evaluation, the final evaluation, saving, a failing LLM server) and checked to end exactly where the
uninterrupted run does; bad input as one-line errors."""

import glob
import os
import shutil
import signal

import numpy as np
import pytest
import torch
from helpers import FlakyServer, serve_http, summary_of
from helpers import run_script as _run_script

import dqn_prior
from dqn_prior import Args, ReplayBuffer, select_action, td_loss, td_target
from llmprior import runs


def test_td_target_hand_computed():
    rewards = torch.tensor([1.0, 0.5, -0.1, 0.0])
    dones = torch.tensor([1.0, 0.0, 0.0, 0.0])
    next_q = torch.tensor([[9.0, 9.0], [2.0, 3.0], [-1.0, 7.0], [5.0, 5.0]])
    # row 2: the larger Q (7.0) belongs to a padded slot and must not be used; row 3 has no candidate
    next_mask = torch.tensor([[True, True], [True, True], [True, False], [False, False]])
    y = td_target(rewards, dones, next_q, next_mask, gamma=0.9)
    assert torch.allclose(y, torch.tensor([1.0, 0.5 + 0.9 * 3.0, -0.1 + 0.9 * -1.0, 0.0]))


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
    picks = [select_action(np.array([0.0, 10.0]), 0.0, 1.0, rng) for _ in range(2000)]
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


def run_script(*argv, **kw):
    return _run_script("dqn_prior.py", *argv, **kw)


# ---- stopping and resuming, in process -------------------------------------------------------------------------------
FROZENLAKE = dict(env="frozenlake", total_timesteps=160, eval_freq=60, eval_episodes=2, learning_starts=20,
                  train_frequency=10, gradient_steps=5)  # fmt: skip
SYNTHETIC = dqn_prior.PriorArgs(backend="synthetic", synthetic_q=0.5, cache="memory", per_visit=True)


@pytest.fixture
def signals():
    """train() installs its own SIGINT/SIGTERM handlers: put Python's back afterwards."""
    saved = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGINT, saved[0])
    signal.signal(signal.SIGTERM, saved[1])


def q_of(run_dir: str) -> dict:
    return torch.load(os.path.join(run_dir, "q_network.pt"))


def the_run(runs_dir) -> str:
    folders = [d for d in glob.glob(os.path.join(str(runs_dir), "*")) if os.path.isdir(d)]
    assert len(folders) == 1, folders
    return folders[0]


def stop_when(monkeypatch, name: str, predicate, sig=signal.SIGINT, target=dqn_prior):
    """Send `sig` to this process from inside `target.<name>` at the calls where predicate(call number) holds: the
    run then stops as it would at a Ctrl-C there."""
    real, calls = getattr(target, name), [0]

    def wrapped(*a, **kw):
        calls[0] += 1
        if predicate(calls[0]):
            os.kill(os.getpid(), sig)
        return real(*a, **kw)

    monkeypatch.setattr(target, name, wrapped)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference: the run with no interruption (per-visit proposals of a synthetic prior: the run's generator
    draws them, so resuming must restore it and the state's drawn proposals)."""
    saved = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    folder = tmp_path_factory.mktemp("full")
    summary = dqn_prior.train(Args(**FROZENLAKE, prior=SYNTHETIC, runs_dir=str(folder)))
    signal.signal(signal.SIGINT, saved[0])
    signal.signal(signal.SIGTERM, saved[1])
    run_dir = the_run(folder)
    return summary, q_of(run_dir), open(os.path.join(run_dir, "eval.jsonl")).read()


def resume_to_the_end(run_dir: str, uninterrupted) -> dict:
    ckpt = os.path.join(run_dir, "checkpoint.pt")
    summary = dqn_prior.train(Args(resume=ckpt))
    full_summary, full_q, full_evals = uninterrupted
    q = q_of(run_dir)
    assert all(torch.equal(q[k], full_q[k]) for k in full_q)  # bit-identical on CPU
    assert open(os.path.join(run_dir, "eval.jsonl")).read() == full_evals  # the same evaluations, none twice
    for key in ("global_step", "episodes", "eval/return_mean", "best_eval_return", "prior_coverage"):
        assert summary[key] == full_summary[key], key
    return summary


@pytest.mark.parametrize("phase, name, predicate", [
    ("training", "td_loss", lambda n: n == 23),  # inside the training phase at step 70: 3 of its 5 gradient steps
    ("acting", "select_action", lambda n: n == 37),
    ("evaluation", "select_action", lambda n: n == 60 + 5),  # in the first evaluation, at step 60
    ("final evaluation", "evaluate", lambda n: n == 3),  # at steps 60, 120 and 160: the final one
])  # fmt: skip
def test_a_stop_at_any_phase_resumes_exactly(phase, name, predicate, tmp_path, monkeypatch, signals, uninterrupted):
    stop_when(monkeypatch, name, predicate)
    with pytest.raises(runs.Stopped, match="stopped by SIGINT at step .*--resume"):
        dqn_prior.train(Args(**FROZENLAKE, prior=SYNTHETIC, runs_dir=str(tmp_path)))
    monkeypatch.undo()
    run_dir = the_run(tmp_path)
    assert not os.path.exists(os.path.join(run_dir, "summary.json"))
    resume_to_the_end(run_dir, uninterrupted)


def test_sigterm_while_saving_a_checkpoint_stops_after_it(tmp_path, monkeypatch, signals, uninterrupted):
    stop_when(monkeypatch, "save_checkpoint", lambda n: n == 1, signal.SIGTERM, target=runs.Run)
    with pytest.raises(runs.Stopped, match="SIGTERM at step 60"):
        dqn_prior.train(Args(**FROZENLAKE, prior=SYNTHETIC, runs_dir=str(tmp_path)))
    monkeypatch.undo()
    resume_to_the_end(the_run(tmp_path), uninterrupted)


def test_a_killed_run_resumes_exactly_from_its_last_checkpoint(tmp_path, monkeypatch, signals, uninterrupted):
    """A process killed right after the checkpoint of step 60 (mid-episode: the episode's actions are replayed)."""
    real = runs.Run.save_checkpoint

    def save_then_die(self, state):
        real(self, state)
        raise SystemExit("killed")  # nothing after the write runs, as with SIGKILL

    monkeypatch.setattr(runs.Run, "save_checkpoint", save_then_die)
    with pytest.raises(SystemExit):
        dqn_prior.train(Args(**FROZENLAKE, prior=SYNTHETIC, runs_dir=str(tmp_path)))
    monkeypatch.undo()
    run_dir = the_run(tmp_path)
    assert torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=False)["loop"]["episode_actions"]
    resume_to_the_end(run_dir, uninterrupted)


def test_resume_goes_on_in_the_folder_that_holds_the_checkpoint(tmp_path, monkeypatch, signals, uninterrupted):
    """A copied run resumes in the copy (the original is untouched), refuses a second process on the same folder,
    cleans a half-written checkpoint left by a killed process, and its wall-clock counts every session."""
    stop_when(monkeypatch, "select_action", lambda n: n == 90)
    with pytest.raises(runs.Stopped):
        dqn_prior.train(Args(**FROZENLAKE, prior=SYNTHETIC, runs_dir=str(tmp_path / "first")))
    monkeypatch.undo()
    original = the_run(tmp_path / "first")
    elapsed = torch.load(os.path.join(original, "checkpoint.pt"), weights_only=False)["elapsed_s"]
    copy = str(tmp_path / "moved" / os.path.basename(original))
    shutil.copytree(original, copy)
    before = {p: os.path.getmtime(p) for p in glob.glob(os.path.join(original, "*"))}
    open(os.path.join(copy, "checkpoint.pt.tmp-999999"), "w").write("half")
    lock = runs.Run(Args(), copy).open({})  # another process runs the copy
    with pytest.raises(runs.UserError, match="is being run by another process"):
        dqn_prior.train(Args(resume=os.path.join(copy, "checkpoint.pt")))
    lock.close()
    summary = resume_to_the_end(copy, uninterrupted)
    assert {p: os.path.getmtime(p) for p in glob.glob(os.path.join(original, "*"))} == before
    assert not glob.glob(os.path.join(copy, "*.tmp-*"))
    assert summary["run_name"] == os.path.basename(copy) and summary["wall_clock_s"] >= elapsed


def test_llm_server_failure_is_one_line_and_resumes_exactly(tmp_path, monkeypatch, signals):
    """The server dies mid-run: one line that names it and says how to go on (no traceback); the state before the
    failed step is saved, and the resumed run (server back) ends where an uninterrupted one does. The API key
    ($OPENAI_API_KEY) reaches the server and no file the run writes."""
    with serve_http(FlakyServer) as server:
        env = {"OPENAI_BASE_URL": f"http://127.0.0.1:{server.server_port}/v1", "OPENAI_API_KEY": "sk-test-secret"}
        common = ["--env", "frozenlake", "--k", "3", "--total-timesteps", "60", "--eval-freq", "30", "--eval-episodes",
                  "1", "--learning-starts", "5", "--train-frequency", "2", "--prior.backend", "openai",
                  "--prior.model", "fake", "--prior.mode", "map", "--prior.cache", "memory"]  # fmt: skip
        FlakyServer.budget, FlakyServer.authorization = 10_000, []
        full = summary_of(run_script(*common, "--runs-dir", str(tmp_path / "full"), env=env))
        FlakyServer.budget = 4  # of the full run's 10 queries
        failed = run_script(*common, "--runs-dir", str(tmp_path / "part"), env=env, check=False)
        assert failed.returncode == 2 and "Traceback" not in failed.stderr
        assert f"127.0.0.1:{server.server_port}" in failed.stderr and "--resume" in failed.stderr
        assert failed.stderr.strip().count("\n") == 0, failed.stderr
        part = the_run(tmp_path / "part")
        ckpt = torch.load(os.path.join(part, "checkpoint.pt"), weights_only=False)
        assert 0 < ckpt["loop"]["global_step"] < 60
        assert set(FlakyServer.authorization) == {"Bearer sk-test-secret"}
        files = [p for p in glob.glob(str(tmp_path / "**" / "*"), recursive=True) if os.path.isfile(p)]
        assert not any(b"sk-test-secret" in open(p, "rb").read() for p in files)
        FlakyServer.budget = 10_000
        resumed = summary_of(run_script("--resume", os.path.join(part, "checkpoint.pt"), env=env))
        assert resumed["global_step"] == 60 and resumed["eval/return_mean"] == full["eval/return_mean"]
        a, b = q_of(the_run(tmp_path / "full")), q_of(part)
        assert all(torch.equal(a[k], b[k]) for k in a)


# ---- bad input -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["--k", "-1"], "--k must be >= 0"),
    (["--eval-freq", "0"], "--eval-freq must be >= 1"),
    (["--total-timesteps", "-5"], "--total-timesteps must be >= 1"),
    (["--env", "nope"], "--env nope: unknown; one of overcooked-tomato"),
    (["--prior.uniform-mix", "2"], "--prior.uniform-mix must be in [0, 1]"),
    (["--k", "0", "--prior.mode", "map"], "--k 0 is plain DQN"),
    (["--prior.per-visit", "--prior.mode", "topk"], "`topk` draws nothing"),
    (["--resume", "nowhere/checkpoint.pt"], "no such file"),
])  # fmt: skip
def test_bad_input_is_one_line_before_anything_loads_and_leaves_no_folder(argv, message, tmp_path):
    # a model that cannot load shows that nothing loaded: the flag was refused first
    result = run_script(*argv, "--prior.model", "/nonexistent.gguf", "--runs-dir", str(tmp_path), check=False)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and message in result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert not os.listdir(tmp_path)


def test_help_parses_before_the_heavy_imports(tmp_path):
    """--help answers without importing transformers (a stand-in that refuses to import is on the path)."""
    (tmp_path / "transformers").mkdir()
    (tmp_path / "transformers" / "__init__.py").write_text("raise ImportError('transformers imported')\n")
    result = run_script("--help", env={"PYTHONPATH": str(tmp_path)})
    assert "--prior.synthetic-q" in result.stdout and "--bootstrap-time-limit" in result.stdout


# ---- the real embedded models ----------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("env_id", ["overcooked-tomato", "overcooked-salad", "frozenlake", "alfworld-pick",
                                    "alfworld-examine"])  # fmt: skip
def test_dqn_prior_with_the_real_embedded_models(env_id, tmp_path):
    """Gemma-3-270M proposes, all-MiniLM-L6-v2 encodes: every env trains and evaluates end to end."""
    steps = "120" if env_id in ("overcooked-tomato", "frozenlake") else "40"  # Salad (a 5-step history in the prompt)
    # and ALFWorld (~30 actions) make most states a new LLM query: keep CI short
    result = run_script("--env", env_id, "--total-timesteps", steps, "--eval-freq", steps, "--eval-episodes", "1",
                        "--learning-starts", "20", "--runs-dir", str(tmp_path))  # fmt: skip
    summary = summary_of(result)
    assert summary["global_step"] == int(steps) and 0.0 <= summary["prior_cache_hit_rate"] <= 1.0
    assert "LLM queries" in result.stdout
    # --prior.score-normalize auto: the scoring measured best for the env family
    assert summary["prior_score_normalize"] == {"overcooked": "mean", "alfworld": "pmi"}.get(env_id.split("-")[0], "sum")
    if env_id.startswith("alfworld"):
        assert "eval_unseen/success_rate" in summary or env_id == "alfworld-examine"
    else:
        assert 0.0 <= summary["prior_coverage"] <= 1.0


def test_embedding_cache_serves_later_encoders_without_the_model(tmp_path, monkeypatch):
    """The frozen encoder's vectors persist by (encoder, pooling, text): a second encoder on the same strings gets
    exactly the same rows without calling its model."""
    from llmprior.encoder import TextEncoder

    monkeypatch.setenv("LLMPRIOR_CACHE", str(tmp_path))
    texts = ["Observation: a,  Action: b.", "Observation: c,  Action: d.", "Observation: a,  Action: b."]
    first = TextEncoder("all-MiniLM-L6-v2", torch.device("cpu"))
    ids = first.ids(texts)
    assert ids == [0, 1, 0] and first.table.shape == (2, first.dim)
    second = TextEncoder("all-MiniLM-L6-v2", torch.device("cpu"))
    second._encode = None  # any encoder call now fails
    assert second.ids(texts[::-1]) == [0, 1, 0] and torch.equal(second.table, first.table[[0, 1]])
    assert (tmp_path / "embeddings.sqlite").exists()
