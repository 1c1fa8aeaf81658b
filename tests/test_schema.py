"""The rows an evaluation writes (bengali_empathy.schema)."""
from bengali_empathy.schema import EvalRow


def test_predictions_mark_empty_replies():
    row = EvalRow("c.jsonl", 1, "1", "p", "r", prediction=" ", base_prediction="উত্তর")
    assert row.output()["prediction_empty"] is True and row.output()["base_prediction_empty"] is False
    assert "base_prediction_empty" not in EvalRow("c.jsonl", 1, "1", "p", "r", prediction="x").output()
