import math

import pytest
import sacrebleu  # the reference implementation (installed: install_requires)
import torch

from bengali_empathy.evaluation.metrics import (
    TokenWeightedLoss, bleu_tokenize, normalize_bn, score_texts, text_metrics,
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
    assert s["bleu"] < 0.05
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
    m = text_metrics()
    m.update([A], [A])
    assert float(m.compute()["rougeL"]) == pytest.approx(1.0)


def test_normalisation_and_tokenisation():
    assert normalize_bn("কেমন আছেন? ভালো।") == "কেমন আছেন ভালো"
    assert bleu_tokenize("কেমন আছেন? ভালো।").split() == ["কেমন", "আছেন", "?", "ভালো", "।"]
    # NFC: a decomposed 'য়' (য + nukta) equals the precomposed one
    assert normalize_bn("য\u09bc") == normalize_bn("\u09df")
    assert score_texts(["য\u09bcাত্রা শুরু হলো আজ থেকে নতুন করে"], ["\u09dfাত্রা শুরু হলো আজ থেকে নতুন করে"])["bleu"] == 1.0


def test_loss_and_perplexity_are_token_weighted():
    loss = TokenWeightedLoss()
    loss.update(torch.tensor(2.0), 30)
    loss.update(torch.tensor(1.0), 10)
    expected = (2.0 * 30 + 1.0 * 10) / 40
    assert float(loss.compute()) == pytest.approx(expected, rel=1e-6)
    assert float(loss.perplexity()) == pytest.approx(math.exp(expected), rel=1e-6)
    assert float(loss.compute()) != pytest.approx(1.5)  # not the plain batch mean


# Bengali pairs for the agreement with sacreBLEU (the reference implementation).
PAIRS = {
    "identical": (A, A),
    "one word changed": ("আমি আজ খুব একা বোধ করছি। কেউ আমার কথা শোনে না, আর সব কিছু অর্থহীন মনে হয়।", A),
    "danda only": ("।", A),
    "NFC vs NFD": ("য\u09bcাত্রা শুরু হলো আজ থেকে", "\u09dfাত্রা শুরু হলো আজ থেকে"),
    "zero-width joiner": ("র\u200d্যাব এসেছে আজ সকালে", "র্যাব এসেছে আজ সকালে"),
    "empty prediction": ("", C),
    "unrelated": (B, C),
}


@pytest.mark.parametrize("batches", [1, 3])
def test_corpus_bleu_and_chrf_equal_sacrebleu(batches):
    import unicodedata

    preds = [p for p, _ in PAIRS.values()]
    refs = [r for _, r in PAIRS.values()]
    m = text_metrics()
    step = math.ceil(len(preds) / batches)
    for i in range(0, len(preds), step):  # states summed over batches = one corpus
        m.update(preds[i:i + step], refs[i:i + step])
    ours = {k: float(v) for k, v in m.compute().items()}
    nfc = lambda xs: [unicodedata.normalize("NFC", x) for x in xs]  # noqa: E731
    bleu = sacrebleu.corpus_bleu([bleu_tokenize(p) for p in preds], [[bleu_tokenize(r) for r in refs]],
                                 tokenize="none").score / 100
    chrf = sacrebleu.corpus_chrf(nfc(preds), [nfc(refs)], word_order=2).score / 100
    assert ours["bleu"] == pytest.approx(bleu, abs=1e-6)
    assert ours["chrf"] == pytest.approx(chrf, abs=1e-6)


def test_chrf_counts_empty_predictions():
    s = score_texts([A, "", ""], [A, B, C])
    assert s["chrf"] == pytest.approx(sacrebleu.corpus_chrf([A, "", ""], [[A, B, C]], word_order=2).score / 100)
    assert s["chrf"] < 0.5  # torchmetrics' CHRFScore gives 1.0 here: it leaves the empty rows out
    from torchmetrics.text import CHRFScore

    assert float(CHRFScore(n_word_order=2)([A, "", ""], [[A], [B], [C]])) == pytest.approx(1.0)


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_each_pair_agrees_with_sacrebleu_sentence_by_sentence(name):
    import unicodedata

    pred, ref = PAIRS[name]
    s = score_texts([pred], [ref])
    nfc = unicodedata.normalize
    assert s["chrf"] == pytest.approx(sacrebleu.corpus_chrf([nfc("NFC", pred)], [[nfc("NFC", ref)]],
                                                            word_order=2).score / 100, abs=1e-6)
    assert s["bleu"] == pytest.approx(sacrebleu.corpus_bleu([bleu_tokenize(pred)], [[bleu_tokenize(ref)]],
                                                            tokenize="none").score / 100, abs=1e-6)
    if name in ("identical", "NFC vs NFD"):
        assert s["bleu"] == pytest.approx(1.0) and s["chrf"] == pytest.approx(1.0) and s["rougeL"] == 1.0
    if name in ("danda only", "empty prediction"):
        assert s["rougeL"] == 0.0 and s["bleu"] == 0.0


def test_bits_per_character_are_the_same_nats_over_characters():
    from bengali_empathy.evaluation.metrics import score_loss

    loss = TokenWeightedLoss()
    loss.update(torch.tensor(2.0), 30, n_chars=50)
    loss.update(torch.tensor(1.0), 10, n_chars=20)
    s = score_loss(loss)
    assert s["nll_per_char"] == pytest.approx((2.0 * 30 + 1.0 * 10) / 70)
    assert s["bits_per_char"] == pytest.approx(s["nll_per_char"] / math.log(2))
    assert s["reply_chars"] == 70 and s["reply_tokens"] == 40
