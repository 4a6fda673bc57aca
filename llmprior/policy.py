"""The language-model policy of GFlan(-Prior) and BC: GLAM's action scoring (Carta et al. 2023) on a causal or
seq2seq LM, a value head, LoRA adapters, and the frozen-trunk cache.

π_θ(a|s) = softmax over the admissible actions of log p_LM(a | prompt), the summed log-probability of the action's
tokens after the prompt (`normalize`: their mean over tokens, or the sum over the action's word count as TWOSOME);
V(s) = an MLP (hidden 256) on the LM's last hidden state of the prompt. The default LM is the embedded
SmolLM2-135M-Instruct, with LoRA (r = 8, scaling 2) on its top 8 blocks: backpropagation stops at the lowest adapted
block, and the blocks below never change, which the frozen-trunk cache exploits (see LMPolicy).
"""

from __future__ import annotations

import copy
import sys
from collections import OrderedDict
from typing import Optional

import torch
import torch.nn as nn
import torch.optim as optim

from llmprior.models import kv_cache_name, load_model, resolve_dtype

VALUE_HIDDEN = 256


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
        kv = kv_cache_name()
        cache = getattr(out, kv)
        cache.batch_select_indices(owner)
        a_pos = p_mask.sum(-1)[owner].unsqueeze(1) + torch.arange(a_ids.shape[1], device=a_ids.device)
        a_out = model(**a_in, attention_mask=torch.cat([p_mask[owner], a_mask], 1), position_ids=a_pos, **{kv: cache},
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


def load_policy(model: str, device: torch.device, lora_layers: Optional[int] = 8, lora_r: int = 8,
                dtype: Optional[str] = None, normalize: str = "sum", trunk_cache_mb: int = 2048,
                attn_implementation: Optional[str] = None) -> LMPolicy:  # fmt: skip
    """The policy LM (causal or seq2seq; a name as llmprior.models reads it), with LoRA adapters (rank `lora_r`,
    scaling 2) on the top `lora_layers` blocks (None = all) unless lora_r = 0, where every weight trains."""
    lm, tokenizer, _ = load_model(model, torch.device("cpu"), resolve_dtype(dtype, device), seq2seq=True,
                                  attn_implementation=attn_implementation)  # fmt: skip
    config = lm.config
    # Dropout off for good: PPO's ratio π_θ/π_old must be 1 before the first step.
    lm.eval()
    if lora_r > 0:
        from peft import LoraConfig, inject_adapter_in_model

        lm.requires_grad_(False)
        n_layers = config.get_text_config().num_hidden_layers if not lm.config.is_encoder_decoder else config.num_layers
        layers = None if lora_layers is None else list(range(max(n_layers - lora_layers, 0), n_layers))
        head = lm.get_output_embeddings()  # every linear layer of the blocks, not the LM head
        linears = {n.rsplit(".", 1)[-1] for n, m in lm.named_modules() if isinstance(m, nn.Linear) and m is not head}
        lora = LoraConfig(r=lora_r, lora_alpha=2.0 * lora_r, lora_dropout=0.0, target_modules=sorted(linears),
                          layers_to_transform=layers)  # fmt: skip
        lm = inject_adapter_in_model(lora, lm)
        for name, p in lm.named_parameters():
            p.requires_grad_("lora_" in name)
            if "lora_" in name:  # float32 adapters (and Adam moments) over a bfloat16 base: the usual mixed precision
                p.data = p.data.float()
    policy = LMPolicy(lm, tokenizer, normalize, VALUE_HIDDEN, trunk_cache_mb).to(device)
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
