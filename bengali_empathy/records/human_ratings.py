"""The registry's ``HumanRatings`` table: 1-5 scores of one generated reply on the :data:`~.registry.ASPECTS`
(from ``python -m bengali_empathy rate``, :mod:`.rating`). This module is the one writer and reader of it::

    HumanRatings(
        id          INTEGER PRIMARY KEY,
        response_id INTEGER  -- GeneratedResponses.id of the rated reply's row
        shown       TEXT     -- 'tuned' or 'base': which of the row's replies was rated
        empathy, relevance, fluency, coherence, helpfulness INTEGER  -- 1-5
        comment     TEXT NULL
        timestamp   TEXT     -- UTC, ISO 8601
    )
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from .registry import ASPECTS, connect, now

TABLE = ("CREATE TABLE IF NOT EXISTS HumanRatings ("
         "id INTEGER PRIMARY KEY AUTOINCREMENT, response_id INTEGER NOT NULL REFERENCES GeneratedResponses(id), "
         "shown TEXT NOT NULL CHECK (shown IN ('tuned', 'base')), "
         + "".join(f"{a} INTEGER CHECK ({a} BETWEEN 1 AND 5), " for a in ASPECTS)
         + "comment TEXT, timestamp TEXT NOT NULL)")


def record_rating(db: str | Path, response_id: int, shown: str, scores: Sequence[int],
                  comment: Optional[str] = None) -> None:
    """Commit one rating: ``scores`` of the ``shown`` reply of the ``response_id`` row, in :data:`ASPECTS` order."""
    with connect(db) as con, con:
        con.execute(TABLE)
        con.execute("INSERT INTO HumanRatings (response_id, shown, " + ", ".join(ASPECTS)
                    + ", comment, timestamp) VALUES (?, ?, " + ", ".join("?" * len(ASPECTS)) + ", ?, ?)",
                    (response_id, shown, *scores, comment, now()))


def rating_summary(db: str | Path, experiment_id: int) -> dict:
    """Mean score per aspect and the number of ratings, per shown model (tuned / base)."""
    if not Path(db).is_file():
        return {}
    with connect(db, create=False) as con:
        con.execute(TABLE)
        rows = con.execute(
            "SELECT h.shown, COUNT(*), " + ", ".join(f"AVG(h.{a})" for a in ASPECTS)
            + " FROM HumanRatings h JOIN GeneratedResponses g ON g.id = h.response_id "
              "WHERE g.experiment_id = ? GROUP BY h.shown", (experiment_id,)).fetchall()
    return {shown: {"n": n, **dict(zip(ASPECTS, means))} for shown, n, *means in rows}


def mean_ratings(db: str | Path, experiment_id: int) -> list[tuple]:
    """Per rated reply of the experiment, each rated once however often it was rated: (response id, shown,
    prompt, tuned reply, base reply, the mean of its ratings over every aspect)."""
    mean = " + ".join(f"h.{a}" for a in ASPECTS)
    with connect(db, create=False) as con:
        con.execute(TABLE)
        return con.execute(
            f"SELECT g.id, h.shown, g.input_text, g.response_text, g.base_response_text, "
            f"AVG(({mean}) / {len(ASPECTS)}.0) "
            "FROM HumanRatings h JOIN GeneratedResponses g ON g.id = h.response_id WHERE g.experiment_id = ? "
            "GROUP BY g.id, h.shown ORDER BY g.id, h.shown", (experiment_id,)).fetchall()
