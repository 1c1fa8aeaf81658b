"""Callbacks: throughput / GPU-memory logging and the predict-output writer."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from .metrics import score_texts


class ThroughputMonitor(L.Callback):
    """Logs training tokens/s (non-padding tokens, wall clock, CUDA-synchronised) and GPU memory."""

    def __init__(self, window: int = 10) -> None:
        self.window = window
        self._t0: Optional[float] = None
        self._tokens = 0
        self._steps = 0

    @staticmethod
    def _sync(pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._t0, self._tokens, self._steps = None, 0, 0

    def on_train_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int) -> None:
        if self._t0 is None:
            self._sync(pl_module)
            self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int) -> None:
        mask = batch.get("attention_mask")
        self._tokens += int(mask.sum()) if mask is not None else int(batch["n_tokens"])
        self._steps += 1
        if self._steps % self.window:
            return
        self._sync(pl_module)
        now = time.perf_counter()
        metrics = {"perf/tokens_per_sec": self._tokens / max(now - self._t0, 1e-9)}
        if pl_module.device.type == "cuda":
            gib = 2**30
            metrics["gpu/mem_allocated_gib"] = torch.cuda.memory_allocated(pl_module.device) / gib
            metrics["gpu/max_mem_allocated_gib"] = torch.cuda.max_memory_allocated(pl_module.device) / gib
            metrics["gpu/max_mem_reserved_gib"] = torch.cuda.max_memory_reserved(pl_module.device) / gib
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, prog_bar=False)
        self._t0, self._tokens = now, 0


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


class PredictionWriter(BasePredictionWriter):
    """Writes ``predictions.jsonl`` (id, prompt, reference, prediction) and ``metrics.json``.

    Both files are written only once prediction has finished, each via a
    temporary file and an atomic rename, so a failed run leaves nothing half-written.
    ``output_dir`` defaults to the trainer's log directory.
    """

    def __init__(self, output_dir: Optional[str] = None) -> None:
        super().__init__(write_interval="epoch")
        self.output_dir = output_dir
        self.last_metrics: Optional[dict] = None
        self.last_dir: Optional[Path] = None

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        if predictions and isinstance(predictions[0], list):  # several dataloaders
            predictions = [p for dl in predictions for p in dl]
        rows = [r for out in predictions for r in out["rows"]]
        losses = [(out["loss"], out["tokens"]) for out in predictions]
        metrics = score_texts([r["prediction"] for r in rows], [r["reference"] for r in rows], losses)
        out_dir = Path(self.output_dir or trainer.log_dir or ".")
        if trainer.world_size > 1:
            out_dir = out_dir / f"rank{trainer.global_rank}"
        atomic_write_text(out_dir / "predictions.jsonl",
                          "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, ensure_ascii=False, indent=2) + "\n")
        self.last_metrics, self.last_dir = metrics, out_dir
        pl_module.print(f"wrote {len(rows)} predictions and metrics to {out_dir}: "
                        + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
