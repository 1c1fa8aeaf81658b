"""Attention over packed conversations with PyTorch's variable-length FlashAttention kernel.

A packed batch holds several conversations per row; each must attend to itself alone. Without a
varlen kernel that takes a block-diagonal mask (SDPA leaves its fused kernels for it, and transformers
repeats the K/V heads), or one SDPA call per run of equal lengths (Unsloth's path without flash-attn).
``torch.nn.attention.varlen.varlen_attn`` (torch >= 2.10, CUDA) attends within the segments that
``cu_seqlens`` marks over the flattened tokens: on an H200, forward and backward over Llama-3.1-8B's
heads took 2.67 ms against 7.16 ms with the block-diagonal mask (16,384 tokens in 34 documents).

The kernel is found by feature, not by version: it must import, take a causal window
(``window_size=(-1, 0)``; torch 2.10 spells it ``is_causal``) and run a tiny bf16 call on the device.
On CUDA its flash kernels are called directly, taking the grouped K/V heads as they are (``varlen_attn``
has no ``enable_gqa`` before torch 2.12). Elsewhere (CPU, older torch, GPUs before Ampere) the callers keep
their mask-based path.

* the ``hf`` backend runs a packed batch through transformers' attention interface under the name
  :data:`NAME`, with ``cu_seq_lens_q``/``max_length_q`` (derived from the position ids) passed down
  the model's keyword arguments (:func:`packed_kwargs`, :func:`varlen_attention`);
* the ``unsloth`` backend's packed batches (``packed_seq_lengths``) already call a torch varlen kernel
  when torch has ``enable_gqa``; :func:`patch_unsloth` gives it this module's kernel otherwise.
"""
from __future__ import annotations

import functools
import inspect
import logging
from typing import Callable, ContextManager, Optional

import torch

from .attention import attention_implementation

log = logging.getLogger(__name__)

NAME = "packed_varlen"  # the transformers attention implementation of packed batches
CAUSAL = (-1, 0)  # window_size: every earlier key of the segment, no later one


@functools.cache
def _torch_kernel() -> Optional[Callable]:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    if "window_size" not in params and "is_causal" not in params:
        return None
    return varlen_attn


@functools.lru_cache(maxsize=8)
def _parameters(kernel: Callable) -> frozenset:
    """The keyword names ``kernel`` takes (read once: the call runs once per layer per step)."""
    return frozenset(inspect.signature(kernel).parameters)


class _FlashVarlen(torch.autograd.Function):
    """The flash kernels ``varlen_attn`` calls on CUDA, called directly: the kernel takes fewer K/V heads
    than query heads itself (no repeated K/V, whose copies and gradient sums ``varlen_attn`` needs before
    torch 2.12), and skips the custom-op dispatch and the per-call RNG-state tensor that
    ``varlen_attn`` adds three times a layer per step (forward, recomputed forward, backward)."""

    @staticmethod
    def forward(ctx, query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale, window_size):
        out, lse, seed, offset, _ = torch.ops.aten._flash_attention_forward(
            query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, 0.0, window_size == CAUSAL,
            return_debug_mask=False, scale=scale, window_size_left=window_size[0], window_size_right=window_size[1])
        ctx.save_for_backward(query, key, value, out, lse, cu_seq_q, cu_seq_k, seed, offset)
        ctx.shape = (max_q, max_k, scale, window_size)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, out, lse, cu_seq_q, cu_seq_k, seed, offset = ctx.saved_tensors
        max_q, max_k, scale, window_size = ctx.shape
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            grad_out.contiguous(), query, key, value, out, lse, cu_seq_q, cu_seq_k, max_q, max_k, 0.0,
            window_size == CAUSAL, seed, offset, scale=scale, window_size_left=window_size[0],
            window_size_right=window_size[1])
        return dq, dk, dv, None, None, None, None, None, None


def flash_varlen(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seq_q: torch.Tensor,
                 cu_seq_k: torch.Tensor, max_q: int, max_k: int, *, scale: Optional[float] = None,
                 window_size: tuple[int, int] = CAUSAL, enable_gqa: bool = False) -> torch.Tensor:
    """torch's ``varlen_attn`` with the keywords of torch 2.12 on any torch that has the kernel:
    ``query`` (tokens, heads, dim), ``key``/``value`` (tokens, kv_heads, dim). On CUDA its flash kernels
    run directly (:class:`_FlashVarlen`); elsewhere ``varlen_attn`` runs, with the K/V heads repeated where
    it takes no ``enable_gqa`` and a causal window spelled ``is_causal`` where it takes no window."""
    if query.is_cuda and hasattr(torch.ops.aten, "_flash_attention_forward"):
        return _FlashVarlen.apply(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale, tuple(window_size))
    kernel = _torch_kernel()
    params = _parameters(kernel)
    if enable_gqa and key.shape[1] != query.shape[1] and "enable_gqa" not in params:
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    kwargs: dict = {"scale": scale}
    if "enable_gqa" in params:
        kwargs["enable_gqa"] = enable_gqa
    if "window_size" in params:
        kwargs["window_size"] = window_size
    elif window_size == CAUSAL:
        kwargs["is_causal"] = True
    elif window_size != (-1, -1):
        raise ValueError(f"this torch's varlen_attn takes no window {window_size}")
    return kernel(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, **kwargs)


@functools.cache
def _runs_on(device: torch.device) -> bool:
    """One tiny causal bf16 call of the kernel on ``device`` (4 query heads sharing 2 K/V heads)."""
    try:
        q = torch.zeros(8, 4, 64, device=device, dtype=torch.bfloat16)
        kv = torch.zeros(8, 2, 64, device=device, dtype=torch.bfloat16)
        cu = torch.tensor([0, 3, 8], device=device, dtype=torch.int32)
        flash_varlen(q, kv, kv, cu, cu, 5, 5, enable_gqa=True)
        torch.cuda.synchronize(device)
        return True
    except Exception as exc:  # noqa: BLE001 - any failure means: keep the mask-based path
        log.info("varlen attention unavailable on %s: %s", device, exc)
        return False


def varlen_available(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether packed batches on ``device`` in ``dtype`` can attend through the varlen kernel."""
    device = torch.device(device)
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16) or _torch_kernel() is None:
        return False
    if not getattr(torch.backends.cuda, "is_flash_attention_available", lambda: True)():
        return False
    return _runs_on(torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device()))


def attention_dtype(model) -> torch.dtype:
    """The precision ``model``'s attention will run in: autocast's where it is on, else its weights'."""
    weight = model.get_input_embeddings().weight
    device = weight.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype


def cu_seqlens(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The segment boundaries of a packed batch over its flattened tokens, and the longest segment.

    Every segment (a conversation, or a row's padding tail) counts its positions from 0, and every row
    starts one, so a segment starts wherever the position is 0 and none crosses a row's end."""
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).flatten()
    total = torch.tensor([flat.numel()], device=flat.device)
    bounds = torch.cat([starts, total]).to(torch.int32)
    return bounds, int((bounds[1:] - bounds[:-1]).max())


def packed_kwargs(position_ids: torch.Tensor) -> dict:
    """The model's keyword arguments that carry a packed batch's segments to :func:`varlen_attention`
    (transformers' names for them, which its decoder layers pass on to the attention)."""
    bounds, longest = cu_seqlens(position_ids)
    return {"cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds, "max_length_q": longest, "max_length_k": longest}


def varlen_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: Optional[torch.Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                     **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: ``query`` (batch, heads, seq, dim), ``key``/``value``
    (batch, kv_heads, seq, dim) of a packed batch whose segments ``cu_seq_lens_q`` marks over the
    flattened batch; returns (batch, seq, heads, dim) and no attention weights."""
    if dropout:
        raise ValueError("varlen attention of packed batches takes no attention dropout")
    batch, heads, seq, dim = query.shape
    device = query.device.type
    if torch.is_autocast_enabled(device) and query.dtype != torch.get_autocast_dtype(device):
        # fp32 norms (peft's k-bit preparation) make fp32 queries, which autocast would run SDPA on in bf16
        query, key, value = (x.to(torch.get_autocast_dtype(device)) for x in (query, key, value))

    def tokens(x: torch.Tensor) -> torch.Tensor:  # (batch, h, seq, dim) -> (batch * seq, h, dim)
        return x.transpose(1, 2).reshape(batch * seq, x.shape[1], dim)

    out = flash_varlen(tokens(query), tokens(key), tokens(value), kwargs["cu_seq_lens_q"], kwargs["cu_seq_lens_k"],
                       kwargs["max_length_q"], kwargs["max_length_k"], scale=scaling, window_size=CAUSAL,
                       enable_gqa=key.shape[1] != heads)
    return out.reshape(batch, seq, heads, dim), None


def register() -> str:
    """Register :func:`varlen_attention` with transformers under :data:`NAME` (idempotent). It has no mask
    function: transformers then builds no mask, which a packed batch does not need."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, varlen_attention)
    return NAME


def packed_attention(model) -> ContextManager:
    """Within: ``model`` (transformers, under peft or not) attends through :func:`varlen_attention`."""
    return attention_implementation(model, register())


def patch_unsloth() -> bool:
    """Give Unsloth's packed attention this module's kernel where it found none of its own (it looks for
    ``enable_gqa``, torch >= 2.12): its packed batches then run one varlen call per layer instead of one
    SDPA call per run of equal conversation lengths. True if Unsloth now has a varlen kernel."""
    try:
        from unsloth.utils import attention_dispatch
    except ImportError:
        return False
    if not hasattr(attention_dispatch, "_TORCH_VARLEN_ATTN"):
        log.warning("this Unsloth has no torch varlen hook: packed batches keep its own attention path")
        return False
    if attention_dispatch._TORCH_VARLEN_ATTN is None:
        attention_dispatch._TORCH_VARLEN_ATTN = flash_varlen
    return True
