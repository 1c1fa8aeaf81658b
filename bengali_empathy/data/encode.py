"""Conversations -> token ids, reply label spans and the length policy; rows -> their split.

:class:`RowEncoder` is the ``datasets.map`` transform of one corpus file, in two stages so that a
row is parsed once and a streamed split can still be filtered before anything is tokenised:

* :meth:`RowEncoder.parse` -- rows -> conversations as columns (``system``, ``turns``, ``id``,
  ``group``, ``category``), the row's ``file`` / ``line`` and its split (cheap);
* :meth:`RowEncoder.encode` -- those columns -> ids + label spans with ``on_too_long`` applied;
  every dropped or truncated row is kept as a status (so it is counted, never silent).

In memory both stages run in one map (:meth:`RowEncoder.__call__`); a stream filters between them.
A DPO row is encoded twice, with the chosen and with the rejected reply after the same history
(``input_ids`` and ``rejected_ids``), under one status: too long if either is; a KTO row once, with
its label (``desirable``). Both train on the final reply only.
"""
from __future__ import annotations

import hashlib
import json
import os
import unicodedata
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Literal, Optional

from ..errors import UserError, check_ranges
from .chat_format import ChatEncoder
from .files import diagnose, load_file
from .formats import CorpusFormat, Turns, split_of

# Bump when the encoded columns change, so old Arrow caches are not reused.
ENCODING_VERSION = 6

OnTooLong = Literal["error", "drop", "truncate", "truncate_history"]
TrainOn = Literal["all_assistant", "last_assistant"]

PARSED_COLUMNS = ("file", "line", "split", "id", "group", "category", "system", "turns", "rejected", "desirable")
# The preference columns: empty / None on a dialogue row.
PREFERENCE_COLUMNS = ("rejected_ids", "rejected_spans", "desirable")
ENCODED_COLUMNS = ("input_ids", "label_spans", "prompt_len", "n_tokens", "raw_tokens", "reply_tokens", "status",
                   "n_turns", "file", "line", "id", "group", "split", "prompt", "reference", "category", "dedup_key",
                   "reference_in_prompt", "texts", *PREFERENCE_COLUMNS)
# A final reply this short ("ঠিক আছে।") may well have been said earlier in a conversation without
# any leak; a longer one found in the conversation before it would be an echo to copy.
ECHO_MIN_WORDS = 4


@dataclass(frozen=True)
class EncodeOptions:
    system_prompt: str
    max_seq_length: int
    on_too_long: str
    train_on: str
    val_fraction: float
    test_fraction: float
    seed: int


@dataclass(frozen=True)
class EncodingSettings:
    """How a conversation becomes tokens and labels (``data.encoding``).

    Args:
        on_too_long: a conversation longer than ``data.max_seq_length`` is an ``error``; ``drop`` the row;
            ``truncate`` its tail; or ``truncate_history``: drop the oldest whole turns (keeping the system
            prompt and the final exchange), then cut the reply's tail.
        train_on: loss on ``all_assistant`` replies or only the ``last_assistant`` one.
        chat_template: the chat format to train in instead of the tokenizer's own, as Jinja text or the path of a
            ``.jinja`` file (e.g. ChatML for a checkpoint whose tokenizer has none); the model generates and the
            adapter is saved with it.
    """

    on_too_long: OnTooLong = "error"
    train_on: TrainOn = "all_assistant"
    chat_template: Optional[str] = None


@dataclass(frozen=True)
class SplitSettings:
    """The stable hash split into train, val and test (``data.split``).

    Args:
        val_fraction / test_fraction / seed: the shares of val and test, and the seed of the hash.
        deduplicate: drop conversations identical to an earlier one (same system prompt and turns after NFC
            and white-space normalisation) before the split; counted as ``dropped_duplicate``. In memory only.
    """

    val_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 42
    deduplicate: bool = False

    def __post_init__(self) -> None:
        check_ranges("data.split", self, {"val_fraction": (0 <= self.val_fraction < 1, "in [0, 1)"),
                                          "test_fraction": (0 <= self.test_fraction < 1, "in [0, 1)")})
        if self.val_fraction + self.test_fraction >= 1:
            raise UserError(f"data.split.val_fraction ({self.val_fraction}) and data.split.test_fraction "
                            f"({self.test_fraction}) must sum below 1")


def check_options(batch_size: int, max_seq_length: int, deduplicate: bool, streaming: bool) -> None:
    """Refuse data options that cannot work, before anything is read."""
    if batch_size < 1:
        raise UserError(f"data.batch_size must be at least 1, not {batch_size}")
    if max_seq_length < 16:
        raise UserError(f"data.max_seq_length must be at least 16, not {max_seq_length}")
    if deduplicate and streaming:
        raise UserError("data.split.deduplicate needs the corpus in memory: set data.streaming to false")


@dataclass
class Encoded:
    """One row's encoding: ``status`` is ``ok``, ``truncated``, ``too_long`` or ``empty`` (the last two dropped)."""

    status: str
    ids: list[int] = field(default_factory=list)
    spans: list[tuple[int, int]] = field(default_factory=list)
    raw_tokens: int = 0  # the conversation's length before any truncation
    n_turns: int = 0

    @property
    def prompt_len(self) -> int:
        """Generation prompt = ``ids[:prompt_len]``: the history up to the final reply's header."""
        return self.spans[-1][0] if self.spans else 0


def where(file: str, line: int) -> str:
    """``corpus.jsonl: row 12``, as error messages name a row."""
    return f"{file}: row {line}"


def conversation_key(system: str, turns: Turns) -> str:
    """Duplicate key: the conversation's texts after NFC and white-space normalisation."""
    norm = lambda t: " ".join(unicodedata.normalize("NFC", t).split())  # noqa: E731
    text = "\x1e".join([norm(system)] + [f"{t['role']}\x1f{norm(t['content'])}" for t in turns])
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def reference_in_prompt(system: str, turns: Turns) -> bool:
    """Whether the final reply (of at least ``ECHO_MIN_WORDS`` words) occurs in the text before it."""
    from ..text import normalize_bn

    reference = normalize_bn(turns[-1]["content"])
    if len(reference.split()) < ECHO_MIN_WORDS:
        return False
    before = normalize_bn(" ".join([system] + [t["content"] for t in turns[:-1]]))
    return f" {reference} " in f" {before} "


def raise_reference_in_prompt(where: str) -> None:
    raise UserError(f"{where}: the reference reply already occurs earlier in the conversation, inside the prompt "
                    "given to generation: its scores would measure an echo (remove or fix the row)")


def both_fit(chosen: Encoded, rejected: Encoded) -> tuple[Encoded, Encoded]:
    """A pair's two encodings under one status: dropped if either is (or if truncation left the two replies
    the same: nothing to prefer), truncated if either is."""
    raw = max(chosen.raw_tokens, rejected.raw_tokens)
    if "too_long" in (chosen.status, rejected.status) or chosen.ids == rejected.ids:
        return Encoded("too_long", raw_tokens=raw, n_turns=chosen.n_turns), Encoded("too_long")
    status = "truncated" if "truncated" in (chosen.status, rejected.status) else "ok"
    return replace(chosen, status=status, raw_tokens=raw), rejected


def drop_oldest_exchanges(turns: list[tuple[str, list[int]]],
                          too_long: Callable[[list[tuple[str, list[int]]]], bool]) -> list[tuple[str, list[int]]]:
    """The ``truncate_history`` rule: while ``too_long(turns)``, drop the oldest whole exchange (a user
    turn and the reply after it; a lone turn at the start), never the last user turn or what follows it.

    Training applies it to a conversation up to its final reply; chat to the history before a new message.
    """
    last_user = max((k for k, (r, _) in enumerate(turns) if r == "user"), default=0)
    while last_user > 0 and too_long(turns):
        drop = 2 if turns[0][0] == "user" and turns[1][0] == "assistant" and last_user >= 2 else 1
        turns, last_user = turns[drop:], last_user - drop
    return turns


def fit_to_length(chat: ChatEncoder, system_ids: list[int], turns: list[tuple[str, list[int]]],
                  opts: EncodeOptions) -> Encoded:
    """The conversation's ids and reply spans under ``max_seq_length`` and ``on_too_long``.

    ``error`` marks a too-long row ``too_long`` as ``drop`` does: the caller raises, once it can
    say how many rows are too long.
    """
    limit = opts.max_seq_length
    full, spans = chat.assemble(system_ids, turns)
    raw = len(full)
    status = "ok"
    if raw > limit:
        if opts.on_too_long in ("error", "drop"):
            return Encoded("too_long", raw_tokens=raw, n_turns=len(turns))
        status = "truncated"
        if opts.on_too_long == "truncate_history":
            turns = drop_oldest_exchanges(turns, lambda kept: len(chat.assemble(system_ids, kept)[0]) > limit)
            full, spans = chat.assemble(system_ids, turns)
        full = full[:limit]
    if spans[-1][0] >= len(full):  # not one token of the final reply fits
        return Encoded("too_long", raw_tokens=raw, n_turns=len(turns))
    if opts.train_on == "last_assistant":
        spans = spans[-1:]
    spans = [(s, min(e, len(full))) for s, e in spans if s < len(full)]
    return Encoded(status, full, spans, raw, len(turns))


class RowEncoder:
    """``datasets.map`` transform of one corpus file: rows -> conversations -> token ids and label spans.

    Output columns (:data:`ENCODED_COLUMNS`): ``input_ids``; ``label_spans`` (flat
    ``[start, end, ...]`` of the trained replies); ``prompt_len`` (generation prompt =
    ``input_ids[:prompt_len]``, ending in the final reply's header); lengths; ``status``; the
    split; and ``file/line/id/group/prompt/reference/category`` for evaluation and error messages.
    """

    def __init__(self, fmt: CorpusFormat, chat: ChatEncoder, opts: EncodeOptions, file: str) -> None:
        self.fmt, self.chat, self.opts, self.file = fmt, chat, opts, file
        self.final_reply_opts = replace(opts, train_on="last_assistant")  # what a preference row trains on
        chat.remember(chat.content("system", opts.system_prompt))

    def __call__(self, batch: dict, indices: list[int]) -> dict:
        return self.encode(self.parse(batch, indices))

    def parse(self, batch: dict, indices: list[int]) -> dict:
        """Rows -> their conversations as columns, ``file``/``line`` and split (an empty row: no turns)."""
        keys = list(batch)
        out: dict = {k: [] for k in PARSED_COLUMNS}
        o = self.opts
        for j, i in enumerate(indices):
            line = i + 1
            here = where(self.file, line)
            c = self.fmt.conversation({k: batch[k][j] for k in keys}, here)
            out["file"].append(self.file)
            out["line"].append(line)
            out["split"].append(split_of(c.group if c else f"{self.file}\x00{line}", o.val_fraction,
                                         o.test_fraction, o.seed))
            out["id"].append(c.id if c else here)
            out["group"].append(c.group if c else here)
            out["category"].append(c.category if c else None)
            out["system"].append(c.system if c else None)
            out["turns"].append(c.turns if c else [])
            out["rejected"].append(c.rejected if c else None)
            out["desirable"].append(c.desirable if c else None)
        return out

    def encode(self, batch: dict) -> dict:
        """Parsed columns -> :data:`ENCODED_COLUMNS` (one tokenizer call for the whole batch)."""
        systems = [self.opts.system_prompt if s is None else s for s in batch["system"]]
        content = self.chat.content
        texts = []
        for system, turns, rejected in zip(systems, batch["turns"], batch["rejected"]):
            if turns:
                texts += ([content("system", system)] + [content(t["role"], t["content"]) for t in turns]
                          + ([content("assistant", rejected)] if rejected is not None else []))
        ids = iter(self.chat.tokenize(texts))
        out: dict = {k: [] for k in ENCODED_COLUMNS}
        for j, turns in enumerate(batch["turns"]):
            other = Encoded("empty")
            if turns:
                system_ids = next(ids)
                preference = batch["rejected"][j] is not None or batch["desirable"][j] is not None
                opts = self.final_reply_opts if preference else self.opts
                turn_ids = [(t["role"], next(ids)) for t in turns]
                enc = fit_to_length(self.chat, system_ids, turn_ids, opts)
                if batch["rejected"][j] is not None:
                    other = fit_to_length(self.chat, system_ids, turn_ids[:-1] + [("assistant", next(ids))], opts)
                    enc, other = both_fit(enc, other)
            else:
                enc = Encoded("empty")
            self._append(out, enc, other, batch, j)
        return out

    @staticmethod
    def _append(out: dict, enc: Encoded, rejected: Encoded, batch: dict, j: int) -> None:
        system, turns = batch["system"][j] or "", batch["turns"][j]
        out["rejected_ids"].append(rejected.ids)
        out["rejected_spans"].append([x for s in rejected.spans for x in s])
        out["desirable"].append(batch["desirable"][j])
        out["input_ids"].append(enc.ids)
        out["label_spans"].append([x for s in enc.spans for x in s])
        out["prompt_len"].append(enc.prompt_len)
        out["n_tokens"].append(len(enc.ids))
        out["raw_tokens"].append(enc.raw_tokens)
        out["reply_tokens"].append(sum(e - s for s, e in enc.spans))
        out["status"].append(enc.status)
        out["n_turns"].append(enc.n_turns)
        for k in ("file", "line", "id", "group", "split", "category"):
            out[k].append(batch[k][j])
        users = [t["content"] for t in turns if t["role"] == "user"]
        out["prompt"].append(users[-1] if users else "")
        out["reference"].append(turns[-1]["content"] if turns else "")
        out["texts"].append([t["content"] for t in turns])  # every turn: what the honesty checks compare against
        # A preference row's key includes the reply beside the trained one: two pairs may share a chosen reply.
        beside = [{"role": "rejected", "content": batch["rejected"][j]}] if batch["rejected"][j] is not None else \
            [{"role": "label", "content": str(batch["desirable"][j])}] if batch["desirable"][j] is not None else []
        out["dedup_key"].append(conversation_key(system, turns + beside) if turns else "")
        out["reference_in_prompt"].append(reference_in_prompt(system, turns) if turns else False)


def too_long_error(first: str, raw_tokens: int, limit: int, counted: Optional[tuple[int, int, int, int]]) -> UserError:
    """The ``on_too_long=error`` line: the first too-long row and, when the corpus was counted,
    ``(too_long, rows, p50, p99)`` of the rows over the limit, so one retry can pick a limit or a policy."""
    how_many = (f"; {counted[0]} of {counted[1]} rows are longer (p50 {counted[2]}, p99 {counted[3]} tokens)"
                if counted else "; the first of the stream (data-stats counts them all)")
    return UserError(f"{first}: conversation is {raw_tokens} tokens, longer than max_seq_length={limit}{how_many} "
                     "(raise data.max_seq_length or set data.encoding.on_too_long to drop, truncate or "
                     "truncate_history)")


def encode_in_memory(encoders: dict, opts: EncodeOptions, num_proc: Optional[int]):
    """Every file of a corpus encoded into one Arrow dataset of :data:`ENCODED_COLUMNS`.

    HF ``datasets`` caches the result under a fingerprint of the file, the tokenizer, the options,
    the format and :data:`ENCODING_VERSION`: a second run starts from the cache.
    """
    import datasets

    parts = []
    for f, enc in encoders.items():
        raw = load_file(f, streaming=False)
        key = json.dumps([ENCODING_VERSION, raw._fingerprint, enc.chat.cache_key(), asdict(opts), enc.fmt.cache_key()],
                         sort_keys=True, default=str)
        fingerprint = hashlib.sha256(key.encode("utf-8")).hexdigest()[:32]
        procs = num_proc if num_proc is not None else (min(os.cpu_count() or 1, 8) if len(raw) >= 20_000 else None)
        try:
            parts.append(raw.map(enc, batched=True, batch_size=256, with_indices=True, remove_columns=raw.column_names,
                                 new_fingerprint=fingerprint, num_proc=procs, desc=f"tokenising {f.name}"))
        except UnicodeDecodeError as exc:  # Arrow's JSON reader keeps invalid UTF-8 until a row is read
            raise diagnose(f, exc) from None
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
