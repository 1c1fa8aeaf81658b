"""The SQLite experiment registry."""
import sqlite3

import pytest

from bengali_empathy.errors import UserError
from bengali_empathy.records.registry import connect, experiment_for, record_run, responses_of

LORA = {"r": 16, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
ROWS = [{"prompt": f"প্রশ্ন {i}", "reference": f"উত্তর {i}", "prediction": f"জবাব {i}", "base_prediction": f"base {i}"}
        for i in range(4)]


def _columns(con, table):
    return [r[1] for r in con.execute(f"PRAGMA table_info({table})")]


def test_tables_have_the_task_schema(tmp_path):
    with connect(tmp_path / "e.db") as con:
        assert _columns(con, "LLAMAExperiments") == ["id", "model_name", "lora_config", "train_loss", "val_loss",
                                                     "metrics", "timestamp"]
        assert _columns(con, "GeneratedResponses")[:5] == ["id", "experiment_id", "input_text", "response_text",
                                                           "timestamp"]
        assert {"reference_text", "base_response_text"} <= set(_columns(con, "GeneratedResponses"))


def test_a_run_is_one_transaction(tmp_path):
    db = tmp_path / "e.db"
    eid = record_run(db, "m", LORA, 1.0, 2.0, {"bleu": 0.1, "run": {"log_dir": str(tmp_path)}}, ROWS)
    assert [r["response_text"] for r in responses_of(db, eid)] == [r["prediction"] for r in ROWS]
    assert experiment_for(db, str(tmp_path))["id"] == eid
    with pytest.raises(KeyError):  # fails half way through the replies ...
        record_run(db, "m", LORA, None, None, {}, ROWS[:2] + [{"prediction": "no prompt"}])
    with connect(db) as con:  # ... and leaves neither the experiment nor any of its replies
        assert con.execute("SELECT COUNT(*) FROM LLAMAExperiments").fetchone()[0] == 1
        assert con.execute("SELECT COUNT(*) FROM GeneratedResponses").fetchone()[0] == len(ROWS)


def test_bad_database_files_are_one_line_errors_and_never_rewritten(tmp_path):
    text = tmp_path / "notes.db"
    text.write_text("not a database, just notes\n" * 100)
    before = text.read_bytes()
    with pytest.raises(UserError, match="not an SQLite database"):
        record_run(text, "m", LORA, None, None, {}, [])
    assert text.read_bytes() == before
    db = tmp_path / "e.db"
    record_run(db, "m", LORA, None, None, {}, [])
    holder = sqlite3.connect(str(db))
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(UserError, match="locked"):
            with connect(db) as con:
                con.execute("SELECT 1").fetchone()
    finally:
        holder.rollback()
        holder.close()
    with pytest.raises(UserError, match="no experiment '99'"):
        experiment_for(db, "99")
