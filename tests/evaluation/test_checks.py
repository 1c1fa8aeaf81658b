"""The honesty checks (bengali_empathy.evaluation.checks): echoed references, repeated, empty and prompt-echoing
predictions, training overlap; and the summary that carries their warnings (evaluator.summarize)."""
import pytest

from bengali_empathy.evaluation.checks import NearDuplicateIndex, degenerate_predictions, train_overlap, warnings_for
from bengali_empathy.evaluation.evaluator import summarize
from bengali_empathy.evaluation.metrics import TEXT_SCORES, score_texts
from conftest import dailydialog_turn_rows

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
    for k in TEXT_SCORES:
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
    overlap = train_overlap(rows, [A, B, B])  # every turn of the training conversations
    assert overlap["prompt"]["exact"] == 1 and overlap["prompt"]["near"] == 1
    assert overlap["reference"]["exact"] == 1 and overlap["reference"]["near"] == 0
    assert {e["id"] for e in overlap["prompt"]["examples"]} == {"0", "1"}
    warnings = warnings_for(overlap, degenerate_predictions(rows))
    assert any(w.startswith("1 evaluated prompts occur exactly and 1 nearly in the training split") for w in warnings)


def test_training_overlap_looks_across_fields_and_counts_short_turns_apart():
    short = "অবশ্যই।"
    # A test reply that was a training row's prompt (per-turn corpora): found, whichever field it was in.
    rows = [_row(0, C, A, "x"), _row(1, D, short, "y"), _row(2, short, B, "z")]
    overlap = train_overlap(rows, [A, "ঠিক আছে।", short, D])
    assert overlap["reference"]["exact"] == 1 and overlap["reference"]["short"] == 1
    assert overlap["prompt"]["exact"] == 1 and overlap["prompt"]["short"] == 1
    assert {e["id"] for e in overlap["reference"]["examples"]} == {"0"}  # short matches give no examples
    warnings = warnings_for(overlap, degenerate_predictions(rows))
    assert sum("evaluated" in w for w in warnings) == 2
    assert train_overlap(rows[1:2], [short])["reference"] == {"exact": 0, "near": 0, "short": 1, "examples": []}


def test_predictions_that_begin_by_echoing_the_prompt_are_counted():
    rows = [_row(0, C, A, C + " " + A), _row(1, B, C, D), _row(2, D, B, A)]
    deg = degenerate_predictions(rows)
    assert deg["starts_with_prompt"] == 1
    assert "1 of 3 predictions begin by echoing the prompt" in warnings_for(None, deg)


@pytest.mark.parametrize("group_column", ["id", "dialogue_id"])
def test_per_turn_corpus_split_by_row_leaks_its_test_replies_and_by_dialogue_does_not(tmp_path, group_column):
    """DailyDialog-bn as one row per turn: split by row id, nearly every test reply is a later training
    row's prompt; split by dialogue, (almost) none is."""
    from bengali_empathy.data import CorpusColumns, EmpatheticDialogueDataModule, EncodingSettings

    dailydialog_turn_rows(tmp_path / "turns.jsonl")  # 77 dialogues, 565 rows
    dm = EmpatheticDialogueDataModule(corpus_path=str(tmp_path / "turns.jsonl"), max_seq_length=1024,
                                      columns=CorpusColumns(group=group_column),
                                      encoding=EncodingSettings(on_too_long="drop"))
    dm.setup()
    rows = [r.output() for batch in dm.test_dataloader() for r in batch["eval_rows"]]
    overlap = train_overlap(rows, dm.facts.training_texts())["reference"]
    assert len(rows) > 40
    if group_column == "id":
        assert overlap["exact"] > 0.5 * len(rows), overlap
    else:
        assert overlap["exact"] + overlap["near"] <= 0.02 * len(rows), overlap
