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


def merged_model(adapter: str | os.PathLike, base: Optional[str] = None, dtype: str = "bfloat16",
                 ckpt: Optional[str] = None):
    """(the base in ``dtype`` with the adapter's LoRA weights, or ``ckpt``'s, merged in; the base's path)."""
    from ..models.loading import load_unquantized_lora_model

    model, base_path = load_unquantized_lora_model(adapter, base, dtype, ckpt)
    return model.merge_and_unload(), base_path
