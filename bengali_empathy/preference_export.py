"""From ratings to preference rows: ``runs export-preferences ID_OR_DIR --output prefs.jsonl``.

* ``--objective dpo``: the blind tuned-vs-base judgements of the web rating page (the table
  :data:`JUDGEMENTS_TABLE`, when the registry has it) become pairs: chosen = the preferred reply,
  rejected = the other; ties are skipped.
* ``--objective kto``: the 1-5 ratings of ``rate`` (``HumanRatings``) become labelled replies: a reply
  whose ratings average at least ``desirable_at`` over every aspect and rater is desirable, one at most
  ``undesirable_at`` undesirable; those between are skipped.

Rows carry ``conversation_id`` (a hash of the prompt), so every row of one prompt lands in the same
split. The file is the corpus of ``fit --config configs/dpo.yaml`` (or ``--model.objective kto``).
"""
from __future__ import annotations

import hashlib
import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ._io import atomic_write_text
from .errors import UserError
from .registry import ASPECTS, connect, experiment_for

# The web rating page's blind judgements: the table and the names of its columns (in one place, to align
# with the page's schema).
JUDGEMENTS_TABLE = "PreferenceJudgements"
JUDGEMENT_COLUMNS = {"experiment": "experiment_id", "prompt": "prompt", "reply_a": "reply_a", "reply_b": "reply_b",
                     "choice": "choice"}
CHOICES = {"a": "reply_a", "b": "reply_b"}  # the choice -> the preferred reply; anything else ("tie") is skipped


@dataclass
class Exported:
    """The rows of an export and what was counted on the way."""

    rows: list[dict]
    counts: dict[str, int]

    def summary(self) -> str:
        return ", ".join(f"{v} {k}" for k, v in self.counts.items())


def group_of(prompt: str) -> str:
    return hashlib.blake2b(prompt.encode("utf-8"), digest_size=8).hexdigest()


def table_exists(con: sqlite3.Connection, name: str) -> bool:
    return con.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone() is not None


def judged_pairs(con: sqlite3.Connection, experiment_id: int) -> Exported:
    """DPO pairs from the experiment's blind judgements (none when the registry has no judgement table)."""
    if not table_exists(con, JUDGEMENTS_TABLE):
        return Exported([], {"pairs": 0, "ties skipped": 0, "judgements": 0})
    c = JUDGEMENT_COLUMNS
    found = con.execute(f"SELECT id, {c['prompt']}, {c['reply_a']}, {c['reply_b']}, {c['choice']} FROM "
                        f"{JUDGEMENTS_TABLE} WHERE {c['experiment']} = ? ORDER BY id", (experiment_id,)).fetchall()
    rows, ties = [], 0
    for jid, prompt, reply_a, reply_b, choice in found:
        side = CHOICES.get(str(choice).strip().lower())
        if side is None:
            ties += 1
            continue
        chosen, rejected = (reply_a, reply_b) if side == "reply_a" else (reply_b, reply_a)
        rows.append({"id": f"judgement-{jid}", "conversation_id": group_of(prompt), "prompt": prompt,
                     "chosen": chosen, "rejected": rejected})
    return Exported(rows, {"pairs": len(rows), "ties skipped": ties, "judgements": len(found)})


def rated_replies(con: sqlite3.Connection, experiment_id: int, desirable_at: float, undesirable_at: float) -> Exported:
    """KTO rows from the 1-5 ratings of the experiment's replies (tuned and base, each rated reply once)."""
    mean = " + ".join(f"h.{a}" for a in ASPECTS)
    found = con.execute(
        f"SELECT g.id, h.shown, g.input_text, g.response_text, g.base_response_text, AVG(({mean}) / {len(ASPECTS)}.0) "
        "FROM HumanRatings h JOIN GeneratedResponses g ON g.id = h.response_id WHERE g.experiment_id = ? "
        "GROUP BY g.id, h.shown ORDER BY g.id, h.shown", (experiment_id,)).fetchall()
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
    with connect(db, create=False) as con:
        exported = judged_pairs(con, experiment["id"]) if objective == "dpo" else \
            rated_replies(con, experiment["id"], desirable_at, undesirable_at)
    if not exported.rows:
        source = f"blind judgements ({JUDGEMENTS_TABLE})" if objective == "dpo" else "1-5 ratings (HumanRatings)"
        raise UserError(f"experiment {experiment['id']} has no {source} to export as {objective} rows "
                        f"({exported.summary()})")
    atomic_write_text(output, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in exported.rows))
    return exported
