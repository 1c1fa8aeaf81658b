"""Liger-Kernel's fused Triton kernels in a Llama model's generation forwards (prefill and decoding steps).

In eager PyTorch each elementwise part of a Llama layer is several kernels that each read and write the
whole activation: RMSNorm upcasts to fp32, squares, averages, scales, casts back and multiplies by its
weight; the rotary embedding multiplies, slices, negates, concatenates and adds, for the queries and again
for the keys; the MLP applies SiLU, then multiplies. Liger-Kernel (``liger-kernel``, in the ``gpu`` and
``unsloth`` extras) has one Triton kernel for each, computing in the precision eager does (RMSNorm in fp32,
cast to the input's dtype before its weight; SiLU in fp32, cast before the multiply), so only the rounding
of fp32 sums may differ.

:func:`fused_kernels` swaps them into a model for a while: its RMSNorm and MLP modules' forwards, and
transformers' Llama ``apply_rotary_pos_emb`` (a function of its module that every Llama attention looks up
when called: patched while any model is within, restored when the last leaves). A norm whose input is not in
its weight's dtype (the fp32 norms of a k-bit-prepared model), or a rotary embedding whose cos/sin are not in
the queries' dtype, runs eagerly: eager promotes to fp32 there, the kernels would not. The kernels are found by
feature: tiny calls on the device must compute what the eager modules compute (:func:`fused_available`);
elsewhere (CPU, no Triton, no ``liger-kernel``) nothing changes.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import threading
from typing import Iterator

import torch

from .gpu import head_dim
from .lora import base_model

log = logging.getLogger(__name__)

_rope_lock = threading.Lock()
_rope_users = 0  # contexts within: the first patches transformers' function, the last restores it
_rope_original = None


@functools.cache
def _liger():
    """``liger_kernel.transformers.functional``, or None where it cannot be imported."""
    try:
        from liger_kernel.transformers import functional
    except Exception as exc:  # noqa: BLE001 - not installed, or no Triton: the eager modules stay
        log.info("fused kernels unavailable: %s", exc)
        return None
    return functional


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm of ``x`` in one kernel (the CPU tests put a stand-in here)."""
    return _liger().liger_rms_norm(x, weight, eps, 0.0, "llama", False)


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``apply_rotary_pos_emb`` of ``q`` and ``k`` in one kernel, in place (the CPU tests put a stand-in here)."""
    return _liger().liger_rope(q, k, cos, sin)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` in one kernel (the CPU tests put a stand-in here)."""
    return _liger().liger_swiglu(gate, up)


@functools.cache
def _runs_on(device: torch.device, hidden: int, intermediate: int, heads: int, kv_heads: int, dim: int) -> bool:
    """Tiny bf16 calls of the three kernels on ``device``, at a model's widths (so that the model's calls reuse
    what Triton compiled here), compute what transformers' Llama modules and ``apply_rotary_pos_emb`` do."""
    try:
        import torch.nn.functional as F
        from transformers.models.llama import modeling_llama as llama

        g = torch.Generator(device=device).manual_seed(0)

        def randn(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, device=device, dtype=torch.bfloat16, generator=g)

        x, gate, up = randn(1, 3, hidden), randn(1, 3, intermediate), randn(1, 3, intermediate)
        q, k = randn(1, heads, 3, dim), randn(1, kv_heads, 3, dim)
        norm = llama.LlamaRMSNorm(hidden, eps=1e-5).to(device, torch.bfloat16)
        norm.weight.data = randn(hidden)
        angles = torch.arange(3, device=device)[:, None] * torch.rand(dim // 2, device=device, generator=g)
        cos, sin = (f(torch.cat([angles, angles], -1))[None].to(torch.bfloat16) for f in (torch.cos, torch.sin))
        eager_q, eager_k = inspect.unwrap(llama.apply_rotary_pos_emb)(q, k, cos, sin)  # unpatched, if patched
        fused_q, fused_k = rotary(q.clone(), k.clone(), cos, sin)
        pairs = [(norm(x), rms_norm(x, norm.weight, 1e-5)), (eager_q, fused_q), (eager_k, fused_k),
                 (F.silu(gate) * up, silu_mul(gate, up))]
        for eager, fused in pairs:
            if not torch.allclose(eager.float(), fused.float(), atol=3e-2, rtol=2e-2):
                raise RuntimeError(f"differs from eager by {float((eager.float() - fused.float()).abs().max()):.3f}")
        return True
    except Exception as exc:  # noqa: BLE001 - any failure means: keep the eager modules
        log.info("fused kernels unavailable on %s: %s", device, exc)
        return False


def fused_available(device: torch.device, config) -> bool:
    """Whether Liger's kernels run on ``device`` for a Llama of ``config`` and compute what the eager modules
    compute."""
    device = torch.device(device)
    if device.type != "cuda" or _liger() is None:
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _runs_on(torch.device("cuda", index), config.hidden_size, config.intermediate_size,
                    config.num_attention_heads, config.num_key_value_heads, head_dim(config))


def fuses(model) -> bool:
    """Whether :func:`fused_kernels` swaps Liger's kernels into ``model`` (a transformers model, under peft or
    not): a Llama on a device where :func:`fused_available`."""
    base = base_model(model)
    return base.config.model_type == "llama" and fused_available(base.get_input_embeddings().weight.device,
                                                                base.config)


def _norm_forward(norm: torch.nn.Module):
    eager = type(norm).forward

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.dtype != norm.weight.dtype:
            return eager(norm, hidden_states)
        return rms_norm(hidden_states, norm.weight, norm.variance_epsilon)

    return forward


def _mlp_forward(mlp: torch.nn.Module):
    def forward(x: torch.Tensor) -> torch.Tensor:
        return mlp.down_proj(silu_mul(mlp.gate_proj(x), mlp.up_proj(x)))

    return forward


def _rotary_or(eager):
    @functools.wraps(eager)
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        if unsqueeze_dim != 1 or not q.dtype == k.dtype == cos.dtype == sin.dtype:
            return eager(q, k, cos, sin, unsqueeze_dim)
        if q.shape[2] == 1 < q.shape[0] == cos.shape[0]:
            # A decoding step, one token a row, goes in as one row of tokens (the same memory): Triton compiles
            # Liger's kernel once for each batch size it is called with, and a run's batches differ in rows.
            q, k = rotary(q.transpose(0, 2), k.transpose(0, 2), cos.transpose(0, 1), sin.transpose(0, 1))
            return q.transpose(0, 2), k.transpose(0, 2)
        return rotary(q, k, cos, sin)

    return apply_rotary_pos_emb


@contextlib.contextmanager
def fused_kernels(model) -> Iterator[bool]:
    """Within: ``model``'s (a transformers Llama, under peft or not) RMSNorms, SiLU MLPs and rotary embedding
    run Liger's kernels where :func:`fused_available` on its device; yields whether they do. A context within
    another on the same model changes nothing."""
    from transformers.models.llama import modeling_llama as llama

    global _rope_users, _rope_original
    if not fuses(model):
        yield False
        return
    base = base_model(model)
    swapped = [m for m in base.modules() if "forward" not in vars(m) and (
        isinstance(m, llama.LlamaRMSNorm) or (isinstance(m, llama.LlamaMLP) and base.config.hidden_act == "silu"))]
    for module in swapped:
        module.forward = _norm_forward(module) if isinstance(module, llama.LlamaRMSNorm) else _mlp_forward(module)
    with _rope_lock:
        if _rope_users == 0:
            _rope_original = llama.apply_rotary_pos_emb
            llama.apply_rotary_pos_emb = _rotary_or(_rope_original)
        _rope_users += 1
    try:
        yield True
    finally:
        for module in swapped:
            del module.forward
        with _rope_lock:
            _rope_users -= 1
            if _rope_users == 0:
                llama.apply_rotary_pos_emb = _rope_original
