"""GFlan-Prior: PPO on a language-model policy regularised towards an LLM prior (Yan et al., ICLR 2025, Sec. 3.3).

The policy is GLAM's (Carta et al. 2023): an LM scores every admissible action by the log-likelihood of its tokens
after the prompt, π_θ(a|s) = softmax_a log p_θ(a|s), and a value head reads the LM's last hidden state of the prompt
(llmprior.policy). PPO maximises (Eq. 8)

    E[ CLIP(π_θ/π_old) Â ] + η H(π_θ(·|s)) − α KL[π_θ(·|s) ‖ p̂_LLM(·|s)],

p̂_LLM the empirical distribution of the prior's k proposals, smoothed: (1 − λ)·count(a)/k + λ/|A(s)| with λ = 0.01,
which keeps the KL finite on unproposed actions (the KL is exact over the action set). `--kl-coef 0` is GFlan;
`--sub-action-space` is GFlan-Prior (Sub-AS), Eq. 26: PPO over the prior's distinct proposals only (Eq. 26 has no
KL term: pass `--kl-coef 0` with it). Not in the authors' code (they never released the policy-based half); choices
and measurements are in docs/gflan_prior.md. The default policy LM is the embedded SmolLM2-135M-Instruct with LoRA on
its top 8 blocks (the paper's Flan-T5-small works where a hub is reachable: `--policy.model google/flan-t5-small`).
Truncated episodes bootstrap from V(s_T).

    python gflan_prior.py --env frozenlake --kl-coef 0.01 --k 5                 # GFlan-Prior (KL), Eq. 8
    python gflan_prior.py --env frozenlake --kl-coef 0                          # GFlan
    python gflan_prior.py --env frozenlake --kl-coef 0 --sub-action-space       # GFlan-Prior (Sub-AS), Eq. 26
    python gflan_prior.py --env babyai-gotoredball --total-timesteps 20000      # App. 9.4, Fig. 7
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Literal, Optional

import numpy as np
import torch

from llmprior import runs
from llmprior.runs import UserError, check, check_args

PRIOR_SMOOTHING = 0.01  # λ of p̂ = (1 − λ)·counts/k + λ/|A(s)|: 99% of the mass on the proposals, log(π/p̂) bounded


@dataclass
class PriorArgs:
    model: str = "gemma"
    """the LLM: `gemma` (embedded Gemma-3-270M base), `smollm2` (embedded SmolLM2-135M-Instruct), a .gguf file, a
    local HF folder or hub id; with `--prior.backend openai` the server's model name ("" = its first)"""
    backend: Literal["transformers", "vllm", "openai", "synthetic"] = "transformers"
    """`transformers` (CPU or CUDA), `vllm` (CUDA), `openai` (a server at $OPENAI_BASE_URL), `synthetic` (no LLM: the
    prior of known quality --prior.synthetic-q, a diagnostic)"""
    mode: Literal["dist", "map", "constrained", "topk"] = "dist"
    """`dist`: k draws from softmax(log p(a|s) / dist_temperature) over the admissible actions (p_LLM^dist);
    `map`: k free-form samples projected onto the actions (p_LLM^map); `constrained`: sampling within the action
    strings; `topk`: the k best-scored distinct actions"""
    dist_temperature: float = 3.0
    """temperature of `dist` over the actions' log-likelihoods; 1 = the LLM's own distribution"""
    score_normalize: Literal["auto", "sum", "mean", "pmi"] = "auto"
    """an action's score: the `sum` of its tokens' log-probabilities (the paper's), their `mean`, or `pmi` (the sum
    minus the action's sum after the content-free prompt "Action:"); `auto`: per env family, the one measured best
    for the embedded prior (llmprior.prompts.default_score_normalize: mean on Overcooked, pmi on ALFWorld, sum
    elsewhere)"""
    uniform_mix: float = 0.0
    """ε: proposals come from (1 − ε)·p_LLM + ε·uniform, so that every admissible action keeps a chance"""
    per_visit: bool = False
    """if toggled, every visit of a state draws k new proposals from its (cached) distribution, the paper's "query LLM
    per step"; by default a state's proposals are drawn once ("DQN-Prior (Cache)")"""
    synthetic_q: float = 1.0
    """`synthetic`: p(a|s) = Q·1[a = a*(s)] + (1 − Q)/|A(s)|, a* the env's expert action"""
    cache: str = "disk"
    """proposals and scores: `disk` ($LLMPRIOR_CACHE/priors.sqlite, shared by runs), `memory`, `off`, or the path of
    a .sqlite file of its own"""


@dataclass
class PolicyArgs:
    model: str = "smollm2"
    """the policy LM: `smollm2` (embedded SmolLM2-135M-Instruct), `gemma` (embedded Gemma-3-270M base), a .gguf file,
    a local HF folder or hub id, causal or seq2seq (e.g. `google/flan-t5-small`, the paper's)"""
    lora_layers: Optional[int] = 8
    """LoRA (rank 8) on the top N transformer blocks (None = all): backpropagation stops at the lowest adapted block;
    0 = no LoRA, every weight trains"""
    micro_batch: int = 16
    """distinct prompts per forward pass; a minibatch runs in such chunks, its gradients accumulated"""


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    cuda: bool = True
    """if toggled, cuda will be used when available (the policy and the LLM)"""
    track: bool = False
    """if toggled, the run is mirrored to Weights and Biases ($WANDB_PROJECT, $WANDB_ENTITY)"""
    resume: Optional[str] = None
    """a run's checkpoint.pt: continue that run, in its folder"""
    runs_dir: str = "runs"
    """where run folders go"""
    eval_freq: int = 512
    """evaluate (and checkpoint) at the end of the PPO iteration that crosses each multiple of this many env steps"""
    eval_episodes: int = 10
    """greedy evaluation episodes (the most probable action)"""

    env: str = "frozenlake"
    """the environment: an id (envs.ENV_IDS), `package.module:ClassName` or a gymnasium id, with `,key=value` keywords
    (docs/envs.md)"""
    total_timesteps: int = 2560
    """env steps, summed over the lockstep envs"""
    k: int = 5
    """proposals per state (the paper: 5); 0 = no prior (GFlan)"""
    prior: PriorArgs = field(default_factory=PriorArgs)
    """the LLM prior"""
    policy: PolicyArgs = field(default_factory=PolicyArgs)
    """the language-model policy"""
    kl_coef: float = 0.01
    """α of Eq. 8, the weight of KL[π_θ(·|s) ‖ p̂_LLM(·|s)] (the paper's tables: 0.01); 0 = GFlan (no KL)"""
    sub_action_space: bool = False
    """if toggled, PPO acts and learns over the prior's distinct proposals only: GFlan-Prior (Sub-AS), Eq. 26"""
    learning_rate: float = 1e-4
    """Adam learning rate (the paper's tables: 1e-4)"""
    num_envs: int = 4
    """envs stepped in lockstep"""
    num_steps: int = 32
    """steps per env in each rollout"""
    gamma: float = 0.99
    """discount factor"""
    gae_lambda: float = 0.99
    """λ of generalised advantage estimation (GLAM: 0.99)"""
    num_minibatches: int = 2
    """minibatches per epoch (the default gives GLAM's and the paper's minibatch of 64)"""
    update_epochs: int = 4
    """epochs over the rollout per PPO iteration"""
    clip_coef: float = 0.2
    """surrogate clipping coefficient (the value loss is clipped with it too)"""
    ent_coef: float = 0.01
    """η, the weight of the entropy bonus"""
    vf_coef: float = 0.5
    """weight of the value loss"""


# A resumed run takes these from its command line when given there; everything else comes from its checkpoint.
RESUME_OVERRIDES = ("total_timesteps", "cuda", "track", "policy.micro_batch")


# ---------------- ALGO: losses (pure functions, unit-tested) ----------------
def empirical_prior(proposals: list[str], actions: list[str], smoothing: float) -> np.ndarray:
    """p̂_LLM(·|s) over `actions` from k proposals, mixed with the uniform distribution: (1 − λ)·count/k + λ/|A|."""
    counts = np.array([proposals.count(a) for a in actions], dtype=np.float64)
    if counts.sum() == 0:
        return np.full(len(actions), 1.0 / len(actions))
    return (1.0 - smoothing) * counts / counts.sum() + smoothing / len(actions)


def kl_to_prior(scores: torch.Tensor, prior_probs: torch.Tensor) -> torch.Tensor:
    """KL[π(·|s) ‖ p̂(·|s)] per state, exact over each state's actions; `scores` [B, A] is -inf past a state's last
    action, where `prior_probs` is 0."""
    probs, logp = _masked_log_softmax(scores)
    return (probs * (logp - torch.log(prior_probs.clamp_min(1e-30)))).sum(-1)


def entropy(scores: torch.Tensor) -> torch.Tensor:
    probs, logp = _masked_log_softmax(scores)
    return -(probs * logp).sum(-1)


def _masked_log_softmax(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(π, log π) with log π set to 0 where a state has no action: 0 * -inf would be a NaN in the backward pass even
    where torch.where hides it in the forward pass (states with fewer actions than the batch's widest are padded)."""
    logp = torch.log_softmax(scores, dim=-1)
    return logp.exp(), torch.where(torch.isfinite(scores), logp, torch.zeros_like(logp))


def compute_gae(rewards: np.ndarray, values: np.ndarray, ends: np.ndarray, next_value: np.ndarray, gamma: float,
                gae_lambda: float) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """GAE(λ) over a [T, N] rollout; ends[t] = the episode ended with action t (a truncated episode's reward already
    holds γ·V(s_T)). -> (advantages, returns)."""
    advantages = np.zeros_like(rewards)
    last = np.zeros_like(next_value)
    for t in reversed(range(len(rewards))):
        following = next_value if t == len(rewards) - 1 else values[t + 1]
        nonterminal = 1.0 - ends[t]
        delta = rewards[t] + gamma * following * nonterminal - values[t]
        last = delta + gamma * gae_lambda * nonterminal * last
        advantages[t] = last
    return advantages, advantages + values


def ppo_loss(
    scores: torch.Tensor,
    values: torch.Tensor,
    actions: torch.Tensor,
    old_logprobs: torch.Tensor,
    old_values: torch.Tensor,
    advantages: torch.Tensor,
    returns: torch.Tensor,
    prior_probs: Optional[torch.Tensor],
    clip_coef: float,
    ent_coef: float,
    vf_coef: float,
    kl_coef: float,
    clip_vloss: bool = True,
    reduction: str = "mean",
) -> dict[str, torch.Tensor]:
    """Eq. 8 as a loss to minimise: clipped surrogate − η·entropy + c_v·value loss + α·KL[π_θ ‖ p̂_LLM].

    `scores` [B, A] are the policy's action scores (softmax = π_θ, -inf past a state's last action); `reduction`
    `sum` lets a minibatch be processed in chunks whose sums are divided by the minibatch size.
    """
    logp_all = torch.log_softmax(scores, dim=-1)
    logp = logp_all.gather(1, actions.unsqueeze(1)).squeeze(1)
    log_ratio = logp - old_logprobs
    ratio = log_ratio.exp()
    pg = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip_coef, 1 + clip_coef))
    if clip_vloss:
        clipped = old_values + (values - old_values).clamp(-clip_coef, clip_coef)
        v = 0.5 * torch.max((values - returns) ** 2, (clipped - returns) ** 2)
    else:
        v = 0.5 * (values - returns) ** 2
    ent = entropy(scores)
    kl = kl_to_prior(scores, prior_probs) if prior_probs is not None else torch.zeros_like(pg)
    loss = pg - ent_coef * ent + vf_coef * v + kl_coef * kl
    with torch.no_grad():
        approx_kl = (ratio - 1) - log_ratio  # the k3 estimator of KL(π_old ‖ π_θ)
        clipped_frac = ((ratio - 1.0).abs() > clip_coef).float()
    reduce = torch.sum if reduction == "sum" else torch.mean
    return {"loss": reduce(loss), "policy_loss": reduce(pg), "value_loss": reduce(v), "entropy": reduce(ent),
            "kl_to_prior": reduce(kl), "approx_kl": reduce(approx_kl), "clipfrac": reduce(clipped_frac)}  # fmt: skip


# ---------------- ALGO: training loop ----------------
def train(args: Args) -> dict:
    args, ckpt = runs.load_resume(args, Args, RESUME_OVERRIDES)
    validate(args)  # every flag, before any model loads
    run = runs.new_run(args, ckpt, args.env)
    stop = runs.StopFlag()
    rng = runs.seed_everything(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    batch_size = args.num_envs * args.num_steps
    minibatch_size, num_iterations = batch_size // args.num_minibatches, args.total_timesteps // batch_size
    use_prior = args.k > 0 and (args.kl_coef > 0 or args.sub_action_space)
    import envs
    from llmprior.prompts import resolve_score_normalize

    env_id = envs.registered_id(args.env)  # what the prompts key on ("" for an env from elsewhere: the generic one)
    prior_args = resolve_score_normalize(args.prior, env_id)
    synthetic = use_prior and args.prior.backend == "synthetic"
    # the expert's action for the synthetic prior, and for measuring the prior's coverage where it is cheap
    slots = [EnvSlot(make_env(args.env, expert=synthetic)) for _ in range(args.num_envs)]
    eval_env = make_env(args.env, expert=synthetic)
    prior = LLMPrior(prior_args, args.seed, device) if use_prior else None
    from llmprior.policy import finite_step, load_policy
    from llmprior.prompts import default_history, default_policy_history

    try:
        lora = args.policy.lora_layers
        policy = load_policy(args.policy.model, device, lora, lora_r=0 if lora == 0 else 8)
    except (OSError, ImportError) as err:
        raise UserError(f"--policy.model {args.policy.model}: {err}") from None
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=args.learning_rate, eps=1e-5)
    actor = Actor(env_id, policy, prior, args.k, args.sub_action_space, default_history(env_id),
                  default_policy_history(env_id), args.policy.micro_batch)  # fmt: skip

    s = {"iteration": 0, "global_step": 0, "next_episode": 0, "covered": 0, "coverage_states": 0, "best_eval": None,
         "recent_returns": [], "recent_success": [], "skipped": 0, "replays": [(None, [])] * args.num_envs}  # fmt: skip
    if ckpt is not None:
        policy.load_state_dict(ckpt["policy"], strict=False)
        optimizer.load_state_dict(ckpt["optimizer"])
        runs.set_rng_state(ckpt["rng"], rng)
        s = ckpt["loop"]
        if prior is not None:
            prior.load_counters(ckpt["prior_counters"])
    run.open(asdict(args))
    print(f"{'resumed' if ckpt else 'started'} {run.folder} at iteration {s['iteration']} on {device}", flush=True)
    # Each env's episode is (seed, actions): resuming replays it in the (deterministic) env.
    for slot, (seed, actions) in zip(slots, s["replays"]):
        if seed is None:
            seed, s["next_episode"] = args.seed + s["next_episode"], s["next_episode"] + 1
        slot.start(seed, actions)

    def boundary() -> dict:
        """The state between two PPO iterations: what a checkpoint holds."""
        return {"policy": policy.trainable_state_dict(), "optimizer": copy.deepcopy(optimizer.state_dict()),
                "rng": runs.rng_state(rng), "prior_counters": prior.counters() if prior else None,
                "loop": copy.deepcopy({**s, "replays": [(slot.seed, slot.actions) for slot in slots]})}  # fmt: skip

    def stopped(state: dict, why: str) -> runs.Stopped:
        path = run.save_checkpoint(state)
        return runs.Stopped(f"stopped by {why} at iteration {state['loop']['iteration']}; saved {path}; continue "
                            f"with `python {os.path.basename(__file__)} --resume {path}`")  # fmt: skip

    progress = runs.Progress(args.total_timesteps, "step", s["global_step"])
    while True:
        step = s["global_step"]
        crossed = step // args.eval_freq > (step - batch_size) // args.eval_freq
        if step > 0 and (crossed or s["iteration"] == num_iterations) and run.last_eval != step:
            try:
                result = {f"eval/{k}": v for k, v in evaluate(actor, eval_env, args.eval_episodes, stop).items()}
            except runs.Interrupted:
                result = None  # dropped: the resumed run evaluates again
            if result is not None:
                s["best_eval"] = max(s["best_eval"] or -np.inf, result["eval/return_mean"])
                run.log_eval(step, result)
                print("eval " + " ".join(f"{k} {v:.3f}" for k, v in result.items()), flush=True)
                run.save_checkpoint(boundary())
        start = boundary()  # a stop or a failure inside the next iteration goes back to here
        if stop.requested:
            raise stopped(start, stop.requested)
        if s["iteration"] >= num_iterations:
            break
        try:
            means, update_seconds = ppo_iteration(args, s, actor, policy, prior, slots, optimizer, params, rng, run,
                                                  stop, finite_step, batch_size, minibatch_size)  # fmt: skip
        except runs.Interrupted:
            raise stopped(start, stop.requested) from None
        except ConnectionError as err:  # an LLM server that fails
            raise UserError(f"{err}; {stopped(start, 'the failure')}") from None
        step = s["global_step"]
        stats = {"losses/policy_loss": means["policy_loss"], "losses/value_loss": means["value_loss"],
                 "losses/kl_to_prior": means["kl_to_prior"], "losses/approx_kl": means["approx_kl"],
                 "losses/clipfrac": means["clipfrac"], "charts/entropy": means["entropy"],
                 "charts/update_seconds": update_seconds, "charts/skipped_minibatches": s["skipped"],
                 "charts/SPS": (step - progress.start_done) / max(time.time() - progress.start, 1e-9)}  # fmt: skip
        recent = {k: np.mean(s[k]) if s[k] else float("nan") for k in ("recent_returns", "recent_success")}
        text = (f"iteration {s['iteration']}/{num_iterations} return {recent['recent_returns']:.3f} success "
                f"{recent['recent_success']:.2f} entropy {means['entropy']:.3f} kl_to_prior {means['kl_to_prior']:.3f} "
                f"update {update_seconds:.1f} s")  # fmt: skip
        if prior is not None:
            stats.update({"prior/queries": prior.queries, "prior/cache_hit_rate": prior.cache_hit_rate})
            text += f" | LLM queries {prior.queries} cache hit {prior.cache_hit_rate:.2f}"
        if s["coverage_states"]:
            stats["prior/coverage"] = s["covered"] / s["coverage_states"]
            text += f" coverage {stats['prior/coverage']:.2f}"
        run.log(stats, step)
        progress.line(step, text)

    torch.save(policy.trainable_state_dict(), run.path("policy.pt"))
    final = {k: v for k, v in last_eval(run.path("eval.jsonl")).items() if k not in ("global_step",)}
    return run.finish({"device": str(device), "global_step": s["global_step"], "iterations": s["iteration"],
                       "episodes": s["next_episode"] - args.num_envs, **final, "best_eval_return": s["best_eval"],
                       "prior_queries": prior.queries if prior else 0,
                       "prior_cache_hit_rate": prior.cache_hit_rate if prior else None,
                       "prior_score_normalize": prior_args.score_normalize if prior else None,
                       "prior_coverage": s["covered"] / s["coverage_states"] if s["coverage_states"] else None,
                       "skipped_minibatches": s["skipped"]})  # fmt: skip


def ppo_iteration(args: Args, s: dict, actor, policy, prior, slots, optimizer, params, rng, run, stop, finite_step,
                  batch_size: int, minibatch_size: int) -> tuple[dict, float]:  # fmt: skip
    """One PPO iteration: a rollout of num_steps in each env with the current policy (π_old), then update_epochs
    epochs of minibatch steps (Eq. 8). -> (the losses' means, seconds of the update)."""
    s["iteration"] += 1
    device = policy.device
    # ALGO LOGIC: collect a rollout with π_old; each distinct state is scored once
    memo: dict = {}
    T, N = args.num_steps, args.num_envs
    rewards, values, ends, logprobs = (np.zeros((T, N)) for _ in range(4))
    batch_states, batch_actions = [], []
    for t in range(T):
        stop.check()
        states = [actor.state(slot.obs, slot.info, slot.history, rng) for slot in slots]
        for n, (slot, st, (scores, value)) in enumerate(zip(slots, states, actor.outputs(states, memo))):
            index = int(rng.choice(len(scores), p=_probs(scores)))
            if st["proposals"] is not None and slot.info.get("expert_action") is not None:
                s["coverage_states"] += 1
                s["covered"] += slot.info["expert_action"] in st["proposals"]
            reward, terminated, truncated = slot.step(st["actions"][index])
            s["global_step"] += 1
            if truncated and not terminated:
                # A time limit is not a terminal state: bootstrap from the value of the state it cut off.
                final = actor.state(slot.obs, slot.info, slot.history, rng)
                reward += args.gamma * actor.outputs([final], memo)[0][1]
            rewards[t, n], values[t, n], ends[t, n] = reward, value, float(terminated or truncated)
            logprobs[t, n] = float(torch.log_softmax(torch.tensor(scores), 0)[index])
            batch_states.append(st)
            batch_actions.append(index)
            if terminated or truncated:
                success = float(slot.info.get("success", False))
                s["recent_returns"] = (s["recent_returns"] + [slot.ep_return])[-20:]
                s["recent_success"] = (s["recent_success"] + [success])[-20:]
                run.log({"charts/episodic_return": slot.ep_return, "charts/episodic_length": len(slot.actions),
                         "charts/success_rate": success}, s["global_step"])  # fmt: skip
                slot.start(args.seed + s["next_episode"], [])
                s["next_episode"] += 1
    next_value = np.array([v for _, v in actor.outputs(
        [actor.state(slot.obs, slot.info, slot.history, rng) for slot in slots], memo)])  # fmt: skip
    advantages, returns = compute_gae(rewards, values, ends, next_value, args.gamma, args.gae_lambda)
    collected = time.time()

    # ALGO LOGIC: PPO epochs over minibatches (Eq. 8); samples are flattened time-major, [t * N + n]
    b_adv, b_ret, b_val, b_logp = advantages.reshape(-1), returns.reshape(-1), values.reshape(-1), logprobs.reshape(-1)
    sums: dict[str, float] = {}
    minibatches, bad_steps = 0, 0
    for _ in range(args.update_epochs):
        order = rng.permutation(batch_size)
        for start in range(0, batch_size, minibatch_size):
            stop.check()
            mb = order[start : start + minibatch_size]
            adv = b_adv[mb]
            if len(mb) > 1:
                adv = (adv - adv.mean()) / (adv.std() + 1e-8)
            # Samples of the same state go into the same chunk, where the policy scores them once.
            keys = [(batch_states[i]["prompt"], tuple(batch_states[i]["actions"])) for i in mb]
            rank = {k: r for r, k in enumerate(dict.fromkeys(keys))}
            chunk_of = [rank[k] // args.policy.micro_batch for k in keys]
            optimizer.zero_grad()
            for c in sorted(set(chunk_of)):
                rows = [j for j, cj in enumerate(chunk_of) if cj == c]
                ids = [int(mb[j]) for j in rows]
                sts = [batch_states[i] for i in ids]
                scores, new_values = policy([st["prompt"] for st in sts], [st["actions"] for st in sts])
                prior_probs = None
                if args.kl_coef > 0 and prior is not None:
                    prior_probs = torch.zeros_like(scores)
                    for r, st in enumerate(sts):
                        prior_probs[r, : len(st["actions"])] = torch.as_tensor(st["prior_probs"])
                out = ppo_loss(
                    scores, new_values, torch.as_tensor([batch_actions[i] for i in ids], device=device),
                    to_tensor(b_logp[ids], device), to_tensor(b_val[ids], device), to_tensor(adv[rows], device),
                    to_tensor(b_ret[ids], device), prior_probs, args.clip_coef, args.ent_coef, args.vf_coef,
                    args.kl_coef, reduction="sum",
                )  # fmt: skip
                (out["loss"] / len(mb)).backward()
                for key, value in out.items():
                    sums[key] = sums.get(key, 0.0) + value.item() / len(mb)
            if finite_step(optimizer, params, MAX_GRAD_NORM):
                bad_steps = 0
            else:  # a NaN/inf gradient: this minibatch is skipped, and a run of them stops training
                s["skipped"], bad_steps = s["skipped"] + 1, bad_steps + 1
                print(f"iteration {s['iteration']}: non-finite gradient; minibatch skipped", flush=True)
                check(bad_steps < 10, f"{bad_steps} non-finite gradients in a row: training diverged")
            minibatches += 1
    return {key: value / minibatches for key, value in sums.items()}, time.time() - collected


# ---------------- The prior's sampling rule ----------------
NULL_PROMPT = "Action:"  # the content-free prompt of --prior.score-normalize pmi
POOL = 20  # `map` / `constrained` with --prior.per-visit: samples kept per state, each visit drawing k of them


def project_to_admissible(output: str, admissible: list[str], word_boundary: bool = True) -> Optional[str]:
    """The authors' projection P(o): the admissible action occurring most often in `output` (case-insensitive), ties to
    the LAST one in `admissible`; None when none occurs. `word_boundary` counts only occurrences not glued to a letter
    or digit: the authors' substring count finds "go to cabinet 1" inside "go to cabinet 10" and "look" in "looking"."""
    text, best, best_count = output.lower(), None, 0
    for action in admissible:
        needle = action.lower()
        if not needle:
            continue
        if word_boundary:
            count = len(re.findall(rf"(?<![0-9a-z]){re.escape(needle)}(?![0-9a-z])", text))
        else:
            count = text.count(needle)
        if count > 0 and count >= best_count:  # >= : ties go to the later action
            best, best_count = action, count
    return best


def query_seed(seed: int, prompt: str, admissible: list[str]) -> int:
    """The seed of a state's draws: a hash of (run seed, prompt, admissible actions), an int32 as servers want."""
    blob = json.dumps([seed, prompt, list(admissible)], ensure_ascii=True).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:4], "little") & 0x7FFFFFFF


def _softmax(scores: np.ndarray) -> np.ndarray:
    z = np.exp(np.asarray(scores, dtype=np.float64) - np.max(scores))
    return z / z.sum()


class LLMPrior:
    """C^k(s), k action proposals per state from a frozen LLM (p_LLM, Sec. 2.2 and App. 9.2), over a backend's
    log-likelihoods (`dist`, `topk`) or samples (`map`, `constrained`), mixed with a uniform draw (--prior.uniform-mix).

    By default a state's proposals are a deterministic function of (seed, prompt, admissible actions): drawn once with
    a seed hashed from them and cached, so the cache changes no result and a resumed run proposes what the
    uninterrupted one would have. With --prior.per-visit every visit draws anew from the state's cached distribution
    (`dist`) or pool of samples, with the caller's generator. Scores are cached on their own: another k, temperature
    or seed costs no LLM call."""

    def __init__(self, args: PriorArgs, seed: int, device: torch.device, authors_code: bool = False) -> None:
        from llmprior.backends import make_backend
        from llmprior.cache import ProposalCache

        self.args, self.seed, self.authors_code = args, seed, authors_code
        try:
            self.backend = make_backend(args.backend, args.model, seed, device, synthetic_q=args.synthetic_q)
        except (OSError, ImportError, ConnectionError) as err:
            raise UserError(f"--prior.model {args.model}: {err}") from None
        self.synthetic = args.backend == "synthetic"
        self.identity = f"{args.backend}:{self.backend.label}:{args.mode}"
        disk = args.cache not in ("disk", "memory", "off")
        self.cache = ProposalCache("disk" if disk else args.cache, args.cache if disk else None)
        self.queries = self.lookups = self.cache_hits = 0  # states that needed the LLM; propose() calls; cache hits
        self.llm_calls = 0  # scorings and samplings (a state may need two: `map` outputs that name no action)
        self.free_outputs = self.unmatched_outputs = 0  # `map`: free-form samples, and those naming no action

    @property
    def cache_hit_rate(self) -> float:
        return self.cache_hits / self.lookups if self.lookups else 0.0

    def counters(self) -> dict:
        names = ("queries", "llm_calls", "lookups", "cache_hits", "free_outputs", "unmatched_outputs")
        return {k: getattr(self, k) for k in names}

    def load_counters(self, counters: dict) -> None:
        for k, v in counters.items():
            setattr(self, k, v)

    def _key(self, what: str, prompt: str, admissible: list[str], identity: str = "", **extra) -> str:
        from llmprior.cache import make_key

        return make_key(what=what, identity=identity or self.identity, numerics=self.backend.numerics,
                        prompt=prompt, admissible=list(admissible), **extra)  # fmt: skip

    def _llm_scores(self, prompt: str, actions: list[str]) -> np.ndarray:
        """[n, 2]: each action's summed log-probability and token count, cached."""
        key = self._key("scores", prompt, actions, identity=self.identity.rsplit(":", 1)[0])  # the same in any mode
        hit = self.cache.get(key)
        if hit is None:
            self.llm_calls += 1
            hit = np.stack(self.backend.score(prompt, list(actions)), axis=1).tolist()
            self.cache.put(key, hit)
        return np.asarray(hit, dtype=np.float64).reshape(-1, 2)

    def scores(self, prompt: str, admissible: list[str], expert: Optional[str] = None) -> np.ndarray:
        """log p(a|s) of each admissible action as --prior.score-normalize says. `expert` (the env's expert action)
        is read by the synthetic prior only."""
        if self.synthetic:
            return self.backend.score(prompt, admissible, expert)[0]
        logp, tokens = self._llm_scores(prompt, admissible).T
        if self.args.score_normalize == "mean":
            return logp / tokens
        if self.args.score_normalize == "pmi":
            # log p(a|s) − log p(a|"Action:"): what the state adds to the action's prior likelihood
            return logp - np.array([self._llm_scores(NULL_PROMPT, [a])[0, 0] for a in admissible])
        return logp

    def distribution(self, prompt: str, admissible: list[str], expert: Optional[str] = None) -> np.ndarray:
        """The `dist` proposal distribution: softmax(scores / T) mixed with the uniform one (the synthetic prior is
        sampled as it is: its quality Q is the point of it)."""
        temperature = 1.0 if self.synthetic else self.args.dist_temperature
        probs = _softmax(self.scores(prompt, admissible, expert) / temperature)
        return (1.0 - self.args.uniform_mix) * probs + self.args.uniform_mix / len(admissible)

    def propose(self, prompt: str, admissible: list[str], k: int, expert: Optional[str] = None,
                rng: Optional[np.random.Generator] = None) -> list[str]:  # fmt: skip
        """k proposals (duplicates kept, as the authors: a proposal drawn twice weighs twice in the softmax)."""
        admissible = list(admissible)
        self.lookups += 1
        calls = self.llm_calls
        if self.args.per_visit:
            self.llm_calls += self.synthetic  # (counted like an LLM's, so that its logs read the same)
            proposals = self._per_visit(prompt, admissible, k, expert, rng)
        else:
            extra = {"expert": expert} if self.synthetic else {}  # the prompt may not determine the expert's action
            key = self._key("proposals", prompt, admissible, k=k, seed=self.seed, settings=self._settings(), **extra)
            proposals = self.cache.get(key)
            if proposals is None:
                self.llm_calls += self.synthetic
                qseed = query_seed(self.seed, prompt, admissible)
                proposals = self._draw(prompt, admissible, k, expert, np.random.default_rng(qseed), qseed)
                self.cache.put(key, proposals)
        self.queries += self.llm_calls > calls
        self.cache_hits += self.llm_calls == calls
        return proposals

    def _settings(self) -> dict:
        a = self.args
        return {"mode": a.mode, "dist_temperature": a.dist_temperature, "score_normalize": a.score_normalize,
                "uniform_mix": a.uniform_mix, "authors_code": self.authors_code}  # fmt: skip

    def _draw(self, prompt: str, admissible: list[str], k: int, expert: Optional[str], rng: np.random.Generator,
              qseed: int) -> list[str]:  # fmt: skip
        mode, n = self.args.mode, len(admissible)
        if mode == "dist":
            return [admissible[i] for i in rng.choice(n, size=k, p=self.distribution(prompt, admissible, expert))]
        if mode == "topk":
            order = np.argsort(-self.scores(prompt, admissible, expert), kind="stable")[:k]
            proposals = [admissible[i] for i in order]
        else:
            proposals = self._samples(prompt, admissible, k, qseed)
        # uniform mix: each proposal is replaced by a uniform draw with probability ε
        mixed = rng.random(len(proposals)) < self.args.uniform_mix
        return [admissible[int(rng.integers(n))] if m else a for a, m in zip(proposals, mixed)]

    def _per_visit(self, prompt: str, admissible: list[str], k: int, expert: Optional[str],
                   rng: np.random.Generator) -> list[str]:  # fmt: skip
        if self.args.mode == "dist":
            return [admissible[i] for i in rng.choice(len(admissible), size=k,
                                                       p=self.distribution(prompt, admissible, expert))]  # fmt: skip
        # `map` / `constrained`: a pool of samples per state, drawn once and cached, then k of them at each visit
        key = self._key("pool", prompt, admissible, seed=self.seed, settings=self._settings())
        pool = self.cache.get(key)
        if pool is None:
            pool = self._samples(prompt, admissible, POOL, query_seed(self.seed, prompt, admissible))
            self.cache.put(key, pool)
        mixed = rng.random(k) < self.args.uniform_mix
        return [admissible[int(rng.integers(len(admissible)))] if m else pool[int(rng.integers(len(pool)))]
                for m in mixed]  # fmt: skip

    def _samples(self, prompt: str, admissible: list[str], k: int, seed: int) -> list[str]:
        """k samples of `map` (projected) or `constrained` mode; an unmatched `map` output becomes a `dist` draw (the
        authors: the last admissible action)."""
        self.llm_calls += 1
        if self.args.mode == "constrained":
            return self.backend.sample_choices(prompt, admissible, k, seed)
        outputs = self.backend.sample(prompt, k, seed)
        projected = [project_to_admissible(o, admissible, not self.authors_code) for o in outputs]
        self.free_outputs += len(outputs)
        self.unmatched_outputs += sum(p is None for p in projected)
        if None in projected:
            if self.authors_code:
                return [admissible[-1] if p is None else p for p in projected]
            probs = _softmax(self.scores(prompt, admissible) / self.args.dist_temperature)
            draws = iter(np.random.default_rng(seed).choice(len(admissible), size=len(projected), p=probs))
            projected = [admissible[next(draws)] if p is None else p for p in projected]
        return projected


# ---------------- Acting and evaluation ----------------
class Actor:
    """What acting needs: a state's prompt and action set, the prior's proposals and p̂, memoised policy outputs."""

    def __init__(self, env_id: str, policy, prior: Optional[LLMPrior], k: int, sub_action_space: bool,
                 prior_history: int, policy_history: int, micro_batch: int):  # fmt: skip
        self.env_id, self.policy, self.prior, self.k = env_id, policy, prior, k
        self.sub_action_space, self.micro_batch = sub_action_space, micro_batch
        self.prior_history, self.policy_history = prior_history, policy_history

    def state(self, obs: str, info: dict, history: list[tuple[str, str]], rng: np.random.Generator) -> dict:
        from llmprior.prompts import build_prompt, policy_prompt

        admissible = list(info["admissible_actions"])
        proposals = None
        if self.prior is not None:
            recent = history[-self.prior_history :] if self.prior_history else []
            proposals = self.prior.propose(build_prompt(self.env_id, info["task"], obs, admissible, recent), admissible,
                                           self.k, info.get("expert_action"), rng)  # fmt: skip
        actions = list(dict.fromkeys(proposals)) if self.sub_action_space else admissible
        recent = history[-self.policy_history :] if self.policy_history else []
        return {"prompt": policy_prompt(info["task"], obs, admissible, recent), "actions": actions,
                "proposals": proposals,
                "prior_probs": empirical_prior(proposals, actions, PRIOR_SMOOTHING) if proposals else None}  # fmt: skip

    @torch.no_grad()
    def outputs(self, states: list[dict], memo: dict) -> list[tuple[np.ndarray, float]]:
        """(action scores, value) per state; the policy runs once per distinct state not already in `memo`."""
        keys = [(st["prompt"], tuple(st["actions"])) for st in states]
        missing = [k for k in dict.fromkeys(keys) if k not in memo]
        for i in range(0, len(missing), self.micro_batch):
            chunk = missing[i : i + self.micro_batch]
            scores, values = self.policy([k[0] for k in chunk], [list(k[1]) for k in chunk])
            for key, sc, v in zip(chunk, scores.float().cpu().numpy(), values.float().cpu().numpy()):
                memo[key] = (sc[: len(key[1])].astype(np.float64), float(v))
        return [memo[k] for k in keys]


class EnvSlot:
    """One of the lockstep envs and its current episode; an episode is (seed, actions), so that resuming replays it."""

    def __init__(self, env) -> None:
        self.env = env

    def start(self, seed: int, replay: list[str]) -> None:
        self.seed, self.actions = seed, []
        self.obs, self.info = self.env.reset(seed=seed)
        self.history: list[tuple[str, str]] = []
        self.ep_return = 0.0
        for a in replay:
            self.step(a)

    def step(self, action: str):
        obs = self.obs
        self.obs, reward, terminated, truncated, self.info = self.env.step(action)
        self.history.append((obs, action))
        self.actions.append(action)
        self.ep_return += reward
        return reward, terminated, truncated


def to_tensor(x, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x), dtype=torch.float32, device=device)


def _probs(scores: np.ndarray) -> np.ndarray:
    z = np.exp(scores - scores.max())
    return z / z.sum()


@torch.no_grad()
def evaluate(actor: Actor, env, episodes: int, stop=None, seed: int = 10_000) -> dict[str, float]:
    """Greedy episodes (the most probable action) on a separately seeded env: mean/std return and success rate."""
    memo: dict = {}
    returns, successes = [], []
    progress = runs.Progress(episodes, "eval episode", first_line_now=False)
    for ep in range(episodes):
        obs, info = env.reset(seed=seed + ep)
        rng = np.random.default_rng(seed + ep)  # (per-visit proposals only)
        history: list[tuple[str, str]] = []
        total, done = 0.0, False
        while not done:
            if stop is not None:
                stop.check()
            if progress.due():
                progress.line(ep, f"(step {len(history)} of episode {ep + 1})")
            st = actor.state(obs, info, history, rng)
            scores, _ = actor.outputs([st], memo)[0]
            action = st["actions"][int(np.argmax(scores))]
            history.append((obs, action))
            obs, reward, terminated, truncated, info = env.step(action)
            total += reward
            done = terminated or truncated
        returns.append(total)
        successes.append(float(info.get("success", False)))
    return {"return_mean": float(np.mean(returns)), "return_std": float(np.std(returns)),
            "success_rate": float(np.mean(successes))}  # fmt: skip


# ---------------- Infrastructure: validation, envs ----------------
MAX_GRAD_NORM = 0.5


def validate(args: Args) -> None:
    """Every flag, in one line each, before anything loads."""
    p = args.prior
    check_args(k=(args.k >= 0, ">= 0"), eval_freq=(args.eval_freq >= 1, ">= 1"),
               eval_episodes=(args.eval_episodes >= 1, ">= 1"), kl_coef=(args.kl_coef >= 0, ">= 0"),
               learning_rate=(args.learning_rate > 0, "> 0"), num_envs=(args.num_envs >= 1, ">= 1"),
               num_steps=(args.num_steps >= 1, ">= 1"), gamma=(0 <= args.gamma <= 1, "in [0, 1]"),
               gae_lambda=(0 <= args.gae_lambda <= 1, "in [0, 1]"), update_epochs=(args.update_epochs >= 1, ">= 1"),
               num_minibatches=(1 <= args.num_minibatches <= args.num_envs * args.num_steps,
                                "in [1, num_envs * num_steps]"),
               clip_coef=(args.clip_coef > 0, "> 0"), ent_coef=(args.ent_coef >= 0, ">= 0"),
               vf_coef=(args.vf_coef >= 0, ">= 0"),
               total_timesteps=(args.total_timesteps >= args.num_envs * args.num_steps,
                                f">= num_envs * num_steps = {args.num_envs * args.num_steps}"))  # fmt: skip
    check_args(**{"policy.micro_batch": (args.policy.micro_batch >= 1, ">= 1"),
                  "policy.lora_layers": (args.policy.lora_layers is None or args.policy.lora_layers >= 0, ">= 0"),
                  "prior.dist_temperature": (p.dist_temperature > 0, "> 0"),
                  "prior.uniform_mix": (0 <= p.uniform_mix <= 1, "in [0, 1]"),
                  "prior.synthetic_q": (0 <= p.synthetic_q <= 1, "in [0, 1]")})  # fmt: skip
    check(not args.sub_action_space or args.k > 0, "--sub-action-space acts over the prior's proposals: needs --k > 0")
    check(args.k > 0 or p == PriorArgs(), "--k 0 is GFlan, without a prior: drop the --prior.* flags")
    check(args.k == 0 or args.kl_coef > 0 or args.sub_action_space,
          "--kl-coef 0 without --sub-action-space is GFlan, which ignores the prior: pass --k 0")  # fmt: skip
    check(not (p.per_visit and p.mode == "topk"), "--prior.per-visit draws anew at each visit; `topk` draws nothing")
    check(p.backend != "synthetic" or p.mode == "dist", "the synthetic prior is a distribution: use --prior.mode dist")


def make_env(env: str, split: Optional[str] = None, expert: bool = False):
    """The env of --env (envs.make_env: a registered id, `package.module:ClassName` or a gymnasium id, with
    `,key=value` keywords) on its game split `split`, with the expert's action where the run needs it (`expert`); a
    bad spec, or an env that does not speak envs/core.py's protocol, is a one-line error before any model loads."""
    import envs

    try:
        return envs.make_env(env, split, expert)
    except envs.EnvSpecError as err:
        raise UserError(f"--env {err}") from err


def last_eval(path: str) -> dict:
    with open(path) as f:
        return json.loads(f.readlines()[-1])


if __name__ == "__main__":
    runs.cli(Args, train)
