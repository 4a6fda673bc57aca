"""GGUF files -> transformers models, reading the file once.

transformers' own GGUF path parses a file up to three times (config, tokenizer, weights; ~20 s each for a 262k-token
vocabulary with gguf's `GGUFReader`) and dequantises with numpy. For the architectures this module knows (`gemma3`,
`llama`) it instead:
- reads the header, metadata and tensor table with a small parser (~0.1 s), skipping the vocabulary's strings;
- builds the same config dict as transformers' `load_gguf_checkpoint` (the same name mapping, applied to the same
  values);
- dequantises each tensor with torch, in exactly the float32 operations of gguf's numpy code (bit-identical; other
  quantisation types fall back to gguf's numpy code), and names them with transformers' own GGUF name map and
  tensor processor (Gemma stores its norms as w + 1);
- leaves the tokenizer to transformers' GGUF tokenizer converter, once: `models.py` saves its result.

Nothing of the weights is written anywhere: a later load dequantises the GGUF file again (seconds), which is cheaper
than reading a float32 copy four times its size. `load_gguf_checkpoint` is the reference the tests compare against.
Other architectures return None from `config_dict`, and the caller falls back to transformers' path.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

FAST_ARCHITECTURES = ("gemma3", "llama")

# metadata value types: fixed-size scalars (8 = string and 9 = array are handled apart)
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_F32, _F16, _BF16 = 0, 1, 30
# ggml type -> (elements, bytes) per block
_BLOCK = {2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34), 10: (256, 84), 11: (256, 110),
          12: (256, 144), 13: (256, 176), 14: (256, 210)}  # fmt: skip


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order (ggml lists the fastest-moving dimension first)
    ggml_type: int
    start: int  # byte offset in the file
    nbytes: int


@dataclass(frozen=True)
class GgufFile:
    path: Path
    metadata: dict  # string arrays (the vocabulary) as their length only
    tensors: dict[str, TensorInfo]

    @property
    def architecture(self) -> str:
        return self.metadata["general.architecture"]


def read(path: Path) -> GgufFile:
    """Header, metadata and tensor table of a GGUF file (v2 or v3); no tensor data is read."""
    path = Path(path)
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file (no GGUF magic bytes)")
        version, n_tensors, n_kv = struct.unpack("<IQQ", f.read(20))
        if version not in (2, 3):
            raise ValueError(f"{path} is GGUF v{version}; this reader reads v2 and v3")
        buf = _Reader(f)
        metadata = {}
        for _ in range(n_kv):
            key = buf.string()
            metadata[key] = buf.value(buf.u32())
        infos = []
        for _ in range(n_tensors):
            name = buf.string()
            n_dims = buf.u32()
            dims = struct.unpack(f"<{n_dims}Q", buf.take(8 * n_dims))
            ggml_type, offset = struct.unpack("<IQ", buf.take(12))
            infos.append((name, tuple(reversed(dims)), ggml_type, offset))
        alignment = metadata.get("general.alignment", 32)
        data_start = (buf.pos + alignment - 1) // alignment * alignment
    tensors = {}
    for name, shape, ggml_type, offset in infos:
        count = int(np.prod(shape))
        if ggml_type in (_F32, _F16, _BF16):
            nbytes = count * (4 if ggml_type == _F32 else 2)
        elif ggml_type in _BLOCK:
            nbytes = count // _BLOCK[ggml_type][0] * _BLOCK[ggml_type][1]
        else:
            raise ValueError(f"{path}: tensor {name} has ggml type {ggml_type}, which this reader does not know")
        tensors[name] = TensorInfo(name, shape, ggml_type, data_start + offset, nbytes)
    return GgufFile(path, metadata, tensors)


class _Reader:
    """Sequential little-endian reads from a file, buffered in 1 MB chunks (the metadata holds ~10^6 small items)."""

    def __init__(self, f) -> None:
        self.f, self.data, self.at, self.pos = f, b"", 0, f.tell()

    def take(self, n: int) -> bytes:
        if self.at + n > len(self.data):
            self.data = self.data[self.at :] + self.f.read(max(n, 1 << 20))
            self.at = 0
            if n > len(self.data):
                raise ValueError("GGUF file ends inside its header")
        out = self.data[self.at : self.at + n]
        self.at += n
        self.pos += n
        return out

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]

    def string(self) -> str:
        (length,) = struct.unpack("<Q", self.take(8))
        return self.take(length).decode("utf-8")

    def value(self, kind: int):
        if kind in _SCALAR:
            fmt = _SCALAR[kind]
            return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]
        if kind == 8:
            return self.string()
        if kind == 9:
            item, count = struct.unpack("<IQ", self.take(12))
            if item in _SCALAR:
                fmt = _SCALAR[item]
                return list(struct.unpack(f"<{count}{fmt[1]}", self.take(count * struct.calcsize(fmt))))
            if item == 8:  # a vocabulary or merge table: only its length (the tokenizer converter reads it itself)
                for _ in range(count):
                    (length,) = struct.unpack("<Q", self.take(8))
                    self.take(length)
                return count
        raise ValueError(f"GGUF metadata value of type {kind}, which this reader does not know")


# ---- config ----------------------------------------------------------------------------------------------------------
def config_dict(gguf: GgufFile) -> dict | None:
    """The config dict transformers' `load_gguf_checkpoint` builds for this file, or None for an architecture whose
    special cases this module does not reproduce (the caller then uses transformers' own path)."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_TO_TRANSFORMERS_MAPPING

    arch = gguf.architecture
    name = gguf.metadata.get("general.name", "")
    if arch not in FAST_ARCHITECTURES or (arch == "llama" and "mistral" in str(name)):
        return None
    config = {"tie_word_embeddings": "output.weight" not in gguf.tensors}
    mapping = GGUF_TO_TRANSFORMERS_MAPPING["config"]
    for key, value in gguf.metadata.items():
        prefix, _, rest = key.partition(".")
        if prefix in mapping and rest in mapping[prefix]:
            renamed = mapping[prefix][rest]
            if renamed not in (None, -1):
                config[renamed] = value[0] if isinstance(value, list) and len(value) == 1 else value
    if config["model_type"] == "gemma3":
        config["model_type"] = "gemma3_text"  # a Gemma 3 GGUF holds the text model only
    if "vocab_size" not in config:
        config["vocab_size"] = gguf.metadata["tokenizer.ggml.tokens"]  # its length, see _Reader.value
    return config


# ---- weights ---------------------------------------------------------------------------------------------------------
def state_dict(gguf: GgufFile, model) -> dict[str, torch.Tensor]:
    """The file's tensors as float32 torch tensors under `model`'s parameter names (`model` may live on the meta
    device: only its names are used)."""
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    processor = TENSOR_PROCESSORS.get(gguf.architecture, TensorProcessor)(config=model.config.to_dict())
    names = hf_names(model, processor, gguf.architecture)
    raw = np.memmap(gguf.path, dtype=np.uint8, mode="r")
    out = {}
    for info in gguf.tensors.values():
        if info.name not in names:
            continue
        values = dequantize(torch.from_numpy(np.array(raw[info.start : info.start + info.nbytes])), info.ggml_type)
        out[names[info.name]] = processor.process(weights=values.reshape(info.shape), name=info.name).weights
    return out


def hf_names(model, processor, architecture: str) -> dict[str, str]:
    """{GGUF tensor name: the model's parameter name}: transformers' `get_gguf_hf_weights_map` (a parent module's
    names win over its children's, earlier children over later ones), with gguf's name table built once instead of
    once per module (5 s for Gemma 3)."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    arch = next(key for key, value in MODEL_ARCH_NAMES.items() if value == architecture)
    table = get_tensor_name_map(arch, model.config.num_hidden_layers)
    names: dict[str, str] = {}

    def visit(module, prefix: str) -> None:
        for hf_name in module.state_dict(keep_vars=True):
            hf_name = processor.preprocess_name(hf_name)
            stem, suffix = hf_name, ""
            if hf_name.endswith((".weight", ".bias")):
                stem, suffix = hf_name.rsplit(".", 1)
                suffix = "." + suffix
            gguf_name = table.get_name(stem)
            if gguf_name is not None:
                names.setdefault(gguf_name + suffix, prefix + hf_name)
        for child_name, child in module.named_children():
            visit(child, f"{prefix}{child_name}.")

    visit(model, "")
    return names


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """One float16 per block at byte `start`, as float32 (n, 1)."""
    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor, width: int) -> torch.Tensor:
    """(n, m) bytes -> (n, 2m) 4-bit values: low nibbles of each `width` bytes, then their high nibbles."""
    n = qs.shape[0]
    q = qs.reshape(n, -1, 1, width) >> torch.tensor([0, 4], dtype=torch.uint8).reshape(1, 1, 2, 1)
    return (q & 0x0F).reshape(n, -1)


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    return _f16(b, 0) * (_nibbles(b[:, 2:], 16).to(torch.int8) - 8).float()


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    return (_f16(b, 0) * _nibbles(b[:, 4:], 16).float()) + _f16(b, 2)


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    high = b[:, 2:6].contiguous().view(torch.int32).reshape(-1, 1)  # 32 fifth bits, little-endian
    high = ((high >> torch.arange(32, dtype=torch.int32)) & 1).to(torch.uint8)
    q = (_nibbles(b[:, 6:], 16) | (high << 4)).to(torch.int8) - 16
    return _f16(b, 0) * q.float()


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    # numpy's x.astype(float32) * d, as a cast and then an in-place product: one mixed int8 * float32 product over the
    # strided blocks took 4.4 s for Gemma's 262k x 640 embedding on one core, these two passes 0.4 s (bit-identical)
    return b[:, 2:].view(torch.int8).to(torch.float32).mul_(_f16(b, 0))


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    s = b[:, 4:16].reshape(n, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    scale = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1).float()
    minimum = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1).float()
    d = (_f16(b, 0) * scale).reshape(n, -1, 1)
    dm = (_f16(b, 2) * minimum).reshape(n, -1, 1)
    q = b[:, 16:].reshape(n, -1, 1, 32) >> torch.tensor([0, 4], dtype=torch.uint8).reshape(1, 1, 2, 1)
    q = (q & 0x0F).reshape(n, -1, 32).float()
    return (d * q - dm).reshape(n, 256)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    ql, qh, scales = b[:, :128], b[:, 128:192], b[:, 192:208]
    d = (_f16(b, 208) * scales.contiguous().view(torch.int8).float()).reshape(n, 16, 1)
    ql = ql.reshape(n, -1, 1, 64) >> torch.tensor([0, 4], dtype=torch.uint8).reshape(1, 1, 2, 1)
    ql = (ql & 0x0F).reshape(n, -1, 32)
    qh = qh.reshape(n, -1, 1, 32) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)
    qh = (qh & 0x03).reshape(n, -1, 32)
    q = ((ql | (qh << 4)).to(torch.int8) - 32).reshape(n, 16, -1).float()
    return (d * q).reshape(n, 256)


_TORCH_DEQUANT = {2: _q4_0, 3: _q4_1, 6: _q5_0, 8: _q8_0, 12: _q4_k, 14: _q6_k}


def dequantize(data: torch.Tensor, ggml_type: int) -> torch.Tensor:
    """Flat uint8 bytes of one tensor -> flat float32 values, bit-identical to `gguf.quants.dequantize`."""
    if ggml_type == _F32:
        return data.view(torch.float32)
    if ggml_type in (_F16, _BF16):
        return data.view(torch.float16 if ggml_type == _F16 else torch.bfloat16).float()
    if ggml_type in _TORCH_DEQUANT:
        return _TORCH_DEQUANT[ggml_type](data.reshape(-1, _BLOCK[ggml_type][1])).reshape(-1)
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as numpy_dequantize

    return torch.from_numpy(numpy_dequantize(data.numpy(), GGMLQuantizationType(ggml_type)).reshape(-1).copy())
