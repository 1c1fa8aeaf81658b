"""``python -m bengali_empathy runs``: the experiments in the registry, one of them with its sample replies
and human ratings, or its human judgements exported as preference rows (:mod:`.preference_export`)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, Optional

from ..errors import UserError


def _key_scores(metrics: dict) -> str:
    """A run's scores: an evaluation's at the top level, a fit's final validation under ``val/``."""
    from ..evaluation.metrics import SCORE_NAMES
    from .registry import recorded_score

    found = (recorded_score(metrics, name) for name in SCORE_NAMES)
    return ", ".join(f"{k}={v:.4f}" for k, v in filter(None, found))


def main(argv: list[str]) -> int:
    """List recorded experiments, or show one with its sample replies and human ratings."""
    from jsonargparse import ArgumentParser

    from .judgements import win_rate
    from .human_ratings import rating_summary
    from .registry import DEFAULT_DB, experiment_for, list_experiments, responses_of

    p = ArgumentParser(prog="python -m bengali_empathy runs", exit_on_error=False,
                       description="Experiments recorded in the SQLite registry: `runs` lists them, "
                                   "`runs show ID` prints one with its sample replies, `runs export-preferences ID "
                                   "--output prefs.jsonl` turns its human judgements into DPO or KTO rows.")
    p.add_argument("action", type=Optional[str], nargs="?", default=None, help="show | export-preferences")
    p.add_argument("id", type=Optional[str], nargs="?", default=None, help="experiment id or log directory")
    p.add_argument("--db", type=str, default=DEFAULT_DB, help="the registry file")
    p.add_argument("--samples", type=int, default=5, help="sample replies shown by `show`")
    p.add_argument("--output", type=Optional[str], default=None, help="export-preferences: the JSONL file to write")
    p.add_argument("--objective", type=Literal["dpo", "kto"], default="dpo",
                   help="export-preferences: dpo pairs from blind judgements, or kto rows from 1-5 ratings")
    p.add_argument("--desirable-at", type=float, default=4.0, help="kto: mean rating from which a reply is desirable")
    p.add_argument("--undesirable-at", type=float, default=2.0, help="kto: mean rating up to which it is undesirable")
    cfg = p.parse_args(argv)
    if cfg.samples < 0:
        raise UserError(f"--samples must be at least 0, not {cfg.samples}")
    if cfg.action == "export-preferences":
        from .preference_export import export_preferences

        if cfg.id is None or cfg.output is None:
            raise UserError("usage: runs export-preferences ID_OR_DIR --output prefs.jsonl [--objective dpo|kto]")
        exported = export_preferences(cfg.db, cfg.id, Path(cfg.output), cfg.objective, cfg.desirable_at,
                                      cfg.undesirable_at)
        print(f"{len(exported.rows)} {cfg.objective} rows written to {cfg.output}: {exported.summary()}")
        return 0
    if cfg.action is None:
        experiments = list_experiments(cfg.db)
        print(f"{'id':>4}  {'time (UTC)':<25}  {'stage':<8}  {'steps':>6}  model / corpus / scores")
        for e in experiments:
            run = e["metrics"].get("run", {})
            print(f"{e['id']:>4}  {e['timestamp']:<25}  {run.get('stage', ''):<8}  {run.get('steps', ''):>6}  "
                  f"{e['model_name']} / {run.get('corpus', '')} / {_key_scores(e['metrics'])}")
        return 0
    if cfg.action != "show" or cfg.id is None:
        raise UserError("usage: runs [show ID | export-preferences ID --output FILE] [--db FILE]")
    exp = experiment_for(cfg.db, cfg.id)
    metrics = json.loads(exp["metrics"] or "{}")
    run = metrics.pop("run", {})
    print(f"experiment {exp['id']} ({exp['timestamp']}): {run.get('stage')} of {exp['model_name']}")
    print(f"  log dir: {run.get('log_dir')}\n  corpus: {run.get('corpus')}\n  adapter: {run.get('adapter_path')}")
    print(f"  LoRA: {exp['lora_config']}\n  train_loss: {exp['train_loss']}  val_loss: {exp['val_loss']}")
    print(f"  scores: {_key_scores(metrics)}")
    for line in metrics.get("warnings", []):
        print(f"  warning: {line}")
    for shown, summary in rating_summary(cfg.db, exp["id"]).items():
        print(f"  human ratings ({shown}, n={summary['n']}): "
              + ", ".join(f"{k} {v:.2f}" for k, v in summary.items() if k != "n"))
    wins = win_rate(cfg.db, exp["id"])
    if wins is not None:
        print(f"  blind judgements: {wins.describe()}")
    for r in responses_of(cfg.db, exp["id"])[: cfg.samples]:
        print(f"\n  prompt:     {r['input_text']}\n  reference:  {r['reference_text']}\n  reply:      {r['response_text']}")
        if r["base_response_text"] is not None:
            print(f"  base reply: {r['base_response_text']}")
    return 0
