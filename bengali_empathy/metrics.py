"""Text metrics that are correct for Bengali.

torchmetrics' ROUGE default normaliser keeps only ``[a-z0-9]`` and so deletes
every Bengali character (all scores 0). Here every metric first NFC-normalises;
ROUGE-L strips Unicode punctuation (the danda ``।`` included) and splits on
white space; BLEU splits punctuation off as separate tokens (like sacreBLEU's
13a/intl tokenisers); chrF++ runs on NFC text. Perplexity is
``exp(token-weighted mean loss)``, which also works when a backend (Unsloth)
returns no logits.
"""
from __future__ import annotations

import math
import re
import unicodedata
from typing import Optional, Sequence

import torch
from torchmetrics import Metric
from torchmetrics.text import BLEUScore, CHRFScore, ROUGEScore

_WS = re.compile(r"\s+")


def _is_punct(ch: str) -> bool:
    return unicodedata.category(ch).startswith("P")


def normalize_bn(text: str) -> str:
    """NFC, lower-case (for any Latin), Unicode punctuation removed, white space collapsed."""
    text = unicodedata.normalize("NFC", text).lower()
    text = "".join(" " if _is_punct(ch) else ch for ch in text)
    return _WS.sub(" ", text).strip()


def tokenize_bn(text: str) -> list[str]:
    """Word tokens of :func:`normalize_bn` text (split on white space)."""
    return text.split()


def bleu_tokenize(text: str) -> str:
    """NFC text with every punctuation mark (``।``, ``?``, ``,`` ...) as its own token."""
    text = unicodedata.normalize("NFC", text)
    text = "".join(f" {ch} " if _is_punct(ch) else ch for ch in text)
    return _WS.sub(" ", text).strip()


class TokenWeightedPerplexity(Metric):
    """``exp(sum(loss_i * n_i) / sum(n_i))`` over batches, where ``loss_i`` is a batch's
    mean token loss and ``n_i`` its number of predicted tokens. Reduces across processes."""

    full_state_update = False
    higher_is_better = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("loss_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, mean_loss: torch.Tensor, n_tokens: torch.Tensor | int) -> None:
        n = torch.as_tensor(n_tokens, device=self.tokens.device).long()
        self.loss_sum += mean_loss.detach().double().to(self.loss_sum.device) * n
        self.tokens += n

    def mean_loss(self) -> torch.Tensor:
        return self.loss_sum / self.tokens.clamp(min=1)

    def compute(self) -> torch.Tensor:
        return torch.exp(self.mean_loss()).float()


class BengaliTextMetrics(torch.nn.Module):
    """BLEU-4, ROUGE-L F1 and chrF++ for Bengali generations (all in [0, 1])."""

    def __init__(self) -> None:
        super().__init__()
        self.bleu = BLEUScore(n_gram=4, smooth=False)
        self.rouge = ROUGEScore(rouge_keys=("rougeL",), normalizer=normalize_bn, tokenizer=tokenize_bn)
        self.chrf = CHRFScore(n_char_order=6, n_word_order=2)  # chrF++

    def update(self, preds: Sequence[str], targets: Sequence[str]) -> None:
        preds = [unicodedata.normalize("NFC", p) for p in preds]
        targets = [unicodedata.normalize("NFC", t) for t in targets]
        self.bleu.update([bleu_tokenize(p) for p in preds], [[bleu_tokenize(t)] for t in targets])
        self.rouge.update(preds, targets)
        self.chrf.update(preds, [[t] for t in targets])

    def compute(self) -> dict[str, float]:
        rouge = self.rouge.compute()
        return {
            "bleu": float(self.bleu.compute()),
            "rougeL": float(rouge["rougeL_fmeasure"]),
            "chrf": float(self.chrf.compute()),
        }

    def reset(self) -> None:
        self.bleu.reset()
        self.rouge.reset()
        self.chrf.reset()


def score_texts(preds: Sequence[str], targets: Sequence[str], losses: Optional[Sequence[tuple[float, int]]] = None) -> dict:
    """Corpus-level scores for lists of predictions and references (and optional
    ``(mean_loss, n_tokens)`` pairs for perplexity)."""
    m = BengaliTextMetrics()
    if preds:
        m.update(list(preds), list(targets))
        out = m.compute()
    else:
        out = {"bleu": float("nan"), "rougeL": float("nan"), "chrf": float("nan")}
    if losses:
        total = sum(n for _, n in losses)
        out["loss"] = sum(l * n for l, n in losses) / max(total, 1)
        out["perplexity"] = math.exp(out["loss"])
    out["n"] = len(preds)
    return out
