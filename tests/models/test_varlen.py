"""Packed batches through the varlen attention path (bengali_empathy.models.varlen), on the CPU with a stand-in
for torch's CUDA kernel; the kernel itself is compared with SDPA in tests/scenarios/test_gpu.py."""
import sys
import types

import pytest
import torch

from bengali_empathy.models import backends, varlen
from conftest import packable_examples, packed_and_single_batches, packed_and_weighted_loss


def test_segments_of_a_collated_packed_batch_are_its_conversations_and_padding_tails(tokenizer):
    exs = packable_examples(tokenizer)
    packed, _ = packed_and_single_batches(tokenizer, exs)
    bounds, longest = varlen.cu_seqlens(packed["position_ids"])
    lengths = packed["packed_seq_lengths"].tolist()  # the collator's own count, row after row
    assert bounds.dtype == torch.int32
    assert bounds.tolist() == [0] + torch.tensor(lengths).cumsum(0).tolist()
    assert longest == max(lengths) == len(exs[2]["input_ids"])
    assert bounds[-1] == packed["input_ids"].numel()


def test_hf_packed_loss_through_the_varlen_path_equals_per_conversation_loss(tiny_lora, stand_in_kernel):
    backend, model, tok = tiny_lora
    packed, singles = packed_and_single_batches(tok, packable_examples(tok))
    lp, n_p, weighted, n = packed_and_weighted_loss(backend, model, packed, singles)
    layers = model.config.num_hidden_layers
    assert stand_in_kernel.calls == layers  # the packed batch, and only it, took the kernel, once per layer
    assert int(n_p) == n
    assert float(lp) == pytest.approx(weighted, rel=1e-5)
    assert model.config._attn_implementation != varlen.NAME  # restored after the call


def test_without_the_kernel_packed_batches_keep_the_mask_and_give_the_same_loss(tiny_lora, stand_in_kernel,
                                                                                  monkeypatch):
    backend, model, tok = tiny_lora
    packed, _ = packed_and_single_batches(tok, packable_examples(tok))
    model.eval()
    with torch.no_grad():
        through_kernel, _ = backend.loss(model, packed)
        monkeypatch.setattr(backends, "varlen_available", lambda device, dtype: False)
        with_mask, _ = backend.loss(model, packed)
    assert stand_in_kernel.calls == model.config.num_hidden_layers
    assert float(through_kernel) == pytest.approx(float(with_mask), rel=1e-5)


def test_kernel_keywords_follow_the_installed_torch(monkeypatch):
    seen = {}

    def torch_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, is_causal=False):
        seen.update(heads=key.shape[1], is_causal=is_causal)
        return query

    def torch_2_12(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                   enable_gqa=False):
        seen.update(heads=key.shape[1], window_size=window_size, enable_gqa=enable_gqa)
        return query

    q, kv, cu = torch.zeros(6, 4, 8), torch.zeros(6, 2, 8), torch.tensor([0, 2, 6], dtype=torch.int32)
    monkeypatch.setattr(varlen, "_torch_kernel", lambda: torch_2_10)
    varlen.flash_varlen(q, kv, kv, cu, cu, 4, 4, enable_gqa=True)
    assert seen == {"heads": 4, "is_causal": True}
    with pytest.raises(ValueError, match="window"):
        varlen.flash_varlen(q, kv, kv, cu, cu, 4, 4, window_size=(3, 0), enable_gqa=True)
    seen.clear()
    monkeypatch.setattr(varlen, "_torch_kernel", lambda: torch_2_12)
    varlen.flash_varlen(q, kv, kv, cu, cu, 4, 4, enable_gqa=True)
    assert seen == {"heads": 2, "window_size": (-1, 0), "enable_gqa": True}


def test_no_varlen_off_cuda_or_in_fp32():
    assert not varlen.varlen_available(torch.device("cpu"))
    assert not varlen.varlen_available(torch.device("cuda", 0), torch.float32)


@pytest.mark.parametrize("found", [None, "its own kernel"])
def test_unsloth_gets_the_kernel_only_where_it_found_none(monkeypatch, found):
    dispatch = types.SimpleNamespace(_TORCH_VARLEN_ATTN=found)
    utils = types.ModuleType("unsloth.utils")
    utils.attention_dispatch = dispatch
    monkeypatch.setitem(sys.modules, "unsloth", types.ModuleType("unsloth"))
    monkeypatch.setitem(sys.modules, "unsloth.utils", utils)
    assert varlen.patch_unsloth() is True
    assert dispatch._TORCH_VARLEN_ATTN is (found or varlen.flash_varlen)
