"""The LightningModule: QLoRA fine-tuning of a Llama-3.1 chat model for empathetic Bengali replies."""
from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Literal, Optional

import lightning as L
import torch

from .backends import IGNORE_INDEX, Backend, BackendName, LoraSettings, make_backend
from .checkpoints import AdapterInfo, check_adapter, lora_state_from_ckpt, save_adapter
from .errors import UserError
from .evaluation import Evaluation, requests_from_batch, summarize
from .generation import Decoding, generate_replies
from .memory import (CheckpointPlan, MemoryBudget, below_minimum, cap_reserved_memory, check_budget_value,
                     checkpointed_layer_count, plan_checkpointing, probe_batch, resolve_budget_gib, weights_gib)
from .metrics import TokenWeightedLoss, score_loss
from .modeling import TINY_MODEL, resolve_model_path

STAGES = ("val", "test", "predict")

Optimizer = Literal["auto", "adamw_8bit", "adamw"]


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
        gradient_checkpointing: recompute activations in the backward pass (on as many decoder layers as
            ``memory_budget_gib`` requires; false: on none).
        memory_budget_gib: GPU memory that training may take (GiB, peak reserved by this process):
            before training a short probe measures the worst-case batch and leaves as many decoder
            layers without recompute as fit (faster steps). ``auto``: 92% of what the card has free;
            null: checkpoint every layer (least memory). Applies to fit on CUDA; see :mod:`.memory`.
        adapter_path: LoRA adapter directory to start from (for validate/predict/chat or to resume).
        optimizer: ``auto`` (8-bit AdamW on CUDA with bitsandbytes, else AdamW), ``adamw_8bit`` or ``adamw``.
        learning_rate / weight_decay / warmup_ratio / min_lr_ratio: cosine schedule with linear warmup.
        max_new_tokens: generation length for validation samples, test and predict.
        generation_batch_size: rows per generation batch (prompts sorted by length; halved on out-of-memory).
            Decoding costs about the same per step at 8 rows as at 128 on a GPU, so it is larger than
            the loss batches.
        temperature: 0 = greedy decoding; above 0, sampling with ``top_p`` / ``top_k`` (0 = off) and
            ``generation_seed``. ``repetition_penalty`` (1 = off) and ``no_repeat_ngram_size`` (0 = off)
            apply to both.
        compare_base: validate/test/predict also score the base model (adapter disabled) on the same rows:
            ``base_prediction`` in predictions.jsonl, ``base`` and ``delta`` in metrics.json.
        val_generate_batches: validation batches whose rows also get generated replies for BLEU/ROUGE-L/chrF
            (0 = none, -1 = all).
        log_samples: generations written to TensorBoard each validation.
        save_adapter_on_fit_end: write ``<log_dir>/adapter`` when fit ends.
    """

    def __init__(
        self,
        model_name_or_path: str = TINY_MODEL,
        backend: BackendName = "auto",
        load_in_4bit: bool = True,
        max_seq_length: int = 2048,
        lora_r: int = 16,
        lora_alpha: int = 16,
        lora_dropout: float = 0.0,
        target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"],  # noqa: B006 - jsonargparse default
        modules_to_save: list[str] = [],  # noqa: B006 - jsonargparse default
        gradient_checkpointing: bool = True,
        memory_budget_gib: MemoryBudget = 14.0,
        adapter_path: Optional[str] = None,
        optimizer: Optimizer = "auto",
        learning_rate: float = 2e-4,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.05,
        min_lr_ratio: float = 0.1,
        max_new_tokens: int = 128,
        generation_batch_size: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        repetition_penalty: float = 1.0,
        no_repeat_ngram_size: int = 0,
        generation_seed: int = 0,
        compare_base: bool = False,
        val_generate_batches: int = 2,
        log_samples: int = 4,
        save_adapter_on_fit_end: bool = True,
        lora_seed: int = 3407,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        check_ranges(
            lora_r=(lora_r, lora_r >= 1, "a positive integer"), lora_alpha=(lora_alpha, lora_alpha > 0, "positive"),
            lora_dropout=(lora_dropout, 0 <= lora_dropout < 1, "in [0, 1)"),
            max_seq_length=(max_seq_length, max_seq_length >= 16, "at least 16"),
            learning_rate=(learning_rate, learning_rate > 0, "positive"),
            weight_decay=(weight_decay, weight_decay >= 0, "at least 0"),
            warmup_ratio=(warmup_ratio, 0 <= warmup_ratio < 1, "in [0, 1)"),
            min_lr_ratio=(min_lr_ratio, 0 <= min_lr_ratio <= 1, "in [0, 1]"),
            max_new_tokens=(max_new_tokens, max_new_tokens >= 1, "at least 1"),
            generation_batch_size=(generation_batch_size, generation_batch_size >= 1, "at least 1"),
            temperature=(temperature, temperature >= 0, "at least 0 (0 = greedy)"),
            top_p=(top_p, 0 < top_p <= 1, "in (0, 1]"), top_k=(top_k, top_k >= 0, "at least 0 (0 = off)"),
            repetition_penalty=(repetition_penalty, repetition_penalty > 0, "positive (1 = off)"),
            no_repeat_ngram_size=(no_repeat_ngram_size, no_repeat_ngram_size >= 0, "at least 0 (0 = off)"),
            val_generate_batches=(val_generate_batches, val_generate_batches >= -1, "at least -1 (-1 = all)"),
            log_samples=(log_samples, log_samples >= 0, "at least 0"),
            target_modules=(target_modules, len(target_modules) > 0, "a non-empty list"),
        )
        check_budget_value(memory_budget_gib)
        if adapter_path:
            check_adapter(adapter_path, model_name_or_path, {"r": lora_r, "alpha": lora_alpha,
                                                             "target_modules": list(target_modules),
                                                             "modules_to_save": list(modules_to_save)})
        self.model_path = resolve_model_path(model_name_or_path) if model_name_or_path != TINY_MODEL else None
        if self.model_path is not None and gradient_checkpointing and torch.cuda.is_available() \
                and memory_budget_gib not in (None, "auto"):
            floor = weights_gib(self.model_path, load_in_4bit)
            if memory_budget_gib < floor:
                raise below_minimum(memory_budget_gib, floor, f"the weights of {self.model_path.name} alone take"
                                    + (" in 4 bits" if load_in_4bit else ""))
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
        self.decoding = Decoding(max_new_tokens, temperature, top_p, top_k, repetition_penalty,
                                 no_repeat_ngram_size, generation_seed)
        self.losses = torch.nn.ModuleDict({k: TokenWeightedLoss() for s in STAGES for k in (s, f"{s}_base")})
        self._pending: list[dict] = []
        self._train_texts: Optional[tuple[list[str], list[str]]] = None
        self.last_evaluation: Optional[Evaluation] = None
        self.param_counts: tuple[int, int] = (0, 0)
        self.memory_plan: Optional[CheckpointPlan] = None
        self._capped_device: Optional[torch.device] = None
        self._generation_batch_size: Optional[int] = None  # set when generation ran out of memory

    # ------------------------------------------------------------------ model
    def configure_model(self) -> None:
        if self.model is not None:
            return
        path = self.model_path or resolve_model_path(self.hparams.model_name_or_path)
        self.model, self.tokenizer = self.backend.load(
            path, self.hparams.max_seq_length, self.lora, self.hparams.adapter_path
        )
        # peft counts a 4-bit weight's packed uint8 storage as the parameters it holds
        self.param_counts = tuple(self.model.get_nb_trainable_parameters())

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return self.backend.loss(self.model, batch)

    # ------------------------------------------------------------------ modes
    def plan_memory(self, batch_size: int, context=None) -> Optional[CheckpointPlan]:
        """Choose the checkpointing split for the memory budget by probing ``batch_size`` x ``max_seq_length``
        (see :mod:`.memory`); None where no budget applies (CPU, no checkpointing, budget null)."""
        device = next(p.device for p in self.model.parameters() if p.requires_grad)
        budget = resolve_budget_gib(self.hparams.memory_budget_gib, device)
        if budget is None or not self.hparams.gradient_checkpointing:
            return None
        seq_len = self.hparams.max_seq_length
        vocab = self.model.get_input_embeddings().num_embeddings
        batch = probe_batch(batch_size, seq_len, device, vocab_size=min(128000, vocab))
        if context is None:
            context = self.trainer.precision_plugin.forward_context if self._trainer is not None else \
                (lambda: torch.autocast("cuda", dtype=torch.bfloat16))
        trainable = [p for p in self.model.parameters() if p.requires_grad]

        def train_step() -> None:
            try:
                with context():
                    loss, _ = self.backend.loss(self.model, batch)
                loss.backward()
            finally:
                for p in trainable:
                    p.grad = None

        self.backend.checkpointed_layers = None
        plan = plan_checkpointing(self.model, lambda: self.backend.arm(self.model), train_step, budget, batch_size,
                                  seq_len, device, report=self._report)
        self.backend.checkpointed_layers = plan.checkpointed_layers
        self.memory_plan = plan
        return plan

    def _report(self, message: str) -> None:
        if self._trainer is not None:
            self.print(message)
        else:  # the benchmark's plain loop: standard output carries its JSON
            print(message, file=sys.stderr)

    def on_fit_start(self) -> None:
        self._fit_started = time.time()
        dm = self.trainer.datamodule
        batch_size = getattr(dm, "hparams", {}).get("batch_size") if dm is not None else None
        if self.memory_plan is None and batch_size:
            self.plan_memory(int(batch_size))
        if self.memory_plan is not None:
            self._capped_device = self.device
            cap_reserved_memory(self.memory_plan.budget_gib, self._capped_device)
        if self.logger is not None:
            from .data import flat_stats

            extra = {f"memory/{k}": v for k, v in self.memory_plan.as_dict().items()} if self.memory_plan else {}
            stats = flat_stats(dm.stats) if getattr(dm, "stats", None) else {}
            if stats or extra:
                self.logger.log_hyperparams({**stats, **extra})

    def teardown(self, stage: str) -> None:
        if self._capped_device is not None:  # the budget held the fit only
            cap_reserved_memory(None, self._capped_device)
            self._capped_device = None

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
            if not self.backend.checkpointing_as_planned(self.model):  # never train silently without it
                self.backend.for_training(self.model)
            self.log("train/checkpointed_layers", float(checkpointed_layer_count(self.model)), on_step=True,
                     on_epoch=False)

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, n = self(batch)
        bs = batch["input_ids"].shape[0]
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=bs)
        self.log("train/reply_tokens", n.float(), on_step=True, on_epoch=False, reduce_fx="sum", batch_size=bs)
        return loss

    def _comparing(self) -> bool:
        # Base scores double the evaluation cost: validate/test/predict only, not fit's validations.
        return self.hparams.compare_base and self.trainer.state.fn != "fit"

    def _reply_chars(self, batch: dict) -> int:
        """Characters of the reply text the loss was taken on (labelled tokens, decoded)."""
        labels = batch["labels"]
        rows = [row[row != IGNORE_INDEX].tolist() for row in labels]
        return sum(len(t) for t in self.tokenizer.batch_decode(rows, skip_special_tokens=True))

    def _eval_step(self, batch: dict, batch_idx: int, stage: str) -> None:
        loss, n = self(batch)
        chars = self._reply_chars(batch)
        self.losses[stage].update(loss, n, chars)
        if self._comparing():
            with self.backend.adapter_disabled(self.model):
                base_loss, base_n = self(batch)
            self.losses[f"{stage}_base"].update(base_loss, base_n, chars)
        limit = self.hparams.val_generate_batches if stage == "val" else -1
        if limit < 0 or batch_idx < limit:
            self._pending.extend(requests_from_batch(batch))

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "test")

    def predict_step(self, batch: dict, batch_idx: int) -> None:
        """Score the reference replies' loss; replies are generated for all rows at the epoch's end."""
        self._eval_step(batch, batch_idx, "predict")

    def _finish_evaluation(self, stage: str) -> Evaluation:
        """Generate the pending rows' replies (and the base model's), then score everything."""
        rows, self._pending = self._pending, []
        comparing = self._comparing()
        loss = score_loss(self.losses[stage])
        base_loss = score_loss(self.losses[f"{stage}_base"]) if comparing else None
        self.losses[stage].reset()
        self.losses[f"{stage}_base"].reset()
        fitting = self.trainer.state.fn == "fit"
        generation = None
        if rows:
            prompts = [r.pop("prompt_ids") for r in rows]
            progress = not fitting  # fit's small validation samples have Lightning's bar
            replies, stats = self.generate_texts(prompts, desc=f"{stage}: generating", progress=progress)
            for r, text in zip(rows, replies):
                r["prediction"] = text
            generation = {**stats.as_dict(), "decoding": self.decoding.as_dict()}
            if comparing:
                with self.backend.adapter_disabled(self.model):
                    base_replies, base_stats = self.generate_texts(prompts, desc=f"{stage}: generating (base)",
                                                                   progress=progress)
                for r, text in zip(rows, base_replies):
                    r["base_prediction"] = text
                generation["base"] = base_stats.as_dict()
        rows, generation = self._gather(rows, generation)
        train_texts = None if fitting else self._training_texts()
        # The honesty checks are for a finished model, not for fit's validations.
        metrics = summarize(rows, loss, base_loss, train_texts, generation, checks=not fitting) \
            if (rows or loss) else {}
        evaluation = Evaluation(stage, rows, metrics)
        if stage != "predict":
            self._log_evaluation(evaluation)
        for line in metrics.get("warnings", []):
            self.print(f"warning: {line}")
        self.last_evaluation = evaluation
        return evaluation

    def _gather(self, rows: list[dict], generation: Optional[dict]) -> tuple[list[dict], Optional[dict]]:
        """Every rank's rows, in input order and each once, on every rank (DDP); tokens/s over all ranks."""
        world = self.trainer.world_size if self._trainer is not None else 1
        if world == 1:
            return rows, generation
        import torch.distributed as dist

        parts: list = [None] * world
        dist.all_gather_object(parts, (rows, generation))
        seen: set = set()
        merged = []
        # The distributed sampler pads the last batches with repeated rows: keep each row once.
        for r in sorted((r for part, _ in parts for r in part), key=lambda r: _input_position(r["row"])):
            if r["row"] not in seen:
                seen.add(r["row"])
                merged.append(r)
        stats = [g for _, g in parts if g]
        if stats:
            generation = {**_merge_generation_stats(stats, len(merged)), "ranks": world}
            base = [g["base"] for g in stats if "base" in g]
            if base:
                generation["base"] = _merge_generation_stats(base, len(merged))
        return merged, generation

    def _training_texts(self) -> Optional[tuple[list[str], list[str]]]:
        if self._train_texts is None:
            dm = self.trainer.datamodule
            self._train_texts = dm.split_texts("train") if hasattr(dm, "split_texts") else None
        return self._train_texts

    def _log_evaluation(self, evaluation: Evaluation) -> None:
        stage, m = evaluation.stage, evaluation.metrics
        # Computed from metric states that torchmetrics already reduced across processes.
        # The values are the same on every rank (gathered rows, reduced states): the mean is a no-op.
        for key in ("loss", "perplexity", "bits_per_char", "bleu", "rougeL", "chrf"):
            if isinstance(m.get(key), float) and not math.isnan(m[key]):
                self.log(f"{stage}/{key}", m[key], prog_bar=key in ("loss", "chrf"), sync_dist=True)
            if isinstance(m.get("base", {}).get(key), float) and not math.isnan(m["base"][key]):
                self.log(f"{stage}_base/{key}", m["base"][key], sync_dist=True)
        if "generation" in m:
            self.log(f"{stage}/generated_tokens_per_sec", float(m["generation"]["tokens_per_sec"]), sync_dist=True)
        logger = self.logger
        if stage == "val" and evaluation.rows and logger is not None and hasattr(logger.experiment, "add_text"):
            logger.experiment.add_text("samples", samples_table(evaluation.rows[: self.hparams.log_samples]),
                                       self.global_step)

    def on_validation_epoch_end(self) -> None:
        self._finish_evaluation("val")

    def on_test_epoch_end(self) -> None:
        self._finish_evaluation("test")

    def on_predict_epoch_end(self) -> None:
        self._finish_evaluation("predict")

    # ------------------------------------------------------------------ generation
    def generate_texts(self, prompts: list[list[int]], desc: str = "generating", progress: bool = True,
                       decoding: Optional[Decoding] = None):
        """Replies (in input order) and :class:`GenerationStats` for tokenised generation prompts."""
        from .tokenizer import stop_token_ids

        was_training = self.model.training
        self.backend.for_inference(self.model)
        if torch.cuda.is_available():
            # Training's cached activation blocks go back before the KV cache is built (and the KV
            # cache's after), not at the first allocation that fails at the fit's cap (cap_reserved_memory).
            torch.cuda.empty_cache()

        def smaller(batch_size: int) -> None:
            # Kept for the rest of the run: every validation would otherwise run out of memory again first.
            self._generation_batch_size = batch_size
            self._report(f"{desc}: out of GPU memory, batch size now {batch_size} for the rest of this run")

        try:
            return generate_replies(self.model, self.tokenizer, prompts, decoding or self.decoding,
                                    self._generation_batch_size or self.hparams.generation_batch_size,
                                    stop_token_ids(self.tokenizer), desc=desc, progress=progress, on_oom=smaller)
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if was_training:
                self.backend.for_training(self.model)

    def chat(self, message: str, system_prompt: Optional[str] = None, max_new_tokens: Optional[int] = None) -> str:
        """One reply to ``message`` (a single user turn) with the given or the default Bengali system prompt."""
        from dataclasses import replace

        from .data import DEFAULT_SYSTEM_PROMPT
        from .data import ChatEncoder

        if self._chat_encoder is None:  # built once: it checks the whole vocabulary
            self._chat_encoder = ChatEncoder(self.tokenizer)
        system = DEFAULT_SYSTEM_PROMPT if system_prompt is None else system_prompt
        ids = self._chat_encoder.prompt_ids(system, [{"role": "user", "content": message}])
        decoding = replace(self.decoding, max_new_tokens=max_new_tokens) if max_new_tokens else self.decoding
        return self.generate_texts([ids], progress=False, decoding=decoding)[0][0]

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
        from transformers import get_cosine_with_min_lr_schedule_with_warmup

        total = max(1, int(self.trainer.estimated_stepping_batches)) if self._trainer is not None else 1
        sched = get_cosine_with_min_lr_schedule_with_warmup(opt, int(self.hparams.warmup_ratio * total), total,
                                                            min_lr_rate=self.hparams.min_lr_ratio)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "name": "lr"}}

    # ------------------------------------------------------------------ checkpoints / adapters
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}

    def adapter_info(self) -> AdapterInfo:
        """What the adapter directory records: base model, backend, LoRA, system prompt, length, template."""
        from dataclasses import asdict

        from .data import DEFAULT_SYSTEM_PROMPT

        dm = self.trainer.datamodule if self._trainer is not None else None
        system = getattr(dm, "hparams", {}).get("system_prompt", DEFAULT_SYSTEM_PROMPT) if dm else DEFAULT_SYSTEM_PROMPT
        return AdapterInfo(
            model_name_or_path=self.hparams.model_name_or_path,
            base_model=str(self.model_path or resolve_model_path(self.hparams.model_name_or_path)),
            backend=self.backend.name, lora=asdict(self.lora), system_prompt=system,
            max_seq_length=self.hparams.max_seq_length, chat_template=getattr(self.tokenizer, "chat_template", None))

    def save_adapter(self, directory: str | os.PathLike, state_dict: Optional[dict] = None) -> Path:
        """Write the LoRA adapter (+ tokenizer and settings) as a PEFT directory, replacing any old one whole."""
        return save_adapter(self.model, self.tokenizer, directory, self.adapter_info(), state_dict)

    def on_fit_end(self) -> None:
        from .report import write_run_record

        log_dir = self.trainer.log_dir  # a collective call under DDP: every rank asks
        if not self.trainer.is_global_zero or not log_dir:
            return
        if self.hparams.save_adapter_on_fit_end:
            out = self.save_adapter(Path(log_dir) / "adapter")
            self.print(f"adapter saved to {out}")
            best = getattr(self.trainer.checkpoint_callback, "best_model_path", "")
            if best and Path(best).is_file():
                out = self.save_adapter(Path(log_dir) / "adapter-best", lora_state_from_ckpt(best))
                self.print(f"adapter of the best checkpoint ({Path(best).name}) saved to {out}")
        record = write_run_record(Path(log_dir), self.trainer, self, time.time() - self._fit_started)
        if self.memory_plan is not None and record["peak_memory_gib"]["gpu_reserved"] is not None:
            self.print(f"peak GPU memory {record['peak_memory_gib']['gpu_reserved']:.2f} GiB reserved of the "
                       f"{self.memory_plan.budget_gib:.2f} GiB budget ({self.memory_plan.checkpointed_layers} of "
                       f"{self.memory_plan.layers} layers checkpointed)")
        self._log_final_hparams(record["final"])

    def _log_final_hparams(self, final: dict) -> None:
        """TensorBoard's HPARAMS view: the run's settings beside its final validation scores."""
        from lightning.pytorch.loggers import TensorBoardLogger

        if not isinstance(self.logger, TensorBoardLogger):
            return
        metrics = {f"hp/{k.replace('/', '_')}": v for k, v in final.items() if k.startswith("val/")}
        if "val/loss" in final:
            metrics["hp_metric"] = final["val/loss"]
        if metrics:
            self.logger.log_hyperparams(dict(self.logger.hparams), metrics)


def check_ranges(**checks: tuple) -> None:
    """``name=(value, ok, what)``: the first value out of range is a one-line error, before anything runs.

    (jsonargparse's PositiveInt-style types would check these at parse time, but their values are
    subclasses of int and float that Lightning's hparams.yaml cannot store as plain numbers.)"""
    for name, (value, ok, what) in checks.items():
        if not ok:
            raise UserError(f"model.{name} must be {what}, not {value!r}")


def _merge_generation_stats(stats: list[dict], rows: int) -> dict:
    """Generation statistics of ranks that generated side by side: tokens add up, time is the slowest rank's."""
    new_tokens, seconds = sum(g["new_tokens"] for g in stats), max(g["seconds"] for g in stats)
    return {**stats[0], "rows": rows, "new_tokens": new_tokens, "seconds": seconds,
            "tokens_per_sec": round(new_tokens / max(seconds, 1e-9), 1)}


def _input_position(row: str) -> tuple[str, int]:
    """``"corpus.jsonl: row 12"`` -> ``("corpus.jsonl", 12)``: the order rows were read in."""
    path, _, number = row.rpartition(": row ")
    return path, int(number) if number.isdigit() else 0


def samples_table(rows: list[dict]) -> str:
    """Markdown table of prompt, reference and prediction (and the base model's, when scored)."""
    keys = ["prompt", "reference", "prediction"] + (["base_prediction"] if any("base_prediction" in r for r in rows)
                                                      else [])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        cells = [str(r.get(k, "")).replace("|", "\\|").replace("\n", " ") for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
