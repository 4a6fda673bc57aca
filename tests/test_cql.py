"""cql_prior.py: the Eq. 7 loss against hand-computed values, the candidate sets it is taken over, and runs of
build_dataset.py + cql_prior.py (a tiny random LM as the prior; the embedded Gemma-3-270M in the slow test)."""

import glob
import json
import math
import os

import pytest
import torch
from helpers import FlakyServer, last_json, serve_http
from helpers import run_script as run

import cql_prior
from cql_prior import OfflineData, cql_loss
from llmprior.prompts import feature_text


# ---- the loss (Eq. 7) ------------------------------------------------------------------------------------------------
def lse(*xs: float) -> float:
    return math.log(sum(math.exp(x) for x in xs))


# Two states. State 0: admissible actions with Q = [1, 2, 5, 0], the data action is the first (Q 1), the prior
# proposed the first two. State 1: Q = [0, 3, -1], data action the first (Q 0), the prior proposed actions 0 and 2.
Q_ALL = [[1.0, 2.0, 5.0, 0.0], [0.0, 3.0, -1.0, -9.0]]
MASK_ALL = [[True, True, True, True], [True, True, True, False]]
Q_SA = torch.tensor([1.0, 0.0])
TARGET = torch.tensor([1.5, 1.0])
TD = 0.5 * ((1.0 - 1.5) ** 2 + (0.0 - 1.0) ** 2) / 2  # ½·mean squared TD error = 0.3125


def test_cql_prior_loss_hand_computed():
    cand_q = torch.tensor([[1.0, 2.0], [0.0, -1.0]])  # Q of the proposals
    mask = torch.ones(2, 2, dtype=torch.bool)
    loss, td, penalty = cql_loss(Q_SA, TARGET, cand_q, mask, beta=5.0, reduction="mean")
    expected_penalty = ((lse(1, 2) - 1) + (lse(0, -1) - 0)) / 2
    assert td.item() == pytest.approx(TD)
    assert penalty.item() == pytest.approx(expected_penalty)
    assert loss.item() == pytest.approx(TD + 5.0 * expected_penalty)


def test_exact_prior_loss_weighs_each_action_by_its_probability():
    """--exact-prior: log Σ_a p(a|s)·exp Q(s,a) − Q(s,a_data); with a uniform p it is CQL's penalty minus log |A(s)|,
    with the same gradient."""
    p = [[0.5, 0.25, 0.25, 0.0], [0.2, 0.3, 0.5, 0.0]]
    mask = torch.tensor([[True, True, True, False], [True, True, True, False]])  # p's support
    log_p = torch.tensor([[math.log(x) if x else 0.0 for x in row] for row in p])
    _, _, penalty = cql_loss(Q_SA, TARGET, torch.tensor(Q_ALL), mask, beta=5.0, cand_log_weights=log_p)
    expected = ((math.log(0.5 * math.e ** 1 + 0.25 * math.e ** 2 + 0.25 * math.e ** 5) - 1)
                + (math.log(0.2 * math.e ** 0 + 0.3 * math.e ** 3 + 0.5 * math.e ** -1) - 0)) / 2  # fmt: skip
    assert penalty.item() == pytest.approx(expected)
    all_mask = torch.tensor(MASK_ALL)
    uniform = torch.log(1.0 / all_mask.sum(dim=1, keepdim=True).float()).expand(2, 4)
    cand_q = torch.tensor(Q_ALL, requires_grad=True)
    _, _, exact = cql_loss(Q_SA, TARGET, cand_q, all_mask, beta=5.0, cand_log_weights=uniform)
    (grad_exact,) = torch.autograd.grad(exact, cand_q)
    cand_q2 = torch.tensor(Q_ALL, requires_grad=True)
    _, _, plain = cql_loss(Q_SA, TARGET, cand_q2, all_mask, beta=5.0)
    (grad_plain,) = torch.autograd.grad(plain, cand_q2)
    assert exact.item() == pytest.approx(plain.item() - (math.log(4) + math.log(3)) / 2)
    assert torch.allclose(grad_exact, grad_plain)


def test_soft_target_is_the_prior_weighted_soft_maximum():
    """--exact-prior's target: y = r + γ(1 − done)·α·log Σ p(a'|s')·exp(Q(s',a')/α), hand-computed; a row without
    candidates and a terminal row bootstrap 0; as α → 0 it is td_target's max over p's support."""
    from cql_prior import soft_td_target, td_target

    next_q = torch.tensor([[1.0, 2.0, 5.0, 0.0], [0.0, 3.0, -1.0, -9.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    mask = torch.tensor([[True, True, True, False], [True, True, True, False], [False] * 4, [True] * 4])
    p = [[0.5, 0.25, 0.25], [0.2, 0.3, 0.5], [], [0.25] * 4]
    log_p = torch.tensor([[math.log(x) for x in row] + [0.0] * (4 - len(row)) for row in p])
    rewards, dones = torch.tensor([0.1, 0.0, 0.5, 0.2]), torch.tensor([0.0, 0.0, 0.0, 1.0])
    y = soft_td_target(rewards, dones, next_q, mask, log_p, gamma=0.9, alpha=0.5)
    soft = [0.5 * math.log(sum(w * math.exp(q / 0.5) for w, q in zip(row, qs))) for row, qs in zip(p[:2], next_q)]
    assert y.tolist() == pytest.approx([0.1 + 0.9 * soft[0], 0.9 * soft[1], 0.5, 0.2])
    hard = td_target(rewards, dones, next_q, mask, gamma=0.9)
    assert soft_td_target(rewards, dones, next_q, mask, log_p, 0.9, 1e-4).tolist() == pytest.approx(hard.tolist(),
                                                                                                     abs=1e-3)


def test_plain_cql_loss_takes_every_admissible_action():
    loss, td, penalty = cql_loss(Q_SA, TARGET, torch.tensor(Q_ALL), torch.tensor(MASK_ALL), beta=5.0, reduction="mean")
    expected_penalty = ((lse(1, 2, 5, 0) - 1) + (lse(0, 3, -1) - 0)) / 2  # the padded -9 is not an action
    assert penalty.item() == pytest.approx(expected_penalty)
    assert loss.item() == pytest.approx(TD + 5.0 * expected_penalty)
    # the prior restriction: the same Q, but only the proposals enter the logsumexp
    prior_only = torch.tensor([[True, True, False, False], [True, False, True, False]])
    _, _, restricted = cql_loss(Q_SA, TARGET, torch.tensor(Q_ALL), prior_only, beta=5.0)
    assert restricted.item() == pytest.approx(((lse(1, 2) - 1) + (lse(0, -1) - 0)) / 2)
    assert restricted.item() < penalty.item()


def test_logsumexp_set_is_the_proposals_only():
    """Q of an action outside C(s) changes nothing and gets no gradient; each proposal gets its softmax weight."""
    cand_q = torch.tensor(Q_ALL, requires_grad=True)
    mask = torch.tensor([[True, True, False, False], [True, False, True, False]])
    _, _, penalty = cql_loss(Q_SA, TARGET, cand_q, mask, beta=1.0)
    penalty.backward()
    grad = cand_q.grad
    assert torch.all(grad[~mask] == 0)
    w = torch.softmax(torch.tensor([1.0, 2.0]), 0) / 2  # d mean(lse)/dQ for state 0
    assert torch.allclose(grad[0, :2], w)
    other = torch.tensor(Q_ALL)
    other[0, 2], other[1, 1] = 100.0, -100.0  # non-proposed actions
    _, _, same = cql_loss(Q_SA, TARGET, other, mask, beta=1.0)
    assert same.item() == pytest.approx(penalty.item())


def test_data_action_joins_the_set_where_not_proposed_and_duplicates_count():
    # state 0's data action (Q 1) is proposed ([1, 2] holds it), state 1's (Q 0) is not ([3, -1])
    cand_q = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    mask = torch.ones(2, 2, dtype=torch.bool)
    _, _, eq7 = cql_loss(Q_SA, TARGET, cand_q, mask, beta=5.0)
    assert eq7.item() == pytest.approx(((lse(1, 2) - 1) + (lse(3, -1) - 0)) / 2)
    _, _, union = cql_loss(Q_SA, TARGET, cand_q, mask, beta=5.0, add_data_action=torch.tensor([False, True]))
    assert union.item() == pytest.approx(((lse(1, 2) - 1) + (lse(3, -1, 0) - 0)) / 2)
    # C(s) ∪ {a} bounds the penalty below by 0; Eq. 7's set alone does not when a is not proposed
    low = torch.tensor([[-50.0, -60.0]])
    _, _, p_eq7 = cql_loss(torch.tensor([0.0]), torch.tensor([0.0]), low, torch.ones(1, 2, dtype=torch.bool), 1.0)
    _, _, p_union = cql_loss(torch.tensor([0.0]), torch.tensor([0.0]), low, torch.ones(1, 2, dtype=torch.bool), 1.0,
                             add_data_action=torch.tensor([True]))  # fmt: skip
    assert p_eq7.item() == pytest.approx(lse(-50, -60)) and 0 <= p_union.item() < 1e-6
    # a proposal drawn twice counts twice (the authors kept duplicates)
    dup = torch.tensor([[2.0, 2.0]]), torch.ones(1, 2, dtype=torch.bool)
    _, _, p = cql_loss(torch.tensor([1.0]), torch.tensor([1.0]), *dup, beta=1.0)
    assert p.item() == pytest.approx(lse(2, 2) - 1)


def test_beta_zero_is_half_td_and_reductions():
    cand_q, mask = torch.tensor([[1.0, 2.0], [0.0, -1.0]]), torch.ones(2, 2, dtype=torch.bool)
    loss, td, _ = cql_loss(Q_SA, TARGET, cand_q, mask, beta=0.0, reduction="mean")
    assert loss.item() == pytest.approx(TD) and td.item() == pytest.approx(TD)
    _, td_sum, _ = cql_loss(Q_SA, TARGET, cand_q, mask, beta=0.0, reduction="sum")
    assert td_sum.item() == pytest.approx(0.5 * (0.25 + 1.0))


def test_the_default_loss_sums_the_td_term_and_averages_the_penalty():
    """The default balance (the authors' code): ½·Σ_batch (Q − y)² + β·mean(logsumexp − Q), here with the data action
    joining the set of state 1, where the prior did not propose it."""
    assert cql_prior.Args().loss_reduction == "sum" and cql_prior.Args().cql_beta == 5.0
    cand_q = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    mask = torch.ones(2, 2, dtype=torch.bool)
    loss, td, penalty = cql_loss(Q_SA, TARGET, cand_q, mask, 5.0, "sum", add_data_action=torch.tensor([False, True]))
    td_hand = 0.5 * ((1.0 - 1.5) ** 2 + (0.0 - 1.0) ** 2)  # 0.625: summed, not averaged
    penalty_hand = ((lse(1, 2) - 1) + (lse(3, -1, 0) - 0)) / 2
    assert td.item() == pytest.approx(td_hand) and penalty.item() == pytest.approx(penalty_hand)
    assert loss.item() == pytest.approx(td_hand + 5.0 * penalty_hand)


def test_empty_candidate_set_adds_no_penalty_and_no_nan():
    q_sa = torch.tensor([1.0, 0.0], requires_grad=True)
    cand_q = torch.tensor([[1.0, 2.0], [7.0, 7.0]], requires_grad=True)
    mask = torch.tensor([[True, True], [False, False]])
    loss, _, penalty = cql_loss(q_sa, TARGET, cand_q, mask, beta=5.0, reduction="mean")
    loss.backward()
    assert penalty.item() == pytest.approx((lse(1, 2) - 1) / 2)
    assert torch.isfinite(q_sa.grad).all() and torch.isfinite(cand_q.grad).all()
    assert torch.all(cand_q.grad[1] == 0)


class FakeEncoder:
    """encoder.ids() without a model: a row per distinct string."""

    def __init__(self):
        self.index, self.texts = {}, []

    def ids(self, texts):
        for t in texts:
            if t not in self.index:
                self.index[t] = len(self.texts)
                self.texts.append(t)
        return [self.index[t] for t in texts]


def test_offline_data_rows_are_the_proposals():
    """The logsumexp rows of a transition are the stored proposals at s, the Bellman rows those at s'."""
    records = [
        {"task": "t", "obs": "s0", "action": "a", "reward": 0.0, "terminated": False, "truncated": False,
         "next_obs": "s1"},
        {"task": "t", "obs": "s1", "action": "c", "reward": 1.0, "terminated": True, "truncated": False,
         "next_obs": "s2"},
        {"task": "t", "obs": "s3", "action": "c", "reward": 0.0, "terminated": False, "truncated": True,
         "next_obs": "s4"},
    ]
    cands = [["b", "b", "d"], ["c"], ["c"]]  # "a" (the data action) is not proposed at s0
    next_cands = [["c", "e"], [], ["c"]]
    enc = FakeEncoder()
    # the episode cap ends the TD target unless bootstrap_time_limit
    assert OfflineData("overcooked-salad", records, cands, next_cands, enc, True).dones.tolist() == [0, 1, 0]
    data = OfflineData("overcooked-salad", records, cands, next_cands, enc)
    text = lambda i: enc.texts[i]  # noqa: E731
    assert text(data.sa[0]) == feature_text("overcooked-salad", "t", "s0", "a")
    row = [text(i) for i, m in zip(data.cand[0], data.cand_mask[0]) if m]
    assert row == [feature_text("overcooked-salad", "t", "s0", a) for a in ["b", "b", "d"]]
    nxt = [text(i) for i, m in zip(data.next_sa[0], data.next_mask[0]) if m]
    assert nxt == [feature_text("overcooked-salad", "t", "s1", a) for a in ["c", "e"]]
    assert not data.next_mask[1].any() and data.dones.tolist() == [0.0, 1.0, 1.0]
    assert data.data_in_set.tolist() == [False, True, True]


# ---- scripts ---------------------------------------------------------------------------------------------------------
CORPUS = [
    "Your task is to serve the dish of a bowl only containing chopped tomato and lettuce. There are two fixed",
    "cutting boards in the room. You notice a tomato, a lettuce and an onion on the different tables. Action:",
    "pick up the tomato, take the empty bowl, walk to the first cutting board, serve nothing, chop nothing",
]


@pytest.fixture(scope="session")
def tiny_lm_dir(tiny_model):
    """A random causal LM + BPE tokenizer saved as a local HF folder (the same load path as a real prior)."""
    return tiny_model("llama", CORPUS, name="cql-llama")


@pytest.fixture(scope="module")
def salad_k0(tmp_path_factory):
    """A small Salad dataset without proposals (no LLM needed to build it)."""
    path = tmp_path_factory.mktemp("data") / "salad.jsonl"
    info = last_json(run("build_dataset.py", "--env", "overcooked-salad", "--transitions", "300", "--k", "0",
                         "--out", str(path)), "dataset ")  # fmt: skip
    assert info["transitions"] >= 300 and info["prior"] is None
    return str(path)


def test_smoke_cql_without_prior_and_exact_resume(salad_k0, tmp_path):
    """--k 0 (CQL over all admissible actions) trains and evaluates without an LLM; a run resumed from its checkpoint
    with a longer total ends with exactly the Q-network of the run that went straight there (same seed, CPU)."""
    common = ["--dataset", salad_k0, "--k", "0", "--eval-freq", "100", "--eval-episodes", "2", "--runs-dir",
              str(tmp_path)]  # fmt: skip
    full = last_json(run("cql_prior.py", *common, "--total-steps", "200", "--exp-name", "full"), "summary ")
    assert full["global_step"] == 200 and full["prior_queries"] == 0 and full["data_action_coverage"] == 1.0
    assert {"eval/return_mean", "eval/return_std", "eval/success_rate", "best_eval_return"} <= set(full)
    full_dir = glob.glob(str(tmp_path / "*full*"))[0]
    evals = [json.loads(line) for line in open(os.path.join(full_dir, "eval.jsonl"))]
    assert [e["global_step"] for e in evals] == [100, 200]
    assert full["best_eval_return"] == max(e["eval/return_mean"] for e in evals)
    run("cql_prior.py", *common, "--total-steps", "100", "--exp-name", "part")
    part_dir = glob.glob(str(tmp_path / "*part*"))[0]
    resumed = last_json(run("cql_prior.py", "--resume", os.path.join(part_dir, "checkpoint.pt"), "--total-steps",
                            "200"), "summary ")  # fmt: skip
    assert resumed["global_step"] == 200 and resumed["eval/return_mean"] == full["eval/return_mean"]
    assert open(os.path.join(part_dir, "eval.jsonl")).read() == open(os.path.join(full_dir, "eval.jsonl")).read()
    a, b = torch.load(os.path.join(full_dir, "q_network.pt")), torch.load(os.path.join(part_dir, "q_network.pt"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # --load-model with no training only evaluates: the saved Q gives the run's final evaluation again
    again = last_json(run("cql_prior.py", *common, "--total-steps", "0", "--exp-name", "evalonly", "--load-model",
                          os.path.join(full_dir, "q_network.pt")), "summary ")  # fmt: skip
    assert again["global_step"] == 0 and again["eval/return_mean"] == full["eval/return_mean"]


def test_a_stop_during_training_or_evaluation_resumes_exactly(salad_k0, tmp_path):
    """SIGINT in the middle of gradient steps, and during an evaluation: the run stops at the next clean point (the
    evaluation is dropped and redone), and the resumed run ends on exactly the uninterrupted Q and logs."""
    import signal
    import subprocess
    import sys
    import time

    from helpers import ROOT

    common = ["--dataset", salad_k0, "--k", "0", "--eval-freq", "500", "--eval-episodes", "40", "--total-steps",
              "1500", "--runs-dir"]  # fmt: skip
    run("cql_prior.py", *common, str(tmp_path / "full"))
    full_dir = glob.glob(str(tmp_path / "full" / "*"))[0]
    for name, wait_for in (("training", "gradient step"), ("evaluation", "started")):
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "cql_prior.py"), *common, str(tmp_path / name)],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        line = ""
        while wait_for not in line:
            line = proc.stdout.readline()
        if name == "evaluation":
            while "eval " not in line:  # after the first evaluation: stop inside the second, 40 episodes long
                line = proc.stdout.readline()
            time.sleep(1.5)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 130 and "stopped by SIGINT" in err and "--resume" in err, err
        part_dir = glob.glob(str(tmp_path / name / "*"))[0]
        run("cql_prior.py", "--resume", os.path.join(part_dir, "checkpoint.pt"))
        a, b = torch.load(os.path.join(full_dir, "q_network.pt")), torch.load(os.path.join(part_dir, "q_network.pt"))
        assert all(torch.equal(a[k], b[k]) for k in a), name
        assert open(os.path.join(part_dir, "eval.jsonl")).read() == open(os.path.join(full_dir, "eval.jsonl")).read()


def test_mismatched_or_corrupt_dataset_is_a_clear_error(salad_k0, tiny_lm_dir, tmp_path):
    common = ["--total-steps", "20", "--eval-episodes", "1", "--runs-dir", str(tmp_path / "runs")]
    bad = run("cql_prior.py", "--dataset", salad_k0, "--k", "0", "--cql-beta", "-1", *common, check=False)
    assert bad.returncode == 2 and "--cql-beta must be >= 0" in bad.stderr and not os.path.exists(tmp_path / "runs")
    cut = tmp_path / "cut.jsonl"
    text = open(salad_k0).read()
    cut.write_text(text[: len(text) // 2])
    bad = run("cql_prior.py", "--dataset", str(cut), "--k", "0", *common, check=False)
    assert bad.returncode == 2 and str(cut) in bad.stderr and "truncated" in bad.stderr
    assert "Traceback" not in bad.stderr
    missing = run("cql_prior.py", *common, check=False)
    assert missing.returncode == 2 and "--dataset" in missing.stderr


def test_smoke_prior_proposals_stored_mean_no_llm_in_training(tiny_lm_dir, tmp_path):
    """build_dataset.py stores the prior's proposals; cql_prior.py trains on them with zero LLM queries, then
    evaluates over the prior's proposals (new states query the LLM)."""
    data = tmp_path / "salad_k2.jsonl"
    prior = ["--k", "2", "--prior.model", tiny_lm_dir, "--prior.cache", "memory"]
    info = last_json(run("build_dataset.py", "--transitions", "60", "--out", str(data), "--mix.prior", "0.5", *prior),
                     "dataset ")  # fmt: skip
    assert info["k"] == 2 and info["prior"].endswith(":dist") and info["prior_queries"] > 0
    assert 0.0 <= info["data_action_in_proposals"] <= 1.0 and 0 < info["expert_action_prob"] < 1
    header = json.loads(open(data).readline())
    assert header["prior_seed"] == 1 and header["history"] == 5  # Salad's default prompt history
    records = [json.loads(line) for line in open(data).readlines()[1:]]
    assert all(len(r["proposals"]) == 2 for r in records)
    assert all(r["next_proposals"] == [] for r in records if r["terminated"])
    common = ["--dataset", str(data), "--total-steps", "100", "--eval-freq", "100", "--eval-episodes", "1",
              "--runs-dir", str(tmp_path)]  # fmt: skip
    summary = last_json(run("cql_prior.py", *common, *prior), "summary ")
    assert summary["dataset_prior_queries"] == 0 and summary["global_step"] == 100
    assert summary["data_action_coverage"] == pytest.approx(info["data_action_in_proposals"])
    # another k, or another temperature, is another prior: refused, unless asked for
    bad = run("cql_prior.py", *common, "--k", "3", *prior[2:], check=False)
    assert bad.returncode == 2 and "k 2 (this run: 3)" in bad.stderr
    bad = run("cql_prior.py", *common, *prior, "--prior.dist-temperature", "1", check=False)
    assert bad.returncode == 2 and "--prior.dist-temperature 3.0 (this run: 1.0)" in bad.stderr
    allowed = last_json(run("cql_prior.py", *common, *prior, "--prior.dist-temperature", "1", "--allow-mismatch"),
                        "summary ")  # fmt: skip
    assert allowed["dataset_prior_queries"] == 0


def test_llm_server_failure_while_storing_proposals_or_evaluating_is_one_line(tmp_path):
    """build_dataset.py and cql_prior.py with a server that dies: one line each, naming the server; the dataset's
    command goes on from the proposal cache, the CQL run from its checkpoint."""
    with serve_http(FlakyServer) as server:
        env = {"OPENAI_BASE_URL": f"http://127.0.0.1:{server.server_port}/v1"}
        prior = ["--k", "2", "--prior.backend", "openai", "--prior.model", "fake", "--prior.mode", "map",
                 "--prior.cache", str(tmp_path / "priors.sqlite")]  # fmt: skip
        build = ["build_dataset.py", "--env", "frozenlake", "--transitions", "40", "--out", str(tmp_path / "d.jsonl"),
                 "--mix.prior", "0.5", *prior]  # fmt: skip
        FlakyServer.budget = 1
        failed = run(*build, check=False, env=env)
        assert failed.returncode == 2 and failed.stderr.strip().count("\n") == 0, failed.stderr
        assert f"127.0.0.1:{server.server_port}" in failed.stderr and "goes on from there" in failed.stderr
        FlakyServer.budget = 10_000
        info = last_json(run(*build, env=env), "dataset ")
        assert info["k"] == 2
        FlakyServer.budget = 0
        common = ["cql_prior.py", "--dataset", str(tmp_path / "d.jsonl"), "--total-steps", "20", "--eval-freq", "10",
                  "--eval-episodes", "2", "--runs-dir", str(tmp_path / "runs"), *prior[:-2], "--prior.cache",
                  str(tmp_path / "cql.sqlite")]  # fmt: skip
        failed = run(*common, check=False, env=env)
        assert failed.returncode == 2 and failed.stderr.strip().count("\n") == 0, failed.stderr
        assert "evaluating at gradient step 10" in failed.stderr and "--resume" in failed.stderr
        FlakyServer.budget = 10_000
        checkpoint = failed.stderr.split("--resume ")[1].split("`")[0]
        assert last_json(run("cql_prior.py", "--resume", checkpoint, env=env), "summary ")["global_step"] == 20


def test_build_dataset_workers_write_the_same_file(tiny_lm_dir, tmp_path):
    """--workers 2 shares the episodes out to two processes with their own prior: the file is the one a single process
    writes, per-visit draws included (each episode has its own generator)."""
    for per_visit in ([], ["--prior.per-visit"]):
        prior = ["--k", "2", "--prior.model", tiny_lm_dir, "--prior.cache", "memory", *per_visit]
        common = ["--transitions", "80", "--mix.prior", "0.3", "--seed", "2", *prior]
        one = last_json(run("build_dataset.py", *common, "--out", str(tmp_path / "one.jsonl")), "dataset ")
        two = run("build_dataset.py", *common, "--workers", "2", "--out", str(tmp_path / "two.jsonl"))
        assert "proposals: 2 workers" in two.stdout
        info = last_json(two, "dataset ")
        assert info["prior_queries"] >= one["prior_queries"] > 0  # a state in both shards is queried by each worker
        lines_one = (tmp_path / "one.jsonl").read_text().splitlines()
        lines_two = (tmp_path / "two.jsonl").read_text().splitlines()
        assert lines_one[1:] == lines_two[1:] and len(lines_one) > 20  # every record, proposals included
        header_one, header_two = json.loads(lines_one[0]), json.loads(lines_two[0])
        assert header_one["prior_args"]["score_normalize"] == "mean"  # `auto`, resolved for Overcooked
        for h in (header_one, header_two):
            h.pop("prior_queries"), h.pop("prior_seconds_per_query")
        # The workers run torch with fewer threads than the single process, so matrix products sum in another order
        # and the prior's probabilities differ in the last bits (seen: 1e-11): the drawn proposals above are equal,
        # the averaged probability in the header equal to float tolerance.
        floats = {key for key, value in header_one.items() if isinstance(value, float)}
        assert {key: header_two[key] for key in floats} == pytest.approx({key: header_one[key] for key in floats})
        assert {key: v for key, v in header_one.items() if key not in floats} == \
            {key: v for key, v in header_two.items() if key not in floats}


@pytest.mark.slow
def test_smoke_embedded_prior(tmp_path):
    """The embedded Gemma-3-270M fills the proposals of one expert episode; training uses them without a query."""
    data = tmp_path / "salad_gemma.jsonl"
    info = last_json(run("build_dataset.py", "--transitions", "5", "--mix.expert", "1", "--mix.noisy", "0",
                         "--mix.random", "0", "--success-share", "None", "--out", str(data), "--k", "2", "--history",
                         "0"), "dataset ")  # fmt: skip
    assert info["episodes"] == 1 and info["successful_episodes"] == 1 and "gemma" in info["prior"]
    assert info["expert_action_in_proposals"] is not None and info["expert_action_rank"] >= 1
    summary = last_json(run("cql_prior.py", "--dataset", str(data), "--k", "2", "--total-steps", "50", "--eval-freq",
                            "50", "--eval-episodes", "1", "--eval-k", "0", "--runs-dir", str(tmp_path)),
                        "summary ")  # fmt: skip
    assert summary["dataset_prior_queries"] == 0 and summary["prior_queries"] == 0
