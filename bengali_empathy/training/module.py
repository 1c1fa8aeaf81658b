"""The LightningModule: QLoRA fine-tuning of a Llama-3.1 chat model for empathetic Bengali replies.

It loads the model through a backend (:mod:`.backends`), plans and holds the GPU memory budget
(:mod:`.memory`), trains, and hands evaluation to an :class:`~.evaluation.Evaluator` and a fit's
records to :func:`~.records.write_fit_records`. What it needs from the data arrives as options
linked by the CLI (``max_seq_length``, ``train_batch_size``, ``system_prompt``) and, at run time,
as :class:`~.schema.CorpusFacts` through :meth:`EmpathyLM.connect`.
"""
from __future__ import annotations

import functools
import os
import time
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch

from ..models.backends import Backend, BackendName, make_backend
from ..models.gradient_checkpointing import checkpointed_layer_count
from ..models.checkpoints import AdapterInfo, check_adapter, lora_state_from_ckpt, save_adapter
from ..data import DEFAULT_SYSTEM_PROMPT, flat_stats
from ..errors import UserError
from ..evaluation.evaluator import Evaluation, Evaluator
from ..generation.decoding import Decoding
from ..generation.engines import GenerationEngine, resolve_engine
from ..generation.generator import GenerationStats, GenerationWeights, Generator
from ..models.lora import DEFAULT_LORA, LoraSettings
from ..models.loading import load_lora_model
from ..models.memory import CheckpointPlan, MemoryBudget, cap_reserved_memory, check_budget, plan_training_memory
from ..models.modeling import TINY_MODEL, resolve_model_path
from .optimization import Optimizer, make_optimization
from .preference import Objective, PreferenceObjective
from ..records.run import RunInfo, write_fit_records
from ..schema import CorpusFacts

MAX_SEQ_LENGTH = 2048


class EmpathyLM(L.LightningModule):
    """LoRA fine-tuning (QLoRA on GPU) of a local Llama-3.1 checkpoint.

    Args:
        model_name_or_path: local Hugging Face checkpoint directory (e.g. Llama-3.1-8B-Instruct),
            or ``tiny-random-llama`` for the embedded 2-layer random model.
        backend: ``auto`` (Unsloth on CUDA when installed, else ``hf``), ``unsloth`` or ``hf``.
        load_in_4bit: 4-bit NF4 base weights (CUDA only; ignored with a warning on CPU).
        max_seq_length: longest sequence the model is prepared for (linked from ``data.max_seq_length``).
        lora_r / lora_alpha / lora_dropout / target_modules: LoRA settings (:class:`~.lora.LoraSettings`).
        modules_to_save: modules trained in full beside LoRA (peft ``modules_to_save``), e.g.
            ``[lm_head]``: the embedded tiny model's random head must learn for it to speak Bengali.
        gradient_checkpointing: recompute activations in the backward pass (on as many decoder layers as
            ``memory_budget_gib`` requires; false: on none).
        memory_budget_gib: GPU memory that training may take (GiB, peak reserved by this process):
            before training a short probe measures the worst-case batch and leaves as many decoder
            layers without recompute as fit (faster steps). ``auto``: 92% of what the card has free;
            null: checkpoint every layer (least memory). Applies to fit on CUDA; see :mod:`.memory`.
        train_batch_size: rows per training batch, which the memory probe measures (linked from
            ``data.batch_size``; null: no probe).
        system_prompt: the system prompt of the training data, recorded in the adapter for chat (linked
            from ``data.system_prompt``).
        adapter_path: LoRA adapter directory to start from (for validate/predict/chat or to resume).
        optimizer: ``auto`` (8-bit AdamW on CUDA with bitsandbytes, else AdamW), ``adamw_8bit`` or ``adamw``.
        learning_rate / weight_decay / warmup_ratio / min_lr_ratio: cosine schedule with linear warmup.
        max_new_tokens: generation length for validation samples, test and predict.
        generation_batch_size: rows per generation batch (prompts sorted by length; halved on out-of-memory).
            Larger than the loss batches: a decoding step costs about the same at 8 rows as at 128.
        generation_engine / generation_weights: how replies are generated and on which weights (the
            merged 16-bit copy where memory allows, outside fit); see :mod:`.generation`.
        temperature: 0 = greedy decoding; above 0, sampling with ``top_p`` / ``top_k`` (0 = off) and
            ``generation_seed``. ``repetition_penalty`` (1 = off) and ``no_repeat_ngram_size`` (0 = off)
            apply to both.
        compare_base / val_generate_batches / log_samples: see :class:`~.evaluation.Evaluator`
            (``base_prediction`` in predictions.jsonl, ``base`` and ``delta`` in metrics.json).
        save_adapter_on_fit_end: write ``<log_dir>/adapter`` when fit ends.
        objective / dpo_beta / kto_desirable_weight / kto_undesirable_weight: ``sft``, ``dpo`` or ``kto`` and their
            settings (:class:`~.preference.PreferenceObjective`); embedding_learning_rate: see :mod:`.optimization`.
    """

    def __init__(
        self,
        model_name_or_path: str = TINY_MODEL,
        backend: BackendName = "auto",
        load_in_4bit: bool = True,
        max_seq_length: int = MAX_SEQ_LENGTH,
        lora_r: int = DEFAULT_LORA.r, lora_alpha: int = DEFAULT_LORA.alpha, lora_dropout: float = DEFAULT_LORA.dropout,
        target_modules: list[str] = list(DEFAULT_LORA.target_modules),
        modules_to_save: list[str] = list(DEFAULT_LORA.modules_to_save),
        gradient_checkpointing: bool = True,
        memory_budget_gib: MemoryBudget = 14.0,
        train_batch_size: Optional[int] = None,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        adapter_path: Optional[str] = None,
        optimizer: Optimizer = "auto",
        learning_rate: float = 2e-4, weight_decay: float = 0.0, warmup_ratio: float = 0.05, min_lr_ratio: float = 0.1,
        max_new_tokens: int = 128, generation_batch_size: int = 64, generation_engine: GenerationEngine = "auto",
        generation_weights: GenerationWeights = "auto",
        temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
        repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0, generation_seed: int = 0,
        compare_base: bool = False, val_generate_batches: int = 2, log_samples: int = 4,
        save_adapter_on_fit_end: bool = True, lora_seed: int = 3407, objective: Objective = "sft", dpo_beta: float = 0.1,
        kto_desirable_weight: float = 1.0, kto_undesirable_weight: float = 1.0, embedding_learning_rate: Optional[float] = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        check_options(self.hparams)
        self.lora = LoraSettings.from_options(**self.hparams)
        if adapter_path:
            check_adapter(adapter_path, model_name_or_path, self.lora)
        self.model_path = resolve_model_path(model_name_or_path) if model_name_or_path != TINY_MODEL else None
        check_budget(memory_budget_gib, self.model_path, load_in_4bit, gradient_checkpointing)
        self.backend: Backend = make_backend(backend, load_in_4bit=load_in_4bit,
                                             gradient_checkpointing=gradient_checkpointing, seed=lora_seed)
        self.generation_engine = resolve_engine(generation_engine, self.backend.name)
        self.model = self.tokenizer = self.generator = None
        self.strict_loading = False  # only LoRA weights go into checkpoints (see on_save_checkpoint)
        self.decoding = Decoding(max_new_tokens, temperature, top_p, top_k, repetition_penalty,
                                 no_repeat_ngram_size, generation_seed)
        self.evaluator = Evaluator(compare_base, val_generate_batches, log_samples) if objective == "sft" else \
            PreferenceObjective(objective, dpo_beta, kto_desirable_weight, kto_undesirable_weight, adapter_path)
        self.eval_losses = self.evaluator.losses  # a child module: the loss states follow the model's device
        self.facts: Optional[CorpusFacts] = None
        self.param_counts: tuple[int, int] = (0, 0)
        self.optimizer_name: str = optimizer
        self.memory_plan: Optional[CheckpointPlan] = None
        self._capped_device: Optional[torch.device] = None

    def connect(self, facts: CorpusFacts) -> None:
        """The corpus of this run (statistics for the logs and run.json, training texts for the overlap
        check); the CLI calls it once the data module is prepared. Without it, neither is there."""
        self.facts = facts
        self.evaluator.training_texts = functools.cache(facts.training_texts)

    # ------------------------------------------------------------------ model
    def configure_model(self) -> None:
        if self.model is not None:
            return
        h = self.hparams
        self.model, self.tokenizer = load_lora_model(self.backend, h.model_name_or_path, h.max_seq_length, self.lora,
                                                     h.adapter_path)
        # peft counts a 4-bit weight's packed uint8 storage as the parameters it holds
        self.param_counts = tuple(self.model.get_nb_trainable_parameters())
        self.generator = Generator(self.model, self.tokenizer, self.backend, self.decoding, h.generation_batch_size,
                                   engine=self.generation_engine, weights=h.generation_weights,
                                   memory_budget=h.memory_budget_gib)

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return self.backend.loss(self.model, batch)

    def adapter_disabled(self):
        """Context in which the model is its base (LoRA and ``modules_to_save`` off)."""
        return self.backend.adapter_disabled(self.model)

    def generate_texts(self, prompts: list[list[int]], desc: str = "generating", progress: bool = True,
                       decoding: Optional[Decoding] = None) -> tuple[list[str], GenerationStats]:
        """Replies (in input order) and statistics for tokenised generation prompts (see :class:`.Generator`)."""
        return self.generator.generate(prompts, desc, progress, decoding, allow_merged=not self._fitting())

    # ------------------------------------------------------------------ modes
    def on_fit_start(self) -> None:
        self._fit_started = time.time()
        h = self.hparams
        if self.memory_plan is None and h.train_batch_size:
            self.memory_plan = plan_training_memory(self.model, self.backend, h.memory_budget_gib, h.train_batch_size,
                                                    h.max_seq_length, self.trainer.precision_plugin.forward_context,
                                                    report=self.print)
        if self.memory_plan is not None:
            self._capped_device = self.device
            cap_reserved_memory(self.memory_plan.budget_gib, self._capped_device)
        logged = flat_stats(self.facts.stats) if self.facts is not None else {}
        logged.update({f"memory/{k}": v for k, v in self.memory_plan.as_dict().items()} if self.memory_plan else {})
        if self.logger is not None and logged:
            self.logger.log_hyperparams(logged)

    def teardown(self, stage: str) -> None:
        if self._capped_device is not None:  # the budget held the fit only
            cap_reserved_memory(None, self._capped_device)
            self._capped_device = None

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
        if isinstance(self.evaluator, PreferenceObjective):  # the objective's own loss and rewards
            return self.evaluator.step(self, "train", batch, batch_idx, True)
        loss, n = self(batch)
        bs = batch["input_ids"].shape[0]
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=bs)
        self.log("train/reply_tokens", n.float(), on_step=True, on_epoch=False, reduce_fx="sum", batch_size=bs)
        return loss

    def _fitting(self) -> bool:
        return self._trainer is not None and self.trainer.state.fn == "fit"

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.evaluator.step(self, "val", batch, batch_idx, self._fitting())

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.evaluator.step(self, "test", batch, batch_idx, self._fitting())

    def predict_step(self, batch: dict, batch_idx: int) -> None:
        """Score the reference replies' loss; replies are generated for all rows at the epoch's end."""
        self.evaluator.step(self, "predict", batch, batch_idx, self._fitting())

    def on_validation_epoch_end(self) -> None:
        self.evaluator.finish(self, "val", self._fitting(), self.trainer.world_size)

    def on_test_epoch_end(self) -> None:
        self.evaluator.finish(self, "test", self._fitting(), self.trainer.world_size)

    def on_predict_epoch_end(self) -> None:
        self.evaluator.finish(self, "predict", self._fitting(), self.trainer.world_size)

    @property
    def last_evaluation(self) -> Optional[Evaluation]:
        """The latest evaluation pass (what the writer and the registry record)."""
        return self.evaluator.last

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        total = max(1, int(self.trainer.estimated_stepping_batches)) if self._trainer is not None else 1
        optimization, self.optimizer_name = make_optimization(self.model, self.hparams, total)
        return optimization

    # ------------------------------------------------------------------ checkpoints / adapters / records
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}

    def adapter_info(self) -> AdapterInfo:
        """What the adapter directory records: base model, backend, LoRA, system prompt, length, template."""
        return AdapterInfo(
            model_name_or_path=self.hparams.model_name_or_path,
            base_model=str(self.model_path or resolve_model_path(self.hparams.model_name_or_path)),
            backend=self.backend.name, lora=self.lora.as_record(), system_prompt=self.hparams.system_prompt,
            max_seq_length=self.hparams.max_seq_length, chat_template=getattr(self.tokenizer, "chat_template", None))

    def save_adapter(self, directory: str | os.PathLike, state_dict: Optional[dict] = None) -> Path:
        """Write the LoRA adapter (+ tokenizer and settings) as a PEFT directory, replacing any old one whole."""
        return save_adapter(self.model, self.tokenizer, directory, self.adapter_info(), state_dict)

    def run_info(self) -> RunInfo:
        """What the run records (run.json, the registry) say about this model and its corpus."""
        h = self.hparams
        return RunInfo(
            model_name_or_path=h.model_name_or_path, base_model=str(self.model_path or h.model_name_or_path),
            backend=self.backend.name, quantized=self.backend.quantized, lora=self.lora,
            trainable_params=self.param_counts[0], total_params=self.param_counts[1], max_seq_length=h.max_seq_length,
            gradient_checkpointing=h.gradient_checkpointing, memory_budget_gib=h.memory_budget_gib,
            optimizer=self.optimizer_name, learning_rate=h.learning_rate, adapter_path=h.adapter_path,
            batch_size=h.train_batch_size, memory_plan=self.memory_plan, corpus=self.facts or CorpusFacts(""))

    def on_fit_end(self) -> None:
        record = write_fit_records(self.trainer, self.run_info(), time.time() - self._fit_started,
                                   self._save_fit_adapters, self.evaluator.last)
        if record is None:
            return
        if self.memory_plan is not None and record["peak_memory_gib"]["gpu_reserved"] is not None:
            self.print(self.memory_plan.peak_summary(record["peak_memory_gib"]["gpu_reserved"]))
        log_final_hparams(self.logger, record["final"])

    def _save_fit_adapters(self, log_dir: Path) -> None:
        """``adapter/`` (the last step) and, with a ``val/loss`` ModelCheckpoint, ``adapter-best/``."""
        if not self.hparams.save_adapter_on_fit_end:
            return
        self.print(f"adapter saved to {self.save_adapter(log_dir / 'adapter')}")
        best = getattr(self.trainer.checkpoint_callback, "best_model_path", "")
        if best and Path(best).is_file():
            out = self.save_adapter(log_dir / "adapter-best", lora_state_from_ckpt(best))
            self.print(f"adapter of the best checkpoint ({Path(best).name}) saved to {out}")


def log_final_hparams(logger, final: dict) -> None:
    """TensorBoard's HPARAMS view: the run's settings beside its final validation scores."""
    from lightning.pytorch.loggers import TensorBoardLogger

    if not isinstance(logger, TensorBoardLogger):
        return
    metrics = {f"hp/{k.replace('/', '_')}": v for k, v in final.items() if k.startswith("val/")}
    if "val/loss" in final:
        metrics["hp_metric"] = final["val/loss"]
    if metrics:
        logger.log_hyperparams(dict(logger.hparams), metrics)


def check_options(h) -> None:
    """The first option out of range is a one-line error, before anything runs.

    (jsonargparse's PositiveInt-style types would check these at parse time, but their values are
    subclasses of int and float that Lightning's hparams.yaml cannot store as plain numbers.)"""
    checks = {
        "lora_r": (h.lora_r >= 1, "a positive integer"), "lora_alpha": (h.lora_alpha > 0, "positive"),
        "lora_dropout": (0 <= h.lora_dropout < 1, "in [0, 1)"),
        "max_seq_length": (h.max_seq_length >= 16, "at least 16"),
        "learning_rate": (h.learning_rate > 0, "positive"), "weight_decay": (h.weight_decay >= 0, "at least 0"),
        "warmup_ratio": (0 <= h.warmup_ratio < 1, "in [0, 1)"), "min_lr_ratio": (0 <= h.min_lr_ratio <= 1, "in [0, 1]"),
        "max_new_tokens": (h.max_new_tokens >= 1, "at least 1"),
        "generation_batch_size": (h.generation_batch_size >= 1, "at least 1"),
        "temperature": (h.temperature >= 0, "at least 0 (0 = greedy)"), "top_p": (0 < h.top_p <= 1, "in (0, 1]"),
        "top_k": (h.top_k >= 0, "at least 0 (0 = off)"),
        "repetition_penalty": (h.repetition_penalty > 0, "positive (1 = off)"),
        "no_repeat_ngram_size": (h.no_repeat_ngram_size >= 0, "at least 0 (0 = off)"),
        "val_generate_batches": (h.val_generate_batches >= -1, "at least -1 (-1 = all)"),
        "log_samples": (h.log_samples >= 0, "at least 0"),
        "target_modules": (len(h.target_modules) > 0, "a non-empty list"),
        "dpo_beta": (h.dpo_beta > 0, "positive"),
        "kto_desirable_weight": (h.kto_desirable_weight > 0, "positive"),
        "kto_undesirable_weight": (h.kto_undesirable_weight > 0, "positive"),
        "embedding_learning_rate": (h.embedding_learning_rate is None or h.embedding_learning_rate > 0,
                                    "positive or null (= learning_rate)"),
    }
    for name, (ok, what) in checks.items():
        if not ok:
            raise UserError(f"model.{name} must be {what}, not {h[name]!r}")
    if h.embedding_learning_rate is not None and not h.modules_to_save:
        raise UserError("model.embedding_learning_rate is the learning rate of model.modules_to_save, which is empty: "
                        "set model.modules_to_save (e.g. [embed_tokens, lm_head])")
