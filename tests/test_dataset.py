"""The offline dataset format (docs/dataset_format.md): round trip, validation errors that name the file, line and
field, proposals reused without an LLM query, header checks against a run, and build_dataset.py's mix."""

import json

import pytest
from helpers import run_script

import envs
from build_dataset import MixArgs, action_kind, coverage_by_verb, keep_episode, mix_weights, rollout
from cql_prior import Agent, candidate_sets, dataset_mismatch
from llmprior.data import DATASET_FORMAT, DatasetError, load_dataset, write_dataset
from llmprior.prompts import build_prompt
from llmprior.runs import UserError

HEADER = {"env": "overcooked-salad", "prior": "transformers:tiny:dist", "k": 2, "prior_seed": 1, "history": 1}


def transition(episode, step, obs, action="a", proposals=("a", "b"), next_proposals=("b", "b"), terminated=False):
    return {"episode": episode, "step": step, "task": "serve", "obs": obs, "admissible": ["a", "b", "c"],
            "action": action, "reward": -0.001, "next_obs": obs + "'", "next_admissible": ["a", "b"],
            "terminated": terminated, "truncated": False,
            "proposals": None if proposals is None else list(proposals),
            "next_proposals": None if next_proposals is None else [] if terminated else list(next_proposals),
            }  # fmt: skip


def records():
    return [transition(0, 0, "s0"), transition(0, 1, "s1", action="c", terminated=True), transition(1, 0, "s0")]


def write(path, header=HEADER, recs=None):
    write_dataset(str(path), dict(header), recs if recs is not None else records())
    return str(path)


def test_round_trip(tmp_path):
    path = write(tmp_path / "d.jsonl")
    header, loaded = load_dataset(path)
    assert header == {"format": DATASET_FORMAT, "version": 1, **HEADER}
    assert loaded == records()
    assert open(path).read().endswith("\n") and not list(tmp_path.glob("*.tmp-*"))  # atomic: no temp file left


def test_expert_fields_round_trip_and_are_checked(tmp_path):
    """The optional `expert` / `next_expert` (written with the synthetic prior) come back as written, and an expert
    action outside the admissible ones is an error naming the field."""
    recs = [{**r, "expert": "b", "next_expert": None if r["terminated"] else "a"} for r in records()]
    _, loaded = load_dataset(write(tmp_path / "e.jsonl", recs=recs))
    assert loaded == recs
    bad = write(tmp_path / "bad.jsonl", recs=[{**recs[0], "next_expert": "c"}, *recs[1:]])
    with pytest.raises(DatasetError, match=r"line 2 \(record 1\).*'next_expert'.*'c' is not in next_admissible"):
        load_dataset(bad)


def lines_of(path):
    return open(path).read().splitlines(keepends=True)


@pytest.mark.parametrize(
    "corrupt, expected",
    [
        (lambda ls: ls[:2] + [ls[2][: len(ls[2]) // 2]], ["line 3 (record 2)", "not valid JSON", "truncated"]),
        (lambda ls: [ls[0].replace('"version": 1', '"version": 2')] + ls[1:], ["line 1 (header)", "'version' is 2"]),
        (lambda ls: [ls[0].replace(DATASET_FORMAT, "csv")] + ls[1:], ["line 1 (header)", "'format'"]),
        (lambda ls: [ls[0].replace('"k": 2, ', "")] + ls[1:], ["line 1 (header)", "field 'k' is missing"]),
        (lambda ls: ls[:2] + [ls[2].replace('"reward": -0.001, ', "")] + ls[3:],
         ["line 3 (record 2)", "field 'reward' is missing"]),
        (lambda ls: ls[:1] + [ls[1].replace('"action": "a"', '"action": "z"')] + ls[2:],
         ["line 2 (record 1)", "field 'action'", "'z' is not one of the admissible"]),
        (lambda ls: ls[:1] + [ls[1].replace('"terminated": false', '"terminated": "no"')] + ls[2:],
         ["line 2 (record 1)", "field 'terminated'"]),
        (lambda ls: ls[:1] + [ls[1].replace('"proposals": ["a", "b"]', '"proposals": ["a", "q"]')] + ls[2:],
         ["line 2 (record 1)", "field 'proposals'", "'q'"]),
        (lambda ls: ls[:1], ["no transition"]),
        (lambda ls: [], ["empty file"]),
    ],
)  # fmt: skip
def test_corrupt_file_is_a_clear_error(tmp_path, corrupt, expected):
    path = write(tmp_path / "d.jsonl")
    text = "".join(corrupt(lines_of(path)))
    with open(path, "w") as f:
        f.write(text)
    with pytest.raises(DatasetError) as err:
        load_dataset(path)
    message = str(err.value)
    assert message.startswith(path)
    for part in expected:
        assert part in message


def test_file_cut_at_a_line_boundary_is_caught_by_the_count(tmp_path):
    path = write(tmp_path / "d.jsonl", header={**HEADER, "transitions": 3})
    load_dataset(path)
    text = "".join(lines_of(path)[:-1])
    with open(path, "w") as f:
        f.write(text)
    with pytest.raises(DatasetError, match=r"'transitions' says 3, the file holds 2: truncated"):
        load_dataset(path)


class CountingPrior:
    """A prior that records every query: proposals are the first k admissible actions."""

    def __init__(self):
        self.prompts = []

    def propose(self, prompt, admissible, k, expert=None, rng=None):
        self.prompts.append(prompt)
        return list(admissible[:k])


def test_stored_proposals_need_no_llm_query():
    prior = CountingPrior()
    agent = Agent("overcooked-salad", 2, prior, None, None, 1)
    cands, next_cands, weights = candidate_sets(records(), agent, use_stored=True, rng=None)
    assert prior.prompts == [] and weights == (None, None)  # k draws: no weights (--exact-prior only)
    assert cands == [["a", "b"], ["a", "b"], ["a", "b"]] and next_cands == [["b", "b"], [], ["b", "b"]]


def test_missing_proposals_are_filled_with_the_episodes_history():
    recs = [transition(0, 1, "s1", action="c", proposals=None, next_proposals=None),  # out of order on purpose
            transition(0, 0, "s0", next_proposals=None)]  # fmt: skip
    prior = CountingPrior()
    agent = Agent("overcooked-salad", 2, prior, None, None, 1)
    cands, next_cands, weights = candidate_sets(recs, agent, use_stored=True, rng=None)
    assert cands == [["a", "b"], ["a", "b"]] and next_cands == [["a", "b"], ["a", "b"]]
    # s0 stored; s0' (history: s0,a), s1 (history: s0,a) and s1' (history cut to 1 pair: s1,c) queried
    expected = [build_prompt("overcooked-salad", "serve", "s0'", ["a", "b"], [("s0", "a")]),
                build_prompt("overcooked-salad", "serve", "s1", ["a", "b", "c"], [("s0", "a")]),
                build_prompt("overcooked-salad", "serve", "s1'", ["a", "b"], [("s1", "c")])]  # fmt: skip
    assert prior.prompts == expected


def test_plain_cql_ignores_stored_proposals():
    agent = Agent("overcooked-salad", 0, None, None, None, 0)
    cands, next_cands, weights = candidate_sets(records(), agent, use_stored=False, rng=None)
    assert cands == [["a", "b", "c"]] * 3 and next_cands == [["a", "b"], [], ["a", "b"]] and weights == (None, None)


def test_dataset_mismatch_names_what_differs():
    """The prompt history and the prior's seed are always the dataset's (a run takes them from its header); the
    prior's identity, k and the settings that change its proposals must match the run's."""
    from dataclasses import asdict

    from cql_prior import PriorArgs

    stored = asdict(PriorArgs(dist_temperature=1.0))
    header = {"format": DATASET_FORMAT, "version": 1, **HEADER, "prior_args": stored}
    assert dataset_mismatch(header, "overcooked-salad", "transformers:tiny:dist", 2, stored) == []
    run = {**stored, "dist_temperature": 3.0, "cache": "off"}  # the cache does not change a proposal
    problems = dataset_mismatch(header, "overcooked-salad", "transformers:other:map", 5, run)
    assert problems == ["prior 'transformers:tiny:dist' (this run: 'transformers:other:map')", "k 2 (this run: 5)",
                        "--prior.dist-temperature 1.0 (this run: 3.0)"]  # fmt: skip
    # plain CQL (k = 0) and datasets without stored proposals match any prior
    assert dataset_mismatch(header, "overcooked-salad", None, 0, run) == []
    assert dataset_mismatch({**header, "prior": None}, "overcooked-salad", "x", 5, run) == []


# ---- build_dataset.py ------------------------------------------------------------------------------------------------
def test_success_share_balancing_converges():
    kept, successes = 0, 0
    for success in [True] * 30 + [False, True] * 40:
        if keep_episode(success, kept, successes, 0.75):
            kept, successes = kept + 1, successes + success
    assert successes / kept == pytest.approx(0.75, abs=0.02)
    assert keep_episode(True, 4, 4, None) and not keep_episode(True, 3, 3, 0.75)


def test_mix_weights_are_checked():
    assert mix_weights(MixArgs(expert=1, noisy=1, random=2, prior=0), 0).tolist() == [0.25, 0.25, 0.5, 0.0]
    with pytest.raises(UserError, match="needs --k > 0"):
        mix_weights(MixArgs(prior=1.0), 0)
    with pytest.raises(UserError):
        mix_weights(MixArgs(expert=0, noisy=0, random=0, prior=0), 5)


def test_rollout_kinds():
    import numpy as np

    env = envs.make("overcooked-salad")
    rng = np.random.default_rng(0)
    expert, success, misses = rollout(env, "expert", rng, 0.0, 0)
    assert success and misses == 0 and all(r["action"] == r["_expert"] for r in expert)
    assert [r["step"] for r in expert] == list(range(len(expert))) and expert[-1]["terminated"]
    for a, b in zip(expert, expert[1:]):
        assert (b["obs"], b["admissible"]) == (a["next_obs"], a["next_admissible"])
    random_ep, _, _ = rollout(env, "random", rng, 0.0, 0)
    assert len(random_ep) == 51 and random_ep[-1]["truncated"]  # the paper's Salad cap


def test_builder_is_reproducible_and_records_the_mix(tmp_path):
    outs = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.jsonl"
        run_script("build_dataset.py", "--transitions", "200", "--k", "0", "--seed", "3", "--out", str(out))
        outs.append(out.read_text())
    assert outs[0] == outs[1]
    header, recs = load_dataset(str(tmp_path / "a.jsonl"))
    assert header["transitions"] == len(recs) >= 200 and header["seed"] == 3
    assert header["mix"] == {"expert": 0.1, "noisy": 0.65, "random": 0.25, "prior": 0.0, "epsilon": 0.5}
    kinds = header["episodes_by_kind"]
    assert sum(v["kept"] for v in kinds.values()) == header["episodes"]
    assert sum(v["successful"] for v in kinds.values()) == header["successful_episodes"]
    assert header["success_share"] == header["successful_episodes"] / header["episodes"]
    assert sorted({r["episode"] for r in recs}) == list(range(header["episodes"]))
    assert all(r["proposals"] is None for r in recs)
    assert json.loads(open(tmp_path / "a.jsonl").readline())["format"] == DATASET_FORMAT


def test_coverage_by_verb_counts_the_expert_action_among_the_first_proposals():
    task = "put some pen on desk."
    records = [{"task": task, "_expert": "go to desk 1", "proposals": ["go to bed 1", "go to desk 1", "look"]},
               {"task": task, "_expert": "go to desk 2", "proposals": ["look", "look", "go to desk 2"]},
               {"task": task, "_expert": "go to bed 1", "proposals": ["look", "look", "inventory"]},
               {"task": task, "_expert": "take pen 1 from desk 1", "proposals": ["take pen 1 from desk 1", "look"]}]
    # the way to the desk the task names: one state at j = 2, both at j = 3; the bed, where the pen may lie: never;
    # take: the first proposal already
    assert coverage_by_verb(records, 3) == {"go-named": [2, [0.0, 0.5, 1.0]], "go-search": [1, [0.0, 0.0, 0.0]],
                                            "take": [1, [1.0, 1.0, 1.0]]}  # fmt: skip
    assert action_kind("put a pan on countertop.", "go to countertop 2") == "go-named"
    assert action_kind("put a pan on countertop.", "go to counter 2") == "go-search"  # a whole word only
    assert action_kind("Reach the goal.", "Go left") == "Go"  # other envs: the first word
