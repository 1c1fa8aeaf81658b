"""One evaluation pass over a split: its rows, its scores and the files it writes.

``metrics.json`` holds the tuned model's corpus scores at the top level
(``bleu``, ``rougeL``, ``chrf``, ``loss``, ``perplexity``, ``n``), then, when
present, ``base`` (the same with the adapter disabled) and ``delta`` (tuned -
base), ``by_category``, ``generation`` (rows, new tokens, tokens/s, batch size,
decoding), ``checks`` (see :mod:`.checks`) and ``warnings``.
``predictions.jsonl`` has one row per evaluated conversation in input order:
``id, prompt, reference, prediction`` (+ ``base_prediction``, ``category``).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .checks import degenerate_predictions, train_overlap, warnings_for
from .metrics import score_texts

SCORES = ("bleu", "rougeL", "chrf", "loss", "perplexity", "nll_per_char", "bits_per_char")
ROW_KEYS = ("id", "prompt", "reference", "prediction", "base_prediction", "category")


@dataclass
class Evaluation:
    """Rows (in input order) and scores of one pass; ``metrics`` is what ``metrics.json`` holds."""

    stage: str
    rows: list[dict] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)

    def output_rows(self) -> list[dict]:
        return [{k: r[k] for k in ROW_KEYS if r.get(k) is not None} for r in self.rows]

    def write(self, out_dir: Path) -> None:
        """``predictions.jsonl`` and ``metrics.json`` in ``out_dir``, each replaced atomically."""
        from .callbacks import atomic_write_text

        atomic_write_text(out_dir / "predictions.jsonl",
                          "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.output_rows()))
        atomic_write_text(out_dir / "metrics.json", json.dumps(self.metrics, ensure_ascii=False, indent=2) + "\n")


def requests_from_batch(batch: dict) -> list[dict]:
    """Evaluation rows of a collated batch (``batch["eval_rows"]``): identity, texts and the unpadded prompt."""
    # "file: row N", unique: merges the rows of several ranks
    return [{"id": r.id, "row": r.where, "prompt": r.prompt, "reference": r.reference, "category": r.category,
             "prompt_ids": list(r.prompt_ids)} for r in batch["eval_rows"]]


def _scores(rows: list[dict], key: str, loss: dict) -> dict:
    done = [r for r in rows if key in r]
    out = score_texts([r[key] for r in done], [r["reference"] for r in done]) if done else {}
    return {**out, **loss}


def summarize(rows: list[dict], loss: dict, base_loss: Optional[dict] = None,
              train_texts: Optional[tuple[list[str], list[str]]] = None, generation: Optional[dict] = None,
              checks: bool = True) -> dict:
    """The ``metrics.json`` of an evaluation: scores, base and delta, per category and, with ``checks``,
    the honesty checks and their warnings."""
    metrics = _scores(rows, "prediction", loss)
    has_base = base_loss is not None
    if has_base:
        metrics["base"] = _scores(rows, "base_prediction", base_loss)
        metrics["delta"] = {k: metrics[k] - metrics["base"][k] for k in SCORES
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
            found["train_overlap"] = train_overlap(generated, *train_texts)
        metrics["checks"] = found
        warnings = warnings_for(found.get("train_overlap"), found["degenerate"])
        if has_base:
            warnings += warnings_for(None, found["degenerate_base"], "base")
        metrics["warnings"] = warnings
    return metrics
