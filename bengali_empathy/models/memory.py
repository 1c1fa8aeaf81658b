"""The GPU memory budget: how many decoder layers recompute their activations in the backward pass.

Checkpointing every layer keeps training memory at its minimum (about 6.5 GiB for
Llama-3.1-8B in NF4 at batch 2 x 2048 tokens) but recomputes every layer's forward
pass; a layer left unflagged keeps its activations instead (about 0.41 GiB at that
shape) and saves the recompute. Given a budget, :func:`plan_checkpointing` measures
a short probe of training steps on the worst-case batch (``batch_size`` rows of
``max_seq_length`` tokens, every token trained):

1. peak memory with every layer checkpointed: the minimum, an error when it is over ``PLAN_SHARE`` of the budget;
2. a bisection on the number of layers left unflagged (the last ones), one measured step
   each (six for 32 layers), for the most whose peak fits ``PLAN_SHARE`` of the budget.
   A probe over what the card holds counts as not fitting.

Peak memory does not grow by a fixed amount per unflagged layer from the start
(with every layer checkpointed, the peak is probably the recompute of one layer in the
backward pass, which the first unflagged layers' activations only replace). On the
H200, the first unflagged layer of a 12-layer model added 0.11 GiB where all 12 added
0.23 GiB each, and on Llama-3.1-8B an extrapolation from one layer chose every layer
checkpointed at a 14 GiB budget. So the split is measured, not extrapolated.

Peak memory is ``torch.cuda.max_memory_reserved``: what the process holds on the card
(nvidia-smi shows about 0.5 GiB more, the CUDA context). For the rest of the fit,
:func:`cap_reserved_memory` holds the allocator to the budget. The layers that keep
checkpointing are the first ones; both backends decide per layer
(transformers' ``GradientCheckpointingLayer.gradient_checkpointing``, which Unsloth's
decoder loop also honours with its offloaded checkpointing).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from contextlib import AbstractContextManager
from types import SimpleNamespace
from typing import Callable, Literal, Optional, Union

import torch

from .gradient_checkpointing import decoder_layers, limit_checkpointing
from .gpu import head_dim
from ..data import IGNORE_INDEX
from ..errors import UserError

MemoryBudget = Union[float, Literal["auto"], None]

GIB = 2**30
# ``auto``: this share of the memory the card has free (plus what this process already holds).
AUTO_SHARE = 0.92
# The split is planned to this share of the budget: batches of other shapes fragment the cache a little,
# and at the cap (cap_reserved_memory) every flush of the cache costs the step a synchronisation.
PLAN_SHARE = 0.96


@dataclass
class CheckpointPlan:
    """The chosen split and the measurements it was chosen from (GiB)."""

    budget_gib: float
    layers: int
    checkpointed_layers: int
    minimum_gib: float
    per_layer_gib: float  # mean over the most unflagged layers measured
    probe_peak_gib: float
    batch_size: int
    seq_len: int
    packed: bool = False  # the probe's rows laid out as packed rows

    @property
    def unflagged_layers(self) -> int:
        return self.layers - self.checkpointed_layers

    def summary(self) -> str:
        return (f"memory budget {self.budget_gib:.1f} GiB: {self.checkpointed_layers} of {self.layers} decoder layers "
                f"checkpointed, {self.unflagged_layers} without recompute; probe peak {self.probe_peak_gib:.2f} GiB "
                f"at batch {self.batch_size} x {self.seq_len} tokens{' packed' if self.packed else ''} "
                f"(all checkpointed {self.minimum_gib:.2f} GiB, "
                f"about +{self.per_layer_gib:.2f} GiB per layer without recompute)")

    def peak_summary(self, peak_gib: float) -> str:
        """The fit's measured peak against this plan's budget."""
        return (f"peak GPU memory {peak_gib:.2f} GiB reserved of the {self.budget_gib:.2f} GiB budget "
                f"({self.checkpointed_layers} of {self.layers} layers checkpointed)")

    def as_dict(self) -> dict:
        """Plain values, for run.json, TensorBoard hparams and the benchmark's JSON."""
        return asdict(self)


PROBE_SEGMENTS = (0.4, 0.3, 0.2, 0.1)  # a packed probe row's conversations, as shares of the row (all different)


def probe_batch(batch_size: int, seq_len: int, device: torch.device | str = "cpu", vocab_size: int = 128000,
                generator: Optional[torch.Generator] = None, packed: bool = False) -> dict:
    """The worst case of a training batch: every row full length (random tokens) and every token trained.

    ``packed``: laid out as the collator lays out packed rows (no mask, positions counted from 0 in each
    conversation, ``packed_seq_lengths``), so the probe takes the packed batches' attention path."""
    g = generator or torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=g)
    labels = ids.clone()
    labels[:, 0] = IGNORE_INDEX
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids),
             "position_ids": torch.arange(seq_len).expand(batch_size, -1).contiguous()}
    if packed:
        cuts = [round(seq_len * share) for share in PROBE_SEGMENTS[:-1]]
        segments = [n for n in cuts + [seq_len - sum(cuts)] if n > 0]
        batch["position_ids"] = torch.cat([torch.arange(n) for n in segments]).expand(batch_size, -1).contiguous()
        batch["packed_seq_lengths"] = torch.tensor(segments * batch_size, dtype=torch.int32)
        batch["attention_mask"] = None
    return {k: None if v is None else v.to(device) for k, v in batch.items()}


def resolve_budget_gib(budget: MemoryBudget, device: torch.device) -> Optional[float]:
    """The budget in GiB (``auto``: most of what the card has free), or None where there is none to apply."""
    if budget is None or device.type != "cuda":
        return None
    if budget == "auto":
        free, _ = torch.cuda.mem_get_info(device)
        return AUTO_SHARE * (free + torch.cuda.memory_reserved(device)) / GIB
    return float(budget)


@dataclass(frozen=True)
class MemorySettings:
    """How training fits the GPU (``model.memory``).

    Args:
        load_in_4bit: 4-bit NF4 base weights (CUDA only; ignored with a warning on CPU).
        gradient_checkpointing: recompute activations in the backward pass (on as many decoder layers as
            ``budget_gib`` requires; false: on none).
        budget_gib: GPU memory that training may take (GiB, peak reserved by this process): before training a
            short probe measures the worst-case batch and leaves as many decoder layers without recompute as
            fit (faster steps). ``auto``: 92% of what the card has free; null: checkpoint every layer (least
            memory). Applies to fit on CUDA.
    """

    load_in_4bit: bool = True
    gradient_checkpointing: bool = True
    budget_gib: MemoryBudget = 14.0

    def __post_init__(self) -> None:
        check_budget_value(self.budget_gib)


def check_budget_value(budget: MemoryBudget) -> None:
    """A number must be positive (``auto`` and None pass): one error line otherwise."""
    if budget is not None and budget != "auto" and not budget > 0:
        raise UserError(f"model.memory.budget_gib must be a positive number of GiB, 'auto' or null, not {budget!r}")


def check_budget(budget: MemoryBudget, model_dir: Optional[Path], quantized: bool, checkpointing: bool) -> None:
    """A budget that is no positive number, or (on CUDA) below what the base weights alone take, is one
    error line before anything loads (the weights' size is read from ``config.json``)."""
    check_budget_value(budget)
    if model_dir is None or not checkpointing or not torch.cuda.is_available() or budget in (None, "auto"):
        return
    floor = weights_gib(model_dir, quantized)
    if budget < floor:
        raise below_minimum(budget, floor, f"the weights of {model_dir.name} alone take" + (" in 4 bits" if quantized
                                                                                           else ""))


def peak_rss_gib() -> float:
    """Peak resident memory of this process (Linux ``ru_maxrss`` is in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def weights_gib(model_dir: Path, quantized: bool) -> float:
    """The base weights' memory from ``config.json`` alone: a floor that needs no GPU.

    NF4 stores the decoder's linear weights in 4 bits (plus ~0.13 bits of double-quantised
    scales); embeddings, head and norms stay in 16 bits."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    h, inter, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    heads = cfg["num_attention_heads"]
    width = head_dim(SimpleNamespace(**cfg))
    kv = cfg.get("num_key_value_heads", heads) * width
    linear = n * (2 * h * heads * width + 2 * h * kv + 3 * h * inter)
    embeddings = cfg["vocab_size"] * h * (1 if cfg.get("tie_word_embeddings") else 2)
    other = embeddings + (2 * n + 1) * h
    linear_bytes = linear * (0.5 + 0.13 / 8) if quantized else linear * 2
    return (linear_bytes + 2 * other) / GIB


def cap_reserved_memory(budget_gib: Optional[float], device: torch.device) -> None:
    """Hold what the caching allocator reserves on ``device`` to ``budget_gib`` (None: lift the cap).

    The probe bounds the training step at its worst-case shape, but batches of other shapes
    fragment the cache and generation's KV cache grows with its batch; at the cap the allocator
    frees its cache and retries before it reports out of memory, and generation halves its batch
    on that report."""
    if device.type != "cuda":
        return
    index = torch.cuda.current_device() if device.index is None else device.index  # the call takes no bare "cuda"
    total = torch.cuda.get_device_properties(index).total_memory
    fraction = 1.0 if budget_gib is None else min(1.0, budget_gib * GIB / total)
    torch.cuda.set_per_process_memory_fraction(fraction, index)


def below_minimum(budget_gib: float, minimum_gib: float, what: str) -> UserError:
    """The one-line error for a budget under ``minimum_gib``, which ``what`` explains."""
    return UserError(f"model.memory.budget_gib {budget_gib:.2f} is below the {minimum_gib:.2f} GiB {what}; "
                     f"give at least {math.ceil(minimum_gib * 10) / 10:.1f}, 'auto', or a smaller batch or "
                     f"max_seq_length")


def plan_checkpointing(model, arm: Callable[[], None], train_step: Callable[[], None], budget_gib: float,
                       batch_size: int, seq_len: int, device: torch.device,
                       report: Callable[[str], None] = print, packed: bool = False) -> CheckpointPlan:
    """Measure the probe steps and return the split to train with (see the module docstring).

    ``arm`` switches checkpointing on for every layer (the backend's ``arm``);
    ``train_step`` runs forward and backward on the worst-case batch and drops the gradients."""
    layers = len(decoder_layers(model))

    def peak(unflagged: int) -> float:
        """Peak reserved GiB of one step with the last ``unflagged`` layers not checkpointed."""
        arm()
        limit_checkpointing(model, layers - unflagged)
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        try:
            train_step()
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            return math.inf
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_reserved(device) / GIB

    peak(0)  # warm-up: kernels compiled and autotuned, workspaces allocated
    measured = {0: peak(0)}
    minimum = measured[0]
    if math.isinf(minimum):
        raise UserError(f"training at batch {batch_size} x {seq_len} tokens runs out of GPU memory even with every "
                        f"layer checkpointed; give a smaller batch or max_seq_length")
    # The minimum must fit the planning share too: a real step adds the optimizer's state and batches of other
    # shapes to the probe's peak, and a probe at 7.69 GiB under a 7.7 GiB budget ran out of memory in training.
    if minimum > PLAN_SHARE * budget_gib:
        raise below_minimum(budget_gib, minimum / PLAN_SHARE,
                            f"training needs at batch {batch_size} x {seq_len} tokens with every layer checkpointed "
                            f"(the probe peaked at {minimum:.2f} GiB; a plan keeps {1 - PLAN_SHARE:.0%} of the budget "
                            f"for the optimizer and other batch shapes)")
    fits, over = 0, layers + 1
    while over - fits > 1:
        mid = (fits + over) // 2
        measured[mid] = peak(mid)
        if measured[mid] <= PLAN_SHARE * budget_gib:
            fits = mid
        else:
            over = mid
    largest = max((u for u, p in measured.items() if math.isfinite(p)), default=0)
    per_layer = (measured[largest] - minimum) / largest if largest else 0.0
    plan = CheckpointPlan(round(budget_gib, 2), layers, layers - fits, round(minimum, 2), round(per_layer, 3),
                          round(measured[fits], 2), batch_size, seq_len, packed)
    arm()
    limit_checkpointing(model, plan.checkpointed_layers)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    report(plan.summary())
    return plan


def plan_training_memory(model, backend, budget: MemoryBudget, batch_size: int, seq_len: int,
                         context: Optional[Callable[[], AbstractContextManager]] = None,
                         report: Callable[[str], None] = print, packed: bool = False) -> Optional[CheckpointPlan]:
    """The checkpointing split of ``model`` for ``budget``, probed at ``batch_size`` x ``seq_len`` through
    ``backend`` (whose split it sets); None where no budget applies (CPU, checkpointing off, budget null).
    ``packed``: the probe's rows are laid out as packed rows, which the backends attend to otherwise.

    ``context`` wraps the probe's forward pass as the training step's precision does (default: bf16
    autocast, as ``bf16-mixed``)."""
    device = next(p.device for p in model.parameters() if p.requires_grad)
    budget_gib = resolve_budget_gib(budget, device)
    if budget_gib is None or not backend.gradient_checkpointing:
        return None
    context = context or (lambda: torch.autocast("cuda", dtype=torch.bfloat16))
    vocab = model.get_input_embeddings().num_embeddings
    batch = probe_batch(batch_size, seq_len, device, vocab_size=min(128000, vocab), packed=packed)
    trainable = [p for p in model.parameters() if p.requires_grad]

    def train_step() -> None:
        try:
            with context():
                loss, _ = backend.loss(model, batch)
            loss.backward()
        finally:
            for p in trainable:
                p.grad = None

    backend.checkpointed_layers = None
    plan = plan_checkpointing(model, lambda: backend.arm(model), train_step, budget_gib, batch_size, seq_len, device,
                              report=report, packed=packed)
    backend.checkpointed_layers = plan.checkpointed_layers
    return plan
