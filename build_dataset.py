"""Build the offline datasets of Table 1 (Salad(N), ALFWorld-Pick) in the format cql_prior.py and bc.py read.

Episodes are drawn from a documented mix of behaviours, each episode's kind drawn with the mix's weights: `expert`
(the env's `info["expert_action"]` at every step: the Overcooked planner, ALFWorld's PDDL planner), `noisy` (the
expert, but a uniformly random admissible action with probability --mix.epsilon), `random` (uniform over the
admissible actions) and `prior` (uniform over the prior's k proposals: an untrained DQN-Prior). The authors collected
theirs from exploratory DQN(-Prior) runs and balanced them to 75% successful episodes; --success-share does the same
here: an episode is kept only while it does not push the share of successful (or failed) episodes past the target.
Whole episodes are collected until at least --transitions transitions (the paper's Salad(N) hold ≈ N). Everything is
seeded by --seed: the same command writes the same file, and with one seed a smaller dataset is a prefix of a larger
one (Salad(1000) ⊂ Salad(4000) ⊂ Salad(24000)).

The k proposals at s and s' are then stored from the prior (its cache first; the prompt's history is the episode's
own), so that training needs no LLM. The header records the prior and its settings, the mix, and the prior's quality
on the data: how often the proposals hold the data action and the expert's, the probability the proposal
distribution gives the expert's action (`dist` modes) and the expert action's rank among the scored actions.
`benchmarks/prior_quality.py` reads these from datasets of expert episodes.

Measured with the default mix, seed 1: Salad(1000) 1011 transitions in 34 episodes, Salad(24000) 24000 in 835,
ALFWorld-Pick 6510 in 289 (2752 distinct states: about 2.5 s of the embedded Gemma-3-270M each on one core; with
`--workers 2` on two cores 333 s to collect and 2100 s to store). `--history 0` keeps the prior affordable on a CPU:
with Salad's default 5-pair history nearly every transition is a new prompt.

    python build_dataset.py --env overcooked-salad --transitions 1000 --out data/salad_1000.jsonl --history 0
    python build_dataset.py --env alfworld-pick --transitions 6500 --out data/pick.jsonl --workers 2
    python build_dataset.py --env overcooked-salad --transitions 24000 --k 0 --out data/salad_24000_noprior.jsonl
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Literal, Optional

import numpy as np
import torch

from llmprior import runs
from llmprior.runs import UserError, check, check_args

KINDS = ("expert", "noisy", "random", "prior")


@dataclass
class MixArgs:
    """Weights of the episode kinds (normalised to sum to 1) and the noise of the noisy expert."""

    expert: float = 0.1
    """weight of expert episodes (the env's expert action at every step)"""
    noisy: float = 0.65
    """weight of ε-noisy expert episodes"""
    random: float = 0.25
    """weight of episodes of uniformly random admissible actions"""
    prior: float = 0.0
    """weight of episodes acting uniformly over the prior's k proposals (an untrained DQN-Prior; needs --k > 0)"""
    epsilon: float = 0.5
    """probability of a uniformly random admissible action at each step of a noisy-expert episode"""


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
    env: str = "overcooked-salad"
    """the environment: an id (envs.ENV_IDS), `package.module:ClassName` or a gymnasium id, with `,key=value` keywords
    (docs/envs.md)"""
    transitions: int = 1000
    """collect whole episodes until at least this many transitions"""
    out: Optional[str] = None
    """the dataset to write (None = data/{env}_{transitions}_k{k}_seed{seed}.jsonl)"""
    seed: int = 1
    """seed of the episode kinds, the actions, the env resets and the prior's sampling"""
    mix: MixArgs = field(default_factory=MixArgs)
    """the behaviour mix"""
    success_share: Optional[float] = 0.75
    """keep episodes so that this share of them is successful (the authors: 75%); None = keep every episode"""
    k: int = 5
    """proposals stored per state; 0 = store none (null)"""
    prior: PriorArgs = field(default_factory=PriorArgs)
    """the LLM prior"""
    history: Optional[int] = None
    """(observation, action) pairs of the episode in the prior's prompt (None = the authors': Tomato 3, Salad 5, none
    elsewhere); 0 makes most transitions share a prompt, i.e. an LLM query"""
    split: Optional[str] = None
    """the game split to collect on, for an env that has them (ALFWorld, TextWorld; None = its default, train)"""
    workers: int = 1
    """processes storing the proposals, each with its own copy of the prior and a share of the episodes; the file is
    the same for any number"""


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


# ---------------- Collecting episodes ----------------
def rollout(env, kind: str, rng: np.random.Generator, epsilon: float, reset_seed: int,
            propose=None) -> tuple[list[dict], bool, int]:  # fmt: skip
    """One episode of behaviour `kind` -> (transitions without episode id or proposals, success, expert misses).
    Each transition also carries `_expert` and `_next_expert`, the expert's action at s and s' (None where the env has
    none), for the prior's quality statistics and the synthetic prior; they are written to the dataset (as `expert`,
    `next_expert`) only when the prior is the synthetic one."""
    obs, info = env.reset(seed=reset_seed)
    history: list[tuple[str, str]] = []
    records, misses, done = [], 0, False
    while not done:
        admissible = list(info["admissible_actions"])
        expert = info.get("expert_action")
        if kind == "prior":
            cands = propose(obs, info, history, rng)
            action = cands[int(rng.integers(len(cands)))]
        elif kind == "random" or (kind == "noisy" and rng.random() < epsilon) or expert is None:
            misses += kind != "random" and expert is None
            action = admissible[int(rng.integers(len(admissible)))]
        else:
            action = expert
        next_obs, reward, terminated, truncated, next_info = env.step(action)
        records.append({
            "step": len(history), "task": info["task"], "obs": obs, "admissible": admissible, "action": action,
            "reward": float(reward), "next_obs": next_obs, "next_admissible": list(next_info["admissible_actions"]),
            "terminated": bool(terminated), "truncated": bool(truncated), "proposals": None, "next_proposals": None,
            "_expert": expert, "_next_expert": next_info.get("expert_action")})  # fmt: skip
        history.append((obs, action))
        obs, info, done = next_obs, next_info, terminated or truncated
    return records, bool(info.get("success", False)), misses


def keep_episode(success: bool, kept: int, kept_successes: int, share: Optional[float]) -> bool:
    """Success-share balancing: keep an episode unless it pushes the share of successful (or of failed) episodes past
    the target, counted with the episode added."""
    if share is None:
        return True
    if success:
        return kept_successes < share * (kept + 1)
    return kept - kept_successes < (1.0 - share) * (kept + 1)


def mix_weights(mix: MixArgs, k: int) -> np.ndarray:
    weights = np.array([mix.expert, mix.noisy, mix.random, mix.prior], dtype=np.float64)
    check(bool((weights >= 0).all()) and weights.sum() > 0,
          f"the mix weights must be >= 0 and not all 0, got {asdict(mix)}")  # fmt: skip
    check(mix.prior == 0 or k > 0, "--mix.prior > 0 acts over the prior's proposals: it needs --k > 0")
    return weights / weights.sum()


def make_env(env: str, split: Optional[str] = None, expert: bool = False):
    """The env of --env (envs.make_env: a registered id, `package.module:ClassName` or a gymnasium id, with
    `,key=value` keywords) on its game split `split`, with the expert's action where the run needs it (`expert`); a
    bad spec, or an env that does not speak envs/core.py's protocol, is a one-line error before any model loads."""
    import envs

    try:
        return envs.make_env(env, split, expert)
    except envs.EnvSpecError as err:
        raise UserError(f"--env {err}") from err


# ---------------- Storing the proposals ----------------
class Proposer:
    """The prior's proposals at a state of an episode: the prompt with the episode's last `history` steps."""

    def __init__(self, env_id: str, prior: LLMPrior, k: int, history: int) -> None:
        self.env_id, self.prior, self.k, self.history = env_id, prior, k, history

    def prompt(self, obs: str, info: dict, history: list[tuple[str, str]]) -> str:
        from llmprior.prompts import build_prompt

        recent = history[-self.history :] if self.history else []
        return build_prompt(self.env_id, info["task"], obs, info["admissible_actions"], recent)

    def __call__(self, obs: str, info: dict, history: list[tuple[str, str]], rng=None) -> list[str]:
        return self.prior.propose(self.prompt(obs, info, history), info["admissible_actions"], self.k,
                                  info.get("expert_action"), rng)  # fmt: skip

    def quality(self, obs: str, info: dict, history: list[tuple[str, str]]) -> tuple[Optional[float], float]:
        """(probability of the expert's action under the `dist` proposal distribution (None in `topk`), its rank among
        the scored actions, 1 = best)."""
        admissible, expert = info["admissible_actions"], info["expert_action"]
        prompt = self.prompt(obs, info, history)
        index = admissible.index(expert)
        scores = self.prior.scores(prompt, admissible, expert)
        rank = 1 + int((scores > scores[index]).sum())
        if self.prior.args.mode != "dist":
            return None, float(rank)
        return float(self.prior.distribution(prompt, admissible, expert)[index]), float(rank)


def propose_episodes(episodes: list[list[dict]], propose: Proposer, seed: int, first: int = 0,
                     label: str = "") -> tuple[list, list]:  # fmt: skip
    """(C(s), C(s')) of every transition and the quality of the prior at the states with an expert action, episode
    by episode; with --prior.per-visit each transition draws its own, from a generator of (seed, episode)."""
    total, sets, quality, done = sum(map(len, episodes)), [], [], 0
    progress = runs.Progress(total, "transition", first_line_now=False)
    for i, records in enumerate(episodes):
        rng = np.random.default_rng([seed, first + i])
        cands, next_cands, history, episode_quality = [], [], [], []
        for r in records:
            info = {"admissible_actions": r["admissible"], "task": r["task"], "expert_action": r["_expert"]}
            cands.append(propose(r["obs"], info, history, rng))
            if r["_expert"] is not None and propose.prior.args.mode in ("dist", "topk"):
                episode_quality.append(propose.quality(r["obs"], info, history))
            history = history + [(r["obs"], r["action"])]
            next_info = {"admissible_actions": r["next_admissible"], "task": r["task"],
                         "expert_action": r["_next_expert"]}  # fmt: skip
            next_cands.append([] if r["terminated"] else propose(r["next_obs"], next_info, history, rng))
        sets.append((cands, next_cands))
        quality.append(episode_quality)
        done += len(records)
        if progress.due() or i + 1 == len(episodes):
            progress.line(done, f"proposals{label}: {propose.prior.queries} LLM queries, cache hit "
                                f"{propose.prior.cache_hit_rate:.2f}")  # fmt: skip
    return sets, quality


def action_kind(task: str, action: str) -> str:
    """The first word of an action; a `go to <receptacle> <n>` is `go-named` where the task names that receptacle
    (the way to the goal, which the text tells) and `go-search` elsewhere (the expert knows where the object lies,
    the text does not)."""
    if not action.startswith("go to "):
        return action.split(" ", 1)[0]
    receptacle = action[len("go to ") :].rsplit(" ", 1)[0]
    return "go-named" if re.search(rf"\b{re.escape(receptacle)}\b", task or "") else "go-search"


def coverage_by_verb(records: list[dict], k: int) -> dict:
    """{kind of the expert's action (`action_kind`): [states, expert_coverage_at_k over those states]}: where on a
    task the prior helps (ALFWorld's `go to` against its `take`)."""
    by_verb: dict[str, list[dict]] = {}
    for r in records:
        by_verb.setdefault(action_kind(r["task"], r["_expert"]), []).append(r)
    return {verb: [len(rs), [float(np.mean([r["_expert"] in r["proposals"][:j] for r in rs])) for j in range(1, k + 1)]]
            for verb, rs in sorted(by_verb.items())}  # fmt: skip


def fill_shard(prior_args: PriorArgs, seed: int, env_id: str, k: int, history: int, threads: int, shard: int,
               first: list[int], episodes: list[list[dict]]) -> tuple[list, list, int]:  # fmt: skip
    """A worker of --workers: its own prior proposes for its episodes -> (sets, quality, LLM queries)."""
    torch.set_num_threads(threads)
    prior = LLMPrior(prior_args, seed, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    propose = Proposer(env_id, prior, k, history)
    sets, quality = [], []
    for i, records in zip(first, episodes):  # each episode keeps its own generator, whatever the sharding
        s, q = propose_episodes([records], propose, seed, i, f" (worker {shard})")
        sets += s
        quality += q
    return sets, quality, prior.queries


def shard_episodes(episodes: list[list[dict]], workers: int) -> list[list[int]]:
    """Episode indices per worker, balanced by transitions (largest episode first to the lightest worker)."""
    shards: list[list[int]] = [[] for _ in range(workers)]
    load = [0] * workers
    for i in sorted(range(len(episodes)), key=lambda i: -len(episodes[i])):
        w = load.index(min(load))
        shards[w].append(i)
        load[w] += len(episodes[i])
    return [sorted(s) for s in shards]


def fill_proposals(args: Args, prior, propose, episodes: list[list[dict]], env_id: str, history: int):
    """The k proposals at s and s' of every record, episode by episode (cache first, then the LLM); with --workers the
    episodes are shared out to processes with their own prior. -> (sets, quality, LLM queries)."""
    sets, quality, queries = [None] * len(episodes), [None] * len(episodes), 0
    if args.workers > 1:
        threads = max(1, (os.cpu_count() or 1) // args.workers)
        shards = [s for s in shard_episodes(episodes, args.workers) if s]
        print(f"proposals: {len(shards)} workers, {threads} torch thread(s) each", flush=True)
        with ProcessPoolExecutor(len(shards), mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(fill_shard, args.prior, args.seed, env_id, args.k, history, threads, w, shard,
                                   [episodes[i] for i in shard]) for w, shard in enumerate(shards)]  # fmt: skip
            for shard, future in zip(shards, futures):
                shard_sets, shard_quality, shard_queries = future.result()
                for i, s, q in zip(shard, shard_sets, shard_quality):
                    sets[i], quality[i] = s, q
                queries += shard_queries
        return sets, quality, queries
    sets, quality = propose_episodes(episodes, propose, args.seed)
    return sets, quality, prior.queries


def build(args: Args) -> dict:
    try:
        return build_file(args)
    except ConnectionError as err:  # an LLM server that fails mid-way: what it answered is in the proposal cache
        raise UserError(f"{err}; the proposals so far are cached: the same command goes on from there") from None


def build_file(args: Args) -> dict:
    import envs
    from llmprior.data import load_dataset, write_dataset
    from llmprior.prompts import default_history, resolve_score_normalize

    check_args(transitions=(args.transitions >= 1, ">= 1"), k=(args.k >= 0, ">= 0"),
               workers=(args.workers >= 1, ">= 1"), history=(args.history is None or args.history >= 0, ">= 0"),
               success_share=(args.success_share is None or 0 < args.success_share < 1, "in (0, 1)"),
               **{"mix.epsilon": (0 <= args.mix.epsilon <= 1, "in [0, 1]"),
                  "prior.uniform_mix": (0 <= args.prior.uniform_mix <= 1, "in [0, 1]"),
                  "prior.synthetic_q": (0 <= args.prior.synthetic_q <= 1, "in [0, 1]")})  # fmt: skip
    check(args.k > 0 or args.prior == PriorArgs(), "--k 0 stores no proposals: drop the --prior.* flags")
    check(args.prior.backend != "synthetic" or args.prior.mode == "dist",
          "the synthetic prior is a distribution: use --prior.mode dist")  # fmt: skip
    name = f"{runs.file_name(args.env)}_{args.transitions}_k{args.k}_seed{args.seed}.jsonl"
    out = args.out or os.path.join("data", name)
    weights = mix_weights(args.mix, args.k)
    env_id = envs.registered_id(args.env)  # what the prompts key on ("" for an env from elsewhere: the generic one)
    history = args.history if args.history is not None else default_history(env_id)
    if args.k > 0:
        args.prior = resolve_score_normalize(args.prior, env_id)  # the header says which scoring ran
    rng = np.random.default_rng(args.seed)
    # expert and noisy episodes follow the expert's action, the synthetic prior proposes it (where they do not run, an
    # env whose expert costs a search skips it, and the quality statistics that compare against it are null)
    synthetic = args.k > 0 and args.prior.backend == "synthetic"
    env = make_env(args.env, args.split, expert=args.mix.expert > 0 or args.mix.noisy > 0 or synthetic)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    prior = LLMPrior(args.prior, args.seed, device) if args.k > 0 else None
    propose = Proposer(env_id, prior, args.k, history) if prior else None

    # Collect: episode kinds from the mix, kept or rejected by the success-share balancing.
    start, max_rejections = time.time(), 5000
    episodes: list[list[dict]] = []
    successes: list[bool] = []
    stats = {kind: {"kept": 0, "successful": 0, "rejected": 0} for kind in KINDS}
    kept_successes, transitions, rejected_in_a_row, expert_misses, attempts = 0, 0, 0, 0, 0
    progress = runs.Progress(args.transitions, "transition", first_line_now=False)
    while transitions < args.transitions:
        kind = KINDS[int(rng.choice(len(KINDS), p=weights))]
        records, success, misses = rollout(env, kind, rng, args.mix.epsilon, int(rng.integers(2**31)), propose)
        attempts += 1
        if progress.due():  # (also while the success-share balancing rejects episodes)
            progress.line(transitions, f"collected, {len(episodes)} episodes kept, {attempts - len(episodes)} rejected")
        if not keep_episode(success, len(episodes), kept_successes, args.success_share):
            stats[kind]["rejected"] += 1
            rejected_in_a_row += 1
            check(rejected_in_a_row < max_rejections,
                  f"{rejected_in_a_row} episodes in a row rejected: this mix cannot reach --success-share "
                  f"{args.success_share} (kept {len(episodes)} episodes, {kept_successes} successful). Add failing "
                  "behaviour (--mix.random) or succeeding behaviour (--mix.expert), or pass --success-share None")
            continue
        rejected_in_a_row = 0
        expert_misses += misses
        for r in records:
            r["episode"] = len(episodes)
        episodes.append(records)
        successes.append(success)
        kept_successes += success
        transitions += len(records)
        stats[kind]["kept"] += 1
        stats[kind]["successful"] += success
    print(f"collected {transitions} transitions in {len(episodes)} episodes ({kept_successes} successful, "
          f"{attempts - len(episodes)} rejected) in {time.time() - start:.0f} s: "
          + ", ".join(f"{k} {v['kept']}" for k, v in stats.items()), flush=True)  # fmt: skip

    fill_start, queries = time.time(), 0
    if prior is not None:
        sets, quality, queries = fill_proposals(args, prior, propose, episodes, env_id, history)
        for records, (cands, next_cands) in zip(episodes, sets):
            for r, c, nc in zip(records, cands, next_cands):
                r["proposals"], r["next_proposals"] = c, nc

    quality = [q for episode in quality for q in episode] if prior else []
    records = [r for episode in episodes for r in episode]
    with_expert = [r for r in records if r["_expert"] is not None]

    def share(hits: list[bool]) -> Optional[float]:
        return float(np.mean(hits)) if prior and hits else None

    header = {
        "env": args.env, "prior": prior.identity if prior else None, "k": args.k if prior else 0,
        "prior_seed": args.seed if prior else None, "history": history if prior else None,
        "prior_args": asdict(args.prior) if prior else None, "source": "build_dataset.py", "seed": args.seed,
        "split": args.split, "mix": asdict(args.mix), "success_share_target": args.success_share,
        "transitions": len(records), "episodes": len(episodes), "successful_episodes": kept_successes,
        "success_share": kept_successes / len(episodes),
        "success_transition_share": sum(len(e) for e, ok in zip(episodes, successes) if ok) / len(records),
        "episodes_by_kind": stats, "rejected_episodes": attempts - len(episodes), "expert_misses": expert_misses,
        "data_action_in_proposals": share([r["action"] in r["proposals"] for r in records]) if prior else None,
        "expert_action_in_proposals": share([r["_expert"] in r["proposals"] for r in with_expert]) if prior else None,
        # the same for the first j proposals, j = 1..k (the draws are independent: a prefix is a j-sample)
        "expert_coverage_at_k": [share([r["_expert"] in r["proposals"][:j] for r in with_expert])
                                 for j in range(1, args.k + 1)] if prior and with_expert else None,
        "expert_action_prob": float(np.mean([p for p, _ in quality])) if quality and quality[0][0] is not None
        else None,
        "expert_action_rank": float(np.mean([r for _, r in quality])) if quality else None,
        "uniform_prob": float(np.mean([1 / len(r["admissible"]) for r in with_expert])) if with_expert else None,
        "expert_coverage_by_verb": coverage_by_verb(with_expert, args.k) if prior and with_expert else None,
        "prior_queries": queries, "prior_seconds_per_query": (time.time() - fill_start) / queries if queries else None,
    }  # fmt: skip
    if prior is not None and prior.synthetic:  # its p_Q(a|s) needs them (cql_prior.py --exact-prior)
        for r in records:
            r["expert"], r["next_expert"] = r["_expert"], r["_next_expert"]
    write_dataset(out, header, records)
    load_dataset(out)  # the file reads back
    print("dataset " + json.dumps({"out": out, **{k: v for k, v in header.items() if k != "prior_args"}}), flush=True)
    return header


if __name__ == "__main__":
    runs.cli(Args, build)
