"""The synthetic prior of known quality (`--prior.backend synthetic --prior.synthetic-q Q`): its distribution and
coverage against the formula p_Q(a|s) = Q·1[a = a*] + (1 − Q)/|A|, and a tiny run of every script that takes a
prior at Q = 1 (every proposal is then the expert's action, so every evaluation succeeds)."""

import json

import numpy as np
import pytest
import torch
from helpers import last_json, run_script, summary_of

from dqn_prior import LLMPrior, PriorArgs

ACTIONS = ["pick up the tomato", "take the bowl", "walk to the cutting board", "serve nothing", "chop nothing"]


def synthetic(q, **kw):
    return LLMPrior(PriorArgs(backend="synthetic", synthetic_q=q, cache="memory", **kw), 1, torch.device("cpu"))


@pytest.mark.parametrize("q", [0.0, 0.25, 0.5, 1.0])
def test_distribution_is_the_formula(q):
    prior = synthetic(q)
    probs = prior.distribution("any prompt", ACTIONS, expert="take the bowl")
    expected = np.full(5, (1 - q) / 5)
    expected[1] += q
    assert probs == pytest.approx(expected, abs=1e-12)
    assert prior.identity == f"synthetic:q={q:g}:dist" and prior.backend.numerics == "exact"


def test_proposals_and_coverage_follow_the_formula():
    """k i.i.d. draws from p_Q: the share of the expert among many draws is Q + (1 − Q)/|A|, and the chance that k
    draws hold the expert (coverage@k) is 1 − (1 − p)^k. Each prompt is its own state (its own query seed)."""
    q, k, n = 0.25, 3, 4000
    prior = synthetic(q)
    p = q + (1 - q) / len(ACTIONS)
    sets = [prior.propose(f"state {i}", ACTIONS, k, expert="take the bowl") for i in range(n)]
    share = np.mean([a == "take the bowl" for s in sets for a in s])
    coverage = np.mean(["take the bowl" in s for s in sets])
    se = np.sqrt(p * (1 - p) / (n * k))
    assert abs(share - p) < 4 * se
    cov = 1 - (1 - p) ** k
    assert abs(coverage - cov) < 4 * np.sqrt(cov * (1 - cov) / n)
    assert prior.queries == n and prior.lookups == n  # counted like LLM queries
    # the same state gets the same proposals again (the cache), and another expert is another state
    assert prior.propose("state 0", ACTIONS, k, expert="take the bowl") == sets[0]
    assert prior.cache_hits == 1
    assert synthetic(1.0).propose("state 0", ACTIONS, k, expert="serve nothing") == ["serve nothing"] * k


def test_no_expert_is_uniform_and_bad_settings_are_refused(tmp_path):
    assert synthetic(1.0).distribution("p", ACTIONS, expert=None) == pytest.approx(np.full(5, 0.2))
    with pytest.raises(ValueError, match="synthetic-q"):
        synthetic(1.5)
    for argv, message in ((["--prior.mode", "map"], "use --prior.mode dist"),
                          (["--prior.synthetic-q", "2"], "in [0, 1]")):
        result = run_script("dqn_prior.py", "--prior.backend", "synthetic", *argv, "--runs-dir", str(tmp_path),
                            check=False)  # fmt: skip
        assert result.returncode == 2 and message in result.stderr
    # --prior.dist-temperature does not flatten it: Q is the point
    assert synthetic(1.0, dist_temperature=3.0).propose("p", ACTIONS, 4, expert="chop nothing") == ["chop nothing"] * 4


SYNTH = ["--prior.backend", "synthetic", "--prior.synthetic-q", "1", "--prior.cache", "memory"]


def test_dqn_prior_with_a_perfect_prior_succeeds(tmp_path):
    summary = summary_of(run_script("dqn_prior.py", "--total-timesteps", "40", "--eval-freq", "40", "--eval-episodes",
                                    "2", "--learning-starts", "8", "--runs-dir", str(tmp_path), *SYNTH))  # fmt: skip
    assert summary["prior_coverage"] == 1.0 and summary["eval/success_rate"] == 1.0 and summary["prior_queries"] > 0


def test_dqn_prior_on_alfworld_gets_the_planners_action(tmp_path):
    """ALFWorld's expert is the PDDL planner, off by default: the synthetic prior turns it on, in training and in
    both evaluation splits."""
    summary = summary_of(run_script("dqn_prior.py", "--env", "alfworld-pick", "--total-timesteps", "12",
                                    "--eval-freq", "12", "--eval-episodes", "1", "--learning-starts", "100",
                                    "--runs-dir", str(tmp_path), *SYNTH))  # fmt: skip
    assert summary["prior_coverage"] == 1.0
    assert summary["eval/success_rate"] == 1.0 and summary["eval_unseen/success_rate"] == 1.0


def test_build_dataset_and_cql_prior_with_a_perfect_prior(tmp_path):
    data = tmp_path / "salad.jsonl"
    info = last_json(run_script("build_dataset.py", "--transitions", "60", "--out", str(data), "--history", "0",
                                *SYNTH), "dataset ")  # fmt: skip
    assert info["prior"] == "synthetic:q=1:dist" and info["expert_action_in_proposals"] == 1.0
    records = [json.loads(line) for line in open(data).readlines()[1:]]
    assert all(len(set(r["proposals"])) == 1 for r in records)  # k copies of the expert's action
    common = ["--dataset", str(data), "--total-steps", "20", "--eval-freq", "20", "--eval-episodes", "2",
              "--runs-dir", str(tmp_path)]  # fmt: skip
    summary = last_json(run_script("cql_prior.py", *common, *SYNTH), "summary ")
    assert summary["eval/success_rate"] == 1.0 and summary["dataset_prior_queries"] == 0
    # --exact-prior weighs every action by p_Q(a|s), from the expert's actions the dataset keeps: at Q = 1 C(s) is the
    # expert's action alone, as its k proposals are
    assert all(r["expert"] in r["proposals"] for r in records) and all("next_expert" in r for r in records)
    exact = last_json(run_script("cql_prior.py", *common, *SYNTH, "--exact-prior"), "summary ")
    assert exact["eval/success_rate"] == 1.0 and exact["data_action_coverage"] == summary["data_action_coverage"]
    # at Q = 0 every admissible action is in C(s) (CQL's candidate sets)
    uniform = last_json(run_script("cql_prior.py", *common, *SYNTH[:2], "--prior.synthetic-q", "0", "--exact-prior"),
                        "summary ")  # fmt: skip
    assert uniform["data_action_coverage"] == 1.0
    # a run with another Q is another prior: the dataset's stored proposals are not its own
    other = run_script("cql_prior.py", *common, *SYNTH[:2], "--prior.synthetic-q", "0.5", check=False)
    assert other.returncode != 0 and "synthetic:q=1:dist" in other.stderr
    # proposals the dataset does not store cannot be drawn: the expert's action is not in a dataset
    bare = tmp_path / "bare.jsonl"
    run_script("build_dataset.py", "--transitions", "30", "--out", str(bare), "--k", "0")
    refused = run_script("cql_prior.py", *common, "--dataset", str(bare), "--allow-mismatch", *SYNTH, check=False)
    assert refused.returncode != 0 and "only a dataset built with --prior.backend synthetic" in refused.stderr
    no_expert = run_script("cql_prior.py", *common, "--dataset", str(bare), *SYNTH, "--exact-prior", check=False)
    assert no_expert.returncode != 0 and "keeps no expert actions" in no_expert.stderr


def test_exact_prior_agent_candidates_and_weights():
    """The exact agent's C(s) is p's support with log p(a|s) as weights: the expert's action alone at Q = 1, every
    admissible action at log(1/|A|) at Q = 0, and at Q = 0.5 all of them with the expert's weight 0.5 + 0.5/|A|."""
    from cql_prior import Agent

    info = {"admissible_actions": ACTIONS, "task": "t", "expert_action": "take the bowl"}
    rng = np.random.default_rng(0)
    for q, support in ((1.0, ["take the bowl"]), (0.0, ACTIONS), (0.5, ACTIONS)):
        agent = Agent("overcooked-salad", 5, synthetic(q), None, None, 0, exact=True)
        cands, log_p = agent.support("obs", info, [])
        assert cands == support and agent.candidates("obs", info, [], rng) == cands
        expected = [q * (a == "take the bowl") + (1 - q) / len(ACTIONS) for a in cands]
        assert log_p == pytest.approx(np.log(expected))


def test_exact_prior_needs_a_distribution(tmp_path):
    for argv, message in ((["--k", "0"], "--exact-prior"), (["--prior.mode", "map"], "--prior.mode dist"),
                          (["--prior.per-visit"], "--prior.per-visit")):  # fmt: skip
        result = run_script("cql_prior.py", "--dataset", __file__, "--exact-prior", *argv, "--runs-dir", str(tmp_path),
                            check=False)  # fmt: skip
        assert result.returncode != 0 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_gflan_prior_with_a_perfect_prior(tiny_model, tmp_path):
    lm = tiny_model("llama", ["Go Left Go Right Go Up Go Down frozen cell hole goal position"], name="synth-llama")
    summary = summary_of(run_script("gflan_prior.py", "--env", "frozenlake", "--policy.model", lm, "--num-envs", "2",
                                    "--num-steps", "8", "--num-minibatches", "1", "--update-epochs", "1",
                                    "--total-timesteps", "16", "--eval-episodes", "1",
                                    "--runs-dir", str(tmp_path), *SYNTH))  # fmt: skip
    assert summary["prior_coverage"] == 1.0 and summary["prior_queries"] > 0
