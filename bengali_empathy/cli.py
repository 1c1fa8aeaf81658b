"""Command line: LightningCLI for fit/validate/test/predict, plus chat, export, benchmark, data-stats,
report, runs, rate and serve."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from .errors import UserError


def tokenizer_path_for(model_name_or_path: str) -> Optional[str]:
    """The data module reads the tokenizer of the model being trained (embedded one for the tiny model)."""
    from .models.modeling import TINY_MODEL

    return None if model_name_or_path == TINY_MODEL else model_name_or_path


def rows_per_batch(batch_size: int, objective: str) -> int:
    """Rows of a training batch (what the memory probe measures): a DPO batch holds a chosen and a rejected row
    per pair."""
    return batch_size * (2 if objective == "dpo" else 1)


def lightning_cli(args: Optional[list[str]] = None, run: bool = True):
    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning.pytorch.cli import LightningCLI

    from .training.callbacks import EvaluationWriter, TokenThroughput
    from .data import EmpatheticDialogueDataModule, StreamCounts
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


# --------------------------------------------------------------------------- chat


def _add_model_arguments(p) -> None:
    """The options of a command that loads a model and adapter to talk to (chat, serve)."""
    from .models.backends import BackendName

    p.add_argument("--model", type=Optional[str], default=None,
                   help="local checkpoint directory or tiny-random-llama (default: the adapter's base model)")
    p.add_argument("--adapter", type=Optional[str], default=None,
                   help="LoRA adapter directory (e.g. lightning_logs/version_0/adapter)")
    p.add_argument("--backend", type=BackendName, default="auto")
    p.add_argument("--system-prompt", type=Optional[str], default=None,
                   help="system prompt (default: the adapter's, else the Bengali default)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--no-4bit", action="store_true", help="load the base model unquantised")


def _replier_for(a):
    """The :class:`~.conversation.Replier` that the parsed model options name."""
    from .models.checkpoints import check_base_model, read_info
    from .models.modeling import TINY_MODEL

    if a.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, not {a.max_new_tokens}")
    info = read_info(a.adapter) if a.adapter else None
    model_name = a.model or (info.model_name_or_path if info else TINY_MODEL)
    if info is not None:
        check_base_model(a.adapter, info, model_name)
    system = a.system_prompt if a.system_prompt is not None else (info.system_prompt if info else None)
    return load_chat(model_name, a.adapter, a.backend, not a.no_4bit, a.max_new_tokens, system,
                     info.max_seq_length if info is not None else None)


def chat_main(argv: list[str]) -> int:
    """A conversation with a model and adapter, using the adapter's recorded training settings."""
    from jsonargparse import ArgumentParser

    from .generation.chat import RESET, chat_loop

    p = ArgumentParser(prog="python -m bengali_empathy chat", exit_on_error=False,
                       description="Talk to a (fine-tuned) model in Bengali: every message is answered with the "
                                   f"conversation so far ('{RESET}' starts a new one), the reply streamed. With "
                                   "--adapter, the base model, LoRA settings, system prompt and max_seq_length "
                                   "it was trained with are read from the adapter.")
    _add_model_arguments(p)
    p.add_argument("--message", "-m", type=str, default=None, action="append",
                   help="message (repeatable, one conversation); else one message per line of standard input")
    a = p.parse_args(argv)
    replier = _replier_for(a)
    messages = a.message or sys.stdin
    if not a.message and sys.stdin.isatty():
        print(f"Type a message ({RESET} for a new conversation, Ctrl-D to quit).", file=sys.stderr)
    chat_loop(replier, messages, sys.stdout, lambda line: print(line, file=sys.stderr, flush=True))
    return 0


def load_chat(model_name: str, adapter: Optional[str], backend: str, load_in_4bit: bool, max_new_tokens: int,
              system_prompt: Optional[str], max_seq_length: Optional[int]):
    """A :class:`~.conversation.Replier` on the base model with the adapter's LoRA settings and weights."""
    import torch

    from .models.backends import make_backend
    from .generation.chat import Replier
    from .data import DEFAULT_SYSTEM_PROMPT
    from .generation.decoding import Decoding
    from .generation.generator import resolve_engine
    from .models.lora import DEFAULT_LORA, LoraSettings
    from .models.modeling import resolve_model_path
    from .training.module import MAX_SEQ_LENGTH

    lora = LoraSettings.from_adapter(adapter) if adapter else DEFAULT_LORA
    strategy = make_backend(backend, load_in_4bit=load_in_4bit, gradient_checkpointing=False)
    length = max_seq_length or MAX_SEQ_LENGTH
    model, tokenizer = strategy.load(resolve_model_path(model_name), length, lora, adapter)
    if torch.cuda.is_available() and not strategy.quantized:
        model.to("cuda")
    model.eval()
    system = DEFAULT_SYSTEM_PROMPT if system_prompt is None else system_prompt
    return Replier(model, tokenizer, strategy, system, length, Decoding(max_new_tokens=max_new_tokens),
                   engine=resolve_engine("auto", strategy.name))


def serve_main(argv: list[str]) -> int:
    """The web page: chat, side by side, blind rating and runs, on one loaded model."""
    from jsonargparse import ArgumentParser

    from .records.registry import DEFAULT_DB

    p = ArgumentParser(prog="python -m bengali_empathy serve", exit_on_error=False,
                       description="A local web page (Gradio) to talk to the tuned model, compare it with its base "
                                   "and rate the two blind; judgements go to the registry.")
    _add_model_arguments(p)
    p.add_argument("--host", type=str, default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--auth", type=str, default=None, action="append",
                   help="USER:PASS that may log in (repeatable); without it, anyone who reaches the port can")
    p.add_argument("--db", type=str, default=DEFAULT_DB, help="the registry: runs, and where judgements go")
    p.add_argument("--run", type=Optional[str], default=None,
                   help="experiment id or log directory whose replies give the prompts to rate "
                        "(default: the newest run with replies)")
    p.add_argument("--pairs", type=int, default=20, help="blind pairs per rating session")
    a = p.parse_args(argv)
    if not a.adapter:
        raise UserError("serve needs --adapter DIR: the tuned model to talk to and compare with its base")
    if not 1 <= a.port <= 65535:
        raise UserError(f"--port must be from 1 to 65535, not {a.port}")
    if a.pairs < 1:
        raise UserError(f"--pairs must be at least 1, not {a.pairs}")
    auth = [tuple(x.split(":", 1)) for x in (a.auth or [])]
    if any(len(x) != 2 or not all(x) for x in auth):
        raise UserError("--auth must be USER:PASS (both non-empty)")
    from .records.registry import experiment_for

    try:  # before the model loads
        from .apps.serve import launch, newest_run_with_replies
    except ImportError as exc:
        if exc.name != "gradio":
            raise
        raise UserError("serve needs Gradio: pip install -e '.[serve]'") from exc
    run = experiment_for(a.db, a.run)["id"] if a.run else newest_run_with_replies(a.db)
    replier = _replier_for(a)
    launch(replier, str(Path(a.adapter).resolve()), a.db, run, a.pairs, a.host, a.port, auth)
    return 0


# --------------------------------------------------------------------------- export


def export_main(argv: list[str]) -> int:
    """Merge an adapter (or a fit checkpoint's LoRA weights) into its base model: 16-bit HF weights, or a GGUF."""
    from typing import Literal

    from jsonargparse import ArgumentParser

    from .export.gguf import Quant

    p = ArgumentParser(prog="python -m bengali_empathy export", exit_on_error=False,
                       description="Merge a LoRA adapter into its base model and save 16-bit Hugging Face weights, "
                                   "or (--format gguf) one GGUF file for llama.cpp with an Ollama Modelfile.")
    p.add_argument("--adapter", type=str, required=True, help="LoRA adapter directory")
    p.add_argument("--output", type=str, required=True, help="directory for the merged checkpoint (must not exist)")
    p.add_argument("--ckpt", type=Optional[str], default=None,
                   help="a fit .ckpt whose LoRA weights replace the adapter's (e.g. the best val/loss checkpoint)")
    p.add_argument("--model", type=Optional[str], default=None,
                   help="base checkpoint (default: the one recorded in the adapter)")
    p.add_argument("--dtype", type=Literal["bfloat16", "float16", "float32"], default="bfloat16",
                   help="dtype the base is loaded and merged in (and, for hf, saved in)")
    p.add_argument("--format", type=Literal["hf", "gguf"], default="hf",
                   help="hf: safetensors for transformers / vLLM; gguf: llama.cpp / Ollama")
    p.add_argument("--quant", type=Optional[Quant], default=None,
                   help="GGUF weights (default q4_k_m); k-quants by llama.cpp's quantizer")
    a = p.parse_args(argv)
    if a.format == "hf":
        if a.quant is not None:
            raise UserError("--quant applies to --format gguf only")
        from .export.hf import merge_adapter

        out = merge_adapter(a.adapter, a.output, base=a.model, dtype=a.dtype, ckpt=a.ckpt)
        print(f"merged model written to {out}")
        return 0
    from .export.gguf import export_gguf

    done = export_gguf(a.adapter, a.output, a.quant or "q4_k_m", base=a.model, dtype=a.dtype, ckpt=a.ckpt)
    types = ", ".join(f"{k} {v}" for k, v in done["tensor_types"].items())
    fallback = (f"; {done['fallback']} tensors fell back to another type (rows not divisible by the quant's block)"
                if done["fallback"] else "")
    print(f"GGUF written to {done['gguf']} ({done['bytes'] / 2**20:.1f} MiB; tensors {types}{fallback}), "
          f"Ollama Modelfile to {done['modelfile']}")
    return 0


# --------------------------------------------------------------------------- data-stats


def data_stats_main(argv: list[str]) -> int:
    """Print per-split corpus statistics for a config's ``data`` section (no model is loaded)."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    from .data import EmpatheticDialogueDataModule, format_stats
    from .models.modeling import TINY_MODEL

    p = ArgumentParser(prog="python -m bengali_empathy data-stats",
                       description="Rows, conversations, turns, token-length percentiles, % over max_seq_length "
                                   "and reply tokens per split, for the data section of a fit config.")
    p.add_argument("--config", action=ActionConfigFile)
    p.add_class_arguments(EmpatheticDialogueDataModule, "data")
    # The rest of a fit config is accepted and ignored, except the model path that selects the tokenizer.
    p.add_argument("--model", type=dict, default={})
    p.add_argument("--trainer", type=dict, default={})
    p.add_argument("--seed_everything", type=Optional[int], default=None)
    p.add_argument("--json", type=Optional[str], default=None, help="also write the statistics to this JSON file")
    cfg = p.parse_args(argv)
    data = cfg.data.as_dict() if hasattr(cfg.data, "as_dict") else dict(cfg.data)
    if data.get("tokenizer_path") is None:
        data["tokenizer_path"] = tokenizer_path_for((cfg.model or {}).get("model_name_or_path", TINY_MODEL))
    data["objective"] = (cfg.model or {}).get("objective", "sft")  # linked in fit: the rows' layout follows it
    counted_not_raised = data.get("on_too_long") == "error"
    if counted_not_raised:  # count every too-long row instead of stopping at the first
        data["on_too_long"] = "drop"
    dm = EmpatheticDialogueDataModule(**data)
    stats = dm.compute_stats()
    print(format_stats(stats, dm.hparams.max_seq_length))
    if counted_not_raised and any(s["dropped_too_long"] for s in stats.values()):
        print("note: on_too_long=error, so fit would stop at the first of the dropped_too_long rows; "
              "set data.on_too_long to drop, truncate or truncate_history")
    if cfg.json:
        import json

        from ._io import atomic_write_text

        atomic_write_text(Path(cfg.json), json.dumps(stats, indent=2) + "\n")
    return 0


# --------------------------------------------------------------------------- report


def report_main(argv: list[str]) -> int:
    """Write REPORT.md and plots for a run directory."""
    from jsonargparse import ArgumentParser

    from .records.report import build_report

    p = ArgumentParser(prog="python -m bengali_empathy report",
                       description="Experiment report of a run: REPORT.md with the run's settings, data, time and "
                                   "memory, loss / learning-rate / tokens-per-second / memory plots, final metrics "
                                   "(base vs tuned when scored), per-category scores, honesty checks and sample "
                                   "generations.", exit_on_error=False)
    p.add_argument("run_dir", type=str, help="a fit run (lightning_logs/version_N) or a test/predict run")
    p.add_argument("--output", type=Optional[str], default=None, help="directory for REPORT.md and the plots "
                                                                      "(default: the run directory)")
    p.add_argument("--db", type=Optional[str], default=None, help="experiment registry with human ratings "
                                                                  "(default: experiments.db beside the run)")
    cfg = p.parse_args(argv)
    report = build_report(Path(cfg.run_dir), Path(cfg.output) if cfg.output else None, cfg.db)
    print(f"report written to {report}")
    return 0


# --------------------------------------------------------------------------- runs / rate


def _key_scores(metrics: dict) -> str:
    """A run's scores: an evaluation's at the top level, a fit's final validation under ``val/``."""
    from .evaluation.metrics import SCORE_NAMES
    from .records.registry import recorded_score

    found = (recorded_score(metrics, name) for name in SCORE_NAMES)
    return ", ".join(f"{k}={v:.4f}" for k, v in filter(None, found))


def runs_main(argv: list[str]) -> int:
    """List recorded experiments, or show one with its sample replies and human ratings."""
    import json
    from typing import Literal

    from jsonargparse import ArgumentParser

    from .records.judgements import win_rate
    from .records.registry import DEFAULT_DB, experiment_for, list_experiments, rating_summary, responses_of

    p = ArgumentParser(prog="python -m bengali_empathy runs", exit_on_error=False,
                       description="Experiments recorded in the SQLite registry: `runs` lists them, "
                                   "`runs show ID` prints one with its sample replies, `runs export-preferences ID "
                                   "--output prefs.jsonl` turns its human judgements into DPO or KTO rows.")
    p.add_argument("action", type=Optional[str], nargs="?", default=None, help="show | export-preferences")
    p.add_argument("id", type=Optional[str], nargs="?", default=None, help="experiment id or log directory")
    p.add_argument("--db", type=str, default=DEFAULT_DB, help="the registry file")
    p.add_argument("--samples", type=int, default=5, help="sample replies shown by `show`")
    p.add_argument("--output", type=Optional[str], default=None, help="export-preferences: the JSONL file to write")
    p.add_argument("--objective", type=Literal["dpo", "kto"], default="dpo",
                   help="export-preferences: dpo pairs from blind judgements, or kto rows from 1-5 ratings")
    p.add_argument("--desirable-at", type=float, default=4.0, help="kto: mean rating from which a reply is desirable")
    p.add_argument("--undesirable-at", type=float, default=2.0, help="kto: mean rating up to which it is undesirable")
    cfg = p.parse_args(argv)
    if cfg.samples < 0:
        raise UserError(f"--samples must be at least 0, not {cfg.samples}")
    if cfg.action == "export-preferences":
        from .records.preference_export import export_preferences

        if cfg.id is None or cfg.output is None:
            raise UserError("usage: runs export-preferences ID_OR_DIR --output prefs.jsonl [--objective dpo|kto]")
        exported = export_preferences(cfg.db, cfg.id, Path(cfg.output), cfg.objective, cfg.desirable_at,
                                      cfg.undesirable_at)
        print(f"{len(exported.rows)} {cfg.objective} rows written to {cfg.output}: {exported.summary()}")
        return 0
    if cfg.action is None:
        experiments = list_experiments(cfg.db)
        print(f"{'id':>4}  {'time (UTC)':<25}  {'stage':<8}  {'steps':>6}  model / corpus / scores")
        for e in experiments:
            run = e["metrics"].get("run", {})
            print(f"{e['id']:>4}  {e['timestamp']:<25}  {run.get('stage', ''):<8}  {run.get('steps', ''):>6}  "
                  f"{e['model_name']} / {run.get('corpus', '')} / {_key_scores(e['metrics'])}")
        return 0
    if cfg.action != "show" or cfg.id is None:
        raise UserError("usage: runs [show ID | export-preferences ID --output FILE] [--db FILE]")
    exp = experiment_for(cfg.db, cfg.id)
    metrics = json.loads(exp["metrics"] or "{}")
    run = metrics.pop("run", {})
    print(f"experiment {exp['id']} ({exp['timestamp']}): {run.get('stage')} of {exp['model_name']}")
    print(f"  log dir: {run.get('log_dir')}\n  corpus: {run.get('corpus')}\n  adapter: {run.get('adapter_path')}")
    print(f"  LoRA: {exp['lora_config']}\n  train_loss: {exp['train_loss']}  val_loss: {exp['val_loss']}")
    print(f"  scores: {_key_scores(metrics)}")
    for line in metrics.get("warnings", []):
        print(f"  warning: {line}")
    for shown, summary in rating_summary(cfg.db, exp["id"]).items():
        print(f"  human ratings ({shown}, n={summary['n']}): "
              + ", ".join(f"{k} {v:.2f}" for k, v in summary.items() if k != "n"))
    wins = win_rate(cfg.db, exp["id"])
    if wins is not None:
        print(f"  blind judgements: {wins.describe()}")
    for r in responses_of(cfg.db, exp["id"])[: cfg.samples]:
        print(f"\n  prompt:     {r['input_text']}\n  reference:  {r['reference_text']}\n  reply:      {r['response_text']}")
        if r["base_response_text"] is not None:
            print(f"  base reply: {r['base_response_text']}")
    return 0


def rate_main(argv: list[str]) -> int:
    """Score sampled replies of a run from the terminal (1-5 per aspect)."""
    from jsonargparse import ArgumentParser

    from .records.rating import rate
    from .records.registry import DEFAULT_DB

    p = ArgumentParser(prog="python -m bengali_empathy rate", exit_on_error=False,
                       description="Rate sampled replies of a recorded run for empathy, relevance, fluency, "
                                   "coherence and helpfulness (1-5) and an optional comment; quitting keeps "
                                   "what was rated.")
    p.add_argument("run", type=str, help="experiment id or the run's log directory")
    p.add_argument("--n", type=int, default=20, help="replies to rate")
    p.add_argument("--blind", type=bool, default=False, help="mix base and tuned replies without labels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--db", type=str, default=DEFAULT_DB, help="the registry file")
    cfg = p.parse_args(argv)
    if cfg.n < 1:
        raise UserError(f"--n must be at least 1, not {cfg.n}")

    def ask(prompt: str) -> str:
        try:
            return input(prompt)
        except EOFError:
            return "q"

    rate(cfg.db, cfg.run, cfg.n, cfg.blind, cfg.seed, ask, sys.stdout)
    return 0


# --------------------------------------------------------------------------- entry point


def benchmark_main(argv: list[str]) -> int:
    from .apps.benchmark import main as bench_main

    return bench_main(argv)


# Commands beside LightningCLI's fit / validate / test / predict.
EXTRA_COMMANDS = {"chat": chat_main, "export": export_main, "benchmark": benchmark_main,
                  "data-stats": data_stats_main, "report": report_main, "runs": runs_main, "rate": rate_main,
                  "serve": serve_main}


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
            return EXTRA_COMMANDS[argv[0]](argv[1:])
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
