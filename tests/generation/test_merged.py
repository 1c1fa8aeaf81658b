"""The merged copy computes what the LoRA model computes, with the adapter on and off."""
import pytest
import torch
from conftest import OTHER_ARCHITECTURES, tiny_lora_of, trained_tiny_lora

from bengali_empathy.generation.merged import merged_bytes, merged_copy


@pytest.fixture(scope="module")
def lora_with_trained_head(tiny_model_path):
    """The tiny model with a LoRA whose B is not zero and a head trained in full (modules_to_save)."""
    _, model, tok = trained_tiny_lora(tiny_model_path, 256, modules_to_save=("lm_head",))
    return model, tok


def test_merged_copy_has_the_lora_models_logits_with_the_adapter_on_and_off(lora_with_trained_head):
    model, _ = lora_with_trained_head
    ids = torch.randint(1000, 120000, (3, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tuned = model(input_ids=ids).logits
        copy = merged_copy(model, torch.float32)
        merged = copy(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
            base_copy = merged_copy(model, torch.float32)(input_ids=ids).logits
    assert type(copy).__name__ == "LlamaForCausalLM" and not hasattr(copy, "peft_config")
    assert not any(p.requires_grad for p in copy.parameters())
    assert (tuned - base).abs().max() > 0.1  # the adapter and the head do change the function
    assert torch.allclose(merged, tuned, atol=1e-4) and torch.equal(merged.argmax(-1), tuned.argmax(-1))
    assert torch.allclose(base_copy, base, atol=1e-5)
    assert merged_bytes(model, torch.float32) == 4 * sum(p.numel() for p in copy.parameters())


@pytest.mark.parametrize("model_type", sorted(OTHER_ARCHITECTURES))
def test_the_merged_copy_of_a_model_of_another_architecture_has_its_logits(model_type, tokenizer):
    """predict's copy is a plain transformers model of any architecture (only the fast engines are Llama's)."""
    model = tiny_lora_of(model_type, tokenizer)
    ids = torch.randint(1000, 120000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tuned = model(input_ids=ids).logits
        copy = merged_copy(model, torch.float32)
        with model.disable_adapter():
            assert (tuned - model(input_ids=ids).logits).abs().max() > 0.1  # the adapter does change the function
    assert copy.config.model_type == model_type and not hasattr(copy, "peft_config")
    assert torch.allclose(copy(input_ids=ids).logits, tuned, atol=1e-5)


def test_generation_on_the_merged_copy_is_reported_as_such(lora_with_trained_head):
    from bengali_empathy.models.backends import HFPeftBackend
    from bengali_empathy.generation.decoding import Decoding
    from bengali_empathy.generation.generator import Generator

    model, tok = lora_with_trained_head
    backend = HFPeftBackend(load_in_4bit=False, gradient_checkpointing=False)
    prompts = [torch.randint(1000, 120000, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 9)]
    lines = []
    on_copy = Generator(model, tok, backend, Decoding(max_new_tokens=5), 2, report=lines.append, weights="merged")
    on_adapter = Generator(model, tok, backend, Decoding(max_new_tokens=5), 2, report=lines.append)
    got, stats = on_copy.generate(prompts, progress=False)
    want, want_stats = on_adapter.generate(prompts, progress=False)
    assert got == want  # random LoRA weights: no near-ties in five tokens
    assert stats.as_dict()["weights"] == "merged" and want_stats.as_dict()["weights"] == "adapter"
    assert lines == ["generating: merged 16-bit copy (LoRA folded into the dequantised base), eager engine, batches of up to 2 rows"]
    # fit's validations never merge: training holds the memory
    assert on_copy.generate(prompts, progress=False, allow_merged=False)[1].weights == "adapter"


def test_a_4bit_models_fp32_parameters_compute_in_16_bit_while_the_fast_engines_generate(lora_with_trained_head,
                                                                                          monkeypatch):
    """peft keeps a 4-bit model's norms, embeddings, head and LoRA in fp32: the compiled engine generates
    with 16-bit copies of them (a KV cache in the compute dtype), the eager engine with them as they are,
    and afterwards every parameter holds its own fp32 tensor again."""
    from types import SimpleNamespace

    from bengali_empathy.generation import decoder
    from bengali_empathy.models.backends import HFPeftBackend
    from bengali_empathy.generation.decoding import Decoding
    from bengali_empathy.generation.generator import Generator
    from bengali_empathy.generation.merged import compute_dtype, compute_dtype_bytes

    model, tok = lora_with_trained_head
    config = model.get_base_model().config
    assert compute_dtype(model) is None and compute_dtype_bytes(model) == 0  # not 4-bit: nothing to copy
    monkeypatch.setattr(config, "quantization_config",
                        SimpleNamespace(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16), raising=False)
    before = {n: p.data_ptr() for n, p in model.named_parameters()}
    assert compute_dtype(model) == torch.bfloat16
    assert compute_dtype_bytes(model) == 2 * sum(p.numel() for p in model.parameters())  # all fp32 here
    seen = []  # (KV cache dtype, output head dtype) of each decoding step made
    real = decoder.DecodeStep.__init__

    def noting_dtypes(self, m, rows, cache_len):
        real(self, m, rows, cache_len)
        seen.append((self.cache.layers[0].keys.dtype, m.get_output_embeddings().weight.dtype))

    monkeypatch.setattr(decoder.DecodeStep, "__init__", noting_dtypes)
    prompts = [torch.randint(1000, 120000, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 9)]
    backend = HFPeftBackend(load_in_4bit=False, gradient_checkpointing=False)
    for engine in ("compiled", "eager"):
        replies, _ = Generator(model, tok, backend, Decoding(max_new_tokens=4), 2, engine=engine,
                               weights="adapter").generate(prompts, progress=False)
        assert len(replies) == 2
    assert seen == [(torch.bfloat16, torch.bfloat16)]  # the compiled engine only; the eager engine has no DecodeStep
    assert all(p.data_ptr() == before[n] and p.dtype == torch.float32 for n, p in model.named_parameters())
