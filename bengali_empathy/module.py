"""The LightningModule: QLoRA fine-tuning of a Llama-3.1 chat model for empathetic Bengali replies."""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch

from .backends import BACKENDS, Backend, LoraSettings, make_backend
from .errors import UserError
from .metrics import BengaliTextMetrics, TokenWeightedPerplexity
from .modeling import TINY_MODEL, resolve_model_path

OPTIMIZERS = ("auto", "adamw_8bit", "adamw")


class EmpathyLM(L.LightningModule):
    """LoRA fine-tuning (QLoRA on GPU) of a local Llama-3.1 checkpoint.

    Args:
        model_name_or_path: local Hugging Face checkpoint directory (e.g. Llama-3.1-8B-Instruct),
            or ``tiny-random-llama`` for the embedded 2-layer random model.
        backend: ``auto`` (Unsloth on CUDA when installed, else ``hf``), ``unsloth`` or ``hf``.
        load_in_4bit: 4-bit NF4 base weights (CUDA only; ignored with a warning on CPU).
        max_seq_length: longest sequence the model is prepared for.
        lora_r / lora_alpha / lora_dropout / target_modules: LoRA settings.
        modules_to_save: modules trained in full beside LoRA (peft ``modules_to_save``), e.g.
            ``[lm_head]``: the embedded tiny model's random head must learn for it to speak Bengali.
        gradient_checkpointing: recompute activations in the backward pass.
        adapter_path: LoRA adapter directory to start from (for validate/predict/chat or to resume).
        optimizer: ``auto`` (8-bit AdamW on CUDA with bitsandbytes, else AdamW), ``adamw_8bit`` or ``adamw``.
        learning_rate / weight_decay / warmup_ratio / min_lr_ratio: cosine schedule with linear warmup.
        max_new_tokens: generation length for validation samples and predict.
        val_generate_batches: validation batches that also generate replies for BLEU/ROUGE-L/chrF (0 = none).
        log_samples: generations written to TensorBoard each validation.
        save_adapter_on_fit_end: write ``<log_dir>/adapter`` when fit ends.
    """

    def __init__(
        self,
        model_name_or_path: str = TINY_MODEL,
        backend: str = "auto",
        load_in_4bit: bool = True,
        max_seq_length: int = 2048,
        lora_r: int = 16,
        lora_alpha: int = 16,
        lora_dropout: float = 0.0,
        target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"],  # noqa: B006 - jsonargparse default
        modules_to_save: list[str] = [],  # noqa: B006 - jsonargparse default
        gradient_checkpointing: bool = True,
        adapter_path: Optional[str] = None,
        optimizer: str = "auto",
        learning_rate: float = 2e-4,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.05,
        min_lr_ratio: float = 0.1,
        max_new_tokens: int = 128,
        val_generate_batches: int = 2,
        log_samples: int = 4,
        save_adapter_on_fit_end: bool = True,
        lora_seed: int = 3407,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if backend not in BACKENDS:
            raise UserError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
        if optimizer not in OPTIMIZERS:
            raise UserError(f"unknown optimizer {optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
        if adapter_path and not Path(adapter_path).is_dir():
            raise UserError(f"adapter directory not found: {adapter_path}")
        self.model_path = resolve_model_path(model_name_or_path) if model_name_or_path != TINY_MODEL else None
        self.backend: Backend = make_backend(
            backend, load_in_4bit=load_in_4bit, gradient_checkpointing=gradient_checkpointing, seed=lora_seed
        )
        self.lora = LoraSettings(r=lora_r, alpha=lora_alpha, dropout=lora_dropout, target_modules=list(target_modules),
                                 modules_to_save=list(modules_to_save))
        self.model = None
        self.tokenizer = None
        self._chat_encoder = None
        # Only LoRA weights go into checkpoints (see on_save_checkpoint).
        self.strict_loading = False
        self.val_ppl = TokenWeightedPerplexity()
        self.test_ppl = TokenWeightedPerplexity()
        self.val_text = BengaliTextMetrics()
        self.test_text = BengaliTextMetrics()
        self._samples: list[dict] = []
        self._generated: dict[str, int] = {}
        self.param_counts: tuple[int, int] = (0, 0)

    # ------------------------------------------------------------------ model
    def configure_model(self) -> None:
        if self.model is not None:
            return
        path = self.model_path or resolve_model_path(self.hparams.model_name_or_path)
        self.model, self.tokenizer = self.backend.load(
            path, self.hparams.max_seq_length, self.lora, self.hparams.adapter_path
        )
        self.param_counts = self.backend.count_parameters(self.model)

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return self.backend.loss(self.model, batch)

    # ------------------------------------------------------------------ modes
    def on_fit_start(self) -> None:
        dm = self.trainer.datamodule
        if getattr(dm, "stats", None) and self.logger is not None:
            from .data import flat_stats

            self.logger.log_hyperparams(flat_stats(dm.stats))

    def on_train_epoch_start(self) -> None:
        # Lightning calls set_epoch on samplers only; a streamed split reshuffles through this.
        dm = self.trainer.datamodule
        if hasattr(dm, "set_epoch"):
            dm.set_epoch(self.current_epoch)

    def on_train_epoch_end(self) -> None:
        dm = self.trainer.datamodule
        counts = dm.stream_counts("train") if hasattr(dm, "stream_counts") else {}
        if counts:
            self.print(f"streamed train rows this epoch: {counts.get('ok', 0)} kept, {counts.get('truncated', 0)} "
                       f"truncated, {counts.get('too_long', 0)} dropped as too long, "
                       f"{counts.get('empty', 0)} dropped as empty")
            for status in ("truncated", "too_long", "empty"):
                self.log(f"data/train_{status}_rows", float(counts.get(status, 0)), on_epoch=True, rank_zero_only=True)

    def on_train_start(self) -> None:
        self.backend.for_training(self.model)
        trainable, total = self.param_counts
        self.print(f"backend={self.backend.name} quantized_4bit={self.backend.quantized} "
                   f"trainable={trainable:,} total={total:,} ({100 * trainable / max(total, 1):.3f}%)")

    def on_validation_model_eval(self) -> None:
        self.backend.for_inference(self.model)
        super().on_validation_model_eval()

    def on_validation_model_train(self) -> None:
        super().on_validation_model_train()
        self.backend.for_training(self.model)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if batch_idx == 0 and self.hparams.gradient_checkpointing:
            active = self.backend.gradient_checkpointing_active(self.model)
            if not active:  # never train silently without it
                self.backend.for_training(self.model)
                active = self.backend.gradient_checkpointing_active(self.model)
            self.log("train/gradient_checkpointing", float(active), on_step=True, on_epoch=False)

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, n = self(batch)
        bs = batch["input_ids"].shape[0]
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=bs)
        self.log("train/reply_tokens", n.float(), on_step=True, on_epoch=False, reduce_fx="sum", batch_size=bs)
        return loss

    def _eval_step(self, batch: dict, batch_idx: int, stage: str) -> None:
        loss, n = self(batch)
        bs = batch["input_ids"].shape[0]
        ppl = self.val_ppl if stage == "val" else self.test_ppl
        ppl.update(loss, n)
        # Token-weighted epoch loss: weight each batch by its reply tokens.
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=int(n.clamp(min=1)))
        self.log(f"{stage}/perplexity", ppl, on_step=False, on_epoch=True, prog_bar=True, batch_size=bs)
        limit = self.hparams.val_generate_batches if stage == "val" else None
        if limit is None or batch_idx < limit:
            preds = self.generate(batch)
            text = self.val_text if stage == "val" else self.test_text
            text.update(preds, batch["reference"])
            self._generated[stage] = self._generated.get(stage, 0) + len(preds)
            if stage == "val":
                for p, q, r in zip(batch["prompt"], preds, batch["reference"]):
                    if len(self._samples) < self.hparams.log_samples:
                        self._samples.append({"prompt": p, "prediction": q, "reference": r})

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "test")

    def _log_text_metrics(self, stage: str) -> None:
        text = self.val_text if stage == "val" else self.test_text
        n = self._generated.get(stage, 0)
        self._generated[stage] = 0
        if n == 0:
            return
        scores = text.compute()
        text.reset()
        for k, v in scores.items():
            self.log(f"{stage}/{k}", v, prog_bar=k == "chrf", sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        self._log_text_metrics("val")
        if self._samples and self.logger is not None and hasattr(self.logger.experiment, "add_text"):
            rows = ["| prompt | prediction | reference |", "|---|---|---|"]
            for s in self._samples:
                cells = [s[k].replace("|", "\\|").replace("\n", " ") for k in ("prompt", "prediction", "reference")]
                rows.append("| " + " | ".join(cells) + " |")
            self.logger.experiment.add_text("samples", "\n".join(rows), self.global_step)
        self._samples = []

    def on_test_epoch_end(self) -> None:
        self._log_text_metrics("test")

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """Generate replies; also score the reference replies' loss for perplexity."""
        preds = self.generate(batch)
        loss, n = self(batch)
        rows = [
            {"id": i, "prompt": p, "reference": r, "prediction": q, **({"category": c} if c is not None else {})}
            for i, p, r, q, c in zip(batch["id"], batch["prompt"], batch["reference"], preds, batch["category"])
        ]
        return {"rows": rows, "loss": float(loss), "tokens": int(n)}

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, batch: dict, max_new_tokens: Optional[int] = None) -> list[str]:
        """Greedy replies for the left-padded prompts in ``batch`` (decoded, special tokens removed)."""
        from .tokenizer import stop_token_ids

        was_training = self.model.training
        self.backend.for_inference(self.model)
        try:
            device = next(self.model.parameters()).device  # also right outside a Trainer
            ids = batch["gen_input_ids"].to(device)
            mask = batch["gen_attention_mask"].to(device)
            out = self.model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens or self.hparams.max_new_tokens,
                do_sample=False, eos_token_id=stop_token_ids(self.tokenizer), pad_token_id=self.tokenizer.pad_token_id,
                use_cache=True,
            )
        finally:
            if was_training:
                self.backend.for_training(self.model)
        new = out[:, ids.shape[1]:]
        return [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]

    def chat(self, message: str, system_prompt: Optional[str] = None, max_new_tokens: Optional[int] = None) -> str:
        """One reply to ``message`` (a single user turn) with the given or the default Bengali system prompt."""
        from .corpus import DEFAULT_SYSTEM_PROMPT
        from .data import ChatEncoder

        if self._chat_encoder is None:  # built once: it checks the whole vocabulary
            self._chat_encoder = ChatEncoder(self.tokenizer)
        system = DEFAULT_SYSTEM_PROMPT if system_prompt is None else system_prompt
        ids = self._chat_encoder.prompt_ids(system, [{"role": "user", "content": message}])
        t = torch.tensor([ids])
        return self.generate({"gen_input_ids": t, "gen_attention_mask": torch.ones_like(t)}, max_new_tokens)[0]

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        name = self.hparams.optimizer
        on_cuda = next(iter(params)).is_cuda if params else False
        if name == "auto":
            from .backends import bitsandbytes_available

            name = "adamw_8bit" if on_cuda and bitsandbytes_available() else "adamw"
        if name == "adamw_8bit":
            if not on_cuda:
                raise UserError("optimizer 'adamw_8bit' needs a CUDA GPU (bitsandbytes); use 'adamw'")
            import bitsandbytes as bnb

            opt = bnb.optim.AdamW8bit(params, lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay)
        else:
            opt = torch.optim.AdamW(params, lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay,
                                    fused=on_cuda or None)
        self.optimizer_name = name
        total = max(1, int(self.trainer.estimated_stepping_batches)) if self._trainer is not None else 1
        warmup = int(self.hparams.warmup_ratio * total)
        floor = self.hparams.min_lr_ratio
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: cosine_with_warmup(step, warmup, total, floor))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "name": "lr"}}

    # ------------------------------------------------------------------ checkpoints / adapters
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}

    def save_adapter(self, directory: str | os.PathLike) -> Path:
        """Write the LoRA adapter (+ tokenizer) as a PEFT directory, atomically."""
        directory = Path(directory)
        tmp = directory.with_name(directory.name + ".tmp")
        self.model.save_pretrained(str(tmp))
        self.tokenizer.save_pretrained(str(tmp))
        meta = {"base_model": str(self.model_path or resolve_model_path(self.hparams.model_name_or_path)),
                "model_name_or_path": self.hparams.model_name_or_path, "backend": self.backend.name}
        (tmp / "bengali_empathy.json").write_text(json.dumps(meta, ensure_ascii=False, indent=2), encoding="utf-8")
        if directory.exists():
            import shutil

            shutil.rmtree(directory)
        os.replace(tmp, directory)
        return directory

    def on_fit_end(self) -> None:
        if self.hparams.save_adapter_on_fit_end and self.trainer.is_global_zero and self.trainer.log_dir:
            out = self.save_adapter(Path(self.trainer.log_dir) / "adapter")
            self.print(f"adapter saved to {out}")


def cosine_with_warmup(step: int, warmup: int, total: int, floor: float = 0.0) -> float:
    """LR multiplier: linear warmup to 1, then cosine decay to ``floor``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
