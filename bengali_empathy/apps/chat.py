"""The commands that talk to one loaded model: ``chat`` in the terminal and ``serve``, the web page
(:mod:`.serve`), with the model options they share and the :class:`~..generation.chat.Replier` they
name. The web page's module imports Gradio, an optional extra; it is imported only once ``serve``'s
options are checked."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from ..errors import UserError


def add_model_arguments(p) -> None:
    """The options of a command that loads a model and adapter to talk to (chat, serve)."""
    from ..models.backends import BackendName

    p.add_argument("--model", type=Optional[str], default=None,
                   help="local checkpoint directory or tiny-random-llama (default: the adapter's base model)")
    p.add_argument("--adapter", type=Optional[str], default=None,
                   help="LoRA adapter directory (e.g. lightning_logs/version_0/adapter)")
    p.add_argument("--backend", type=BackendName, default="auto")
    p.add_argument("--system-prompt", type=Optional[str], default=None,
                   help="system prompt (default: the adapter's, else the Bengali default)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--no-4bit", action="store_true", help="load the base model unquantised")


def replier_for(a):
    """The :class:`~..generation.chat.Replier` that the parsed model options name."""
    from ..models.checkpoints import check_base_model, read_info
    from ..models.modeling import TINY_MODEL

    if a.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, not {a.max_new_tokens}")
    info = read_info(a.adapter) if a.adapter else None
    model_name = a.model or (info.model_name_or_path if info else TINY_MODEL)
    if info is not None:
        check_base_model(a.adapter, info, model_name)
    system = a.system_prompt if a.system_prompt is not None else (info.system_prompt if info else None)
    return load_chat(model_name, a.adapter, a.backend, not a.no_4bit, a.max_new_tokens, system,
                     info.max_seq_length if info is not None else None)


def load_chat(model_name: str, adapter: Optional[str], backend: str, load_in_4bit: bool, max_new_tokens: int,
              system_prompt: Optional[str], max_seq_length: Optional[int]):
    """A :class:`~..generation.chat.Replier` on the base model with the adapter's LoRA settings and weights."""
    import torch

    from ..data import DEFAULT_SYSTEM_PROMPT
    from ..generation.chat import Replier
    from ..generation.decoding import Decoding
    from ..generation.engines import resolve_engine
    from ..models.backends import make_backend
    from ..models.loading import load_lora_model
    from ..models.lora import DEFAULT_LORA, LoraSettings
    from ..training.module import MAX_SEQ_LENGTH

    lora = LoraSettings.from_adapter(adapter) if adapter else DEFAULT_LORA
    strategy = make_backend(backend, load_in_4bit=load_in_4bit, gradient_checkpointing=False)
    length = max_seq_length or MAX_SEQ_LENGTH
    model, tokenizer = load_lora_model(strategy, model_name, length, lora, adapter)
    if torch.cuda.is_available() and not strategy.quantized:
        model.to("cuda")
    model.eval()
    system = DEFAULT_SYSTEM_PROMPT if system_prompt is None else system_prompt
    return Replier(model, tokenizer, strategy, system, length, Decoding(max_new_tokens=max_new_tokens),
                   engine=resolve_engine("auto", strategy.name))


def chat_main(argv: list[str]) -> int:
    """A conversation with a model and adapter, using the adapter's recorded training settings."""
    from jsonargparse import ArgumentParser

    from ..generation.chat import RESET, chat_loop

    p = ArgumentParser(prog="python -m bengali_empathy chat", exit_on_error=False,
                       description="Talk to a (fine-tuned) model in Bengali: every message is answered with the "
                                   f"conversation so far ('{RESET}' starts a new one), the reply streamed. With "
                                   "--adapter, the base model, LoRA settings, system prompt and max_seq_length "
                                   "it was trained with are read from the adapter.")
    add_model_arguments(p)
    p.add_argument("--message", "-m", type=str, default=None, action="append",
                   help="message (repeatable, one conversation); else one message per line of standard input")
    a = p.parse_args(argv)
    replier = replier_for(a)
    messages = a.message or sys.stdin
    if not a.message and sys.stdin.isatty():
        print(f"Type a message ({RESET} for a new conversation, Ctrl-D to quit).", file=sys.stderr)
    chat_loop(replier, messages, sys.stdout, lambda line: print(line, file=sys.stderr, flush=True))
    return 0


def serve_main(argv: list[str]) -> int:
    """The web page: chat, side by side, blind rating and runs, on one loaded model."""
    from jsonargparse import ArgumentParser

    from ..records.registry import DEFAULT_DB, experiment_for

    p = ArgumentParser(prog="python -m bengali_empathy serve", exit_on_error=False,
                       description="A local web page (Gradio) to talk to the tuned model, compare it with its base "
                                   "and rate the two blind; judgements go to the registry.")
    add_model_arguments(p)
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
    try:  # before the model loads
        from .serve import launch, newest_run_with_replies
    except ImportError as exc:
        if exc.name != "gradio":
            raise
        raise UserError("serve needs Gradio: pip install -e '.[serve]'") from exc
    run = experiment_for(a.db, a.run)["id"] if a.run else newest_run_with_replies(a.db)
    replier = replier_for(a)
    launch(replier, str(Path(a.adapter).resolve()), a.db, run, a.pairs, a.host, a.port, auth)
    return 0
