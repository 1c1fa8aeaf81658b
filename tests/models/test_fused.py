"""Liger's fused kernels in a Llama's generation forwards (bengali_empathy.models.fused), on the CPU with stand-ins
that compute what the kernels compute; the kernels themselves are compared with the eager modules in
tests/scenarios/test_gpu.py."""
import contextlib

import pytest
import torch
from transformers.models.llama import modeling_llama as llama

from bengali_empathy.models.fused import fused_kernels, fuses
from bengali_empathy.models.lora import base_model


def swapped(model) -> list:
    return [m for m in base_model(model).modules() if "forward" in vars(m)]


def test_off_the_gpu_nothing_is_swapped(tiny_lora):
    _, model, _ = tiny_lora
    rotary = llama.apply_rotary_pos_emb
    assert not fuses(model)
    with fused_kernels(model) as on:
        assert not on and not swapped(model) and llama.apply_rotary_pos_emb is rotary


def test_a_llama_within_runs_the_kernels_computes_what_it_computes_without_and_is_restored(tiny_lora,
                                                                                             stand_in_fused_kernels):
    _, model, _ = tiny_lora
    ids = torch.randint(1000, 120000, (2, 9), generator=torch.Generator().manual_seed(0))
    rotary = llama.apply_rotary_pos_emb
    with torch.no_grad():
        want = model(input_ids=ids).logits
        with fused_kernels(model) as on:
            got = model(input_ids=ids).logits
            assert on and llama.apply_rotary_pos_emb is not rotary
    layers = model.config.num_hidden_layers
    assert dict(stand_in_fused_kernels.calls) == {"rms_norm": 2 * layers + 1, "rotary": layers, "silu_mul": layers}
    assert torch.allclose(got, want, atol=1e-5)
    assert not swapped(model) and llama.apply_rotary_pos_emb is rotary


def test_inputs_not_in_the_weights_dtype_run_the_eager_modules(tiny_lora, stand_in_fused_kernels):
    """fp32 norms on bf16 activations (a k-bit-prepared model's): eager promotes to fp32, a kernel would not."""
    _, model, _ = tiny_lora
    norm = base_model(model).model.norm
    x = torch.randn(3, model.config.hidden_size).to(torch.bfloat16)
    q, k = torch.randn(1, 4, 3, 16).to(torch.bfloat16), torch.randn(1, 2, 3, 16).to(torch.bfloat16)
    cos, sin = torch.randn(1, 3, 16), torch.randn(1, 3, 16)
    want_norm, want_rotary = norm(x), llama.apply_rotary_pos_emb(q, k, cos, sin)
    with fused_kernels(model):
        got_norm, got_rotary = norm(x), llama.apply_rotary_pos_emb(q, k, cos, sin)
    assert got_norm.dtype == torch.float32 and torch.equal(got_norm, want_norm)
    assert all(torch.equal(a, b) for a, b in zip(got_rotary, want_rotary))
    assert not stand_in_fused_kernels.calls


def test_the_rotary_function_stays_swapped_until_the_last_model_leaves(tiny_lora, stand_in_fused_kernels):
    from transformers import LlamaConfig, LlamaForCausalLM

    _, first, _ = tiny_lora
    second = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=4, num_key_value_heads=2))
    rotary = llama.apply_rotary_pos_emb
    with contextlib.ExitStack() as outer:
        outer.enter_context(fused_kernels(second))
        with fused_kernels(first):
            assert swapped(first) and swapped(second)
        assert llama.apply_rotary_pos_emb is not rotary and not swapped(first) and swapped(second)
    assert llama.apply_rotary_pos_emb is rotary and not swapped(second)


def test_a_model_of_another_architecture_keeps_its_modules(stand_in_fused_kernels, tokenizer):
    from conftest import tiny_lora_of

    model = tiny_lora_of("mistral", tokenizer)
    with fused_kernels(model) as on:
        assert not on and not swapped(model)


def test_the_probe_takes_kernels_that_compute_what_eager_does_and_refuses_one_that_does_not(stand_in_fused_kernels,
                                                                                              monkeypatch):
    from bengali_empathy.models import fused

    probe = fused._runs_on.__wrapped__  # uncached: a CPU stands for the GPU here
    widths = (256, 896, 8, 2, 32)  # hidden, intermediate, heads, K/V heads, head width
    assert probe(torch.device("cpu"), *widths)
    assert stand_in_fused_kernels.calls == {"rms_norm": 1, "rotary": 1, "silu_mul": 1}
    monkeypatch.setattr(fused, "silu_mul", lambda gate, up: gate * up)  # no SiLU
    assert not probe(torch.device("cpu"), *widths)
