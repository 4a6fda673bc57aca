"""gflan_prior.py: the LM policy's action scores against a slow reference, the loss terms against hand-computed
values, a PPO update on a bandit, and subprocess runs of the script (tiny random models; the embedded ones in the
slow test)."""

import copy
import glob
import math
import os

import numpy as np
import pytest
import torch
from helpers import reference_logliks, script_runner, summary_of

import envs
from gflan_prior import compute_gae, empirical_prior, entropy, kl_to_prior, ppo_loss
from llmprior.policy import LMPolicy, _nbytes, finite_step, load_policy
from llmprior.prompts import policy_prompt

CPU = torch.device("cpu")

# ---- tiny random LMs -------------------------------------------------------------------------------------------------
CORPUS = [
    "Possible action of the agent: Go Left, Go Right, Go Up, Go Down Goal of the agent: Reach the goal (G)",
    "Observation 0: You are in a 4x4 grid where each cell is either a frozen cell (F) indicating a safe position",
    "Action 0: turn left turn right go forward pick up drop toggle You see a wall 2 steps forward red ball",
    "Currently the agent is at position (0, 0), which direction need to take? leads to position start hole (H)",
]


@pytest.fixture(scope="session", params=["llama", "gemma3-sliding", "t5"])
def tiny_dir(request, tiny_model):
    return tiny_model(request.param, CORPUS)


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_model):
    return tiny_model("llama", CORPUS, name="llama-script")


def frozenlake_states(n: int) -> tuple[list[str], list[list[str]]]:
    env = envs.make("frozenlake")
    obs, info = env.reset(seed=0)
    prompts, actions = [], []
    for a in ["Go Down", "Go Down", "Go Right", "Go Right", "Go Down"][:n]:
        prompts.append(policy_prompt(info["task"], obs, info["admissible_actions"], []))
        actions.append(list(info["admissible_actions"]))
        obs, _, _, _, info = env.step(a)
    return prompts, actions


def slow_scores(policy: LMPolicy, prompt: str, actions: list[str]) -> list[float]:
    """Reference: one full forward per action, no padding, no cache."""
    return reference_logliks(policy.lm, [policy.token_ids(prompt, a) for a in actions], seq2seq=policy.seq2seq)


# ---- the policy ------------------------------------------------------------------------------------------------------
def test_action_loglik_matches_slow_reference(tiny_dir):
    policy = load_policy(tiny_dir, CPU, lora_r=0)
    prompts, actions = frozenlake_states(3)
    # Prompts of different lengths, action sets of different sizes, and a duplicate state in one batch.
    prompts += ["Goal of the agent: go to the red ball \n Action 0:", prompts[0]]
    actions += [["turn left", "go forward", "pick up"], actions[0]]
    with torch.no_grad():
        scores, values = policy(prompts, actions)
    for i, (p, acts) in enumerate(zip(prompts, actions)):
        np.testing.assert_allclose(scores[i, : len(acts)].numpy(), slow_scores(policy, p, acts), atol=2e-4)
        assert torch.isinf(scores[i, len(acts) :]).all()
    assert torch.equal(scores[0], scores[4]) and values[0] == values[4]


def test_padding_does_not_change_scores_or_values(tiny_dir):
    policy = load_policy(tiny_dir, CPU, lora_r=0)
    short = "Goal of the agent: go to the red ball \n Action 0:"
    (long,), (acts,) = frozenlake_states(1)
    with torch.no_grad():
        alone_s, alone_v = policy([short], [["turn left", "go forward"]])
        batch_s, batch_v = policy([long, short], [acts, ["turn left", "go forward"]])
    torch.testing.assert_close(batch_s[1, :2], alone_s[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch_v[1], alone_v[0], atol=1e-5, rtol=1e-5)


def test_value_reads_the_last_real_prompt_token(tiny_llama_dir):
    """In a padded batch the value head must read the prompt's last real token, never a pad."""
    policy = load_policy(tiny_llama_dir, CPU, lora_r=0)
    prompt = "Goal of the agent: go to the red ball \n Action 0:"
    p_ids, _ = policy.token_ids(prompt, "go forward")
    with torch.no_grad():
        hidden = policy.lm(input_ids=torch.tensor([p_ids]), output_hidden_states=True).hidden_states[-1][0, -1]
        expected = policy.value_head(hidden).item()
        _, values = policy(["a much longer prompt " * 5 + prompt, prompt], [["go forward"]] * 2)
    assert values[1].item() == pytest.approx(expected, abs=1e-5)


def test_normalisations(tiny_llama_dir):
    prompts, actions = ["Goal of the agent: go \n Action 0:"], [["turn left", "go forward", "toggle"]]
    out = {}
    for norm in ("sum", "token", "word"):
        policy = load_policy(tiny_llama_dir, CPU, lora_r=0, normalize=norm)
        with torch.no_grad():
            out[norm] = policy(prompts, actions)[0][0]
    n_tokens = torch.tensor([len(policy.token_ids(prompts[0], a)[1]) for a in actions[0]], dtype=torch.float32)
    torch.testing.assert_close(out["token"], out["sum"] / n_tokens)
    torch.testing.assert_close(out["word"], out["sum"] / torch.tensor([2.0, 2.0, 1.0]))


def test_lora_on_top_blocks_only(tiny_llama_dir):
    policy = load_policy(tiny_llama_dir, CPU, lora_r=4, lora_layers=1)
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or n.startswith("value_head") for n in trainable)
    assert any("layers.1." in n for n in trainable) and not any("layers.0." in n for n in trainable)
    # LoRA starts as the identity: the scores are the base model's.
    base = load_policy(tiny_llama_dir, CPU, lora_r=0)
    prompts, actions = frozenlake_states(1)
    with torch.no_grad():
        torch.testing.assert_close(policy(prompts, actions)[0], base(prompts, actions)[0])


def test_lora_adapters_train_in_float32_over_a_bfloat16_base(tiny_llama_dir):
    policy = load_policy(tiny_llama_dir, CPU, lora_r=4, lora_layers=1, dtype="bfloat16")
    lora = [p for n, p in policy.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == torch.float32 for p in lora)
    assert policy.lm.get_input_embeddings().weight.dtype == torch.bfloat16
    with torch.no_grad():  # adapters away from the identity, so that they take part in the scores
        for p in lora:
            p.normal_(0.0, 0.3)
    prompts, actions = frozenlake_states(2)
    scores, values = policy(prompts, actions)
    grads = torch.autograd.grad(scores.masked_fill(scores.isinf(), 0.0).sum(), lora)
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_eager_attention_gives_the_same_scores(tiny_dir):
    prompts, actions = frozenlake_states(3)  # prompts of different lengths: left padding
    policies = [load_policy(tiny_dir, CPU, attn_implementation=kind) for kind in (None, "eager")]
    assert policies[1].lm.config._attn_implementation == "eager"
    with torch.no_grad():
        torch.testing.assert_close(policies[0](prompts, actions)[0], policies[1](prompts, actions)[0], rtol=1e-4,
                                   atol=1e-4)  # fmt: skip


def test_token_logps_are_read_at_real_positions_only():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, generator=g)
    targets, mask = torch.tensor([[1, 4, 0], [2, 0, 0]]), torch.tensor([[1, 1, 0], [1, 0, 0]])
    logits[mask == 0] = float("nan")  # whatever sits at the padding stays out of the result
    out = LMPolicy._token_logps(logits, targets, mask)
    expected = torch.log_softmax(torch.nan_to_num(logits), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1) * mask
    torch.testing.assert_close(out, expected)


def test_finite_step_skips_a_nan_or_inf_gradient():
    w = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.Adam([w], lr=0.1)
    for bad in (float("nan"), float("inf")):
        w.grad = torch.tensor([1.0, bad, 1.0])
        assert not finite_step(optimizer, [w], max_grad_norm=0.5)
        assert torch.equal(w.detach(), torch.ones(3)) and not optimizer.state  # no step, no Adam moments
    w.grad = torch.tensor([3.0, 0.0, 4.0])
    assert finite_step(optimizer, [w], max_grad_norm=0.5)
    assert torch.isfinite(w).all() and not torch.equal(w.detach(), torch.ones(3))
    torch.testing.assert_close(w.grad.norm(), torch.tensor(0.5))  # clipped to max_grad_norm before the step


# ---- the frozen-trunk cache (LoRA on the top block of two) ---------------------------------------------------------
def trunk_policy(folder: str, trunk_cache_mb: int, device: str = "cpu", dtype: str = "auto") -> LMPolicy:
    torch.manual_seed(0)  # the same LoRA and value head for every cache size
    policy = load_policy(folder, torch.device(device), lora_r=4, lora_layers=1, trunk_cache_mb=trunk_cache_mb,
                         dtype=dtype)  # fmt: skip
    with torch.no_grad():  # LoRA away from the identity, so that the upper block's adapters matter
        g = torch.Generator().manual_seed(0)
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return policy


def scores_and_grads(policy: LMPolicy, prompts, actions) -> list[torch.Tensor]:
    scores, values = policy(prompts, actions)
    loss = scores.masked_fill(scores.isinf(), 0.0).square().sum() + values.sum()
    return [scores, values, *torch.autograd.grad(loss, [p for p in policy.parameters() if p.requires_grad])]


def test_trunk_cache_gives_the_whole_models_scores_and_gradients(tiny_dir):
    prompts, actions = frozenlake_states(3)
    prompts += ["Goal of the agent: go to the red ball \n Action 0:"]
    actions += [["turn left", "go forward", "pick up"]]
    whole, split = trunk_policy(tiny_dir, 0), trunk_policy(tiny_dir, 64)
    lower_runs = []
    if split._trunk_split() is not None:
        lower = split._lower
        split._lower = lambda batch: lower_runs.append(len(batch[0])) or lower(batch)
    expected = scores_and_grads(whole, prompts, actions)
    for call in range(2):  # the second call reads every state from the cache
        got = scores_and_grads(split, prompts, actions)
        for e, g in zip(expected, got):
            torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)
    if "t5" in os.path.basename(tiny_dir):
        assert split._trunk_split() is None and not split._trunk  # seq2seq: no trunk
    else:
        assert lower_runs == [4] and len(split._trunk) == 4  # the lower block ran once, over the four prompts
        assert split.trunk_cache_bytes > 0 and whole._trunk_split() is not None and not whole._trunk


def test_trunk_cache_needs_frozen_lower_blocks(tiny_llama_dir):
    every_block = load_policy(tiny_llama_dir, CPU, lora_r=4, lora_layers=None, trunk_cache_mb=64)
    full_finetuning = load_policy(tiny_llama_dir, CPU, lora_r=0, trunk_cache_mb=64)
    assert every_block._trunk_split() is None and full_finetuning._trunk_split() is None


def test_a_split_that_changes_the_scores_turns_the_trunk_cache_off(tiny_llama_dir, capsys):
    prompts, actions = frozenlake_states(2)
    whole, split = trunk_policy(tiny_llama_dir, 0), trunk_policy(tiny_llama_dir, 64)
    lower, upper = split._trunk_split()
    broken = copy.copy(upper.model)
    broken._modules = {**upper.model._modules, "norm": torch.nn.Identity()}
    split._split = (lower, copy.copy(upper))
    split._split[1]._modules = {**upper._modules, "model": broken}
    with torch.no_grad():
        torch.testing.assert_close(split(prompts, actions), whole(prompts, actions))
    assert split.trunk_cache_bytes == 0 and not split._trunk and "trunk cache off" in capsys.readouterr().err


def test_trunk_cache_keeps_to_its_size(tiny_llama_dir):
    policy = trunk_policy(tiny_llama_dir, 64)
    prompts, actions = frozenlake_states(5)
    with torch.no_grad():
        policy(prompts[:1], actions[:1])
        one = policy._trunk_size
        policy.trunk_cache_bytes = int(2.5 * one)  # room for about two states
        for p, a in zip(prompts, actions):
            policy([p], [a])
    assert policy._trunk_size == sum(_nbytes(entry) for entry in policy._trunk.values())
    assert 1 <= len(policy._trunk) <= 3 and policy._trunk_size <= policy.trunk_cache_bytes
    assert list(policy._trunk)[-1] == prompts[-1]  # least recently used out first


def test_policy_prompt_is_glams():
    prompt = policy_prompt("go to the red ball", "You see a wall 2 steps forward",
                           ["turn left", "turn right"], [("You see a red ball 1 step left", "turn left")])  # fmt: skip
    assert prompt == (
        "Possible action of the agent: turn left, turn right \n Goal of the agent: go to the red ball \n "
        "Observation 0: You see a red ball 1 step left \n Action 0: turn left \n "
        "Observation 1: You see a wall 2 steps forward \n Action 1:"
    )


# ---- losses ----------------------------------------------------------------------------------------------------------
def test_empirical_prior_is_smoothed_counts():
    p = empirical_prior(["a", "a", "b", "a", "c"], ["a", "b", "c", "d"], smoothing=0.2)
    np.testing.assert_allclose(p, 0.8 * np.array([3, 1, 1, 0]) / 5 + 0.2 / 4)
    assert p.sum() == pytest.approx(1.0) and p[3] > 0


def test_kl_to_prior_hand_computed():
    # π = (1/6, 2/6, 3/6) from scores log(1), log(2), log(3); p̂ from proposals a,a,b,a,c with λ = 0.1 over 3 actions.
    scores = torch.tensor([[0.0, math.log(2.0), math.log(3.0)]])
    prior = torch.tensor(empirical_prior(["a", "a", "b", "a", "c"], ["a", "b", "c"], 0.1)[None], dtype=torch.float32)
    pi, q = [1 / 6, 2 / 6, 3 / 6], [0.9 * 3 / 5 + 0.1 / 3, 0.9 / 5 + 0.1 / 3, 0.9 / 5 + 0.1 / 3]
    expected = sum(p * math.log(p / qq) for p, qq in zip(pi, q))
    assert kl_to_prior(scores, prior).item() == pytest.approx(expected, abs=1e-6)
    # A padded action slot (-inf score, zero prior) contributes nothing.
    padded = kl_to_prior(torch.cat([scores, torch.tensor([[-math.inf]])], 1), torch.cat([prior, torch.zeros(1, 1)], 1))
    assert padded.item() == pytest.approx(expected, abs=1e-6)
    assert entropy(scores).item() == pytest.approx(-sum(p * math.log(p) for p in pi), abs=1e-6)


def _ppo_batch():
    torch.manual_seed(0)
    scores = torch.randn(5, 3)
    scores[4, 2] = -math.inf
    return dict(scores=scores, values=torch.randn(5), actions=torch.tensor([0, 2, 1, 1, 0]),
                old_logprobs=torch.log_softmax(scores + 0.3 * torch.randn(5, 3), -1)[range(5), [0, 2, 1, 1, 0]],
                old_values=torch.randn(5), advantages=torch.randn(5), returns=torch.randn(5))  # fmt: skip


def test_alpha_zero_is_plain_ppo():
    b = _ppo_batch()
    prior = torch.softmax(torch.randn(5, 3), -1)
    prior[4, 2] = 0.0
    out = ppo_loss(**b, prior_probs=prior, clip_coef=0.2, ent_coef=0.01, vf_coef=0.5, kl_coef=0.0)
    # CleanRL's PPO loss, written out independently.
    logp = torch.log_softmax(b["scores"], -1)[range(5), b["actions"]]
    ratio = (logp - b["old_logprobs"]).exp()
    pg = torch.max(-b["advantages"] * ratio, -b["advantages"] * ratio.clamp(0.8, 1.2)).mean()
    v_clipped = b["old_values"] + (b["values"] - b["old_values"]).clamp(-0.2, 0.2)
    v = 0.5 * torch.max((b["values"] - b["returns"]) ** 2, (v_clipped - b["returns"]) ** 2).mean()
    probs = torch.softmax(b["scores"], -1)
    ent = -(probs * torch.log_softmax(b["scores"], -1)).nan_to_num().sum(-1).mean()
    assert out["loss"].item() == pytest.approx((pg - 0.01 * ent + 0.5 * v).item(), abs=1e-6)
    with_kl = ppo_loss(**b, prior_probs=prior, clip_coef=0.2, ent_coef=0.01, vf_coef=0.5, kl_coef=0.3)
    assert with_kl["loss"].item() == pytest.approx(out["loss"].item() + 0.3 * with_kl["kl_to_prior"].item(), abs=1e-6)
    assert with_kl["kl_to_prior"].item() > 0
    summed = ppo_loss(**b, prior_probs=prior, clip_coef=0.2, ent_coef=0.01, vf_coef=0.5, kl_coef=0.3, reduction="sum")
    assert summed["loss"].item() == pytest.approx(5 * with_kl["loss"].item(), abs=1e-5)


def test_padded_action_slots_give_finite_gradients():
    """States with fewer actions than the batch's widest (Sub-AS proposal sets) must not put NaNs into the update."""
    scores = torch.tensor([[0.3, -0.2, 0.1], [0.5, -math.inf, -math.inf]], requires_grad=True)
    prior = torch.tensor([[0.5, 0.25, 0.25], [1.0, 0.0, 0.0]])
    out = ppo_loss(scores, torch.zeros(2), torch.tensor([1, 0]), torch.tensor([-1.0, 0.0]), torch.zeros(2),
                   torch.tensor([1.0, -1.0]), torch.zeros(2), prior, 0.2, 0.01, 0.5, 0.1)  # fmt: skip
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and torch.isfinite(scores.grad).all()
    assert out["entropy"].item() == pytest.approx(entropy(scores[:1]).item() / 2)


def test_kl_gradient_pulls_the_policy_towards_the_prior():
    scores = torch.zeros(1, 3, requires_grad=True)
    prior = torch.tensor([[0.8, 0.1, 0.1]])
    kl_to_prior(scores, prior).sum().backward()
    assert scores.grad[0, 0] < 0 < scores.grad[0, 1]  # gradient descent raises the proposed action's score


def test_gae_hand_computed():
    rewards = np.array([[1.0], [0.0], [2.0]])
    values = np.array([[0.5], [0.4], [0.3]])
    ends = np.array([[0.0], [1.0], [0.0]])
    adv, ret = compute_gae(rewards, values, ends, next_value=np.array([0.2]), gamma=0.9, gae_lambda=0.5)
    d2 = 2.0 + 0.9 * 0.2 - 0.3
    d1 = 0.0 - 0.4  # the episode ends at t=1: no bootstrap
    d0 = 1.0 + 0.9 * 0.4 - 0.5
    np.testing.assert_allclose(adv[:, 0], [d0 + 0.45 * d1, d1, d2])
    np.testing.assert_allclose(ret, adv + values)


def test_ppo_update_on_a_bandit_moves_probability_to_the_rewarded_action(tiny_llama_dir):
    """Two actions, one prompt, reward 1 for "go forward": a few PPO iterations make it the likely action."""
    torch.manual_seed(0)
    policy = load_policy(tiny_llama_dir, CPU, lora_r=0)
    optimizer = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=3e-3)
    prompt, actions = "Goal of the agent: go to the red ball \n Action 0:", ["turn left", "go forward"]
    rng = np.random.default_rng(0)

    def p_forward() -> float:
        with torch.no_grad():
            return torch.softmax(policy([prompt], [actions])[0][0], -1)[1].item()

    before = p_forward()
    for _ in range(8):
        with torch.no_grad():
            scores, values = policy([prompt] * 16, [actions] * 16)
        probs = torch.softmax(scores, -1)
        picks = torch.tensor([int(rng.choice(2, p=p.double().numpy() / p.double().sum().item())) for p in probs])
        rewards = (picks == 1).double().numpy()[None, :]
        old_values = values.double().numpy()[None, :]
        adv, ret = compute_gae(rewards, old_values, np.ones_like(rewards), np.zeros(16), 0.99, 0.95)
        old_logp = torch.log_softmax(scores, -1)[range(16), picks]
        for _ in range(4):
            new_scores, new_values = policy([prompt] * 16, [actions] * 16)
            a = torch.tensor(adv[0], dtype=torch.float32)
            out = ppo_loss(new_scores, new_values, picks, old_logp, values, (a - a.mean()) / (a.std() + 1e-8),
                           torch.tensor(ret[0], dtype=torch.float32), None, 0.2, 0.0, 0.5, 0.0)  # fmt: skip
            optimizer.zero_grad()
            out["loss"].backward()
            optimizer.step()
    after = p_forward()
    assert after > 0.9 and after > before + 0.2, (before, after)


# ---- the script ------------------------------------------------------------------------------------------------------
run_script = script_runner("gflan_prior.py")


def tiny_common(model_dir, tmp_path):
    return ["--env", "frozenlake", "--policy.model", model_dir, "--prior.model", model_dir, "--prior.cache", "off",
            "--num-envs", "2", "--num-steps", "8", "--update-epochs", "2", "--eval-episodes", "1", "--eval-freq", "16",
            "--runs-dir", str(tmp_path)]  # fmt: skip


def test_gflan_prior_resume_is_exact(tiny_llama_dir, tmp_path):
    """GFlan-Prior (KL) with a tiny policy and a tiny prior: a run resumed from its first iteration's checkpoint ends
    with exactly the policy of the uninterrupted run (which also makes same seed -> same numbers)."""
    common = tiny_common(tiny_llama_dir, tmp_path) + ["--kl-coef", "0.5", "--prior.per-visit"]
    full = summary_of(run_script(*common, "--total-timesteps", "48", "--exp-name", "full"))
    assert full["global_step"] == 48 and full["iterations"] == 3 and full["prior_queries"] > 0
    run_script(*common, "--total-timesteps", "16", "--exp-name", "part")
    ckpt = glob.glob(str(tmp_path / "*part*" / "checkpoint.pt"))[0]
    state = torch.load(ckpt, weights_only=False)
    assert state["loop"]["skipped"] == full["skipped_minibatches"] == 0
    state["loop"]["skipped"] = 2  # the count of skipped minibatches goes on from the checkpoint's
    torch.save(state, ckpt)
    resumed = summary_of(run_script("--resume", ckpt, "--total-timesteps", "48"))
    assert resumed["global_step"] == 48 and resumed["skipped_minibatches"] == 2
    a = torch.load(glob.glob(str(tmp_path / "*full*" / "policy.pt"))[0])
    b = torch.load(glob.glob(str(tmp_path / "*part*" / "policy.pt"))[0])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["eval/return_mean"] == full["eval/return_mean"]
    assert resumed["prior_queries"] == full["prior_queries"]


def test_a_stop_inside_a_ppo_iteration_goes_back_to_its_start(tiny_llama_dir, tmp_path, monkeypatch):
    """SIGINT while collecting or while updating: the run saves the state at the start of that iteration and the
    resumed run ends on exactly the uninterrupted policy and evaluations."""
    import signal

    import gflan_prior
    from llmprior import runs

    saved = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    args = dict(env="frozenlake", total_timesteps=48, num_envs=2, num_steps=8, update_epochs=2, eval_episodes=1,
                eval_freq=16, kl_coef=0.5, policy=gflan_prior.PolicyArgs(model=tiny_llama_dir),
                prior=gflan_prior.PriorArgs(model=tiny_llama_dir, cache="memory", per_visit=True))  # fmt: skip
    full = gflan_prior.train(gflan_prior.Args(**args, runs_dir=str(tmp_path / "full")))
    full_dir = glob.glob(str(tmp_path / "full" / "*"))[0]
    # _probs: once per env step of a rollout (16 an iteration); ppo_loss: once per minibatch (4 an iteration)
    for phase, name, at in (("collecting", "_probs", 20), ("updating", "ppo_loss", 6)):
        real, calls = getattr(gflan_prior, name), [0]

        def interrupting(*a, real=real, calls=calls, at=at, **kw):
            calls[0] += 1
            if calls[0] == at:
                os.kill(os.getpid(), signal.SIGINT)
            return real(*a, **kw)

        monkeypatch.setattr(gflan_prior, name, interrupting)
        with pytest.raises(runs.Stopped, match="stopped by SIGINT at iteration 1"):
            gflan_prior.train(gflan_prior.Args(**args, runs_dir=str(tmp_path / phase)))
        monkeypatch.undo()
        part_dir = glob.glob(str(tmp_path / phase / "*"))[0]
        resumed = gflan_prior.train(gflan_prior.Args(resume=os.path.join(part_dir, "checkpoint.pt")))
        a, b = torch.load(os.path.join(full_dir, "policy.pt")), torch.load(os.path.join(part_dir, "policy.pt"))
        assert all(torch.equal(a[k], b[k]) for k in a), phase
        assert open(os.path.join(part_dir, "eval.jsonl")).read() == open(os.path.join(full_dir, "eval.jsonl")).read()
        assert resumed["global_step"] == full["global_step"]  # (the in-memory proposal cache went with the process)
    signal.signal(signal.SIGINT, saved[0])
    signal.signal(signal.SIGTERM, saved[1])


@pytest.mark.parametrize("variant", [["--kl-coef", "0", "--k", "0"], ["--kl-coef", "0", "--sub-action-space"]])
def test_gflan_and_sub_action_space_run(tiny_llama_dir, tmp_path, variant):
    common = tiny_common(tiny_llama_dir, tmp_path)
    if "--k" in variant:  # GFlan: no prior, so no prior flag
        common = common[:4] + common[8:]
    result = run_script(*common, "--total-timesteps", "16", *variant)
    summary = summary_of(result)
    assert summary["global_step"] == 16
    if "--sub-action-space" in variant:
        assert summary["prior_queries"] > 0
    else:
        assert summary["prior_queries"] == 0 and "LLM queries" not in result.stdout  # GFlan builds no prior
    events = glob.glob(str(tmp_path / "*" / "events.out.tfevents*"))
    assert events and os.path.isfile(glob.glob(str(tmp_path / "*" / "eval.jsonl"))[0])


def test_runs_on_babyai_text(tiny_llama_dir, tmp_path):
    common = tiny_common(tiny_llama_dir, tmp_path)
    common[common.index("frozenlake")] = "babyai-gotoredball"
    summary = summary_of(run_script(*common, "--total-timesteps", "16", "--sub-action-space"))
    assert summary["global_step"] == 16 and summary["prior_queries"] > 0


@pytest.mark.parametrize("argv, message", [
    (["--k", "0", "--sub-action-space"], "needs --k > 0"),
    (["--kl-coef", "0"], "--kl-coef 0 without --sub-action-space is GFlan"),
    (["--total-timesteps", "100"], "--total-timesteps must be >= num_envs * num_steps = 128"),
])  # fmt: skip
def test_flags_that_would_be_ignored_or_cannot_run_are_errors(argv, message, tmp_path):
    result = run_script(*argv, "--runs-dir", str(tmp_path), check=False)
    assert result.returncode == 2 and message in result.stderr and not os.listdir(tmp_path)


@pytest.mark.slow
def test_smoke_embedded_models_on_frozenlake(tmp_path):
    """The defaults: the embedded SmolLM2 policy and the embedded Gemma prior, two short PPO iterations."""
    result = run_script("--env", "frozenlake", "--num-envs", "2", "--num-steps", "4", "--num-minibatches", "1",
                        "--update-epochs", "1", "--total-timesteps", "16", "--eval-episodes", "1", "--runs-dir",
                        str(tmp_path))  # fmt: skip
    summary = summary_of(result)
    assert summary["global_step"] == 16 and summary["iterations"] == 2 and summary["prior_cache_hit_rate"] is not None
    assert "kl_to_prior" in result.stdout
