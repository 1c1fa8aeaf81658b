"""Decoding attention that reads each key/value head once (grouped-query attention).

Llama-3.1-8B has 32 query heads and 8 key/value heads. With a padding mask, transformers' SDPA
path repeats every K/V head 4x (``repeat_kv``) and leaves the fused kernels, so each decoding step
copies the whole KV cache several times and its cost grows with the prompt length. While decoding
there is one query per row, so the 4 query heads that share a K/V head can be laid out as 4 query
*positions* of that one head: a single SDPA call over the un-repeated cache gives the same result.
Prefill (more than one query) keeps transformers' SDPA path.

In a left-padded batch sorted longest first, a short row's first slots are padding that every step
would read and mask. ``row_groups`` (a keyword argument of the model's forward, which transformers
passes on to the attention) splits the rows into groups that each attend only from their longest
row's first slot on: the same result, with the padding not read.

``register()`` adds it to transformers' ``AttentionInterface`` as ``gqa_decode`` (with SDPA's mask
function), so any Llama model can use it through ``model.set_attn_implementation("gqa_decode")``;
:func:`attention_implementation` switches a model to a registered attention for a while (this one for decoding,
:mod:`.varlen`'s for packed batches).
"""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Iterator, Optional

import torch
import torch.nn.functional as F

from .lora import base_model

NAME = "gqa_decode"


def gqa_decode_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                         scaling: Optional[float] = None, is_causal: Optional[bool] = None,
                         **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: ``query`` (batch, heads, q_len, dim), ``key``/``value``
    (batch, kv_heads, kv_len, dim); returns (batch, q_len, heads, dim) and no attention weights.

    ``row_groups`` (in ``kwargs``, decoding only): ``((first_row, first_slot), ...)``, rows from each
    ``first_row`` to the next attend to slots from ``first_slot`` on; the slots before must be masked
    for each of those rows.
    """
    batch, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    if q_len != 1 or kv_heads == heads or dropout:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    # Query head j attends with K/V head j // groups (the order repeat_kv produces).
    grouped = query.reshape(batch, kv_heads, heads // kv_heads, dim)
    mask = attention_mask
    if mask is not None and mask.dim() == 4:
        # (batch, 1, 1, kv_len): the same for every head of a group. A mask shorter than the cache
        # attends to the cache's first slots only (the compiled decoder's slots not yet written).
        kv_len = min(mask.shape[-1], key.shape[2])
        key, value, mask = key[:, :, :kv_len], value[:, :, :kv_len], mask[..., :kv_len]
    row_groups = kwargs.get("row_groups") or ((0, 0),)
    ends = [row for row, _ in row_groups[1:]] + [batch]
    parts = [F.scaled_dot_product_attention(grouped[first:end], key[first:end, :, slot:], value[first:end, :, slot:],
                                            attn_mask=None if mask is None else mask[first:end, ..., slot:],
                                            scale=scaling)
             for (first, slot), end in zip(row_groups, ends)]
    out = parts[0] if len(parts) == 1 else torch.cat(parts)
    return out.reshape(batch, heads, 1, dim).transpose(1, 2).contiguous(), None


def register() -> str:
    """Register :func:`gqa_decode_attention` with transformers (idempotent); returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, gqa_decode_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME


@contextlib.contextmanager
def attention_implementation(model, name: str) -> Iterator[None]:
    """Within: ``model`` (transformers, under peft or not) attends through the registered attention ``name``
    (restored after)."""
    base = base_model(model)
    before = base.config._attn_implementation
    if before == name:
        yield
        return
    base.set_attn_implementation(name)
    try:
        yield
    finally:
        base.set_attn_implementation(before)


def recomputed_as_attended(model) -> Callable[[], tuple[ContextManager, ContextManager]]:
    """Gradient checkpointing's ``context_fn`` for ``model``: a checkpointed layer recomputes its forward in the
    backward pass through the attention its forward took. :func:`attention_implementation` switches a packed
    batch's forward to the varlen kernel and back before the backward pass; recomputed through SDPA, the
    layer would compute other activations (torch counts the saved tensors and stops: 40 against 42 on an H100)."""
    base = base_model(model)

    def context_fn() -> tuple[ContextManager, ContextManager]:
        return contextlib.nullcontext(), attention_implementation(base, base.config._attn_implementation)

    return context_fn
