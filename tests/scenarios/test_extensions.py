"""The three extension examples of docs/architecture.md (a backend, a corpus layout, a metric) run as written."""
import re

import pytest
import sacrebleu

from conftest import ROOT


DOC = "docs/architecture.md"


def doc_block(heading: str) -> dict:
    """Execute the first python block after ``heading`` in docs/architecture.md; returns its namespace."""
    text = (ROOT / DOC).read_text(encoding="utf-8")
    block = re.search(re.escape(heading) + r".*?```python\n(.*?)```", text, re.S)
    assert block, f"no python block after {heading!r} in {DOC}"
    namespace: dict = {}
    exec(compile(block.group(1), f"{DOC} ({heading})", "exec"), namespace)
    return namespace


def test_backend_example_registers_and_trains_fp32_lora(tiny_model_path, tokenizer, monkeypatch):
    import torch

    from bengali_empathy.models import backends
    from bengali_empathy.models.lora import LoraSettings
    from conftest import two_pair_batch

    ns = doc_block("**A backend**")
    monkeypatch.setattr(backends, "BACKENDS", backends.BACKENDS + ("hf-fp32-lora",))  # "its name in BackendName"
    try:
        backend = backends.make_backend("hf-fp32-lora", load_in_4bit=False, gradient_checkpointing=False)
        assert isinstance(backend, ns["Fp32LoraBackend"])
        model, _ = backend.load(tiny_model_path, 256, LoraSettings(), None)
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert trainable and all(p.dtype == torch.float32 for p in trainable)
        loss, n = backend.loss(model, two_pair_batch(tokenizer))
        loss.backward()
        assert torch.isfinite(loss) and int(n) > 0 and all(p.grad is not None for p in trainable)
    finally:
        backends.REGISTRY.pop("hf-fp32-lora", None)


def test_corpus_layout_example_puts_the_history_before_the_exchange():
    from bengali_empathy.data import CorpusFormat

    ns = doc_block("**A corpus layout**")
    fmt = CorpusFormat(["prompt", "response", "history"], "h.jsonl")
    fmt.to_turns = ns["HistoryThenExchange"]("history", fmt.to_turns)  # what the doc's branch does
    conv = fmt.conversation({"prompt": "আজ আবার মন খারাপ।", "response": "আবার কী হলো? বলুন।",
                             "history": ["কাল ঘুম হয়নি।", "কেন, কী হয়েছিল?"]}, "h.jsonl: row 1")
    assert [t["role"] for t in conv.turns] == ["user", "assistant", "user", "assistant"]
    assert [t["content"] for t in conv.turns] == ["কাল ঘুম হয়নি।", "কেন, কী হয়েছিল?", "আজ আবার মন খারাপ।",
                                                 "আবার কী হলো? বলুন।"]
    assert "history" in fmt.to_turns.fields and "prompt" in fmt.to_turns.fields


def test_metric_example_reaches_metrics_json_and_the_report(monkeypatch):
    from torchmetrics import MetricCollection

    from bengali_empathy.evaluation import metrics
    from bengali_empathy.evaluation.evaluator import summarize
    from bengali_empathy.records.report import _metrics_section
    from bengali_empathy.schema import EvalRow

    original = metrics.text_metrics
    monkeypatch.setitem(metrics.SCORE_NAMES, "ter", None)  # removed again after the test
    ns = doc_block("**A metric**")
    assert metrics.SCORE_NAMES["ter"] == "TER"
    monkeypatch.setattr(metrics, "text_metrics", lambda **kw: MetricCollection(
        {**dict(original(**kw).items()), "ter": ns["BengaliTER"](**kw)}))  # the doc's one added line
    preds, refs = ["আমি আছি, বলুন।", "ভয় পাবেন না।"], ["আমি আছি, বলুন কী হয়েছে।", "ভয় পাওয়া স্বাভাবিক।"]
    rows = [EvalRow("x.jsonl", i + 1, str(i), "p", r, prediction=p) for i, (p, r) in enumerate(zip(preds, refs))]
    summary = summarize([r.output() for r in rows], {"loss": 1.0})
    assert summary["ter"] == pytest.approx(sacrebleu.corpus_ter(preds, [refs]).score / 100, abs=1e-6)
    assert any("TER" in line for line in _metrics_section(summary))
