"""From ratings to preference rows: ``runs export-preferences ID_OR_DIR --output prefs.jsonl``.

* ``--objective dpo``: the blind tuned-vs-base judgements of the web rating page (``serve``; read
  through :func:`~.judgements.judgements_of`, the table's one reader) become pairs: chosen = the
  preferred reply, rejected = the other, with the system prompt both were generated under (``system``,
  for ``data.columns.system``); ties are skipped.
* ``--objective kto``: the 1-5 ratings of ``rate`` (``HumanRatings``) become labelled replies: a reply
  whose ratings average at least ``desirable_at`` over every aspect and rater is desirable, one at most
  ``undesirable_at`` undesirable; those between are skipped.

Rows carry ``conversation_id`` (a hash of the prompt), so every row of one prompt lands in the same
split. The file is the corpus of ``fit --config configs/dpo.yaml`` (or ``--model.objective.name kto``).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .._io import atomic_write_text
from ..errors import UserError
from .judgements import judgements_of
from .human_ratings import mean_ratings
from .registry import experiment_for


@dataclass
class Exported:
    """The rows of an export and what was counted on the way."""

    rows: list[dict]
    counts: dict[str, int]

    def summary(self) -> str:
        return ", ".join(f"{v} {k}" for k, v in self.counts.items())


def group_of(prompt: str) -> str:
    return hashlib.blake2b(prompt.encode("utf-8"), digest_size=8).hexdigest()


def judged_pairs(db: str | Path, experiment_id: int) -> Exported:
    """DPO pairs from the experiment's blind judgements (none when nobody judged its prompts)."""
    found = judgements_of(db, experiment_id)
    rows = []
    for j in found:
        if j["preferred"] == "tie":
            continue
        tuned_won = j["preferred"] == "tuned"
        rows.append({"id": f"judgement-{j['id']}", "conversation_id": group_of(j["prompt"]), "prompt": j["prompt"],
                     "system": j["system_prompt"], "chosen": j["tuned_reply"] if tuned_won else j["base_reply"],
                     "rejected": j["base_reply"] if tuned_won else j["tuned_reply"]})
    return Exported(rows, {"pairs": len(rows), "ties skipped": len(found) - len(rows), "judgements": len(found)})


def rated_replies(db: str | Path, experiment_id: int, desirable_at: float, undesirable_at: float) -> Exported:
    """KTO rows from the 1-5 ratings of the experiment's replies (tuned and base, each rated reply once)."""
    found = mean_ratings(db, experiment_id)
    rows, between = [], 0
    for rid, shown, prompt, tuned, base, score in found:
        if undesirable_at < score < desirable_at:
            between += 1
            continue
        rows.append({"id": f"response-{rid}-{shown}", "conversation_id": group_of(prompt), "prompt": prompt,
                     "completion": tuned if shown == "tuned" else base, "label": score >= desirable_at,
                     "mean_rating": round(score, 3)})
    desirable = sum(r["label"] for r in rows)
    return Exported(rows, {"desirable": desirable, "undesirable": len(rows) - desirable, "between skipped": between,
                           "rated replies": len(found)})


def export_preferences(db: str | Path, ref: str, output: Path, objective: Literal["dpo", "kto"],
                       desirable_at: float = 4.0, undesirable_at: float = 2.0) -> Exported:
    """Write the preference rows of experiment ``ref`` (id or log directory) to ``output`` (JSONL, atomically)."""
    if not 1 <= undesirable_at < desirable_at <= 5:
        raise UserError(f"--undesirable-at ({undesirable_at}) and --desirable-at ({desirable_at}) must satisfy "
                        "1 <= undesirable-at < desirable-at <= 5")
    experiment = experiment_for(db, ref)
    if objective == "dpo":
        exported = judged_pairs(db, experiment["id"])
    else:
        exported = rated_replies(db, experiment["id"], desirable_at, undesirable_at)
    if not exported.rows:
        source = "blind judgements (PreferenceJudgements)" if objective == "dpo" else "1-5 ratings (HumanRatings)"
        raise UserError(f"experiment {experiment['id']} has no {source} to export as {objective} rows "
                        f"({exported.summary()})")
    atomic_write_text(output, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in exported.rows))
    return exported
