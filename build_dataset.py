"""Build the offline datasets of Table 1 (Salad(N), ALFWorld-Pick) in the format cql_prior.py and bc.py read.

Episodes are drawn from a documented mix of behaviours, each episode's kind drawn independently with the mix's
weights: `expert` (the env's `info["expert_action"]` at every step: the Overcooked planner, ALFWorld's PDDL planner),
`noisy` (the expert, but a uniformly random admissible action with probability --mix.epsilon), `random` (uniform over
the admissible actions) and `prior` (uniform over the LLM prior's k proposals: the behaviour of an untrained
DQN-Prior). The authors collected theirs from exploratory DQN(-Prior) runs and balanced them to 75% successful
episodes (their shipped Salad set: 100 successful and 33 failed episodes); --success-share does the same balancing
here: an episode is kept only while it does not push the share of successful episodes past the target (nor the share
of failed ones past 1 − target). Whole episodes are collected until at least --transitions transitions (the paper's
Salad(N) hold ≈ N: 1186 for N = 1000). Everything is seeded by --seed: the same command writes the same file, and
with one seed a smaller dataset is a prefix of a larger one (Salad(1000) ⊂ Salad(4000) ⊂ Salad(24000)).

The k proposals at s and s' are then filled from the LLM prior (its disk cache first; the prompt's history is the
episode's own), so training on the file needs no LLM; `--k 0` stores none (null), and cql_prior.py fills them from
its prior on load. The header records the prior (identity, k, seed, history, settings), the mix, the kept and
rejected episodes per kind, the success share and how often the proposals contain the data and the expert action.

Measured with the default mix (10% expert, 65% noisy with ε = 0.5, 25% random; 75% successful), seed 1: Salad(1000)
1011 transitions in 34 episodes (success share 0.74, 55% of the transitions in successful episodes), Salad(24000)
24000 in 835 (0.75, 56%), ALFWorld-Pick 6510 in 289 (0.75, 33%). `--prior.history 0` keeps the prior affordable on
a CPU: with Salad's default 5-pair history nearly every transition is a new prompt (one LLM query each; a Salad
query with history 0 took 1.3 s of the embedded Gemma-3-270M on one core, longer prompts take longer), with 0 the
24,000 Salad transitions hold 564 distinct states (569 queries, 32 min). ALFWorld-Pick's 6510 transitions hold 2752
distinct states (about 2.2-2.6 s per query); with `--workers 2` on the 2-core machine they took 333 s to collect
and 2100 s to store (1598 LLM queries, the rest in the cache from earlier ALFWorld runs).

Usage:
    python build_dataset.py --env overcooked-salad --transitions 1000 --out data/salad_1000.jsonl --prior.history 0
    python build_dataset.py --env alfworld-pick --transitions 6500 --out data/pick.jsonl --workers 2
    python build_dataset.py --env overcooked-salad --transitions 24000 --k 0 --out data/salad_24000_noprior.jsonl
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import tyro

from cql_prior import (
    Agent,
    LLMPrior,
    PriorArgs,
    candidate_sets,
    default_history,
    load_dataset,
    make_env,
    saved_args,
    write_dataset,
)

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
class Args:
    env: str = "overcooked-salad"
    """the environment id (see `envs.ENV_IDS`)"""
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
    max_rejections: int = 5000
    """give up after this many episodes in a row are rejected by the success-share balancing"""
    k: int = 5
    """number of LLM prior proposals stored per state; 0 = store none (null)"""
    prior: PriorArgs = field(default_factory=lambda: PriorArgs())
    """the LLM action prior"""
    split: Optional[str] = None
    """ALFWorld only: the game split to collect on (None = the env's default, train)"""
    torch_threads: Optional[int] = None
    """torch CPU threads for the prior (None = torch's default); 1 is faster when other processes share the cores"""
    workers: int = 1
    """processes filling the proposals, each with its own copy of the prior and a share of the episodes; the file is
    the same for any number (proposals depend only on the seed, prompt and admissible actions)"""


def rollout(env, kind: str, rng: np.random.Generator, epsilon: float, reset_seed: int,
            agent: Optional[Agent] = None) -> tuple[list[dict], bool, int]:  # fmt: skip
    """One episode of behaviour `kind` -> (transitions without episode id or proposals, success, expert misses).

    Each transition also carries `_expert` and `_next_expert`, the expert's action at s and s' (None where the env has
    none), for the coverage statistics and the synthetic prior; they are not written to the dataset."""
    obs, info = env.reset(seed=reset_seed)
    history: list[tuple[str, str]] = []
    records, misses, done = [], 0, False
    while not done:
        admissible = list(info["admissible_actions"])
        expert = info.get("expert_action")
        if kind == "prior":
            cands = agent.candidates(obs, info, history)
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


def propose_episodes(episodes: list[list[dict]], agent: Agent, label: str = "") -> list[tuple[list, list]]:
    """(C(s), C(s')) of every transition, episode by episode (the prior's cache first, then the LLM), with progress."""
    prior, total = agent.prior, sum(map(len, episodes))
    sets, done, start = [], 0, time.time()
    for i, records in enumerate(episodes):
        sets.append(candidate_sets(records, agent, use_stored=False))
        done += len(records)
        if (i + 1) % 20 == 0 or i + 1 == len(episodes):
            print(f"proposals{label}: {done}/{total} transitions, {prior.queries} LLM queries, cache hit "
                  f"{prior.cache_hit_rate:.2f}, {time.time() - start:.0f} s", flush=True)  # fmt: skip
    return sets


def fill_shard(prior_args: PriorArgs, seed: int, env_id: str, k: int, history_len: int, torch_threads: int,
               shard: int, episodes: list[list[dict]]) -> tuple[list[tuple[list, list]], int]:
    """A worker of --workers: its own prior proposes for its episodes -> (propose_episodes' sets, LLM queries)."""
    torch.set_num_threads(torch_threads)
    prior = LLMPrior(prior_args, seed=seed)
    sets = propose_episodes(episodes, Agent(env_id, k, prior, None, None, history_len, None), f" (worker {shard})")
    return sets, prior.queries


def store_proposals(episodes: list[list[dict]], sets: list[tuple[list, list]]) -> None:
    for records, (cands, next_cands) in zip(episodes, sets):
        for r, c, nc in zip(records, cands, next_cands):
            r["proposals"], r["next_proposals"] = c, nc


def shard_episodes(episodes: list[list[dict]], workers: int) -> list[list[int]]:
    """Episode indices per worker, balanced by transitions (largest episode first to the lightest worker)."""
    shards: list[list[int]] = [[] for _ in range(workers)]
    load = [0] * workers
    for i in sorted(range(len(episodes)), key=lambda i: -len(episodes[i])):
        w = load.index(min(load))
        shards[w].append(i)
        load[w] += len(episodes[i])
    return [sorted(s) for s in shards]


def keep_episode(success: bool, kept: int, kept_successes: int, share: Optional[float]) -> bool:
    """Success-share balancing: keep an episode unless it pushes the share of successful (or of failed) episodes
    past the target, counted with the episode added."""
    if share is None:
        return True
    if success:
        return kept_successes < share * (kept + 1)
    return kept - kept_successes < (1.0 - share) * (kept + 1)


def mix_weights(mix: MixArgs, k: int) -> np.ndarray:
    weights = np.array([mix.expert, mix.noisy, mix.random, mix.prior], dtype=np.float64)
    if (weights < 0).any() or weights.sum() <= 0:
        raise SystemExit(f"the mix weights must be >= 0 and not all 0, got {dataclasses.asdict(mix)}")
    if mix.prior > 0 and k == 0:
        raise SystemExit("--mix.prior > 0 acts over the prior's proposals: it needs --k > 0")
    return weights / weights.sum()


if __name__ == "__main__":
    args = tyro.cli(Args)
    if args.workers < 1:
        raise SystemExit(f"--workers must be at least 1, got {args.workers}")
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    out = args.out or os.path.join("data", f"{args.env}_{args.transitions}_k{args.k}_seed{args.seed}.jsonl")
    weights = mix_weights(args.mix, args.k)
    if args.k == 0:
        args.prior.mode = "none"
    rng = np.random.default_rng(args.seed)
    # the synthetic prior proposes from the expert's action; coverage statistics compare against it
    needs_expert = args.mix.expert > 0 or args.mix.noisy > 0 or (args.k > 0 and args.prior.backend == "synthetic")
    env = make_env(args.env, split=args.split, expert=needs_expert)
    history_len = args.prior.history if args.prior.history is not None else default_history(args.env)
    prior = LLMPrior(args.prior, seed=args.seed) if args.k > 0 else None
    agent = Agent(args.env, args.k, prior, None, None, history_len, None)  # proposals only: no encoder, no Q

    # Collect: episode kinds from the mix, kept or rejected by the success-share balancing.
    start = time.time()
    episodes: list[list[dict]] = []
    successes: list[bool] = []
    stats = {kind: {"kept": 0, "successful": 0, "rejected": 0} for kind in KINDS}
    kept_successes, transitions, rejected_in_a_row, expert_misses, attempts = 0, 0, 0, 0, 0
    while transitions < args.transitions:
        kind = KINDS[int(rng.choice(len(KINDS), p=weights))]
        records, success, misses = rollout(env, kind, rng, args.mix.epsilon, int(rng.integers(2**31)), agent)
        attempts += 1
        if not keep_episode(success, len(episodes), kept_successes, args.success_share):
            stats[kind]["rejected"] += 1
            rejected_in_a_row += 1
            if rejected_in_a_row >= args.max_rejections:
                raise SystemExit(
                    f"{rejected_in_a_row} episodes in a row rejected: this mix cannot reach --success-share "
                    f"{args.success_share} (kept {len(episodes)} episodes, {kept_successes} successful). Add "
                    "failing behaviour (--mix.random) or succeeding behaviour (--mix.expert), or pass "
                    "--success-share None"
                )
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
        if len(episodes) % 50 == 0:
            print(f"collecting: {transitions}/{args.transitions} transitions, {len(episodes)} episodes, "
                  f"{time.time() - start:.0f} s", flush=True)  # fmt: skip
    print(f"collected {transitions} transitions in {len(episodes)} episodes ({kept_successes} successful, "
          f"{attempts - len(episodes)} rejected) in {time.time() - start:.0f} s: "
          + ", ".join(f"{k} {v['kept']}" for k, v in stats.items()), flush=True)  # fmt: skip

    # The k proposals at s and s', episode by episode (cache first, then the LLM), with progress; with --workers the
    # episodes are shared out to processes with their own prior (the parent's stays idle meanwhile).
    fill_start = time.time()
    prior_queries = prior.queries if prior is not None else 0
    if prior is not None and args.workers > 1:
        threads = args.torch_threads or max(1, (os.cpu_count() or 1) // args.workers)
        shards = [s for s in shard_episodes(episodes, args.workers) if s]
        print(f"proposals: {len(shards)} workers, {threads} torch thread(s) each", flush=True)
        context = multiprocessing.get_context("spawn")  # a fresh interpreter per worker: no forked torch state
        with ProcessPoolExecutor(len(shards), mp_context=context) as pool:
            futures = [pool.submit(fill_shard, args.prior, args.seed, args.env, args.k, history_len, threads, w,
                                   [episodes[i] for i in shard]) for w, shard in enumerate(shards)]  # fmt: skip
            for shard, future in zip(shards, futures):
                sets, queries = future.result()
                prior_queries += queries
                store_proposals([episodes[i] for i in shard], sets)
        print(f"proposals: {transitions}/{transitions} transitions, {prior_queries} LLM queries, "
              f"{time.time() - fill_start:.0f} s", flush=True)  # fmt: skip
    elif prior is not None:
        store_proposals(episodes, propose_episodes(episodes, agent))
        prior_queries = prior.queries

    records = [r for episode in episodes for r in episode]
    with_expert = [r for r in records if r["_expert"] is not None]
    header = {
        "env": args.env, "prior": prior.identity if prior else None, "k": args.k if prior else 0,
        "prior_seed": args.seed if prior else None, "history": history_len if prior else None,
        "prior_args": saved_args(args)["prior"] if prior else None,  # (no API key)
        "source": "build_dataset.py", "seed": args.seed, "split": args.split,
        "mix": dataclasses.asdict(args.mix), "success_share_target": args.success_share,
        "transitions": len(records), "episodes": len(episodes), "successful_episodes": kept_successes,
        "success_share": kept_successes / len(episodes),
        "success_transition_share": sum(len(e) for e, ok in zip(episodes, successes) if ok) / len(records),
        "episodes_by_kind": stats, "rejected_episodes": attempts - len(episodes), "expert_misses": expert_misses,
        "data_action_in_proposals": float(np.mean([r["action"] in r["proposals"] for r in records])) if prior else None,
        "expert_action_in_proposals": (float(np.mean([r["_expert"] in r["proposals"] for r in with_expert]))
                                       if prior and with_expert else None),
        "prior_queries": prior_queries,
    }  # fmt: skip
    write_dataset(out, header, records)
    load_dataset(out)  # the file reads back
    print("dataset " + json.dumps({"out": out, **{k: v for k, v in header.items() if k != "prior_args"}}), flush=True)
