"""Blind pairwise judgements (bengali_empathy.records.judgements): the table, the sides, the win rate and where it shows."""
import random
import sqlite3

import pytest
from conftest import run_cli

from bengali_empathy.errors import UserError
from bengali_empathy.records.judgements import (Judgement, blind_pair, judgements_of, record_judgement, sampled_prompts,
                                        wilson_interval, win_rate)
from bengali_empathy.records.registry import record_run

LORA = {"r": 16, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj"]}


def _judge(db, experiment_id, choice, tuned_side, **kw):
    pair = blind_pair("আমি একা।", "টিউন করা উত্তর", "বেস উত্তর", random.Random(0), experiment_id)
    pair = type(pair)(pair.prompt, pair.tuned, pair.base, tuned_side, experiment_id)
    return record_judgement(db, Judgement(pair, choice, kw.pop("rater", "রিনা"), "/a/adapter", "সিস্টেম",
                                          {"max_new_tokens": 8}, **kw))


def test_a_judgement_is_stored_with_its_sides_resolved(tmp_path):
    db = tmp_path / "e.db"
    eid = record_run(db, "m", LORA, None, None, {}, [{"prompt": "p", "prediction": "r"}])
    _judge(db, eid, "A", "B", scores={"a_empathy": 2, "b_empathy": 5}, comment="B শোনে")
    _judge(db, eid, "A", "A")
    _judge(db, None, "tie", "A")  # a prompt the rater typed
    rows = judgements_of(db, eid)
    assert [(r["reply_a"], r["reply_b"], r["preferred"]) for r in rows] == [
        ("বেস উত্তর", "টিউন করা উত্তর", "base"), ("টিউন করা উত্তর", "বেস উত্তর", "tuned")]
    assert rows[0]["tuned_reply"] == "টিউন করা উত্তর" and rows[0]["base_reply"] == "বেস উত্তর"
    assert (rows[0]["a_empathy"], rows[0]["b_empathy"], rows[0]["a_fluency"]) == (2, 5, None)
    assert rows[0]["rater"] == "রিনা" and rows[0]["comment"] == "B শোনে" and rows[0]["decoding"] == '{"max_new_tokens": 8}'
    assert len(judgements_of(db)) == 3
    with sqlite3.connect(db) as con:  # the table's constraints hold for any writer
        with pytest.raises(sqlite3.IntegrityError):
            con.execute("UPDATE PreferenceJudgements SET tuned_side = 'C' WHERE id = 1")


@pytest.mark.parametrize("bad, message", [
    ({"choice": "C"}, "choose A, B or tie, not 'C'"),
    ({"rater": "  "}, "give your name as rater"),
    ({"scores": {"a_empathy": 6}}, "a_empathy must be a whole number from 1 to 5, not 6"),
    ({"scores": {"c_empathy": 3}}, "unknown score 'c_empathy'"),
])
def test_bad_judgements_are_refused_before_anything_is_written(tmp_path, bad, message):
    db = tmp_path / "e.db"
    with pytest.raises(UserError, match=message):
        _judge(db, None, bad.pop("choice", "A"), "A", **bad)
    assert judgements_of(db) == []


def test_wilson_interval_matches_scipy():
    from scipy import stats  # the test extra
    for k, n in ((7, 10), (0, 5), (5, 5), (13, 40)):
        ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert wilson_interval(k, n) == pytest.approx((ci.low, ci.high), abs=1e-9)


def test_win_rate_leaves_ties_out_and_shows_in_runs_show_and_the_report(tmp_path, default_fit):
    db = tmp_path / "e.db"
    fit_dir = default_fit[1]
    eid = record_run(db, "m", LORA, None, None, {"run": {"log_dir": str(fit_dir.resolve())}},
                     [{"prompt": "p", "prediction": "r"}])
    for choice, side in (("A", "A"), ("B", "B"), ("A", "B"), ("tie", "A"), ("B", "B")):
        _judge(db, eid, choice, side)
    wins = win_rate(db, eid)
    assert (wins.tuned, wins.base, wins.ties, wins.n, wins.rate) == (3, 1, 1, 5, 0.75)
    low, high = wilson_interval(3, 4)
    text = wins.describe()
    assert text == f"tuned preferred in 3 of 4 (75%, 95% Wilson interval {low:.0%}-{high:.0%}), base 1, ties 1, n=5"
    r = run_cli(["runs", "show", str(eid), "--db", str(db)], cwd=tmp_path)
    assert r.returncode == 0 and f"blind judgements: {text}" in r.stdout, r.stderr[-2000:]
    r = run_cli(["report", str(fit_dir), "--db", str(db), "--output", str(tmp_path / "report")], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    report = (tmp_path / "report" / "REPORT.md").read_text(encoding="utf-8")
    assert "## Blind judgements, tuned vs base" in report and f"| 3 | 1 | 1 | 5 | 0.7500 | {low:.4f} – {high:.4f} |" in report


def test_prompts_are_sampled_from_the_runs_replies(tmp_path):
    db = tmp_path / "e.db"
    eid = record_run(db, "m", LORA, None, None, {}, [{"prompt": f"প্রশ্ন {i % 3}", "prediction": "r"} for i in range(6)])
    prompts = sampled_prompts(db, eid, 5, random.Random(1))
    assert sorted(prompts) == ["প্রশ্ন 0", "প্রশ্ন 1", "প্রশ্ন 2"]  # distinct, at most what there is
    empty = record_run(db, "m", LORA, None, None, {}, [])
    with pytest.raises(UserError, match=f"experiment {empty} has no generated replies"):
        sampled_prompts(db, empty, 5, random.Random(1))
