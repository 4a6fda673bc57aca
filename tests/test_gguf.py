"""llmprior.gguf, the one-pass GGUF loader: its dequantisation bit-for-bit against gguf's numpy code, its names against
transformers' name map, and a whole tiny GGUF file (config, weights, tokenizer, logits) against transformers' own
GGUF path; the embedded Gemma and SmolLM2 files the same way in the slow tests."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize as numpy_dequantize
from gguf.quants import quantize as numpy_quantize
from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3TextConfig, LlamaConfig
from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, get_gguf_hf_weights_map, load_gguf_checkpoint

from llmprior import gguf
from llmprior.models import load_model

CPU = torch.device("cpu")
BLOCK = {"Q4_0": (32, 18, [0]), "Q4_1": (32, 20, [0, 2]), "Q5_0": (32, 22, [0]), "Q8_0": (32, 34, [0]),
         "Q4_K": (256, 144, [0, 2]), "Q6_K": (256, 210, [208]), "Q5_K": (256, 176, [0, 2])}  # fmt: skip


@pytest.mark.parametrize("name", sorted(BLOCK))
def test_dequantize_is_bit_identical_to_gguf_numpy(name):
    """Random blocks (finite float16 scales at the offsets each format keeps them); Q5_K goes the numpy fallback."""
    elements, nbytes, scale_offsets = BLOCK[name]
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, size=(64, nbytes), dtype=np.uint8)
    for offset in scale_offsets:
        blocks[:, offset : offset + 2] = rng.normal(0, 0.05, size=(64, 1)).astype(np.float16).view(np.uint8)
    qtype = GGMLQuantizationType[name]
    ref = numpy_dequantize(blocks.reshape(-1), qtype).reshape(-1).astype(np.float32)
    mine = gguf.dequantize(torch.from_numpy(blocks.reshape(-1).copy()), qtype.value).numpy()
    assert mine.shape == (64 * elements,) and np.isfinite(ref).all()
    np.testing.assert_array_equal(mine.view(np.uint32), ref.view(np.uint32))


def tiny_config(arch: str):
    common = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, bos_token_id=2, eos_token_id=1, pad_token_id=0)
    if arch == "gemma3":
        return Gemma3TextConfig(head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                                **common)  # fmt: skip
    return LlamaConfig(**common)


@pytest.mark.parametrize("arch", ["gemma3", "llama"])
def test_names_are_transformers_name_map(arch):
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_config(arch))
    processor = TENSOR_PROCESSORS[arch](config=model.config.to_dict())
    assert gguf.hf_names(model, processor, arch) == get_gguf_hf_weights_map(model, processor)


def write_tiny_gguf(path, arch: str) -> None:
    """A tiny random model as llama.cpp would write it: GGUF names, Gemma's norms as w + 1, the matrices in Q8_0
    and Q4_0 (the rest float32), and a sentencepiece-style vocabulary."""
    config = tiny_config(arch)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    processor = TENSOR_PROCESSORS[arch](config=config.to_dict())
    to_hf = gguf.hf_names(model, processor, arch)
    params = model.state_dict()
    writer = GGUFWriter(str(path), arch)
    prefix = arch
    writer.add_name("tiny")
    writer.add_uint32(f"{prefix}.context_length", config.max_position_embeddings)
    writer.add_uint32(f"{prefix}.embedding_length", config.hidden_size)
    writer.add_uint32(f"{prefix}.block_count", config.num_hidden_layers)
    writer.add_uint32(f"{prefix}.feed_forward_length", config.intermediate_size)
    writer.add_uint32(f"{prefix}.attention.head_count", config.num_attention_heads)
    writer.add_uint32(f"{prefix}.attention.head_count_kv", config.num_key_value_heads)
    writer.add_float32(f"{prefix}.attention.layer_norm_rms_epsilon", 1e-6)
    writer.add_float32(f"{prefix}.rope.freq_base", 10000.0)
    if arch == "gemma3":
        writer.add_uint32(f"{prefix}.attention.key_length", 16)
        writer.add_uint32(f"{prefix}.attention.value_length", 16)
        writer.add_uint32(f"{prefix}.attention.sliding_window", 8)
    else:
        writer.add_uint32(f"{prefix}.rope.dimension_count", 16)
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    pieces = [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["\u2581", ".", ",", ":"]
    words = ["\u2581" + w for w in "you are in the kitchen pick up tomato go to cabinet take bowl chop serve".split()]
    tokens = specials + pieces + words
    tokens += [f"\u2581w{i}" for i in range(config.vocab_size - len(tokens))]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * 4 + [-float(i) for i in range(len(tokens) - 4)])
    writer.add_token_types([3] * 4 + [1] * (len(tokens) - 4))
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(True)
    from_hf = {hf: name for name, hf in to_hf.items()}
    for i, (hf_name, value) in enumerate(params.items()):
        if hf_name not in from_hf:  # the tied LM head
            continue
        name, data = from_hf[hf_name], value.numpy().astype(np.float32)
        if arch == "gemma3" and "norm" in name:
            data = data + 1.0
        if data.ndim == 2:
            qtype = GGMLQuantizationType.Q8_0 if i % 2 else GGMLQuantizationType.Q4_0
            writer.add_tensor(name, numpy_quantize(data, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("arch", ["gemma3", "llama"])
def test_tiny_gguf_loads_exactly_as_transformers_converts_it(tmp_path, monkeypatch, arch):
    monkeypatch.setenv("LLMPRIOR_CACHE", str(tmp_path / "cache"))
    path = tmp_path / f"tiny-{arch}.gguf"
    write_tiny_gguf(path, arch)
    file = gguf.read(path)
    assert gguf.config_dict(file) == load_gguf_checkpoint(str(path), return_tensors=False)["config"]

    model, tokenizer, label = load_model(str(path), CPU, torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32)
    ref_tokenizer = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    ours, theirs = model.state_dict(), ref.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours), [k for k in ours if not torch.equal(ours[k], theirs[k])]
    text = "you are in the kitchen. pick up the tomato: go to cabinet"
    assert tokenizer(text)["input_ids"] == ref_tokenizer(text)["input_ids"]
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    assert model.generation_config.to_dict() == ref.generation_config.to_dict()
    # the cache keeps config and tokenizer only; a second load reads the same weights from the GGUF again
    folder = tmp_path / "cache" / "converted" / label
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "generation_config.json", "tokenizer.json",
                                                         "tokenizer_config.json"]  # fmt: skip
    again, _, _ = load_model(str(path), CPU, torch.float32)
    assert all(torch.equal(again.state_dict()[k], ours[k]) for k in ours)


def test_read_rejects_a_file_that_is_not_gguf(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"not a model at all" * 10)
    with pytest.raises(ValueError, match="not a GGUF file"):
        gguf.read(path)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gemma", "smollm2"])
def test_embedded_gguf_loads_exactly_as_transformers_converts_it(tmp_path, monkeypatch, name):
    """The embedded prior and LM policy: the same config, weights, tokenizer and logits as transformers' own
    (dequantising) GGUF conversion, which is what earlier versions of this package saved and loaded."""
    from transformers import GgufConfig

    from llmprior.models import _gguf_source

    monkeypatch.setenv("LLMPRIOR_CACHE", str(tmp_path))
    path, _ = _gguf_source(name)
    model, tokenizer, _ = load_model(name, CPU, torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                               quantization_config=GgufConfig(dequantize=True))  # fmt: skip
    # the config read from the GGUF's metadata (a parse of its own; the tiny files above check it field by field)
    config, ref_config = model.config.to_dict(), ref.config.to_dict()
    assert {k: v for k, v in config.items() if k != "_name_or_path"} == {k: v for k, v in ref_config.items()
                                                                         if k != "_name_or_path"}  # fmt: skip
    ref_tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    ours, theirs = model.state_dict(), ref.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert type(tokenizer) is type(ref_tokenizer)
    for text in ["Your task is to serve the dish.\n  Action: pick up the tomato", "go to cabinet 10<eos>", " \t\n"]:
        assert tokenizer(text)["input_ids"] == ref_tokenizer(text)["input_ids"]
    ids = torch.tensor([tokenizer("You notice a tomato on the table. Action: chop the tomato")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    assert model.generation_config.to_dict() == ref.generation_config.to_dict()


def test_model_load_benchmark_on_a_tiny_gguf(tmp_path):
    """benchmarks/model_load.py: the first load writes config and tokenizer into a fresh cache, a later one nothing."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import model_load
    from common import read_csv

    path = tmp_path / "tiny-llama.gguf"
    write_tiny_gguf(path, "llama")
    assert model_load.main(["--models", str(path), "--results-dir", str(tmp_path)]) == 0
    first, later = read_csv(str(tmp_path / "model_load.csv"))
    assert (first["phase"], later["phase"]) == ("first", "later") and first["model"] == str(path)
    assert first["written_mb"] > 0 and later["written_mb"] == 0 and later["load_s"] > 0
    assert first["command"].startswith("OMP_NUM_THREADS=")
