"""Conversations with the one loaded model: the history, the training length rule, streamed replies.

A conversation is a list of turns (``{"role": "user" | "assistant", "content": text}``) under the
adapter's system prompt. Every reply is generated from the whole history, as the model was trained
on multi-turn rows; when the prompt and ``max_new_tokens`` would outgrow ``max_seq_length``, the
oldest whole exchanges leave the prompt by the rule training's ``truncate_history`` applies
(:func:`.data.encode.drop_oldest_exchanges`), and the reply says how many turns were left out.

Replies stream as text. A token can end inside a UTF-8 sequence (a Bengali letter is 3 bytes and
byte-level BPE splits rare ones) or inside a grapheme cluster (a consonant before its vowel sign, a
virama before the next consonant of a conjunct), so :class:`GraphemeStreamer` shows only whole
extended grapheme clusters (``regex``'s ``\\X``): the last cluster is held back until a later token or
the end settles it.

:class:`Replier` owns the model for every conversation (the terminal's or each web session's): one
generation at a time behind a lock, so requests queue instead of interleaving on the GPU, and each
reply is the tuned model's or the base model's (adapter disabled).
"""
from __future__ import annotations

import contextlib
import random
import threading
import time
from dataclasses import dataclass, replace
from queue import Queue
from typing import Callable, Iterable, Iterator, Optional, TextIO

import regex
import torch
from transformers.generation.streamers import BaseStreamer

from ..data.encode import drop_oldest_exchanges
from ..errors import UserError
from ..text import is_empty_reply
from .decoding import Decoding
from .engines import Engine, engine_for, make_engine

RESET = "/reset"  # a line of terminal chat that starts a new conversation
_END = object()


def settled_text(text: str, final: bool = False) -> str:
    """The part of a partial reply that later tokens cannot change: whole characters and, unless
    ``final``, whole grapheme clusters before the last one; no surrounding white space (replies are stripped)."""
    text = text.lstrip().rstrip("\ufffd")  # U+FFFD: the decoded bytes of a character not yet complete
    if not final:
        last = None
        for last in regex.finditer(r"\X", text):
            pass
        text = text[: last.start()] if last is not None else ""
    return text.rstrip()


class GraphemeStreamer(BaseStreamer):
    """A ``generate`` streamer whose iterator yields the reply's settled text, growing, never a broken grapheme."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.queue: Queue = Queue()
        self._prompt_seen = False
        self._shown = ""

    def put(self, value) -> None:
        if not self._prompt_seen:  # generate() hands over the prompt first
            self._prompt_seen = True
            return
        self.ids += value.reshape(-1).tolist()
        self._show(settled_text(self.text()))

    def end(self) -> None:
        self._show(settled_text(self.text(), final=True))
        self.queue.put(_END)

    def fail(self, exc: BaseException) -> None:
        """Hand an error of the generating thread to the reader."""
        self.queue.put(exc)

    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def _show(self, text: str) -> None:
        if len(text) > len(self._shown):
            self._shown = text
            self.queue.put(text)

    def __iter__(self) -> Iterator[str]:
        while (item := self.queue.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item


@dataclass(frozen=True)
class Reply:
    """A reply so far (``done`` once complete) and how it was generated."""

    text: str
    prompt_tokens: int
    history_turns: int  # earlier turns in the prompt
    dropped_turns: int  # earlier turns left out to fit max_seq_length
    new_tokens: int = 0
    seconds: float = 0.0
    seed: Optional[int] = None  # of a sampled reply
    done: bool = False

    @property
    def empty(self) -> bool:
        """A finished reply without words: the model ended its turn at once, or said only punctuation (an
        undertrained model often does)."""
        return self.done and is_empty_reply(self.text)


EMPTY_REPLY = "(empty reply: the model ended its turn at once)"


class Replier:
    """Replies of one loaded model (tuned, or its base with the adapter disabled) to conversations, one at a time.

    Args:
        model, tokenizer, backend: the loaded LoRA model and its :class:`~.backends.Backend`
        system_prompt: the adapter's (or the Bengali default)
        max_seq_length: the adapter's; a prompt plus ``max_new_tokens`` stays within it
        decoding: the default :class:`~.generation.Decoding`
        engine: the :mod:`.engines` name it decodes with, as evaluation does (``compiled``: the graphs of
            the tuned and the base model kept for the next reply)
    """

    def __init__(self, model, tokenizer, backend, system_prompt: str, max_seq_length: int, decoding: Decoding,
                 engine: str = "eager") -> None:
        from ..data import ChatEncoder
        from ..data.tokenizer import stop_token_ids

        self.model, self.tokenizer, self.backend = model, tokenizer, backend
        self.encoder = ChatEncoder(tokenizer)  # built once: it checks the whole vocabulary
        generation_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        self.stop_ids = stop_token_ids(tokenizer, generation_eos)
        self.system_prompt, self.max_seq_length, self.decoding = system_prompt, max_seq_length, decoding
        self.engine = engine_for(engine, model)  # said here, once for every conversation
        self._engines: dict[bool, Engine] = {}  # base (adapter disabled) or not -> its engine
        self._weights: dict = {}  # the 16-bit copies both engines decode with (Engine's ``weights``)
        self._lock = threading.Lock()

    def prompt(self, turns: list[dict], max_new_tokens: int) -> tuple[list[int], int]:
        """Generation prompt ids for the reply to ``turns`` (ending in a user turn) and the number of
        earlier turns left out; an empty or too-long message is a :class:`UserError`."""
        if not turns or turns[-1]["role"] != "user" or not turns[-1]["content"].strip():
            raise UserError("the message is empty: type something to send")
        system_ids, tokenized = self.encoder.tokenized(self.system_prompt, turns)
        room = self.max_seq_length - max_new_tokens

        def ids_of(kept: list) -> list[int]:
            return self.encoder.assemble(system_ids, kept, generation_prompt=True)[0]

        kept = drop_oldest_exchanges(tokenized, lambda kept: len(ids_of(kept)) > room)
        ids = ids_of(kept)
        if len(ids) > room:
            raise UserError(f"the message is too long: with the system prompt it makes a {len(ids)}-token prompt, "
                            f"and max_seq_length {self.max_seq_length} minus {max_new_tokens} new tokens leaves "
                            f"room for {room}; shorten it (or ask for fewer new tokens)")
        return ids, len(turns) - len(kept)

    def stream(self, turns: list[dict], decoding: Optional[Decoding] = None, base: bool = False) -> Iterator[Reply]:
        """The reply to ``turns`` as it grows (the last one ``done``); waits for the model while another runs.

        Sampling (temperature > 0) without a seed draws one, so a regenerated reply differs; the
        reply says which.
        """
        decoding = decoding or self.decoding
        ids, dropped = self.prompt(turns, decoding.max_new_tokens)  # bad input never waits for the model
        seed = None
        if decoding.temperature > 0:
            seed = decoding.seed if decoding.seed else random.SystemRandom().randrange(1, 2**31)
            decoding = replace(decoding, seed=seed)
        reply = Reply("", len(ids), len(turns) - 1 - dropped, dropped, seed=seed)
        with self._lock:
            streamer, stop = GraphemeStreamer(self.tokenizer), threading.Event()
            worker = threading.Thread(target=self._generate, args=(ids, decoding, base, streamer, stop), daemon=True)
            start = time.perf_counter()
            worker.start()
            try:
                for text in streamer:
                    reply = replace(reply, text=text)
                    yield reply
            finally:  # also when the reader goes away: the model is free again only once generation ended
                stop.set()
                worker.join()
        new = sum(1 for i in streamer.ids if i not in self.stop_ids)
        yield replace(reply, new_tokens=new, seconds=time.perf_counter() - start, done=True)

    def reply(self, turns: list[dict], decoding: Optional[Decoding] = None, base: bool = False) -> Reply:
        """The complete reply to ``turns``."""
        for reply in self.stream(turns, decoding, base):
            pass
        return reply

    def _engine(self, base: bool) -> Engine:
        """The engine of the tuned model or of its base: a CUDA graph records the adapter as it stood."""
        if base not in self._engines:
            self._engines[base] = make_engine(self.engine, self.model, self.stop_ids, self.tokenizer.pad_token_id,
                                              weights=self._weights)
        return self._engines[base]

    def _generate(self, ids: list[int], decoding: Decoding, base: bool, streamer: GraphemeStreamer,
                  stop: threading.Event) -> None:
        def on_step(tokens: torch.Tensor) -> bool:
            streamer.put(tokens.cpu())
            return stop.is_set()

        try:
            self.backend.for_inference(self.model)
            if decoding.temperature > 0:
                torch.manual_seed(decoding.seed)
            engine = self._engine(base)
            adapter = self.backend.adapter_disabled(self.model) if base else contextlib.nullcontext()
            streamer.put(torch.tensor([ids]))  # as generate() does: the prompt first
            with adapter, engine.prepared(), torch.inference_mode():
                engine([ids], len(ids), decoding, on_step)
            engine.batches.clear()  # a chat's replies are not profiled
            streamer.end()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the reading thread
            streamer.fail(exc)


def chat_loop(replier: Replier, messages: Iterable[str], out: TextIO, note: Callable[[str], None],
              decoding: Optional[Decoding] = None) -> int:
    """Terminal chat: one conversation over the messages (``/reset`` starts a new one), each reply
    streamed to ``out`` on its own line; a refused message is noted (``error: ...``) and the
    conversation goes on. Returns the number of replies."""
    turns: list[dict] = []
    replies = 0
    for message in messages:
        message = message.strip()
        if not message:
            continue
        if message == RESET:
            turns = []
            note("new conversation")
            continue
        asked = turns + [{"role": "user", "content": message}]
        shown = ""
        try:
            for reply in replier.stream(asked, decoding):
                out.write(reply.text[len(shown):])
                out.flush()
                shown = reply.text
        except UserError as exc:
            note(f"error: {exc}")
            continue
        out.write("\n")
        out.flush()
        if reply.empty:
            note(EMPTY_REPLY)
        if reply.dropped_turns:
            note(f"note: the {reply.dropped_turns} oldest turns were left out of the prompt "
                 f"(max_seq_length {replier.max_seq_length})")
        turns = asked + [{"role": "assistant", "content": reply.text}]
        replies += 1
    return replies
