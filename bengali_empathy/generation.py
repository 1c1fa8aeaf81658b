"""Reply generation: batched for evaluation (length-sorted batches of their own size), and chat.

Decoding one step costs about the same at batch 8 as at batch 128 on a GPU
(reading the 4-bit weights dominates), so evaluation generates in batches much
larger than the loss batches: prompts are sorted by length (longest first, so a
batch that does not fit shows up at once), left-padded per batch, every row
stops at ``<|eot_id|>``, and the replies come back in input order. A batch that
runs out of GPU memory is retried at half the size.

Two engines run the decoding (``model.generation_engine``): ``eager`` is transformers' ``generate``
with its dynamic KV cache and SDPA attention; ``compiled`` gives ``generate`` a static KV cache of
one size for the whole call (the longest prompt plus ``max_new_tokens``, rounded up to
``CACHE_BUCKET``), pads a short last batch to the batch size so no batch has a new shape
(transformers compiles the decoding step of a static cache on CUDA, once per shape), and decodes
with the grouped-query attention of :mod:`.attention`, which reads each K/V head once (``hf``
backend only: Unsloth generates with its own kernels). ``auto`` is ``eager`` for now: on the H200
``compiled`` decoded a later batch ~5x faster, but its first batch holds the compile, and its bf16
replies are not yet checked against the eager ones on a GPU.

:class:`Generator` is that for a loaded model (mode switches, cache and batch size kept across
calls); conversations (chat, the web page) are :mod:`.conversation`'s.
"""
from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Literal, Optional, Sequence

import torch

from .errors import UserError

GenerationEngine = Literal["auto", "compiled", "eager"]
CACHE_BUCKET = 256  # static KV cache lengths are multiples of this


@dataclass(frozen=True)
class Decoding:
    """Decoding settings: greedy when ``temperature`` is 0, else sampling with ``seed``."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    seed: int = 0

    def generate_kwargs(self) -> dict:
        kwargs: dict = {"max_new_tokens": self.max_new_tokens, "do_sample": self.temperature > 0}
        if self.temperature > 0:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k or None)
        if self.repetition_penalty != 1.0:
            kwargs["repetition_penalty"] = self.repetition_penalty
        if self.no_repeat_ngram_size:
            kwargs["no_repeat_ngram_size"] = self.no_repeat_ngram_size
        return kwargs

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class GenerationStats:
    rows: int = 0
    new_tokens: int = 0
    seconds: float = 0.0
    batch_size: int = 0
    peak_gpu_memory_gib: Optional[float] = None
    engine: str = "eager"

    @property
    def tokens_per_sec(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return {"rows": self.rows, "new_tokens": self.new_tokens, "seconds": round(self.seconds, 3),
                "tokens_per_sec": round(self.tokens_per_sec, 1), "batch_size": self.batch_size, "engine": self.engine,
                **({"peak_gpu_memory_gib": round(self.peak_gpu_memory_gib, 2)}
                   if self.peak_gpu_memory_gib is not None else {})}


def resolve_engine(engine: GenerationEngine, backend_name: str) -> str:
    """``compiled`` or ``eager`` for ``engine`` on this machine with this backend."""
    if engine == "auto":
        return "eager"
    if engine == "compiled" and backend_name != "hf":
        raise UserError(f"model.generation_engine 'compiled' needs model.backend 'hf' ({backend_name} generates "
                        "with its own kernels); use 'auto' or 'eager'")
    return engine


@contextlib.contextmanager
def grouped_decode_attention(model) -> Iterator[None]:
    """Within: the model attends with :func:`.attention.gqa_decode_attention` (restored after)."""
    from .attention import register

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    before = base.config._attn_implementation
    base.set_attn_implementation(register())
    try:
        yield
    finally:
        base.set_attn_implementation(before)


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def generate_replies(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    decoding: Decoding,
    batch_size: int,
    stop_ids: Sequence[int],
    desc: str = "generating",
    progress: bool = True,
    on_oom: Optional[Callable[[int], None]] = None,
    engine: str = "eager",
) -> tuple[list[str], GenerationStats]:
    """Replies to tokenised ``prompts`` (lists of ids ending in the assistant header), in input order.

    The model must already be in inference mode (and, for the ``compiled`` engine, within
    :func:`grouped_decode_attention`). ``stats.batch_size`` is the size that fitted (smaller than
    ``batch_size`` after an out-of-memory retry).
    """
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    stop = torch.tensor(list(stop_ids), device=device)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    replies: list[str] = [""] * len(prompts)
    stats = GenerationStats(rows=len(prompts), batch_size=max(1, batch_size), engine=engine)
    cache: dict = {}
    if engine == "compiled" and prompts:
        longest = max(len(p) for p in prompts) + decoding.max_new_tokens
        cache = {"cache_implementation": "static", "max_cache_len": -(-longest // CACHE_BUCKET) * CACHE_BUCKET}
    if decoding.temperature > 0:
        torch.manual_seed(decoding.seed)
    bar = tqdm(total=len(prompts), desc=desc, unit="row", disable=not progress or not prompts,
               file=sys.stderr, leave=False)
    start = 0
    while start < len(order):
        chunk = order[start:start + stats.batch_size]
        width = len(prompts[chunk[0]])
        # A static cache keeps its shape when the last batch is as wide as the others (extra rows repeat one).
        rows = chunk + chunk[-1:] * (stats.batch_size - len(chunk)) if cache else chunk
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            n = len(prompts[i])
            ids[r, width - n:] = torch.as_tensor(prompts[i], dtype=torch.long)
            mask[r, width - n:] = 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        try:
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), eos_token_id=list(stop_ids),
                                 pad_token_id=pad, use_cache=True, **decoding.generate_kwargs(), **cache)
        except Exception as exc:  # noqa: BLE001 - only out-of-memory is retried
            if not _is_oom(exc) or stats.batch_size == 1:
                raise
            stats.batch_size //= 2
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if on_oom is not None:
                on_oom(stats.batch_size)
            continue
        new = out[: len(chunk), width:]
        # A row's reply ends at (and includes) its first stop token; later positions are padding.
        ended = torch.isin(new, stop)
        up_to_stop = (ended.cumsum(1) - ended.long()) == 0
        lengths = (up_to_stop & (new != pad)).sum(1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stats.seconds += time.perf_counter() - t0
        stats.new_tokens += int(lengths.sum())
        texts = tokenizer.batch_decode(new, skip_special_tokens=True)
        for i, text in zip(chunk, texts):
            replies[i] = text.strip()
        start += len(chunk)
        bar.update(len(chunk))
        bar.set_postfix_str(f"{stats.tokens_per_sec:,.0f} new tok/s, batch {stats.batch_size}, {engine}")
    bar.close()
    if device.type == "cuda":  # the process's peak so far, generation included
        stats.peak_gpu_memory_gib = torch.cuda.max_memory_allocated(device) / 2**30
    return replies, stats


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)  # standard output carries replies (chat) or JSON (benchmark)


class Generator:
    """Replies of a loaded LoRA model, for evaluation and chat.

    Each call runs in the backend's inference mode (Unsloth's fast path) and restores training mode
    with the planned checkpointing split after. The CUDA cache is emptied before (training's cached
    activation blocks go back before the KV cache is built, not at the first allocation that fails at
    the fit's allocator cap) and after. A batch size halved on out-of-memory is kept for the rest of
    the run: every validation would otherwise run out of memory again first.
    """

    def __init__(self, model, tokenizer, backend, decoding: Decoding, batch_size: int,
                 report: Callable[[str], None] = _to_stderr, engine: GenerationEngine = "auto") -> None:
        from .tokenizer import stop_token_ids

        self.model, self.tokenizer, self.backend = model, tokenizer, backend
        self.decoding = decoding
        self.batch_size = batch_size
        self.engine = resolve_engine(engine, backend.name)
        self.report = report
        self.stop_ids = stop_token_ids(tokenizer)

    def generate(self, prompts: Sequence[Sequence[int]], desc: str = "generating", progress: bool = True,
                 decoding: Optional[Decoding] = None) -> tuple[list[str], GenerationStats]:
        """Replies (in input order) and :class:`GenerationStats` for tokenised generation prompts."""
        was_training = self.model.training
        self.backend.for_inference(self.model)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

        def smaller(batch_size: int) -> None:
            self.batch_size = batch_size
            self.report(f"{desc}: out of GPU memory, batch size now {batch_size} for the rest of this run")

        attention = grouped_decode_attention(self.model) if self.engine == "compiled" else contextlib.nullcontext()
        try:
            with attention:
                return generate_replies(self.model, self.tokenizer, prompts, decoding or self.decoding,
                                        self.batch_size, self.stop_ids, desc=desc, progress=progress, on_oom=smaller,
                                        engine=self.engine)
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if was_training:
                self.backend.for_training(self.model)

