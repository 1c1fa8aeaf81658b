"""Corpus files: which files a corpus path names, how each is read, and what a reader failure means.

A corpus is one file, a directory or a glob of JSONL / JSON / CSV / TSV / Parquet files of one
format, read with HF ``datasets`` (``load_dataset``), in memory (Arrow, memory-mapped, cached) or
streamed. Every reader failure becomes one :class:`UserError` line naming the file and, where it
can be found, the line (:func:`diagnose`).
"""
from __future__ import annotations

import glob
import json
from pathlib import Path

from ..errors import UserError

BUILDERS = {".jsonl": "json", ".ndjson": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}


def bundled_corpus_path() -> Path:
    """The bundled Bengali sample (a directory): 210 single-exchange pairs and 60 multi-turn conversations."""
    return Path(__file__).parent.parent / "resources"


def corpus_files(path: str) -> list[Path]:
    """Expand a file, a directory (its supported files) or a glob into a sorted file list of one format."""
    p = Path(path).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in BUILDERS)
        if not files:
            raise UserError(f"no corpus files (.jsonl, .json, .csv, .tsv, .parquet) in directory {p}")
    elif p.is_file():
        files = [p]
    elif any(ch in str(path) for ch in "*?["):
        files = sorted(Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).is_file())
        if not files:
            raise UserError(f"no corpus file matches {path}")
    else:
        raise UserError(f"corpus file not found: {path}")
    for f in files:
        if f.suffix.lower() not in BUILDERS:
            raise UserError(f"unsupported corpus format '{f.suffix}' for {f}: use .jsonl, .json, .csv, .tsv or .parquet")
    kinds = {BUILDERS[f.suffix.lower()] + ("\t" if f.suffix.lower() == ".tsv" else "") for f in files}
    if len(kinds) > 1:
        raise UserError(f"{path} mixes file formats ({', '.join(sorted(f.suffix for f in files))}): use one format")
    return files


def _builder_kwargs(f: Path) -> tuple[str, dict]:
    suffix = f.suffix.lower()
    builder = BUILDERS[suffix]
    kwargs: dict = {}
    if builder == "csv":
        # Empty cells as "" (not NaN), "NA" kept as text.
        kwargs = {"sep": "\t" if suffix == ".tsv" else ",", "na_filter": False, "encoding": "utf-8"}
    return builder, kwargs


def diagnose(f: Path, exc: Exception) -> UserError:
    """Turn a reader failure into one line naming the file and, where it can be found, the line."""
    raw = f.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        return UserError(f"{f}:{line}: not UTF-8 text (byte 0x{raw[err.start]:02x}); save the corpus as UTF-8")
    if f.suffix.lower() in (".jsonl", ".ndjson") or (f.suffix.lower() == ".json" and not text.lstrip().startswith("[")):
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                return UserError(f"{f}:{lineno}: invalid JSON ({err.msg})")
            if not isinstance(row, dict):
                return UserError(f"{f}:{lineno}: each JSON line must be an object, not {type(row).__name__}")
    elif f.suffix.lower() == ".json":
        try:
            json.loads(text)
        except json.JSONDecodeError as err:
            return UserError(f"{f}:{err.lineno}: invalid JSON ({err.msg})")
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return UserError(f"cannot read {f}: {first}")


def diagnose_any(files: list[Path], exc: Exception) -> UserError:
    """:func:`diagnose` for a failure that may come from any of ``files`` (a stream over several)."""
    for f in files:
        err = diagnose(f, exc)
        if not str(err).startswith("cannot read"):
            return err
    return diagnose(files[0], exc)


def _check_columns(f: Path, columns) -> None:
    """A CSV whose first row has one field more than its header is read by pandas with the first
    column as the index: every row would be shifted by one column. That is one error line instead."""
    if any(str(c).startswith("__index_level_") for c in columns):
        sep = "\\t" if f.suffix.lower() == ".tsv" else ","
        raise UserError(f"{f}:2: the first row has more fields than the header: quote fields that contain "
                        f"'{sep}' (e.g. \"ভয় লাগছে, কী করব?\")")


def load_file(f: Path, streaming: bool):
    """One corpus file as an HF ``Dataset`` (Arrow cache, memory-mapped) or ``IterableDataset``."""
    import datasets

    builder, kwargs = _builder_kwargs(f)
    if f.stat().st_size == 0:
        raise UserError(f"corpus is empty: {f}")
    try:
        ds = datasets.load_dataset(builder, data_files=[str(f)], split="train", streaming=streaming, **kwargs)
        if not streaming and len(ds) == 0:
            raise UserError(f"corpus is empty: {f}")
        if not streaming:
            _check_columns(f, ds.column_names)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - every reader failure becomes one line naming the file
        raise diagnose(f, exc) from None
    return ds


def first_row(f: Path) -> dict:
    """The first row of a corpus file (read lazily: its columns choose the layout before anything is tokenised)."""
    try:
        row = next(iter(load_file(f, streaming=True)))
        _check_columns(f, row)
        return row
    except StopIteration:
        raise UserError(f"corpus is empty: {f}") from None
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - reader failure on the first rows
        raise diagnose(f, exc) from None
