"""The adapter directory: what fit writes, and what validate / test / predict / chat / export read.

An adapter directory is a PEFT adapter (``adapter_config.json``,
``adapter_model.safetensors``), the tokenizer, and ``bengali_empathy.json``:
the base model, the backend, the LoRA settings, the system prompt, the
``max_seq_length`` and the chat template it was trained with. Fit writes
``adapter/`` (last step) and, with a ``val/loss`` ModelCheckpoint,
``adapter-best/`` (the best checkpoint's LoRA weights).

A directory is replaced by writing the new one under a unique temporary name
and exchanging the two in one ``renameat2(RENAME_EXCHANGE)`` call (Linux), so
there is no moment without an adapter; elsewhere two renames.
"""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from .errors import UserError

META_FILE = "bengali_empathy.json"


@dataclass
class AdapterInfo:
    """What ``bengali_empathy.json`` records about an adapter."""

    model_name_or_path: str
    base_model: str
    backend: str = "auto"
    lora: dict = field(default_factory=dict)
    system_prompt: Optional[str] = None
    max_seq_length: Optional[int] = None
    chat_template: Optional[str] = None


def read_info(adapter: str | os.PathLike) -> Optional[AdapterInfo]:
    """The adapter's recorded settings (``None`` for a PEFT adapter from elsewhere)."""
    directory = Path(adapter)
    if not directory.is_dir():
        raise UserError(f"adapter directory not found: {adapter}")
    if not (directory / "adapter_config.json").is_file():
        raise UserError(f"{adapter} is not a LoRA adapter directory (no adapter_config.json)")
    meta = directory / META_FILE
    if not meta.is_file():
        return None
    data = json.loads(meta.read_text(encoding="utf-8"))
    known = AdapterInfo.__dataclass_fields__
    return AdapterInfo(**{k: v for k, v in data.items() if k in known})


def read_lora(adapter: str | os.PathLike) -> dict:
    """r, alpha, dropout, target_modules and modules_to_save from the adapter's ``adapter_config.json``."""
    cfg = json.loads((Path(adapter) / "adapter_config.json").read_text(encoding="utf-8"))
    targets = cfg.get("target_modules") or []
    return {"r": cfg.get("r"), "alpha": cfg.get("lora_alpha"), "dropout": cfg.get("lora_dropout"),
            "target_modules": sorted([targets] if isinstance(targets, str) else targets),
            "modules_to_save": sorted(cfg.get("modules_to_save") or [])}


def check_adapter(adapter: str, model_name_or_path: str, lora: dict) -> Optional[AdapterInfo]:
    """Refuse an adapter of another base model or with other LoRA settings than the configured ones."""
    info = read_info(adapter)
    if info is not None and info.model_name_or_path != model_name_or_path:
        same = Path(info.base_model).expanduser().resolve() == Path(model_name_or_path).expanduser().resolve()
        if not same:
            raise UserError(f"adapter {adapter} was trained on {info.model_name_or_path}, but "
                            f"model.model_name_or_path is {model_name_or_path}: set it to the adapter's base model")
    saved = read_lora(adapter)
    names = {"r": "lora_r", "alpha": "lora_alpha", "target_modules": "target_modules",
             "modules_to_save": "modules_to_save"}
    for key, option in names.items():
        want = sorted(lora[key]) if isinstance(lora[key], list) else lora[key]
        if saved[key] is not None and saved[key] != want:
            raise UserError(f"adapter {adapter} has {key} {saved[key]}, but model.{option} is {lora[key]}: "
                            f"set model.{option} to the adapter's value")
    return info


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


def save_adapter(model, tokenizer, directory: str | os.PathLike, info: AdapterInfo,
                 state_dict: Optional[dict] = None) -> Path:
    """Write a PEFT adapter directory with its ``bengali_empathy.json`` (optionally other LoRA weights)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f".{directory.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        model.save_pretrained(str(tmp), **({"state_dict": state_dict} if state_dict is not None else {}))
        tokenizer.save_pretrained(str(tmp))
        (tmp / META_FILE).write_text(json.dumps(asdict(info), ensure_ascii=False, indent=2), encoding="utf-8")
        replace_directory(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def lora_state_from_ckpt(ckpt_path: str | os.PathLike) -> dict:
    """The LoRA weights of a Lightning ``.ckpt`` written by fit, keyed as ``model.save_pretrained`` expects."""
    import torch

    path = Path(ckpt_path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise UserError(f"{path} is not a Lightning checkpoint: {exc}") from exc
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not state:
        raise UserError(f"{path} holds no weights (state_dict)")
    return {k[len("model."):] if k.startswith("model.") else k: v for k, v in state.items()}
