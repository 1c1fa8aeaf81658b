"""DPO pairs from a dialogue corpus, for checks and benchmarks: chosen = a conversation's reference reply,
rejected = the final reply of another conversation.

The first half of the rows become pairs; the rejected replies come from the second half (row i's from
row i + n/2), so no reply is both chosen and rejected. These pairs check that DPO trains (a reply
written for the conversation against one written for another); they are no human judgements.

Usage: python scripts/make_preference_pairs.py CORPUS.jsonl PAIRS.jsonl
(rows with ``prompt`` / ``response``, or ``messages`` / ``conversations`` ending in an assistant reply)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def history_and_reply(row: dict) -> tuple[dict, str]:
    """The row's history (``prompt`` or ``messages`` up to the final reply) and its final reply."""
    if "prompt" in row:
        return {"prompt": row["prompt"]}, row["response"]
    turns = row.get("messages") or row["conversations"]
    return {"messages": turns[:-1]}, turns[-1].get("content", turns[-1].get("value"))


def pairs(rows: list[dict]) -> list[dict]:
    half = len(rows) // 2
    out = []
    for i, row in enumerate(rows[:half]):
        history, chosen = history_and_reply(row)
        rejected = history_and_reply(rows[i + half])[1]
        if chosen.strip() == rejected.strip():
            continue
        keep = {k: row[k] for k in ("id", "conversation_id", "dialogue_id", "emotion") if k in row}
        out.append({**keep, **history, "chosen": chosen, "rejected": rejected})
    return out


def main(argv: list[str]) -> int:
    source, target = map(Path, argv)
    rows = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    made = pairs(rows)
    target.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in made), encoding="utf-8")
    print(f"{len(made)} pairs from {len(rows)} rows written to {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
