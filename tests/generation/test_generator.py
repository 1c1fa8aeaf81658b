"""Batched generation: length-sorted batches give the same replies as one prompt at a time, in input order."""
import pytest
import torch

from bengali_empathy.generation.decoding import Decoding
from bengali_empathy.generation.generator import generate_replies
from bengali_empathy.data.tokenizer import stop_token_ids

from conftest import TWO_PAIRS, encode_pairs

PROMPTS = TWO_PAIRS + [("পরীক্ষায় ভালো করিনি, বাবা-মা রাগ করবেন।", "x"), ("ঘুম আসে না।", "x"),
                       ("নতুন শহরে এসে কাউকে চিনি না, খুব একা লাগে আর মন খারাপ থাকে সারাদিন।", "x")]


@pytest.fixture(scope="module")
def prompts(tiny_lora):
    _, _, tok = tiny_lora
    return [ex["input_ids"][:ex["prompt_len"]] for ex in encode_pairs(tok, PROMPTS)]


def test_batched_greedy_replies_equal_one_at_a_time_in_input_order(tiny_lora, prompts):
    _, model, tok = tiny_lora
    model.eval()
    decoding = Decoding(max_new_tokens=6)
    batched, stats = generate_replies(model, tok, prompts, decoding, 2, stop_token_ids(tok), progress=False)
    single = [generate_replies(model, tok, [p], decoding, 1, stop_token_ids(tok), progress=False)[0][0]
              for p in prompts]
    assert len(set(len(p) for p in prompts)) > 1  # the batches really are sorted and padded
    assert batched == single
    assert stats.rows == len(prompts) and 0 < stats.new_tokens <= 6 * len(prompts) and stats.batch_size == 2


def test_rows_stop_at_eot_and_only_their_own_tokens_count(tiny_lora, prompts):
    _, model, tok = tiny_lora
    eot = tok.convert_tokens_to_ids("<|eot_id|>")

    class StopsSecondRow(torch.nn.Module):
        """Row 0 writes token 11372 four times; row 1 ends after one token with <|eot_id|>."""

        def parameters(self):
            return model.parameters()

        def generate(self, input_ids, attention_mask, eos_token_id, pad_token_id, max_new_tokens, **_):
            assert eot in eos_token_id
            new = torch.full((input_ids.shape[0], 4), 11372)
            new[1, 0], new[1, 1:] = eot, pad_token_id
            return torch.cat([input_ids, new], 1)

    replies, stats = generate_replies(StopsSecondRow(), tok, prompts[:2], Decoding(max_new_tokens=4), 8,
                                      stop_token_ids(tok), progress=False)
    longest_first = sorted(range(2), key=lambda i: -len(prompts[i]))
    assert replies[longest_first[1]] == ""
    assert replies[longest_first[0]] == tok.decode([11372] * 4)
    assert stats.new_tokens == 4 + 1  # four tokens, and the stop token of the other row


def test_out_of_memory_halves_the_batch_and_keeps_every_row(tiny_lora, prompts):
    _, model, tok = tiny_lora
    seen = []

    class SmallMemory(torch.nn.Module):
        def parameters(self):
            return model.parameters()

        def generate(self, input_ids, **kw):
            seen.append(input_ids.shape[0])
            if input_ids.shape[0] > 2:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return torch.cat([input_ids, torch.full((input_ids.shape[0], 1), 11372)], 1)

    halved = []
    replies, stats = generate_replies(SmallMemory(), tok, prompts, Decoding(max_new_tokens=1), 8,
                                      stop_token_ids(tok), progress=False, on_oom=halved.append)
    assert halved == [2] and stats.batch_size == 2  # half the batch that failed (5 rows, fewer than 8)
    assert seen[0] == 5 and all(n <= 2 for n in seen[1:]) and sum(seen[1:]) == len(prompts)
    assert all(r for r in replies)


def test_sampling_is_reproducible_with_a_seed(tiny_lora, prompts):
    _, model, tok = tiny_lora
    model.eval()
    sample = Decoding(max_new_tokens=5, temperature=1.5, top_p=0.95, top_k=50, seed=7)
    a = generate_replies(model, tok, prompts, sample, 4, stop_token_ids(tok), progress=False)[0]
    b = generate_replies(model, tok, prompts, sample, 4, stop_token_ids(tok), progress=False)[0]
    greedy = generate_replies(model, tok, prompts, Decoding(max_new_tokens=5), 4, stop_token_ids(tok),
                              progress=False)[0]
    assert a == b and a != greedy


def test_generation_plan_merges_where_it_fits_and_sizes_batches_to_the_kv_cache(tiny_lora):
    """Llama-3.1-8B's shapes: 128 KiB of KV cache a token; the checks are before any generation."""
    from transformers import LlamaConfig

    from bengali_empathy.errors import UserError
    from bengali_empathy.generation.generator import (GenerationPlan, batch_rows, kv_bytes_per_token, plan_generation,
                                            prefill_bytes)

    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8)
    per_token = kv_bytes_per_token(config)
    assert per_token == 128 * 1024
    gib, merged = 2**30, 15 * 2**30
    row_slots = 3072  # 0.38 GiB: a 2,048-token reply after a 1,000-token prompt, in 256-slot buckets
    assert plan_generation(config, 1000, 2048, 64, None, merged, None) == GenerationPlan(False, 64)  # CPU
    assert plan_generation(config, 1000, 2048, 64, None, merged, True) == GenerationPlan(True, 64)
    roomy = plan_generation(config, 1000, 2048, 64, 80 * gib, merged, None)
    assert roomy == GenerationPlan(True, 64, (65 * gib - prefill_bytes(config, 1000)) // per_token, 16384)
    # 25 GiB free: the copy would leave room for 21 rows of the longest prompt (< 32); the adapter model has more
    tight = plan_generation(config, 1000, 2048, 64, 25 * gib, merged, None)
    assert tight == GenerationPlan(False, 64, (25 * gib - prefill_bytes(config, 1000)) // per_token, 16384)
    # 2 GiB free: prefill slices shrink to 2,048 tokens (a quarter of the memory), 4 rows of the longest prompt
    small = plan_generation(config, 1000, 2048, 64, 2 * gib, merged, None)
    assert small.prefill_tokens == 2048 and small.kv_slots == (2 * gib - prefill_bytes(config, 1000, 2048)) // per_token
    assert batch_rows(1000, 2048, 64, small.kv_slots) == 4 == small.kv_slots // row_slots
    assert plan_generation(config, 1000, 2048, 64, 20 * gib, merged, True).merged  # asked for, and one row fits
    # A batch of shorter prompts holds more rows, in multiples of 8 from 8 up; never more than the batch size
    assert batch_rows(1000, 2048, 64, 100_000) == 32 and batch_rows(100, 28, 64, 100_000) == 64
    assert batch_rows(1000, 2048, 64, 13 * row_slots) == 8 and batch_rows(1000, 2048, 64, None) == 64
    with pytest.raises(UserError, match=r"model.decoding.max_new_tokens 2048 after prompts of up to 1000 tokens needs "
                                        r"0.38 GiB of KV cache per row .* but 0.5 GiB are free for generation"):
        plan_generation(config, 1000, 2048, 64, gib // 2, merged, None)
    with pytest.raises(UserError, match=r"model.generation.weights 'merged' needs 15.0 GiB"):
        plan_generation(config, 1000, 2048, 64, 12 * gib, merged, True)
