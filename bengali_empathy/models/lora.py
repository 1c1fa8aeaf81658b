"""LoRA settings: one type from the command line or an adapter directory to peft and the run records.

The module's ``model.lora`` options (``model.lora.r``, ``model.lora.target_modules``, ...) are the fields
of :class:`LoraSettings`; their defaults are :data:`DEFAULT_LORA`'s.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import UserError, check_ranges

ADAPTER_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class LoraSettings:
    """Rank, scale, dropout and the modules adapted (LoRA) or trained in full beside it (``model.lora``).

    Args:
        r / alpha / dropout / target_modules: the LoRA adapters: rank, scale, dropout, the linear layers adapted.
        modules_to_save: modules trained in full beside LoRA (peft ``modules_to_save``), e.g. ``[lm_head]``:
            the embedded tiny model's random head must learn for it to speak Bengali.
        seed: the seed of the adapters' initialisation. Not part of what an adapter is: two adapters that
            differ only in it are compared equal.
    """

    r: int = 16
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    modules_to_save: tuple[str, ...] = ()
    seed: int = field(default=3407, compare=False)

    def __post_init__(self) -> None:
        # Lists from the command line or JSON become tuples: the settings are compared and hashed.
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        object.__setattr__(self, "modules_to_save", tuple(self.modules_to_save))
        # (jsonargparse's PositiveInt-style types would check these at parse time, but their values are
        # subclasses of int and float that Lightning's hparams.yaml cannot store as plain numbers.)
        check_ranges("model.lora", self, {"r": (self.r >= 1, "a positive integer"),
                                          "alpha": (self.alpha > 0, "positive"),
                                          "dropout": (0 <= self.dropout < 1, "in [0, 1)"),
                                          "target_modules": (len(self.target_modules) > 0, "a non-empty list")})

    @classmethod
    def from_adapter(cls, adapter: str | os.PathLike) -> "LoraSettings":
        """The settings a PEFT adapter directory was saved with (its ``adapter_config.json``)."""
        path = Path(adapter) / ADAPTER_CONFIG
        if not path.is_file():
            raise UserError(f"{adapter} is not a LoRA adapter directory (no {ADAPTER_CONFIG})")
        cfg = json.loads(path.read_text(encoding="utf-8"))
        targets = cfg.get("target_modules") or []
        return cls(r=cfg.get("r", cls.r), alpha=cfg.get("lora_alpha", cls.alpha),
                   dropout=cfg.get("lora_dropout", cls.dropout),
                   target_modules=sorted([targets] if isinstance(targets, str) else targets),
                   modules_to_save=sorted(cfg.get("modules_to_save") or []))

    def to_peft(self, tied_embeddings: bool = False):
        """The peft ``LoraConfig`` (causal LM, no bias). For a model whose LM head is its input embedding
        (``tie_word_embeddings``), the trained copies of ``embed_tokens`` and ``lm_head`` stay one tensor (asked
        only when one of them is trained: peft warns at every load otherwise)."""
        from peft import LoraConfig

        tie = tied_embeddings and bool({"embed_tokens", "lm_head"} & set(self.modules_to_save))
        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=list(self.target_modules), bias="none", task_type="CAUSAL_LM",
                          modules_to_save=list(self.modules_to_save) or None,
                          **({"ensure_weight_tying": True} if tie else {}))

    def as_record(self) -> dict:
        """Plain values for run.json, the adapter's metadata and the registry's ``lora_config``."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def check_matches(self, saved: "LoraSettings", adapter: str) -> None:
        """Refuse an adapter whose r, alpha or modules differ from these settings (dropout may differ)."""
        for key in ("r", "alpha", "target_modules", "modules_to_save"):
            want, have = getattr(self, key), getattr(saved, key)
            if isinstance(want, tuple):
                want, have = sorted(want), sorted(have)
            if have != want:
                shown = list(getattr(self, key)) if isinstance(want, list) else want
                raise UserError(f"adapter {adapter} has {key} {have}, but model.lora.{key} is {shown}: "
                                f"set model.lora.{key} to the adapter's value")


DEFAULT_LORA = LoraSettings()


def check_modules_trained(model, modules_to_save: tuple[str, ...]) -> None:
    """Refuse a model in which a module named in ``modules_to_save`` is frozen or missing: peft skips a
    name that matches no module without a word, and a backend may drop one (Unsloth's embeddings). With tied
    embeddings the lm_head copy is the embed_tokens copy: counted under both names."""
    trained = {n for n, p in model.named_parameters(remove_duplicate=False)
               if p.requires_grad and ".modules_to_save." in n}
    frozen = [m for m in modules_to_save if not any(f".{m}.modules_to_save." in f".{n}" for n in trained)]
    if frozen:
        raise UserError(f"model.lora.modules_to_save names {', '.join(frozen)}, but no trainable copy of "
                        f"{'it' if len(frozen) == 1 else 'them'} is in the loaded model (a module name of the "
                        "model, e.g. embed_tokens or lm_head, that the backend trains in full)")


def base_model(model):
    """The transformers model under a peft wrapper (``model`` itself when it has none)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model
