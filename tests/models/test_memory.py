import json

import pytest
import torch

from bengali_empathy.generation.decoding import Decoding
from bengali_empathy.models.memory import MemorySettings, weights_gib
from bengali_empathy.training.module import EmpathyLM, GenerationSettings


def test_weights_floor_counts_the_parameters_of_the_checkpoint(tiny_model_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_path))
    n = sum(p.numel() for p in model.parameters())
    assert weights_gib(tiny_model_path, quantized=False) * 2**30 == pytest.approx(2 * n)
    linear = sum(p.numel() for name, p in model.named_parameters() if name.endswith("proj.weight"))
    quantized = weights_gib(tiny_model_path, quantized=True) * 2**30
    assert quantized == pytest.approx(2 * (n - linear) + linear * (0.5 + 0.13 / 8))


def test_llama31_8b_nf4_weights_floor(tmp_path):
    from bengali_empathy.models.modeling import llama31_config, LLAMA31_8B_ARCH

    (tmp_path / "config.json").write_text(json.dumps(llama31_config(LLAMA31_8B_ARCH).to_dict()))
    # 8.03B parameters, of which 6.98B in the decoder's linear layers: ~5.4 GiB in NF4, ~15 GiB in bf16
    assert 5.2 < weights_gib(tmp_path, quantized=True) < 5.6
    assert 14.9 < weights_gib(tmp_path, quantized=False) < 15.0


class FakeCard:
    """A model of 32 decoder layers whose training step's peak (GiB) follows the flags as measured on the
    H200 for Llama-3.1-8B: with every layer checkpointed the peak is a layer's recompute (0.5 GiB over
    the weights), which the first unflagged layers' activations (0.41 GiB each) only replace."""

    def __init__(self, layers=32, weights=6.0, recompute=0.5, per_layer=0.41, card=140.0):
        from transformers.modeling_layers import GradientCheckpointingLayer

        self.model = torch.nn.ModuleList([GradientCheckpointingLayer() for _ in range(layers)])
        self.weights, self.recompute, self.per_layer, self.card = weights, recompute, per_layer, card
        self.steps = []
        self.reserved = 0.0

    def arm(self):
        for layer in self.model:
            layer.gradient_checkpointing = True

    def peak(self, unflagged):
        return self.weights + max(self.recompute, 0.1 + unflagged * self.per_layer)

    def step(self):
        unflagged = sum(not layer.gradient_checkpointing for layer in self.model)
        self.steps.append(unflagged)
        if self.peak(unflagged) > self.card:
            raise torch.OutOfMemoryError("CUDA out of memory")
        self.reserved = self.peak(unflagged)


@pytest.fixture
def card(monkeypatch):
    fake = FakeCard()
    for name in ("synchronize", "empty_cache", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda *a: fake.reserved * 2**30)
    return fake


def _plan(card, budget):
    from bengali_empathy.models.memory import plan_checkpointing

    return plan_checkpointing(card.model, card.arm, card.step, budget, 2, 2048, torch.device("cpu"),
                              report=lambda _: None)


def test_plan_finds_the_most_unflagged_layers_that_fit_by_measuring(card):
    from bengali_empathy.models.gradient_checkpointing import checkpointed_layer_count
    from bengali_empathy.models.memory import PLAN_SHARE

    plan = _plan(card, 14.0)
    # 6.0 + 0.1 + 0.41 u <= 0.96 * 14  ->  u = 17 layers without recompute
    expected = max(u for u in range(33) if card.peak(u) <= PLAN_SHARE * 14.0)
    assert plan.unflagged_layers == expected == 17 and plan.checkpointed_layers == 15
    assert plan.minimum_gib == 6.5 and plan.probe_peak_gib == pytest.approx(card.peak(17), abs=0.01)
    assert len(card.steps) <= 2 + 6  # warm-up, minimum, a bisection over 0..32
    assert checkpointed_layer_count(card.model) == 15  # left armed with the split
    assert [bool(x.gradient_checkpointing) for x in card.model] == [True] * 15 + [False] * 17
    assert _plan(card, 120.0).checkpointed_layers == 0
    assert _plan(card, 6.78).checkpointed_layers == 32  # just the minimum over the planning share: all recompute


def test_plan_counts_a_probe_the_card_cannot_hold_as_over_budget(card):
    card.card = 16.0  # a 16 GB card asked for more than it has
    plan = _plan(card, 100.0)
    assert plan.unflagged_layers == max(u for u in range(33) if card.peak(u) <= 16.0) == 24


def test_budget_below_the_minimum_is_one_error_naming_it(card):
    from bengali_empathy.errors import UserError

    with pytest.raises(UserError, match=r"model.memory.budget_gib 5.00 is below the 6.77 GiB training needs at batch 2 x "
                                        r"2048 tokens with every layer checkpointed \(the probe peaked at 6.50 GiB; a plan "
                                        r"keeps 4% of the budget for the optimizer and other batch shapes\); give at "
                                        r"least 6.8"):
        _plan(card, 5.0)
    # A budget the minimum only just fits leaves nothing for the optimizer's state: a 7.7 GiB budget over a
    # 7.69 GiB probe ran out of memory in the first training step on an H100.
    with pytest.raises(UserError, match=r"budget_gib 6.60 is below the 6.77 GiB"):
        _plan(card, 6.6)


def test_a_card_that_cannot_hold_even_the_minimum_is_one_error_without_a_number(card):
    from bengali_empathy.errors import UserError

    card.card = 6.0  # weights fit, one layer's recompute does not
    with pytest.raises(UserError, match=r"^training at batch 2 x 2048 tokens runs out of GPU memory even with every "
                                        r"layer checkpointed; give a smaller batch or max_seq_length$"):
        _plan(card, 100.0)


def test_budget_below_the_weights_is_refused_before_loading(monkeypatch, tiny_model_path):
    from bengali_empathy.errors import UserError
    from bengali_empathy.training.module import EmpathyLM

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the budget applies on CUDA only
    floor = weights_gib(tiny_model_path, quantized=True)
    with pytest.raises(UserError, match=f"below the {floor:.2f} GiB the weights of .* alone take in 4 bits"):
        EmpathyLM(model_name_or_path=str(tiny_model_path), backend="hf", memory=MemorySettings(budget_gib=floor / 2))
    lm = EmpathyLM(model_name_or_path=str(tiny_model_path), backend="hf", memory=MemorySettings(budget_gib=floor * 2))
    assert lm.model is None  # nothing loaded yet: the check reads config.json only


def test_packed_probe_batch_is_laid_out_as_the_collator_lays_out_packed_rows():
    from bengali_empathy.models.memory import probe_batch
    from bengali_empathy.models.varlen import cu_seqlens

    batch = probe_batch(2, 2048, packed=True)
    lengths = batch["packed_seq_lengths"].tolist()
    assert batch["attention_mask"] is None and batch["input_ids"].shape == (2, 2048)
    assert sum(lengths) == 2 * 2048 and len(set(lengths)) == 4  # conversations of different lengths, as in a corpus
    assert cu_seqlens(batch["position_ids"])[0].tolist() == [0] + torch.tensor(lengths).cumsum(0).tolist()
    assert (batch["labels"][:, 1:] != -100).all()  # every token but the first trained: the worst case
    assert "packed_seq_lengths" not in probe_batch(2, 2048)


@pytest.mark.parametrize("pack", [False, True])
def test_fit_plans_from_the_datamodule_and_keeps_the_split_through_validation(monkeypatch, tmp_path,
                                                                               tiny_model_path, pack):
    """The glue around the probe, on the CPU: fit asks for a plan at the training batch size and
    max_seq_length, trains every step with its split (re-armed after the sanity validation's generate)
    and records it in run.json. The probe itself is the GPU test's."""
    import json

    import lightning as L

    from bengali_empathy.models import memory
    from bengali_empathy.training import module
    from bengali_empathy.data import EmpatheticDialogueDataModule
    from bengali_empathy.models.gradient_checkpointing import checkpointed_layer_count, limit_checkpointing
    from bengali_empathy.models.memory import CheckpointPlan

    asked = []

    def fake_plan(model, arm, train_step, budget_gib, batch_size, seq_len, device, report, packed):
        asked.append((budget_gib, batch_size, seq_len, packed))
        arm()
        limit_checkpointing(model, 1)
        return CheckpointPlan(budget_gib, 2, 1, 0.1, 0.05, 0.15, batch_size, seq_len, packed)

    monkeypatch.setattr(memory, "resolve_budget_gib", lambda budget, device: budget)
    monkeypatch.setattr(memory, "plan_checkpointing", fake_plan)
    caps = []
    monkeypatch.setattr(module, "cap_reserved_memory", lambda budget, device: caps.append(budget))

    class SplitRecorder(L.Callback):
        def __init__(self):
            self.counts = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.counts.append(checkpointed_layer_count(pl_module.model))
            assert caps == [5.0]  # the allocator is held to the budget while training ...

    recorder = SplitRecorder()
    dm = EmpatheticDialogueDataModule(max_seq_length=768, batch_size=3, pack=pack)
    # The batch size reaches the model as the CLI links it (data.batch_size -> model.train_batch_size).
    lm = EmpathyLM(model_name_or_path=str(tiny_model_path), backend="hf", max_seq_length=768,
                   save_adapter_on_fit_end=False, train_batch_size=3,
                   memory=MemorySettings(load_in_4bit=False, budget_gib=5.0), decoding=Decoding(max_new_tokens=2),
                   generation=GenerationSettings(val_batches=1))
    trainer = L.Trainer(accelerator="cpu", max_steps=3, limit_val_batches=1, val_check_interval=2,
                        num_sanity_val_steps=1, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[recorder], default_root_dir=tmp_path)
    trainer.fit(lm, datamodule=dm)
    assert asked == [(5.0, 3, 768, pack)]  # packed rows are probed as packed rows
    assert recorder.counts == [1, 1, 1]  # after the sanity validation and the one at step 2 alike
    assert caps == [5.0, None]  # ... and let go when the fit ends
    record = json.loads((tmp_path / "lightning_logs" / "version_0" / "run.json").read_text())
    assert record["model"]["memory_budget_gib"] == 5.0
    assert record["model"]["memory_plan"]["checkpointed_layers"] == 1
    assert record["model"]["memory_plan"]["packed"] is pack
