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

Every text is NFC-normalised first. BLEU sees :func:`bleu_tokenize` tokens
(punctuation, the danda ``।`` included, split off); ROUGE-L sees
:func:`normalize_bn` words (punctuation removed); chrF++ sees NFC text.
"""
from __future__ import annotations

import math
import unicodedata
from typing import Sequence

import torch
from torchmetrics import Metric, MetricCollection
from torchmetrics.text import ROUGEScore

from ..text import bleu_tokenize, normalize_bn, tokenize_bn

# Every score an evaluation reports, in the order reports and logs show them, with its display name.
SCORE_NAMES = {"bleu": "BLEU", "rougeL": "ROUGE-L", "chrf": "chrF++", "loss": "NLL (nats/token)",
               "perplexity": "perplexity", "nll_per_char": "NLL (nats/character)", "bits_per_char": "bits/character"}
# The scores of generated replies (the others are the reference replies' loss): per category too.
TEXT_SCORES = ("bleu", "rougeL", "chrf")
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


def text_metrics(**kwargs) -> MetricCollection:
    """The generation metrics: ``bleu``, ``rougeL`` (sentence mean) and ``chrf`` (chrF++), all in [0, 1].
    ``kwargs`` go to every metric (e.g. ``sync_on_compute=False`` for rows already gathered)."""
    return MetricCollection({"bleu": BengaliBLEU(**kwargs), "rougeL": BengaliRougeL(**kwargs),
                             "chrf": BengaliChrF(**kwargs)})


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
    """``bleu``, ``rougeL``, ``chrf`` and ``n`` of predictions against references (NaN scores when empty)."""
    if not preds:
        return {"bleu": math.nan, "rougeL": math.nan, "chrf": math.nan, "n": 0}
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
