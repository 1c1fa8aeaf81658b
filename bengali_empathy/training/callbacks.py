"""Callbacks: training throughput and memory logging, the evaluation writer, the progress bar."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import RichProgressBar

from ..models.gpu import synchronized_time
from ..models.memory import peak_rss_gib
from ..evaluation.metrics import SCORE_NAMES

class TokenThroughput(L.Callback):
    """Logs training tokens/s (non-padding tokens, wall clock, CUDA-synchronised) and memory:
    GPU memory on CUDA, against the memory budget when one applies (``gpu/memory_budget_gib``;
    tokens/s and peak reserved memory also on the progress bar), and the process's peak resident
    memory (``mem/peak_rss_gib``) always.

    (Lightning's own ``ThroughputMonitor`` counts samples and FLOPs; this counts the
    tokens that are not padding, the figure that compares packed and padded batches.)"""

    def __init__(self, window: int = 10) -> None:
        self.window = window
        self._t0: Optional[float] = None
        self._tokens = 0
        self._steps = 0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._t0, self._tokens, self._steps = None, 0, 0

    def on_train_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int) -> None:
        if self._t0 is None:
            self._t0 = synchronized_time(pl_module.device)

    def on_train_batch_end(self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int) -> None:
        mask = batch.get("attention_mask")
        self._tokens += int(mask.sum()) if mask is not None else int(batch["n_tokens"])
        self._steps += 1
        if self._steps % self.window:
            return
        now = synchronized_time(pl_module.device)
        bar = {"perf/tokens_per_sec": self._tokens / max(now - self._t0, 1e-9)}
        metrics = {"mem/peak_rss_gib": peak_rss_gib()}
        if pl_module.device.type == "cuda":
            gib = 2**30
            bar["gpu/max_mem_reserved_gib"] = torch.cuda.max_memory_reserved(pl_module.device) / gib
            metrics["gpu/mem_allocated_gib"] = torch.cuda.memory_allocated(pl_module.device) / gib
            metrics["gpu/max_mem_allocated_gib"] = torch.cuda.max_memory_allocated(pl_module.device) / gib
            plan = getattr(pl_module, "memory_plan", None)
            if plan is not None:  # the split itself is the module's train/checkpointed_layers
                bar["gpu/memory_budget_gib"] = plan.budget_gib
        pl_module.log_dict(bar, on_step=True, on_epoch=False, prog_bar=True)
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, prog_bar=False)
        self._t0, self._tokens = now, 0


class EvaluationWriter(L.Callback):
    """Writes the test/predict evaluation as ``predictions.jsonl`` and ``metrics.json`` (see :mod:`.evaluation`).

    Both files are written once the pass has finished, each via a temporary file
    and an atomic rename, so a failed run leaves nothing half-written.
    ``output_dir`` defaults to the trainer's log directory.
    """

    def __init__(self, output_dir: Optional[str] = None) -> None:
        self.output_dir = output_dir
        self.last_dir: Optional[Path] = None

    def _write(self, trainer, pl_module) -> None:
        evaluation = pl_module.last_evaluation
        log_dir = trainer.log_dir  # a collective call under DDP: every rank asks
        if evaluation is None or not trainer.is_global_zero:
            return
        out_dir = Path(self.output_dir or log_dir or ".")
        evaluation.write(out_dir)
        self.last_dir = out_dir
        m = evaluation.metrics
        scores = ", ".join(f"{k}={m[k]:.4f}" for k in SCORE_NAMES if isinstance(m.get(k), float))
        pl_module.print(f"wrote {len(evaluation.rows)} predictions and metrics to {out_dir}: {scores}")
        empty = m.get("checks", {}).get("degenerate", {}).get("empty", 0)
        if empty:
            pl_module.print(f"{empty} of {len(evaluation.rows)} replies are empty (the model ended its turn at once): "
                            "prediction_empty in predictions.jsonl")
        if "delta" in m:
            pl_module.print("tuned - base: " + ", ".join(f"{k}={v:+.4f}" for k, v in m["delta"].items()))
        gen = m.get("generation")
        if gen:
            pl_module.print(f"generated {gen['new_tokens']:,} tokens in {gen['seconds']:.1f} s "
                            f"({gen['tokens_per_sec']:,.0f} tokens/s, batch {gen['batch_size']}, "
                            f"{gen['engine']} engine, {gen['weights']} weights)")

    def on_test_end(self, trainer, pl_module) -> None:
        self._write(trainer, pl_module)

    def on_predict_end(self, trainer, pl_module) -> None:
        self._write(trainer, pl_module)


class StepBoundedProgressBar(RichProgressBar):
    """Lightning's rich progress bar, without the ``Epoch 0/-2`` it shows for a run bounded by ``max_steps``
    (``max_epochs`` is then -1, "no limit"): such a run's bar reads ``Epoch 0``."""

    def _get_train_description(self, current_epoch: int) -> str:
        if self.trainer.max_epochs == -1:
            return f"{f'Epoch {current_epoch}':{len(self.validation_description)}}"
        return super()._get_train_description(current_epoch)
