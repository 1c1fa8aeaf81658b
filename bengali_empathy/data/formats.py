"""Corpus rows -> conversations (the three layouts, each a small transform), and the train/val/test split.

Every row becomes one :class:`Conversation`, a list of ``{"role", "content"}`` turns, through one
of three transforms (as torchtune's message transforms, one callable per layout):

* :class:`MessagesToTurns` -- a conversational column (``messages`` with role/content, or ShareGPT
  ``conversations`` with from/value and human/gpt), auto-detected or named;
* :class:`TemplatesToTurns` -- prompt / response columns (one exchange per row), or column
  templates (``"{Question-Title}\\n{Questions}"``) that build the user and assistant turns from
  several columns (prompt / response columns are the templates ``"{prompt}"`` / ``"{response}"``);
* :class:`TextToTurns` -- raw text (``text_column``, continued pretraining): one turn of role ``text``,
  which the chat format leaves without headers and trains on every token.

With ``objective`` ``dpo`` or ``kto`` a row is a preference row instead (:mod:`.pairs`): a history (the
prompt column, or a messages column ending in a user turn) and the replies to compare or label.

:class:`CorpusFormat` picks the layout from a file's columns and adds what every layout shares
(system column, id, group, category). A new corpus layout is one more transform.
Rows go to a split by a stable hash of their group (``group_column``, e.g. a conversation id),
else their id, else their text, so turns of one dialogue never straddle train and test, and the
split is the same in memory and streaming (:func:`split_of`).
Bad rows stop with a :class:`UserError` naming the file and the row.
"""
from __future__ import annotations

import hashlib
import json
import string
from dataclasses import dataclass
from typing import Literal, Optional

from ..errors import UserError
from .pairs import LabelledReply, PairedReplies, PromptToTurns

# "You are an empathetic, caring assistant. Understand the user's feelings
# attentively and reply in Bengali in warm, respectful, supportive language."
DEFAULT_SYSTEM_PROMPT = (
    "আপনি একজন সহমর্মী ও যত্নশীল সহকারী। ব্যবহারকারীর অনুভূতি মন দিয়ে বুঝুন "
    "এবং উষ্ণ, সম্মানজনক ও সহায়ক ভাষায় বাংলায় উত্তর দিন।"
)

SPLITS = ("train", "val", "test")
Split = Literal["train", "val", "test"]
# What a run trains for: the replies themselves (sft), or preferences between them (see ..preference).
Objective = Literal["sft", "dpo", "kto"]


@dataclass(frozen=True)
class CorpusColumns:
    """Where a corpus row's parts are (``data.columns``): the columns and templates of :class:`CorpusFormat`.

    Args:
        prompt / response: one exchange per row from these two columns.
        messages: a column of ``{role, content}`` turns (or ShareGPT ``{from, value}``); auto-detected as
            ``messages`` / ``conversations`` when the prompt column is absent.
        prompt_template / response_template: build the turns from several columns,
            e.g. ``"{Question-Title}\\n{Questions}"``.
        system: per-row system prompt (empty cells use ``data.system_prompt``).
        id: row id (default ``id``; a hash of the text when absent).
        group: rows of one group always share a split (auto: ``conversation_id`` / ``dialogue_id`` /
            ``conv_id`` when present).
        category: a category/emotion label carried to predictions.
        text: raw text, one document per row (continued pretraining): ``<|begin_of_text|>`` + text +
            ``<|end_of_text|>``, the loss on every token, no chat format (with ``data.pack``: rows of
            ``max_seq_length``).
    """

    prompt: str = "prompt"
    response: str = "response"
    messages: Optional[str] = None
    prompt_template: Optional[str] = None
    response_template: Optional[str] = None
    system: Optional[str] = None
    id: Optional[str] = "id"
    group: Optional[str] = None
    category: Optional[str] = None
    text: Optional[str] = None

    def format_of(self, columns: list[str], where: str, objective: Objective) -> "CorpusFormat":
        """The format of a file with these ``columns`` (bad columns or templates fail here)."""
        return CorpusFormat(columns, where, self.prompt, self.response, self.messages, self.prompt_template,
                            self.response_template, self.system, self.id, self.group, self.category, self.text,
                            objective)
MESSAGE_COLUMNS = ("messages", "conversations")
GROUP_COLUMNS = ("conversation_id", "dialogue_id", "conv_id")
ROLE_ALIASES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}

Turns = list[dict]


@dataclass
class Conversation:
    """One corpus row as chat turns; ``system`` is None for the configured default."""

    id: str
    group: str
    system: Optional[str]
    turns: Turns
    category: Optional[str] = None
    rejected: Optional[str] = None  # DPO: the reply not preferred to the final turn
    desirable: Optional[bool] = None  # KTO: whether the final turn is a reply to learn from


def template_fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]


@dataclass(frozen=True)
class MessagesToTurns:
    """A column of ``{role, content}`` (or ShareGPT ``{from, value}``) turns -> (system, turns).

    ``ends_with`` is ``user`` for the history of a preference row (the replies follow it)."""

    column: str
    ends_with: Literal["assistant", "user"] = "assistant"

    @property
    def fields(self) -> list[str]:
        return [self.column]

    def __call__(self, row: dict, where: str) -> tuple[Optional[str], Turns]:
        raw = row.get(self.column)
        if isinstance(raw, str):
            try:
                raw = json.loads(raw)  # a CSV/Parquet cell holding JSON
            except json.JSONDecodeError:
                raise UserError(f"{where}: column {self.column!r} is not a list of turns") from None
        if not isinstance(raw, list) or not raw:
            raise UserError(f"{where}: column {self.column!r} must be a non-empty list of turns")
        system, turns = None, []
        for k, m in enumerate(raw, start=1):
            if not isinstance(m, dict):
                raise UserError(f"{where}: turn {k} is not an object with role/content")
            role = m.get("role", m.get("from"))
            content = m.get("content", m.get("value"))
            if role not in ROLE_ALIASES:
                raise UserError(f"{where}: turn {k} has unknown role {role!r} "
                                "(use system/user/assistant, or ShareGPT human/gpt)")
            role = ROLE_ALIASES[role]
            if not isinstance(content, str) or not content.strip():
                raise UserError(f"{where}: turn {k} ({role}) has empty content")
            if role == "system":
                if k != 1:
                    raise UserError(f"{where}: turn {k} is a system turn; only the first turn may be one")
                system = content.strip()
                continue
            if turns and turns[-1]["role"] == role:
                raise UserError(f"{where}: turns {k - 1} and {k} are both {role} turns; "
                                "turns must alternate between user and assistant")
            turns.append({"role": role, "content": content.strip()})
        if self.ends_with == "user":
            if turns[-1]["role"] != "user":
                raise UserError(f"{where}: the history of a preference row must end with a user turn")
            return system, turns
        if not any(t["role"] == "assistant" for t in turns):
            raise UserError(f"{where}: the conversation has no assistant turn")
        if turns[-1]["role"] != "assistant":
            raise UserError(f"{where}: the conversation ends with a user turn; it must end with an assistant reply")
        return system, turns


@dataclass(frozen=True)
class TemplatesToTurns:
    """One exchange from column templates -> (None, [user, assistant]); a side may come out empty."""

    prompt_template: str
    response_template: str

    @property
    def fields(self) -> list[str]:
        return template_fields(self.prompt_template) + template_fields(self.response_template)

    def __call__(self, row: dict, where: str) -> tuple[Optional[str], Turns]:
        # A key absent from a JSON row reads as None: a broken row, unlike an empty string (a counted drop).
        missing = [f for f in dict.fromkeys(self.fields) if row.get(f) is None]
        if missing:
            raise UserError(f"{where}: no value for {', '.join(repr(f) for f in missing)} (the key is missing or "
                            "null; an empty string is dropped and counted instead)")
        values = {k: "" if v is None else str(v) for k, v in row.items()}
        prompt = self.prompt_template.format_map(values).strip()
        response = self.response_template.format_map(values).strip()
        return None, [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


@dataclass(frozen=True)
class TextToTurns:
    """A raw-text column (continued pretraining) -> (None, [one ``text`` turn]); empty text is a counted drop."""

    column: str

    @property
    def fields(self) -> list[str]:
        return [self.column]

    def __call__(self, row: dict, where: str) -> tuple[Optional[str], Turns]:
        if row.get(self.column) is None:
            raise UserError(f"{where}: no value for {self.column!r} (the key is missing or null)")
        return None, [{"role": "text", "content": str(row[self.column]).strip()}]


class CorpusFormat:
    """Reads one row into a :class:`Conversation` (the "rows -> messages" transform of a file).

    Args mirror the ``data.columns`` options (``prompt_column`` is ``data.columns.prompt``, ...; see
    :class:`CorpusColumns`); ``columns`` are the corpus's
    column names, used to auto-detect the layout and to reject unknown columns early.
    """

    def __init__(self, columns: list[str], where: str, prompt_column: str = "prompt",
                 response_column: str = "response", messages_column: Optional[str] = None,
                 prompt_template: Optional[str] = None, response_template: Optional[str] = None,
                 system_column: Optional[str] = None, id_column: Optional[str] = "id",
                 group_column: Optional[str] = None, category_column: Optional[str] = None,
                 text_column: Optional[str] = None, objective: Objective = "sft") -> None:
        self.columns = list(columns)
        cols = set(columns)
        if messages_column is None and prompt_template is None and prompt_column not in cols:
            messages_column = next((c for c in MESSAGE_COLUMNS if c in cols), None)
        self.replies = None
        if objective != "sft":
            if text_column is not None:
                raise UserError(f"data.columns.text is raw text for objective sft, not {objective}")
            self.layout = "pairs" if objective == "dpo" else "labelled"
            self.to_turns = (MessagesToTurns(messages_column, ends_with="user") if messages_column is not None
                             else PromptToTurns(prompt_column))
            self.replies = PairedReplies() if objective == "dpo" else LabelledReply()
        elif text_column is not None:
            self.layout = "text"
            self.to_turns = TextToTurns(text_column)
        elif messages_column is not None:
            self.layout = "messages"
            self.to_turns = MessagesToTurns(messages_column)
        else:
            self.layout = "columns" if prompt_template is None and response_template is None else "templates"
            self.to_turns = TemplatesToTurns(prompt_template or "{" + prompt_column + "}",
                                             response_template or "{" + response_column + "}")
            if any(not name for name in self.to_turns.fields):
                raise UserError("data.columns.prompt_template/response_template: name every field, e.g. '{Questions}'")
        needed = self.to_turns.fields + (self.replies.fields if self.replies else []) \
            + [c for c in (system_column, group_column, category_column) if c is not None]
        missing = [c for c in dict.fromkeys(needed) if c not in cols]
        if missing:
            hint = {"pairs": "DPO rows: prompt or messages, chosen, rejected",
                    "labelled": "KTO rows: prompt or messages, completion, label",
                    "text": "set data.columns.text to the raw-text column"}.get(self.layout, (
                        "set data.columns.messages, or data.columns.prompt / data.columns.response, "
                        "or data.columns.prompt_template / data.columns.response_template"))
            raise UserError(f"{where}: missing column(s) {', '.join(repr(c) for c in missing)}; "
                            f"found {', '.join(repr(c) for c in columns)} ({hint})")
        self.system_column = system_column
        self.id_column = id_column if id_column in cols else None
        self.group_column = group_column or next((c for c in GROUP_COLUMNS if c in cols), None)
        self.category_column = category_column

    def cache_key(self) -> str:
        """What the encoded rows depend on (part of the Arrow cache's fingerprint)."""
        return repr((self.to_turns, self.replies, self.system_column, self.id_column, self.group_column,
                     self.category_column))

    def conversation(self, row: dict, where: str) -> Optional[Conversation]:
        """The row as a conversation; ``None`` for a prompt/response row with an empty side (counted)."""
        system, turns = self.to_turns(row, where)
        extra: dict = {}
        if self.replies is not None:
            turns, extra = self.replies(row, turns, where)
        elif self.layout == "text":
            if not turns[0]["content"]:
                return None
        elif self.layout != "messages" and (not turns[0]["content"] or not turns[1]["content"]):
            return None
        if self.system_column is not None:
            value = row.get(self.system_column)
            if value not in (None, "") and str(value).strip():
                system = str(value).strip()
        text_key = "\x1e".join(t["content"] for t in turns)
        rid = row.get(self.id_column) if self.id_column else None
        rid = str(rid) if rid not in (None, "") else hashlib.blake2b(text_key.encode("utf-8"), digest_size=8).hexdigest()
        group = row.get(self.group_column) if self.group_column else None
        group = str(group) if group not in (None, "") else rid
        category = row.get(self.category_column) if self.category_column else None
        return Conversation(id=rid, group=group, system=system, turns=turns,
                            category=None if category in (None, "") else str(category), **extra)


def split_of(key: str, val_fraction: float, test_fraction: float, seed: int) -> str:
    """Stable train/val/test assignment from a hash of ``key`` (a group or row id)."""
    digest = hashlib.blake2b(f"{seed}\x00{key}".encode("utf-8"), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"
