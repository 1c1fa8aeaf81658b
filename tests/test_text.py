"""Bengali text: NFC normalisation, punctuation and white space, the BLEU tokenisation (bengali_empathy.text)."""
from bengali_empathy.evaluation.metrics import score_texts
from bengali_empathy.text import bleu_tokenize, normalize_bn


def test_normalisation_and_tokenisation():
    assert normalize_bn("কেমন আছেন? ভালো।") == "কেমন আছেন ভালো"
    assert bleu_tokenize("কেমন আছেন? ভালো।").split() == ["কেমন", "আছেন", "?", "ভালো", "।"]
    # NFC: a decomposed 'য়' (য + nukta) equals the precomposed one
    assert normalize_bn("য\u09bc") == normalize_bn("\u09df")
    assert score_texts(["য\u09bcাত্রা শুরু হলো আজ থেকে নতুন করে"], ["\u09dfাত্রা শুরু হলো আজ থেকে নতুন করে"])["bleu"] == 1.0
