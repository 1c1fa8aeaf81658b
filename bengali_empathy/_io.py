"""Atomic writes: a file or a directory appears whole, or not at all.

Every file or directory the package writes for a user (predictions, metrics, run.json, the report,
adapters, merged models, the cached tokenizer and tiny model) is written under a unique temporary
name beside its target and renamed into place, so an interrupted or failed write leaves the old
version (or nothing), never half of a new one. A directory that already exists is exchanged with
the new one in one ``renameat2(RENAME_EXCHANGE)`` call (Linux), so there is no moment without it;
elsewhere two renames.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file and one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2`` with ``RENAME_EXCHANGE``); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def replace_directory(tmp: Path, directory: Path) -> None:
    """Move the complete ``tmp`` to ``directory``, replacing any old one without a moment of absence."""
    if not directory.exists():
        os.replace(tmp, directory)
        return
    if not _exchange(tmp, directory):
        old = directory.with_name(f".{directory.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(directory, old)
        os.replace(tmp, directory)
        tmp = old
    shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_directory(directory: str | os.PathLike, replace: bool = True) -> Iterator[Path]:
    """A temporary directory to fill; when the block ends without error it becomes ``directory``.

    ``replace``: an existing ``directory`` is exchanged for the new one; otherwise an existing one is
    kept and :class:`FileExistsError` raised (a cache another process filled first, or an output
    that must not be overwritten). On error, the temporary directory is removed and nothing moves."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f".{directory.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
        if replace:
            replace_directory(tmp, directory)
        else:
            try:
                os.replace(tmp, directory)
            except OSError as exc:
                if directory.exists():
                    raise FileExistsError(f"{directory} already exists") from exc
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
