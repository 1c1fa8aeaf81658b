"""Text and loss metrics that are correct for Bengali, as torchmetrics ``Metric``s.

* BLEU-4 and chrF++ are corpus-level and computed by sacreBLEU, the reference
  implementation: the metrics keep sacreBLEU's sufficient statistics as summed
  states (so they reduce across processes) and let sacreBLEU turn the sums into
  a score. torchmetrics' own chrF leaves rows with no matching n-gram out of the
  corpus totals (one perfect reply plus two empty ones scores 1.0 there, 0.364
  in sacreBLEU), so it is not used.
* ROUGE-L F1 is the mean over rows of torchmetrics' ``ROUGEScore`` with a
  Bengali normaliser: the default one keeps only ``[a-z0-9]`` and deletes every
  Bengali letter (all scores 0).
* Loss is token-weighted over reply tokens; perplexity is ``exp(loss)``, which
  also works when a backend (Unsloth) returns no logits.

* The reply scores say what overlap does not: how varied, long, Bengali,
  questioning and looping the replies are (see :class:`DistinctNGrams`,
  :class:`MeanWords`, :class:`BengaliScriptShare`, :class:`QuestionShare`,
  :class:`RepeatedTrigramShare`). Their states are summed (Distinct keeps the
  n-grams' hashes, concatenated), so they reduce across processes too.

Every text is NFC-normalised first. BLEU sees :func:`bleu_tokenize` tokens
(punctuation, the danda ``।`` included, split off); ROUGE-L and the word-level
reply scores see :func:`words_bn` words (punctuation removed, split on white
space); chrF++ sees NFC text.
"""
from __future__ import annotations

import hashlib
import math
import unicodedata
from collections import Counter
from typing import Literal, Sequence

import torch
from torchmetrics import Metric, MetricCollection
from torchmetrics.text import ROUGEScore
from torchmetrics.utilities import dim_zero_cat

from ..text import bleu_tokenize, normalize_bn, tokenize_bn, words_bn

# Every score an evaluation reports, in the order reports and logs show them, with its display name.
SCORE_NAMES = {"bleu": "BLEU", "rougeL": "ROUGE-L", "chrf": "chrF++", "loss": "NLL (nats/token)",
               "perplexity": "perplexity", "nll_per_char": "NLL (nats/character)", "bits_per_char": "bits/character",
               "distinct_1": "Distinct-1", "distinct_2": "Distinct-2", "reply_words": "reply length (words)",
               "reference_words": "reference length (words)", "bengali_script": "share in Bengali script",
               "asks_question": "share asking a question", "repeats_trigram": "share repeating a word 3-gram"}
# The scores of generated replies (the others are the reference replies' loss): per category too.
TEXT_SCORES = ("bleu", "rougeL", "chrf", "distinct_1", "distinct_2", "reply_words", "reference_words",
               "bengali_script", "asks_question", "repeats_trigram")
# Question marks a reply may end a question with: Bengali writes the Latin "?"; the others are the
# full-width (CJK), Arabic-script, small-form and doubled/combined marks a drifting model may produce.
QUESTION_MARKS = frozenset("?\uff1f\u061f\ufe56\u2047\u2048\u2049\u203d")
BENGALI_BLOCK = range(0x0980, 0x0A00)
# A preference objective's (DPO, KTO) scores beside its loss, and the tags under which a run logs them
# (TensorBoard, run.json, the registry, the report).
REWARD_NAMES = ("reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward")
REWARD_TAGS = tuple(f"{stage}/{name}" for stage in ("train", "val") for name in REWARD_NAMES)


class _SacreBLEUStatistic(Metric):
    """A sacreBLEU corpus metric whose per-row statistics are summed in a tensor state."""

    full_state_update = False
    higher_is_better = True
    n_stats = 0

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("stats", default=torch.zeros(self.n_stats, dtype=torch.float64), dist_reduce_fx="sum")

    def scorer(self):
        raise NotImplementedError

    def prepare(self, text: str) -> str:
        return unicodedata.normalize("NFC", text)

    def update(self, preds: Sequence[str], targets: Sequence[str]) -> None:
        if len(preds) != len(targets):
            raise ValueError(f"{len(preds)} predictions for {len(targets)} references")
        if not preds:
            return
        rows = self.scorer()._extract_corpus_statistics([self.prepare(p) for p in preds],
                                                        [[self.prepare(t) for t in targets]])
        self.stats += torch.tensor(rows, dtype=torch.float64).sum(0).to(self.stats.device)

    def compute(self) -> torch.Tensor:
        sums = [int(round(v)) for v in self.stats.tolist()]
        return torch.tensor(self.scorer()._compute_score_from_stats(sums).score / 100.0)


class BengaliBLEU(_SacreBLEUStatistic):
    """Corpus BLEU-4 (sacreBLEU defaults: exponential smoothing) on :func:`bleu_tokenize` tokens, in [0, 1]."""

    n_stats = 2 + 2 * 4

    def scorer(self):
        from sacrebleu.metrics import BLEU

        return BLEU(tokenize="none", force=True)

    def prepare(self, text: str) -> str:
        return bleu_tokenize(text)


class BengaliChrF(_SacreBLEUStatistic):
    """Corpus chrF++ (sacreBLEU ``CHRF(word_order=2)``) on NFC text, in [0, 1]; empty predictions count."""

    n_stats = 3 * (6 + 2)

    def scorer(self):
        from sacrebleu.metrics import CHRF

        return CHRF(word_order=2)


class BengaliRougeL(ROUGEScore):
    """Mean sentence ROUGE-L F1 over NFC, punctuation-free, white-space-split Bengali words."""

    def __init__(self, **kwargs) -> None:
        super().__init__(rouge_keys=("rougeL",), normalizer=normalize_bn, tokenizer=tokenize_bn, **kwargs)

    def update(self, preds: Sequence[str], targets: Sequence[str]) -> None:
        super().update(list(preds), list(targets))

    def compute(self) -> torch.Tensor:
        return super().compute()["rougeL_fmeasure"]


def _ngrams(words: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def _stable_hash(gram: tuple[str, ...]) -> int:
    # Python's hash() is salted per process: ranks must agree on the id of an n-gram.
    digest = hashlib.blake2b("\x1f".join(gram).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


class DistinctNGrams(Metric):
    """Corpus Distinct-n of the predictions: distinct word n-grams over all n-grams of all replies, in [0, 1]
    (0 when the replies have no n-gram). Words are :func:`words_bn`'s; an n-gram does not cross replies.

    The distinct n-grams are kept as 64-bit hashes, concatenated across batches and processes, so the
    corpus's distinct count is exact (up to a hash collision, about n^2 / 2^65)."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, n: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.n = n
        self.add_state("ngram_ids", default=[], dist_reduce_fx="cat")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Sequence[str], targets: Sequence[str]) -> None:
        grams = [g for p in preds for g in _ngrams(words_bn(p), self.n)]
        self.total += len(grams)
        ids = sorted({_stable_hash(g) for g in grams})
        self.ngram_ids.append(torch.tensor(ids, dtype=torch.long, device=self.total.device))

    def compute(self) -> torch.Tensor:
        if int(self.total) == 0:
            return torch.tensor(0.0, dtype=torch.float64)
        return torch.tensor(dim_zero_cat(self.ngram_ids).unique().numel() / int(self.total), dtype=torch.float64)


class MeanWords(Metric):
    """Mean length in :func:`words_bn` words of the predictions (``of="prediction"``, an empty one counts 0)
    or of their references (``of="reference"``), to read the ratio of the two."""

    full_state_update = False

    def __init__(self, of: Literal["prediction", "reference"], **kwargs) -> None:
        super().__init__(**kwargs)
        self.of = of
        self.add_state("words", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("rows", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Sequence[str], targets: Sequence[str]) -> None:
        texts = preds if self.of == "prediction" else targets
        self.words += sum(len(words_bn(t)) for t in texts)
        self.rows += len(texts)

    def compute(self) -> torch.Tensor:
        return (self.words / self.rows.clamp(min=1)).double()


class _ReplyShare(Metric):
    """The share of predictions of which :meth:`holds` is true, in [0, 1], from summed counts."""

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("hits", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("rows", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def holds(self, text: str) -> bool:
        raise NotImplementedError

    def update(self, preds: Sequence[str], targets: Sequence[str]) -> None:
        self.hits += sum(self.holds(p) for p in preds)
        self.rows += len(preds)

    def compute(self) -> torch.Tensor:
        return (self.hits / self.rows.clamp(min=1)).double()


class BengaliScriptShare(_ReplyShare):
    """Share of replies in Bengali script: more than half of a reply's letters (NFC characters of Unicode
    category L* or M*, so vowel signs count and digits, punctuation and joiners do not) lie in the Bengali
    block U+0980-U+09FF. A reply without letters (an empty one) is not Bengali."""

    higher_is_better = True

    def holds(self, text: str) -> bool:
        letters = [ch for ch in unicodedata.normalize("NFC", text) if unicodedata.category(ch)[0] in "LM"]
        return 2 * sum(ord(ch) in BENGALI_BLOCK for ch in letters) > len(letters)


class QuestionShare(_ReplyShare):
    """Share of replies that ask a question: the NFC reply contains one of :data:`QUESTION_MARKS`."""

    def holds(self, text: str) -> bool:
        return not QUESTION_MARKS.isdisjoint(unicodedata.normalize("NFC", text))


class RepeatedTrigramShare(_ReplyShare):
    """Share of replies that loop: some word 3-gram (of :func:`words_bn` words) occurs twice or more in the
    reply (occurrences may overlap: four equal words repeat their 3-gram)."""

    higher_is_better = False

    def holds(self, text: str) -> bool:
        counts = Counter(_ngrams(words_bn(text), 3))
        return bool(counts) and counts.most_common(1)[0][1] >= 2


def text_metrics(**kwargs) -> MetricCollection:
    """The generation metrics, keyed as :data:`TEXT_SCORES`: ``bleu``, ``rougeL`` (sentence mean) and ``chrf``
    (chrF++) in [0, 1], then the reply scores. ``kwargs`` go to every metric (e.g. ``sync_on_compute=False``
    for rows already gathered)."""
    metrics = {"bleu": BengaliBLEU(**kwargs), "rougeL": BengaliRougeL(**kwargs), "chrf": BengaliChrF(**kwargs),
               "distinct_1": DistinctNGrams(1, **kwargs), "distinct_2": DistinctNGrams(2, **kwargs),
               "reply_words": MeanWords("prediction", **kwargs), "reference_words": MeanWords("reference", **kwargs),
               "bengali_script": BengaliScriptShare(**kwargs), "asks_question": QuestionShare(**kwargs),
               "repeats_trigram": RepeatedTrigramShare(**kwargs)}
    # Compute groups would merge metrics whose states are equal after the first batch (the two lengths
    # when replies equal references, two shares with equal counts) and then update only one of them.
    return MetricCollection(metrics, compute_groups=False)


class TokenWeightedLoss(Metric):
    """Mean loss over reply tokens: ``sum(loss_i * n_i) / sum(n_i)``, where ``loss_i`` is a
    batch's mean token loss and ``n_i`` its number of predicted tokens. ``perplexity()`` is its exp.

    It also keeps the characters of the reply text, for NLL per character and bits per
    character: Llama-3 spends ~7 tokens on a Bengali word, so a token perplexity says
    little across tokenizers, while the total NLL of the same text per character does."""

    full_state_update = False
    higher_is_better = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("loss_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("chars", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, mean_loss: torch.Tensor | float, n_tokens: torch.Tensor | int, n_chars: int = 0) -> None:
        """``n_chars``: characters of the text those tokens spell, for the tokenizer-independent figures."""
        n = torch.as_tensor(n_tokens, device=self.tokens.device).long()
        loss = torch.as_tensor(mean_loss).detach().double().to(self.loss_sum.device)
        self.loss_sum += loss * n
        self.tokens += n
        self.chars += int(n_chars)

    def compute(self) -> torch.Tensor:
        return (self.loss_sum / self.tokens.clamp(min=1)).float()

    def perplexity(self) -> torch.Tensor:
        return torch.exp(self.compute())


def score_texts(preds: Sequence[str], targets: Sequence[str]) -> dict:
    """The :data:`TEXT_SCORES` and ``n`` of predictions against references (NaN scores when empty)."""
    if not preds:
        return {**{k: math.nan for k in TEXT_SCORES}, "n": 0}
    collection = text_metrics(sync_on_compute=False)  # callers pass every row (gathered from all ranks)
    collection.update(list(preds), list(targets))
    return {**{k: float(v) for k, v in collection.compute().items()}, "n": len(preds)}


def score_loss(loss: TokenWeightedLoss) -> dict:
    """``loss`` (token-weighted mean NLL, nats), ``perplexity``, ``reply_tokens`` and, when characters
    were counted, ``nll_per_char`` (nats), ``bits_per_char`` and ``reply_chars`` of a loss metric."""
    with loss.sync_context():  # summed over ranks under DDP (a no-op in one process)
        tokens, chars, loss_sum = int(loss.tokens), int(loss.chars), float(loss.loss_sum)
    if tokens == 0:
        return {}
    value = loss_sum / tokens
    out = {"loss": value, "perplexity": math.exp(value), "reply_tokens": tokens}
    if chars:
        nll_per_char = loss_sum / chars
        out.update(nll_per_char=nll_per_char, bits_per_char=nll_per_char / math.log(2), reply_chars=chars)
    return out


def sentence_scores(pred: str, target: str) -> dict:
    """Per-row BLEU (sacreBLEU sentence BLEU) and ROUGE-L F1, for the degenerate-score checks."""
    from sacrebleu.metrics import BLEU

    bleu = BLEU(tokenize="none", effective_order=True, force=True)
    rouge = BengaliRougeL(sync_on_compute=False)
    rouge.update([pred], [target])
    return {"bleu": bleu.sentence_score(bleu_tokenize(pred), [bleu_tokenize(target)]).score / 100.0,
            "rougeL": float(rouge.compute())}
