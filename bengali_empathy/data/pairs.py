"""Preference rows: a history and the replies to compare (DPO pairs) or to label (KTO).

A preference row is a history -- a ``prompt`` column (:class:`PromptToTurns`) or a ``messages``
column ending in a user turn -- and, after it, the replies: :class:`PairedReplies` (``chosen`` /
``rejected``) or :class:`LabelledReply` (``completion`` / ``label``). The reply transform appends the
trained reply (chosen, or the completion) to the history and returns what goes beside it (the
rejected reply, or whether the completion is desirable), so a preference row is a conversation like
any other for the split, the group column, the length policy, deduplication and the statistics.
Unlike a dialogue row, an empty field is a broken row here, not a counted drop: a pair with one
reply missing says nothing.
"""
from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Optional

from ..errors import UserError

TRUE_LABELS = ("true", "1", "yes", "desirable")
FALSE_LABELS = ("false", "0", "no", "undesirable")


def required_text(row: dict, column: str, where: str) -> str:
    """The stripped text of ``column``; missing, null or empty is a one-line error."""
    value = row.get(column)
    if value is None:
        raise UserError(f"{where}: no value for {column!r} (the key is missing or null)")
    text = str(value).strip()
    if not text:
        raise UserError(f"{where}: {column!r} is empty")
    return text


def _normalized(text: str) -> str:
    return unicodedata.normalize("NFC", " ".join(text.split()))


@dataclass(frozen=True)
class PromptToTurns:
    """A prompt column -> (None, [user turn]): the history of a single-exchange preference row."""

    column: str

    @property
    def fields(self) -> list[str]:
        return [self.column]

    def __call__(self, row: dict, where: str) -> tuple[Optional[str], list[dict]]:
        return None, [{"role": "user", "content": required_text(row, self.column, where)}]


@dataclass(frozen=True)
class PairedReplies:
    """``chosen`` and ``rejected`` replies to a history (DPO): the chosen one is appended, the rejected one
    goes beside it."""

    chosen_column: str = "chosen"
    rejected_column: str = "rejected"

    @property
    def fields(self) -> list[str]:
        return [self.chosen_column, self.rejected_column]

    def __call__(self, row: dict, history: list[dict], where: str) -> tuple[list[dict], dict]:
        chosen = required_text(row, self.chosen_column, where)
        rejected = required_text(row, self.rejected_column, where)
        if _normalized(chosen) == _normalized(rejected):
            raise UserError(f"{where}: {self.chosen_column!r} and {self.rejected_column!r} are the same reply")
        return history + [{"role": "assistant", "content": chosen}], {"rejected": rejected}


@dataclass(frozen=True)
class LabelledReply:
    """A ``completion`` and its ``label`` (true: desirable) after a history (KTO)."""

    completion_column: str = "completion"
    label_column: str = "label"

    @property
    def fields(self) -> list[str]:
        return [self.completion_column, self.label_column]

    def __call__(self, row: dict, history: list[dict], where: str) -> tuple[list[dict], dict]:
        completion = required_text(row, self.completion_column, where)
        label = row.get(self.label_column)
        if isinstance(label, str) and label.strip().lower() in TRUE_LABELS + FALSE_LABELS:
            label = label.strip().lower() in TRUE_LABELS
        elif isinstance(label, int) and label in (0, 1):  # bool is an int too
            label = bool(label)
        else:
            raise UserError(f"{where}: {self.label_column!r} must be true or false, not {label!r}")
        return history + [{"role": "assistant", "content": completion}], {"desirable": label}
