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


def lightning_cli(args: Optional[list[str]] = None, run: bool = True):
    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning.pytorch.cli import LightningCLI

    from .training.callbacks import EvaluationWriter, TokenThroughput
    from .data import EmpatheticDialogueDataModule, StreamCounts
    from .data.datamodule import tokenizer_path_for
    from .training.module import EmpathyLM
    from .records.registry import ExperimentRegistry

    class EmpathyCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            parser.add_lightning_class_args(ExperimentRegistry, "registry")
            parser.link_arguments("model.model_name_or_path", "data.tokenizer_path", compute_fn=tokenizer_path_for)
            # What the model needs from the data and is known at parse time (the rest: EmpathyLM.connect).
            parser.link_arguments("data.max_seq_length", "model.max_seq_length")
            parser.link_arguments(("data.batch_size", "model.objective"), "model.train_batch_size",
                                  compute_fn=rows_per_batch)
            parser.link_arguments("model.objective", "data.objective")
            parser.link_arguments("data.system_prompt", "model.system_prompt")

        def instantiate_trainer(self, **kwargs):
            from lightning.pytorch.loggers import TensorBoardLogger

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
                  "data-stats": "bengali_empathy.data.datamodule:stats_main", "report": "bengali_empathy.records.report:main",
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
    batches) while it builds the Trainer or sets up the run: bad input, not a bug.
    """
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    if isinstance(exc, UserError):
        return exc
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
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    from jsonargparse import ArgumentError

    cli_args = argv  # None: LightningCLI reads sys.argv itself
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv and argv[0] in EXTRA_COMMANDS:
            return extra_command(argv[0])(argv[1:])
        return lightning_main(cli_args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ArgumentError as exc:
        print("error: " + " ".join(str(exc).split()), file=sys.stderr)
        return 2
