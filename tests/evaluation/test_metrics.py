import math

import pytest
import sacrebleu  # the reference implementation (installed: install_requires)
import torch

from bengali_empathy.evaluation.metrics import (
    TokenWeightedLoss, bleu_tokenize, score_texts, text_metrics,
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


# Replies for the reply scores, counted by hand. Words are NFC, punctuation-free, split on white space:
#   R1 "আপনি কেমন আছেন? ভয় নেই।" (its ভয় typed decomposed: য + nukta) -> আপনি কেমন আছেন ভয় নেই   (5 words)
#   R2 "ভয় নেই, ভয় নেই, ভয় নেই।" (precomposed য়)                     -> ভয় নেই ভয় নেই ভয় নেই  (6 words)
#   R3 "I am here for you."                                          -> i am here for you        (5 words)
#   R4 ""                                                            ->                           (0 words)
REPLIES = ["আপনি কেমন আছেন? ভয\u09bc নেই।", "ভ\u09df নেই, ভ\u09df নেই, ভ\u09df নেই।", "I am here for you.", ""]
# References: তুমি একা নও (3), আমি আছি বলো কী হয়েছে (5), আমি তোমার পাশে আছি (4), কথা বলো (2): 14 words.
REFERENCES = ["তুমি একা নও।", "আমি আছি, বলো কী হয়েছে?", "আমি তোমার পাশে আছি।", "কথা বলো।"]
# Unigrams: 5 + 6 + 5 + 0 = 16; distinct: আপনি কেমন আছেন ভয় নেই + i am here for you = 10
#   (11 if the decomposed ভয় were a word of its own).
# Bigrams (none across replies): R1 4 (আপনি কেমন, কেমন আছেন, আছেন ভয়, ভয় নেই), R2 5 (ভয় নেই three times,
#   নেই ভয় twice), R3 4 (i am, am here, here for, for you), R4 0: 13; distinct: R1's 4 + নেই ভয় + R3's 4 = 9.
HAND = {"distinct_1": 10 / 16, "distinct_2": 9 / 13, "reply_words": 16 / 4, "reference_words": 14 / 4,
        "bengali_script": 2 / 4,  # R1, R2; not the English R3 nor the empty R4
        "asks_question": 1 / 4,  # R1
        "repeats_trigram": 1 / 4}  # R2: ভয় নেই ভয় and নেই ভয় নেই occur twice each


def test_the_replies_are_written_as_the_hand_counts_say():
    import unicodedata

    assert "য\u09bc" in REPLIES[0] and "\u09df" in REPLIES[1] and "য\u09bc" not in REPLIES[1]
    # the two spellings are one letter only after NFC (য় is a composition exclusion: NFC decomposes it)
    assert "য\u09bc" != "\u09df" and unicodedata.normalize("NFC", "\u09df") == "য\u09bc"


def test_reply_scores_equal_hand_counts():
    s = score_texts(REPLIES, REFERENCES)
    assert {k: s[k] for k in HAND} == pytest.approx(HAND)
    assert s["n"] == 4


def test_reply_scores_of_two_ranks_merged_equal_one_process():
    # Each rank sees part of the corpus: R1's and R2's shared bigram ভয় নেই is counted once only if
    # the ranks' distinct n-grams are merged (summing per-rank distinct counts would give 10 / 13).
    ranks = [text_metrics(), text_metrics()]
    ranks[0].update(REPLIES[:1], REFERENCES[:1])
    ranks[1].update(REPLIES[1:], REFERENCES[1:])
    for key in HAND:  # the states' own reductions, as across DDP ranks
        ranks[0][key].merge_state(ranks[1][key])
    assert {k: float(ranks[0][k].compute()) for k in HAND} == pytest.approx(HAND)


def test_text_metrics_update_each_reply_score_on_its_own():
    # After a first batch whose replies equal their references the two lengths' states are equal: they
    # must still be updated apart (torchmetrics' compute groups would merge them).
    m = text_metrics()
    m.update(["আমি আছি।"], ["আমি আছি।"])
    m.update(["হ্যাঁ"], ["আমি সবসময় তোমার পাশে আছি।"])
    s = m.compute()
    assert float(s["reply_words"]) == pytest.approx((2 + 1) / 2)
    assert float(s["reference_words"]) == pytest.approx((2 + 5) / 2)


@pytest.mark.parametrize("reply, bengali", [
    ("কি", True),  # ক (letter) + ি (vowel sign, a mark): both Bengali
    ("ok ঠিক আছে", True),  # o k | ঠ ি ক আ ছ ে: 6 of 8 letters Bengali
    ("Hello ভাই", False),  # H e l l o | ভ া ই: 3 of 8
    ("ab কখ", False),  # 2 of 4: half is not most
    ("১২৩ ।", False),  # Bengali digits and the danda are not letters: no letters at all
    ("", False),
    ("নয\u09bc", True),  # decomposed য়: NFC first
])
def test_bengali_script_share_counts_letters(reply, bengali):
    assert score_texts([reply], ["আমি"])["bengali_script"] == float(bengali)


@pytest.mark.parametrize("reply, asks", [
    ("কেমন আছেন?", True), ("কেমন আছেন？", True), ("هل أنت بخير؟", True), ("সত্যি‽", True),
    ("ভালো থাকুন।", False), ("", False),
])
def test_question_share(reply, asks):
    assert score_texts([reply], ["আমি"])["asks_question"] == float(asks)


@pytest.mark.parametrize("reply, loops", [
    ("আমি আমি আমি আমি", True),  # (আমি আমি আমি) at words 1-3 and 2-4
    ("তুমি একা নও। তুমি একা নও।", True),  # the danda is not a word: (তুমি একা নও) twice
    ("আমি আছি, আমি আছি।", False),  # (আমি আছি আমি), (আছি আমি আছি): once each
    ("আমি আমি", False), ("", False),
])
def test_repeated_trigram_share(reply, loops):
    assert score_texts([reply], ["আমি"])["repeats_trigram"] == float(loops)


def test_distinct_counts_no_ngram_as_zero_and_a_one_word_reply_has_no_bigram():
    s = score_texts(["", "ভালো"], ["আমি", "আমি"])
    assert s["distinct_1"] == 1.0 and s["distinct_2"] == 0.0 and s["reply_words"] == 0.5
