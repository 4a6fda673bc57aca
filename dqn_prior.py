"""DQN-Prior: online Q-learning over the action proposals of a fixed LLM prior (Yan et al., ICLR 2025, Sec. 3.1).

At each state the prior proposes k actions, C^k(s) = {a_1..a_k}, a_i ~ p_LLM(a|s). The agent acts by
a ~ softmax(Q(s,a_i)/α) over them (Sec. 2.2; Prop. 1: as k → ∞ this is the optimum of the KL-regularised Eq. 5) and
learns Q by TD, the Bellman max over the proposals stored at s' (Eq. 6):

    y = r + γ(1 − done)·max_{a' ∈ C^k(s')} Q_target(s', a'),     L(θ) = E[(Q_θ(s,a) − y)²].

Q(s,a) is a 3-layer MLP over a frozen text encoder's embedding of one (s,a) string. `--k 0` is plain DQN over every
admissible action, the paper's baseline. Deviations from the paper and the authors' code, each measured, are in
docs/dqn_prior.md; `--authors-code` restores the authors' choices. The main ones:
- the prior samples the softmax of each action's log-likelihood (`dist`, p_LLM^dist), flattened to temperature 3 for
  a small LLM; the authors' projection of free-form text (`map`) names no admissible action for most samples of a
  270M model;
- evaluation samples softmax(Q/α) like training (without ε): greedy choice over the proposals of a state, which are
  the same at every visit, loops forever where Q's gap is small;
- the episode cap ends the TD target (as the authors' `done`): bootstrapping through it makes Overcooked's chop /
  wrong-delivery reward loop worth more than serving (benchmarks/overcooked_values.py).
The prior can be a synthetic one of known quality (`--prior.backend synthetic --prior.synthetic-q Q`), a diagnostic.

    python dqn_prior.py                                              # Overcooked (Tomato), k=5, embedded Gemma-3-270M
    python dqn_prior.py --env alfworld-pick --k 5
    python dqn_prior.py --env frozenlake --k 0                       # plain DQN
    python dqn_prior.py --env alfworld-pick --prior.model Qwen/Qwen1.5-7B --prior.backend vllm   # GPU box
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
    eval_freq: int = 250
    """evaluate (and checkpoint) every this many env steps, and at the end"""
    eval_episodes: int = 10
    """episodes per evaluation (ALFWorld: on seen and on unseen games each)"""

    env: str = "overcooked-tomato"
    """the environment: an id (envs.ENV_IDS), `package.module:ClassName` or a gymnasium id, with `,key=value` keywords
    (docs/envs.md)"""
    total_timesteps: int = 1500
    """env steps (one step = one text action)"""
    k: int = 5
    """proposals per state, C^k(s); 0 = plain DQN over every admissible action"""
    prior: PriorArgs = field(default_factory=PriorArgs)
    """the LLM prior"""
    encoder: str = "all-MiniLM-L6-v2"
    """frozen text encoder of the (s,a) strings: the embedded all-MiniLM-L6-v2, or e.g. bert-base-uncased (paper)"""
    learning_rate: float = 5e-4
    """AdamW learning rate"""
    buffer_size: int = 4000
    """replay memory size (transitions)"""
    gamma: float = 0.99
    """discount factor"""
    tau: float = 0.005
    """soft target update per gradient step; 1 = a hard copy every 20 gradient steps (the authors' ALFWorld setting)"""
    batch_size: int = 64
    """transitions per gradient step"""
    learning_starts: int = 50
    """env steps before learning starts"""
    train_frequency: int = 10
    """env steps between training phases"""
    gradient_steps: int = 20
    """gradient steps per training phase"""
    alpha: float = 0.1
    """temperature of the softmax over Q of the proposals (Fig. 4d; the authors' softmax(10·Q)); 0 = greedy"""
    epsilon: float = 0.0
    """ε-greedy over the candidates on top of the softmax (the authors: 0.2 on ALFWorld)"""
    eval_alpha: Optional[float] = None
    """softmax temperature of evaluation: None = --alpha (the learned policy, without ε); 0 = greedy"""
    bootstrap_time_limit: bool = False
    """if toggled, a transition cut by the episode cap bootstraps from s' (the textbook treatment of a time limit); by
    default it ends the TD target, as the authors' code"""
    authors_code: bool = False
    """if toggled, the authors' choices: `map` prior with unmatched outputs as the last admissible action and substring
    matching, summed TD loss, greedy evaluation; on ALFWorld ε = 0.2, hard target copies, DQN over the first 30
    actions (docs/dqn_prior.md)"""


# A resumed run takes these from its command line when given there; everything else comes from its checkpoint.
RESUME_OVERRIDES = ("total_timesteps", "cuda", "track")


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


# ---------------- ALGO: training loop ----------------
def train(args: Args) -> dict:
    args, ckpt = runs.load_resume(args, Args, RESUME_OVERRIDES)
    validate(args)  # every flag, before any model loads
    run = runs.new_run(args, ckpt, args.env)
    stop = runs.StopFlag()
    rng = runs.seed_everything(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    import envs

    env_id = envs.registered_id(args.env)  # what the prompts key on ("" for an env from elsewhere: the generic one)
    hard_copies = args.tau >= 1.0
    epsilon, eval_alpha = args.epsilon, args.alpha if args.eval_alpha is None else args.eval_alpha
    reduction, max_actions = "mean", None
    if args.authors_code:
        args.prior.mode, reduction, eval_alpha = "map", "sum", 0.0
        if env_id.startswith("alfworld"):
            epsilon, hard_copies, max_actions = 0.2, True, 30
    from llmprior.prompts import default_history, resolve_score_normalize

    prior_args = resolve_score_normalize(args.prior, env_id, args.authors_code)

    # Envs (the expert's action, for the synthetic prior and for measuring the prior's coverage where it is cheap: an
    # expert that costs a search, ALFWorld's planner, runs only when asked), prior, networks
    synthetic = args.k > 0 and args.prior.backend == "synthetic"
    env = make_env(args.env, expert=synthetic)
    eval_envs = make_eval_envs(args.env, expert=synthetic)
    prior = LLMPrior(prior_args, args.seed, device, args.authors_code) if args.k > 0 else None
    from llmprior.encoder import TextEncoder

    encoder = TextEncoder(args.encoder, device)
    q_network = QNetwork(encoder.dim).to(device)
    target_network = QNetwork(encoder.dim).to(device)
    target_network.load_state_dict(q_network.state_dict())
    optimizer = torch.optim.AdamW(q_network.parameters(), lr=args.learning_rate)
    rb = ReplayBuffer(args.buffer_size, args.k or max_actions or 128)
    agent = Agent(env_id, args.k, prior, encoder, q_network, default_history(env_id), max_actions)

    s = {"global_step": 0, "episode": 0, "grad_steps": 0, "covered": 0, "coverage_states": 0, "best_eval": None,
         "recent_returns": [], "recent_success": [], "episode_actions": [], "cands": None}  # fmt: skip
    if ckpt is not None:
        q_network.load_state_dict(ckpt["q_network"])
        target_network.load_state_dict(ckpt["target_network"])
        optimizer.load_state_dict(ckpt["optimizer"])
        rb.load_state_dict(ckpt["buffer"])
        encoder.load_state_dict(ckpt["encoder"])
        runs.set_rng_state(ckpt["rng"], rng)
        s = ckpt["loop"]
        if prior is not None:
            prior.load_counters(ckpt["prior_counters"])
    run.open(asdict(args))
    print(f"{'resumed' if ckpt else 'started'} {run.folder} at step {s['global_step']} on {device}", flush=True)

    def checkpoint(rng_state: Optional[dict] = None) -> str:
        # the episode so far (replayed on resume) and its state's drawn proposals
        s["episode_actions"], s["cands"] = [a for _, a in history], cands
        return run.save_checkpoint({
            "q_network": q_network.state_dict(), "target_network": target_network.state_dict(),
            "optimizer": optimizer.state_dict(), "buffer": rb.state_dict(), "encoder": encoder.state_dict(),
            "rng": rng_state or runs.rng_state(rng), "loop": s,
            "prior_counters": prior.counters() if prior else None})  # fmt: skip

    def start_episode(replay: list[str], cands: Optional[list[str]]):
        # A checkpoint keeps the episode's actions: the deterministic env replays them, so a resumed run goes on
        # exactly where the interrupted one stopped, even mid-episode (and keeps the state's drawn proposals).
        obs, info = env.reset(seed=args.seed + s["episode"])
        history, ep_return = [], 0.0
        for a in replay:
            history.append((obs, a))
            obs, reward, _, _, info = env.step(a)
            ep_return += reward
        return obs, info, history, ep_return, cands if cands is not None else agent.candidates(obs, info, history, rng)

    progress = runs.Progress(args.total_timesteps, "step", s["global_step"])
    obs, info, history, ep_return, cands = start_episode(s["episode_actions"], s["cands"])
    while True:
        step = s["global_step"]
        if step > 0 and (step % args.eval_freq == 0 or step == args.total_timesteps) and run.last_eval != step:
            try:
                result = {f"{name}/{key}": value for name, eval_env in eval_envs.items() for key, value in
                          evaluate(agent, eval_env, args.eval_episodes, eval_alpha, stop, name).items()}
            except runs.Interrupted:
                result = None  # dropped: the resumed run evaluates again
            if result is not None:
                s["best_eval"] = max(s["best_eval"] or -np.inf, result["eval/return_mean"])
                run.log_eval(step, result)
                print("eval " + " ".join(f"{k} {v:.3f}" for k, v in result.items()), flush=True)
                checkpoint()
        if stop.requested:
            path = checkpoint()
            raise runs.Stopped(f"stopped by {stop.requested} at step {step}; saved {path}; continue with "
                               f"`python {os.path.basename(__file__)} --resume {path}`")  # fmt: skip
        if step >= args.total_timesteps:
            break

        # ALGO LOGIC: act by reweighting the prior's proposals with Q (Sec. 2.2)
        before = runs.rng_state(rng)
        try:
            cand_ids = agent.features(obs, info, cands)
            action = cands[select_action(agent.q_values(cand_ids), args.alpha, epsilon, rng)]
            next_obs, reward, terminated, truncated, next_info = env.step(action)
            next_history = history + [(obs, action)]
            next_cands = [] if terminated else agent.candidates(next_obs, next_info, next_history, rng)
            next_ids = agent.features(next_obs, next_info, next_cands)
        except Exception as err:  # e.g. an LLM server that fails: save the state before this step, which is clean
            path = checkpoint(before)
            resume = f"saved {path}; continue with `python {os.path.basename(__file__)} --resume {path}`"
            if isinstance(err, ConnectionError):
                raise UserError(f"{err} (at step {step}); {resume}") from None
            print(resume, flush=True)
            raise
        s["global_step"] = step = step + 1
        ep_return += reward
        # The episode cap ends the target unless --bootstrap-time-limit: with γ = 0.99 and bootstrapping, Overcooked's
        # chop (+0.2) / wrong delivery (−0.1, the food comes back unchopped) loop is worth more than serving.
        rb.add(cand_ids[cands.index(action)], reward, terminated or (truncated and not args.bootstrap_time_limit),
               next_ids)  # fmt: skip
        if prior is not None and info.get("expert_action") is not None:
            s["coverage_states"] += 1
            s["covered"] += info["expert_action"] in cands

        # ALGO LOGIC: TD updates over the candidate sets (Eq. 6)
        if step > args.learning_starts and step % args.train_frequency == 0:
            for _ in range(args.gradient_steps):
                batch = rb.sample(args.batch_size, rng)
                rows = {key: torch.as_tensor(value, device=device) for key, value in batch.items()}
                with torch.no_grad():
                    next_q = target_network(encoder.table[rows["next_sa"]])
                    target = td_target(rows["rewards"], rows["dones"], next_q, rows["next_mask"], args.gamma)
                q_sa = q_network(encoder.table[rows["sa"]])
                loss = td_loss(q_sa, target, reduction)
                optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(q_network.parameters(), 1.0)
                optimizer.step()
                s["grad_steps"] += 1
                if not hard_copies:
                    with torch.no_grad():
                        for tp, qp in zip(target_network.parameters(), q_network.parameters()):
                            tp.lerp_(qp, args.tau)
                elif s["grad_steps"] % 20 == 0:
                    target_network.load_state_dict(q_network.state_dict())
            run.log({"losses/td_loss": loss.item(), "losses/q_values": q_sa.mean().item()}, step)

        if terminated or truncated:
            s["episode"] += 1
            success = float(next_info.get("success", False))
            s["recent_returns"] = (s["recent_returns"] + [ep_return])[-20:]
            s["recent_success"] = (s["recent_success"] + [success])[-20:]
            run.log({"charts/episodic_return": ep_return, "charts/episodic_length": len(next_history),
                     "charts/success_rate": success}, step)  # fmt: skip
            obs, info, history, ep_return, cands = start_episode([], None)
        else:
            obs, info, history, cands = next_obs, next_info, next_history, next_cands
        if progress.due() or step == args.total_timesteps:
            stats = {"charts/SPS": (step - progress.start_done) / max(time.time() - progress.start, 1e-9)}
            text = f"episode {s['episode']}"
            if s["recent_returns"]:
                text += f" return {np.mean(s['recent_returns']):.3f} success {np.mean(s['recent_success']):.2f}"
            if prior is not None:
                stats.update({"prior/queries": prior.queries, "prior/cache_hit_rate": prior.cache_hit_rate})
                text += f" | LLM queries {prior.queries} cache hit {prior.cache_hit_rate:.2f}"
            if s["coverage_states"]:
                stats["prior/coverage"] = s["covered"] / s["coverage_states"]
                text += f" coverage {stats['prior/coverage']:.2f}"
            run.log(stats, step)
            progress.line(step, text)

    torch.save(q_network.state_dict(), run.path("q_network.pt"))
    final = {k: v for k, v in last_eval(run.path("eval.jsonl")).items() if k != "global_step"}
    return run.finish({"device": str(device), "global_step": s["global_step"], "episodes": s["episode"], **final,
                       "best_eval_return": s["best_eval"], "prior_queries": prior.queries if prior else 0,
                       "prior_cache_hit_rate": prior.cache_hit_rate if prior else None,
                       "prior_score_normalize": prior_args.score_normalize if prior else None,
                       "prior_coverage": s["covered"] / s["coverage_states"] if s["coverage_states"] else None})


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


# ---------------- Replay buffer ----------------
class ReplayBuffer:
    """Transitions as rows of the encoder's table; the candidate set at s' is the one drawn when it was collected."""

    def __init__(self, capacity: int, max_candidates: int):
        self.capacity, self.max_candidates = capacity, max_candidates
        self.sa = np.zeros(capacity, dtype=np.int64)
        self.rewards = np.zeros(capacity, dtype=np.float32)
        self.dones = np.zeros(capacity, dtype=np.float32)
        self.next_sa = np.zeros((capacity, max_candidates), dtype=np.int64)
        self.next_mask = np.zeros((capacity, max_candidates), dtype=bool)
        self.pos, self.size = 0, 0

    def add(self, sa: int, reward: float, done: bool, next_sa: list[int]) -> None:
        i, next_sa = self.pos, next_sa[: self.max_candidates]
        self.sa[i], self.rewards[i], self.dones[i] = sa, reward, float(done)
        self.next_sa[i], self.next_mask[i] = 0, False
        self.next_sa[i, : len(next_sa)], self.next_mask[i, : len(next_sa)] = next_sa, True
        self.pos, self.size = (i + 1) % self.capacity, min(self.size + 1, self.capacity)

    def sample(self, batch_size: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        idx = rng.integers(0, self.size, size=batch_size)
        return {"sa": self.sa[idx], "rewards": self.rewards[idx], "dones": self.dones[idx],
                "next_sa": self.next_sa[idx], "next_mask": self.next_mask[idx]}  # fmt: skip

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        vars(self).update(state)


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


# ---------------- Infrastructure: validation, envs ----------------
def validate(args: Args) -> None:
    """Every flag, in one line each, before anything loads."""
    p = args.prior
    check_args(total_timesteps=(args.total_timesteps >= 1, ">= 1"), k=(args.k >= 0, ">= 0"),
               eval_freq=(args.eval_freq >= 1, ">= 1"), eval_episodes=(args.eval_episodes >= 1, ">= 1"),
               learning_rate=(args.learning_rate > 0, "> 0"), buffer_size=(args.buffer_size >= 1, ">= 1"),
               gamma=(0 <= args.gamma <= 1, "in [0, 1]"), tau=(0 < args.tau <= 1, "in (0, 1]"),
               batch_size=(args.batch_size >= 1, ">= 1"), learning_starts=(args.learning_starts >= 0, ">= 0"),
               train_frequency=(args.train_frequency >= 1, ">= 1"), gradient_steps=(args.gradient_steps >= 0, ">= 0"),
               alpha=(args.alpha >= 0, ">= 0"), epsilon=(0 <= args.epsilon <= 1, "in [0, 1]"),
               eval_alpha=(args.eval_alpha is None or args.eval_alpha >= 0, ">= 0"))  # fmt: skip
    check_args(**{"prior.dist_temperature": (p.dist_temperature > 0, "> 0"),
                  "prior.uniform_mix": (0 <= p.uniform_mix <= 1, "in [0, 1]"),
                  "prior.synthetic_q": (0 <= p.synthetic_q <= 1, "in [0, 1]")})  # fmt: skip
    check(args.k > 0 or p == PriorArgs(), "--k 0 is plain DQN, without a prior: drop the --prior.* flags")
    check(not (p.per_visit and p.mode == "topk"), "--prior.per-visit draws anew at each visit; `topk` draws nothing")
    check(p.backend != "synthetic" or p.mode == "dist", "the synthetic prior is a distribution: use --prior.mode dist")
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
