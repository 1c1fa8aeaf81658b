"""The learning-rate schedule: linear warm-up, then cosine decay to the floor (bengali_empathy.training.optimization)."""
import pytest

from bengali_empathy.models.memory import MemorySettings
from bengali_empathy.training.module import EmpathyLM
from bengali_empathy.training.optimization import OptimizerSettings


def test_schedule_warms_up_then_decays_to_the_floor(tiny_model_path):
    from types import SimpleNamespace

    lm = EmpathyLM(model_name_or_path=str(tiny_model_path), backend="hf", learning_rate=1e-3,
                   memory=MemorySettings(load_in_4bit=False),
                   optimization=OptimizerSettings(warmup_ratio=0.1, min_lr_ratio=0.1, optimizer="adamw"))
    lm.configure_model()
    lm.trainer = SimpleNamespace(estimated_stepping_batches=100)
    out = lm.configure_optimizers()
    opt, sched = out["optimizer"], out["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(101):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(0.5e-3) and lrs[10] == pytest.approx(1e-3)
    assert lrs[55] == pytest.approx(1e-4 + 0.9e-3 * 0.5, rel=1e-6)  # half way down the cosine
    assert lrs[100] == pytest.approx(1e-4)  # min_lr_ratio of the peak
    assert lm.param_counts[0] == sum(p.numel() for p in lm.model.parameters() if p.requires_grad)
