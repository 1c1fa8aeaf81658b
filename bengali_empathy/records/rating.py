"""Human rating in the terminal: ``python -m bengali_empathy rate RUN_OR_DIR --n 20 [--blind]``.

Shows sampled prompts with one reply each and records 1-5 scores for empathy,
relevance, fluency, coherence and helpfulness (and an optional comment) in the
registry's ``HumanRatings`` table (:mod:`.human_ratings`), one committed row per answer, so quitting
halfway keeps what was rated. ``--blind`` mixes the tuned and the base model's
replies (when the run scored both) without saying which is which.
"""
from __future__ import annotations

import random
import sys
from typing import Callable, TextIO

from ..errors import UserError
from .human_ratings import record_rating
from .registry import ASPECTS, experiment_for, responses_of

QUIT = ("q", "quit", "exit")


def _scores(answer: str) -> list[int] | None:
    parts = answer.replace(",", " ").split()
    if len(parts) != len(ASPECTS) or not all(p.isdigit() and 1 <= int(p) <= 5 for p in parts):
        return None
    return [int(p) for p in parts]


def rate(db: str, ref: str, n: int, blind: bool, seed: int, ask: Callable[[str], str], out: TextIO) -> int:
    """Run a rating session; returns the number of replies rated."""
    experiment = experiment_for(db, ref)
    responses = responses_of(db, experiment["id"])
    if not responses:
        raise UserError(f"experiment {experiment['id']} has no generated replies to rate "
                        f"(rate a test or predict run)")
    rng = random.Random(seed)
    items = [(r, "tuned") for r in responses]
    if blind:
        if not any(r["base_response_text"] is not None for r in responses):
            raise UserError(f"experiment {experiment['id']} has no base replies: --blind needs a run with "
                            f"--model.compare_base true")
        items += [(r, "base") for r in responses if r["base_response_text"] is not None]
    rng.shuffle(items)
    items = items[:n]
    label = "" if blind else " (tuned model)"
    print(f"Rating {len(items)} replies of experiment {experiment['id']}{label}. For each, type five scores "
          f"1-5 for {', '.join(ASPECTS)} (e.g. '4 5 4 4 3'), or q to stop.", file=out, flush=True)
    rated = 0
    for k, (row, shown) in enumerate(items, 1):
        reply = row["response_text"] if shown == "tuned" else row["base_response_text"]
        print(f"\n[{k}/{len(items)}] prompt:\n{row['input_text']}\n\nreply:\n{reply}\n", file=out, flush=True)
        while True:
            answer = ask(f"{' '.join(ASPECTS)} (1-5 each, q to stop): ").strip()
            if answer.lower() in QUIT:
                print(f"stopped: {rated} rated", file=out, flush=True)
                return rated
            scores = _scores(answer)
            if scores is not None:
                break
            print(f"please give {len(ASPECTS)} whole numbers from 1 to 5", file=out, flush=True)
        comment = ask("comment (optional, Enter to skip): ").strip() or None
        record_rating(db, row["id"], shown, scores, comment)
        rated += 1
    print(f"done: {rated} rated", file=out, flush=True)
    return rated


def main(argv: list[str]) -> int:
    """Score sampled replies of a run from the terminal (1-5 per aspect)."""
    from jsonargparse import ArgumentParser

    from .registry import DEFAULT_DB

    p = ArgumentParser(prog="python -m bengali_empathy rate", exit_on_error=False,
                       description="Rate sampled replies of a recorded run for empathy, relevance, fluency, "
                                   "coherence and helpfulness (1-5) and an optional comment; quitting keeps "
                                   "what was rated.")
    p.add_argument("run", type=str, help="experiment id or the run's log directory")
    p.add_argument("--n", type=int, default=20, help="replies to rate")
    p.add_argument("--blind", type=bool, default=False, help="mix base and tuned replies without labels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--db", type=str, default=DEFAULT_DB, help="the registry file")
    cfg = p.parse_args(argv)
    if cfg.n < 1:
        raise UserError(f"--n must be at least 1, not {cfg.n}")

    def ask(prompt: str) -> str:
        try:
            return input(prompt)
        except EOFError:
            return "q"

    rate(cfg.db, cfg.run, cfg.n, cfg.blind, cfg.seed, ask, sys.stdout)
    return 0
