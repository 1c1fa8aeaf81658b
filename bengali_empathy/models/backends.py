"""Backend strategies that load a causal LM with LoRA adapters.

* ``unsloth``: Unsloth's FastLanguageModel (4-bit NF4, fused kernels, its own
  offloaded gradient checkpointing). CUDA only; Unsloth cannot even be
  imported without a GPU, so it is an optional extra imported lazily, and
  before transformers/peft (:func:`preimport_unsloth`).
* ``hf``: transformers + peft, with bitsandbytes 4-bit NF4 when CUDA and
  bitsandbytes are there; full precision on CPU.
* ``auto``: ``unsloth`` when CUDA and Unsloth are available, else ``hf``.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Literal, Optional, get_args

import torch
import torch.nn.functional as F

from ..data import IGNORE_INDEX
from ..errors import UserError
from .attention import recomputed_as_attended
from .gradient_checkpointing import checkpointed_layer_count, decoder_layers, limit_checkpointing
from .lora import LoraSettings, base_model, check_modules_trained
from .varlen import (UNSLOTH_SEGMENTS, VARLEN_KERNEL, packed_kwargs, packed_through_kernel, patch_unsloth,
                     route_unsloth_segments, varlen_available, varlen_implementation)

log = logging.getLogger(__name__)

BackendName = Literal["auto", "unsloth", "hf"]
BACKENDS = get_args(BackendName)


def unsloth_available() -> bool:
    if not torch.cuda.is_available():
        return False
    import importlib.util

    return importlib.util.find_spec("unsloth") is not None


def resolve_backend(name: str) -> str:
    if name not in BACKENDS:
        raise UserError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")
    if name == "auto":
        return "unsloth" if unsloth_available() else "hf"
    if name == "unsloth":
        if not torch.cuda.is_available():
            raise UserError("backend 'unsloth' needs a CUDA GPU; use backend 'hf' (or 'auto') on this machine")
        if not unsloth_available():
            raise UserError("backend 'unsloth' needs the optional extra: pip install 'bengali_empathy[unsloth]'")
    return name


# Commands that load a model.
MODEL_COMMANDS = frozenset({"fit", "validate", "test", "predict", "chat", "export", "benchmark"})


def preimport_unsloth(command: Optional[str]) -> bool:
    """Import Unsloth first when ``command`` loads a model on a machine that can run it.

    Unsloth patches transformers and peft when imported, so it must come before them;
    but which backend a run uses is known only once its configuration is parsed, and
    Lightning (which LightningCLI needs to parse) already imports transformers. So the
    choice is made once, from the machine: with CUDA and the extra installed, Unsloth is
    imported for every model command, and the ``hf`` backend then runs beside its patches.
    """
    if command not in MODEL_COMMANDS or not unsloth_available():
        return False
    if "transformers" in sys.modules or "peft" in sys.modules:
        log.warning("transformers was imported before unsloth; some Unsloth patches may not apply")
    _quiet_unsloth_env()
    import unsloth  # noqa: F401

    return True


def _quiet_unsloth_env() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")


def bitsandbytes_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # noqa: BLE001 - missing or broken install
        return False
    return True


def load_adapter_weights(model, adapter_path: str | os.PathLike) -> None:
    """Load saved LoRA weights into a PEFT model built with the same LoRA settings (Unsloth builds its own
    PEFT model, so ``PeftModel.from_pretrained`` does not apply there)."""
    from peft import set_peft_model_state_dict

    path = Path(adapter_path)
    st = path / "adapter_model.safetensors"
    if st.is_file():
        from safetensors.torch import load_file

        state = load_file(str(st))
    elif (path / "adapter_model.bin").is_file():
        state = torch.load(path / "adapter_model.bin", map_location="cpu", weights_only=True)
    else:
        raise UserError(f"adapter directory {path} has no adapter_model.safetensors")
    result = set_peft_model_state_dict(model, state)
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise UserError(f"adapter {path} does not match the model (unexpected keys, e.g. {unexpected[0]})")


REGISTRY: dict[str, type["Backend"]] = {}


def register_backend(cls: type["Backend"]) -> type["Backend"]:
    """Class decorator: make a backend available under its ``name`` (also add it to ``BackendName``)."""
    REGISTRY[cls.name] = cls
    return cls


class Backend:
    """Strategy interface: load a LoRA model, switch train/inference modes, compute the loss."""

    name = "base"

    def __init__(self, load_in_4bit: bool = True, gradient_checkpointing: bool = True, seed: int = 3407) -> None:
        self.load_in_4bit = load_in_4bit
        self.gradient_checkpointing = gradient_checkpointing
        self.seed = seed
        self.quantized = False
        # Decoder layers that recompute activations (the first ones); None = all of them.
        self.checkpointed_layers: Optional[int] = None

    def load(self, model_path: Path, max_seq_length: int, lora: LoraSettings, adapter_path: Optional[str]):
        raise NotImplementedError

    def arm(self, model) -> None:
        """Training mode with gradient checkpointing on every decoder layer (when enabled)."""
        model.train()
        if self.gradient_checkpointing:
            for layer in decoder_layers(model):
                layer.gradient_checkpointing = True

    def for_training(self, model) -> None:
        """Training mode with the planned checkpointing split (:mod:`.memory`), re-armed on every call:
        generation or an eval/train switch may have changed the flags."""
        self.arm(model)
        if self.gradient_checkpointing and self.checkpointed_layers is not None:
            limit_checkpointing(model, self.checkpointed_layers)

    def for_inference(self, model) -> None:
        model.eval()

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    @staticmethod
    def adapter_disabled(model):
        """Context in which the model is its base: LoRA (and ``modules_to_save``) switched off."""
        return model.disable_adapter()

    def planned_checkpointed_layers(self, model) -> int:
        """How many decoder layers should recompute in training: the plan's, all without one, none when off."""
        if not self.gradient_checkpointing:
            return 0
        layers = len(decoder_layers(model))
        return layers if self.checkpointed_layers is None else min(layers, self.checkpointed_layers)

    def checkpointing_as_planned(self, model) -> bool:
        """In training mode with exactly the planned layers checkpointed (every one, without a plan)."""
        return model.training and checkpointed_layer_count(model) == self.planned_checkpointed_layers(model)

    def packed_attention(self, model) -> str:
        """What packed batches attend through on ``model``'s device in the current autocast (fit's log and
        benchmark lines name it: on an H200 the varlen kernel took 2.67 ms where the mask took 7.16)."""
        return VARLEN_KERNEL if packed_through_kernel(model) else "a block-diagonal mask (SDPA)"

    def sequence_logps(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row: the summed log-probability of its labelled tokens and their number (the preference
        objectives' quantity), from :func:`reply_logits` as :meth:`HFPeftBackend.loss`:
        a fused loss that returns one mean (Unsloth's) cannot give per-row sums."""
        logits, targets, select = reply_logits(model, batch)
        token_logps = -F.cross_entropy(logits, targets, reduction="none")
        rows = torch.arange(select.shape[0], device=select.device).unsqueeze(1).expand_as(select)[select]
        sums = torch.zeros(select.shape[0], dtype=token_logps.dtype, device=token_logps.device)
        return sums.index_add(0, rows, token_logps), select.sum(dim=1)


def reply_logits(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The decoder, then the LM head on the positions whose next token is a reply token only, so the
    (batch x seq x 128256) logits tensor is never built: their fp32 logits (n, vocabulary), the n target
    ids, and which positions (batch, seq - 1) they are."""
    base = base_model(model)
    targets = batch["labels"][:, 1:]
    select = targets != IGNORE_INDEX
    # A packed batch attends within its conversations through the varlen kernel where it runs; elsewhere
    # transformers derives a block-diagonal mask from the position ids.
    varlen = batch.get("packed_seq_lengths") is not None and packed_through_kernel(base)
    with varlen_implementation(base) if varlen else contextlib.nullcontext():
        out = base.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                                 position_ids=batch.get("position_ids"), use_cache=False,
                                 **(packed_kwargs(batch["position_ids"]) if varlen else {}))
    logits = base.get_output_embeddings()(out.last_hidden_state[:, :-1][select]).float()
    return logits, targets[select], select


def _reply_token_count(batch: dict) -> torch.Tensor:
    return (batch["labels"][:, 1:] != IGNORE_INDEX).sum()


@register_backend
class HFPeftBackend(Backend):
    """transformers + peft (+ bitsandbytes 4-bit NF4 on CUDA)."""

    name = "hf"

    def load(self, model_path: Path, max_seq_length: int, lora: LoraSettings, adapter_path: Optional[str]):
        from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        from ..data.tokenizer import load_tokenizer

        cuda = torch.cuda.is_available()
        kwargs: dict = {"local_files_only": True}
        if cuda:
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            kwargs["device_map"] = {"": torch.cuda.current_device()}
            kwargs["attn_implementation"] = "sdpa"
        else:
            dtype = torch.float32
        kwargs["dtype"] = dtype
        if self.load_in_4bit and bitsandbytes_available():
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=dtype,
            )
            self.quantized = True
        elif self.load_in_4bit:
            why = "no CUDA GPU" if not cuda else "bitsandbytes is not installed"
            warnings.warn(f"load_in_4bit ignored ({why}): loading {model_path.name} in {dtype}", stacklevel=2)
        model = AutoModelForCausalLM.from_pretrained(str(model_path), **kwargs)
        model.config.use_cache = False
        gc_kwargs = {"use_reentrant": False, "context_fn": recomputed_as_attended(model)}
        if self.quantized:
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=self.gradient_checkpointing, gradient_checkpointing_kwargs=gc_kwargs
            )
        elif self.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
        torch.manual_seed(self.seed)
        if adapter_path:  # settings already checked against the adapter's (checkpoints.check_adapter)
            model = PeftModel.from_pretrained(model, str(adapter_path), is_trainable=True)
        else:
            model = get_peft_model(model, lora.to_peft(bool(getattr(model.config, "tie_word_embeddings", False))))
        check_modules_trained(model, lora.modules_to_save)
        tokenizer = load_tokenizer(model_path)
        return model, tokenizer

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Token-weighted cross-entropy over reply tokens only (:func:`reply_logits`)."""
        logits, targets, select = reply_logits(model, batch)
        n = select.sum()
        return F.cross_entropy(logits, targets, reduction="sum") / n.clamp(min=1), n


@register_backend
class UnslothBackend(Backend):
    """Unsloth FastLanguageModel with LoRA and Unsloth's gradient checkpointing."""

    name = "unsloth"
    varlen = False  # load sets it: Unsloth's packed batches attend through a torch varlen kernel
    segments = False  # load sets it: they pass their segments under UNSLOTH_SEGMENTS (compiled layers)

    def load(self, model_path: Path, max_seq_length: int, lora: LoraSettings, adapter_path: Optional[str]):
        _quiet_unsloth_env()
        from unsloth import FastLanguageModel

        from ..data.tokenizer import load_tokenizer

        model, _ = FastLanguageModel.from_pretrained(
            model_name=str(model_path), max_seq_length=max_seq_length, dtype=None,
            load_in_4bit=self.load_in_4bit, local_files_only=True,
        )
        self.quantized = self.load_in_4bit
        model = FastLanguageModel.get_peft_model(
            model, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules), bias="none",
            modules_to_save=list(lora.modules_to_save) or None,
            use_gradient_checkpointing="unsloth" if self.gradient_checkpointing else False,
            random_state=self.seed, max_seq_length=max_seq_length,
        )
        if adapter_path:
            load_adapter_weights(model, adapter_path)
        self.varlen = varlen_available(next(model.parameters()).device) and patch_unsloth()
        self.segments = self.varlen and route_unsloth_segments(model)
        check_modules_trained(model, lora.modules_to_save)  # users report Unsloth dropping embed_tokens silently
        # Our tokenizer (pad = <|finetune_right_pad_id|>, right padding) for both backends.
        tokenizer = load_tokenizer(model_path)
        return model, tokenizer

    def packed_attention(self, model) -> str:
        # Unsloth 2026.10 takes its varlen kernel for a row of more than one conversation length where SDPA
        # would run flash or cuDNN attention (bf16 on an H200); other rows go through its per-length SDPA.
        return VARLEN_KERNEL if self.varlen else "Unsloth's own attention (it found no torch varlen kernel)"

    def arm(self, model) -> None:
        """Re-arm Unsloth's gradient checkpointing.

        Outside Unsloth's own Trainer nothing calls ``for_training``: after any
        ``generate`` (which runs ``for_inference`` and clears the flags) or a
        Lightning eval/train switch, the layers silently train without
        checkpointing. Lightning's hooks call this (through :meth:`for_training`)
        instead of ``model.train()``.
        """
        from unsloth import FastLanguageModel

        FastLanguageModel.for_training(
            model, use_gradient_checkpointing="unsloth" if self.gradient_checkpointing else False
        )

    def for_inference(self, model) -> None:
        from unsloth import FastLanguageModel

        FastLanguageModel.for_inference(model)

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        # Unsloth's fused cross-entropy returns a token mean over labels != -100
        # (and empty logits), so the loss is the only output we use.
        if batch.get("packed_seq_lengths") is not None:
            if self.segments:  # each layer attends within the segments, inside its compiled region (see .varlen)
                out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"],
                            **{UNSLOTH_SEGMENTS: packed_kwargs(batch["position_ids"])})
            else:
                # Unsloth keeps packed conversations apart (varlen attention, see .varlen) only within
                # one row: several packed rows would attend across conversations. Flatten them;
                # each row starts with a masked <|begin_of_text|>, so no label crosses a seam.
                out = model(input_ids=batch["input_ids"].reshape(1, -1),
                            position_ids=batch["position_ids"].reshape(1, -1), labels=batch["labels"].reshape(1, -1),
                            packed_seq_lengths=batch["packed_seq_lengths"])
            return out.loss, _reply_token_count(batch)
        mask = batch.get("attention_mask")
        if mask is not None and bool(mask.all()):
            mask = None  # no padding: let Unsloth take its pure-causal fast attention path
        out = model(input_ids=batch["input_ids"], attention_mask=mask,
                    position_ids=batch.get("position_ids"), labels=batch["labels"])
        return out.loss, _reply_token_count(batch)


def make_backend(name: str, **kwargs) -> Backend:
    """The registered backend ``name`` (``auto`` resolved for this machine)."""
    return REGISTRY[resolve_backend(name)](**kwargs)
