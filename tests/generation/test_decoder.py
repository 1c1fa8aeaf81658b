"""The compiled engine's decoder (run without a graph on the CPU) against transformers' ``generate``."""
import pytest
import torch

from bengali_empathy.generation import decoder as decoder_module
from bengali_empathy.generation.decoding import Decoding
from bengali_empathy.generation.generator import Generator


@pytest.fixture(scope="module")
def random_prompts():
    g = torch.Generator().manual_seed(11)
    return [torch.randint(1000, 120000, (n,), generator=g).tolist() for n in (40, 3, 22, 9, 1, 14, 31)]


@pytest.mark.parametrize("decoding", [Decoding(max_new_tokens=9, repetition_penalty=1.3),
                                      Decoding(max_new_tokens=9, no_repeat_ngram_size=1)],
                         ids=["repetition_penalty", "no_repeat_ngram"])
def test_greedy_with_penalties_equals_generate(tiny_lora, random_prompts, decoding):
    """The penalties see the prompt and the reply so far, as in ``generate``."""
    backend, model, tok = tiny_lora
    want, _ = Generator(model, tok, backend, decoding, 3, engine="eager").generate(random_prompts, progress=False)
    got, stats = Generator(model, tok, backend, decoding, 3, engine="compiled").generate(random_prompts,
                                                                                          progress=False)
    plain, _ = Generator(model, tok, backend, Decoding(max_new_tokens=9), 3, engine="compiled").generate(
        random_prompts, progress=False)
    assert got == want and got != plain
    assert stats.engine == "compiled" and stats.decode_steps > 0


def test_sampling_is_reproducible_and_differs_from_greedy(tiny_lora, random_prompts):
    backend, model, tok = tiny_lora
    sample = Decoding(max_new_tokens=6, temperature=1.4, top_p=0.9, top_k=40, seed=3)
    a = Generator(model, tok, backend, sample, 4, engine="compiled").generate(random_prompts, progress=False)[0]
    b = Generator(model, tok, backend, sample, 4, engine="compiled").generate(random_prompts, progress=False)[0]
    greedy = Generator(model, tok, backend, Decoding(max_new_tokens=6), 4, engine="compiled").generate(
        random_prompts, progress=False)[0]
    assert a == b and a != greedy


def test_a_step_per_batch_shape_and_cache_bucket(tiny_lora, random_prompts, monkeypatch):
    """Batches (longest first) of one cache bucket share a step; a shorter bucket or fewer rows makes a
    new one, whose cache is only as long as its own bucket."""
    backend, model, tok = tiny_lora
    monkeypatch.setattr(decoder_module, "CACHE_BUCKET", 16)
    made = []
    real = decoder_module.DecodeStep

    class Counted(real):
        def __init__(self, model, rows, cache_len):
            made.append((rows, cache_len))
            super().__init__(model, rows, cache_len)

    monkeypatch.setattr(decoder_module, "DecodeStep", Counted)
    decoding = Decoding(max_new_tokens=4)
    want, _ = Generator(model, tok, backend, decoding, 2, engine="eager").generate(random_prompts, progress=False)
    got, _ = Generator(model, tok, backend, decoding, 2, engine="compiled").generate(random_prompts, progress=False)
    assert got == want
    # widths 40,31 | 22,14 | 9,3 | 1 (+4 new tokens) -> buckets 48 | 32 | 16 | 16 with one row
    assert made == [(2, 48), (2, 32), (2, 16), (1, 16)]


def test_decoding_ends_once_every_row_has_stopped(tiny_lora, random_prompts):
    """The host checks every CHECK_EVERY steps: with every row stopped at its first token, the batch
    ends after CHECK_EVERY steps, not max_new_tokens, and each reply is that one token."""
    backend, model, tok = tiny_lora
    decoding = Decoding(max_new_tokens=40)
    gen = Generator(model, tok, backend, decoding, 8, engine="compiled")
    with torch.no_grad():
        firsts = [int(model(input_ids=torch.tensor([p])).logits[0, -1].argmax()) for p in random_prompts]
    gen.stop_ids = [*gen.stop_ids, *firsts]
    replies, stats = gen.generate(random_prompts, progress=False)
    assert stats.decode_steps == decoder_module.CHECK_EVERY
    assert stats.new_tokens == len(random_prompts) and replies == [tok.decode([t]).strip() for t in firsts]


def test_steps_attend_to_a_growing_part_of_the_cache_and_equal_generate(tiny_lora, random_prompts, monkeypatch):
    """With 8-slot buckets a 20-token reply crosses several: each step reads only the slots written so far
    (rounded up), and the replies still equal ``generate``'s."""
    backend, model, tok = tiny_lora
    monkeypatch.setattr(decoder_module, "CACHE_BUCKET", 8)
    read = []
    real = decoder_module.DecodeStep._forward
    monkeypatch.setattr(decoder_module.DecodeStep, "_forward",
                        lambda self, attended: read.append((self.cache_len, attended)) or real(self, attended))
    decoding = Decoding(max_new_tokens=20)
    want, _ = Generator(model, tok, backend, decoding, 4, engine="eager").generate(random_prompts, progress=False)
    got, _ = Generator(model, tok, backend, decoding, 4, engine="compiled").generate(random_prompts, progress=False)
    assert got == want
    first_batch = [a for c, a in read if c == 64][:20]  # widths 40, 31, 22, 14: 60 slots -> a 64-slot cache
    assert first_batch[0] == 40 and first_batch[-1] == 64 and sorted(set(first_batch)) == [40, 48, 56, 64]


def test_row_groups_skip_a_left_padded_batchs_padding_only_where_it_pays():
    assert decoder_module.row_groups([600] * 64, 600) == ((0, 0),)  # nothing to skip: one group
    lengths = [1900] * 32 + [1000] * 32 + [700] * 32
    # first slots 0, 900 -> 768, 1200 -> 1024 (multiples of the cache bucket, 256)
    assert decoder_module.row_groups(lengths, 1900) == ((0, 0), (32, 768), (64, 1024))
    # every group has its 32 rows, also where two start at one slot: the attention's shapes repeat
    assert decoder_module.row_groups([1900] * 64 + [300] * 32, 1900) == ((0, 0), (32, 0), (64, 1536))
    assert decoder_module.row_groups([1900] * 95 + [100], 1900) == ((0, 0),)  # an eighth of the reads or less


def test_rows_attending_in_groups_from_their_own_first_slot_equal_generate(tiny_lora, random_prompts, monkeypatch):
    """Groups of 2 rows each skip their left padding; the replies still equal ``generate``'s."""
    backend, model, tok = tiny_lora
    monkeypatch.setattr(decoder_module, "ROW_GROUP", 2)
    monkeypatch.setattr(decoder_module, "GROUP_SLOT", 1)
    used = []
    real = decoder_module.DecodeStep.use_row_groups
    monkeypatch.setattr(decoder_module.DecodeStep, "use_row_groups",
                        lambda self, groups: used.append(groups) or real(self, groups))
    decoding = Decoding(max_new_tokens=7)
    want, _ = Generator(model, tok, backend, decoding, 4, engine="eager").generate(random_prompts, progress=False)
    got, _ = Generator(model, tok, backend, decoding, 4, engine="compiled").generate(random_prompts, progress=False)
    assert got == want
    assert used[0] == ((0, 0), (2, 18))  # widths 40, 31 | 22, 14: the second pair starts 18 slots in


def test_batches_of_long_prompts_hold_fewer_rows_within_the_kv_budget(tiny_lora, random_prompts, monkeypatch):
    """``kv_slots`` (the plan's KV-cache room) caps rows x cache length: long prompts go in smaller batches."""
    from bengali_empathy.generation.generator import generate_replies
    from bengali_empathy.data.tokenizer import stop_token_ids

    backend, model, tok = tiny_lora
    monkeypatch.setattr(decoder_module, "CACHE_BUCKET", 16)
    made = []
    real = decoder_module.DecodeStep.__init__
    monkeypatch.setattr(decoder_module.DecodeStep, "__init__",
                        lambda self, m, rows, cache_len: made.append((rows, cache_len)) or real(self, m, rows, cache_len))
    decoding = Decoding(max_new_tokens=4)
    want, _ = generate_replies(model, tok, random_prompts, decoding, 8, stop_token_ids(tok), progress=False)
    got, stats = generate_replies(model, tok, random_prompts, decoding, 8, stop_token_ids(tok), progress=False,
                                  engine="compiled", kv_slots=96)
    assert got == want
    # widths 40, 31 (48 slots: 2 rows) | 22, 14, 9 (32 slots: 3 rows) | 3, 1 (16 slots: up to 6 rows)
    assert made == [(2, 48), (3, 32), (2, 16)] and stats.batch_size == 3


def test_a_2048_token_reply_gets_a_cache_for_prompt_and_reply(tiny_lora, random_prompts, monkeypatch):
    """model.decoding.max_new_tokens 2,048: the cache holds prompt + reply (in buckets), every step writes its
    slot."""
    backend, model, tok = tiny_lora
    made = []
    real = decoder_module.DecodeStep.__init__
    monkeypatch.setattr(decoder_module.DecodeStep, "__init__",
                        lambda self, m, rows, cache_len: made.append((rows, cache_len)) or real(self, m, rows, cache_len))
    gen = Generator(model, tok, backend, Decoding(max_new_tokens=2048), 2, engine="compiled")
    gen.stop_ids = []  # no row stops: the whole reply is decoded
    replies, stats = gen.generate(random_prompts[:2], progress=False)
    assert made == [(2, 2304)]  # 40 + 2,048 slots, rounded up to 256
    assert stats.decode_steps == 2048 and stats.new_tokens == 2 * 2048 and all(replies)


def test_out_of_memory_in_the_compiled_engine_halves_the_batch_and_drops_its_cache(tiny_lora, random_prompts,
                                                                                   monkeypatch):
    """A batch whose cache does not fit is retried at half its size, on a new (smaller) cache."""
    backend, model, tok = tiny_lora
    real = decoder_module.DecodeStep.__init__
    tried = []

    def small_card(self, m, rows, cache_len):
        tried.append(rows)
        if rows > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        real(self, m, rows, cache_len)

    monkeypatch.setattr(decoder_module.DecodeStep, "__init__", small_card)
    decoding = Decoding(max_new_tokens=3)
    want, _ = Generator(model, tok, backend, decoding, 8, engine="eager").generate(random_prompts, progress=False)
    lines = []
    gen = Generator(model, tok, backend, decoding, 8, engine="compiled", report=lines.append)
    got, stats = gen.generate(random_prompts, progress=False)
    assert got == want and tried == [7, 3, 1] and stats.batch_size == 1  # 7 rows, 3, then one at a time (one cache)
    assert gen.batch_size == 1 and lines == [f"generating: out of GPU memory, batch size now {n} for the rest of this run"
                                             for n in (3, 1)]


def test_sliced_prefill_fills_the_cache_as_one_padded_forward_does_without_gradients(tiny_lora):
    """Each slice's keys sit where the batch's left padding puts them; nothing keeps an autograd graph
    (a batch's prefill with one would hold every layer's activations: out of memory on an 8B model)."""
    from transformers import DynamicCache, StaticCache

    from bengali_empathy.generation.decoder import left_padded, prefill

    _, model, tok = tiny_lora
    g = torch.Generator().manual_seed(9)
    prompts = [torch.randint(1000, 120000, (n,), generator=g).tolist() for n in (12, 7, 7, 2)]
    width = len(prompts[0])
    cache = StaticCache(config=model.config, max_cache_len=width + 3)
    prefill(model, cache, prompts, width, tok.pad_token_id, token_budget=12)  # slices of 1, 2 and 1 rows
    ids, mask = left_padded([p[:-1] for p in prompts], width - 1, tok.pad_token_id)
    full = DynamicCache()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
              past_key_values=full)
    real = mask.bool()
    for layer, want in zip(cache.layers, full.layers):
        assert not layer.keys.requires_grad and int(layer.cumulative_length) == width - 1
        got = layer.keys[:, :, : width - 1].transpose(1, 2)[real]
        assert torch.allclose(got, want.keys.transpose(1, 2)[real], atol=1e-5)


def test_packed_prefill_fills_the_cache_as_the_padded_one_does(tiny_lora, stand_in_kernel, monkeypatch):
    """Where the varlen kernel runs, a slice's prompts are one row without padding: every prompt's keys and
    values land in its own row and slots, equal to the padded prefill's."""
    from transformers import StaticCache

    from bengali_empathy.generation.decoder import prefill
    from bengali_empathy.models import varlen

    _, model, tok = tiny_lora
    g = torch.Generator().manual_seed(9)
    prompts = [torch.randint(1000, 120000, (n,), generator=g).tolist() for n in (12, 7, 7, 2, 1)]
    width = len(prompts[0])

    def filled(packed: bool) -> StaticCache:
        monkeypatch.setattr(varlen, "varlen_available", lambda device, dtype, decoding=False: packed)
        cache = StaticCache(config=model.config, max_cache_len=width + 3)
        # padded: slices of 1 (11 + 0 padding tokens), 2 (6 + 6) and 2 rows (1 + 0); packed: 1 and 4 (6 + 6 + 1 + 0)
        prefill(model, cache, prompts, width, tok.pad_token_id, token_budget=14)
        return cache

    packed, padded = filled(True), filled(False)
    assert stand_in_kernel.calls == 2 * model.config.num_hidden_layers  # one call per slice and layer
    real = torch.zeros(len(prompts), width - 1, dtype=torch.bool)
    for row, p in enumerate(prompts):
        real[row, width - len(p):] = True  # all but the last token, right-aligned
    for got, want in zip(packed.layers, padded.layers):
        assert not got.keys.requires_grad and int(got.cumulative_length) == width - 1
        for name in ("keys", "values"):
            a, b = (getattr(x, name)[:, :, : width - 1].transpose(1, 2) for x in (got, want))
            assert torch.allclose(a[real], b[real], atol=1e-5)
            assert not a[~real].any()  # padding slots left as the reset cache has them


@pytest.mark.parametrize("engine", ["static", "compiled"])
def test_replies_after_a_packed_prefill_equal_the_eager_engines(tiny_lora, random_prompts, stand_in_kernel, engine):
    backend, model, tok = tiny_lora
    decoding = Decoding(max_new_tokens=7)
    want, _ = Generator(model, tok, backend, decoding, 3, engine="eager").generate(random_prompts, progress=False)
    calls = stand_in_kernel.calls
    got, stats = Generator(model, tok, backend, decoding, 3, engine=engine).generate(random_prompts, progress=False)
    assert stand_in_kernel.calls > calls  # the prefill went through the kernel
    assert got == want
    if engine == "compiled":  # metrics.json's per-batch profile says how each batch was prefilled and decoded
        assert [b["prefill"] for b in stats.batches] == ["packed"] * 3
        assert [b["decode"] for b in stats.batches] == ["varlen"] * 3
        assert sum(b["prompt_tokens"] for b in stats.batches) == sum(len(p) - 1 for p in random_prompts)
        # one kernel call per layer for each batch's prefill (the batch of a 1-token prompt has none) and for
        # each of its decoding steps
        layers = model.config.num_hidden_layers
        assert stand_in_kernel.calls - calls == layers * sum((b["prompt_tokens"] > 0) + b["steps"]
                                                             for b in stats.batches)


def test_replies_through_the_fused_kernels_equal_the_eager_engines(tiny_lora, random_prompts, stand_in_kernel,
                                                                     stand_in_fused_kernels):
    """The compiled engine's prefill and decoding steps run the fused kernels (models/fused.py), the eager engine
    (the reference) does not; the replies are equal and each batch's profile says so."""
    backend, model, tok = tiny_lora
    decoding = Decoding(max_new_tokens=7)
    want, _ = Generator(model, tok, backend, decoding, 3, engine="eager").generate(random_prompts, progress=False)
    assert not stand_in_fused_kernels.calls
    got, stats = Generator(model, tok, backend, decoding, 3, engine="compiled").generate(random_prompts,
                                                                                          progress=False)
    assert got == want
    assert [b["kernels"] for b in stats.batches] == ["fused"] * 3
    layers = model.config.num_hidden_layers
    forwards = sum((b["prompt_tokens"] > 0) + b["steps"] for b in stats.batches)  # prefills and decoding steps
    assert stand_in_fused_kernels.calls["rotary"] == stand_in_fused_kernels.calls["silu_mul"] == layers * forwards
