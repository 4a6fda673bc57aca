"""BC: behaviour cloning of the language-model policy on an offline dataset (the paper's BC baseline, Table 1).

The policy is gflan_prior.py's (llmprior.policy): a language model scores every admissible action by the
log-likelihood of its tokens after GLAM's prompt, π_θ(a|s) = softmax_a log p_θ(a|s), and BC minimises
−log π_θ(a_data|s) over the dataset's (state, action) pairs, evaluating the greedy policy in the env every
--eval-freq gradient steps. The dataset is the project's offline format (build_dataset.py writes it); the prompt's
history is rebuilt from the episode's earlier transitions.

Not in the authors' code (they never released BC); choices, with reasons (docs/bc.md):
- the same defaults as gflan_prior.py's policy (embedded SmolLM2-135M-Instruct, LoRA on the top 8 blocks, lr 1e-4),
  so that BC and GFlan(-Prior) differ only in the objective;
- batches sample the dataset without replacement, epoch by epoch; samples of the same state share one forward pass;
- the policy's frozen-trunk cache suits BC: every epoch revisits the same states, and a state seen before runs only
  the LoRA-adapted top blocks.

    python build_dataset.py --env overcooked-salad --transitions 1000 --out data/salad_1000.jsonl --k 0
    python bc.py --dataset data/salad_1000.jsonl --total-steps 600
    python bc.py --dataset data/salad_1000.jsonl --policy.model gemma
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np
import torch

from llmprior import runs
from llmprior.runs import UserError, check, check_args

MAX_GRAD_NORM = 0.5


# ---------------- The LM policy's settings ----------------
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
    """if toggled, cuda will be used when available"""
    track: bool = False
    """if toggled, the run is mirrored to Weights and Biases ($WANDB_PROJECT, $WANDB_ENTITY)"""
    resume: Optional[str] = None
    """a run's checkpoint.pt: continue that run, in its folder"""
    runs_dir: str = "runs"
    """where run folders go"""
    eval_freq: int = 100
    """evaluate (and checkpoint) every this many gradient steps, and at the end"""
    eval_episodes: int = 10
    """greedy evaluation episodes (the most probable action)"""

    dataset: Optional[str] = None
    """the offline dataset (build_dataset.py writes one); required"""
    total_steps: int = 500
    """gradient steps"""
    batch_size: int = 32
    """transitions per gradient step"""
    learning_rate: float = 1e-4
    """Adam learning rate"""
    policy: PolicyArgs = field(default_factory=PolicyArgs)
    """the language-model policy"""


# A resumed run takes these from its command line when given there; everything else comes from its checkpoint.
RESUME_OVERRIDES = ("total_steps", "cuda", "track", "policy.micro_batch")


# ---------------- ALGO: samples and loss (pure functions, unit-tested) ----------------
def bc_samples(records: list[dict], history: int) -> list[dict]:
    """(prompt, admissible actions, index of the data action) per transition; the prompt's history is the episode's
    previous (observation, action) pairs, from the dataset itself."""
    from llmprior.prompts import policy_prompt

    by_episode: dict = {}
    for r in records:
        by_episode.setdefault(r["episode"], []).append(r)
    samples = []
    for episode in by_episode.values():
        episode.sort(key=lambda r: r["step"])
        for i, r in enumerate(episode):
            past = [(p["obs"], p["action"]) for p in episode[max(0, i - history) : i]] if history > 0 else []
            samples.append({"prompt": policy_prompt(r["task"], r["obs"], r["admissible"], past),
                            "actions": list(r["admissible"]), "index": r["admissible"].index(r["action"])})  # fmt: skip
    return samples


def bc_loss(scores: torch.Tensor, actions: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """−log π_θ(a_data|s); `scores` [B, A] are the policy's action scores (-inf past a state's last action)."""
    nll = -torch.log_softmax(scores, dim=-1).gather(1, actions.unsqueeze(1)).squeeze(1)
    return nll.sum() if reduction == "sum" else nll.mean()


# ---------------- ALGO: training loop ----------------
def train(args: Args) -> dict:
    import envs
    from llmprior.data import DatasetError, load_dataset
    from llmprior.policy import finite_step, load_policy
    from llmprior.prompts import default_policy_history

    args, ckpt = runs.load_resume(args, Args, RESUME_OVERRIDES)
    validate(args)  # every flag, before any model loads
    try:
        header, records = load_dataset(args.dataset)
    except DatasetError as err:
        raise UserError(f"cannot train on this dataset: {err}") from None
    env_spec = header["env"]  # build_dataset.py's --env
    run = runs.new_run(args, ckpt, env_spec)
    stop = runs.StopFlag()
    rng = runs.seed_everything(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    eval_env = make_env(env_spec)
    try:
        lora = args.policy.lora_layers
        policy = load_policy(args.policy.model, device, lora, lora_r=0 if lora == 0 else 8)
    except (OSError, ImportError) as err:
        raise UserError(f"--policy.model {args.policy.model}: {err}") from None
    params = [p for n, p in policy.named_parameters() if p.requires_grad and not n.startswith("value_head")]
    optimizer = torch.optim.Adam(params, lr=args.learning_rate, eps=1e-5)
    history = default_policy_history(envs.registered_id(env_spec))
    samples = bc_samples(records, history)
    print(f"{len(samples)} transitions from {args.dataset} ({env_spec}, prior {header.get('prior')})", flush=True)

    s = {"step": 0, "best_eval": None, "skipped": 0, "order": np.zeros(0, dtype=np.int64), "cursor": 0,
         "bc_loss": None, "data_prob": None}  # fmt: skip
    if ckpt is not None:
        policy.load_state_dict(ckpt["policy"], strict=False)
        optimizer.load_state_dict(ckpt["optimizer"])
        runs.set_rng_state(ckpt["rng"], rng)
        s = ckpt["loop"]
    run.open(asdict(args))
    print(f"{'resumed' if ckpt else 'started'} {run.folder} at gradient step {s['step']} on {device}", flush=True)

    def checkpoint(rng_state: Optional[dict] = None, loop: Optional[dict] = None) -> str:
        return run.save_checkpoint({"policy": policy.trainable_state_dict(), "optimizer": optimizer.state_dict(),
                                    "rng": rng_state or runs.rng_state(rng), "loop": loop or s})  # fmt: skip

    progress = runs.Progress(args.total_steps, "gradient step", s["step"])
    bad_steps = 0
    while True:
        step = s["step"]
        if step > 0 and (step % args.eval_freq == 0 or step == args.total_steps) and run.last_eval != step:
            try:
                result = {f"eval/{k}": v for k, v in evaluate(policy, eval_env, args.eval_episodes, history,
                                                              stop).items()}  # fmt: skip
            except runs.Interrupted:
                result = None  # dropped: the resumed run evaluates again
            if result is not None:
                s["best_eval"] = max(s["best_eval"] or -np.inf, result["eval/return_mean"])
                run.log_eval(step, result)
                print("eval " + " ".join(f"{k} {v:.3f}" for k, v in result.items()), flush=True)
                checkpoint()
        if stop.requested:
            path = checkpoint()
            raise runs.Stopped(f"stopped by {stop.requested} at gradient step {step}; saved {path}; continue with "
                               f"`python {os.path.basename(__file__)} --resume {path}`")  # fmt: skip
        if step >= args.total_steps:
            break

        # ALGO LOGIC: one gradient step of −log π_θ(a_data|s) on a batch drawn without replacement
        before = (runs.rng_state(rng), dict(s))  # a stop before the optimizer step goes back here: nothing changed
        batch = []
        while len(batch) < args.batch_size:
            if s["cursor"] >= len(s["order"]):
                s["order"], s["cursor"] = rng.permutation(len(samples)), 0
            take = min(args.batch_size - len(batch), len(s["order"]) - s["cursor"])
            batch += [int(i) for i in s["order"][s["cursor"] : s["cursor"] + take]]
            s["cursor"] += take
        keys = [(samples[i]["prompt"], tuple(samples[i]["actions"])) for i in batch]
        rank = {k: r for r, k in enumerate(dict.fromkeys(keys))}
        chunk_of = [rank[k] // args.policy.micro_batch for k in keys]
        optimizer.zero_grad()
        total_loss, data_prob = 0.0, 0.0
        try:
            for c in sorted(set(chunk_of)):
                stop.check()
                ids = [i for i, cj in zip(batch, chunk_of) if cj == c]
                scores, _ = policy([samples[i]["prompt"] for i in ids], [samples[i]["actions"] for i in ids])
                actions = torch.as_tensor([samples[i]["index"] for i in ids], device=device)
                loss = bc_loss(scores, actions, reduction="sum") / len(batch)
                loss.backward()
                total_loss += loss.item()
                with torch.no_grad():
                    data_prob += torch.softmax(scores, dim=-1).gather(1, actions.unsqueeze(1)).sum().item() / len(batch)
        except runs.Interrupted:
            path = checkpoint(*before)
            raise runs.Stopped(f"stopped by {stop.requested} at gradient step {step}; saved {path}; continue with "
                               f"`python {os.path.basename(__file__)} --resume {path}`") from None  # fmt: skip
        if finite_step(optimizer, params, MAX_GRAD_NORM):
            bad_steps = 0
        else:  # a NaN/inf gradient: this step is skipped, and a run of them stops training
            s["skipped"], bad_steps = s["skipped"] + 1, bad_steps + 1
            print(f"gradient step {step + 1}: non-finite gradient; skipped (batch: samples {batch})", flush=True)
            check(bad_steps < 10, f"{bad_steps} non-finite gradients in a row: training diverged")
        s["step"] = step = step + 1
        s["bc_loss"], s["data_prob"] = total_loss, data_prob
        run.log({"losses/bc_loss": total_loss, "charts/data_action_prob": data_prob,
                 "charts/skipped_steps": s["skipped"]}, step)  # fmt: skip
        if progress.due() or step == args.total_steps:
            run.log({"charts/SPS": (step - progress.start_done) / max(time.time() - progress.start, 1e-9)}, step)
            progress.line(step, f"bc_loss {total_loss:.4f} π(a_data|s) {data_prob:.3f}")

    torch.save(policy.trainable_state_dict(), run.path("policy.pt"))
    final = {k: v for k, v in last_eval(run.path("eval.jsonl")).items() if k != "global_step"}
    return run.finish({"device": str(device), "global_step": s["step"], "transitions": len(samples), **final,
                       "best_eval_return": s["best_eval"], "final_bc_loss": s["bc_loss"],
                       "final_data_action_prob": s["data_prob"], "skipped_steps": s["skipped"]})  # fmt: skip


# ---------------- Evaluation ----------------
@torch.no_grad()
def evaluate(policy, env, episodes: int, history: int, stop=None, seed: int = 10_000) -> dict[str, float]:
    """Greedy episodes (the most probable action) on a separately seeded env: mean/std return and success rate."""
    from llmprior.prompts import policy_prompt

    memo: dict = {}
    returns, successes = [], []
    progress = runs.Progress(episodes, "eval episode", first_line_now=False)
    for ep in range(episodes):
        obs, info = env.reset(seed=seed + ep)
        past: list[tuple[str, str]] = []
        total, done = 0.0, False
        while not done:
            if stop is not None:
                stop.check()
            if progress.due():
                progress.line(ep, f"(step {len(past)} of episode {ep + 1})")
            actions = list(info["admissible_actions"])
            prompt = policy_prompt(info["task"], obs, actions, past[-history:] if history > 0 else [])
            if (prompt, tuple(actions)) not in memo:
                memo[(prompt, tuple(actions))] = policy([prompt], [actions])[0][0].double().cpu().numpy()
            index = int(np.argmax(memo[(prompt, tuple(actions))]))
            past.append((obs, actions[index]))
            obs, reward, terminated, truncated, info = env.step(actions[index])
            total += reward
            done = terminated or truncated
        returns.append(total)
        successes.append(float(info.get("success", False)))
    return {"return_mean": float(np.mean(returns)), "return_std": float(np.std(returns)),
            "success_rate": float(np.mean(successes))}  # fmt: skip


# ---------------- Infrastructure: validation, envs ----------------
def validate(args: Args) -> None:
    """Every flag, in one line each, before anything loads."""
    check(args.dataset is not None, "bc.py needs --dataset PATH (build_dataset.py writes one)")
    check(os.path.isfile(args.dataset), f"--dataset {args.dataset}: no such file")
    check_args(total_steps=(args.total_steps >= 1, ">= 1"), batch_size=(args.batch_size >= 1, ">= 1"),
               learning_rate=(args.learning_rate > 0, "> 0"), eval_freq=(args.eval_freq >= 1, ">= 1"),
               eval_episodes=(args.eval_episodes >= 1, ">= 1"),
               **{"policy.micro_batch": (args.policy.micro_batch >= 1, ">= 1"),
                  "policy.lora_layers": (args.policy.lora_layers is None or args.policy.lora_layers >= 0, ">= 0")})


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
