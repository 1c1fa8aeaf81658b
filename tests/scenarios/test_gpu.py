"""GPU-only tests (marked ``gpu``; skipped without CUDA): Unsloth and 4-bit bitsandbytes paths."""
import contextlib
import copy
import importlib.util

import pytest
import torch

from conftest import (packable_examples, packed_and_single_batches,
                      packed_and_weighted_loss, requires_cuda, two_pair_batch)

pytestmark = [pytest.mark.gpu, requires_cuda]

needs_unsloth = pytest.mark.skipif(importlib.util.find_spec("unsloth") is None, reason="unsloth not installed")


@needs_unsloth
def test_unsloth_backend_trains_generates_and_keeps_checkpointing(tiny_model_path):
    from bengali_empathy.generation.decoding import Decoding
    from bengali_empathy.training.module import EmpathyLM

    lm = EmpathyLM(model_name_or_path=str(tiny_model_path), backend="unsloth", max_seq_length=1024,
                   decoding=Decoding(max_new_tokens=4))
    lm.configure_model()
    assert lm.backend.name == "unsloth" and lm.backend.quantized
    assert lm.param_counts[0] == 14336  # LoRA r=16 on q,k,v,o of the tiny model
    batch = two_pair_batch(lm.tokenizer, "cuda")
    lm.backend.for_training(lm.model)
    assert lm.backend.checkpointing_as_planned(lm.model)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, n = lm(batch)
    assert torch.isfinite(loss) and 10 < float(loss) < 14 and int(n) > 10
    loss.backward()
    grads = [p.grad for p in lm.model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and any(float(g.abs().sum()) > 0 for g in grads)
    # generate() runs Unsloth's for_inference, which clears the checkpointing flags ...
    lm.model.train()
    prompts = [r.prompt_ids for r in batch["eval_rows"]]
    out, stats = lm.generate_texts(prompts, progress=False)
    assert len(out) == 2 and stats.new_tokens > 0
    with lm.backend.adapter_disabled(lm.model):  # the base model, for compare_base
        assert len(lm.generate_texts(prompts, progress=False)[0]) == 2
    # ... and generate_texts() re-arms them
    assert lm.backend.checkpointing_as_planned(lm.model)
    from bengali_empathy.models.gradient_checkpointing import decoder_layers

    lm.backend.checkpointed_layers = 1  # a memory plan's split is re-armed the same way
    lm.backend.for_training(lm.model)
    lm.generate_texts(prompts, progress=False)
    assert [bool(layer.gradient_checkpointing) for layer in decoder_layers(lm.model)] == [True, False]
    assert lm.backend.checkpointing_as_planned(lm.model)


def test_hf_backend_loads_4bit_nf4(tiny_model_path):
    pytest.importorskip("bitsandbytes")
    from bengali_empathy.training.module import EmpathyLM

    lm = EmpathyLM(model_name_or_path=str(tiny_model_path), backend="hf", max_seq_length=1024)
    lm.configure_model()
    assert lm.backend.quantized
    import bitsandbytes as bnb

    base = lm.model.get_base_model()
    assert isinstance(base.model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    assert base.model.layers[0].self_attn.q_proj.base_layer.weight.quant_type == "nf4"
    lm.backend.for_training(lm.model)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, _ = lm(two_pair_batch(lm.tokenizer, "cuda"))
    assert torch.isfinite(loss)
    loss.backward()


@needs_unsloth
def test_fit_under_lightning_keeps_unsloth_checkpointing(tmp_path):
    from bengali_empathy.apps.benchmark import main as bench

    out = tmp_path / "b.jsonl"
    assert bench(["--arch", "tiny", "--backend", "unsloth", "--loop", "lightning", "--seq-len", "512",
                  "--steps", "3", "--warmup", "1", "--json", str(out)]) == 0
    import json

    r = json.loads(out.read_text().splitlines()[-1])
    assert r["checkpointing_as_planned"] is True
    assert r["tokens_per_sec"] > 0


def _on_cuda(batch: dict) -> dict:
    return {k: v.to("cuda") if torch.is_tensor(v) else v for k, v in batch.items()}


def _packed_against_single_losses(lm) -> tuple:
    """The packed batch's loss and count, and the per-conversation losses' weighted mean and count (bf16)."""
    tok = lm.tokenizer
    packed, singles = packed_and_single_batches(tok, packable_examples(tok))
    lm.backend.for_inference(lm.model)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        return packed_and_weighted_loss(lm.backend, lm.model, _on_cuda(packed), [_on_cuda(b) for b in singles])


@needs_unsloth
def test_unsloth_packed_multi_turn_loss_equals_per_conversation_loss(tiny_model_path, monkeypatch):
    from unsloth.utils import attention_dispatch

    from bengali_empathy.models import varlen
    from bengali_empathy.training.module import EmpathyLM

    lm = EmpathyLM(model_name_or_path=str(tiny_model_path), backend="unsloth", max_seq_length=1024)
    lm.configure_model()
    calls = []
    if varlen.varlen_available(torch.device("cuda")):  # Unsloth's packed batches then attend through a varlen kernel
        forward = type(lm.model.get_base_model().model.layers[0].self_attn).forward
        # Llama: through varlen_attention, with the segments of UNSLOTH_SEGMENTS
        assert lm.backend.segments, (forward, lm.backend.varlen, getattr(forward, "__code__", None).co_names)
        kernel = varlen.flash_varlen
        monkeypatch.setattr(varlen, "flash_varlen", lambda *a, **k: calls.append(1) or kernel(*a, **k))
        monkeypatch.setattr(attention_dispatch, "_TORCH_VARLEN_ATTN", None)  # not Unsloth's packed path
        assert lm.backend.packed_attention(lm.model) == varlen.VARLEN_KERNEL
    packed, n_p, weighted, n = _packed_against_single_losses(lm)
    assert int(n_p) == n
    assert float(packed) == pytest.approx(weighted, rel=2e-2)
    if varlen.varlen_available(torch.device("cuda")):
        assert len(calls) == lm.model.config.num_hidden_layers  # the packed batch, and only it, once per layer


@needs_unsloth
def test_unsloth_packed_training_step_runs_the_compiled_layers_and_equals_per_conversation_steps(tiny_model_path):
    """Train mode, where Unsloth compiles each layer (torch >= 2.11): the packed batch's loss and LoRA
    gradients equal the sum of the per-conversation ones, and no layer fell back to its eager forward."""
    from bengali_empathy.models.lora import base_model
    from bengali_empathy.training.module import EmpathyLM

    lm = EmpathyLM(model_name_or_path=str(tiny_model_path), backend="unsloth", max_seq_length=1024)
    lm.configure_model()
    if not lm.backend.segments:
        pytest.skip("no varlen kernel here: packed batches take Unsloth's packed_seq_lengths path")
    packed, singles = packed_and_single_batches(lm.tokenizer, packable_examples(lm.tokenizer))
    lm.backend.for_training(lm.model)
    lora = [p for p in lm.model.parameters() if p.requires_grad]

    def summed_loss_and_grads(batches: list) -> tuple:
        for p in lora:
            p.grad = None
        total = 0.0
        with torch.autocast("cuda", dtype=torch.bfloat16):
            for batch in batches:
                loss, n = lm.backend.loss(lm.model, _on_cuda(batch))
                (loss * n).backward()
                total += float(loss) * int(n)
        return total, torch.cat([p.grad.float().flatten() for p in lora])

    packed_sum, packed_grads = summed_loss_and_grads([packed])
    layers = base_model(lm.model).model.layers
    if getattr(type(layers[0]).forward, "_unsloth_block_compiled", False):  # Unsloth compiles each layer
        # Unsloth marks a layer (bit 2) once its compiled region ran with gradients; mode 0: eager fallback
        ran = [(layer.__dict__.get("_unsloth_block_checked", 0), layer.__dict__.get("_unsloth_block_mode"))
               for layer in layers]
        assert all(checked & 2 and mode for checked, mode in ran), ran
    single_sum, single_grads = summed_loss_and_grads(singles)
    assert packed_sum == pytest.approx(single_sum, rel=2e-2)
    assert float(packed_grads.norm()) > 0
    assert float((packed_grads - single_grads).norm()) < 0.05 * float(single_grads.norm())


def test_hf_packed_loss_through_torch_varlen_equals_per_conversation_loss(tiny_model_path, monkeypatch):
    from bengali_empathy.models import varlen
    from bengali_empathy.training.module import EmpathyLM

    if not varlen.varlen_available(torch.device("cuda")):
        pytest.skip("torch has no varlen attention kernel for this GPU")
    lm = EmpathyLM(model_name_or_path=str(tiny_model_path), backend="hf", max_seq_length=1024)
    lm.configure_model()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert lm.backend.packed_attention(lm.model) == varlen.VARLEN_KERNEL
    calls = []
    kernel = varlen.flash_varlen
    monkeypatch.setattr(varlen, "flash_varlen", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    packed, n_p, weighted, n = _packed_against_single_losses(lm)
    assert len(calls) == lm.model.config.num_hidden_layers  # the packed batch, and only it, through the kernel
    assert int(n_p) == n
    assert float(packed) == pytest.approx(weighted, rel=2e-2)


def test_fused_kernels_compute_llama_layers_as_close_to_fp32_as_the_eager_bf16_modules_and_are_swapped_back(
        monkeypatch):
    """Liger's kernels (models/fused.py) in two bf16 Llama layers of Llama-3.1-8B's widths, as a prefill (1,500
    tokens in two rows) and as a decoding step (256 rows of one token, each at its own position): the hidden states
    are as close to an fp32 computation as the eager bf16 modules' are; after the context the eager modules and
    rotary function are back."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama import modeling_llama as llama

    from bengali_empathy.models import fused as fused_module
    from bengali_empathy.models.fused import fused_kernels, fuses

    config = LlamaConfig(vocab_size=1000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=2,
                         num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                         attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device("cuda"):
        exact_model = LlamaForCausalLM(config).eval()
    model = copy.deepcopy(exact_model).to(torch.bfloat16)
    if not fuses(model):
        pytest.skip("liger-kernel is not installed or its kernels do not run on this GPU")
    calls = {}
    for name in ("rms_norm", "rotary", "silu_mul"):
        kernel = getattr(fused_module, name)
        monkeypatch.setattr(fused_module, name, lambda *a, _k=kernel, _n=name: calls.update({_n: calls.get(_n, 0) + 1})
                            or _k(*a))
    rotary = llama.apply_rotary_pos_emb
    prefill = {"input_ids": torch.randint(0, 1000, (2, 750), device="cuda")}
    step = {"input_ids": torch.randint(0, 1000, (256, 1), device="cuda"),  # each row at its own position
            "position_ids": torch.randint(0, 700, (256, 1), device="cuda")}
    for inputs in (prefill, step):
        with torch.no_grad():
            exact = exact_model.model(**inputs).last_hidden_state
            eager = model.model(**inputs).last_hidden_state.float()
            with fused_kernels(model) as fused_on, fused_kernels(model) as nested_on:
                assert fused_on and nested_on and llama.apply_rotary_pos_emb is not rotary
                fused = model.model(**inputs).last_hidden_state.float()
        fused_err, eager_err = (float((x - exact).abs().max()) for x in (fused, eager))
        assert fused_err <= 2 * eager_err, (inputs["input_ids"].shape, fused_err, eager_err)
    # per forward: two norms a layer and the final one, one rotary and one MLP a layer
    assert calls == {"rms_norm": 2 * 5, "rotary": 2 * 2, "silu_mul": 2 * 2}
    assert llama.apply_rotary_pos_emb is rotary
    assert not any("forward" in vars(m) for m in model.modules())


def test_varlen_attention_matches_sdpa_with_a_block_diagonal_mask_forward_and_backward():
    """Llama-3.1-8B's heads (32 query, 8 K/V, dim 128), 4,096 tokens in 9 conversations of different lengths,
    bf16: the varlen kernel's output and gradients are as close to an fp32 computation as SDPA's with the
    block-diagonal causal mask (K/V heads repeated) are."""
    import torch.nn.functional as F

    from bengali_empathy.models.varlen import CAUSAL, flash_varlen, varlen_available

    if not varlen_available(torch.device("cuda")):
        pytest.skip("torch has no varlen attention kernel for this GPU")
    lengths = [700, 512, 901, 64, 333, 1024, 200, 150, 212]
    total, heads, kv_heads, dim = sum(lengths), 32, 8, 128
    g = torch.Generator(device="cuda").manual_seed(0)
    q32, k32, v32 = (torch.randn(total, h, dim, device="cuda", generator=g) for h in (heads, kv_heads, kv_heads))
    grad_out = torch.randn(total, heads, dim, device="cuda", generator=g)
    segment = torch.repeat_interleave(torch.arange(len(lengths), device="cuda"), torch.tensor(lengths, device="cuda"))
    pos = torch.arange(total, device="cuda")
    mask = (segment[:, None] == segment[None, :]) & (pos[:, None] >= pos[None, :])
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), device="cuda", dtype=torch.int32)

    def sdpa(q, k, v):
        k, v = (x.repeat_interleave(heads // kv_heads, dim=1) for x in (k, v))
        out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask)
        return out.transpose(0, 1)

    def kernel(q, k, v):
        return flash_varlen(q, k, v, cu, cu, max(lengths), max(lengths), window_size=CAUSAL, enable_gqa=True)

    def run(fn, dtype):
        inputs = [x.detach().to(dtype).requires_grad_() for x in (q32, k32, v32)]
        out = fn(*inputs)
        out.backward(grad_out.to(dtype))
        return [t.float() for t in (out, *(x.grad for x in inputs))]

    exact = run(sdpa, torch.float32)
    for name, ref, mask_bf16, varlen_bf16 in zip(("out", "dq", "dk", "dv"), exact, run(sdpa, torch.bfloat16),
                                                 run(kernel, torch.bfloat16)):
        varlen_err, mask_err = (float((x - ref).abs().max()) for x in (varlen_bf16, mask_bf16))
        assert varlen_err <= 2 * mask_err + 1e-3, (name, varlen_err, mask_err)


def test_direct_flash_kernel_equals_torch_varlen_attn_with_repeated_kv_heads():
    """The flash kernels called directly on grouped K/V heads compute what ``varlen_attn`` computes on
    K/V heads repeated to the query's: the same output, and gradients equal up to the order of the
    group sums (8B heads, bf16, 3,000 tokens in 5 conversations)."""
    from torch.nn.attention.varlen import varlen_attn

    from bengali_empathy.models.varlen import CAUSAL, flash_varlen, varlen_available

    if not varlen_available(torch.device("cuda")):
        pytest.skip("torch has no varlen attention kernel for this GPU")
    lengths, heads, kv_heads, dim = [1000, 37, 800, 663, 500], 32, 8, 128
    g = torch.Generator(device="cuda").manual_seed(1)
    inputs = [torch.randn(sum(lengths), h, dim, device="cuda", generator=g, dtype=torch.bfloat16)
              for h in (heads, kv_heads, kv_heads)]
    grad_out = torch.randn(sum(lengths), heads, dim, device="cuda", generator=g, dtype=torch.bfloat16)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), device="cuda", dtype=torch.int32)

    def run(fn):
        q, k, v = (x.detach().clone().requires_grad_() for x in inputs)
        out = fn(q, k, v)
        out.backward(grad_out)
        return out, q.grad, k.grad, v.grad

    def repeated(q, k, v):
        k, v = (x.repeat_interleave(heads // kv_heads, dim=1) for x in (k, v))
        return varlen_attn(q, k, v, cu, cu, max(lengths), max(lengths), window_size=CAUSAL)

    direct = run(lambda q, k, v: flash_varlen(q, k, v, cu, cu, max(lengths), max(lengths), enable_gqa=True))
    reference = run(repeated)
    assert torch.equal(direct[0], reference[0])
    for name, a, b in zip(("dq", "dk", "dv"), direct[1:], reference[1:]):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2, msg=name)


def test_varlen_decoding_step_reads_only_each_rows_filled_slots_of_a_token_major_cache():
    """One decoding step of 64 rows with 8B heads (bf16) over a token-major static cache of 1,024 slots whose
    rows hold 1 to 1,000 tokens from different first slots, the rest garbage: equal to SDPA over each row's
    filled slots in fp32, within SDPA-bf16's own error."""
    import torch.nn.functional as F
    from transformers import LlamaConfig, StaticCache

    from bengali_empathy.models.varlen import token_major, varlen_attention, varlen_available

    if not varlen_available(torch.device("cuda"), torch.bfloat16, decoding=True):
        pytest.skip("torch has no varlen attention kernel for this GPU")
    rows, heads, kv_heads, dim, slots = 64, 32, 8, 128, 1024
    config = LlamaConfig(num_hidden_layers=1, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         hidden_size=heads * dim)
    cache = StaticCache(config=config, max_cache_len=slots)
    cache.early_initialization(rows, kv_heads, dim, torch.bfloat16, torch.device("cuda"))
    token_major(cache)
    layer = cache.layers[0]
    g = torch.Generator(device="cuda").manual_seed(2)
    layer.keys.copy_(torch.randn(layer.keys.shape, device="cuda", generator=g) * 4)  # garbage where unread
    layer.values.copy_(torch.randn(layer.values.shape, device="cuda", generator=g))
    first = torch.randint(0, 24, (rows,), device="cuda", generator=g, dtype=torch.int32)
    used = torch.randint(1, 1000, (rows,), device="cuda", generator=g, dtype=torch.int32)
    cu_k = torch.arange(rows + 1, device="cuda", dtype=torch.int32) * slots
    cu_k[:-1] += first
    query = torch.randn(rows, heads, 1, dim, device="cuda", generator=g, dtype=torch.bfloat16)
    out, _ = varlen_attention(None, query, layer.keys, layer.values, None, scaling=dim ** -0.5,
                              cu_seq_lens_q=torch.arange(rows + 1, device="cuda", dtype=torch.int32),
                              cu_seq_lens_k=cu_k, max_length_q=1, max_length_k=slots, seqused_k=used)
    for row in range(rows):
        a, n = int(first[row]), int(used[row])
        k, v = (x[row, :, a:a + n].repeat_interleave(heads // kv_heads, 0) for x in (layer.keys, layer.values))
        exact = F.scaled_dot_product_attention(query[row].float(), k.float(), v.float())
        in_bf16 = F.scaled_dot_product_attention(query[row], k, v).float()
        err, sdpa_err = (float((x - exact).abs().max()) for x in (out[row].transpose(0, 1).float(), in_bf16))
        assert err <= 2 * sdpa_err + 1e-3, (row, err, sdpa_err)


MID_ARCH = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=12, num_attention_heads=16,
                num_key_value_heads=8)


@pytest.fixture(scope="module")
def mid_model_path(tmp_path_factory):
    """A 12-layer Llama-3.1-style model (~0.9B parameters, bf16): big enough for a memory split to matter."""
    from bengali_empathy.models.modeling import write_random_model

    path = write_random_model(tmp_path_factory.mktemp("mid") / "llama-mid", MID_ARCH, dtype="bfloat16",
                              device="cuda")
    torch.cuda.empty_cache()
    return path


@pytest.mark.parametrize("backend", [pytest.param("unsloth", marks=needs_unsloth), "hf"])
def test_memory_budget_buys_layers_without_recompute_and_is_kept(mid_model_path, backend):
    import gc

    from bengali_empathy.errors import UserError
    from bengali_empathy.generation.decoding import Decoding
    from bengali_empathy.models.gradient_checkpointing import decoder_layers
    from bengali_empathy.models.memory import GIB, MemorySettings, plan_training_memory, probe_batch
    from bengali_empathy.training.module import EmpathyLM

    if backend == "hf":
        pytest.importorskip("bitsandbytes")
    lm = EmpathyLM(model_name_or_path=str(mid_model_path), backend=backend, max_seq_length=2048,
                   decoding=Decoding(max_new_tokens=2), memory=MemorySettings(budget_gib=1000.0))
    lm.configure_model()
    roomy = plan_training_memory(lm.model, lm.backend, lm.memory.budget_gib, 2, 2048)
    assert roomy.checkpointed_layers == 0 and roomy.layers == 12  # everything fits: no recompute at all
    all_unflagged = roomy.probe_peak_gib  # measured with no layer checkpointed
    opt = lm.configure_optimizers()["optimizer"]
    batch = probe_batch(2, 2048, torch.device("cuda"))
    chosen = []
    # Shares far apart: the hf backend's peak (its fp32 logits of 2 x 2048 tokens take GiBs) grows in steps of the
    # allocator's segments, not per layer; at shares 0.3 and 0.7 it kept 10 and then 11 layers checkpointed
    for share in (0.3, 0.9):
        budget = roomy.minimum_gib + share * (all_unflagged - roomy.minimum_gib)
        plan = plan_training_memory(lm.model, lm.backend, budget, 2, 2048)
        lm.generate_texts([[128000, 9906]], progress=False)  # generation clears Unsloth's flags ...
        # ... and the planned split comes back, not every layer
        assert [bool(x.gradient_checkpointing) for x in decoder_layers(lm.model)] == \
            [True] * plan.checkpointed_layers + [False] * plan.unflagged_layers
        torch.cuda.reset_peak_memory_stats()
        for _ in range(3):  # real steps, optimizer states included
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss, _ = lm(batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        peak = torch.cuda.max_memory_reserved() / GIB
        assert peak <= 1.05 * budget, (budget, peak, plan)
        assert 0 < plan.checkpointed_layers < plan.layers, plan
        chosen.append(plan.checkpointed_layers)
    assert chosen[1] < chosen[0]
    with pytest.raises(UserError, match="with every layer checkpointed"):
        plan_training_memory(lm.model, lm.backend, 0.8 * roomy.minimum_gib, 2, 2048)
    del lm, opt
    gc.collect()
    torch.cuda.empty_cache()


def _random_packed_batch(rows: int, seq_len: int, g: torch.Generator) -> dict:
    """Rows filled with conversations of random lengths (64 to 900 tokens), laid out as the collator lays out
    packed rows."""
    segments, positions = [], []
    for _ in range(rows):
        left = seq_len
        while left:
            n = min(left, int(torch.randint(64, 901, (1,), generator=g)))
            segments.append(n)
            positions.append(torch.arange(n))
            left -= n
    ids = torch.randint(0, 128000, (rows, seq_len), generator=g)
    pos = torch.cat(positions).view(rows, seq_len)
    labels = ids.masked_fill(pos == 0, -100)
    return {"input_ids": ids.cuda(), "labels": labels.cuda(), "position_ids": pos.cuda(), "attention_mask": None,
            "packed_seq_lengths": torch.tensor(segments, dtype=torch.int32).cuda()}


@needs_unsloth
def test_a_budget_planned_on_packed_rows_holds_for_packed_corpus_batches(mid_model_path):
    """The memory plan of a packed fit probes packed rows; real packed batches of other conversation lengths,
    four rows flattened into one, then train within the budget (no out-of-memory traceback mid-fit), and a
    budget that the probe's minimum only just fits is one error before training."""
    import gc

    from bengali_empathy.errors import UserError
    from bengali_empathy.generation.decoding import Decoding
    from bengali_empathy.models.memory import GIB, MemorySettings, cap_reserved_memory, plan_training_memory
    from bengali_empathy.training.module import EmpathyLM

    lm = EmpathyLM(model_name_or_path=str(mid_model_path), backend="unsloth", max_seq_length=2048,
                   decoding=Decoding(max_new_tokens=2), memory=MemorySettings(budget_gib=1000.0))
    lm.configure_model()
    roomy = plan_training_memory(lm.model, lm.backend, lm.memory.budget_gib, 4, 2048, packed=True)
    assert roomy.packed and roomy.checkpointed_layers == 0
    with pytest.raises(UserError, match="is below the .* GiB training needs at batch 4 x 2048 tokens"):
        plan_training_memory(lm.model, lm.backend, 1.01 * roomy.minimum_gib, 4, 2048, packed=True)
    budget = roomy.minimum_gib + 0.5 * (roomy.probe_peak_gib - roomy.minimum_gib)
    plan = plan_training_memory(lm.model, lm.backend, budget, 4, 2048, packed=True)
    assert 0 < plan.checkpointed_layers < plan.layers, plan
    opt = lm.configure_optimizers()["optimizer"]
    g = torch.Generator().manual_seed(0)
    cap_reserved_memory(budget, torch.device("cuda"))
    try:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(3):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss, _ = lm(_random_packed_batch(4, 2048, g))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        peak = torch.cuda.max_memory_reserved() / GIB
    finally:
        cap_reserved_memory(None, torch.device("cuda"))
    assert torch.isfinite(loss)
    assert peak <= 1.05 * budget, (budget, peak, plan)
    del lm, opt
    gc.collect()
    torch.cuda.empty_cache()


@pytest.mark.parametrize("load_in_4bit", [False, True], ids=["bf16", "nf4"])
def test_compiled_engine_replays_cuda_graphs_equal_to_the_step_run_directly(tiny_model_path, load_in_4bit,
                                                                           monkeypatch):
    """The recorded graph computes what the step computes when run kernel by kernel, token for token, in
    4-bit too, with rows attending in groups that skip their padding, and Liger's fused kernels where they run.
    Unquantised (bf16 on CUDA), with all rows in one group, decoding through SDPA and PyTorch's elementwise
    kernels, the replies equal the ``static`` engine's (the same prefill, transformers' ``generate`` decoding
    with the same attention and kernels). Not against ``eager``: its prefill may take SDPA's cuDNN kernel, which
    :func:`.decoder.prefill` leaves out; groups of fewer rows, the varlen kernel's decoding steps, or the fused
    kernels in the compiled steps but not in ``generate``'s round and sum differently. Each may flip a near-tie
    of the random model's flat logits (the varlen decoding did so on an H100, the fused kernels on another);
    the peaked-logits test below compares the engines with all of them in place."""
    if load_in_4bit:
        pytest.importorskip("bitsandbytes")
    from bengali_empathy.generation import decoder
    from bengali_empathy.generation.decoding import Decoding
    from bengali_empathy.generation.generator import Generator
    from bengali_empathy.models import fused
    from bengali_empathy.models.memory import MemorySettings
    from bengali_empathy.training.module import EmpathyLM

    # peft asks torchao whether it quantised an unquantised layer, and refuses a torchao older than 0.16
    # (the GPU machine has 0.14): no torchao layers here, so it need not ask
    import peft.tuners.lora.torchao

    monkeypatch.setattr(peft.tuners.lora.torchao, "is_torchao_available", lambda: False)
    lm = EmpathyLM(model_name_or_path=str(tiny_model_path), backend="hf", max_seq_length=1024,
                   memory=MemorySettings(load_in_4bit=load_in_4bit, budget_gib=None, gradient_checkpointing=False))
    lm.configure_model()
    model = lm.model if load_in_4bit else lm.model.to("cuda")
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(1000, 120000, (n,), generator=g).tolist() for n in (300, 7, 41, 1, 90, 260)]

    def replies(engine: str) -> tuple[list[str], object]:
        gen = Generator(model, lm.tokenizer, lm.backend, Decoding(max_new_tokens=24), 4, engine=engine,
                        weights="adapter")
        return gen.generate(prompts, progress=False)

    if not load_in_4bit:  # one attention group (ROW_GROUP rows): the sums split as in transformers' decoding
        with monkeypatch.context() as as_generate_decodes:
            as_generate_decodes.setattr(decoder, "varlen_available", lambda device, dtype, decoding=False: False)
            as_generate_decodes.setattr(fused, "fused_available", lambda device, config: False)
            assert replies("compiled")[0] == replies("static")[0]
    monkeypatch.setattr(decoder, "ROW_GROUP", 2)  # first batch (300, 260 | 90, 41): the second pair from slot 208
    monkeypatch.setattr(decoder, "GROUP_SLOT", 8)
    graphed, stats = replies("compiled")
    assert stats.capture_seconds > 0 and stats.decode_steps > 0 and stats.new_tokens > 0
    unrecorded = decoder.DecodeStep.__init__

    def kernel_by_kernel(self, *args):
        unrecorded(self, *args)
        self.graphed = False

    monkeypatch.setattr(decoder.DecodeStep, "__init__", kernel_by_kernel)
    direct, direct_stats = replies("compiled")
    assert direct_stats.capture_seconds == 0
    assert graphed == direct


def test_chat_on_the_compiled_engine_replays_graphs_and_streams_the_static_engines_reply(tiny_model_path,
                                                                                          monkeypatch):
    """Chat decodes in a worker thread: the graphs recorded there give the static engine's reply (bf16, both
    decoding through SDPA and PyTorch's elementwise kernels: the varlen or fused kernels' sums may flip a
    near-tie of the random model), and the next reply of the same cache bucket replays them without recording."""
    from bengali_empathy.models import fused
    from bengali_empathy.models.backends import HFPeftBackend, LoraSettings
    from bengali_empathy.generation import decoder
    from bengali_empathy.generation.chat import Replier
    from bengali_empathy.data import DEFAULT_SYSTEM_PROMPT
    from bengali_empathy.generation.decoding import Decoding
    import peft.tuners.lora.torchao

    monkeypatch.setattr(peft.tuners.lora.torchao, "is_torchao_available", lambda: False)  # as above
    monkeypatch.setattr(decoder, "varlen_available", lambda device, dtype, decoding=False: False)
    monkeypatch.setattr(fused, "fused_available", lambda device, config: False)
    backend = HFPeftBackend(load_in_4bit=False, gradient_checkpointing=False)
    model, tok = backend.load(tiny_model_path, 768, LoraSettings(), None)
    model = model.to("cuda").eval()
    turns = [{"role": "user", "content": "আজ খুব ভয় লাগছে, কী করব?"}]
    replies = {}
    for engine in ("static", "compiled"):
        replier = Replier(model, tok, backend, DEFAULT_SYSTEM_PROMPT, 768, Decoding(max_new_tokens=16), engine=engine)
        replies[engine] = replier.reply(turns).text
    step = replier._engines[False].decoder.step
    recorded = step.capture_seconds
    assert recorded > 0 and replier.reply(turns).text == replies["compiled"] == replies["static"]
    assert replier._engines[False].decoder.step is step and step.capture_seconds == recorded


def test_bf16_compiled_replies_of_a_model_with_peaked_logits_equal_the_eager_engines(tokenizer):
    """In bf16 the engines' kernels round differently, so a near-tie of flat logits may flip (a random
    model's replies part within a few tokens). A model trained until it recites its replies has peaked
    logits: there the compiled engine (sliced prefill, grouped decoding attention, rows in groups, CUDA
    graphs) must give the ``eager`` engine's replies, to the first 32 tokens, on at least 90% of rows.

    The replies are drawn from 40 words and every prompt ends with the same assistant header, so a row's
    next token is not its last token's: the model must attend to its prompt and the reply so far."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from bengali_empathy.generation.decoding import Decoding
    from bengali_empathy.generation.engines import grouped_decode_attention
    from bengali_empathy.generation.generator import generate_replies
    from bengali_empathy.data.tokenizer import stop_token_ids

    torch.manual_seed(0)
    header = tokenizer.encode("<|start_header_id|>assistant<|end_header_id|>\n\n", add_special_tokens=False)
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048,
                         rope_theta=500000.0, tie_word_embeddings=False, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).cuda()
    g = torch.Generator().manual_seed(1)
    words = torch.randint(1000, 120000, (40,), generator=g)
    prompts = [torch.randint(1000, 120000, (n,), generator=g).tolist() + header
               for n in torch.randint(5, 700, (64,), generator=g).tolist()]
    recited = [words[torch.randint(0, 40, (32,), generator=g)].tolist() for _ in prompts]
    rows = [p + r + [eot] for p, r in zip(prompts, recited)]
    ids = torch.full((len(rows), max(map(len, rows))), tokenizer.pad_token_id)
    labels = torch.full_like(ids, -100)
    for i, (row, prompt) in enumerate(zip(rows, prompts)):
        ids[i, :len(row)] = torch.tensor(row)
        labels[i, len(prompt):len(row)] = ids[i, len(prompt):len(row)]
    ids, labels = ids.cuda(), labels.cuda()
    target = labels[:, 1:] != -100
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(600):  # right padding after the rows: causal attention never sees it
        hidden = model.model(input_ids=ids).last_hidden_state[:, :-1][target]
        loss = torch.nn.functional.cross_entropy(model.lm_head(hidden).float(), labels[:, 1:][target])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < 0.005:
            break
    assert loss.item() < 0.005, f"the model did not learn its replies (loss {loss.item():.3f})"
    model = model.to(torch.bfloat16).eval()
    for p in model.parameters():
        p.requires_grad_(False)

    def replies(engine: str) -> list[str]:
        attention = grouped_decode_attention(model) if engine != "eager" else contextlib.nullcontext()
        with attention:
            texts, _ = generate_replies(model, tokenizer, prompts, Decoding(max_new_tokens=40), 64,
                                        stop_token_ids(tokenizer), progress=False, engine=engine)
        return texts

    eager, compiled = replies("eager"), replies("compiled")
    wanted = [tokenizer.decode(r).strip() for r in recited]
    learned = sum(e == w for e, w in zip(eager, wanted)) / len(prompts)
    same = sum(c == e for c, e in zip(compiled, eager)) / len(prompts)
    print(f"bf16: eager recites {learned:.0%} of the replies; compiled equals eager on {same:.0%} of {len(prompts)} rows")
    assert learned >= 0.9  # the logits are peaked where the replies are compared
    assert same >= 0.9
