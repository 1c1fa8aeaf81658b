"""A plain transformers copy of a LoRA model with the adapter merged in, for fast generation.

QLoRA computes ``dequantise(W4) x + B A x · scale``; the copy holds ``dequantise(W4) + B A · scale``
in 16 bits, so it computes the same function (up to the rounding of the sum) without the 4-bit
dequantisation in every matrix product and without the adapter's extra kernels, and any attention
implementation of transformers (the grouped-query decoding of :mod:`.attention`) runs on it. With the
adapter disabled (the base model of ``compare_base``) the copy is the dequantised base alone.

It costs the 16-bit model's memory (about 15 GiB for Llama-3.1-8B) beside the 4-bit one, so
evaluation uses it only where the run's memory allows (:func:`merged_bytes`; see :mod:`.generator`).
Training and export do not use it: export merges into the unquantised base weights (:mod:`.export`).
Where the copy does not fit, the fast engines generate on the 4-bit model itself with 16-bit copies of
its fp32 parts (:func:`compute_dtype_weights`).
"""
from __future__ import annotations

import contextlib
import copy
from typing import Iterator, Optional

import torch

from ..models.lora import base_model


def _dense(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` as a dense tensor (bitsandbytes 4-bit weights dequantised)."""
    if type(weight).__name__ == "Params4bit":
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(weight.data, weight.quant_state)
    return weight.detach()


def _effective(module: torch.nn.Module) -> tuple[torch.nn.Module, list[torch.Tensor]]:
    """The module that computes in ``module``'s place as the adapter stands (enabled or disabled), and
    the LoRA weight deltas to add to its weight."""
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import ModulesToSaveWrapper

    if isinstance(module, ModulesToSaveWrapper):
        active = [a for a in module.active_adapters if a in module.modules_to_save]
        module = module.original_module if module.disable_adapters or not active else module.modules_to_save[active[0]]
    deltas = []
    if isinstance(module, LoraLayer):
        if not module.disable_adapters and not module.merged:
            deltas = [module.get_delta_weight(a) for a in module.active_adapters if a in module.lora_A]
        module = module.get_base_layer()
    return module, deltas


def _plain_on_meta(model, dtype: torch.dtype) -> tuple[torch.nn.Module, torch.nn.Module]:
    """``model``'s transformers model and an unquantised one of its configuration without storage."""
    from transformers import AutoModelForCausalLM

    base = base_model(model)
    config = copy.deepcopy(base.config)
    config.__dict__.pop("quantization_config", None)
    with torch.device("meta"):
        return base, AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")


def merged_bytes(model, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes the merged copy of ``model`` takes in ``dtype``."""
    return _plain_on_meta(model, dtype)[1].num_parameters() * torch.finfo(dtype).bits // 8


@torch.no_grad()
def merged_copy(model, dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """A plain ``AutoModelForCausalLM`` (eval mode, on ``model``'s device, no gradients) whose weights are
    ``model``'s with the active LoRA adapter merged (or not, where the adapter is disabled)."""
    base, plain = _plain_on_meta(model, dtype)
    device = next(base.parameters()).device
    state = {}
    for path, target in plain.named_modules():
        own = dict(target.named_parameters(recurse=False))
        if not own:
            continue
        source, deltas = _effective(base.get_submodule(path))
        for name in own:
            weight = _dense(getattr(source, name)).to(torch.float32)
            if name == "weight":
                for delta in deltas:
                    weight = weight + delta.to(device=weight.device, dtype=torch.float32)
            state[f"{path}.{name}" if path else name] = weight.to(dtype)
    plain.load_state_dict(state, strict=False, assign=True)
    if getattr(plain.config, "tie_word_embeddings", False):
        plain.tie_weights()
    sources = dict(base.named_buffers())
    for name, buffer in list(plain.named_buffers()):  # e.g. the rotary frequencies, not in any state dict
        if buffer.is_meta and name in sources:
            owner, _, leaf = name.rpartition(".")
            plain.get_submodule(owner)._buffers[leaf] = sources[name].clone()
    missing = [n for n, t in [*plain.named_parameters(), *plain.named_buffers()] if t.is_meta]
    if missing:
        raise RuntimeError(f"merged copy lacks {missing[:3]}")
    plain.to(device).eval().requires_grad_(False)
    return plain


def compute_dtype(model) -> Optional[torch.dtype]:
    """The 16-bit dtype a bitsandbytes 4-bit ``model`` computes in (None: not 4-bit)."""
    config = getattr(model, "config", None)
    quantization = getattr(config, "quantization_config", None)
    dtype = getattr(quantization, "bnb_4bit_compute_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if getattr(quantization, "load_in_4bit", False) and dtype in (torch.bfloat16, torch.float16) else None


def _upcast_parameters(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.dtype == torch.float32] if compute_dtype(model) else []


def compute_dtype_bytes(model) -> int:
    """Bytes :func:`compute_dtype_weights` adds while it holds its copies."""
    return sum(p.numel() for p in _upcast_parameters(model)) * 2


@contextlib.contextmanager
def compute_dtype_weights(model, copies: Optional[dict] = None) -> Iterator[None]:
    """Within: the 32-bit parameters of a 4-bit ``model`` hold 16-bit copies (restored after); a model
    that is not 4-bit (the merged copy) is left as it is. ``copies`` (a parameter's id -> its copy) keeps the
    copies for the next call, which then installs the same tensors: a CUDA graph recorded with them
    replays (:mod:`.engines`).

    peft's ``prepare_model_for_kbit_training`` keeps norms, embeddings, the output head (and LoRA
    holds its weights) in fp32 for training; the residual stream then runs in fp32, every layer's keys
    and values come out in fp32, the KV cache takes twice the memory, and each decoding step casts the
    cache to the 16-bit compute dtype for attention. With 16-bit copies the 4-bit model computes in its
    compute dtype, as the merged copy does. Buffers (the rotary frequencies) stay as they are.
    """
    dtype = compute_dtype(model)
    copies = {} if copies is None else copies
    held = [(p, p.data) for p in _upcast_parameters(model)]
    try:
        for p, data in held:
            if id(p) not in copies:
                copies[id(p)] = data.to(dtype)
            p.data = copies[id(p)]
        yield
    finally:
        for p, data in held:
            p.data = data
