"""Merge a LoRA adapter into its base model and save a 16-bit checkpoint."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from .._io import atomic_directory
from ..errors import UserError


def merge_adapter(adapter: str | os.PathLike, output: str | os.PathLike, base: Optional[str] = None,
                  dtype: str = "bfloat16", ckpt: Optional[str] = None) -> Path:
    """Load the base in ``dtype`` (never quantised), apply the adapter (with a fit checkpoint's LoRA
    weights when ``ckpt`` is given), merge, save to ``output``."""
    from ..data.tokenizer import load_tokenizer

    adapter, output = Path(adapter), Path(output)
    if output.exists():
        raise UserError(f"output directory already exists: {output}")
    model, base_path = merged_model(adapter, base, dtype, ckpt)
    with atomic_directory(output, replace=False) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        load_tokenizer(adapter if (adapter / "tokenizer.json").is_file() else base_path).save_pretrained(str(tmp))
    return output


def base_model_path(adapter: str | os.PathLike, base: Optional[str] = None) -> Path:
    """The base checkpoint of an adapter: ``base`` if given, else the one its ``bengali_empathy.json`` records."""
    from ..models.checkpoints import read_info
    from ..models.modeling import resolve_model_path

    info = read_info(adapter)
    base = base or (info.model_name_or_path if info else None)
    if base is None:
        raise UserError("the adapter does not record its base model: pass --model")
    return resolve_model_path(base)


def merged_model(adapter: str | os.PathLike, base: Optional[str] = None, dtype: str = "bfloat16",
                 ckpt: Optional[str] = None):
    """(the base in ``dtype`` with the adapter's LoRA weights, or ``ckpt``'s, merged in; the base's path)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ..models.checkpoints import lora_state_from_ckpt

    state = lora_state_from_ckpt(ckpt) if ckpt else None
    base_path = base_model_path(adapter, base)
    model = AutoModelForCausalLM.from_pretrained(str(base_path), dtype=getattr(torch, dtype), local_files_only=True)
    model = PeftModel.from_pretrained(model, str(adapter))
    if state is not None:
        missing = [k for k in state if k not in model.state_dict()]
        if missing:
            raise UserError(f"{ckpt} does not match the adapter {adapter} (e.g. {missing[0]})")
        model.load_state_dict(state, strict=False)
    return model.merge_and_unload(), base_path
