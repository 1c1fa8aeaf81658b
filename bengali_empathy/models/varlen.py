"""Attention over packed conversations, and decoding steps over each row's filled cache, with PyTorch's
variable-length FlashAttention kernels.

A packed batch holds several conversations per row; each must attend to itself alone. Without a
varlen kernel that takes a block-diagonal mask (SDPA leaves its fused kernels for it, and transformers
repeats the K/V heads), or one SDPA call per run of equal lengths (Unsloth's path without flash-attn).
``torch.nn.attention.varlen.varlen_attn`` (torch >= 2.10, CUDA) attends within the segments that
``cu_seqlens`` marks over the flattened tokens: on an H200, forward and backward over Llama-3.1-8B's
heads took 2.67 ms against 7.16 ms with the block-diagonal mask (16,384 tokens in 34 documents).
The flash kernels it calls are called here directly (:class:`_FlashVarlen`): they take grouped K/V heads
and a per-segment count of keys to read (``seqused_k``) on any torch that has them, where ``varlen_attn``
takes neither before torch 2.12.

The kernel is found by feature, not by version: tiny calls on the device must compute what SDPA computes
one segment at a time (:func:`varlen_available`). Elsewhere (CPU, GPUs before Ampere, fp32) the callers
keep their mask-based paths.

* the ``hf`` backend runs a packed batch through transformers' attention interface under the name
  :data:`NAME`, with ``cu_seq_lens_q``/``max_length_q`` (derived from the position ids) passed down
  the model's keyword arguments (:func:`packed_kwargs`, :func:`varlen_attention`);
* the ``unsloth`` backend's packed batches on Unsloth's Llama attention carry :func:`packed_kwargs` under
  :data:`UNSLOTH_SEGMENTS` to :func:`varlen_attention` (:func:`route_unsloth_segments`), inside the layers'
  compiled regions; on other architectures they pass ``packed_seq_lengths``, which Unsloth attends
  through a torch varlen kernel when torch has ``enable_gqa`` (:func:`patch_unsloth` gives it this
  module's kernel otherwise), outside those regions;
* generation's prefill concatenates a slice's prompts into one packed row, and its decoding steps read
  each row's filled slots of a token-major static cache (``seqused_k``, :func:`token_major`).
"""
from __future__ import annotations

import functools
import inspect
import logging
from typing import ContextManager, Optional

import torch

from .attention import attention_implementation
from .lora import base_model

log = logging.getLogger(__name__)

NAME = "packed_varlen"  # the transformers attention implementation of packed batches and decoding steps
CAUSAL = (-1, 0)  # window_size: every earlier key of the segment, no later one
# How logs name this path: torch's kernel here; in Unsloth, flash-attn's where that is installed.
VARLEN_KERNEL = "a varlen flash kernel"


class _FlashVarlen(torch.autograd.Function):
    """The flash kernels that ``torch.nn.attention.varlen.varlen_attn`` calls on CUDA, called directly: they
    take fewer K/V heads than query heads themselves (``varlen_attn`` has no ``enable_gqa`` before torch 2.12,
    so the K/V heads would be repeated for it, and their gradients summed back) and a per-segment count of
    keys to read (``seqused_k``, which ``varlen_attn`` takes from torch 2.12 on); no custom-op dispatch or
    RNG-state tensor per call (three calls a layer per training step: forward, recomputed forward, backward)."""

    @staticmethod
    def forward(ctx, query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale, window_size, seqused_k):
        used = {} if seqused_k is None else {"seqused_k": seqused_k}  # packed rows: no keyword a torch may lack
        out, lse, seed, offset, _ = torch.ops.aten._flash_attention_forward(
            query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, 0.0, window_size == CAUSAL,
            return_debug_mask=False, scale=scale, window_size_left=window_size[0], window_size_right=window_size[1],
            **used)
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
        return dq, dk, dv, None, None, None, None, None, None, None


def _flash_kernel(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seq_q: torch.Tensor,
                  cu_seq_k: torch.Tensor, max_q: int, max_k: int, scale: Optional[float],
                  window_size: tuple[int, int], seqused_k: Optional[torch.Tensor]) -> torch.Tensor:
    """The kernel :func:`flash_varlen` calls (the CPU tests put a stand-in here)."""
    return _FlashVarlen.apply(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale, window_size, seqused_k)


def flash_varlen(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seq_q: torch.Tensor,
                 cu_seq_k: torch.Tensor, max_q: int, max_k: int, *, scale: Optional[float] = None,
                 window_size: tuple[int, int] = CAUSAL, enable_gqa: bool = False,
                 seqused_k: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention within segments, with torch 2.12's ``varlen_attn`` keywords: ``query`` (tokens, heads, dim)
    and ``key``/``value`` (tokens, kv_heads, dim, the token stride may be any); segment ``i`` holds the
    queries ``cu_seq_q[i]:cu_seq_q[i + 1]`` and the keys from ``cu_seq_k[i]`` on, up to the next segment or
    ``seqused_k[i]`` of them; ``window_size`` ``(-1, 0)`` is causal, ``(-1, -1)`` attends to every key."""
    if key.shape[1] != query.shape[1] and not enable_gqa:
        raise ValueError(f"{query.shape[1]} query heads on {key.shape[1]} K/V heads need enable_gqa")
    if seqused_k is not None and torch.is_grad_enabled() and query.requires_grad:
        raise ValueError("seqused_k is for decoding: the backward pass reads every key of a segment")
    return _flash_kernel(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale, tuple(window_size), seqused_k)


def segment_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seq_q: torch.Tensor,
                      cu_seq_k: torch.Tensor, scale: Optional[float], window_size: tuple[int, int],
                      seqused_k: Optional[torch.Tensor]) -> torch.Tensor:
    """What the kernel computes, one segment at a time with SDPA (K/V heads repeated): the reference its
    probe checks it against."""
    import torch.nn.functional as F

    out = torch.empty_like(query)
    groups = query.shape[1] // key.shape[1]
    for i, (q0, q1, k0, k1) in enumerate(zip(cu_seq_q[:-1].tolist(), cu_seq_q[1:].tolist(), cu_seq_k[:-1].tolist(),
                                             cu_seq_k[1:].tolist())):
        if seqused_k is not None:
            k1 = k0 + int(seqused_k[i])
        q, k, v = (x[a:b].transpose(0, 1) for x, a, b in ((query, q0, q1), (key, k0, k1), (value, k0, k1)))
        k, v = (x.repeat_interleave(groups, dim=0) for x in (k, v))
        # causal with fewer queries than keys: the queries are the segment's last tokens (flash's alignment)
        mask = None if window_size != CAUSAL else torch.ones(q1 - q0, k1 - k0, dtype=torch.bool,
                                                             device=query.device).tril(k1 - k0 - (q1 - q0))
        out[q0:q1] = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).transpose(0, 1)
    return out


@functools.cache
def _runs_on(device: torch.device, decoding: bool) -> bool:
    """A tiny bf16 call of the kernel on ``device`` (4 query heads sharing 2 K/V heads) computes what
    :func:`segment_attention` does: causal segments of a packed row, or (``decoding``) one query per segment
    reading only ``seqused_k`` of its keys, as decoding from a cache does."""
    try:
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(8, h, 64, device=device, dtype=torch.bfloat16, generator=g) for h in (4, 2, 2))
        cu = torch.tensor([0, 3, 8], device=device, dtype=torch.int32)
        if decoding:
            q, cu_q, max_q, window = q[:2], torch.tensor([0, 1, 2], device=device, dtype=torch.int32), 1, (-1, -1)
            used = cu[1:] - cu[:-1] - 1  # fewer keys than the segments hold: the rest must not count
        else:
            cu_q, max_q, window, used = cu, 5, CAUSAL, None
        got = flash_varlen(q, k, v, cu_q, cu, max_q, 5, window_size=window, enable_gqa=True, seqused_k=used)
        want = segment_attention(q.float(), k.float(), v.float(), cu_q, cu, None, window, used)
        if not torch.allclose(got.float(), want, atol=2e-2):
            raise RuntimeError(f"differs from SDPA by {float((got.float() - want).abs().max()):.3f}")
        return True
    except Exception as exc:  # noqa: BLE001 - any failure means: keep the mask-based path
        log.info("varlen attention%s unavailable on %s: %s", " (decoding)" if decoding else "", device, exc)
        return False


def varlen_available(device: torch.device, dtype: torch.dtype = torch.bfloat16, decoding: bool = False) -> bool:
    """Whether packed batches (or, ``decoding``, steps reading each row's filled part of a cache) on
    ``device`` in ``dtype`` can attend through the kernel."""
    device = torch.device(device)
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    if not hasattr(torch.ops.aten, "_flash_attention_forward"):
        return False
    if not getattr(torch.backends.cuda, "is_flash_attention_available", lambda: True)():
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _runs_on(torch.device("cuda", index), decoding)


def packed_through_kernel(model) -> bool:
    """Whether ``model``'s (under peft or not) packed forwards, training's packed batches and generation's
    prefill, attend through the kernel: on its device, in the precision its attention runs in now (autocast's
    where it is on, else its weights')."""
    weight = base_model(model).get_input_embeddings().weight
    device = weight.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    return varlen_available(weight.device, dtype)


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
    (batch, kv_heads, kv_seq, dim); returns (batch, seq, heads, dim) and no attention weights.

    A packed batch: ``cu_seq_lens_q``/``cu_seq_lens_k`` mark its segments over the flattened batch, each
    attending causally to itself. A decoding step (``seqused_k`` given): one query per row, ``key``/``value``
    a static cache laid out token-major (:func:`token_major`, so that flattening it copies nothing), row
    ``i``'s query attending to the ``seqused_k[i]`` slots from ``cu_seq_lens_k[i]`` on."""
    if dropout:
        raise ValueError("varlen attention of packed batches takes no attention dropout")
    batch, heads, seq, dim = query.shape
    device = query.device.type
    if torch.is_autocast_enabled(device) and query.dtype != torch.get_autocast_dtype(device):
        # fp32 norms (peft's k-bit preparation) make fp32 queries, which autocast would run SDPA on in bf16
        query, key, value = (x.to(torch.get_autocast_dtype(device)) for x in (query, key, value))

    def tokens(x: torch.Tensor) -> torch.Tensor:  # (batch, h, seq, dim) -> (batch * seq, h, dim)
        return x.transpose(1, 2).reshape(-1, x.shape[1], dim)

    used = kwargs.get("seqused_k")
    out = flash_varlen(tokens(query), tokens(key), tokens(value), kwargs["cu_seq_lens_q"], kwargs["cu_seq_lens_k"],
                       kwargs["max_length_q"], kwargs["max_length_k"], scale=scaling,
                       window_size=CAUSAL if used is None else (-1, -1),  # a cache holds no later key
                       enable_gqa=key.shape[1] != heads, seqused_k=used)
    return out.reshape(batch, seq, heads, dim), None


def token_major(cache) -> None:
    """Lay a transformers ``StaticCache``'s keys and values out token-major in memory, (rows, slots, kv heads,
    dim), keeping their (rows, kv heads, slots, dim) shape as a view: a decoding step then reads the cache
    through :func:`varlen_attention` without copying it. The cache must be initialised (its contents are
    dropped)."""
    for layer in cache.layers:
        for name in ("keys", "values"):
            tensor = getattr(layer, name)
            rows, heads, slots, dim = tensor.shape
            setattr(layer, name, tensor.new_zeros(rows, slots, heads, dim).transpose(1, 2))


def register() -> str:
    """Register :func:`varlen_attention` with transformers under :data:`NAME` (idempotent). It has no mask
    function: transformers then builds no mask, which a packed batch does not need."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, varlen_attention)
    return NAME


def varlen_implementation(model) -> ContextManager:
    """Within: ``model`` (transformers, under peft or not) attends through :func:`varlen_attention` (a packed
    batch's forward, or a decoding step's)."""
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


# The keyword of Unsloth's model forward that carries a packed batch's segments (packed_kwargs) to its
# layers: a name of ours, because a call with ``packed_seq_lengths`` runs each layer outside its compiled
# region (Unsloth's per-layer torch.compile, torch >= 2.11, skips calls whose lengths it would read on the
# host). That way packed rows trained at 0.87x the random-token rate on an H200, in uncompiled kernels; this
# way at 1.01x on an H100 (docs/benchmarks.md).
UNSLOTH_SEGMENTS = "bengali_empathy_segments"


def route_unsloth_segments(model) -> bool:
    """Teach Unsloth's Llama attention :data:`UNSLOTH_SEGMENTS`: its layers then find a packed batch's
    segments where they look for packed lengths, and attend through :func:`varlen_attention` (idempotent).
    True where ``model``'s (under peft or not) every decoder layer runs that attention; elsewhere nothing
    would read the keyword, and the rows' conversations would attend to each other."""
    base = base_model(model)
    layers = getattr(getattr(base, "model", None), "layers", None) or []
    # unwrapped: Unsloth gates its forwards, calling them only on the modules of models it loaded
    forwards = [inspect.unwrap(type(layer.self_attn).forward) for layer in layers]
    calls = {"get_packed_info_from_kwargs", "run_attention"}
    if not forwards or not all(_unsloths(forward, "LlamaAttention_fast_forward", calls) for forward in forwards):
        return False
    # Patched where each forward looks them up: its globals (Unsloth's module, or the copy its per-layer
    # compile may rebind a forward to), and its model forward's, which asks for packed lengths too.
    namespaces = {id(f.__globals__): f.__globals__ for f in forwards}
    model_forward = inspect.unwrap(type(base.model).forward)
    if _unsloths(model_forward, "LlamaModel_fast_forward", {"get_packed_info_from_kwargs"}):
        namespaces.setdefault(id(model_forward.__globals__), model_forward.__globals__)
    for namespace in namespaces.values():
        for name, wrap in (("get_packed_info_from_kwargs", _segments_or), ("run_attention", _kernel_for_segments)):
            if name in namespace and not getattr(namespace[name], "_reads_segments", False):
                namespace[name] = wrap(namespace[name])
    return True


def _unsloths(forward, name: str, calls: set[str]) -> bool:
    """Whether ``forward`` is Unsloth's function ``name``, looking up the functions ``calls`` in its globals."""
    code = getattr(forward, "__code__", None)
    return (getattr(forward, "__name__", None) == name and code is not None and calls <= set(code.co_names)
            and calls <= set(forward.__globals__))


def _segments_or(get_packed_info):
    """Unsloth's ``get_packed_info_from_kwargs`` (what its attention calls ``seq_info``), answering with
    the segments of :data:`UNSLOTH_SEGMENTS` where they are given."""

    @functools.wraps(get_packed_info)
    def get_packed_info_from_kwargs(kwargs: dict, device, position_ids=None):
        segments = kwargs.get(UNSLOTH_SEGMENTS)
        if segments is None:
            return get_packed_info(kwargs, device, position_ids)
        # The model forward asks with the position ids, to turn a row's position resets into
        # packed_seq_lengths (and so run the layers uncompiled): none here. The layers ask without.
        return None if position_ids is not None else segments

    get_packed_info_from_kwargs._reads_segments = True
    return get_packed_info_from_kwargs


def _kernel_for_segments(run_attention):
    """Unsloth's ``run_attention``, which sends a call carrying :data:`UNSLOTH_SEGMENTS`' segments to
    :func:`varlen_attention`; its query (batch, heads, seq, dim) and result (batch, seq, heads, dim) are
    laid out as there."""

    @functools.wraps(run_attention)
    def run_segments_or(*, config, context, Q, K, V):
        if isinstance(context.seq_info, dict):  # Unsloth's own seq_info is a tuple
            return varlen_attention(None, Q, K, V, None, **context.seq_info)[0]
        return run_attention(config=config, context=context, Q=Q, K=K, V=V)

    run_segments_or._reads_segments = True
    return run_segments_or
