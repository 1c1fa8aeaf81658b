"""The data -> model contract: what an evaluated row is, and what the model and the run records learn
from the corpus.

Everything the model side needs from the data side passes through these two types (or, for
settings known at parse time -- ``max_seq_length``, ``batch_size``, ``system_prompt`` -- through
the CLI's ``link_arguments``), so neither side reaches into the other's attributes:

* :class:`EvalRow` -- one conversation to evaluate: where it was read, its texts, and its
  generation prompt as unpadded token ids (the generator pads per batch). The evaluator fills in
  ``prediction`` / ``base_prediction``.
* :class:`CorpusFacts` -- the corpus a run used: its path, per-split statistics, the texts of
  the training split for the honesty checks, and the chat template it was encoded with. The data
  module builds it; the CLI hands it to the model with ``EmpathyLM.connect`` (litgpt's ``connect``
  pattern).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from .text import is_empty_reply

# What predictions.jsonl holds per row, in this order (``None`` fields are left out); each reply is
# followed by ``<field>_empty``, true where the reply has no words (:func:`.text.is_empty_reply`).
OUTPUT_FIELDS = ("id", "prompt", "reference", "prediction", "base_prediction", "category")
REPLY_FIELDS = ("prediction", "base_prediction")


@dataclass
class EvalRow:
    """One evaluated conversation, from the corpus row at ``file``:``line`` (1-based)."""

    file: str
    line: int
    id: str
    prompt: str  # the final user turn, as text
    reference: str  # the final assistant reply the model should give
    prompt_ids: list[int] = field(repr=False, default_factory=list)  # the generation prompt, unpadded
    category: Optional[str] = None
    prediction: Optional[str] = None
    base_prediction: Optional[str] = None

    @property
    def where(self) -> str:
        """``corpus.jsonl: row 12``, as error messages name a row."""
        return f"{self.file}: row {self.line}"

    @property
    def position(self) -> tuple[str, int]:
        """The order rows were read in: sorts the rows gathered from several ranks back into input order."""
        return self.file, self.line

    def output(self) -> dict:
        """The row as ``predictions.jsonl`` writes it."""
        out = {}
        for k in OUTPUT_FIELDS:
            value = getattr(self, k)
            if value is not None:
                out[k] = value
                if k in REPLY_FIELDS:
                    out[f"{k}_empty"] = is_empty_reply(value)
        return out


TrainingTexts = list[str]  # every turn (user and assistant) of the training split's conversations


@dataclass
class CorpusFacts:
    """What the model and the run records need to know about the corpus of a run.

    ``stats`` is filled when the data module is set up (per split: rows, conversations, token-length
    percentiles, kept / truncated / dropped counts; empty for a streamed corpus, which is counted as
    it streams). ``training_texts`` returns the training split's texts for the honesty checks, or
    ``None`` where that would take an extra pass over the corpus (streaming). ``batching`` is how the
    data module batches, as run.json records it (``pack``, ``group_by_length``, ``streaming``).
    ``chat_template`` is the template the conversations were encoded with, once the data module is set up:
    the model generates with it and saves it with the adapter.
    """

    corpus_path: str
    stats: dict[str, dict] = field(default_factory=dict)
    training_texts: Callable[[], Optional[TrainingTexts]] = field(default=lambda: None, repr=False)
    batching: dict[str, bool] = field(default_factory=dict)
    chat_template: Optional[str] = field(default=None, repr=False)
