"""The LightningModule: QLoRA fine-tuning of a Llama-3.1 chat model for empathetic Bengali replies.

It loads the model through a backend (:mod:`.backends`), plans and holds the GPU memory budget
(:mod:`.memory`), trains, and hands its loss and evaluation passes to an :class:`~.objectives.Objective` and a fit's
records to :func:`~.records.write_fit_records`. What it needs from the data arrives as options
linked by the CLI (``max_seq_length``, ``train_batch_size``, ``system_prompt``) and, at run time,
as :class:`~.schema.CorpusFacts` through :meth:`EmpathyLM.connect`.
"""
from __future__ import annotations

import functools
import os
import time
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch

from ..models.backends import Backend, BackendName, make_backend
from ..models.gradient_checkpointing import checkpointed_layer_count
from ..models.checkpoints import AdapterInfo, check_adapter, lora_state_from_ckpt, save_adapter
from ..data import DEFAULT_SYSTEM_PROMPT, flat_stats
from ..errors import UserError, check_ranges
from ..evaluation.evaluator import Evaluation, Evaluator
from ..generation.decoding import Decoding
from ..generation.engines import GenerationEngine, resolve_engine
from ..generation.generator import GenerationStats, GenerationWeights, Generator
from ..models.lora import DEFAULT_LORA, LoraSettings
from ..models.loading import load_lora_model
from ..models.memory import CheckpointPlan, MemorySettings, cap_reserved_memory, check_budget, plan_training_memory
from ..models.modeling import TINY_MODEL, resolve_model_path
from .objectives import Objective, SupervisedObjective
from .optimization import OptimizerSettings, make_optimization
from .preference import ObjectiveSettings, PreferenceObjective
from ..records.run import RunInfo, write_fit_records
from ..schema import CorpusFacts, TrainingTexts

MAX_SEQ_LENGTH = 2048


@dataclass(frozen=True)
class GenerationSettings:
    """How validation, test and predict generate replies (``model.generation``).

    Args:
        batch_size: rows per generation batch (prompts sorted by length; halved on out-of-memory). Larger than
            the loss batches: a decoding step costs about the same at 8 rows as at 128.
        engine / weights: how replies are generated and on which weights (the merged 16-bit copy where memory
            allows, outside fit); see :mod:`.generation`.
        val_batches / log_samples: validation batches whose replies are generated (-1: all) and replies logged
            to TensorBoard; see :class:`~.evaluation.Evaluator`.
    """

    batch_size: int = 64
    engine: GenerationEngine = "auto"
    weights: GenerationWeights = "auto"
    val_batches: int = 2
    log_samples: int = 4

    def __post_init__(self) -> None:
        check_ranges("model.generation", self, {"batch_size": (self.batch_size >= 1, "at least 1"),
                                                "val_batches": (self.val_batches >= -1, "at least -1 (-1 = all)"),
                                                "log_samples": (self.log_samples >= 0, "at least 0")})


class EmpathyLM(L.LightningModule):
    """LoRA fine-tuning (QLoRA on GPU) of a local Llama-3.1 checkpoint.

    Args:
        model_name_or_path: local Hugging Face checkpoint directory (e.g. Llama-3.1-8B-Instruct),
            or ``tiny-random-llama`` for the embedded 2-layer random model.
        backend: ``auto`` (Unsloth on CUDA when installed, else ``hf``), ``unsloth`` or ``hf``.
        max_seq_length: longest sequence the model is prepared for (linked from ``data.max_seq_length``).
        train_batch_size: rows per training batch, which the memory probe measures (linked from
            ``data.batch_size``; null: no probe).
        system_prompt: the system prompt of the training data, recorded in the adapter for chat (linked
            from ``data.system_prompt``).
        adapter_path: LoRA adapter directory to start from (for validate/predict/chat or to resume).
        learning_rate: the peak of the cosine schedule with linear warmup (see ``optimization``).
        compare_base: also score the base model (``base_prediction`` in predictions.jsonl, ``base`` and
            ``delta`` in metrics.json); see :class:`~.evaluation.Evaluator`.
        save_adapter_on_fit_end: write ``<log_dir>/adapter`` when fit ends.
        lora: :class:`~.lora.LoraSettings`. memory: :class:`~.memory.MemorySettings` (4-bit weights,
            gradient checkpointing, the GPU memory budget). objective: :class:`~.preference.ObjectiveSettings`.
        optimization: :class:`~.optimization.OptimizerSettings`. decoding: :class:`~.generation.Decoding`.
        generation: :class:`GenerationSettings`.
    """

    def __init__(
        self,
        model_name_or_path: str = TINY_MODEL,
        backend: BackendName = "auto",
        max_seq_length: int = MAX_SEQ_LENGTH,
        train_batch_size: Optional[int] = None,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        adapter_path: Optional[str] = None,
        learning_rate: float = 2e-4,
        compare_base: bool = False,
        save_adapter_on_fit_end: bool = True,
        lora: LoraSettings = DEFAULT_LORA,
        memory: MemorySettings = MemorySettings(),
        objective: ObjectiveSettings = ObjectiveSettings(),
        optimization: OptimizerSettings = OptimizerSettings(),
        decoding: Decoding = Decoding(),
        generation: GenerationSettings = GenerationSettings(),
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        # The groups as given: under the CLI, hparams hold them as the config's plain dicts.
        self.lora, self.memory, self.optimization = lora, memory, optimization
        self.decoding, self.generation = decoding, generation
        check_options(max_seq_length, learning_rate, lora, optimization)
        if adapter_path:
            check_adapter(adapter_path, model_name_or_path, lora)
        self.model_path = resolve_model_path(model_name_or_path) if model_name_or_path != TINY_MODEL else None
        check_budget(memory.budget_gib, self.model_path, memory.load_in_4bit, memory.gradient_checkpointing)
        self.backend: Backend = make_backend(backend, load_in_4bit=memory.load_in_4bit,
                                             gradient_checkpointing=memory.gradient_checkpointing, seed=lora.seed)
        self.generation_engine = resolve_engine(generation.engine, self.backend.name)
        self.model = self.tokenizer = self.generator = None
        self.strict_loading = False  # only LoRA weights go into checkpoints (see on_save_checkpoint)
        self.objective: Objective = (
            SupervisedObjective(Evaluator(compare_base, generation.val_batches, generation.log_samples))
            if objective.name == "sft" else
            PreferenceObjective(objective.name, objective.dpo_beta, objective.kto_desirable_weight,
                                objective.kto_undesirable_weight, adapter_path))
        self.facts: Optional[CorpusFacts] = None
        self.param_counts: tuple[int, int] = (0, 0)
        self.optimizer_name: str = optimization.optimizer
        self.memory_plan: Optional[CheckpointPlan] = None
        self._capped_device: Optional[torch.device] = None

    def connect(self, facts: CorpusFacts) -> None:
        """The corpus of this run (statistics for the logs and run.json, training texts for the overlap
        check); the CLI calls it once the data module is prepared. Without it, neither is there."""
        self.facts = facts
        self._training_texts = functools.cache(facts.training_texts)

    def training_texts(self) -> Optional[TrainingTexts]:
        """The training split's turns, for the evaluation's overlap check (None before :meth:`connect`)."""
        return self._training_texts() if self.facts is not None else None

    # ------------------------------------------------------------------ model
    def configure_model(self) -> None:
        if self.model is not None:
            return
        h = self.hparams
        # The data's chat template (data.encoding.chat_template may replace the checkpoint's): replies are generated,
        # stopped and saved with the adapter in the format the model is trained in.
        self.model, self.tokenizer = load_lora_model(self.backend, h.model_name_or_path, h.max_seq_length, self.lora,
                                                     h.adapter_path, self.facts.chat_template if self.facts else None)
        # peft counts a 4-bit weight's packed uint8 storage as the parameters it holds
        self.param_counts = tuple(self.model.get_nb_trainable_parameters())
        self.generator = Generator(self.model, self.tokenizer, self.backend, self.decoding, self.generation.batch_size,
                                   engine=self.generation_engine, weights=self.generation.weights,
                                   memory_budget=self.memory.budget_gib)

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
        facts = self.facts or getattr(self.trainer.datamodule, "facts", None)  # unconnected outside the CLI
        packed = bool(facts and facts.batching.get("pack"))
        if packed:
            with self.trainer.precision_plugin.forward_context():  # the precision the steps attend in
                self.print(f"packed rows attend through {self.backend.packed_attention(self.model)}")
        if self.memory_plan is None and h.train_batch_size:
            self.memory_plan = plan_training_memory(self.model, self.backend, self.memory.budget_gib,
                                                    h.train_batch_size, h.max_seq_length,
                                                    self.trainer.precision_plugin.forward_context, report=self.print,
                                                    packed=packed)
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
        if batch_idx == 0 and self.memory.gradient_checkpointing:
            if not self.backend.checkpointing_as_planned(self.model):  # never train silently without it
                self.backend.for_training(self.model)
            self.log("train/checkpointed_layers", float(checkpointed_layer_count(self.model)), on_step=True,
                     on_epoch=False)

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.objective.training_loss(self, batch)

    def _fitting(self) -> bool:
        return self._trainer is not None and self.trainer.state.fn == "fit"

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.objective.evaluation_step(self, "val", batch, batch_idx, self._fitting())

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.objective.evaluation_step(self, "test", batch, batch_idx, self._fitting())

    def predict_step(self, batch: dict, batch_idx: int) -> None:
        """Score the reference replies' loss; replies are generated for all rows at the epoch's end."""
        self.objective.evaluation_step(self, "predict", batch, batch_idx, self._fitting())

    def on_validation_epoch_end(self) -> None:
        self.objective.finish(self, "val", self._fitting(), self.trainer.world_size)

    def on_test_epoch_end(self) -> None:
        self.objective.finish(self, "test", self._fitting(), self.trainer.world_size)

    def on_predict_epoch_end(self) -> None:
        self.objective.finish(self, "predict", self._fitting(), self.trainer.world_size)

    @property
    def last_evaluation(self) -> Optional[Evaluation]:
        """The latest evaluation pass (what the writer and the registry record)."""
        return self.objective.last

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        total = max(1, int(self.trainer.estimated_stepping_batches)) if self._trainer is not None else 1
        optimization, self.optimizer_name = make_optimization(self.model, self.hparams.learning_rate,
                                                              self.optimization, total)
        return optimization

    # ------------------------------------------------------------------ checkpoints / adapters / records
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The option groups as plain dicts: a resume loads the file with torch.load(weights_only=True), which
        # refuses pickled classes of this package.
        for key in ("hyper_parameters", "datamodule_hyper_parameters"):  # the data module's groups too
            if key in checkpoint:
                checkpoint[key] = {k: asdict(v) if is_dataclass(v) else v for k, v in checkpoint[key].items()}
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
            gradient_checkpointing=self.memory.gradient_checkpointing, memory_budget_gib=self.memory.budget_gib,
            optimizer=self.optimizer_name, learning_rate=h.learning_rate, adapter_path=h.adapter_path,
            batch_size=h.train_batch_size, memory_plan=self.memory_plan, corpus=self.facts or CorpusFacts(""))

    def on_fit_end(self) -> None:
        record = write_fit_records(self.trainer, self.run_info(), time.time() - self._fit_started,
                                   self._save_fit_adapters, self.objective.last)
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


def check_options(max_seq_length: int, learning_rate: float, lora: LoraSettings,
                  optimization: OptimizerSettings) -> None:
    """The module's own options out of range, and settings of two groups that do not go together, are a
    one-line error before anything runs (each group checks its own values)."""
    if max_seq_length < 16:
        raise UserError(f"model.max_seq_length must be at least 16, not {max_seq_length!r}")
    if not learning_rate > 0:
        raise UserError(f"model.learning_rate must be positive, not {learning_rate!r}")
    if optimization.embedding_learning_rate is not None and not lora.modules_to_save:
        raise UserError("model.optimization.embedding_learning_rate is the learning rate of "
                        "model.lora.modules_to_save, which is empty: set model.lora.modules_to_save "
                        "(e.g. [embed_tokens, lm_head])")
