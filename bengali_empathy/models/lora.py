"""LoRA settings: one type from the command line or an adapter directory to peft and the run records.

The module's options ``lora_r`` / ``lora_alpha`` / ``lora_dropout`` / ``target_modules`` /
``modules_to_save`` are the fields of :class:`LoraSettings` under the names in :data:`OPTIONS`;
their defaults are :data:`DEFAULT_LORA`'s.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import UserError

# field -> the module's option (``model.<option>`` on the command line)
OPTIONS = {"r": "lora_r", "alpha": "lora_alpha", "dropout": "lora_dropout", "target_modules": "target_modules",
           "modules_to_save": "modules_to_save"}
ADAPTER_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class LoraSettings:
    """Rank, scale, dropout and the modules adapted (LoRA) or trained in full beside it."""

    r: int = 16
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    modules_to_save: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Lists from the command line or JSON become tuples: the settings are compared and hashed.
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        object.__setattr__(self, "modules_to_save", tuple(self.modules_to_save))

    @classmethod
    def from_options(cls, **options) -> "LoraSettings":
        """From the module's option names (``lora_r=8, target_modules=[...]``, ...)."""
        return cls(**{name: options[option] for name, option in OPTIONS.items() if option in options})

    def options(self) -> dict:
        """The module's options of these settings (the inverse of :meth:`from_options`)."""
        return {OPTIONS[k]: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

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
        (``tie_word_embeddings``), the trained copies of ``embed_tokens`` and ``lm_head`` stay one tensor."""
        from peft import LoraConfig

        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=list(self.target_modules), bias="none", task_type="CAUSAL_LM",
                          modules_to_save=list(self.modules_to_save) or None,
                          **({"ensure_weight_tying": True} if tied_embeddings else {}))

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
                raise UserError(f"adapter {adapter} has {key} {have}, but model.{OPTIONS[key]} is {shown}: "
                                f"set model.{OPTIONS[key]} to the adapter's value")


DEFAULT_LORA = LoraSettings()


def check_modules_trained(model, modules_to_save: tuple[str, ...]) -> None:
    """Refuse a model in which a module named in ``modules_to_save`` is frozen or missing: peft skips a
    name that matches no module without a word, and a backend may drop one (Unsloth's embeddings)."""
    trained = {n for n, p in model.named_parameters() if p.requires_grad and ".modules_to_save." in n}
    frozen = [m for m in modules_to_save if not any(f".{m}.modules_to_save." in f".{n}" for n in trained)]
    if frozen:
        raise UserError(f"model.modules_to_save names {', '.join(frozen)}, but no trainable copy of "
                        f"{'it' if len(frozen) == 1 else 'them'} is in the loaded model (a module name of the "
                        "model, e.g. embed_tokens or lm_head, that the backend trains in full)")
