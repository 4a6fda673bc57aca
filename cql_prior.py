"""CQL-Prior: offline Q-learning over the action proposals of a fixed LLM prior (Yan et al., ICLR 2025, Sec. 3.2).

On a fixed dataset D of transitions (Eq. 7):

    L(θ) = β·E_D[log Σ_{a' ∈ C^k(s)} exp Q(s,a') − Q(s,a)] + ½·E_D[(Q(s,a) − y)²],
    y = r + γ(1 − done)·max_{a' ∈ C^k(s') } Q_target(s',a'),

C^k(s) the k actions the prior proposes at s. The conservative term pushes Q down only on the prior's proposals (plain
CQL, Eq. 10, pushes it down on every action); the policy acts over the proposals, a ~ softmax(Q(s,·)/α) over C^k(s).
Q(s,a) is dqn_prior.py's: a 3-layer MLP over a frozen text encoder's embedding of one (s,a) string. The offline
baselines come from this file: `--k 0` is CQL over all admissible actions, `--cql-beta 0` offline DQN-Prior,
`--k 0 --cql-beta 0` offline DQN (Table 1). The dataset (build_dataset.py, docs/dataset_format.md) stores the
proposals, so training needs no LLM; the prior proposes at the new states of an evaluation. Its prompt history and
sampling seed are the dataset's. Deviations, each measured, are in docs/cql_prior.md (`--authors-code` restores the
authors' choices): the TD term is summed over the batch as in the authors' code; the data action joins the
logsumexp set where the prior did not propose it; evaluation samples softmax(Q/0.1) over the proposals.

    python build_dataset.py --env overcooked-salad --transitions 1000 --out data/salad_1000.jsonl --prior.history 0
    python cql_prior.py --dataset data/salad_1000.jsonl                   # CQL-Prior, β=5, 10,000 gradient steps
    python cql_prior.py --dataset data/salad_1000.jsonl --k 0             # CQL over all admissible actions
    python cql_prior.py --dataset data/salad_1000.jsonl --cql-beta 0      # offline DQN-Prior
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from llmprior import runs
from llmprior.runs import UserError, check, check_args


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
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    cuda: bool = True
    """if toggled, cuda will be used when available (networks and the LLM)"""
    track: bool = False
    """if toggled, the run is mirrored to Weights and Biases ($WANDB_PROJECT, $WANDB_ENTITY)"""
    resume: Optional[str] = None
    """a run's checkpoint.pt: continue that run, in its folder"""
    runs_dir: str = "runs"
    """where run folders go"""
    eval_freq: int = 500
    """evaluate (and checkpoint) every this many gradient steps, and at the end (the authors: 500)"""
    eval_episodes: int = 10
    """episodes per evaluation (ALFWorld: on seen and on unseen games each)"""

    dataset: Optional[str] = None
    """the offline dataset (build_dataset.py writes one); required"""
    total_steps: int = 10_000
    """gradient steps (the authors: 10,000); 0 with --load-model only evaluates"""
    k: int = 5
    """proposals per state, C^k(s); 0 = plain CQL over every admissible action"""
    prior: PriorArgs = field(default_factory=PriorArgs)
    """the LLM prior: the dataset's stored proposals come from it (its settings must match the dataset's header); it
    proposes at the new states of an evaluation"""
    encoder: str = "all-MiniLM-L6-v2"
    """frozen text encoder of the (s,a) strings: the embedded all-MiniLM-L6-v2, or e.g. bert-base-uncased (paper)"""
    learning_rate: float = 5e-4
    """AdamW learning rate"""
    gamma: float = 0.99
    """discount factor"""
    tau: float = 0.005
    """soft target update per gradient step; 1 = a hard copy every 20 gradient steps"""
    batch_size: int = 128
    """transitions per gradient step (the authors: 128)"""
    cql_beta: float = 5.0
    """β of Eq. 7, the weight of the conservative penalty (the authors: 5); 0 = offline DQN(-Prior)"""
    loss_reduction: Literal["sum", "mean"] = "sum"
    """TD term over the batch: `sum` (the authors' code; the penalty is a batch mean, so β weighs it against one
    transition's TD error) or `mean` (β against the batch mean: a penalty ~batch-size times stronger)"""
    eval_alpha: float = 0.1
    """evaluation samples softmax(Q/α) over the candidates; 0 = greedy (the paper's argmax)"""
    exact_prior: bool = False
    """if toggled, C(s) is every admissible action the prior supports, weighted by p(a|s), instead of k draws from p
    (their k → ∞ limit; `dist` mode, where the prior is a distribution): the penalty log Σ_a p(a|s)·exp Q(s,a), the
    target the soft value α·log Σ_a' p(a'|s')·exp(Q(s',a')/α) of the policy the evaluation runs, ∝ p(a|s)·exp(Q/α)
    (α = --eval-alpha; at 0 the max over p's support). Experimental: with the embedded prior on Salad it matches CQL
    (with --eval-alpha 0.3 --loss-reduction mean), but with a synthetic prior of Q = 0.5 it fails where the k draws
    succeed (docs/cql_prior.md)"""
    bootstrap_time_limit: bool = False
    """if toggled, a transition cut by the episode cap bootstraps from s' (the textbook treatment of a time limit); by
    default it ends the TD target, as the authors' code"""
    load_model: Optional[str] = None
    """start from this Q-network (a run's q_network.pt); with --total-steps 0 the run only evaluates it (Table 2)"""
    eval_k: Optional[int] = None
    """k at evaluation (default --k; Table 2)"""
    eval_prior_model: Optional[str] = None
    """another LLM to propose at evaluation (same backend and mode; Table 2)"""
    allow_mismatch: bool = False
    """if toggled, train on a dataset whose env, prior or k differ from this run's (Table 2): its stored proposals are
    used as they are"""
    authors_code: bool = False
    """if toggled, the authors' choices: `map` prior with unmatched outputs as the last admissible action and substring
    matching, summed TD, greedy evaluation, the logsumexp over the proposals only (docs/cql_prior.md)"""


# A resumed run takes these from its command line when given there; everything else comes from its checkpoint.
RESUME_OVERRIDES = ("total_steps", "cuda", "track")


# ---------------- ALGO: network, loss and acting rule ----------------
class QNetwork(nn.Module):
    """The adapter: a 3-layer MLP (hidden 64, as the authors) from a frozen (s,a) embedding to Q(s,a)."""

    def __init__(self, input_dim: int, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(input_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


def td_target(rewards: torch.Tensor, dones: torch.Tensor, next_q: torch.Tensor, next_mask: torch.Tensor,
              gamma: float) -> torch.Tensor:  # fmt: skip
    """Eq. 6: y = r + γ(1 − done)·max_{a' ∈ C^k(s')} Q_target(s', a'); `next_q`/`next_mask` are [B, K] over the
    candidates stored at s'. A row with no candidate bootstraps 0."""
    masked = next_q.masked_fill(~next_mask, float("-inf")).max(dim=1).values
    next_max = torch.where(next_mask.any(dim=1), masked, torch.zeros_like(masked))
    return rewards + gamma * (1.0 - dones) * next_max


def soft_td_target(rewards: torch.Tensor, dones: torch.Tensor, next_q: torch.Tensor, next_mask: torch.Tensor,
                   next_log_weights: torch.Tensor, gamma: float, alpha: float) -> torch.Tensor:  # fmt: skip
    """--exact-prior: y = r + γ(1 − done)·α·log Σ_{a'} p(a'|s')·exp(Q_target(s',a')/α), the value at s' of the
    policy ∝ p·exp(Q/α) (KL-regularised RL's soft Bellman backup; `next_log_weights` [B, K] = log p(a'|s')). It tends
    to td_target's max over p's support as α → 0. A row with no candidate bootstraps 0."""
    logits = (next_q / alpha + next_log_weights).masked_fill(~next_mask, float("-inf"))
    has_set = next_mask.any(dim=1)
    value = alpha * torch.logsumexp(logits.masked_fill(~has_set.unsqueeze(1), 0.0), dim=1)
    return rewards + gamma * (1.0 - dones) * torch.where(has_set, value, torch.zeros_like(value))


def td_loss(q_sa: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """MSE to the TD target; `sum` is the authors' (the gradient then scales with the batch size)."""
    return F.mse_loss(q_sa, target.detach(), reduction=reduction)


def select_action(q: np.ndarray, alpha: float, epsilon: float, rng: np.random.Generator) -> int:
    """Index of the chosen candidate: softmax(Q/α) (Sec. 2.2), greedy at α = 0, ε-greedy on top."""
    if epsilon > 0 and rng.random() < epsilon:
        return int(rng.integers(len(q)))
    if alpha <= 0:
        return int(np.argmax(q))
    p = np.exp((q - q.max()) / alpha)
    return int(rng.choice(len(q), p=p / p.sum()))


def cql_loss(q_sa: torch.Tensor, target: torch.Tensor, cand_q: torch.Tensor, cand_mask: torch.Tensor, beta: float,
             reduction: str = "sum", add_data_action: Optional[torch.Tensor] = None,
             cand_log_weights: Optional[torch.Tensor] = None) -> tuple:  # fmt: skip
    """Eq. 7: β·E[log Σ_{a' ∈ C(s)} exp Q(s,a') − Q(s,a)] + ½·(Q(s,a) − y)² -> (loss, TD term, penalty).

    `cand_q`/`cand_mask` [B, K] hold the candidate set at s: the prior's k proposals (a proposal drawn twice counts
    twice) or every admissible action (CQL, Eq. 10). `add_data_action` [B] marks the rows whose data action joins the
    set. `cand_log_weights` [B, K] (--exact-prior): log p(a'|s), making the sum Σ p(a'|s)·exp Q(s,a'). A row with an
    empty set adds no penalty. `reduction` applies to the TD term; the penalty is a batch mean."""
    if cand_log_weights is not None:
        cand_q = cand_q + cand_log_weights
    logits = cand_q.masked_fill(~cand_mask, float("-inf"))
    has_set = cand_mask.any(dim=1)
    if add_data_action is not None:
        logits = torch.cat([logits, q_sa.masked_fill(~add_data_action, float("-inf")).unsqueeze(1)], dim=1)
        has_set = has_set | add_data_action
    # An all -inf row would give a NaN gradient even under torch.where: give it finite logits, then drop it.
    logits = logits.masked_fill(~has_set.unsqueeze(1), 0.0)
    gap = torch.logsumexp(logits, dim=1) - q_sa
    penalty = torch.where(has_set, gap, torch.zeros_like(gap)).mean()
    td = 0.5 * td_loss(q_sa, target, reduction)
    return td + beta * penalty, td, penalty


# ---------------- ALGO: training loop ----------------
def train(args: Args) -> dict:
    from llmprior.data import DatasetError, file_sha256, load_dataset

    args, ckpt = runs.load_resume(args, Args, RESUME_OVERRIDES)
    validate(args)  # every flag, before any model loads
    try:
        header, records = load_dataset(args.dataset)
    except DatasetError as err:
        raise UserError(f"cannot train on this dataset: {err}") from None
    env_spec = header["env"]  # build_dataset.py's --env
    run = runs.new_run(args, ckpt, env_spec)
    check(ckpt is None or ckpt["dataset_sha256"] == file_sha256(args.dataset),
          f"{args.dataset} changed since the checkpoint was written; resuming needs the same file")
    stop = runs.StopFlag()
    rng = runs.seed_everything(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    reduction, eval_alpha, data_action = args.loss_reduction, args.eval_alpha, True
    if args.authors_code:
        args.prior.mode, reduction, eval_alpha, data_action = "map", "sum", 0.0, False
    import envs
    from llmprior.prompts import resolve_score_normalize

    env_id = envs.registered_id(env_spec)  # what the prompts key on ("" for an env from elsewhere: the generic one)
    prior_args = resolve_score_normalize(args.prior, env_id, args.authors_code)

    # The prior proposes as the dataset's did: its prompt history and seed (then a stored state gets its stored set).
    history = header.get("history") or 0
    prior_seed = header.get("prior_seed") if header.get("prior_seed") is not None else args.seed
    synthetic = args.k > 0 and args.prior.backend == "synthetic"
    eval_envs = make_eval_envs(env_spec, expert=synthetic)
    prior = LLMPrior(prior_args, prior_seed, device, args.authors_code) if args.k > 0 else None
    problems = [] if args.exact_prior else dataset_mismatch(header, env_spec, prior.identity if prior else None, args.k,
                                                            asdict(prior_args))  # stored proposals: unused if exact
    check(not problems or args.allow_mismatch, f"{args.dataset} does not match this run: its {'; '.join(problems)}. "
          "Build the dataset with this run's settings, or pass --allow-mismatch to use its stored proposals")
    # the synthetic p_Q(a|s) of --exact-prior needs the expert's action at every state (uniform at Q = 0: none)
    check(not (synthetic and args.exact_prior and args.prior.synthetic_q > 0) or all("expert" in r for r in records),
          f"{args.dataset} keeps no expert actions, which --exact-prior with the synthetic prior needs: build it with "
          "--prior.backend synthetic (this version of build_dataset.py stores them)")  # fmt: skip
    check(not synthetic or all(r["proposals"] is not None for r in records),
          f"{args.dataset} stores no proposals, and the synthetic prior's come from the expert's action at each state, "
          "which only a dataset built with --prior.backend synthetic keeps: build it so")  # fmt: skip
    from llmprior.encoder import TextEncoder

    encoder = TextEncoder(args.encoder, device)
    if ckpt is not None:
        encoder.load_state_dict(ckpt["encoder"])  # before the dataset, so that its strings keep their rows
    q_network = QNetwork(encoder.dim).to(device)
    if args.load_model:
        q_network.load_state_dict(torch.load(args.load_model, map_location=device, weights_only=True))
    target_network = QNetwork(encoder.dim).to(device)
    target_network.load_state_dict(q_network.state_dict())
    optimizer = torch.optim.AdamW(q_network.parameters(), lr=args.learning_rate)
    agent = Agent(env_id, args.k, prior, encoder, q_network, history, exact=args.exact_prior)
    eval_agent = agent
    if args.eval_k is not None or args.eval_prior_model is not None:
        eval_k = args.k if args.eval_k is None else args.eval_k
        eval_prior = None
        if eval_k > 0:
            model = args.eval_prior_model or args.prior.model
            eval_prior = prior if prior and model == args.prior.model else LLMPrior(
                PriorArgs(**{**asdict(prior_args), "model": model}), prior_seed, device, args.authors_code)
        eval_agent = Agent(env_id, eval_k, eval_prior, encoder, q_network, history, exact=args.exact_prior)

    # C(s) and C(s'): the stored proposals, else the prior's (its cache, then the LLM); every admissible action at k=0
    fill_start, queries = time.time(), prior.queries if prior else 0
    cands, next_cands, log_weights = candidate_sets(records, agent, use_stored=args.k > 0 and not args.exact_prior,
                                                    rng=rng)  # fmt: skip
    data = OfflineData(env_id, records, cands, next_cands, encoder, args.bootstrap_time_limit, *log_weights)
    queries = (prior.queries if prior else 0) - queries
    coverage = float(data.data_in_set.mean())
    print(f"{len(records)} transitions from {args.dataset} ({env_spec}, prior {header['prior']}, k {header['k']}); "
          f"{queries} LLM queries to fill the candidate sets ({time.time() - fill_start:.0f} s); data action among "
          f"them: {coverage:.2f}", flush=True)  # fmt: skip

    s = {"global_step": 0, "best_eval": None, "best_step": None}
    if ckpt is not None:
        q_network.load_state_dict(ckpt["q_network"])
        target_network.load_state_dict(ckpt["target_network"])
        optimizer.load_state_dict(ckpt["optimizer"])
        runs.set_rng_state(ckpt["rng"], rng)
        s = ckpt["loop"]
    run.open(asdict(args))
    run.log({"prior/coverage": coverage}, 0)
    print(f"{'resumed' if ckpt else 'started'} {run.folder} at gradient step {s['global_step']} on {device}",
          flush=True)

    def checkpoint() -> str:
        return run.save_checkpoint({
            "q_network": q_network.state_dict(), "target_network": target_network.state_dict(),
            "optimizer": optimizer.state_dict(), "encoder": encoder.state_dict(), "rng": runs.rng_state(rng),
            "loop": s, "dataset_sha256": file_sha256(args.dataset)})  # fmt: skip

    progress = runs.Progress(args.total_steps, "gradient step", s["global_step"])
    while True:
        step = s["global_step"]
        if (step % args.eval_freq == 0 or step == args.total_steps) and (step or not args.total_steps) \
                and run.last_eval != step:  # fmt: skip
            try:
                result = {f"{name}/{key}": value for name, eval_env in eval_envs.items()
                          for key, value in evaluate(eval_agent, eval_env, args.eval_episodes, eval_alpha, stop,
                                                     name).items()}  # fmt: skip
            except runs.Interrupted:
                result = None  # dropped: the resumed run evaluates again
            except ConnectionError as err:  # an LLM server that fails: the resumed run evaluates again
                path = checkpoint()
                raise UserError(f"{err} (evaluating at gradient step {step}); saved {path}; continue with `python "
                                f"{os.path.basename(__file__)} --resume {path}`") from None  # fmt: skip
            if result is not None:
                if s["best_eval"] is None or result["eval/return_mean"] > s["best_eval"]:
                    s["best_eval"], s["best_step"] = result["eval/return_mean"], step
                run.log_eval(step, result)
                if prior is not None:
                    run.log({"prior/queries": prior.queries, "prior/cache_hit_rate": prior.cache_hit_rate}, step)
                print("eval " + " ".join(f"{k} {v:.3f}" for k, v in result.items()), flush=True)
                checkpoint()
        if stop.requested:
            path = checkpoint()
            raise runs.Stopped(f"stopped by {stop.requested} at gradient step {step}; saved {path}; continue with "
                               f"`python {os.path.basename(__file__)} --resume {path}`")  # fmt: skip
        if step >= args.total_steps:
            break

        # ALGO LOGIC: Eq. 7, conservative over C(s), Bellman max over C(s')
        batch = {key: torch.as_tensor(value, device=device) for key, value in data.sample(args.batch_size, rng).items()}
        with torch.no_grad():
            next_q = target_network(encoder.table[batch["next_sa"]])
            if args.exact_prior and eval_alpha > 0:  # the soft value of the policy the evaluation runs
                target = soft_td_target(batch["rewards"], batch["dones"], next_q, batch["next_mask"],
                                        batch["next_log_weights"], args.gamma, eval_alpha)  # fmt: skip
            else:
                target = td_target(batch["rewards"], batch["dones"], next_q, batch["next_mask"], args.gamma)
        q_sa = q_network(encoder.table[batch["sa"]])
        cand_q = q_network(encoder.table[batch["cand"]])
        # --exact-prior: the k → ∞ limit, in which one added data action weighs nothing
        add_data = ~batch["data_in_set"] if data_action and not args.exact_prior else None
        log_weights = batch["cand_log_weights"] if args.exact_prior else None
        loss, td, penalty = cql_loss(q_sa, target, cand_q, batch["cand_mask"], args.cql_beta, reduction, add_data,
                                     log_weights)  # fmt: skip
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(q_network.parameters(), 1.0)
        optimizer.step()
        s["global_step"] = step = step + 1
        if args.tau < 1.0:
            with torch.no_grad():
                for tp, qp in zip(target_network.parameters(), q_network.parameters()):
                    tp.lerp_(qp, args.tau)
        elif step % 20 == 0:
            target_network.load_state_dict(q_network.state_dict())
        if step % 100 == 0:
            run.log({"losses/td_loss": td.item(), "losses/cql_penalty": penalty.item(),
                     "losses/q_values": q_sa.mean().item()}, step)  # fmt: skip
        if progress.due() or step == args.total_steps:
            run.log({"charts/SPS": (step - progress.start_done) / max(time.time() - progress.start, 1e-9)}, step)
            best = "–" if s["best_eval"] is None else f"{s['best_eval']:.3f}"
            progress.line(step, f"td_loss {td.item():.4f} cql_penalty {penalty.item():.3f} q {q_sa.mean().item():.3f}"
                          f" | best eval return {best}")

    torch.save(q_network.state_dict(), run.path("q_network.pt"))
    final = {k: v for k, v in last_eval(run.path("eval.jsonl")).items() if k != "global_step"}
    return run.finish({"device": str(device), "dataset": args.dataset, "transitions": len(records),
                       "episodes": len({r["episode"] for r in records}), "global_step": s["global_step"], **final,
                       "best_eval_return": s["best_eval"], "best_eval_step": s["best_step"],
                       "data_action_coverage": coverage, "dataset_prior_queries": queries,
                       "prior_queries": prior.queries if prior else 0,
                       "prior_cache_hit_rate": prior.cache_hit_rate if prior else None,
                       "prior_score_normalize": prior_args.score_normalize if prior else None})  # fmt: skip


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
class Agent:
    """What acting needs: the prior's candidate sets, the encoder and the Q-network. With `exact` (cql_prior.py
    --exact-prior) the candidate set is every admissible action the prior supports, each weighted by p(a|s) (the
    k → ∞ limit of k proposals) instead of k draws."""

    def __init__(self, env_id: str, k: int, prior: Optional[LLMPrior], encoder, q: Optional[QNetwork], history: int,
                 max_actions: Optional[int] = None, exact: bool = False):  # fmt: skip
        self.env_id, self.k, self.prior, self.encoder, self.q = env_id, k, prior, encoder, q
        self.history, self.max_actions, self.exact = history, max_actions, exact

    def candidates(self, obs: str, info: dict, history: list[tuple[str, str]], rng: np.random.Generator) -> list[str]:
        """C^k(s) from the prior (the authors' prompt, the last N steps of history), or every admissible action."""
        admissible = info["admissible_actions"]
        if self.prior is None:
            return list(admissible[: self.max_actions])
        if self.exact:
            return self.support(obs, info, history)[0]
        return self.prior.propose(self.prompt(obs, info, history), admissible, self.k, info.get("expert_action"), rng)

    def support(self, obs: str, info: dict, history: list[tuple[str, str]]) -> tuple[list[str], np.ndarray]:
        """(`exact`) the admissible actions the prior supports, and their log p(a|s)."""
        admissible = info["admissible_actions"]
        p = self.prior.distribution(self.prompt(obs, info, history), admissible, info.get("expert_action"))
        keep = [i for i, w in enumerate(p) if w > 0]
        return [admissible[i] for i in keep], np.log(p[keep])

    def prompt(self, obs: str, info: dict, history: list[tuple[str, str]]) -> str:
        from llmprior.prompts import build_prompt

        recent = history[-self.history :] if self.history else []
        return build_prompt(self.env_id, info["task"], obs, info["admissible_actions"], recent)

    def features(self, obs: str, info: dict, actions: list[str]) -> list[int]:
        from llmprior.prompts import feature_text

        return self.encoder.ids([feature_text(self.env_id, info["task"], obs, a) for a in actions])

    @torch.no_grad()
    def q_values(self, ids: list[int]) -> np.ndarray:
        return self.q(self.encoder.table[ids]).cpu().numpy()


@torch.no_grad()
def evaluate(agent: Agent, env, episodes: int, alpha: float, stop=None, name: str = "eval",
             seed: int = 10_000) -> dict[str, float]:  # fmt: skip
    """softmax(Q/α) over the candidate set (greedy at α = 0; weighted by p(a|s) for an `exact` agent) on a separately
    seeded env: episode i is seeded seed + i, its action sampling (and per-visit proposals) too. -> mean/std return and
    success rate."""
    returns, successes = [], []
    progress = runs.Progress(episodes, f"{name} episode", first_line_now=False)
    for ep in range(episodes):
        obs, info = env.reset(seed=seed + ep)
        rng = np.random.default_rng(seed + ep)
        history: list[tuple[str, str]] = []
        total, done = 0.0, False
        while not done:
            if stop is not None:
                stop.check()
            if progress.due():
                progress.line(ep, f"(step {len(history)} of episode {ep + 1})")
            # an `exact` agent samples softmax(Q/α + log p(a|s)), i.e. p(a|s)·exp(Q/α) normalised (argmax of Q at α = 0)
            cands, log_p = agent.support(obs, info, history) if agent.exact else (
                agent.candidates(obs, info, history, rng), 0.0)
            q = agent.q_values(agent.features(obs, info, cands)) + alpha * log_p
            action = cands[select_action(q, alpha, 0.0, rng)]
            history.append((obs, action))
            obs, reward, terminated, truncated, info = env.step(action)
            total += reward
            done = terminated or truncated
        returns.append(total)
        successes.append(float(info.get("success", False)))
    return {"return_mean": float(np.mean(returns)), "return_std": float(np.std(returns)),
            "success_rate": float(np.mean(successes))}  # fmt: skip


# ---------------- Offline data ----------------
def candidate_sets(records: list[dict], agent: Agent, use_stored: bool,
                   rng: np.random.Generator) -> tuple[list[list[str]], list[list[str]], tuple]:
    """C(s) and C(s') of every transition: the stored proposals where `use_stored` and present, otherwise the agent's
    (the prior's k proposals from its cache or the LLM; every admissible action for k = 0; for an `exact` agent the
    actions p supports, and their log p(a|s) and log p(a'|s'), the third element, else (None, None)). The prompt's
    history is the episode's earlier (observation, action) pairs, rebuilt from the dataset, so that a filled set is
    what the collecting agent would have been proposed. After termination C(s') is empty."""
    by_episode: dict[int, list[int]] = {}
    for i, r in enumerate(records):
        by_episode.setdefault(r["episode"], []).append(i)
    cands: list[list[str]] = [[] for _ in records]
    next_cands: list[list[str]] = [[] for _ in records]
    log_weights: Optional[list[np.ndarray]] = [np.zeros(0) for _ in records] if agent.exact else None
    next_log_weights: Optional[list[np.ndarray]] = [np.zeros(0) for _ in records] if agent.exact else None
    for indices in by_episode.values():
        indices.sort(key=lambda i: records[i]["step"])
        history: list[tuple[str, str]] = []
        for i in indices:
            r = records[i]
            stored = r["proposals"] if use_stored else None
            # `expert`: the expert's action, stored by build_dataset.py with the synthetic prior (which reads it)
            info = {"admissible_actions": r["admissible"], "task": r["task"], "expert_action": r.get("expert")}
            if log_weights is not None:
                cands[i], log_weights[i] = agent.support(r["obs"], info, history)
            else:
                cands[i] = list(stored) if stored is not None else agent.candidates(r["obs"], info, history, rng)
            history = history + [(r["obs"], r["action"])]
            if r["terminated"]:
                continue
            stored = r["next_proposals"] if use_stored else None
            next_info = {"admissible_actions": r["next_admissible"], "task": r["task"],
                         "expert_action": r.get("next_expert")}  # fmt: skip
            if next_log_weights is not None:
                next_cands[i], next_log_weights[i] = agent.support(r["next_obs"], next_info, history)
            else:
                next_cands[i] = list(stored) if stored is not None else agent.candidates(r["next_obs"], next_info,
                                                                                         history, rng)  # fmt: skip
    return cands, next_cands, (log_weights, next_log_weights)


class OfflineData:
    """The dataset as rows of the encoder's table: (s,a), C(s) (the logsumexp set), C(s') (the Bellman max), reward,
    done. Sampled uniformly with replacement."""

    def __init__(self, env_id: str, records: list[dict], cands: list[list[str]], next_cands: list[list[str]],
                 encoder, bootstrap_time_limit: bool = False, log_weights: Optional[list[np.ndarray]] = None,
                 next_log_weights: Optional[list[np.ndarray]] = None):  # fmt: skip
        from llmprior.prompts import feature_text

        n = len(records)
        width = max(1, max(len(c) for c in cands), max(len(c) for c in next_cands))
        texts = []
        for r, c, nc in zip(records, cands, next_cands):
            texts.append(feature_text(env_id, r["task"], r["obs"], r["action"]))
            texts += [feature_text(env_id, r["task"], r["obs"], a) for a in c]
            texts += [feature_text(env_id, r["task"], r["next_obs"], a) for a in nc]
        ids = iter(encoder.ids(texts))  # one batched pass over the distinct strings
        self.sa = np.zeros(n, dtype=np.int64)
        self.cand = np.zeros((n, width), dtype=np.int64)
        self.cand_mask = np.zeros((n, width), dtype=bool)
        self.cand_log_weights = np.zeros((n, width), dtype=np.float32)  # log p(a|s) of C(s) under --exact-prior
        self.next_sa = np.zeros((n, width), dtype=np.int64)
        self.next_mask = np.zeros((n, width), dtype=bool)
        self.next_log_weights = np.zeros((n, width), dtype=np.float32)  # log p(a'|s') of C(s') under --exact-prior
        self.rewards = np.array([r["reward"] for r in records], dtype=np.float32)
        # what ends the TD target: a termination, and the episode cap unless bootstrap_time_limit (see Args)
        self.dones = np.array([r["terminated"] or (r["truncated"] and not bootstrap_time_limit) for r in records],
                              dtype=np.float32)  # fmt: skip
        self.data_in_set = np.array([r["action"] in c for r, c in zip(records, cands)], dtype=bool)
        for i, (c, nc) in enumerate(zip(cands, next_cands)):
            self.sa[i] = next(ids)
            self.cand[i, : len(c)], self.cand_mask[i, : len(c)] = [next(ids) for _ in c], True
            if log_weights is not None:
                self.cand_log_weights[i, : len(c)] = log_weights[i]
            self.next_sa[i, : len(nc)], self.next_mask[i, : len(nc)] = [next(ids) for _ in nc], True
            if next_log_weights is not None:
                self.next_log_weights[i, : len(nc)] = next_log_weights[i]
        self.size = n

    def sample(self, batch_size: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        idx = rng.integers(0, self.size, size=batch_size)
        return {"sa": self.sa[idx], "cand": self.cand[idx], "cand_mask": self.cand_mask[idx],
                "cand_log_weights": self.cand_log_weights[idx],
                "data_in_set": self.data_in_set[idx], "rewards": self.rewards[idx], "dones": self.dones[idx],
                "next_sa": self.next_sa[idx], "next_mask": self.next_mask[idx],
                "next_log_weights": self.next_log_weights[idx]}  # fmt: skip


# The prior settings that change a state's proposals, beyond the prior's identity (backend, model, mode).
PROPOSAL_SETTINGS = ("dist_temperature", "score_normalize", "uniform_mix", "per_visit", "synthetic_q")


def dataset_mismatch(header: dict, env_id: str, identity: Optional[str], k: int, prior_args: dict) -> list[str]:
    """What in the dataset's header disagrees with this run, where the run uses a prior (k > 0) and the dataset
    stores proposals: the prior's identity, k and sampling settings."""
    problems = []
    if k > 0 and header["prior"] is not None:
        if header["prior"] != identity:
            problems.append(f"prior {header['prior']!r} (this run: {identity!r})")
        if header["k"] != k:
            problems.append(f"k {header['k']} (this run: {k})")
        stored = header.get("prior_args") or {}
        ignored = ("dist_temperature", "score_normalize") if str(identity).startswith("synthetic:") else ()
        for name in PROPOSAL_SETTINGS:
            if name in stored and name not in ignored and stored[name] != prior_args[name]:
                problems.append(f"--prior.{name.replace('_', '-')} {stored[name]} (this run: {prior_args[name]})")
    return problems


# ---------------- Infrastructure: validation, envs ----------------
def validate(args: Args) -> None:
    """Every flag, in one line each, before anything loads."""
    check(args.dataset is not None, "cql_prior.py needs --dataset PATH (build_dataset.py writes one)")
    check(os.path.isfile(args.dataset), f"--dataset {args.dataset}: no such file")
    p = args.prior
    check_args(total_steps=(args.total_steps >= 0, ">= 0"), k=(args.k >= 0, ">= 0"),
               eval_freq=(args.eval_freq >= 1, ">= 1"), eval_episodes=(args.eval_episodes >= 1, ">= 1"),
               learning_rate=(args.learning_rate > 0, "> 0"), gamma=(0 <= args.gamma <= 1, "in [0, 1]"),
               tau=(0 < args.tau <= 1, "in (0, 1]"), batch_size=(args.batch_size >= 1, ">= 1"),
               cql_beta=(args.cql_beta >= 0, ">= 0"), eval_alpha=(args.eval_alpha >= 0, ">= 0"),
               eval_k=(args.eval_k is None or args.eval_k >= 0, ">= 0"))  # fmt: skip
    check_args(**{"prior.dist_temperature": (p.dist_temperature > 0, "> 0"),
                  "prior.uniform_mix": (0 <= p.uniform_mix <= 1, "in [0, 1]"),
                  "prior.synthetic_q": (0 <= p.synthetic_q <= 1, "in [0, 1]")})  # fmt: skip
    check(args.total_steps > 0 or args.load_model, "--total-steps 0 only evaluates: it needs --load-model")
    check(args.load_model is None or os.path.isfile(args.load_model), f"--load-model {args.load_model}: no such file")
    check(args.k > 0 or p == PriorArgs() or (args.eval_k or 0) > 0,
          "--k 0 is plain CQL, without a prior: drop the --prior.* flags")  # fmt: skip
    check(not (p.per_visit and p.mode == "topk"), "--prior.per-visit draws anew at each visit; `topk` draws nothing")
    check(p.backend != "synthetic" or p.mode == "dist", "the synthetic prior is a distribution: use --prior.mode dist")
    check(not args.exact_prior or (args.k > 0 and p.mode == "dist" and not p.per_visit and not args.authors_code),
          "--exact-prior weighs every action by the prior's distribution: it needs --k > 0 and --prior.mode dist, "
          "without --prior.per-visit and --authors-code")  # fmt: skip
    check(not (args.authors_code and p != PriorArgs()), "--authors-code sets the prior: drop the --prior.* flags")


def make_env(env: str, split: Optional[str] = None, expert: bool = False):
    """The env of --env (envs.make_env: a registered id, `package.module:ClassName` or a gymnasium id, with
    `,key=value` keywords) on its game split `split`, with the expert's action where the run needs it (`expert`); a
    bad spec, or an env that does not speak envs/core.py's protocol, is a one-line error before any model loads."""
    import envs

    try:
        return envs.make_env(env, split, expert)
    except envs.EnvSpecError as err:
        raise UserError(f"--env {err}") from err


def make_eval_envs(env: str, expert: bool) -> dict:
    """{"eval": the env, "eval_unseen": its unseen games} (the second where it has game splits: generalisation to
    unseen games, Table 2; the generated ALFWorld games have no unseen examine split)."""
    import envs

    eval_envs = {"eval": make_env(env, expert=expert)}
    if "unseen" in envs.game_splits(eval_envs["eval"]):
        try:
            eval_envs["eval_unseen"] = make_env(env, "unseen", expert)
        except UserError as err:
            print(f"no unseen evaluation: {err}", flush=True)
    return eval_envs


def last_eval(path: str) -> dict:
    with open(path) as f:
        return json.loads(f.readlines()[-1])


if __name__ == "__main__":
    runs.cli(Args, train)
