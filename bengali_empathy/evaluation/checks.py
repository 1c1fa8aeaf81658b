"""Honesty checks on an evaluation: is a score too good to be true?

Two published results of the task this package reimplements were wrong in ways
a number alone does not show: ROUGE-L 0.0 (a tokenizer that deleted Bengali)
and ROUGE-L 1.0 (the reference reply was inside the prompt and echoed back).
These checks look for the causes instead of the symptoms:

* **overlap with training data**: evaluated prompts or references that also
  occur anywhere in the training split's text -- any turn of any training
  conversation, user or assistant: in a per-turn corpus a test reply is often a
  later training row's prompt -- exactly or nearly (after NFC, punctuation and
  white-space normalisation; "near" = character 4-gram Jaccard >= 0.8). Texts of
  fewer than ``MIN_OVERLAP_WORDS`` words ("অবশ্যই।") are counted apart: short
  generic turns recur in any dialogue corpus without a leak;
* **degenerate predictions**: most rows scoring BLEU or ROUGE-L 1.0, empty
  predictions, predictions that copy the prompt or begin by echoing it, one reply
  repeated for most rows.

Each finding is a count, a few examples and, past its threshold, a warning line.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from typing import Iterable, Sequence

from .metrics import sentence_scores
from ..text import is_empty_reply, normalize_bn

NEAR_JACCARD = 0.8
MIN_OVERLAP_WORDS = 4
MOST = 0.5  # "most rows"
EXAMPLES = 3
_MAX_POSTING = 2000  # word pairs this common find too many candidates to be worth checking


def _shingles(text: str, n: int = 4) -> set[str]:
    t = text.replace(" ", "")
    return {t[i:i + n] for i in range(max(1, len(t) - n + 1))} if t else set()


def _word_pairs(text: str) -> set[tuple[str, ...]]:
    words = text.split()
    return {tuple(words[i:i + 2]) for i in range(max(1, len(words) - 1))} if words else set()


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


class NearDuplicateIndex:
    """Normalised training texts, for exact and near-duplicate lookups.

    Candidates for a near match share at least half of the query's word pairs
    (through an inverted index); they are confirmed by character 4-gram Jaccard.
    """

    def __init__(self, texts: Iterable[str]) -> None:
        self.exact: set[str] = set()
        self.normalised: list[str] = []
        self.postings: dict[tuple[str, ...], list[int]] = defaultdict(list)
        for text in texts:
            norm = normalize_bn(text or "")
            if not norm or norm in self.exact:
                continue
            self.exact.add(norm)
            k = len(self.normalised)
            self.normalised.append(norm)
            for pair in _word_pairs(norm):
                self.postings[pair].append(k)

    def match(self, text: str) -> str:
        """``exact``, ``near`` or ``""``."""
        norm = normalize_bn(text or "")
        if not norm:
            return ""
        if norm in self.exact:
            return "exact"
        pairs = _word_pairs(norm)
        hits: Counter = Counter()
        for pair in pairs:
            posting = self.postings.get(pair, ())
            if len(posting) <= _MAX_POSTING:
                hits.update(posting)
        need = max(1, len(pairs) // 2)
        grams = _shingles(norm)
        for k, shared in hits.most_common():
            if shared < need:
                break
            if _jaccard(grams, _shingles(self.normalised[k])) >= NEAR_JACCARD:
                return "near"
        return ""


def train_overlap(rows: Sequence[dict], train_texts: Iterable[str]) -> dict:
    """Evaluated rows whose prompt or reference also occurs among the training split's texts (every turn).

    Per field: ``exact`` and ``near`` counts and examples of texts of at least ``MIN_OVERLAP_WORDS``
    words, and ``short``: the matches (exact or near) of shorter texts, counted apart.
    """
    index = NearDuplicateIndex(train_texts)
    out: dict = {}
    for field in ("prompt", "reference"):
        found: dict = {"exact": [], "near": [], "short": []}
        for r in rows:
            kind = index.match(r[field])
            if kind:
                short = len(normalize_bn(r[field] or "").split()) < MIN_OVERLAP_WORDS
                found["short" if short else kind].append(r)
        out[field] = {kind: len(found[kind]) for kind in found}
        out[field]["examples"] = [{"id": r["id"], "match": kind, field: r[field]}
                                  for kind in ("exact", "near") for r in found[kind][:EXAMPLES]]
    return out


def degenerate_predictions(rows: Sequence[dict], key: str = "prediction") -> dict:
    """Counts of perfect-score, empty, prompt-copying and repeated predictions under ``key``."""
    n = len(rows)
    perfect_bleu = perfect_rouge = empty = copies = starts_with_prompt = 0
    copy_examples: list[dict] = []
    counts: Counter = Counter()
    for r in rows:
        if is_empty_reply(r.get(key) or ""):
            empty += 1
            continue
        pred = normalize_bn(r[key])
        counts[pred] += 1
        scores = sentence_scores(r[key], r["reference"])
        perfect_bleu += scores["bleu"] >= 0.999
        perfect_rouge += scores["rougeL"] >= 0.999
        prompt = normalize_bn(r.get("prompt") or "")
        if len(prompt.split()) >= 2 and pred.startswith(prompt):
            starts_with_prompt += 1
        if prompt and (pred in prompt or prompt in pred
                       or _jaccard(_shingles(pred), _shingles(prompt)) >= NEAR_JACCARD):
            copies += 1
            if len(copy_examples) < EXAMPLES:
                copy_examples.append({"id": r["id"], "prompt": r.get("prompt"), key: r[key]})
    top, top_count = counts.most_common(1)[0] if counts else ("", 0)
    return {"rows": n, "perfect_bleu": perfect_bleu, "perfect_rougeL": perfect_rouge, "empty": empty,
            "copies_prompt": copies, "starts_with_prompt": starts_with_prompt, "copy_examples": copy_examples, "most_common_prediction": top,
            "most_common_count": top_count}


def warnings_for(overlap: dict | None, degenerate: dict, label: str = "") -> list[str]:
    """Warning lines for the findings that cross their thresholds."""
    out: list[str] = []
    who = f"{label} " if label else ""
    n = max(degenerate["rows"], 1)
    if degenerate["perfect_rougeL"] > MOST * n or degenerate["perfect_bleu"] > MOST * n:
        out.append(f"{who}predictions score ROUGE-L 1.0 on {degenerate['perfect_rougeL']} and BLEU 1.0 on "
                   f"{degenerate['perfect_bleu']} of {n} rows: is the reference reply inside the prompt or the "
                   f"training data?")
    if degenerate["empty"]:
        out.append(f"{who}{degenerate['empty']} of {n} predictions are empty")
    if degenerate["copies_prompt"]:
        out.append(f"{who}{degenerate['copies_prompt']} of {n} predictions copy the prompt")
    if degenerate["starts_with_prompt"]:
        out.append(f"{who}{degenerate['starts_with_prompt']} of {n} predictions begin by echoing the prompt")
    if degenerate["most_common_count"] > MOST * n and n > 1:
        out.append(f"{who}one reply is repeated for {degenerate['most_common_count']} of {n} rows: "
                   f"{degenerate['most_common_prediction'][:80]!r}")
    if overlap:
        for field in ("prompt", "reference"):
            exact, near = overlap[field]["exact"], overlap[field]["near"]
            if exact or near:
                out.append(f"{exact} evaluated {field}s occur exactly and {near} nearly in the training split's "
                           f"text (any turn; texts of {MIN_OVERLAP_WORDS}+ words)")
    return out
