"""``rate``: a rating session kept until quit or the end of input, blind mixing of base and tuned replies, refusals
(bengali_empathy.records.rating)."""
import io

import pytest

from bengali_empathy.errors import UserError
from bengali_empathy.records.human_ratings import rating_summary
from bengali_empathy.records.rating import rate
from bengali_empathy.records.registry import connect, record_run
from conftest import run_cli


LORA = {"r": 16, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}



ROWS = [{"prompt": f"প্রশ্ন {i}", "reference": f"উত্তর {i}", "prediction": f"জবাব {i}", "base_prediction": f"base {i}"}
        for i in range(4)]


def test_rating_session_keeps_answers_until_quit(tmp_path):
    db = tmp_path / "e.db"
    eid = record_run(db, "m", LORA, None, None, {}, ROWS)
    answers = iter(["4 5 4 4 3", "warm reply", "7 1", "3 3 3 3 3", "", "q"])
    out = io.StringIO()
    assert rate(str(db), str(eid), n=4, blind=False, seed=0, ask=lambda _: next(answers), out=out) == 2
    assert "please give 5 whole numbers" in out.getvalue()
    summary = rating_summary(db, eid)
    assert summary == {"tuned": {"n": 2, "empathy": 3.5, "relevance": 4.0, "fluency": 3.5, "coherence": 3.5,
                                 "helpfulness": 3.0}}
    with connect(db) as con:
        assert con.execute("SELECT comment FROM HumanRatings ORDER BY id").fetchall() == [("warm reply",), (None,)]



def test_blind_rating_mixes_base_and_tuned_without_labels(tmp_path):
    db = tmp_path / "e.db"
    eid = record_run(db, "m", LORA, None, None, {}, ROWS)
    out = io.StringIO()
    rate(str(db), str(eid), n=8, blind=True, seed=1, ask=lambda prompt: "" if "comment" in prompt else "2 2 2 2 2",
         out=out)
    shown = out.getvalue()
    assert "tuned" not in shown and "(base" not in shown
    assert set(rating_summary(db, eid)) == {"tuned", "base"}



def test_rating_a_run_without_replies_is_refused(tmp_path):
    db = tmp_path / "e.db"
    eid = record_run(db, "m", LORA, 1.0, 1.0, {}, [])
    with pytest.raises(UserError, match="no generated replies"):
        rate(str(db), str(eid), 5, False, 0, lambda _: "q", io.StringIO())
    only_tuned = record_run(db, "m", LORA, None, None, {}, [{k: v for k, v in ROWS[0].items() if k != "base_prediction"}])
    with pytest.raises(UserError, match="--blind needs"):
        rate(str(db), str(only_tuned), 5, True, 0, lambda _: "q", io.StringIO())


def test_rate_reads_scores_from_standard_input_and_stops_at_end_of_input(tmp_path):
    from bengali_empathy.records.human_ratings import rating_summary
    from bengali_empathy.records.registry import record_run

    db = tmp_path / "e.db"
    rows = [{"prompt": f"প্রশ্ন {i}", "reference": "উ", "prediction": f"জবাব {i}", "base_prediction": f"খ {i}"}
            for i in range(5)]
    eid = record_run(db, "m", {}, None, None, {"run": {"log_dir": str(tmp_path / "run")}}, rows)
    r = run_cli(["rate", str(tmp_path / "run"), "--n", "4", "--blind", "true", "--db", str(db)], cwd=tmp_path,
                stdin="5 4 4 5 4\nআন্তরিক\n1 2 3 4 5\n\n")  # two answers, then the input ends
    assert r.returncode == 0, r.stderr[-2000:]
    assert "stopped: 2 rated" in r.stdout
    summary = rating_summary(db, eid)
    assert sum(s["n"] for s in summary.values()) == 2
