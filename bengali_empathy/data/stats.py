"""Per-split corpus statistics: rows, conversations, token-length percentiles and what the length policy kept."""
from __future__ import annotations

import numpy as np

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


STAT_COLUMNS = ("rows", "conversations", "turns", "tokens_p50", "tokens_p90", "tokens_p99", "tokens_max",
                "over_max_pct", "reply_tokens", "kept", "truncated", "dropped_too_long", "dropped_empty",
                "dropped_duplicate")


def format_stats(stats: dict, max_seq_length: int, deduplicated: bool = False) -> str:
    """A plain-text table of :func:`split_stats` per split (and the duplicates dropped, when ``deduplicated``)."""
    head = ["split"] + [c.replace("tokens_", "") if c.startswith("tokens_p") or c == "tokens_max" else c
                        for c in STAT_COLUMNS]
    rows = [[s] + [str(stats[s][c]) for c in STAT_COLUMNS] for s in SPLITS if s in stats]
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    line = lambda r: "  ".join(x.rjust(w) for x, w in zip(r, widths))  # noqa: E731
    title = f"data (token lengths before truncation; max_seq_length={max_seq_length})"
    dedup = [f"deduplicate: dropped {sum(s['dropped_duplicate'] for s in stats.values())} conversations "
             "identical to an earlier one"] if deduplicated else []
    return "\n".join([title, line(head)] + [line(r) for r in rows] + dedup)


def flat_stats(stats: dict) -> dict:
    """``{"data/train/rows": ..., ...}`` for TensorBoard hparams."""
    return {f"data/{s}/{k}": v for s, d in stats.items() for k, v in d.items()}
