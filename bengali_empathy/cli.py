"""Command line: LightningCLI for fit/validate/test/predict; the other commands (chat, serve, export,
benchmark, data-stats, report, runs, rate) are :data:`EXTRA_COMMANDS`, each parsed beside its code."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Optional

from .errors import UserError


def rows_per_batch(batch_size: int, objective: str) -> int:
    """Rows of a training batch (what the memory probe measures): a DPO batch holds a chosen and a rejected row
    per pair."""
    return batch_size * (2 if objective == "dpo" else 1)


# Options that moved into a group: old key -> its place now. The one list of them; refuse_moved_options
# derives the error from it.
MOVED_OPTIONS = {
    **{f"model.{old}": f"model.lora.{new}" for old, new in (
        ("lora_r", "r"), ("lora_alpha", "alpha"), ("lora_dropout", "dropout"), ("target_modules", "target_modules"),
        ("modules_to_save", "modules_to_save"), ("lora_seed", "seed"))},
    **{f"model.{old}": f"model.memory.{new}" for old, new in (
        ("load_in_4bit", "load_in_4bit"), ("gradient_checkpointing", "gradient_checkpointing"),
        ("memory_budget_gib", "budget_gib"))},
    **{f"model.{old}": f"model.objective.{new}" for old, new in (
        ("objective", "name"), ("dpo_beta", "dpo_beta"), ("kto_desirable_weight", "kto_desirable_weight"),
        ("kto_undesirable_weight", "kto_undesirable_weight"))},
    **{f"model.{name}": f"model.optimization.{name}" for name in (
        "optimizer", "weight_decay", "warmup_ratio", "min_lr_ratio", "embedding_learning_rate")},
    **{f"model.{old}": f"model.decoding.{new}" for old, new in (
        ("max_new_tokens", "max_new_tokens"), ("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k"),
        ("repetition_penalty", "repetition_penalty"), ("no_repeat_ngram_size", "no_repeat_ngram_size"),
        ("generation_seed", "seed"))},
    **{f"model.{old}": f"model.generation.{new}" for old, new in (
        ("generation_batch_size", "batch_size"), ("generation_engine", "engine"), ("generation_weights", "weights"),
        ("val_generate_batches", "val_batches"), ("log_samples", "log_samples"))},
    **{f"data.{old}": f"data.columns.{new}" for old, new in (
        ("prompt_column", "prompt"), ("response_column", "response"), ("messages_column", "messages"),
        ("prompt_template", "prompt_template"), ("response_template", "response_template"),
        ("system_column", "system"), ("id_column", "id"), ("group_column", "group"),
        ("category_column", "category"), ("text_column", "text"))},
    **{f"data.{name}": f"data.encoding.{name}" for name in ("on_too_long", "train_on")},
    **{f"data.{name}": f"data.split.{name}" for name in ("val_fraction", "test_fraction", "seed", "deduplicate")},
    **{f"data.{name}": f"data.loading.{name}" for name in ("shuffle_buffer", "num_workers", "num_proc")},
    "data.predict_split": "data.predict.split", "data.max_predict_samples": "data.predict.max_samples",
}
SUBCOMMANDS = ("fit", "validate", "test", "predict")


def refuse_moved_options(args: list[str]) -> None:
    """One error naming the new place of the first moved option that ``args`` (command-line arguments) or a
    config file they name (``--config``) sets. (``model.objective`` is both an old key and a group now:
    there, a mapping is the group.)"""
    import yaml

    def moved(key: str, value) -> None:
        key = key.split(".", 1)[1] if key.split(".", 1)[0] in SUBCOMMANDS else key
        if key in MOVED_OPTIONS and not isinstance(value, dict):
            raise UserError(f"{key} is now {MOVED_OPTIONS[key]}")

    def walk(config, prefix: str = "") -> None:
        for key, value in (config.items() if isinstance(config, dict) else ()):
            moved(prefix + str(key), value)
            walk(value, f"{prefix}{key}.")

    for i, arg in enumerate(args):
        if not arg.startswith("--"):
            continue
        key, has_value, value = arg[2:].partition("=")
        value = value if has_value else (args[i + 1] if i + 1 < len(args) else None)
        if key == "config" or key.endswith(".config"):
            path = Path(value or "")
            if path.is_file():
                walk(yaml.safe_load(path.read_text(encoding="utf-8")))
        elif isinstance(value, str) and value.startswith("{"):
            try:
                moved(key, yaml.safe_load(value))
            except yaml.YAMLError:  # text that only opens like a mapping: a Jinja chat template
                moved(key, value)
        else:
            moved(key, value)


def lightning_cli(args: Optional[list[str]] = None, run: bool = True):
    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning.pytorch.cli import LightningCLI

    from .training.callbacks import EvaluationWriter, TokenThroughput
    from .data import EmpatheticDialogueDataModule, StreamCounts
    from .models.modeling import tokenizer_path_for
    from .training.module import EmpathyLM
    from .records.registry import ExperimentRegistry

    class EmpathyCLI(LightningCLI):
        def parse_arguments(self, parser, args) -> None:
            if args is None or isinstance(args, list):
                refuse_moved_options(sys.argv[1:] if args is None else args)
            super().parse_arguments(parser, args)

        def add_arguments_to_parser(self, parser) -> None:
            parser.add_lightning_class_args(ExperimentRegistry, "registry")
            parser.link_arguments("model.model_name_or_path", "data.tokenizer_path", compute_fn=tokenizer_path_for)
            # What the model needs from the data and is known at parse time (the rest: EmpathyLM.connect).
            parser.link_arguments("data.max_seq_length", "model.max_seq_length")
            parser.link_arguments(("data.batch_size", "model.objective.name"), "model.train_batch_size",
                                  compute_fn=rows_per_batch)
            parser.link_arguments("model.objective.name", "data.objective")
            parser.link_arguments("data.system_prompt", "model.system_prompt")

        def instantiate_trainer(self, **kwargs):
            import importlib.util

            from lightning.pytorch.callbacks import ProgressBar
            from lightning.pytorch.loggers import TensorBoardLogger

            from .training.callbacks import StepBoundedProgressBar

            # Where Lightning's default bar is its rich one (rich installed), the same bar with the epoch right.
            config = (self.config_init[self.subcommand] if self.subcommand else self.config_init).trainer
            if importlib.util.find_spec("rich") and config.get("enable_progress_bar") is not False and not any(
                    isinstance(c, ProgressBar) for c in config.get("callbacks") or []):
                kwargs["callbacks"] = [*(config.get("callbacks") or []), StepBoundedProgressBar()]
            trainer = super().instantiate_trainer(**kwargs)
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    # No placeholder hp_metric of -1 (the logger's constructor option is out of
                    # reach of the default logger): fit logs the final validation scores instead.
                    logger._default_hp_metric = False
            return trainer

        def _prepare_data(self) -> None:
            # Tokenise and validate the corpus before anything is written; then the model learns about it.
            dm = self.datamodule
            dm.prepare()
            self.model.connect(dm.facts)

        before_fit = before_validate = before_test = before_predict = _prepare_data

        def after_fit(self) -> None:
            self._say_next("fit")

        def after_validate(self) -> None:
            self._say_next("validate")

        def after_test(self) -> None:
            self._say_next("test")

        def after_predict(self) -> None:
            self._say_next("predict")

        def _say_next(self, subcommand: str) -> None:
            log_dir = self.trainer.log_dir  # a collective call under DDP: every rank asks
            if self.trainer.is_global_zero and log_dir:
                # The run's own saved config holds every option it ran with, command-line ones too.
                saved = Path(log_dir) / "config.yaml"
                configs = ([str(_shown(saved))] if saved.is_file()
                           else [str(c) for c in self.config[subcommand].get("config") or []])
                print(next_steps(subcommand, _shown(Path(log_dir)), configs,
                                 self.config[subcommand].model.adapter_path), file=sys.stderr)

        def _run_subcommand(self, subcommand: str) -> None:
            # Some bad input only shows once the run has begun (a memory budget below the measured
            # minimum, an optimizer this machine lacks, a validation interval longer than an epoch),
            # after the logger made its directory.
            new_dir = _new_log_dir(self.trainer)
            try:
                super()._run_subcommand(subcommand)
            except Exception as exc:
                error = as_user_error(exc)
                if error is None:
                    raise
                if new_dir is not None:
                    _remove_if_only_setup(new_dir)
                if error is exc:
                    raise
                raise error from exc

    return EmpathyCLI(
        EmpathyLM,
        EmpatheticDialogueDataModule,
        args=args,
        run=run,
        seed_everything_default=42,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={
            "callbacks": [
                TokenThroughput(window=5),
                LearningRateMonitor(logging_interval="step"),
                EvaluationWriter(),
                StreamCounts(),
            ],
            "log_every_n_steps": 5,
        },
        # Bad values raise instead of printing the whole usage; main() prints them as one line.
        parser_kwargs={"description": "Fine-tune Llama-3.1 to reply with empathy in Bengali (QLoRA + Lightning).",
                       "exit_on_error": False},
    )


def _shown(path: Path) -> Path:
    """``path`` as a user would type it here: relative to the working directory when inside it."""
    try:
        return path.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        return path


def next_steps(subcommand: str, log_dir: Path, configs: list[str], adapter_path: Optional[str]) -> str:
    """What a finished run wrote and the commands a user runs next, with this run's real paths."""
    run = "python -m bengali_empathy"
    config = " ".join(f"--config {c}" for c in configs)
    if subcommand == "fit":
        adapter = log_dir / "adapter"
        if not adapter.is_dir():
            return f"run directory: {log_dir} (no adapter saved)\nnext: {run} report {log_dir}"
        return "\n".join([
            f"adapter: {adapter}",
            "next:",
            f"  {run} predict {config} --model.adapter_path {adapter} --model.compare_base true"
            "   # replies and scores, tuned against base",
            f"  {run} report {log_dir}   # REPORT.md and plots",
            f"  {run} chat --adapter {adapter}   # talk to it",
            f"  {run} serve --adapter {adapter}   # web page: chat, side by side, blind rating",
            f"  {run} export --adapter {adapter} --output {log_dir / 'merged'}   # merged weights (--format gguf for llama.cpp)",
            f"  tensorboard --logdir {log_dir.parent}"])
    written = [log_dir / name for name in ("predictions.jsonl", "metrics.json") if (log_dir / name).is_file()]
    lines = [f"{subcommand} wrote: " + ", ".join(map(str, written)) if written else f"run directory: {log_dir}"]
    report_of = Path(adapter_path).parent if adapter_path and Path(adapter_path).name.startswith("adapter") else log_dir
    lines.append(f"next: {run} report {report_of}   # REPORT.md with these scores, plots and sample replies")
    return "\n".join(lines)


def quiet_known_warnings() -> None:
    """Silence the third-party notices a run would print that say nothing about the run (each matched narrowly)."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning,
                            module="torchdata")
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: not record.getMessage().startswith("💡 Tip:"))


def _new_log_dir(trainer) -> Optional[Path]:
    """The log directory this run will create, if it does not exist yet (rank 0, TensorBoard logger)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    logger = trainer.logger
    if not trainer.is_global_zero or not isinstance(logger, TensorBoardLogger):
        return None
    path = Path(logger.log_dir)
    return None if path.exists() else path


def _remove_if_only_setup(path: Path) -> None:
    """Remove a run directory that holds nothing but what setup writes (config, hparams, empty events)."""
    import shutil

    if path.is_dir() and all(p.name in ("config.yaml", "hparams.yaml") or p.name.startswith("events.out.tfevents")
                             for p in path.iterdir()):
        shutil.rmtree(path, ignore_errors=True)
        if path.parent.is_dir() and not any(path.parent.iterdir()):
            path.parent.rmdir()


# Commands beside LightningCLI's fit / validate / test / predict: each parses its own arguments in its own
# module, imported only when it runs (Unsloth must come before transformers, and Gradio is an optional extra).
EXTRA_COMMANDS = {"chat": "bengali_empathy.apps.chat:chat_main", "serve": "bengali_empathy.apps.chat:serve_main",
                  "export": "bengali_empathy.export.command:main", "benchmark": "bengali_empathy.apps.benchmark:main",
                  "data-stats": "bengali_empathy.apps.data_stats:main", "report": "bengali_empathy.records.report:main",
                  "runs": "bengali_empathy.records.runs:main", "rate": "bengali_empathy.records.rating:main"}


def extra_command(name: str) -> Callable[[list[str]], int]:
    """The ``main(argv)`` of the extra command ``name``."""
    import importlib

    module, function = EXTRA_COMMANDS[name].split(":")
    return getattr(importlib.import_module(module), function)


def as_user_error(exc: BaseException) -> Optional[UserError]:
    """``exc`` as the user error it stands for, or None for a fault of the program.

    Lightning rejects trainer options it cannot honour (``MisconfigurationException``, or a
    ``ValueError`` raised in Lightning's own code, e.g. ``val_check_interval`` beyond an epoch's
    batches) while it builds the Trainer or sets up the run: bad input, not a bug. Running out of
    GPU memory is a setting too large for the card, not a bug either.
    """
    import torch
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    if isinstance(exc, UserError):
        return exc
    if isinstance(exc, torch.OutOfMemoryError):  # a batch beyond what the memory plan measured, or another process
        import re

        tried = re.search(r"Tried to allocate [\d.]+ \w+", str(exc))
        return UserError(f"out of GPU memory{f' ({tried.group(0)})' if tried else ''}: lower data.batch_size or "
                         f"data.max_seq_length, or give model.memory.budget_gib (the plan measures the batches "
                         f"before training)")
    if isinstance(exc, MisconfigurationException) or (isinstance(exc, ValueError) and _raised_in_lightning(exc)):
        return UserError(" ".join(str(exc).split()))
    return None


def _raised_in_lightning(exc: BaseException) -> bool:
    """Whether the innermost frame of ``exc``'s traceback is in the lightning package."""
    import lightning

    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and Path(tb.tb_frame.f_code.co_filename).is_relative_to(Path(lightning.__file__).parent)


def lightning_main(args: Optional[list[str]]) -> int:
    """fit / validate / test / predict; Lightning's own checks of trainer options become user errors."""
    try:
        lightning_cli(args)
    except Exception as exc:
        error = as_user_error(exc)
        if error is None or error is exc:
            raise
        raise error from exc
    finally:
        close_process_group()
    return 0


def close_process_group() -> None:
    """Destroy a distributed run's process group, which Lightning leaves up, before the interpreter exits: two
    gloo ranks (torch 2.13) that left theirs aborted at exit ("terminate called without an active exception")
    in 18 of 60 runs, none of 60 that destroyed it."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(argv: Optional[list[str]] = None) -> int:
    from jsonargparse import ArgumentError

    cli_args = argv  # None: LightningCLI reads sys.argv itself
    argv = sys.argv[1:] if argv is None else argv
    quiet_known_warnings()
    try:
        if argv and argv[0] in EXTRA_COMMANDS:
            if argv[0] == "data-stats":  # it reads a fit config: old option names are refused as fit refuses them
                refuse_moved_options(argv[1:])
            return extra_command(argv[0])(argv[1:])
        return lightning_main(cli_args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ArgumentError as exc:
        # A check that ran while the arguments were parsed (an argument link's function) says it best itself.
        cause = exc
        while cause is not None and not isinstance(cause, UserError):
            cause = cause.__cause__ or cause.__context__
        print("error: " + " ".join(str(cause or exc).split()), file=sys.stderr)
        return 2
