"""A ``.gguf`` file as a Hugging Face checkpoint directory: dequantised once into the cache.

transformers reads GGUF files (``from_pretrained(dir, gguf_file=...)``) but keeps the result marked as
GGUF-quantised, which neither peft's merge nor ``save_pretrained`` accept, and re-reads the file on
every load. So a ``.gguf`` named as ``model.model_name_or_path`` is converted once: its weights copied
into a plain model (float32: Q4/Q8 blocks dequantised exactly), saved with its tokenizer, chat template
and generation config beside the embedded tiny model (``BENGALI_EMPATHY_CACHE``), and every command
then loads that directory. Nothing is downloaded.
"""
from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Optional

from .._io import atomic_directory
from ..data.tokenizer import cache_dir, llama_cpp_pre_tokenizers
from ..errors import UserError
from .gpu import head_dim

# Part of the cache key: a checkpoint converted by an older version is converted again (2: the pre-tokenizer the
# file names, SmolLM's too, instead of GPT-2's).
CONVERSION_VERSION = 2


def llama3_rope_factors(config) -> Optional[list[float]]:
    """Llama 3's per-frequency RoPE scaling factors (llama.cpp reads them from ``rope_freqs.weight``), or None."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if str(rope.get("rope_type", rope.get("type", ""))).lower() != "llama3":
        return None
    base = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    dim = head_dim(config)
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    factors = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * base ** (i / dim)
        if wavelen < old_ctx / high:
            factors.append(1.0)
        elif wavelen > old_ctx / low:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return factors


# The special tokens a GGUF names by id; transformers' GGUF tokenizer conversion can get them wrong
# (SmolLM2-135M-Instruct's eos, id 2 ``<|im_end|>``, came out as ``<|im_start|>``), so they are set from here.
SPECIAL_TOKEN_IDS = {"bos_token": "tokenizer.ggml.bos_token_id", "eos_token": "tokenizer.ggml.eos_token_id",
                     "pad_token": "tokenizer.ggml.padding_token_id"}


def gguf_metadata(path: Path) -> dict:
    """``general.architecture``, the special-token ids and the tensor types of a GGUF file."""
    try:
        from gguf import GGUFReader
    except ImportError as exc:
        raise UserError("reading a .gguf model needs the gguf package: pip install -e '.[gguf]'") from exc
    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # a truncated or foreign file: the reader's own message says which
        raise UserError(f"{path}: not a readable GGUF file ({exc})") from exc

    def scalar(key: str):
        field = reader.fields.get(key)
        if field is None:
            return None
        value = field.parts[field.data[0]]
        return bytes(value).decode() if field.types and field.types[0].name == "STRING" else int(value[0])

    rope_freqs = next((t.data.tolist() for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    return {"architecture": scalar("general.architecture"), "pre_tokenizer": scalar("tokenizer.ggml.pre"),
            "special_tokens": {name: token for name, key in SPECIAL_TOKEN_IDS.items()
                               if (token := scalar(key)) is not None},
            "tensor_types": sorted({t.tensor_type.name for t in reader.tensors}), "rope_freqs": rope_freqs}


def check_loadable(path: Path, meta: dict) -> None:
    """One line for a GGUF that transformers cannot turn into a model: its architecture or a tensor type."""
    from gguf.quants import _type_traits
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    if meta["architecture"] not in GGUF_SUPPORTED_ARCHITECTURES:
        raise UserError(f"{path}: GGUF architecture {meta['architecture']!r} is not one transformers can load "
                        f"({', '.join(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ('general', 'tokenizer'))})")
    from gguf import GGMLQuantizationType

    plain = {"F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64"}
    unknown = [t for t in meta["tensor_types"]
               if t not in plain and GGMLQuantizationType[t] not in _type_traits]
    if unknown:
        raise UserError(f"{path}: GGUF tensor types {', '.join(unknown)} cannot be dequantised here")


def gguf_checkpoint_dir(path: Path) -> Path:
    """The cached Hugging Face checkpoint of the GGUF file ``path`` (converted on first use)."""
    path = path.expanduser().resolve()
    if not path.is_file():
        raise UserError(f"GGUF file not found: {path}")
    stat = path.stat()
    key = hashlib.sha256(f"{CONVERSION_VERSION}:{path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / "gguf" / f"{path.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    meta = gguf_metadata(path)
    check_loadable(path, meta)
    print(f"converting {path.name} to a Hugging Face checkpoint in {target} (once)", flush=True)
    try:
        with atomic_directory(target, replace=False) as tmp:
            _write_checkpoint(path, meta, tmp)
    except FileExistsError:
        pass  # another process converted it first
    return target


def llama3_rope_parameters(path: Path, config, rope_freqs: list[float]) -> dict:
    """Llama 3's RoPE scaling from the ``rope_freqs`` factors llama.cpp keeps in the file (transformers' GGUF reader
    drops them and would rotate with the unscaled frequencies): Meta's settings with the file's largest factor,
    checked against every factor."""
    rope = {**(config.rope_parameters or {}), "rope_type": "llama3", "factor": max(rope_freqs), "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    config.rope_parameters = rope
    expected = llama3_rope_factors(config)
    if expected is None or len(expected) != len(rope_freqs) or any(
            not math.isclose(a, b, rel_tol=1e-5) for a, b in zip(expected, rope_freqs)):
        raise UserError(f"{path}: its RoPE frequency factors (rope_freqs) are not Llama 3's scaling; "
                        "this package cannot load them")
    return rope


def _write_checkpoint(path: Path, meta: dict, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    if (pre := llama_cpp_pre_tokenizers().get(meta["pre_tokenizer"])) is not None:
        # transformers' GGUF conversion gives every byte-level vocabulary GPT-2's pre-tokenizer, whatever the file
        # names: Llama 3's "\n\n" before a word became two tokens, not one; SmolLM's "\n\n" before a digit two,
        # not llama.cpp's (and SmolLM's own) one. The model was trained, and llama.cpp runs it, with the named one.
        tokenizer.backend_tokenizer.pre_tokenizer = pre
    names = tokenizer.convert_ids_to_tokens(list(meta["special_tokens"].values()))
    tokenizer.add_special_tokens(dict(zip(meta["special_tokens"], names)))
    if not tokenizer.chat_template:
        raise UserError(f"{path}: the GGUF carries no chat template (tokenizer.chat_template)")
    read = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    config = read.config
    config.quantization_config = None
    config.rms_norm_eps = float(f"{config.rms_norm_eps:.7g}")  # stored as float32: 1e-05 came back 9.9999997e-06
    if meta["rope_freqs"] is not None:
        config.rope_parameters = llama3_rope_parameters(path, config, meta["rope_freqs"])
    for name, token in meta["special_tokens"].items():
        setattr(config, f"{name}_id", token)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(read.state_dict())
    model.generation_config = read.generation_config
    model.generation_config.eos_token_id = meta["special_tokens"].get("eos_token", config.eos_token_id)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
