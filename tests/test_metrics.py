import math

import pytest
import torch

from bengali_empathy.metrics import (
    BengaliTextMetrics, TokenWeightedPerplexity, bleu_tokenize, normalize_bn, score_texts,
)

A = "আমি আজ খুব একা বোধ করছি। কেউ আমার কথা শোনে না, আর সব কিছু অর্থহীন লাগে।"
B = "পরীক্ষার ফল ভালো হয়েছে বলে সবাই মিলে মিষ্টি খেলাম আর উৎসব করলাম!"
C = "আপনার মন খারাপের কথা শুনে আমারও খারাপ লাগছে। আজ নিজের জন্য ছোট কোনো আরামের কাজ করবেন কি?"


def test_identical_bengali_scores_one():
    s = score_texts([A, C], [A, C])
    assert s["bleu"] == pytest.approx(1.0)
    assert s["rougeL"] == pytest.approx(1.0)
    assert s["chrf"] == pytest.approx(1.0)


def test_unrelated_bengali_scores_near_zero():
    s = score_texts([B, A], [A, C])
    assert s["bleu"] == 0.0
    assert s["rougeL"] < 0.15
    assert s["chrf"] < 0.15


def test_partial_overlap_is_between():
    pred = "আমি আজ খুব একা বোধ করছি। সব কিছু অর্থহীন লাগে।"
    s = score_texts([pred], [A])
    assert 0.2 < s["rougeL"] < 1.0
    assert 0.2 < s["chrf"] < 1.0


def test_default_torchmetrics_rouge_deletes_bengali_but_ours_does_not():
    from torchmetrics.text import ROUGEScore

    assert float(ROUGEScore(rouge_keys=("rougeL",))([A], [A])["rougeL_fmeasure"]) == 0.0
    m = BengaliTextMetrics()
    m.update([A], [A])
    assert m.compute()["rougeL"] == pytest.approx(1.0)


def test_normalisation_and_tokenisation():
    assert normalize_bn("কেমন আছেন? ভালো।") == "কেমন আছেন ভালো"
    assert bleu_tokenize("কেমন আছেন? ভালো।").split() == ["কেমন", "আছেন", "?", "ভালো", "।"]
    # NFC: a decomposed 'য়' (য + nukta) equals the precomposed one
    assert normalize_bn("য\u09bc") == normalize_bn("\u09df")
    assert score_texts(["য\u09bcাত্রা শুরু হলো আজ থেকে নতুন করে"], ["\u09dfাত্রা শুরু হলো আজ থেকে নতুন করে"])["bleu"] == 1.0


def test_perplexity_is_token_weighted():
    ppl = TokenWeightedPerplexity()
    ppl.update(torch.tensor(2.0), 30)
    ppl.update(torch.tensor(1.0), 10)
    expected = math.exp((2.0 * 30 + 1.0 * 10) / 40)
    assert float(ppl.compute()) == pytest.approx(expected, rel=1e-6)
    assert float(ppl.compute()) != pytest.approx(math.exp(1.5))  # not the plain batch mean
