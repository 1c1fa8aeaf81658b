"""Corpus formats -> conversations, and the train/val/test split.

A corpus is one file, a directory or a glob of JSONL / JSON / CSV / TSV / Parquet
files, read with HF ``datasets`` (``load_dataset``), in memory (Arrow, memory-mapped,
cached) or streamed. Every row becomes one conversation, a list of
``{"role", "content"}`` turns, from one of three layouts:

* a conversational column (``messages`` with role/content, or ShareGPT
  ``conversations`` with from/value and human/gpt), auto-detected or named;
* prompt / response columns (one exchange per row);
* column templates (``"{Question-Title}\\n{Questions}"``) that build the user
  and assistant turns from several columns.

Rows go to a split by a stable hash of their group (``group_column``, e.g. a
conversation id), else their id, else their text, so turns of one dialogue never
straddle train and test, and the split is the same in memory and streaming.
Bad rows stop with a :class:`UserError` naming the file and the row.
"""
from __future__ import annotations

import glob
import hashlib
import json
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .errors import UserError

SPLITS = ("train", "val", "test")

# "You are an empathetic, caring assistant. Understand the user's feelings
# attentively and reply in Bengali in warm, respectful, supportive language."
DEFAULT_SYSTEM_PROMPT = (
    "আপনি একজন সহমর্মী ও যত্নশীল সহকারী। ব্যবহারকারীর অনুভূতি মন দিয়ে বুঝুন "
    "এবং উষ্ণ, সম্মানজনক ও সহায়ক ভাষায় বাংলায় উত্তর দিন।"
)

BUILDERS = {".jsonl": "json", ".ndjson": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}
MESSAGE_COLUMNS = ("messages", "conversations")
GROUP_COLUMNS = ("conversation_id", "dialogue_id", "conv_id")
ROLE_ALIASES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}


def bundled_corpus_path() -> Path:
    """The bundled Bengali sample (a directory): 210 single-exchange pairs and 60 multi-turn conversations."""
    return Path(__file__).parent / "resources"


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
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - every reader failure becomes one line naming the file
        raise diagnose(f, exc) from None
    return ds


@dataclass
class Conversation:
    """One corpus row as chat turns; ``system`` is None for the configured default."""

    id: str
    group: str
    system: Optional[str]
    turns: list[dict]
    category: Optional[str] = None


def template_fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]


class CorpusFormat:
    """Reads one row into a :class:`Conversation` (the "rows -> messages" transform).

    Args mirror the ``data.*`` options of the same names; ``columns`` are the corpus's
    column names, used to auto-detect the layout and to reject unknown columns early.
    """

    def __init__(self, columns: list[str], where: str, prompt_column: str = "prompt",
                 response_column: str = "response", messages_column: Optional[str] = None,
                 prompt_template: Optional[str] = None, response_template: Optional[str] = None,
                 system_column: Optional[str] = None, id_column: Optional[str] = "id",
                 group_column: Optional[str] = None, category_column: Optional[str] = None) -> None:
        self.where = where
        cols = set(columns)
        if messages_column is None and prompt_template is None and prompt_column not in cols:
            messages_column = next((c for c in MESSAGE_COLUMNS if c in cols), None)
        self.messages_column = messages_column
        if messages_column is not None:
            self.layout = "messages"
            needed = [messages_column]
        elif prompt_template is not None or response_template is not None:
            self.layout = "templates"
            self.prompt_template = prompt_template or "{" + prompt_column + "}"
            self.response_template = response_template or "{" + response_column + "}"
            needed = template_fields(self.prompt_template) + template_fields(self.response_template)
            if any(not name for name in needed):
                raise UserError("data.prompt_template/response_template: name every field, e.g. '{Questions}'")
        else:
            self.layout = "columns"
            self.prompt_template = "{" + prompt_column + "}"
            self.response_template = "{" + response_column + "}"
            needed = [prompt_column, response_column]
        needed += [c for c in (system_column, group_column, category_column) if c is not None]
        missing = [c for c in dict.fromkeys(needed) if c not in cols]
        if missing:
            hint = ("set data.messages_column, or data.prompt_column / data.response_column, "
                    "or data.prompt_template / data.response_template")
            raise UserError(f"{where}: missing column(s) {', '.join(repr(c) for c in missing)}; "
                            f"found {', '.join(repr(c) for c in columns)} ({hint})")
        self.system_column = system_column
        self.id_column = id_column if id_column in cols else None
        self.group_column = group_column or next((c for c in GROUP_COLUMNS if c in cols), None)
        self.category_column = category_column

    # -- one row
    def _messages(self, row: dict, where: str) -> tuple[Optional[str], list[dict]]:
        raw = row.get(self.messages_column)
        if isinstance(raw, str):
            try:
                raw = json.loads(raw)  # a CSV/Parquet cell holding JSON
            except json.JSONDecodeError:
                raise UserError(f"{where}: column {self.messages_column!r} is not a list of turns") from None
        if not isinstance(raw, list) or not raw:
            raise UserError(f"{where}: column {self.messages_column!r} must be a non-empty list of turns")
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
        if not any(t["role"] == "assistant" for t in turns):
            raise UserError(f"{where}: the conversation has no assistant turn")
        if turns[-1]["role"] != "assistant":
            raise UserError(f"{where}: the conversation ends with a user turn; it must end with an assistant reply")
        return system, turns

    def _templated(self, row: dict) -> list[dict]:
        values = {k: "" if v is None else str(v) for k, v in row.items()}
        prompt = self.prompt_template.format_map(values).strip()
        response = self.response_template.format_map(values).strip()
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]

    def conversation(self, row: dict, where: str) -> Optional[Conversation]:
        """The row as a conversation; ``None`` for a prompt/response row with an empty side (counted)."""
        if self.layout == "messages":
            system, turns = self._messages(row, where)
        else:
            turns = self._templated(row)
            system = None
            if not turns[0]["content"] or not turns[1]["content"]:
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
                            category=None if category in (None, "") else str(category))


def split_of(key: str, val_fraction: float, test_fraction: float, seed: int) -> str:
    """Stable train/val/test assignment from a hash of ``key`` (a group or row id)."""
    digest = hashlib.blake2b(f"{seed}\x00{key}".encode("utf-8"), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"
