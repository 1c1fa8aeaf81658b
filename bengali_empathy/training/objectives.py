"""What a fit optimises: the objective interface of :class:`~.module.EmpathyLM`, and supervised fine-tuning.

An :class:`Objective` owns a training step's loss and the evaluation passes (a step per batch, then
:meth:`~Objective.finish` at the pass's end, whose :class:`~..evaluation.evaluator.Evaluation` is what
the writer and the registry record). ``sft`` is :class:`SupervisedObjective`; ``dpo`` and ``kto`` are
:class:`~.preference.PreferenceObjective`. Objectives are torch modules: metric states they keep are
children of the LightningModule and follow the model to its device.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Optional

import torch

from ..evaluation.evaluator import Evaluation, EvalHost, Evaluator, Stage


class Objective(torch.nn.Module, ABC):
    """A fit's objective and its evaluation passes (validate / test / predict)."""

    @abstractmethod
    def training_loss(self, host: EvalHost, batch: dict) -> torch.Tensor:
        """The loss of one training batch, with what the objective logs per step."""

    @abstractmethod
    def evaluation_step(self, host: EvalHost, stage: Stage, batch: dict, batch_idx: int, fitting: bool) -> None:
        """Score one batch of an evaluation pass."""

    @abstractmethod
    def finish(self, host: EvalHost, stage: Stage, fitting: bool, world_size: int) -> Evaluation:
        """End the pass: its scores, logged and kept as :attr:`last`."""

    @property
    @abstractmethod
    def last(self) -> Optional[Evaluation]:
        """The latest finished pass."""


class SupervisedObjective(Objective):
    """Supervised fine-tuning: token-weighted cross-entropy on the reply tokens; evaluation passes score the
    reference replies' loss and generate replies (:class:`~..evaluation.evaluator.Evaluator`)."""

    def __init__(self, evaluator: Evaluator) -> None:
        super().__init__()
        self.evaluator = evaluator
        self.losses = evaluator.losses  # a child module: the loss states follow the model's device

    def training_loss(self, host: EvalHost, batch: dict) -> torch.Tensor:
        loss, n = host(batch)
        rows = batch["input_ids"].shape[0]
        host.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=rows)
        host.log("train/reply_tokens", n.float(), on_step=True, on_epoch=False, reduce_fx="sum", batch_size=rows)
        return loss

    def evaluation_step(self, host: EvalHost, stage: Stage, batch: dict, batch_idx: int, fitting: bool) -> None:
        self.evaluator.step(host, stage, batch, batch_idx, fitting)

    def finish(self, host: EvalHost, stage: Stage, fitting: bool, world_size: int) -> Evaluation:
        return self.evaluator.finish(host, stage, fitting, world_size)

    @property
    def last(self) -> Optional[Evaluation]:
        return self.evaluator.last
