"""The optimizer of a fit: its parameter groups, the optimizer the options name, and the warmup + cosine
learning-rate schedule, as Lightning's ``configure_optimizers`` returns them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch

from ..errors import UserError, check_ranges

Optimizer = Literal["auto", "adamw_8bit", "adamw"]


@dataclass(frozen=True)
class OptimizerSettings:
    """The optimizer and its schedule beside ``model.learning_rate`` (``model.optimization``).

    Args:
        optimizer: ``auto`` (8-bit AdamW on CUDA with bitsandbytes, else AdamW), ``adamw_8bit`` or ``adamw``.
        weight_decay / warmup_ratio / min_lr_ratio: AdamW's weight decay; the cosine schedule's linear warmup
            (a share of the steps) and its floor (a share of the learning rate).
        embedding_learning_rate: the learning rate of ``model.lora.modules_to_save`` (see :mod:`.lora`);
            null: ``model.learning_rate``.
    """

    optimizer: Optimizer = "auto"
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    min_lr_ratio: float = 0.1
    embedding_learning_rate: Optional[float] = None

    def __post_init__(self) -> None:
        check_ranges("model.optimization", self, {
            "weight_decay": (self.weight_decay >= 0, "at least 0"),
            "warmup_ratio": (0 <= self.warmup_ratio < 1, "in [0, 1)"),
            "min_lr_ratio": (0 <= self.min_lr_ratio <= 1, "in [0, 1]"),
            "embedding_learning_rate": (self.embedding_learning_rate is None or self.embedding_learning_rate > 0,
                                        "positive or null (= model.learning_rate)")})


def parameter_groups(model, learning_rate: float, embedding_learning_rate: Optional[float]) -> list:
    """The trainable parameters; with ``embedding_learning_rate``, two named optimizer groups: ``lora`` and
    ``embeddings`` (the ``modules_to_save`` copies, e.g. embed_tokens and lm_head in continued pretraining),
    which Lightning's LearningRateMonitor logs as ``lr/lora`` and ``lr/embeddings``."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if embedding_learning_rate is None:
        return [p for _, p in params]
    full = [p for n, p in params if ".modules_to_save." in n]
    return [{"params": [p for n, p in params if ".modules_to_save." not in n], "lr": learning_rate, "name": "lora"},
            {"params": full, "lr": embedding_learning_rate, "name": "embeddings"}]


def make_optimization(model, learning_rate: float, settings: OptimizerSettings,
                      total_steps: int) -> tuple[dict, str]:
    """Lightning's optimizer dict (the optimizer, its parameter groups, the warmup + cosine schedule stepped per
    step) for the module's ``learning_rate`` and optimization ``settings``, and the optimizer's resolved name."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    params = parameter_groups(model, learning_rate, settings.embedding_learning_rate)
    opt, name = make_optimizer(params, settings.optimizer, learning_rate, settings.weight_decay)
    sched = get_cosine_with_min_lr_schedule_with_warmup(opt, int(settings.warmup_ratio * total_steps), total_steps,
                                                        min_lr_rate=settings.min_lr_ratio)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "name": "lr"}}, name


def make_optimizer(params: list, name: Optimizer, lr: float, weight_decay: float) -> tuple[torch.optim.Optimizer, str]:
    """The optimizer ``name`` asks for (``auto``: 8-bit AdamW on CUDA with bitsandbytes, else AdamW) and its
    resolved name."""
    first = params[0]["params"][0] if params and isinstance(params[0], dict) else next(iter(params), None)
    on_cuda = first is not None and first.is_cuda
    if name == "auto":
        from ..models.backends import bitsandbytes_available

        name = "adamw_8bit" if on_cuda and bitsandbytes_available() else "adamw"
    if name == "adamw_8bit":
        if not on_cuda:
            raise UserError("optimizer 'adamw_8bit' needs a CUDA GPU (bitsandbytes); use 'adamw'")
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay), name
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=on_cuda or None), name
