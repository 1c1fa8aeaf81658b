"""Preference objectives: DPO on chosen/rejected pairs, KTO on replies labelled desirable or not.

Both compare the policy's log-probability of a reply with the reference model's, on the same base:

* starting from the base model (no ``model.adapter_path``), the reference is the base itself: the
  policy's adapter (LoRA and ``modules_to_save``) switched off (``disable_adapter``);
* starting from an SFT adapter, the adapter is loaded twice on the one (4-bit) base, as peft
  adapters of one model: ``default`` (trainable, the policy, what is saved) and ``reference``
  (frozen, never saved), so the reference is the policy the run started from without a second
  copy of the base. The reference pass switches the active adapter for one no-grad forward.

At the start the policy equals the reference, every reward is 0 and the DPO loss is log 2: a
loss that stays at 0 means the reference is not the starting policy.

A reward is ``beta * (log pi(reply) - log pi_ref(reply))`` summed over the reply's tokens (the
final reply only). ``reward_accuracy`` counts a tie (equal rewards, as at the start) as half a hit,
so an untrained policy scores 0.5 rather than 0.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.nn.functional as F

from ..models.backends import Backend
from ..data.formats import Objective as ObjectiveName
from ..errors import UserError, check_ranges
from ..evaluation.evaluator import Evaluation
from ..evaluation.metrics import REWARD_NAMES
from .objectives import Objective

REFERENCE_ADAPTER = "reference"


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO's sigmoid loss (Rafailov et al. 2023) from per-pair summed log-probabilities.

    Returns the mean loss and the chosen / rejected rewards per pair (detached)."""
    logits = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    loss = -F.logsigmoid(beta * logits).mean()
    return loss, beta * (policy_chosen - ref_chosen).detach(), beta * (policy_rejected - ref_rejected).detach()


def kto_loss(policy: torch.Tensor, reference: torch.Tensor, desirable: torch.Tensor, beta: float,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """KTO's loss (Ethayarajh et al. 2024) from per-reply summed log-probabilities and labels.

    The reference point ``z`` is the batch's mean policy/reference log-ratio, clamped at 0 and
    detached: an estimate of KL(policy || reference) from the batch's own replies (TRL estimates it
    on mismatched prompt/reply pairs, which would cost a third forward pass). Returns the
    weighted mean loss and the reward of every reply (detached)."""
    ratio = policy - reference
    z = ratio.detach().mean().clamp(min=0)
    value = torch.where(desirable, 1 - torch.sigmoid(beta * (ratio - z)), 1 - torch.sigmoid(beta * (z - ratio)))
    weight = torch.where(desirable, torch.full_like(ratio, desirable_weight), torch.full_like(ratio, undesirable_weight))
    return (weight * value).sum() / weight.sum(), beta * ratio.detach()


def _hits(correct: torch.Tensor, tie: torch.Tensor) -> torch.Tensor:
    return (correct.float() + 0.5 * tie.float()).mean()


def pair_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    """``reward_accuracy`` (ties half), ``reward_margin``, ``chosen_reward``, ``rejected_reward`` of DPO pairs."""
    return {"reward_accuracy": _hits(chosen > rejected, chosen == rejected),
            "reward_margin": (chosen - rejected).mean(), "chosen_reward": chosen.mean(),
            "rejected_reward": rejected.mean()}


def labelled_metrics(rewards: torch.Tensor, desirable: torch.Tensor) -> dict[str, torch.Tensor]:
    """The same names for KTO: accuracy = the reward's sign agrees with the label (0 counts half); the
    chosen / rejected reward is the mean over desirable / undesirable replies, the margin their difference."""
    signed = torch.where(desirable, rewards, -rewards)
    nan = rewards.new_tensor(float("nan"))
    chosen = rewards[desirable].mean() if bool(desirable.any()) else nan
    rejected = rewards[~desirable].mean() if bool((~desirable).any()) else nan
    return {"reward_accuracy": _hits(signed > 0, signed == 0), "reward_margin": chosen - rejected,
            "chosen_reward": chosen, "rejected_reward": rejected}


@dataclass(frozen=True)
class ObjectiveSettings:
    """What training optimises (``model.objective``): ``sft`` (the reply tokens' loss), or ``dpo`` / ``kto`` (a
    :class:`PreferenceObjective` with ``dpo_beta``, the KL weight of either, and the KTO weights)."""

    name: ObjectiveName = "sft"
    dpo_beta: float = 0.1
    kto_desirable_weight: float = 1.0
    kto_undesirable_weight: float = 1.0

    def __post_init__(self) -> None:
        check_ranges("model.objective", self, {"dpo_beta": (self.dpo_beta > 0, "positive"),
                                               "kto_desirable_weight": (self.kto_desirable_weight > 0, "positive"),
                                               "kto_undesirable_weight": (self.kto_undesirable_weight > 0, "positive")})


class PreferenceObjective(Objective):
    """DPO or KTO (:class:`~.objectives.Objective`): policy and reference passes, loss, logged rewards.

    A preference pass logs its loss and rewards batch by batch (Lightning averages them over the pass and
    across ranks) and generates nothing; ``validate`` and ``test`` end with an
    :class:`~.evaluation.Evaluation` of the pass's means (``metrics.json``, the registry row) and no rows.

    Args mirror the module's options: ``objective`` (``dpo`` or ``kto``), ``beta`` (``model.objective.dpo_beta``,
    the KL weight of either objective), the KTO weights and the adapter the run starts from.
    """

    def __init__(self, objective: ObjectiveName, beta: float, desirable_weight: float = 1.0,
                 undesirable_weight: float = 1.0, adapter_path: Optional[str] = None) -> None:
        super().__init__()
        self.objective, self.beta, self.adapter_path = objective, beta, adapter_path
        self.desirable_weight, self.undesirable_weight = desirable_weight, undesirable_weight
        self.reference_adapter: Optional[str] = None
        self._last: Optional[Evaluation] = None
        self._sums: dict[str, list[float]] = {}  # name -> [row-weighted sum, rows] of the pass so far

    def attach_reference(self, model) -> None:
        """Starting from an adapter: load it again, from its directory, frozen, as the reference (see the module
        docstring). Done by the first reference pass, once the model is loaded; a resumed run's restored policy
        weights do not change it."""
        if self.adapter_path and self.reference_adapter is None:
            model.load_adapter(str(self.adapter_path), adapter_name=REFERENCE_ADAPTER, is_trainable=False)
            self.reference_adapter = REFERENCE_ADAPTER

    @contextmanager
    def reference(self, backend: Backend, model) -> Iterator[None]:
        """The model as the reference, without gradients."""
        self.attach_reference(model)
        if self.reference_adapter is None:
            with torch.no_grad(), backend.adapter_disabled(model):
                yield
            return
        policy = model.active_adapter
        model.set_adapter(self.reference_adapter, inference_mode=True)
        try:
            with torch.no_grad():
                yield
        finally:
            model.set_adapter(policy)  # trainable again (peft sets requires_grad on the active adapter)

    def log_probs(self, backend: Backend, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed reply log-probabilities of every row: (policy, reference)."""
        with self.reference(backend, model):
            reference = backend.sequence_logps(model, batch)[0]
        return backend.sequence_logps(model, batch)[0], reference

    def loss(self, backend: Backend, model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The objective's loss on a preference batch and its reward metrics."""
        policy, reference = self.log_probs(backend, model, batch)
        if self.objective == "dpo":
            n = batch["pairs"]  # rows [0, n) are the chosen replies, [n, 2n) the rejected ones
            loss, chosen, rejected = dpo_loss(policy[:n], policy[n:], reference[:n], reference[n:], self.beta)
            return loss, pair_metrics(chosen, rejected)
        desirable = batch["desirable"]
        loss, rewards = kto_loss(policy, reference, desirable, self.beta, self.desirable_weight,
                                 self.undesirable_weight)
        return loss, labelled_metrics(rewards, desirable)

    @property
    def last(self) -> Optional[Evaluation]:
        return self._last

    def training_loss(self, host, batch: dict) -> torch.Tensor:
        return self.step(host, "train", batch)

    def evaluation_step(self, host, stage: str, batch: dict, batch_idx: int, fitting: bool) -> None:
        self.step(host, stage, batch)

    def step(self, host, stage: str, batch: dict) -> torch.Tensor:
        """Loss and rewards of one batch, logged as ``<stage>/loss`` and ``<stage>/reward_*``."""
        if stage == "predict":
            raise UserError(f"predict generates replies to conversations; model.objective.name {self.objective} "
                            "scores preferences: run predict with model.objective.name sft on a dialogue corpus")
        loss, metrics = self.loss(host.backend, host.model, batch)
        rows = int(batch["pairs"]) if self.objective == "dpo" else int(batch["input_ids"].shape[0])
        train = stage == "train"
        host.log(f"{stage}/loss", loss, on_step=train, on_epoch=True, prog_bar=True, batch_size=rows,
                 sync_dist=not train)
        for name, value in {"loss": loss.detach(), **metrics}.items():  # training: per step; evaluation: the pass
            if torch.isnan(value):
                continue
            if name != "loss":
                host.log(f"{stage}/{name}", value, on_step=train, on_epoch=not train, batch_size=rows,
                         prog_bar=name == "reward_accuracy", sync_dist=not train)
            if not train:
                total = self._sums.setdefault(name, [0.0, 0])
                total[0], total[1] = total[0] + float(value) * rows, total[1] + rows
        return loss

    def finish(self, host, stage: str, fitting: bool, world_size: int) -> Evaluation:
        """The pass's row-weighted means as an :class:`~.evaluation.Evaluation` (every rank's rows together)."""
        names = ("loss", *REWARD_NAMES)  # the same order on every rank, a name without rows included
        sums = torch.tensor([self._sums.get(n, [0.0, 0]) for n in names], dtype=torch.float64)
        self._sums = {}
        if world_size > 1:
            import torch.distributed as dist

            sums = sums.to(host.device)
            dist.all_reduce(sums)
        means = {n: s / k for n, (s, k) in zip(names, sums.tolist()) if k}
        self._last = Evaluation(stage, metrics={**means, "n": int(sums[0, 1]), "objective": self.objective,
                                                "beta": self.beta})
        return self._last
