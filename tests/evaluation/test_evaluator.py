"""The evaluator: rows of every rank back in input order (each once), the summary, what is logged, score names."""
from contextlib import contextmanager

import pytest
import torch

from bengali_empathy.evaluation.evaluator import Evaluator, merge_ranks
from bengali_empathy.generation.decoding import Decoding
from bengali_empathy.generation.generator import GenerationStats
from bengali_empathy.evaluation.metrics import SCORE_NAMES, TEXT_SCORES, score_texts
from bengali_empathy.models.memory import MemorySettings
from bengali_empathy.schema import EvalRow
from bengali_empathy.training.module import EmpathyLM
from conftest import TWO_PAIRS, two_pair_batch

A = "আপনার মন খারাপের কথা শুনে আমারও খারাপ লাগছে।"
B = "পরীক্ষার ফল ভালো হয়নি বলে মন খারাপ।"
C = "নতুন শহরে এসে কাউকে চিনি না।"


def _row(file, line, reference=A, prompt=B, category=None):
    return EvalRow(file, line, f"{file}:{line}", prompt, reference, [128000, line], category)


def _gen(tokens, seconds, base=None):
    g = {"rows": 1, "new_tokens": tokens, "seconds": seconds, "tokens_per_sec": tokens / seconds, "batch_size": 4}
    return {**g, "base": base} if base else g


def test_rows_of_two_ranks_come_back_in_input_order_each_once():
    # The distributed sampler gives rank 1 a repeat of rank 0's first row to even out the batches.
    rank0 = [_row("a.jsonl", 1), _row("a.jsonl", 3), _row("b.jsonl", 2)]
    rank1 = [_row("a.jsonl", 2), _row("b.jsonl", 1), _row("a.jsonl", 1)]
    rows, generation = merge_ranks([(rank0, _gen(30, 2.0, _gen(10, 1.0))), (rank1, _gen(20, 3.0, _gen(5, 4.0)))])
    assert [r.position for r in rows] == [("a.jsonl", 1), ("a.jsonl", 2), ("a.jsonl", 3), ("b.jsonl", 1),
                                          ("b.jsonl", 2)]
    assert generation["rows"] == 5 and generation["new_tokens"] == 50 and generation["seconds"] == 3.0
    assert generation["tokens_per_sec"] == pytest.approx(50 / 3.0, abs=0.1) and generation["ranks"] == 2
    assert generation["base"]["new_tokens"] == 15 and generation["base"]["seconds"] == 4.0


def test_a_rank_without_rows_adds_nothing():
    rows, generation = merge_ranks([([_row("a.jsonl", 2), _row("a.jsonl", 1)], _gen(3, 1.0)), ([], None)])
    assert [r.line for r in rows] == [1, 2] and generation["new_tokens"] == 3 and generation["ranks"] == 2


class FakeHost:
    """A model that scores every batch 2.0 nats per token (3.0 as its base) and replies with the reference
    (C as its base); it records what the evaluator logs."""

    decoding = Decoding(max_new_tokens=4)
    logger = None
    global_step = 0

    class tokenizer:  # noqa: N801 - stands in for a tokenizer object
        @staticmethod
        def batch_decode(rows, skip_special_tokens=True):
            return ["ক" * len(r) for r in rows]

    def __init__(self):
        self.base = False
        self.logged, self.printed, self.prompts = {}, [], []

    def __call__(self, batch):
        n = int((batch["labels"] != -100).sum())
        return torch.tensor(3.0 if self.base else 2.0), torch.tensor(n)

    @contextmanager
    def adapter_disabled(self):
        self.base = True
        try:
            yield
        finally:
            self.base = False

    def training_texts(self):
        return self.train_texts()

    def train_texts(self):  # the corpus's training turns: none by default
        return None

    def generate_texts(self, prompts, desc, progress):
        self.prompts.append(prompts)
        replies = [C if self.base else self.references[tuple(p)] for p in prompts]
        return replies, GenerationStats(rows=len(prompts), new_tokens=2 * len(prompts), seconds=1.0, batch_size=8)

    def log(self, name, value, **kwargs):
        self.logged[name] = value

    def print(self, *args):
        self.printed.append(" ".join(map(str, args)))


def _batch(rows):
    labels = torch.full((len(rows), 6), -100)
    labels[:, 2:5] = 7  # three reply tokens per row
    return {"labels": labels, "eval_rows": rows}


def test_a_pass_scores_tuned_and_base_summarises_and_logs_the_score_names():
    host = FakeHost()
    batches = [[_row("c.jsonl", 1, A, category="sad"), _row("c.jsonl", 2, B, category="lonely")],
               [_row("c.jsonl", 3, C, category="sad")]]
    host.references = {tuple(r.prompt_ids): r.reference for b in batches for r in b}
    evaluator = Evaluator(compare_base=True)
    for i, rows in enumerate(batches):
        evaluator.step(host, "test", _batch(rows), i, fitting=False)
    evaluation = evaluator.finish(host, "test", fitting=False)
    assert [r.line for r in evaluation.rows] == [1, 2, 3] and evaluator.last is evaluation
    assert [r.prediction for r in evaluation.rows] == [A, B, C] and {r.base_prediction for r in evaluation.rows} == {C}
    # every field in file order, each reply followed by whether it is empty
    assert list(evaluation.output_rows()[0]) == ["id", "prompt", "reference", "prediction", "prediction_empty",
                                                 "base_prediction", "base_prediction_empty", "category"]
    assert [r["prediction_empty"] for r in evaluation.output_rows()] == [False, False, False]
    m = evaluation.metrics
    assert m["loss"] == pytest.approx(2.0) and m["base"]["loss"] == pytest.approx(3.0)
    assert m["delta"]["loss"] == pytest.approx(-1.0) and m["reply_tokens"] == 9 and m["reply_chars"] == 9
    base = score_texts([C, C, C], [A, B, C])
    assert m["chrf"] == pytest.approx(1.0) and m["base"]["chrf"] == pytest.approx(base["chrf"])
    assert set(m["by_category"]) == {"lonely", "sad"} and m["generation"]["base"]["new_tokens"] == 6
    assert set(m["delta"]) <= set(SCORE_NAMES)
    assert {f"test/{k}" for k in SCORE_NAMES} <= set(host.logged)  # every score name, tuned and base
    assert {f"test_base/{k}" for k in SCORE_NAMES} <= set(host.logged)
    assert host.logged["test/loss"] == pytest.approx(2.0) and "test/generated_tokens_per_sec" in host.logged
    assert not any(evaluator.losses[k].tokens for k in evaluator.losses)  # reset for the next pass


def test_metrics_json_of_a_pass_has_the_reply_scores_for_tuned_base_delta_and_each_category(tmp_path):
    import json

    host = FakeHost()
    rows = [_row("c.jsonl", 1, A, category="sad"), _row("c.jsonl", 2, B, category="lonely"),
            _row("c.jsonl", 3, C, category="sad")]
    host.references = {tuple(r.prompt_ids): r.reference for r in rows}
    evaluator = Evaluator(compare_base=True)
    evaluator.step(host, "test", _batch(rows), 0, fitting=False)
    evaluator.finish(host, "test", fitting=False).write(tmp_path)
    m = json.loads((tmp_path / "metrics.json").read_text())
    # Tuned replies are the references A (8 words, 8 distinct), B (7 words; মন and খারাপ are A's: 5 new) and
    # C (6 words, 6 new): 21 words, 19 distinct, 18 bigrams all distinct. Base replies are C three times:
    # 18 words, 6 distinct; 15 bigrams, 5 distinct. None asks a question or loops; all are Bengali.
    tuned = {"distinct_1": 19 / 21, "distinct_2": 1.0, "reply_words": 7.0, "reference_words": 7.0,
             "bengali_script": 1.0, "asks_question": 0.0, "repeats_trigram": 0.0}
    base = {**tuned, "distinct_1": 6 / 18, "distinct_2": 5 / 15, "reply_words": 6.0}
    assert {k: m[k] for k in tuned} == pytest.approx(tuned)
    assert {k: m["base"][k] for k in base} == pytest.approx(base)
    assert {k: m["delta"][k] for k in tuned} == pytest.approx({k: tuned[k] - base[k] for k in tuned})
    assert m["by_category"]["sad"]["reply_words"] == pytest.approx((8 + 6) / 2)
    assert m["by_category"]["sad"]["base"]["distinct_1"] == pytest.approx(6 / 12)
    assert all(k in m["by_category"][c] and k in m["by_category"][c]["base"] for c in ("sad", "lonely")
               for k in TEXT_SCORES)
    assert host.logged["test/distinct_2"] == pytest.approx(1.0) and "test_base/repeats_trigram" in host.logged


def test_fit_validation_generates_for_the_first_batches_only_without_base_or_checks():
    host = FakeHost()
    batches = [[_row("v.jsonl", 1)], [_row("v.jsonl", 2)], [_row("v.jsonl", 3)]]
    host.references = {tuple(r.prompt_ids): r.reference for b in batches for r in b}
    evaluator = Evaluator(compare_base=True, val_generate_batches=1)
    host.train_texts = lambda: pytest.fail("fit's validations run no overlap check")
    for i, rows in enumerate(batches):
        evaluator.step(host, "val", _batch(rows), i, fitting=True)
    evaluation = evaluator.finish(host, "val", fitting=True)
    assert [r.line for r in evaluation.rows] == [1] and host.prompts == [[[128000, 1]]]
    assert "base" not in evaluation.metrics and "checks" not in evaluation.metrics
    assert evaluation.metrics["reply_tokens"] == 9  # the loss covers every batch
    assert "val/chrf" in host.logged and not any(k.startswith("val_base/") for k in host.logged)


def test_score_names_are_one_list_for_reports_and_summaries():
    from bengali_empathy.records.runs import _key_scores
    from bengali_empathy.records.report import _metrics_section

    assert set(TEXT_SCORES) <= set(SCORE_NAMES)
    metrics = {k: 0.5 for k in SCORE_NAMES} | {"n": 3}
    table = "\n".join(_metrics_section(metrics))
    assert all(f"| {name} |" in table for name in SCORE_NAMES.values())
    assert _key_scores(metrics) == ", ".join(f"{k}=0.5000" for k in SCORE_NAMES)


def test_reply_characters_are_those_of_the_reference_replies(tiny_model_path):
    lm = EmpathyLM(model_name_or_path=str(tiny_model_path), backend="hf", memory=MemorySettings(load_in_4bit=False))
    lm.configure_model()
    from bengali_empathy.evaluation.evaluator import reply_chars

    batch = two_pair_batch(lm.tokenizer)
    assert reply_chars(lm.tokenizer, batch) == sum(len(reply) for _, reply in TWO_PAIRS)
