"""runs export-preferences: blind judgements -> DPO pairs, 1-5 ratings -> KTO rows."""
import json
import sqlite3

from conftest import run_cli

from bengali_empathy.records.judgements import BlindPair, Judgement, record_judgement
from bengali_empathy.records.human_ratings import record_rating
from bengali_empathy.records.registry import record_run

PROMPTS = ["আমি একা।", "আজ ভয় লাগছে।", "ঘুম আসে না।"]


def registry(tmp_path, judgements: bool):
    """An experiment with three replies (tuned and base), ratings, and (optionally) the rating page's table."""
    db = tmp_path / "experiments.db"
    responses = [{"prompt": p, "prediction": f"tuned {i}", "base_prediction": f"base {i}", "reference": "r"}
                 for i, p in enumerate(PROMPTS)]
    eid = record_run(db, "tiny-random-llama", {}, None, None, {"run": {"stage": "test"}}, responses)
    # mean over the five aspects: tuned 0 -> 4.4 (desirable), base 0 -> 1.6 (undesirable), tuned 1 -> 3.0 (between);
    # tuned 2 rated twice, 5.0 and 3.0 -> 4.0 (desirable at the threshold)
    ratings = [(1, "tuned", [5, 4, 4, 5, 4]), (1, "base", [2, 1, 2, 2, 1]), (2, "tuned", [3, 3, 3, 3, 3]),
               (3, "tuned", [5, 5, 5, 5, 5]), (3, "tuned", [3, 3, 3, 3, 3])]
    for rid, shown, scores in ratings:
        record_rating(db, rid, shown, scores)
    if judgements:  # as serve records them: tuned preferred (shown as A), base preferred (tuned shown as B), a tie
        for k, (tuned_side, choice) in enumerate([("A", "A"), ("B", "A"), ("A", "tie")]):
            pair = BlindPair(PROMPTS[k], f"tuned {k}", f"base {k}", tuned_side, experiment_id=eid)
            record_judgement(db, Judgement(pair, choice, "r1", "adapter", "সহমর্মী হোন।", {}))
        record_judgement(db, Judgement(BlindPair("x", "y", "z", "A"), "A", "r1", "adapter", "s", {}))  # a typed prompt
    return db, eid


def test_blind_judgements_become_pairs(tmp_path):
    db, eid = registry(tmp_path, judgements=True)
    r = run_cli(["runs", "export-preferences", str(eid), "--db", db, "--output", "prefs.jsonl"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "2 dpo rows written to prefs.jsonl: 2 pairs, 1 ties skipped, 3 judgements"
    rows = [json.loads(x) for x in (tmp_path / "prefs.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(x["prompt"], x["chosen"], x["rejected"], x["system"]) for x in rows] == [
        (PROMPTS[0], "tuned 0", "base 0", "সহমর্মী হোন।"), (PROMPTS[1], "base 1", "tuned 1", "সহমর্মী হোন।")]


def test_ratings_become_kto_rows(tmp_path):
    db, eid = registry(tmp_path, judgements=False)
    r = run_cli(["runs", "export-preferences", str(eid), "--db", db, "--output", "kto.jsonl", "--objective", "kto"],
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ("3 kto rows written to kto.jsonl: 2 desirable, 1 undesirable, 1 between skipped, "
                                "4 rated replies")
    rows = [json.loads(x) for x in (tmp_path / "kto.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(x["completion"], x["label"]) for x in rows] == [("base 0", False), ("tuned 0", True), ("tuned 2", True)]
    assert rows[0]["conversation_id"] == rows[1]["conversation_id"] != rows[2]["conversation_id"]
    # a stricter threshold: 4.0 is no longer desirable
    r = run_cli(["runs", "export-preferences", str(eid), "--db", db, "--output", "kto.jsonl", "--objective", "kto",
                 "--desirable-at", "4.2"], cwd=tmp_path)
    assert "1 desirable, 1 undesirable, 2 between skipped" in r.stdout


def test_nothing_to_export_is_one_line(tmp_path):
    db, eid = registry(tmp_path, judgements=False)
    r = run_cli(["runs", "export-preferences", str(eid), "--db", db, "--output", "prefs.jsonl"], cwd=tmp_path)
    assert r.returncode == 2 and not (tmp_path / "prefs.jsonl").exists()
    assert r.stderr.strip() == (f"error: experiment {eid} has no blind judgements (PreferenceJudgements) to export "
                                "as dpo rows (0 pairs, 0 ties skipped, 0 judgements)")
    r = run_cli(["runs", "export-preferences", str(eid), "--db", db, "--output", "k.jsonl", "--objective", "kto",
                 "--desirable-at", "2", "--undesirable-at", "3"], cwd=tmp_path)
    assert r.stderr.strip() == ("error: --undesirable-at (3.0) and --desirable-at (2.0) must satisfy "
                                "1 <= undesirable-at < desirable-at <= 5")
    r = run_cli(["runs", "export-preferences", str(eid), "--db", db], cwd=tmp_path)
    assert r.stderr.strip().startswith("error: usage: runs export-preferences ID_OR_DIR --output prefs.jsonl")
    with sqlite3.connect(db) as con:  # nothing was written to the registry
        assert con.execute("SELECT COUNT(*) FROM LLAMAExperiments").fetchone()[0] == 1
