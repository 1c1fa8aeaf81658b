"""A run's records, written here and only read elsewhere: ``run.json``, the registry's experiment rows.

``run.json`` (in the log directory of a fit) says what was trained, on what, how long, with what
memory, the final scores and the library versions; :mod:`.report` reads it. An
:class:`ExperimentRecord` is one row of the experiment registry (:mod:`.registry` stores it).
Both are built from a :class:`RunInfo` -- what the model says about itself, built by
``EmpathyLM.run_info`` -- and the trainer's counters and logged scalars.

When fit ends, :func:`write_fit_records` writes in this order, each naming the one before:

1. the adapter directories (``adapter/``, ``adapter-best/``);
2. ``run.json``;
3. the experiment row of each :class:`RunRecordSink` among the trainer's callbacks (the registry),
   whose ``run.log_dir`` points at the directory holding both.
"""
from __future__ import annotations

import json
import platform
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable, Optional

from .._io import atomic_write_text
from ..models.lora import LoraSettings
from ..models.memory import CheckpointPlan, MemoryBudget, peak_rss_gib
from ..schema import CorpusFacts

LIBRARIES = ("bengali_empathy", "torch", "transformers", "peft", "lightning", "torchmetrics", "datasets",
             "bitsandbytes", "unsloth", "sacrebleu")
RUN_RECORD = "run.json"


def library_versions() -> dict:
    """Python's and each installed library's version."""
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def scalar_metrics(trainer) -> dict[str, float]:
    """The trainer's logged one-number metrics (``callback_metrics``) as floats."""
    return {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}


@dataclass
class RunInfo:
    """What the model tells the run records about itself and the corpus it was given."""

    model_name_or_path: str
    base_model: str
    backend: str
    quantized: bool
    lora: LoraSettings
    trainable_params: int
    total_params: int
    max_seq_length: int
    gradient_checkpointing: bool
    memory_budget_gib: MemoryBudget
    optimizer: str
    learning_rate: float
    adapter_path: Optional[str] = None
    batch_size: Optional[int] = None
    memory_plan: Optional[CheckpointPlan] = None
    corpus: CorpusFacts = field(default_factory=lambda: CorpusFacts(corpus_path=""))


def run_record(run: RunInfo, trainer, wall_seconds: float) -> dict:
    """The content of ``run.json``."""
    import torch

    trainable, total = run.trainable_params, run.total_params
    cuda = torch.cuda.is_available()
    batching = run.corpus.batching
    return {
        "model": {"model_name_or_path": run.model_name_or_path, "base_model": run.base_model,
                  "backend": run.backend, "load_in_4bit": bool(run.quantized), "lora": run.lora.as_record(),
                  "trainable_params": trainable, "total_params": total,
                  "trainable_pct": 100.0 * trainable / max(total, 1),
                  "max_seq_length": run.max_seq_length, "gradient_checkpointing": run.gradient_checkpointing,
                  "memory_budget_gib": run.memory_budget_gib,
                  "memory_plan": run.memory_plan.as_dict() if run.memory_plan else None},
        "data": {"corpus": run.corpus.corpus_path, "stats": run.corpus.stats or {},
                 "pack": bool(batching.get("pack", False)),
                 "group_by_length": bool(batching.get("group_by_length", False)),
                 "streaming": bool(batching.get("streaming", False)), "batch_size": run.batch_size},
        "trainer": {"accumulate_grad_batches": trainer.accumulate_grad_batches, "steps": trainer.global_step,
                    "epochs": trainer.current_epoch, "precision": str(trainer.precision),
                    "devices": trainer.world_size, "optimizer": run.optimizer, "learning_rate": run.learning_rate},
        "wall_seconds": wall_seconds,
        "peak_memory_gib": {"gpu_allocated": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                            "gpu_reserved": torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
                            "process_rss": peak_rss_gib()},
        "final": {k: v for k, v in scalar_metrics(trainer).items() if not k.endswith("_step")},
        "versions": library_versions(),
    }


def write_run_record(log_dir: Path, run: RunInfo, trainer, wall_seconds: float) -> dict:
    """Write ``run.json`` in ``log_dir``; returns what it holds."""
    record = run_record(run, trainer, wall_seconds)
    atomic_write_text(Path(log_dir) / RUN_RECORD, json.dumps(record, ensure_ascii=False, indent=2) + "\n")
    return record


def read_run_record(run_dir: Path) -> dict:
    """The ``run.json`` of a fit's log directory."""
    return json.loads((Path(run_dir) / RUN_RECORD).read_text(encoding="utf-8"))


@dataclass
class ExperimentRecord:
    """One row of the experiment registry's ``LLAMAExperiments`` and its generated replies."""

    model_name: str
    lora_config: dict
    train_loss: Optional[float]
    val_loss: Optional[float]
    metrics: dict  # the run's scores, and under ``run`` its stage, corpus, steps and log directory
    responses: list[dict]  # predictions.jsonl rows: prompt, reference, prediction (, base_prediction)


def experiment_record(stage: str, run: RunInfo, trainer, log_dir: Optional[str], evaluation=None) -> ExperimentRecord:
    """The registry row of a fit / validate / test / predict: an evaluation's scores and replies (for fit,
    the last validation's replies beside the logged ``val/`` scores)."""
    scalars = scalar_metrics(trainer)
    metrics = dict(evaluation.metrics) if evaluation is not None and stage != "fit" else \
        {k: v for k, v in scalars.items() if k.startswith("val/") or k.startswith("train/reward_")}
    metrics["run"] = {"stage": stage, "log_dir": str(Path(log_dir).resolve()) if log_dir else None,
                      "corpus": run.corpus.corpus_path, "steps": trainer.global_step,
                      "adapter_path": run.adapter_path, "backend": run.backend}
    return ExperimentRecord(
        model_name=run.model_name_or_path, lora_config=run.lora.as_record(),
        train_loss=scalars.get("train/loss_epoch") if stage == "fit" else None,
        val_loss=scalars.get("val/loss") if stage in ("fit", "validate") else None,
        metrics=metrics, responses=evaluation.output_rows() if evaluation is not None else [])


class RunRecordSink:
    """A callback that stores a fit's :class:`ExperimentRecord` once the adapter and run.json are written."""

    def store_fit(self, record: ExperimentRecord) -> None:
        raise NotImplementedError


def write_fit_records(trainer, run: RunInfo, wall_seconds: float, save_adapters: Callable[[Path], None],
                      evaluation=None) -> Optional[dict]:
    """A fit's records, in the order of the module docstring (rank 0); returns run.json's content
    (``None`` on other ranks and without a log directory)."""
    log_dir = trainer.log_dir  # a collective call under DDP: every rank asks
    if not trainer.is_global_zero:
        return None
    record = None
    if log_dir:
        save_adapters(Path(log_dir))
        record = write_run_record(Path(log_dir), run, trainer, wall_seconds)
    sinks = [c for c in trainer.callbacks if isinstance(c, RunRecordSink)]
    if sinks:
        experiment = experiment_record("fit", run, trainer, log_dir, evaluation)
        for sink in sinks:
            sink.store_fit(experiment)
    return record
