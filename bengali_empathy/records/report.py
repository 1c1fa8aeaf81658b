"""The experiment report: ``python -m bengali_empathy report lightning_logs/version_N``.

It is built only from what runs already write: a fit's ``run.json`` (written
by :mod:`.records` when fit ends), ``config.yaml`` and TensorBoard
events, and an evaluation's ``metrics.json`` and ``predictions.jsonl`` (found in
the run directory itself or in a later run whose ``model.adapter_path`` points
into it). Output: ``REPORT.md`` and PNG plots in ``--output`` (default: the run
directory).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

from .._io import atomic_write_text
from ..evaluation.checks import MIN_OVERLAP_WORDS
from ..errors import UserError
from ..evaluation.metrics import REWARD_TAGS, SCORE_NAMES, TEXT_SCORES
from .run import RUN_RECORD, read_run_record

SAMPLE_ROWS = 8


# --------------------------------------------------------------------------- reading a run


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every TensorBoard scalar of the run: tag -> [(step, value), ...]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not any(run_dir.glob("events.out.tfevents*")):
        return {}
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _read_yaml(path: Path) -> dict:
    import yaml

    return (yaml.safe_load(path.read_text(encoding="utf-8")) or {}) if path.is_file() else {}


def _adapter_of(run_dir: Path) -> Optional[Path]:
    """The adapter a run started from. A relative path was relative to the directory the run ran in,
    which is (by Lightning's default root) the one holding its ``lightning_logs``."""
    adapter = (_read_yaml(run_dir / "config.yaml").get("model") or {}).get("adapter_path")
    if not adapter:
        return None
    candidates = [Path(adapter)] if Path(adapter).is_absolute() else [run_dir.parent.parent / adapter, Path(adapter)]
    return next((c.resolve() for c in candidates if c.exists()), candidates[0].resolve())


def find_evaluation(run_dir: Path) -> Optional[Path]:
    """The directory of the newest evaluation of this run: itself, or a run whose adapter lies inside it."""
    if (run_dir / "metrics.json").is_file():
        return run_dir
    found = []
    for other in run_dir.parent.iterdir():
        adapter = _adapter_of(other) if other.is_dir() and (other / "metrics.json").is_file() else None
        if adapter is not None and run_dir.resolve() in (adapter, *adapter.parents):
            found.append(other)
    return max(found, key=lambda d: (d / "metrics.json").stat().st_mtime) if found else None


def find_fit(run_dir: Path) -> Optional[Path]:
    """The fit run: this directory when it has ``run.json``, else the run its adapter came from."""
    if (run_dir / RUN_RECORD).is_file():
        return run_dir
    adapter = _adapter_of(run_dir)
    for d in (adapter, *(adapter.parents if adapter else ())):
        if d is not None and (d / RUN_RECORD).is_file():
            return d
    return None


# --------------------------------------------------------------------------- plots


def _plot(path: Path, title: str, series: dict[str, list[tuple[int, float]]], ylabel: str) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {k: v for k, v in series.items() if v}
    if not series:
        return False
    fig, ax = plt.subplots(figsize=(7, 3.8), dpi=110)
    for label, points in series.items():
        steps, values = zip(*points)
        ax.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3, label=label)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def make_plots(scalars: dict, out: Path) -> list[tuple[str, str]]:
    """Loss, learning rate, tokens/s and memory plots: [(file name, caption), ...] of those with data."""
    made = []
    loss = {"train": scalars.get("train/loss_step", []), "val": scalars.get("val/loss", [])}
    if _plot(out / "loss.png", "loss (nats per reply token)", loss, "loss"):
        made.append(("loss.png", "train and validation loss"))
    # LearningRateMonitor logs "lr" for the named scheduler, "lr-<Optimizer>" for others
    lr = "lr" if "lr" in scalars else next((t for t in scalars if t.startswith("lr-")), None)
    if lr and _plot(out / "learning_rate.png", "learning rate", {lr: scalars[lr]}, "lr"):
        made.append(("learning_rate.png", "learning rate"))
    if _plot(out / "tokens_per_sec.png", "training throughput", {"tokens/s": scalars.get("perf/tokens_per_sec", [])},
             "tokens/s"):
        made.append(("tokens_per_sec.png", "training tokens/s (non-padding tokens)"))
    memory = {"GPU max allocated": scalars.get("gpu/max_mem_allocated_gib", []),
              "GPU max reserved": scalars.get("gpu/max_mem_reserved_gib", []),
              "process peak RSS": scalars.get("mem/peak_rss_gib", [])}
    if _plot(out / "memory.png", "memory", memory, "GiB"):
        made.append(("memory.png", "GPU memory (CUDA) and process peak resident memory"))
    return made


# --------------------------------------------------------------------------- markdown


def _cell(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        return f"{value:,.4f}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return lines + [""]


def _run_rows(record: dict, scalars: dict) -> list[list]:
    m, d, t = record["model"], record["data"], record["trainer"]
    rows = [["base model", m["model_name_or_path"]], ["backend", m["backend"]], ["4-bit NF4", m["load_in_4bit"]],
            ["LoRA r / alpha / dropout", f"{m['lora']['r']} / {m['lora']['alpha']} / {m['lora']['dropout']}"],
            ["LoRA targets", ", ".join(m["lora"]["target_modules"])]]
    if m["lora"]["modules_to_save"]:
        rows.append(["trained in full", ", ".join(m["lora"]["modules_to_save"])])
    rows += [["trainable parameters", m["trainable_params"]], ["total parameters", m["total_params"]],
             ["trainable %", m["trainable_pct"]], ["corpus", d["corpus"]]]
    for split, st in d["stats"].items():
        rows.append([f"{split} rows kept / total", f"{st.get('kept', 0):,} / {st.get('rows', 0):,}"])
        if "tokens_p50" in st:
            rows.append([f"{split} tokens p50 / p90 / p99 / max",
                         " / ".join(f"{st.get('tokens_' + p, 0):,}" for p in ("p50", "p90", "p99", "max"))])
    rows += [["max_seq_length", m["max_seq_length"]], ["packing", d["pack"]], ["length-grouped", d["group_by_length"]],
             ["batch size × accumulation", f"{d['batch_size']} × {t['accumulate_grad_batches']}"],
             ["devices", t["devices"]], ["precision", t["precision"]], ["optimizer", t["optimizer"]],
             ["learning rate", t["learning_rate"]], ["gradient checkpointing", m["gradient_checkpointing"]],
             ["steps", t["steps"]], ["wall time (s)", record["wall_seconds"]]]
    plan = m.get("memory_plan")
    if plan:
        rows.append(["memory budget (GiB) / layers checkpointed",
                     f"{plan['budget_gib']} / {plan['checkpointed_layers']} of {plan['layers']}"])
    peak = record["peak_memory_gib"]
    if peak.get("gpu_allocated") is not None:
        rows.append(["peak GPU memory allocated (GiB)", peak["gpu_allocated"]])
    if peak.get("gpu_reserved") is not None:
        rows.append(["peak GPU memory reserved (GiB)", peak["gpu_reserved"]])
    rows.append(["peak process memory (GiB)", peak["process_rss"]])
    tps = scalars.get("perf/tokens_per_sec")
    if tps:
        rows.append(["training tokens/s (last logged)", tps[-1][1]])
    for tag in ("train/loss_epoch", *(f"val/{k}" for k in SCORE_NAMES), *REWARD_TAGS):
        if scalars.get(tag):
            rows.append([f"final {tag}", scalars[tag][-1][1]])
    rows.append(["versions", ", ".join(f"{k} {v}" for k, v in record["versions"].items())])
    return rows


def _metrics_section(metrics: dict) -> list[str]:
    base = metrics.get("base")
    header = ["metric", "tuned"] + (["base", "tuned − base"] if base else [])
    rows = []
    for key, name in SCORE_NAMES.items():
        if key not in metrics and not (base and key in base):
            continue
        row = [name, metrics.get(key)]
        if base:
            row += [base.get(key), metrics.get("delta", {}).get(key)]
        rows.append(row)
    rows.append(["rows", metrics.get("n")] + ([base.get("n"), None] if base else []))
    lines = _table(header, rows)
    gen = metrics.get("generation")
    if gen:
        lines += [f"Generation: {gen['rows']:,} rows, {gen['new_tokens']:,} new tokens in {gen['seconds']:.1f} s "
                  f"({gen['tokens_per_sec']:,.0f} tokens/s, batch {gen['batch_size']}); decoding "
                  f"{json.dumps(gen.get('decoding', {}))}.", ""]
    return lines


def _category_section(metrics: dict) -> list[str]:
    cats = metrics.get("by_category")
    if not cats:
        return []
    # One row per category and model, the base's under the tuned's: a column per score and model would
    # make the table twice as wide as the score names.
    has_base = any("base" in v for v in cats.values())
    header = ["category", *(["model"] if has_base else []), "rows", *(SCORE_NAMES[k] for k in TEXT_SCORES)]
    rows = []
    for c, v in cats.items():
        for model, scores in [("tuned", v)] + ([("base", v["base"])] if "base" in v else []):
            label = [c, model] if has_base else [c]
            rows.append([*label, scores.get("n"), *(scores.get(k) for k in TEXT_SCORES)])
    return ["## Scores per category", ""] + _table(header, rows)


def _checks_section(metrics: dict) -> list[str]:
    lines = ["## Honesty checks", ""]
    warnings = metrics.get("warnings")
    if warnings is None:
        return lines + ["Not run for this evaluation.", ""]
    lines += [f"- **warning:** {w}" for w in warnings] or ["- no warnings"]
    checks = metrics.get("checks", {})
    deg = checks.get("degenerate")
    if deg:
        lines.append(f"- predictions: {deg['empty']} empty, {deg['copies_prompt']} copy the prompt, "
                     f"{deg.get('starts_with_prompt', 0)} begin by echoing it, "
                     f"{deg['perfect_rougeL']} with ROUGE-L 1.0, {deg['perfect_bleu']} with BLEU 1.0, most common "
                     f"reply given {deg['most_common_count']} times, of {deg['rows']} rows")
    overlap = checks.get("train_overlap")
    if overlap:
        for field in ("prompt", "reference"):
            o = overlap[field]
            lines.append(f"- evaluated {field}s also in the training split's text (any turn): {o['exact']} exactly, "
                         f"{o['near']} nearly; {o.get('short', 0)} shorter ones (under {MIN_OVERLAP_WORDS} words) "
                         "counted apart")
            lines += [f"  - `{e['id']}` ({e['match']}): {_cell(e[field])[:120]}" for e in o["examples"]]
    elif "train_overlap" not in checks:
        lines.append("- overlap with the training split: not checked (streamed corpus)")
    return lines + [""]


def _samples_section(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    keys = ["prompt", "reference", "prediction"] + (["base_prediction"] if any("base_prediction" in r for r in rows)
                                                      else [])
    names = {"prompt": "prompt", "reference": "reference", "prediction": "tuned", "base_prediction": "base"}
    return ["## Sample generations", ""] + _table([names[k] for k in keys],
                                                  [[r.get(k, "") for k in keys] for r in rows[:SAMPLE_ROWS]])


def _ratings_section(db: Path, eval_dir: Path) -> list[str]:
    from .human_ratings import rating_summary
    from .registry import ASPECTS, find_experiment

    experiment = find_experiment(db, str(eval_dir)) if db.is_file() else None
    if experiment is None:
        return []
    summary = rating_summary(db, experiment["id"])
    if not summary:
        return []
    header = ["model", "ratings"] + list(ASPECTS)
    rows = [[shown, s["n"]] + [s[a] for a in ASPECTS] for shown, s in sorted(summary.items(), reverse=True)]
    return [f"## Human ratings (1-5, mean; experiment {experiment['id']} in `{db}`)", ""] + _table(header, rows)


def _judgements_section(db: Path, run_dirs: list[Path]) -> list[str]:
    """The win rate of the first of ``run_dirs`` (the evaluation, then the fit) with blind judgements."""
    from .judgements import win_rate
    from .registry import find_experiment

    experiments = [find_experiment(db, str(d)) for d in run_dirs] if db.is_file() else []
    judged = [(e, win_rate(db, e["id"])) for e in experiments if e is not None]
    experiment, wins = next(((e, w) for e, w in judged if w is not None), (None, None))
    if wins is None:
        return []
    low, high = wins.interval
    return [f"## Blind judgements, tuned vs base (experiment {experiment['id']} in `{db}`)", "",
            "Win rate: the tuned reply's share of the judgements that are not ties, with a 95% Wilson score "
            "interval.", ""] + _table(["tuned preferred", "base preferred", "ties", "n", "win rate", "95% interval"],
                                      [[wins.tuned, wins.base, wins.ties, wins.n, wins.rate,
                                        f"{low:.4f} – {high:.4f}" if wins.rate is not None else None]])


def build_report(run_dir: Path, output: Optional[Path] = None, db: Optional[str] = None) -> Path:
    """Write ``REPORT.md`` and the plots for ``run_dir``; returns the report's path. ``db``: the
    experiment registry with human ratings (default: ``experiments.db`` beside the run)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory not found: {run_dir}")
    fit_dir = find_fit(run_dir)
    eval_dir = find_evaluation(run_dir) or (find_evaluation(fit_dir) if fit_dir else None)
    if fit_dir is None and eval_dir is None:
        raise UserError(f"no run in {run_dir}: it has neither run.json (written when fit ends) nor metrics.json "
                        f"(written by test/predict)")
    db_path = Path(db) if db else run_dir.parent / "experiments.db"
    # The ratings are read first: a bad registry file stops the report before any plot is written.
    ratings = _ratings_section(db_path, eval_dir) if eval_dir is not None else []
    judged = _judgements_section(db_path, [d for d in (eval_dir, fit_dir) if d is not None])
    output = Path(output) if output else run_dir
    output.mkdir(parents=True, exist_ok=True)
    lines = [f"# Experiment report: {run_dir}", ""]
    if fit_dir is not None:
        record = read_run_record(fit_dir)
        scalars = read_scalars(fit_dir)
        lines += [f"Training run: `{fit_dir}`.", "", "## Run", ""] + _table(["", "value"], _run_rows(record, scalars))
        plots = make_plots(scalars, output)
        if plots:
            lines += ["## Curves", ""] + [f"![{caption}]({name})" for name, caption in plots] + [""]
    else:
        lines += ["No training run found (no run.json here or beside the evaluated adapter).", ""]
    if eval_dir is not None:
        metrics = json.loads((eval_dir / "metrics.json").read_text(encoding="utf-8"))
        rows = []
        if (eval_dir / "predictions.jsonl").is_file():
            with open(eval_dir / "predictions.jsonl", encoding="utf-8") as fh:
                rows = [json.loads(line) for line in fh if line.strip()]
        lines += ["## Final metrics", "", f"Evaluation: `{eval_dir}`. BLEU and chrF++ are corpus-level "
                  f"(sacreBLEU), ROUGE-L is the mean of sentence F1, NLL and perplexity are token-weighted over "
                  f"reference reply tokens.", ""]
        lines += _metrics_section(metrics) + _category_section(metrics) + _checks_section(metrics)
        lines += ratings + judged
        lines += _samples_section(rows)
    else:
        lines += ["## Final metrics", "", "No evaluation found: run `test` or `predict` with "
                  f"`--model.adapter_path {run_dir}/adapter`.", ""] + judged
    report = output / "REPORT.md"
    atomic_write_text(report, "\n".join(lines))
    return report


def main(argv: list[str]) -> int:
    """Write REPORT.md and plots for a run directory."""
    from jsonargparse import ArgumentParser


    p = ArgumentParser(prog="python -m bengali_empathy report",
                       description="Experiment report of a run: REPORT.md with the run's settings, data, time and "
                                   "memory, loss / learning-rate / tokens-per-second / memory plots, final metrics "
                                   "(base vs tuned when scored), per-category scores, honesty checks and sample "
                                   "generations.", exit_on_error=False)
    p.add_argument("run_dir", type=str, help="a fit run (lightning_logs/version_N) or a test/predict run")
    p.add_argument("--output", type=Optional[str], default=None, help="directory for REPORT.md and the plots "
                                                                      "(default: the run directory)")
    p.add_argument("--db", type=Optional[str], default=None, help="experiment registry with human ratings "
                                                                  "(default: experiments.db beside the run)")
    cfg = p.parse_args(argv)
    report = build_report(Path(cfg.run_dir), Path(cfg.output) if cfg.output else None, cfg.db)
    print(f"report written to {report}")
    return 0
