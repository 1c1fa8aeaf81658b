"""Blind pairwise judgements of the tuned model against its base: the pair shown, the row kept, the win rate.

A rater sees one prompt and two replies, ``A`` and ``B``: the tuned model's and the base model's
(the same weights with the adapter disabled), in an order drawn at random per pair, and picks A, B
or a tie, optionally scoring each reply 1-5 on the :data:`~.registry.ASPECTS` and leaving a
comment. Each judgement is committed as it is given, so a rater who leaves halfway keeps what was
rated. This module is the one writer and reader of its table in the experiment registry::

    PreferenceJudgements(
        id            INTEGER PRIMARY KEY,
        experiment_id INTEGER NULL  -- LLAMAExperiments.id whose replies the prompt was sampled from;
                                    -- NULL: the rater typed the prompt
        adapter_path  TEXT          -- the adapter that wrote the tuned reply
        system_prompt TEXT          -- the system prompt both replies were generated under
        prompt        TEXT          -- the user message (one turn)
        reply_a, reply_b TEXT       -- the replies as shown
        tuned_side    TEXT          -- 'A' or 'B': where the tuned reply was; the other is the base's
        choice        TEXT          -- 'A', 'B' or 'tie'
        a_empathy, a_relevance, a_fluency, a_coherence, a_helpfulness,
        b_empathy, ..., b_helpfulness INTEGER NULL  -- 1-5 scores of reply A / B, NULL when not given
        comment       TEXT NULL
        rater         TEXT          -- the name the rater gave
        decoding      TEXT          -- JSON of the Decoding both replies were generated with
        timestamp     TEXT          -- UTC, ISO 8601
    )

:func:`judgements_of` reads them back with the sides resolved (``tuned_reply``, ``base_reply``,
``preferred`` = ``tuned`` / ``base`` / ``tie``): a preference pair is (``prompt``, the preferred
reply, the other) for every row that is not a tie.

:func:`win_rate` is the tuned model's share of the judgements that are not ties, with a 95% Wilson
score interval (ties are counted and shown, not split).
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from ..errors import UserError
from .registry import ASPECTS, connect, now, responses_of

Side = Literal["A", "B"]
Choice = Literal["A", "B", "tie"]
SIDES: tuple[Side, Side] = ("A", "B")
CHOICES: tuple[Choice, ...] = ("A", "B", "tie")
Z_95 = 1.959963984540054  # the standard normal's 97.5% quantile

_SCORES = [f"{side}_{aspect}" for side in ("a", "b") for aspect in ASPECTS]
TABLE = ("CREATE TABLE IF NOT EXISTS PreferenceJudgements ("
         "id INTEGER PRIMARY KEY AUTOINCREMENT, experiment_id INTEGER REFERENCES LLAMAExperiments(id), "
         "adapter_path TEXT NOT NULL, system_prompt TEXT NOT NULL, prompt TEXT NOT NULL, reply_a TEXT NOT NULL, "
         "reply_b TEXT NOT NULL, tuned_side TEXT NOT NULL CHECK (tuned_side IN ('A', 'B')), "
         "choice TEXT NOT NULL CHECK (choice IN ('A', 'B', 'tie')), "
         + "".join(f"{c} INTEGER CHECK ({c} BETWEEN 1 AND 5), " for c in _SCORES)
         + "comment TEXT, rater TEXT NOT NULL, decoding TEXT NOT NULL, timestamp TEXT NOT NULL)")


@dataclass(frozen=True)
class BlindPair:
    """One prompt with the tuned and the base reply, shown as A and B in the order ``tuned_side`` says."""

    prompt: str
    tuned: str
    base: str
    tuned_side: Side
    experiment_id: Optional[int] = None

    @property
    def reply_a(self) -> str:
        return self.tuned if self.tuned_side == "A" else self.base

    @property
    def reply_b(self) -> str:
        return self.base if self.tuned_side == "A" else self.tuned


def blind_pair(prompt: str, tuned: str, base: str, rng: random.Random,
               experiment_id: Optional[int] = None) -> BlindPair:
    """The pair with the tuned reply on a side drawn from ``rng``."""
    return BlindPair(prompt, tuned, base, rng.choice(SIDES), experiment_id)


@dataclass(frozen=True)
class Judgement:
    """A rater's verdict on a :class:`BlindPair`; ``scores`` maps ``a_<aspect>`` / ``b_<aspect>`` to 1-5."""

    pair: BlindPair
    choice: Choice
    rater: str
    adapter_path: str
    system_prompt: str
    decoding: dict
    scores: dict[str, int] = field(default_factory=dict)
    comment: Optional[str] = None

    def check(self) -> None:
        """Refuse a judgement that cannot be stored (a :class:`UserError` saying what is wrong)."""
        if not self.rater.strip():
            raise UserError("give your name as rater before judging")
        if self.choice not in CHOICES:
            raise UserError(f"choose A, B or tie, not {self.choice!r}")
        for key, value in self.scores.items():
            if key not in _SCORES:
                raise UserError(f"unknown score {key!r} (scores are {', '.join(_SCORES)})")
            if not (isinstance(value, int) and 1 <= value <= 5):
                raise UserError(f"{key} must be a whole number from 1 to 5, not {value!r}")


def record_judgement(db: str | Path, judgement: Judgement) -> int:
    """Commit one judgement (checked first); returns its id."""
    judgement.check()
    pair = judgement.pair
    columns = ["experiment_id", "adapter_path", "system_prompt", "prompt", "reply_a", "reply_b", "tuned_side", "choice",
               *judgement.scores, "comment", "rater", "decoding", "timestamp"]
    values = [pair.experiment_id, judgement.adapter_path, judgement.system_prompt, pair.prompt, pair.reply_a,
              pair.reply_b, pair.tuned_side, judgement.choice, *judgement.scores.values(), judgement.comment or None,
              judgement.rater.strip(), json.dumps(judgement.decoding, sort_keys=True), now()]
    with connect(db) as con, con:
        con.execute(TABLE)
        cur = con.execute(f"INSERT INTO PreferenceJudgements ({', '.join(columns)}) "
                          f"VALUES ({', '.join('?' * len(values))})", values)
        return int(cur.lastrowid)


def judgements_of(db: str | Path, experiment_id: Optional[int] = None) -> list[dict]:
    """Every judgement (of one experiment's prompts, when given), oldest first, with ``tuned_reply``,
    ``base_reply`` and ``preferred`` (``tuned`` / ``base`` / ``tie``) resolved from the sides."""
    if not Path(db).is_file():
        return []
    import sqlite3

    with connect(db, create=False) as con:
        con.execute(TABLE)
        con.row_factory = sqlite3.Row
        where, args = ("WHERE experiment_id = ?", (experiment_id,)) if experiment_id is not None else ("", ())
        rows = [dict(r) for r in con.execute(f"SELECT * FROM PreferenceJudgements {where} ORDER BY id", args)]
    for r in rows:
        tuned_a = r["tuned_side"] == "A"
        r["tuned_reply"], r["base_reply"] = (r["reply_a"], r["reply_b"]) if tuned_a else (r["reply_b"], r["reply_a"])
        r["preferred"] = "tie" if r["choice"] == "tie" else ("tuned" if r["choice"] == r["tuned_side"] else "base")
    return rows


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (``(0, 1)`` for no trials)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class WinRate:
    """Tuned vs base over blind judgements: wins, losses, ties; the rate and interval leave ties out."""

    tuned: int
    base: int
    ties: int

    @property
    def n(self) -> int:
        return self.tuned + self.base + self.ties

    @property
    def rate(self) -> Optional[float]:
        decided = self.tuned + self.base
        return self.tuned / decided if decided else None

    @property
    def interval(self) -> tuple[float, float]:
        return wilson_interval(self.tuned, self.tuned + self.base)

    def describe(self) -> str:
        """``tuned preferred in 7 of 10 (70%, 95% Wilson interval 40%-89%), base 3, ties 2, n=12``."""
        decided = self.tuned + self.base
        if not decided:
            return f"no decided judgements yet (ties {self.ties}, n={self.n})"
        low, high = self.interval
        return (f"tuned preferred in {self.tuned} of {decided} ({self.rate:.0%}, 95% Wilson interval "
                f"{low:.0%}-{high:.0%}), base {self.base}, ties {self.ties}, n={self.n}")


def win_rate(db: str | Path, experiment_id: Optional[int] = None) -> Optional[WinRate]:
    """The tuned model's win rate over the judgements (of one experiment's prompts); ``None`` without any."""
    rows = judgements_of(db, experiment_id)
    if not rows:
        return None
    count = {k: sum(r["preferred"] == k for r in rows) for k in ("tuned", "base", "tie")}
    return WinRate(count["tuned"], count["base"], count["tie"])


def sampled_prompts(db: str | Path, experiment_id: int, n: int, rng: random.Random) -> list[str]:
    """Up to ``n`` distinct prompts of the experiment's generated replies, in a random order."""
    prompts = list(dict.fromkeys(r["input_text"] for r in responses_of(db, experiment_id)))
    if not prompts:
        raise UserError(f"experiment {experiment_id} has no generated replies to take prompts from")
    rng.shuffle(prompts)
    return prompts[:n]
