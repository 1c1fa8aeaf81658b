"""metrics.json of an evaluation: base vs tuned, per category, and the honesty checks."""
import pytest

from bengali_empathy.checks import NearDuplicateIndex, degenerate_predictions, train_overlap, warnings_for
from bengali_empathy.evaluation import summarize
from bengali_empathy.metrics import score_texts

A = "আপনার মন খারাপের কথা শুনে আমারও খারাপ লাগছে। আজ নিজের জন্য ছোট কোনো আরামের কাজ করবেন কি?"
B = "পরীক্ষার ফল ভালো হয়নি বলে মন খারাপ, বাবা-মা কী বলবেন ভেবে ভয় লাগছে।"
C = "নতুন শহরে এসে কাউকে চিনি না, সন্ধ্যাগুলো খুব একা কাটে।"
D = "ঘুম আসে না, রাতভর নানা চিন্তা মাথায় ঘোরে।"


def _row(i, prompt, reference, prediction, base=None, category=None):
    r = {"id": str(i), "prompt": prompt, "reference": reference, "prediction": prediction, "category": category}
    if base is not None:
        r["base_prediction"] = base
    return r


def test_base_tuned_and_delta_are_each_computed_from_their_own_replies():
    rows = [_row(0, B, A, A, base=C, category="sad"), _row(1, C, D, C, base=D, category="lonely"),
            _row(2, D, B, B, base="", category="sad")]
    loss = {"loss": 1.5, "perplexity": 4.48, "reply_tokens": 10}
    base_loss = {"loss": 2.5, "perplexity": 12.2, "reply_tokens": 10}
    m = summarize(rows, loss, base_loss)
    tuned = score_texts([A, C, B], [A, D, B])
    base = score_texts([C, D, ""], [A, D, B])
    for k in ("bleu", "rougeL", "chrf"):
        assert m[k] == pytest.approx(tuned[k]) and m["base"][k] == pytest.approx(base[k])
        assert m["delta"][k] == pytest.approx(tuned[k] - base[k])
    assert m["delta"]["loss"] == pytest.approx(-1.0)
    sad = score_texts([A, B], [A, B])
    assert set(m["by_category"]) == {"lonely", "sad"} and m["by_category"]["sad"]["n"] == 2
    assert m["by_category"]["sad"]["chrf"] == pytest.approx(sad["chrf"])
    assert m["by_category"]["sad"]["base"]["chrf"] == pytest.approx(score_texts([C, ""], [A, B])["chrf"])
    assert any("1 of 3 predictions are empty" in w and w.startswith("base") for w in m["warnings"])


def test_echoed_references_are_flagged():
    # The original project's ROUGE-L 1.0: the reference was in the prompt and came back out.
    rows = [_row(i, f"{p}\n{r}", r, r) for i, (p, r) in enumerate([(A, B), (B, C), (C, D)])]
    m = summarize(rows, {})
    assert m["rougeL"] == pytest.approx(1.0)
    warnings = " ".join(m["warnings"])
    assert "ROUGE-L 1.0 on 3" in warnings and "3 of 3 predictions copy the prompt" in warnings


def test_repeated_and_empty_predictions_are_flagged():
    rows = [_row(0, A, B, D), _row(1, B, C, D + "।"), _row(2, C, A, ""), _row(3, A, B, D)]
    deg = degenerate_predictions(rows)
    assert deg["empty"] == 1 and deg["most_common_count"] == 3 and deg["copies_prompt"] == 0
    warnings = " ".join(warnings_for(None, deg))
    assert "repeated for 3 of 4 rows" in warnings and "1 of 4 predictions are empty" in warnings


def test_ordinary_predictions_raise_no_warning():
    rows = [_row(0, A, B, C), _row(1, B, C, D), _row(2, C, D, A)]
    assert warnings_for(None, degenerate_predictions(rows)) == []


def test_training_overlap_exact_near_and_none():
    near_a = A.replace("ছোট", "ছোটো")  # one spelling variant
    index = NearDuplicateIndex([A, B])
    assert index.match("  " + A.replace("।", "") + " ") == "exact"  # punctuation and spaces do not count
    assert index.match(near_a) == "near"
    assert index.match(C) == ""
    rows = [_row(0, A, C, "x"), _row(1, near_a, D, "y"), _row(2, D, B, "z")]
    overlap = train_overlap(rows, train_prompts=[A, B], train_replies=[B])
    assert overlap["prompt"]["exact"] == 1 and overlap["prompt"]["near"] == 1
    assert overlap["reference"]["exact"] == 1 and overlap["reference"]["near"] == 0
    assert {e["id"] for e in overlap["prompt"]["examples"]} == {"0", "1"}
    warnings = warnings_for(overlap, degenerate_predictions(rows))
    assert "1 evaluated prompts occur exactly and 1 nearly in the training split" in warnings


def test_predictions_that_begin_by_echoing_the_prompt_are_counted():
    rows = [_row(0, C, A, C + " " + A), _row(1, B, C, D), _row(2, D, B, A)]
    deg = degenerate_predictions(rows)
    assert deg["starts_with_prompt"] == 1
    assert "1 of 3 predictions begin by echoing the prompt" in warnings_for(None, deg)
