"""Per-split corpus statistics: rows, conversations, token-length percentiles, what the length policy kept, and
how many tokens the tokenizer spends per word and per character of the corpus's texts."""
from __future__ import annotations

import itertools
import unicodedata
from typing import Callable, Iterable

import numpy as np

from ..text import words_bn
from .formats import SPLITS

KEPT = ("ok", "truncated")  # the statuses of rows that train; the others are counted drops


def split_stats(columns: dict, max_seq_length: int) -> dict:
    """Rows, conversations, turns, token-length percentiles, % over the limit and reply tokens of one split."""
    status = np.asarray(columns["status"], dtype=object)
    raw = np.asarray(columns["raw_tokens"], dtype=np.int64)
    nonempty = status != "empty"
    kept = np.isin(status, KEPT)
    lengths = raw[nonempty]
    pct = (lambda q: int(np.percentile(lengths, q))) if lengths.size else (lambda q: 0)
    return {
        "rows": int(status.size),
        "conversations": len(set(np.asarray(columns["group"], dtype=object)[nonempty].tolist())),
        "turns": int(np.asarray(columns["n_turns"], dtype=np.int64)[nonempty].sum()),
        "tokens_p50": pct(50), "tokens_p90": pct(90), "tokens_p99": pct(99), "tokens_max": pct(100),
        "over_max_pct": round(100.0 * float((lengths > max_seq_length).mean()) if lengths.size else 0.0, 2),
        "reply_tokens": int(np.asarray(columns["reply_tokens"], dtype=np.int64)[kept].sum()),
        "kept": int(kept.sum()),
        "truncated": int((status == "truncated").sum()),
        "dropped_too_long": int((status == "too_long").sum()),
        "dropped_empty": int((status == "empty").sum()),
        "dropped_duplicate": int((status == "duplicate").sum()),
    }


LENGTH_COLUMNS = ("tokens_p50", "tokens_p90", "tokens_p99", "tokens_max")  # headed p50 ... max in the table
STAT_COLUMNS = ("rows", "conversations", "turns", *LENGTH_COLUMNS, "over_max_pct", "reply_tokens", "kept", "truncated",
                "dropped_too_long", "dropped_empty", "dropped_duplicate")


Tokenize = Callable[[list[str]], list[list[int]]]  # texts -> their token ids, each tokenised on its own


def text_stats(texts: Iterable[str], tokenize: Tokenize, chunk: int = 1024) -> dict:
    """Tokens per word and per character of ``texts`` (each tokenised on its own by ``tokenize``: no chat template,
    no special tokens), and the totals they come from. Words are :func:`~..text.words_bn`'s (NFC, punctuation
    split off, white space), characters those of the NFC text: two tokenizers compare on the same counts."""
    tokens = words = chars = 0
    texts = iter(texts)
    while batch := list(itertools.islice(texts, chunk)):
        tokens += sum(len(ids) for ids in tokenize(batch))
        words += sum(len(words_bn(t)) for t in batch)
        chars += sum(len(unicodedata.normalize("NFC", t)) for t in batch)
    return {"text_tokens": tokens, "text_words": words, "text_chars": chars,
            "tokens_per_word": round(tokens / words, 3) if words else 0.0,
            "tokens_per_char": round(tokens / chars, 3) if chars else 0.0}


TEXT_COLUMNS = ("tokens_per_word", "tokens_per_char")  # what the table shows of text_stats, where a split has it


def format_stats(stats: dict, max_seq_length: int, deduplicated: bool = False) -> str:
    """A plain-text table of :func:`split_stats` per split, with :func:`text_stats`'s ratios where the statistics
    have them (and the duplicates dropped, when ``deduplicated``)."""
    shown = [s for s in SPLITS if s in stats]
    texts = bool(shown) and all(TEXT_COLUMNS[0] in stats[s] for s in shown)
    columns = STAT_COLUMNS + (TEXT_COLUMNS if texts else ())
    head = ["split"] + [c.removeprefix("tokens_") if c in LENGTH_COLUMNS else c for c in columns]
    rows = [[s] + [str(stats[s][c]) for c in columns] for s in shown]
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    line = lambda r: "  ".join(x.rjust(w) for x, w in zip(r, widths))  # noqa: E731
    title = f"data (token lengths before truncation; max_seq_length={max_seq_length}" + (
        "; tokens_per_word / tokens_per_char: of the turns' texts alone, without the chat template's tokens)"
        if texts else ")")
    dedup = [f"deduplicate: dropped {sum(s['dropped_duplicate'] for s in stats.values())} conversations "
             "identical to an earlier one"] if deduplicated else []
    return "\n".join([title, line(head)] + [line(r) for r in rows] + dedup)


def flat_stats(stats: dict) -> dict:
    """``{"data/train/rows": ..., ...}`` for TensorBoard hparams."""
    return {f"data/{s}/{k}": v for s, d in stats.items() for k, v in d.items()}
