"""Packed batches through the varlen attention path (bengali_empathy.models.varlen), on the CPU with a stand-in
for torch's CUDA kernel; the kernel itself is compared with SDPA in tests/scenarios/test_gpu.py."""
import functools
import sys
import types

import pytest
import torch

from bengali_empathy.models import varlen
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


def test_checkpointed_layers_recompute_a_packed_batch_through_the_kernel_and_give_the_same_gradients(
        tiny_model_path, stand_in_kernel):
    """The backward pass recomputes a checkpointed layer after the forward's switch to the kernel is undone:
    the recomputation must attend through the kernel too (through SDPA, torch found a different number of
    saved tensors on an H100 and stopped), and the gradients equal those of the layers kept whole."""
    from bengali_empathy.models.backends import HFPeftBackend, LoraSettings
    from bengali_empathy.models.gradient_checkpointing import limit_checkpointing

    backend = HFPeftBackend(load_in_4bit=False, gradient_checkpointing=True)
    model, tok = backend.load(tiny_model_path, 768, LoraSettings(), None)
    packed, _ = packed_and_single_batches(tok, packable_examples(tok))
    layers = model.config.num_hidden_layers

    def gradients(checkpointed: int) -> dict:
        backend.arm(model)
        limit_checkpointing(model, checkpointed)
        model.zero_grad(set_to_none=True)
        stand_in_kernel.calls = 0
        backend.loss(model, packed)[0].backward()
        assert stand_in_kernel.calls == layers + checkpointed  # each recomputation through the kernel as well
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    whole, recomputed = gradients(0), gradients(layers)
    assert whole.keys() == recomputed.keys() and any(g.abs().sum() > 0 for g in whole.values())
    for name, grad in whole.items():
        assert torch.allclose(recomputed[name], grad, atol=1e-6), name


def test_without_the_kernel_packed_batches_keep_the_mask_and_give_the_same_loss(tiny_lora, stand_in_kernel,
                                                                                  monkeypatch):
    backend, model, tok = tiny_lora
    packed, _ = packed_and_single_batches(tok, packable_examples(tok))
    model.eval()
    with torch.no_grad():
        through_kernel, _ = backend.loss(model, packed)
        monkeypatch.setattr(varlen, "varlen_available", lambda device, dtype: False)
        with_mask, _ = backend.loss(model, packed)
    assert stand_in_kernel.calls == model.config.num_hidden_layers
    assert float(through_kernel) == pytest.approx(float(with_mask), rel=1e-5)


def test_segment_reference_is_block_diagonal_causal_attention_and_reads_only_the_used_keys():
    """The reference the kernel's probe checks against, against independent computations: one SDPA over the
    packed row with a block-diagonal causal mask; for decoding, each row's query over only its used keys."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(3)
    lengths, heads, kv_heads = [5, 1, 3], 4, 2
    q, k, v = (torch.randn(sum(lengths), h, 8, generator=g) for h in (heads, kv_heads, kv_heads))
    cu = torch.tensor([0, 5, 6, 9], dtype=torch.int32)
    segment = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths))
    pos = torch.arange(sum(lengths))
    mask = (segment[:, None] == segment[None, :]) & (pos[:, None] >= pos[None, :])
    dense = F.scaled_dot_product_attention(q.transpose(0, 1), k.repeat_interleave(2, 1).transpose(0, 1),
                                           v.repeat_interleave(2, 1).transpose(0, 1), attn_mask=mask)
    got = varlen.segment_attention(q, k, v, cu, cu, None, varlen.CAUSAL, None)
    assert torch.allclose(got, dense.transpose(0, 1), atol=1e-5)

    used = torch.tensor([3, 1, 2], dtype=torch.int32)
    decoded = varlen.segment_attention(q[:3], k, v, torch.arange(4, dtype=torch.int32), cu, None, (-1, -1), used)
    for row, (start, n) in enumerate(zip(cu[:-1].tolist(), used.tolist())):
        keys, values = (x[start:start + n].repeat_interleave(2, 1).transpose(0, 1) for x in (k, v))
        want = F.scaled_dot_product_attention(q[row, :, None], keys, values)[:, 0]
        assert torch.allclose(decoded[row], want, atol=1e-5)


def test_grouped_kv_heads_need_enable_gqa_and_used_key_counts_no_gradients(stand_in_kernel):
    q, kv, cu = torch.zeros(6, 4, 8), torch.zeros(6, 2, 8), torch.tensor([0, 2, 6], dtype=torch.int32)
    with pytest.raises(ValueError, match="enable_gqa"):
        varlen.flash_varlen(q, kv, kv, cu, cu, 4, 4)
    assert varlen.flash_varlen(q, kv, kv, cu, cu, 4, 4, enable_gqa=True).shape == q.shape
    used = torch.tensor([1, 3], dtype=torch.int32)
    with pytest.raises(ValueError, match="decoding"):
        varlen.flash_varlen(q.requires_grad_(), kv, kv, cu, cu, 4, 4, enable_gqa=True, seqused_k=used)


@pytest.mark.parametrize("decoding", [False, True])
def test_the_probe_refuses_a_kernel_that_computes_something_else(monkeypatch, decoding):
    """The feature check runs the kernel on tiny inputs and compares: here on the CPU with the reference
    as the kernel (accepted) and with one that reads every key of its segment, ignoring ``seqused_k``,
    as a kernel without it would (refused for decoding only)."""
    probe = varlen._runs_on.__wrapped__
    monkeypatch.setattr(varlen, "_flash_kernel", lambda q, k, v, cq, ck, mq, mk, scale, window, used:
                        varlen.segment_attention(q.float(), k.float(), v.float(), cq, ck, scale, window, used))
    assert probe(torch.device("cpu"), decoding)
    monkeypatch.setattr(varlen, "_flash_kernel", lambda q, k, v, cq, ck, mq, mk, scale, window, used:
                        varlen.segment_attention(q.float(), k.float(), v.float(), cq, ck, scale, window, None))
    assert probe(torch.device("cpu"), decoding) is not decoding


def test_a_token_major_cache_keeps_its_shape_and_flattens_its_tokens_without_a_copy(tiny_lora):
    from transformers import StaticCache

    _, model, _ = tiny_lora
    cache = StaticCache(config=model.config, max_cache_len=8)
    cache.early_initialization(3, model.config.num_key_value_heads, 16, torch.float32, torch.device("cpu"))
    shape = cache.layers[0].keys.shape
    varlen.token_major(cache)
    layer = cache.layers[0]
    assert layer.keys.shape == shape and layer.values.shape == shape
    new = torch.randn(3, shape[1], 2, shape[3])
    layer.cumulative_length.fill_(4)
    keys, _ = layer.update(new, new)  # transformers' own write into the static cache
    assert torch.equal(keys[:, :, 4:6], new)
    flat = keys.transpose(1, 2).reshape(-1, shape[1], shape[3])
    assert flat.data_ptr() == keys.data_ptr() and flat._base is not None  # a view: no copy of the cache


def test_the_packed_attention_named_is_that_of_the_precision_the_steps_attend_in(tiny_lora, monkeypatch):
    backend, model, _ = tiny_lora
    asked = []
    monkeypatch.setattr(varlen, "varlen_available",
                        lambda device, dtype, decoding=False: asked.append(dtype) or dtype == torch.bfloat16)
    assert backend.packed_attention(model) == "a block-diagonal mask (SDPA)"  # fp32 weights: the kernel takes none
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as under Lightning's bf16-mixed
        assert backend.packed_attention(model) == varlen.VARLEN_KERNEL
    assert asked == [torch.float32, torch.bfloat16]


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


def _unsloth_llama_namespace() -> dict:
    """The globals of Unsloth's Llama forwards as :func:`varlen.route_unsloth_segments` sees them: its
    attention and model forwards, and the two functions they call, which say how they were called."""
    namespace = {"__name__": "unsloth.models.llama"}
    exec("def LlamaAttention_fast_forward(self, *args, **kwargs):\n"
         "    return run_attention(config=None, context=get_packed_info_from_kwargs(kwargs, None), Q=0, K=0, V=0)\n"
         "def LlamaModel_fast_forward(self, *args, **kwargs):\n"
         "    return get_packed_info_from_kwargs(kwargs, None, None)\n", namespace)
    namespace["get_packed_info_from_kwargs"] = lambda kwargs, device, position_ids=None: ("unsloth's", position_ids)
    namespace["run_attention"] = lambda *, config, context, Q, K, V: "unsloth's attention"
    return namespace


def _gated(forward):
    """``forward`` behind a wrapper, as Unsloth gates the forwards it patches into transformers' classes."""
    return functools.wraps(forward)(lambda self, *args, **kwargs: forward(self, *args, **kwargs))


def _model_with(attention_forward, model_forward) -> torch.nn.Module:
    attention = type("Attention", (torch.nn.Module,), {"forward": _gated(attention_forward)})
    layer = torch.nn.Module()
    layer.self_attn = attention()
    model = torch.nn.Module()
    model.model = type("Model", (torch.nn.Module,), {"forward": _gated(model_forward)})()
    model.model.layers = torch.nn.ModuleList([layer, layer])
    return model


def test_unsloths_llama_layers_read_our_segments_and_attend_within_them(stand_in_kernel):
    unsloth = _unsloth_llama_namespace()
    # the attention forward on a copy of its globals, as Unsloth's per-layer compile may run it
    rebound = types.FunctionType(unsloth["LlamaAttention_fast_forward"].__code__, dict(unsloth),
                                 "LlamaAttention_fast_forward")
    assert varlen.route_unsloth_segments(_model_with(rebound, unsloth["LlamaModel_fast_forward"]))
    copy = rebound.__globals__
    for namespace in (unsloth, copy):  # the model forward's globals and the attention's
        assert namespace["run_attention"]._reads_segments and namespace["get_packed_info_from_kwargs"]._reads_segments
    patched = copy["run_attention"]
    assert varlen.route_unsloth_segments(_model_with(rebound, unsloth["LlamaModel_fast_forward"]))
    assert copy["run_attention"] is patched  # patched once

    get_packed_info = copy["get_packed_info_from_kwargs"]
    position_ids = torch.tensor([[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]])
    segments = varlen.packed_kwargs(position_ids)
    kwargs = {varlen.UNSLOTH_SEGMENTS: segments}
    assert get_packed_info(kwargs, "cpu") is segments  # a layer asks
    assert get_packed_info(kwargs, "cpu", position_ids) is None  # the model forward asks
    assert get_packed_info({}, "cpu", position_ids) == ("unsloth's", position_ids)

    q, k, v = (torch.randn(2, heads, 5, 8) for heads in (4, 2, 2))
    got = copy["run_attention"](config=None, context=types.SimpleNamespace(seq_info=segments), Q=q, K=k, V=v)
    tokens = [x.transpose(1, 2).reshape(10, x.shape[1], 8) for x in (q, k, v)]
    want = varlen.segment_attention(*tokens, segments["cu_seq_lens_q"], segments["cu_seq_lens_k"], None,
                                    varlen.CAUSAL, None)
    assert stand_in_kernel.calls == 1
    torch.testing.assert_close(got, want.reshape(2, 5, 4, 8))
    unsloths = types.SimpleNamespace(seq_info=(torch.tensor([3, 2]), None, 3))  # Unsloth's own packed lengths
    assert copy["run_attention"](config=None, context=unsloths, Q=q, K=k, V=v) == "unsloth's attention"


def test_other_attentions_keep_unsloths_packed_lengths():
    unsloth = _unsloth_llama_namespace()
    original = unsloth["run_attention"]
    other = types.FunctionType(unsloth["LlamaAttention_fast_forward"].__code__, unsloth, "MistralAttention_fast_forward")
    assert not varlen.route_unsloth_segments(_model_with(other, unsloth["LlamaModel_fast_forward"]))
    assert unsloth["run_attention"] is original


def test_the_direct_flash_calls_match_the_installed_torchs_operator_schemas():
    """The CUDA kernel cannot run here; its calls of aten's flash operators can, on meta tensors: forward and
    backward of packed rows, and a decoding call with ``seqused_k``, all with the arguments the GPU gets."""
    meta = dict(device="meta", dtype=torch.bfloat16)
    q, k, v = (torch.empty(10, h, 64, **meta).requires_grad_() for h in (4, 2, 2))
    cu = torch.empty(3, device="meta", dtype=torch.int32)
    out = varlen._flash_kernel(q, k, v, cu, cu, 5, 5, None, varlen.CAUSAL, None)
    out.sum().backward()
    assert out.shape == q.shape and k.grad.shape == k.shape and v.grad.shape == v.shape
    with torch.no_grad():
        used = torch.empty(2, device="meta", dtype=torch.int32)
        assert varlen._flash_kernel(q[:2], k, v, cu, cu, 1, 5, None, (-1, -1), used).shape == (2, 4, 64)
