"""Decoding settings and the sampling rules they stand for, in the two forms the engines take them:
``generate``'s arguments (the eager and static engines) and logits processors (the compiled engine's own
loop). Both are here so that they say the same thing; the engines' equivalence tests hold them to it."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import check_ranges


@dataclass(frozen=True)
class Decoding:
    """Decoding settings (``model.decoding``): greedy when ``temperature`` is 0, else sampling with ``top_p`` /
    ``top_k`` (0 = off) and ``seed``; ``repetition_penalty`` (1 = off) and ``no_repeat_ngram_size`` (0 = off)
    apply to both. ``max_new_tokens``: the reply length for validation samples, test, predict and chat."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        check_ranges("model.decoding", self, {
            "max_new_tokens": (self.max_new_tokens >= 1, "at least 1"),
            "temperature": (self.temperature >= 0, "at least 0 (0 = greedy)"),
            "top_p": (0 < self.top_p <= 1, "in (0, 1]"), "top_k": (self.top_k >= 0, "at least 0 (0 = off)"),
            "repetition_penalty": (self.repetition_penalty > 0, "positive (1 = off)"),
            "no_repeat_ngram_size": (self.no_repeat_ngram_size >= 0, "at least 0 (0 = off)")})

    def generate_kwargs(self) -> dict:
        """These settings as ``generate``'s arguments."""
        kwargs: dict = {"max_new_tokens": self.max_new_tokens, "do_sample": self.temperature > 0}
        if self.temperature > 0:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k or None)
        if self.repetition_penalty != 1.0:
            kwargs["repetition_penalty"] = self.repetition_penalty
        if self.no_repeat_ngram_size:
            kwargs["no_repeat_ngram_size"] = self.no_repeat_ngram_size
        return kwargs

    def as_dict(self) -> dict:
        return asdict(self)

    def logits_processors(self):
        """The same rules as transformers' processors, in ``generate``'s order (penalties, then temperature,
        top-k, top-p), for a decoder of its own (:mod:`.decoder`); None for plain greedy decoding."""
        from transformers import (LogitsProcessorList, NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor,
                                  TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

        processors = LogitsProcessorList()
        if self.repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(self.repetition_penalty))
        if self.no_repeat_ngram_size:
            processors.append(NoRepeatNGramLogitsProcessor(self.no_repeat_ngram_size))
        if self.temperature > 0:
            if self.temperature != 1.0:
                processors.append(TemperatureLogitsWarper(self.temperature))
            if self.top_k:
                processors.append(TopKLogitsWarper(self.top_k))
            if self.top_p < 1.0:
                processors.append(TopPLogitsWarper(self.top_p))
        return processors or None
