"""Helpers shared by the test files (`from helpers import ...`: pytest's default import mode puts tests/ on sys.path).

Fixtures live in conftest.py; plain functions here. torch / transformers are imported where used, so that importing
this module stays cheap for the tests that only run scripts.
"""

import contextlib
import functools
import http.server
import json
import os
import subprocess
import sys
import threading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- running the scripts ---------------------------------------------------------------------------------------------
def run_script(script, *argv, check=True, env=None):
    """Run `python <ROOT>/<script> *argv` from the repository root (with `env` added to the environment); with
    `check`, a failure shows the output's end."""
    result = subprocess.run([sys.executable, os.path.join(ROOT, script), *argv], cwd=ROOT, capture_output=True,
                            text=True, env={**os.environ, **(env or {})})  # fmt: skip
    if check and result.returncode != 0:
        raise AssertionError(f"{script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def script_runner(script):
    """run_script bound to one script: `run = script_runner("bc.py"); run("--total-steps", "2", check=False)`."""
    return functools.partial(run_script, script)


def last_json(result, prefix):
    """The JSON after `prefix` on the last stdout line that starts with it."""
    line = [l for l in result.stdout.splitlines() if l.startswith(prefix)][-1]
    return json.loads(line[len(prefix) :])


def summary_of(result):
    """The `summary {...}` line every training script prints last."""
    return last_json(result, "summary ")


# ---- tiny random language models -------------------------------------------------------------------------------------
def tiny_tokenizer(corpus, vocab_size=500):
    """A byte-level BPE tokenizer trained on `corpus` (5 times over), with <pad>, <eos> and <bos>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<eos>", "<bos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tok.train_from_iterator(list(corpus) * 5, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")


TINY_KINDS = ("llama", "gemma3-sliding", "gemma3-wide", "t5", "bert")


def make_tiny_model(kind, folder, corpus, vocab_size=500, max_position_embeddings=2048) -> str:
    """A random LM + BPE tokenizer saved as a local HF folder (the same load path as a real model); seeded, so the
    same arguments give the same weights. kind: "llama", "gemma3-sliding" (sliding-window layers with a window
    shorter than the prompts: padding and the KV cache must stay exact), "gemma3-wide" (the same, a window of 512), "t5" (seq2seq) or "bert" (an encoder, for
    `--encoder` where the embedded MiniLM is not installed)."""
    import torch
    from transformers import (AutoModelForCausalLM, BertConfig, BertModel, Gemma3TextConfig, LlamaConfig, T5Config,
                              T5ForConditionalGeneration)  # fmt: skip

    if kind not in TINY_KINDS:
        raise ValueError(f"unknown tiny model kind {kind!r}; one of {TINY_KINDS}")
    torch.manual_seed(0)
    tok = tiny_tokenizer(corpus, vocab_size)
    ids = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    if kind == "llama":
        config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=max_position_embeddings,
                             bos_token_id=tok.bos_token_id, **ids)  # fmt: skip
        model = AutoModelForCausalLM.from_config(config)
    elif kind in ("gemma3-sliding", "gemma3-wide"):
        config = Gemma3TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=1, head_dim=8, sliding_window=8 if kind == "gemma3-sliding" else 512,
                                  max_position_embeddings=max_position_embeddings,
                                  layer_types=["sliding_attention", "full_attention"], bos_token_id=tok.bos_token_id,
                                  **ids)  # fmt: skip
        model = AutoModelForCausalLM.from_config(config)
    elif kind == "bert":
        config = BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            max_position_embeddings=max_position_embeddings, **ids)  # fmt: skip
        model = BertModel(config)
    else:
        config = T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                          decoder_start_token_id=tok.pad_token_id, **ids)  # fmt: skip
        model = T5ForConditionalGeneration(config)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def reference_logliks(model, id_pairs, seq2seq=False) -> list[float]:
    """The slow reference for batched, padded, cached action scoring: for each (prompt ids, action ids) pair, one
    full forward without padding or cache, and the sum of the action tokens' log-probabilities (in float64)."""
    import torch

    out = []
    for p_ids, a_ids in id_pairs:
        with torch.no_grad():
            if seq2seq:
                logits = model(input_ids=torch.tensor([p_ids]), labels=torch.tensor([a_ids])).logits[0]
                positions = range(len(a_ids))
            else:
                logits = model(input_ids=torch.tensor([p_ids + a_ids])).logits[0]
                positions = range(len(p_ids) - 1, len(p_ids) + len(a_ids) - 1)
            logp = torch.log_softmax(logits.double(), -1)
        out.append(sum(logp[i, t].item() for i, t in zip(positions, a_ids)))
    return out


# ---- a local HTTP server ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def serve_http(handler):
    """Serve `handler` (a BaseHTTPRequestHandler class) on 127.0.0.1 at a free port in a daemon thread; yields the
    server (its port: server.server_address[1]) and shuts it down on exit."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


class FlakyServer(http.server.BaseHTTPRequestHandler):
    """An OpenAI-compatible completions server that answers `budget` requests, then drops every connection."""

    budget = 0
    authorization: list[str] = []  # the Authorization header of every request

    def log_message(self, *args):
        pass

    def _answer(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # /models, asked once when the backend starts
        self._answer({"data": [{"id": "fake"}]})

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FlakyServer.authorization.append(self.headers.get("Authorization"))
        if FlakyServer.budget <= 0:
            self.close_connection = True  # the client sees the connection drop, as when a server dies
            return
        FlakyServer.budget -= 1
        texts = ["Go Right", "Go Down", "I would go down", "left", "Go Up"]
        self._answer({"choices": [{"index": i, "text": texts[i % 5]} for i in range(req["n"])]})
