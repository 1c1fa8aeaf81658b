"""The rows an evaluation writes (bengali_empathy.schema)."""
from bengali_empathy.schema import EvalRow


def test_predictions_mark_empty_replies():
    row = EvalRow("c.jsonl", 1, "1", "p", "r", prediction=" ", base_prediction="উত্তর")
    assert row.output()["prediction_empty"] is True and row.output()["base_prediction_empty"] is False
    assert "base_prediction_empty" not in EvalRow("c.jsonl", 1, "1", "p", "r", prediction="x").output()


def test_the_empty_flag_is_the_rule_metrics_json_counts_by():
    """A reply of punctuation alone ("।") has no words: flagged in predictions.jsonl as the honesty checks count it."""
    from bengali_empathy.evaluation.checks import degenerate_predictions

    rows = [EvalRow("c.jsonl", i, str(i), "p", "r", prediction=p) for i, p in enumerate([" । ", "", "আমি আছি।"])]
    assert [r.output()["prediction_empty"] for r in rows] == [True, True, False]
    assert degenerate_predictions([r.output() for r in rows])["empty"] == 2
