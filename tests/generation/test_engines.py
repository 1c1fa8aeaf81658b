"""The static and compiled engines against the eager one, and which engine ``auto`` names
(bengali_empathy.generation.engines)."""
import pytest
import torch
from conftest import tiny_lora_of


@pytest.mark.parametrize("engine,max_new_tokens,prefill_tokens", [("compiled", 1, 16384), ("compiled", 7, 16384),
                                                                  ("static", 7, 40), ("static", 4, 1)])
def test_fast_engines_replies_equal_the_eager_engine_token_for_token(tiny_lora, engine, max_new_tokens,
                                                                     prefill_tokens, monkeypatch):
    """Sliced prefill into a static cache + grouped-query decoding attention (uncompiled on the CPU) =
    transformers' dynamic cache, whatever the slices (one row per prefill forward at a budget of 1 token)."""
    from bengali_empathy.generation import decoder
    from bengali_empathy.generation.decoding import Decoding
    from bengali_empathy.generation.generator import Generator

    monkeypatch.setattr(decoder, "PREFILL_TOKENS", prefill_tokens)
    backend, model, tok = tiny_lora
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(1000, 120000, (n,), generator=g).tolist() for n in (3, 17, 9, 30, 5, 1)]
    decoding = Decoding(max_new_tokens=max_new_tokens)
    eager = Generator(model, tok, backend, decoding, batch_size=4, engine="eager")
    compiled = Generator(model, tok, backend, decoding, batch_size=4, engine=engine)
    want, want_stats = eager.generate(prompts, progress=False)
    widths = []  # tokens of each forward pass through the fast engine
    hook = model.get_base_model().model.embed_tokens.register_forward_hook(
        lambda module, args, out: widths.append(args[0].shape))
    try:
        got, stats = compiled.generate(prompts, progress=False)  # batches 4 and 2
    finally:
        hook.remove()
    assert got == want and stats.new_tokens == want_stats.new_tokens and stats.rows == len(prompts)
    assert stats.as_dict()["engine"] == engine and want_stats.as_dict()["engine"] == "eager"
    # The prompts were prefilled in slices (each of at most prefill_tokens, or one row), generate
    # only ever ran one token per row.
    prefills = [w for w in widths if w[1] > 1]
    assert all(rows * width <= prefill_tokens or rows == 1 for rows, width in prefills)
    assert sum(rows for rows, _ in prefills) >= sum(len(p) > 1 for p in prompts)
    assert len(widths) > len(prefills)  # and decoding, one token per row
    assert model.get_base_model().config._attn_implementation == "sdpa"  # restored after generation
    if max_new_tokens > 2:  # rows that stop early: make the third token the second row emits a stop token
        out = model.generate(input_ids=torch.tensor([prompts[1]]), max_new_tokens=3, do_sample=False, pad_token_id=0)
        for generator in (eager, compiled):
            generator.stop_ids = [*generator.stop_ids, int(out[0, -1])]
        want, want_stats = eager.generate(prompts, progress=False)
        got, stats = compiled.generate(prompts, progress=False)
        assert got == want and stats.new_tokens == want_stats.new_tokens
        assert want_stats.new_tokens < len(prompts) * max_new_tokens  # some row did stop early



def test_fast_engines_are_refused_for_unsloth_and_auto_is_compiled_on_cuda_with_hf(monkeypatch):
    from bengali_empathy.errors import UserError
    from bengali_empathy.generation.engines import resolve_engine

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_engine("auto", "hf") == "eager"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_engine("auto", "hf") == "compiled"
    assert resolve_engine("auto", "unsloth") == "eager"  # Unsloth decodes with its own kernels
    for engine in ("compiled", "static"):
        with pytest.raises(UserError, match=f"generation_engine '{engine}' needs model.backend 'hf'"):
            resolve_engine(engine, "unsloth")


# The fast engine named fails on each model when asked to run it: Mistral's sliding-window cache layers overflow
# in the static engine's decoding, a GPT-NeoX configuration has no num_key_value_heads for the compiled engine's cache.
@pytest.mark.parametrize("model_type,engine", [("mistral", "static"), ("gpt_neox", "compiled")])
def test_a_model_of_another_architecture_generates_eagerly_and_says_so_once(model_type, engine, tokenizer, caplog):
    from bengali_empathy.generation.decoding import Decoding
    from bengali_empathy.generation.engines import make_engine
    from bengali_empathy.generation.generator import Generator
    from bengali_empathy.models.backends import HFPeftBackend

    tok, backend = tokenizer, HFPeftBackend(load_in_4bit=False, gradient_checkpointing=False)
    model = tiny_lora_of(model_type, tok)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(1000, 120000, (n,), generator=g).tolist() for n in (3, 17, 9, 30, 5)]
    lines = []
    generator = Generator(model, tok, backend, Decoding(max_new_tokens=6), 4, report=lines.append, engine=engine)
    got, stats = generator.generate(prompts, progress=False)
    again, _ = generator.generate(prompts, progress=False)
    want = []  # plain transformers, one prompt at a time
    for p in prompts:
        out = model.generate(input_ids=torch.tensor([p]), max_new_tokens=6, do_sample=False,
                             eos_token_id=generator.stop_ids, pad_token_id=tok.pad_token_id)
        want.append(tok.decode(out[0, len(p):], skip_special_tokens=True).strip())
    assert got == again == want and stats.engine == "eager"
    assert lines == [f"generation: the {engine} engine is written for Llama models; this {model_type} model "
                     "generates with the eager engine"]
    with caplog.at_level("WARNING", logger="bengali_empathy.generation.engines"):  # made directly: said there
        assert make_engine(engine, model, generator.stop_ids, tok.pad_token_id).name == "eager"
    assert [r.getMessage() for r in caplog.records] == lines
