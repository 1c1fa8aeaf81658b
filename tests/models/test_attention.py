"""The grouped-query decoding attention against SDPA over repeated K/V heads (bengali_empathy.models.attention)."""
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from bengali_empathy.models.attention import gqa_decode_attention, register


class _Heads(torch.nn.Module):
    num_key_value_groups = 4
    is_causal = True


def _reference(query, key, value, mask, scaling):
    groups = query.shape[1] // key.shape[1]
    k, v = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(query, k, v, attn_mask=mask, scale=scaling).transpose(1, 2)


@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive"])
def test_one_query_per_row_equals_sdpa_with_repeated_kv(mask_kind):
    g = torch.Generator().manual_seed(0)
    batch, heads, kv_heads, kv_len, dim = 3, 8, 2, 11, 16
    query = torch.randn(batch, heads, 1, dim, generator=g)
    key = torch.randn(batch, kv_heads, kv_len, dim, generator=g)
    value = torch.randn(batch, kv_heads, kv_len, dim, generator=g)
    keep = torch.ones(batch, 1, 1, kv_len, dtype=torch.bool)
    keep[1, ..., :4] = False  # left padding of different widths, as in a padded batch
    keep[2, ..., :9] = False
    mask = {"none": None, "bool": keep,
            "additive": torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)}[mask_kind]
    ours, weights = gqa_decode_attention(_Heads(), query, key, value, mask, scaling=dim ** -0.5)
    assert weights is None
    assert ours.shape == (batch, 1, heads, dim)
    torch.testing.assert_close(ours, _reference(query, key, value, mask, dim ** -0.5), atol=1e-5, rtol=1e-5)
    if mask_kind != "none":  # the padding really is masked: changing padded keys changes nothing
        key2 = key.clone()
        key2[2, :, :9] = 100.0
        again, _ = gqa_decode_attention(_Heads(), query, key2, value, mask, scaling=dim ** -0.5)
        torch.testing.assert_close(again[2], ours[2])


def test_a_mask_shorter_than_the_cache_attends_to_its_first_slots_only():
    """The compiled decoder's slots not yet written are not read: a mask of the first 6 of 11 slots
    gives SDPA over those 6 slots, whatever the rest of the cache holds."""
    g = torch.Generator().manual_seed(3)
    query = torch.randn(2, 8, 1, 16, generator=g)
    key, value = torch.randn(2, 2, 11, 16, generator=g), torch.randn(2, 2, 11, 16, generator=g)
    keep = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    keep[1, ..., :2] = False
    ours, _ = gqa_decode_attention(_Heads(), query, key, value, keep, scaling=0.25)
    ref = _reference(query, key[:, :, :6], value[:, :, :6], keep, 0.25)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    key[:, :, 6:], value[:, :, 6:] = float("nan"), float("nan")
    torch.testing.assert_close(gqa_decode_attention(_Heads(), query, key, value, keep, scaling=0.25)[0], ours)


def test_prefill_keeps_transformers_sdpa_path():
    g = torch.Generator().manual_seed(1)
    query = torch.randn(2, 8, 5, 16, generator=g)
    key, value = torch.randn(2, 2, 5, 16, generator=g), torch.randn(2, 2, 5, 16, generator=g)
    ours, _ = gqa_decode_attention(_Heads(), query, key, value, None, scaling=0.25)
    groups = 4
    k, v = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    ref = F.scaled_dot_product_attention(query, k, v, is_causal=True, scale=0.25).transpose(1, 2)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_registered_attention_generates_what_sdpa_generates(tiny_model_path):
    from transformers import AutoModelForCausalLM

    name = register()
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_path), dtype=torch.float32).eval()
    assert model.config.num_attention_heads != model.config.num_key_value_heads  # the grouped case is exercised
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1000, 120000, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left-padded rows
    mask[2, :9] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    want = model.generate(ids, **kwargs)
    model.set_attn_implementation(name)
    sdpa, grouped_calls = F.scaled_dot_product_attention, []

    def spy(query, key, *args, **kw):  # the grouped layout: as many query heads as K/V heads
        grouped_calls.append(query.shape[1] == key.shape[1] == model.config.num_key_value_heads)
        return sdpa(query, key, *args, **kw)

    with mock.patch("torch.nn.functional.scaled_dot_product_attention", spy):
        got = model.generate(ids, **kwargs)
    assert torch.equal(got, want)
    assert sum(grouped_calls) == 7 * model.config.num_hidden_layers  # every decoding step after the prefill
