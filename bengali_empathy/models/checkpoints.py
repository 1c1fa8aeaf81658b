"""The adapter directory: what fit writes, and what validate / test / predict / chat / export read.

An adapter directory is a PEFT adapter (``adapter_config.json``,
``adapter_model.safetensors``), the tokenizer, and ``bengali_empathy.json``:
the base model, the backend, the LoRA settings, the system prompt, the
``max_seq_length`` and the chat template it was trained with. Fit writes
``adapter/`` (last step) and, with a ``val/loss`` ModelCheckpoint,
``adapter-best/`` (the best checkpoint's LoRA weights).

A directory is replaced whole (:func:`._io.atomic_directory`): there is no moment without an
adapter, and never half of one.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from .._io import atomic_directory
from ..errors import UserError
from .lora import ADAPTER_CONFIG, LoraSettings

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
    if not (directory / ADAPTER_CONFIG).is_file():
        raise UserError(f"{adapter} is not a LoRA adapter directory (no {ADAPTER_CONFIG})")
    meta = directory / META_FILE
    if not meta.is_file():
        return None
    data = json.loads(meta.read_text(encoding="utf-8"))
    known = AdapterInfo.__dataclass_fields__
    return AdapterInfo(**{k: v for k, v in data.items() if k in known})


def check_adapter(adapter: str, model_name_or_path: str, lora: LoraSettings) -> Optional[AdapterInfo]:
    """Refuse an adapter of another base model or with other LoRA settings than the configured ones."""
    info = read_info(adapter)
    if info is not None:
        check_base_model(adapter, info, model_name_or_path)
    lora.check_matches(LoraSettings.from_adapter(adapter), adapter)
    return info


def check_base_model(adapter: str, info: AdapterInfo, model_name_or_path: str) -> None:
    """Refuse to put an adapter on another base model than the one it was trained on."""
    if info.model_name_or_path != model_name_or_path:
        same = Path(info.base_model).expanduser().resolve() == Path(model_name_or_path).expanduser().resolve()
        if not same:
            raise UserError(f"adapter {adapter} was trained on {info.model_name_or_path}, but "
                            f"model.model_name_or_path is {model_name_or_path}: set it to the adapter's base model")


def save_adapter(model, tokenizer, directory: str | os.PathLike, info: AdapterInfo,
                 state_dict: Optional[dict] = None) -> Path:
    """Write a PEFT adapter directory with its ``bengali_empathy.json`` (optionally other LoRA weights)."""
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        # Only the trained adapter: a preference run's frozen reference copy (peft's second adapter) stays out.
        model.save_pretrained(str(tmp), selected_adapters=[model.active_adapter],
                              **({"state_dict": state_dict} if state_dict is not None else {}))
        tokenizer.save_pretrained(str(tmp))
        (tmp / META_FILE).write_text(json.dumps(asdict(info), ensure_ascii=False, indent=2), encoding="utf-8")
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
