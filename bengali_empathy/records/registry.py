"""The experiment registry: every fit / validate / test / predict recorded in SQLite.

Tables (the first two with the names and columns the original task asked for):

* ``LLAMAExperiments(id, model_name, lora_config, train_loss, val_loss, metrics, timestamp)``:
  ``lora_config`` and ``metrics`` are JSON text; ``metrics`` holds the run's scores and, under
  ``run``, its stage, corpus, steps and log directory.
* ``GeneratedResponses(id, experiment_id, input_text, response_text, timestamp, reference_text,
  base_response_text)``: the generated replies of the run's (last) evaluation.
* ``HumanRatings``: 1-5 scores from ``python -m bengali_empathy rate``; :mod:`.human_ratings` owns, writes
  and reads that table (its docstring has the schema).
* ``PreferenceJudgements``: blind pairwise judgements of tuned vs base from the web page
  (``serve``); :mod:`.judgements` owns, writes and reads that table (its docstring has the schema).

A run's rows (an :class:`~.records.ExperimentRecord`, built by :mod:`.records`) are written in one
transaction when it ends, so an interrupted run leaves none; a fit's only after its adapter and
run.json (:func:`~.records.write_fit_records`). Tables are only ever created if missing and appended to.
"""
from __future__ import annotations

import json
import sqlite3
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator, Optional

import lightning as L

from ..errors import UserError
from .run import ExperimentRecord, RunRecordSink, experiment_record

DEFAULT_DB = "lightning_logs/experiments.db"
ASPECTS = ("empathy", "relevance", "fluency", "coherence", "helpfulness")

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS LLAMAExperiments (
        id INTEGER PRIMARY KEY AUTOINCREMENT, model_name TEXT NOT NULL, lora_config TEXT, train_loss REAL,
        val_loss REAL, metrics TEXT, timestamp TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS GeneratedResponses (
        id INTEGER PRIMARY KEY AUTOINCREMENT, experiment_id INTEGER NOT NULL REFERENCES LLAMAExperiments(id),
        input_text TEXT NOT NULL, response_text TEXT NOT NULL, timestamp TEXT NOT NULL, reference_text TEXT,
        base_response_text TEXT)""",
]


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@contextmanager
def connect(path: str | Path, create: bool = True) -> Iterator[sqlite3.Connection]:
    """A connection with the schema in place; SQLite failures become one-line :class:`UserError`s."""
    path = Path(path)
    if not create and not path.is_file():
        raise UserError(f"experiment database not found: {path}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(str(path), timeout=5.0)
    except (OSError, sqlite3.Error) as exc:
        raise UserError(f"cannot open experiment database {path}: {exc}") from exc
    try:
        con.execute("PRAGMA foreign_keys = ON")
        with con:
            for statement in SCHEMA:
                con.execute(statement)
        yield con
    except sqlite3.DatabaseError as exc:
        text = str(exc)
        if "not a database" in text:
            raise UserError(f"{path} is not an SQLite database (set another registry.db_path)") from exc
        if "locked" in text:
            raise UserError(f"experiment database {path} is locked by another process") from exc
        raise UserError(f"experiment database {path}: {text}") from exc
    finally:
        con.close()


def record_run(db: str | Path, model_name: str, lora_config: dict, train_loss: Optional[float],
               val_loss: Optional[float], metrics: dict, responses: list[dict]) -> int:
    """Insert one experiment and its generated replies in one transaction; returns its id."""
    stamp = now()
    with connect(db) as con, con:
        cur = con.execute(
            "INSERT INTO LLAMAExperiments (model_name, lora_config, train_loss, val_loss, metrics, timestamp) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (model_name, json.dumps(lora_config, ensure_ascii=False), train_loss, val_loss,
             json.dumps(metrics, ensure_ascii=False, default=str), stamp))
        experiment_id = int(cur.lastrowid)
        con.executemany(
            "INSERT INTO GeneratedResponses (experiment_id, input_text, response_text, timestamp, reference_text, "
            "base_response_text) VALUES (?, ?, ?, ?, ?, ?)",
            [(experiment_id, r["prompt"], r["prediction"], stamp, r.get("reference"), r.get("base_prediction"))
             for r in responses if "prediction" in r])
    return experiment_id


def find_experiment(db: str | Path, ref: str) -> Optional[dict]:
    """An experiment by id, or the newest one whose log directory is ``ref``; ``None`` when there is none."""
    with connect(db, create=False) as con:
        con.row_factory = sqlite3.Row
        if ref.isdigit():
            row = con.execute("SELECT * FROM LLAMAExperiments WHERE id = ?", (int(ref),)).fetchone()
        else:
            target = str(Path(ref).resolve())
            row = next((r for r in con.execute("SELECT * FROM LLAMAExperiments ORDER BY id DESC")
                        if json.loads(r["metrics"] or "{}").get("run", {}).get("log_dir") == target), None)
    return None if row is None else dict(row)


def experiment_for(db: str | Path, ref: str) -> dict:
    """:func:`find_experiment`, where none is an error."""
    experiment = find_experiment(db, ref)
    if experiment is None:
        raise UserError(f"no experiment {ref!r} in {db}")
    return experiment


def list_experiments(db: str | Path) -> list[dict]:
    """Every experiment, oldest first, with ``lora_config`` and ``metrics`` parsed."""
    with connect(db, create=False) as con:
        con.row_factory = sqlite3.Row
        rows = [dict(r) for r in con.execute("SELECT * FROM LLAMAExperiments ORDER BY id")]
    for r in rows:
        r["lora_config"], r["metrics"] = json.loads(r["lora_config"] or "{}"), json.loads(r["metrics"] or "{}")
    return rows


def recorded_score(metrics: dict, name: str) -> Optional[tuple[str, float]]:
    """The key and value under which a run's ``metrics`` hold score ``name``: an evaluation's at the top
    level, a fit's final validation under ``val/``; None where there is neither."""
    for key in (name, f"val/{name}"):
        if isinstance(metrics.get(key), (int, float)):
            return key, metrics[key]
    return None


def responses_of(db: str | Path, experiment_id: int) -> list[dict]:
    with connect(db, create=False) as con:
        con.row_factory = sqlite3.Row
        return [dict(r) for r in con.execute(
            "SELECT * FROM GeneratedResponses WHERE experiment_id = ? ORDER BY id", (experiment_id,))]


class ExperimentRegistry(L.Callback, RunRecordSink):
    """Records every fit / validate / test / predict in the SQLite registry when it ends (rank 0).

    Args:
        db_path: the SQLite file (created if missing, only ever appended to); ``null`` = no registry.
    """

    def __init__(self, db_path: Optional[str] = DEFAULT_DB) -> None:
        self.db_path = db_path
        self.last_id: Optional[int] = None
        if db_path and Path(db_path).exists():
            with connect(db_path):  # a bad or locked file fails here, before anything runs or is written
                pass

    def store(self, record: ExperimentRecord, say: Callable[[str], None] = print) -> None:
        """Insert ``record`` (and its replies); a registry without a file records nothing."""
        if not self.db_path:
            return
        self.last_id = record_run(self.db_path, record.model_name, record.lora_config, record.train_loss,
                                  record.val_loss, record.metrics, record.responses)
        say(f"recorded as experiment {self.last_id} in {self.db_path}")

    def store_fit(self, record: ExperimentRecord) -> None:
        """A fit's row, which :func:`~.records.write_fit_records` hands over once the adapter and run.json exist."""
        self.store(record)

    def _record(self, trainer, pl_module, stage: str) -> None:
        log_dir = trainer.log_dir  # a collective call under DDP: every rank asks
        if not self.db_path or not trainer.is_global_zero or trainer.sanity_checking:
            return
        self.store(experiment_record(stage, pl_module.run_info(), trainer, log_dir, pl_module.last_evaluation),
                   pl_module.print)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == "validate":
            self._record(trainer, pl_module, "validate")

    def on_test_end(self, trainer, pl_module) -> None:
        self._record(trainer, pl_module, "test")

    def on_predict_end(self, trainer, pl_module) -> None:
        self._record(trainer, pl_module, "predict")
