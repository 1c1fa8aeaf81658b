"""Loading a base model with LoRA: the one place that training (:mod:`..training.module`), chat and the
web page (:mod:`..apps.chat`) and export (:mod:`..export`) load one.

Training, chat and serve load through a backend (:mod:`.backends`: 4-bit on CUDA, Unsloth's or
transformers + peft), the adapter's weights or a fresh LoRA; export loads the base unquantised in the
dtype it merges in, with the adapter's weights or a fit checkpoint's.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from ..errors import UserError
from .backends import Backend
from .checkpoints import lora_state_from_ckpt, read_info
from .lora import LoraSettings
from .modeling import resolve_model_path


def load_lora_model(backend: Backend, model_name_or_path: str, max_seq_length: int, lora: LoraSettings,
                    adapter: Optional[str] = None, chat_template: Optional[str] = None):
    """(model, tokenizer): the base checkpoint ``model_name_or_path`` (a local directory or the tiny model)
    loaded by ``backend`` with LoRA ``lora``, holding ``adapter``'s weights when given (settings already
    checked against the adapter's: :func:`.checkpoints.check_adapter`).

    The tokenizer's chat template is ``chat_template`` (the one the data is encoded with) where given, else the
    one the adapter records (what it was trained with, which may not be the checkpoint's), else the checkpoint's.
    """
    model, tokenizer = backend.load(resolve_model_path(model_name_or_path), max_seq_length, lora, adapter)
    info = read_info(adapter) if adapter and chat_template is None else None
    template = chat_template or (info.chat_template if info else None)
    if template:
        tokenizer.chat_template = template
    return model, tokenizer


def base_model_path(adapter: str | os.PathLike, base: Optional[str] = None) -> Path:
    """The base checkpoint of an adapter: ``base`` if given, else the one its ``bengali_empathy.json`` records."""
    info = read_info(adapter)
    base = base or (info.model_name_or_path if info else None)
    if base is None:
        raise UserError("the adapter does not record its base model: pass --model")
    return resolve_model_path(base)


def load_unquantized_lora_model(adapter: str | os.PathLike, base: Optional[str] = None, dtype: str = "bfloat16",
                                ckpt: Optional[str] = None):
    """(the peft model: the base in ``dtype``, never quantised, with the adapter's LoRA weights, or
    ``ckpt``'s where given; the base's path)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    state = lora_state_from_ckpt(ckpt) if ckpt else None
    base_path = base_model_path(adapter, base)
    model = AutoModelForCausalLM.from_pretrained(str(base_path), dtype=getattr(torch, dtype), local_files_only=True)
    model = PeftModel.from_pretrained(model, str(adapter))
    if state is not None:
        missing = [k for k in state if k not in model.state_dict()]
        if missing:
            raise UserError(f"{ckpt} does not match the adapter {adapter} (e.g. {missing[0]})")
        model.load_state_dict(state, strict=False)
    return model, base_path
