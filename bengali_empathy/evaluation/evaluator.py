"""Evaluation: the pass over a split (rows -> replies -> scores -> records) and what it writes.

:class:`Evaluator` owns a pass: the token-weighted loss of every batch (and of the base model, the
adapter disabled, with ``compare_base``), the rows whose replies are generated, their gather across
ranks, the summary and what is logged. The LightningModule calls it from its step and epoch-end hooks.

``metrics.json`` holds the tuned model's corpus scores at the top level
(``bleu``, ``rougeL``, ``chrf``, the reply scores ``distinct_1`` ... ``repeats_trigram``
(:data:`.metrics.TEXT_SCORES`), ``loss``, ``perplexity``, ``n``), then, when
present, ``base`` (the same with the adapter disabled) and ``delta`` (tuned -
base), ``by_category``, ``generation`` (rows, new tokens, tokens/s, batch size,
decoding), ``checks`` (see :mod:`.checks`) and ``warnings``.
``predictions.jsonl`` has one row per evaluated conversation in input order:
``id, prompt, reference, prediction`` (+ ``base_prediction``, ``category``).
"""
from __future__ import annotations

import json
import math
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, Optional, Protocol

import torch

from .._io import atomic_write_text
from .checks import degenerate_predictions, train_overlap, warnings_for
from ..data import IGNORE_INDEX
from ..generation.decoding import Decoding
from ..generation.generator import GenerationStats
from .metrics import SCORE_NAMES, TokenWeightedLoss, score_loss, score_texts
from ..schema import EvalRow, TrainingTexts

Stage = Literal["val", "test", "predict"]
STAGES = ("val", "test", "predict")
PROGRESS_BAR_SCORES = ("loss", "chrf")


@dataclass
class Evaluation:
    """Rows (in input order) and scores of one pass; ``metrics`` is what ``metrics.json`` holds."""

    stage: str
    rows: list[EvalRow] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)

    def output_rows(self) -> list[dict]:
        return [r.output() for r in self.rows]

    def write(self, out_dir: Path) -> None:
        """``predictions.jsonl`` and ``metrics.json`` in ``out_dir``, each replaced atomically."""
        atomic_write_text(out_dir / "predictions.jsonl",
                          "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.output_rows()))
        atomic_write_text(out_dir / "metrics.json", json.dumps(self.metrics, ensure_ascii=False, indent=2) + "\n")


class EvalHost(Protocol):
    """What the evaluator asks of the model it evaluates (``EmpathyLM``, a LightningModule)."""

    tokenizer: object
    decoding: Decoding
    logger: object
    global_step: int

    def __call__(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]: ...  # mean reply-token loss, tokens

    def adapter_disabled(self) -> AbstractContextManager: ...  # the base model within

    def generate_texts(self, prompts: list[list[int]], desc: str, progress: bool) -> tuple[list[str],
                                                                                          GenerationStats]: ...

    def log(self, name: str, value: float, **kwargs) -> None: ...

    def print(self, *args) -> None: ...

    def training_texts(self) -> Optional[TrainingTexts]: ...  # the training split's turns (overlap check), or None


def reply_chars(tokenizer, batch: dict) -> int:
    """Characters of the reply text the loss was taken on (labelled tokens, decoded)."""
    rows = [row[row != IGNORE_INDEX].tolist() for row in batch["labels"]]
    return sum(len(t) for t in tokenizer.batch_decode(rows, skip_special_tokens=True))


def merge_ranks(parts: list[tuple[list[EvalRow], Optional[dict]]]) -> tuple[list[EvalRow], Optional[dict]]:
    """The rows of every rank in input order, each once, and their generation statistics together.

    The distributed sampler pads the last batches with repeated rows: a row read twice is kept once."""
    merged, seen = [], set()
    for r in sorted((r for rows, _ in parts for r in rows), key=lambda r: r.position):
        if r.position not in seen:
            seen.add(r.position)
            merged.append(r)
    stats = [g for _, g in parts if g]
    generation = None
    if stats:
        generation = {**_merge_generation_stats(stats, len(merged)), "ranks": len(parts)}
        base = [g["base"] for g in stats if "base" in g]
        if base:
            generation["base"] = _merge_generation_stats(base, len(merged))
    return merged, generation


def _merge_generation_stats(stats: list[dict], rows: int) -> dict:
    """Generation statistics of ranks that generated side by side: tokens add up, time is the slowest rank's."""
    new_tokens, seconds = sum(g["new_tokens"] for g in stats), max(g["seconds"] for g in stats)
    return {**stats[0], "rows": rows, "new_tokens": new_tokens, "seconds": seconds,
            "tokens_per_sec": round(new_tokens / max(seconds, 1e-9), 1)}


def gather(rows: list[EvalRow], generation: Optional[dict], world_size: int) -> tuple[list[EvalRow], Optional[dict]]:
    """Every rank's rows and statistics on every rank (DDP; :func:`merge_ranks`); as they are in one process."""
    if world_size == 1:
        return rows, generation
    import torch.distributed as dist

    parts: list = [None] * world_size
    dist.all_gather_object(parts, ([replace(r, prompt_ids=[]) for r in rows], generation))
    return merge_ranks(parts)


def samples_table(rows: list[dict]) -> str:
    """Markdown table of prompt, reference and prediction (and the base model's, when scored)."""
    keys = ["prompt", "reference", "prediction"] + (["base_prediction"] if any("base_prediction" in r for r in rows)
                                                      else [])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        cells = [str(r.get(k, "")).replace("|", "\\|").replace("\n", " ") for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


class Evaluator:
    """Validation, test and predict passes: losses per batch, replies at the end, then scores and logs.

    Args:
        compare_base: also score the base model (adapter disabled) in validate/test/predict (not in
            fit's validations: it doubles their cost).
        val_generate_batches: validation batches whose rows get generated replies (-1 = all); test
            and predict generate for every row.
        log_samples: generations written to TensorBoard each validation.
    """

    def __init__(self, compare_base: bool = False, val_generate_batches: int = 2, log_samples: int = 4) -> None:
        self.compare_base = compare_base
        self.val_generate_batches = val_generate_batches
        self.log_samples = log_samples
        # The host registers these as a child module, so their states follow it to its device.
        self.losses = torch.nn.ModuleDict({k: TokenWeightedLoss() for s in STAGES for k in (s, f"{s}_base")})
        self.pending: list[EvalRow] = []
        self.last: Optional[Evaluation] = None

    def comparing(self, fitting: bool) -> bool:
        return self.compare_base and not fitting

    def step(self, host: EvalHost, stage: Stage, batch: dict, batch_idx: int, fitting: bool) -> None:
        """Score one batch's reference replies (tuned and base) and keep its rows for generation."""
        loss, n = host(batch)
        chars = reply_chars(host.tokenizer, batch)
        self.losses[stage].update(loss, n, chars)
        if self.comparing(fitting):
            with host.adapter_disabled():
                base_loss, base_n = host(batch)
            self.losses[f"{stage}_base"].update(base_loss, base_n, chars)
        limit = self.val_generate_batches if stage == "val" else -1
        if limit < 0 or batch_idx < limit:
            self.pending.extend(replace(r) for r in batch["eval_rows"])

    def finish(self, host: EvalHost, stage: Stage, fitting: bool, world_size: int = 1) -> Evaluation:
        """Generate the pending rows' replies (and the base model's), gather them, score and log everything."""
        rows, self.pending = self.pending, []
        comparing = self.comparing(fitting)
        loss = score_loss(self.losses[stage])
        base_loss = score_loss(self.losses[f"{stage}_base"]) if comparing else None
        self.losses[stage].reset()
        self.losses[f"{stage}_base"].reset()
        # fit's small validation samples have Lightning's bar
        generation = self._generate(host, stage, rows, comparing, progress=not fitting) if rows else None
        rows, generation = gather(rows, generation, world_size)
        # The honesty checks are for a finished model, not for fit's validations.
        train_texts = None if fitting else host.training_texts()
        outputs = [r.output() for r in rows]
        metrics = summarize(outputs, loss, base_loss, train_texts, generation, checks=not fitting) \
            if (rows or loss) else {}
        evaluation = Evaluation(stage, rows, metrics)
        if stage != "predict":
            self._log(host, evaluation)
        elif "generation" in metrics and host.logger is not None:  # Lightning's self.log is closed to predict
            host.logger.log_metrics({"predict/generated_tokens_per_sec": float(metrics["generation"]["tokens_per_sec"])},
                                    step=host.global_step)
        for line in metrics.get("warnings", []):
            host.print(f"warning: {line}")
        self.last = evaluation
        return evaluation

    def _generate(self, host: EvalHost, stage: str, rows: list[EvalRow], comparing: bool, progress: bool) -> dict:
        prompts = [r.prompt_ids for r in rows]
        replies, stats = host.generate_texts(prompts, desc=f"{stage}: generating", progress=progress)
        for r, text in zip(rows, replies):
            r.prediction = text
        generation = {**stats.as_dict(), "decoding": host.decoding.as_dict()}
        if comparing:
            with host.adapter_disabled():
                base_replies, base_stats = host.generate_texts(prompts, desc=f"{stage}: generating (base)",
                                                               progress=progress)
            for r, text in zip(rows, base_replies):
                r.base_prediction = text
            generation["base"] = base_stats.as_dict()
        return generation

    def _log(self, host: EvalHost, evaluation: Evaluation) -> None:
        stage, m = evaluation.stage, evaluation.metrics
        # Computed from metric states that torchmetrics already reduced across processes, and rows
        # gathered from all of them: the same values on every rank, so sync_dist's mean is a no-op.
        for prefix, scores in ((stage, m), (f"{stage}_base", m.get("base", {}))):
            for key in SCORE_NAMES:
                if isinstance(scores.get(key), float) and not math.isnan(scores[key]):
                    host.log(f"{prefix}/{key}", scores[key], prog_bar=prefix == stage and key in PROGRESS_BAR_SCORES,
                             sync_dist=True)
        if "generation" in m:
            host.log(f"{stage}/generated_tokens_per_sec", float(m["generation"]["tokens_per_sec"]), sync_dist=True)
        logger = host.logger
        if stage == "val" and evaluation.rows and logger is not None and hasattr(logger.experiment, "add_text"):
            logger.experiment.add_text("samples", samples_table(evaluation.output_rows()[: self.log_samples]),
                                       host.global_step)


def _scores(rows: list[dict], key: str, loss: dict) -> dict:
    done = [r for r in rows if key in r]
    out = score_texts([r[key] for r in done], [r["reference"] for r in done]) if done else {}
    return {**out, **loss}


def summarize(rows: list[dict], loss: dict, base_loss: Optional[dict] = None,
              train_texts: Optional[TrainingTexts] = None, generation: Optional[dict] = None,
              checks: bool = True) -> dict:
    """The ``metrics.json`` of an evaluation of ``rows`` (as :meth:`EvalRow.output` gives them): scores,
    base and delta, per category and, with ``checks``, the honesty checks and their warnings."""
    metrics = _scores(rows, "prediction", loss)
    has_base = base_loss is not None
    if has_base:
        metrics["base"] = _scores(rows, "base_prediction", base_loss)
        metrics["delta"] = {k: metrics[k] - metrics["base"][k] for k in SCORE_NAMES
                            if isinstance(metrics.get(k), float) and isinstance(metrics["base"].get(k), float)
                            and not math.isnan(metrics[k])}
    generated = [r for r in rows if "prediction" in r]
    categories = sorted({r["category"] for r in generated if r.get("category") not in (None, "")})
    if categories:
        metrics["by_category"] = {}
        for c in categories:
            part = [r for r in generated if r.get("category") == c]
            entry = _scores(part, "prediction", {})
            if has_base:
                entry["base"] = _scores(part, "base_prediction", {})
            metrics["by_category"][c] = entry
    if generation:
        metrics["generation"] = generation
    if generated and checks:
        found: dict = {"degenerate": degenerate_predictions(generated)}
        if has_base:
            found["degenerate_base"] = degenerate_predictions(generated, "base_prediction")
        if train_texts is not None:
            found["train_overlap"] = train_overlap(generated, train_texts)
        metrics["checks"] = found
        warnings = warnings_for(found.get("train_overlap"), found["degenerate"])
        if has_base:
            warnings += warnings_for(None, found["degenerate_base"], "base")
        metrics["warnings"] = warnings
    return metrics
