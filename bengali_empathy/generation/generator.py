"""Reply generation: batched for evaluation (length-sorted batches of their own size), and chat.

Decoding one step costs about the same at batch 8 as at batch 128 on a GPU
(reading the 4-bit weights dominates), so evaluation generates in batches much
larger than the loss batches: prompts are sorted by length (longest first, so a
batch that does not fit shows up at once), left-padded per batch, every row
stops at ``<|eot_id|>``, and the replies come back in input order. A batch that
runs out of GPU memory is retried at half the size.

The decoding itself is an engine's (:mod:`.engines`, ``model.generation.engine``: ``eager``, ``static``
or ``compiled``; ``auto`` is ``compiled`` on CUDA with the ``hf`` backend, else ``eager``; a model that is
not a Llama decodes eagerly), the same engines that chat decodes with.

Where the memory allows, validate/test/predict generate on a merged 16-bit copy of the model
(:mod:`.merged`, ``model.generation.weights``); :func:`plan_generation` decides, and checks that the
KV cache of one row and the prefill fit before anything runs.

:class:`Generator` is that for a loaded model (mode switches, cache and batch size kept across
calls); conversations (chat, the web page) are :mod:`.chat`'s.
"""
from __future__ import annotations

import gc
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Literal, Optional, Sequence

import torch

from .decoder import PREFILL_TOKENS, cache_slots
from .decoding import Decoding
from .engines import Engine, GenerationEngine, engine_for, make_engine, resolve_engine
from ..errors import UserError
from ..models.gpu import head_dim, synchronized_time
from ..models.memory import MemoryBudget, resolve_budget_gib

GenerationWeights = Literal["auto", "merged", "adapter"]


@dataclass
class GenerationStats:
    rows: int = 0
    new_tokens: int = 0
    seconds: float = 0.0
    batch_size: int = 0
    peak_gpu_memory_gib: Optional[float] = None
    engine: str = "eager"
    prefill_seconds: float = 0.0  # of ``seconds``, the sliced prefill of the static and compiled engines
    batches: list = field(default_factory=list)  # the compiled engine's profile of each batch (decoder.py)
    weights: str = "adapter"  # or "merged": see :mod:`.merged`
    merge_seconds: float = 0.0  # of ``seconds``, building the merged copy

    @property
    def capture_seconds(self) -> float:
        """Of ``seconds``, recording the compiled engine's CUDA graphs."""
        return sum(b["capture_s"] for b in self.batches)

    @property
    def decode_steps(self) -> int:
        """The compiled engine's decoding steps, of every batch."""
        return sum(b["steps"] for b in self.batches)

    @property
    def tokens_per_sec(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return {"rows": self.rows, "new_tokens": self.new_tokens, "seconds": round(self.seconds, 3),
                "tokens_per_sec": round(self.tokens_per_sec, 1), "batch_size": self.batch_size, "engine": self.engine,
                "weights": self.weights,
                **({"merge_seconds": round(self.merge_seconds, 3)} if self.weights == "merged" else {}),
                **({"prefill_seconds": round(self.prefill_seconds, 3)} if self.engine != "eager" else {}),
                **({"capture_seconds": round(self.capture_seconds, 3), "decode_steps": self.decode_steps,
                    "batches": [{k: round(v, 3) if isinstance(v, float) else v for k, v in b.items()}
                                for b in self.batches]} if self.engine == "compiled" else {}),
                **({"peak_gpu_memory_gib": round(self.peak_gpu_memory_gib, 2)}
                   if self.peak_gpu_memory_gib is not None else {})}


def kv_bytes_per_token(config, dtype_bytes: int = 2) -> int:
    """Bytes of keys and values one token takes in the KV cache of every layer."""
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim(config) * dtype_bytes


def prefill_bytes(config, longest: int, tokens: int = PREFILL_TOKENS) -> int:
    """Activations of one prefill slice of ``tokens`` tokens (MLP, and SDPA's attention scores, which the
    padding mask makes it materialise) with prompts of up to ``longest`` tokens."""
    return tokens * ((3 * config.intermediate_size + 4 * config.hidden_size) * 2
                     + config.num_attention_heads * longest * 4)


# The merged copy is worth this small a batch: a 4-bit step dequantises every weight (on an H200 17-19 ms a
# step at 8-24 rows; 41 ms against the copy's 30 at 256 rows of up to 1,966 prompt tokens).
MERGED_MIN_ROWS = 32


@dataclass(frozen=True)
class GenerationPlan:
    """Which weights generate (a merged 16-bit copy or the model with its adapter), how many rows a batch
    holds at most, how many KV-cache slots (tokens) a batch may fill (rows x its cache length; None:
    not limited) and how many prompt tokens a prefill slice takes."""

    merged: bool
    batch_size: int
    kv_slots: Optional[int] = None
    prefill_tokens: Optional[int] = None  # None: PREFILL_TOKENS

    def describe(self, engine: str) -> str:
        weights = "merged 16-bit copy (LoRA folded into the dequantised base)" if self.merged else "adapter model"
        room = f", a KV cache of {self.kv_slots:,} tokens a batch" if self.kv_slots is not None else ""
        return f"{weights}, {engine} engine, batches of up to {self.batch_size} rows{room}"


def plan_generation(config, longest: int, max_new_tokens: int, batch_size: int, free_bytes: Optional[int],
                    merged_bytes: int, merge: Optional[bool], adapter_bytes: int = 0) -> GenerationPlan:
    """The plan for prompts of up to ``longest`` tokens given ``free_bytes`` of GPU memory (None: not on a
    GPU, nothing checked). ``merge``: True = merged copy, False = never, None = merged where the copy
    leaves room for ``MERGED_MIN_ROWS`` rows (or ``batch_size``, if fewer) of the longest prompt; the
    adapter model needs ``adapter_bytes`` beside its own (:func:`.merged.compute_dtype_bytes`). A
    prefill slice takes at most a quarter of the memory left (16,384 tokens down to 2,048). The KV cache
    of prompt + reply must fit for one row of the longest prompt at least."""
    if free_bytes is None:
        return GenerationPlan(bool(merge), batch_size)
    per_token, row_slots = kv_bytes_per_token(config), cache_slots(longest, max_new_tokens)

    def layout(free: int) -> tuple[int, int, int]:  # prefill slice tokens, their bytes, KV slots left
        tokens = PREFILL_TOKENS
        while tokens > PREFILL_TOKENS // 8 and prefill_bytes(config, longest, tokens) > free // 4:
            tokens //= 2
        fixed = prefill_bytes(config, longest, tokens)
        return tokens, fixed, max(0, (free - fixed) // per_token)

    if merge is not False:
        tokens, _, slots = layout(free_bytes - merged_bytes)
        if slots >= min(batch_size, MERGED_MIN_ROWS) * row_slots or (merge and slots >= row_slots):
            return GenerationPlan(True, batch_size, int(slots), tokens)
        if merge:
            raise UserError(f"model.generation.weights 'merged' needs {merged_bytes / 2**30:.1f} GiB for the merged "
                            f"copy beside the {free_bytes / 2**30:.1f} GiB free for generation; use 'auto' or 'adapter'")
    tokens, fixed, slots = layout(free_bytes - adapter_bytes)
    if slots < row_slots:
        raise UserError(f"model.decoding.max_new_tokens {max_new_tokens} after prompts of up to {longest} tokens needs "
                        f"{row_slots * per_token / 2**30:.2f} GiB of KV cache per row and {fixed / 2**30:.1f} GiB "
                        f"for the prefill, but {free_bytes / 2**30:.1f} GiB are free for generation: lower "
                        "model.decoding.max_new_tokens or data.max_seq_length, or raise model.memory.budget_gib")
    return GenerationPlan(False, batch_size, int(slots), tokens)


def batch_rows(width: int, max_new_tokens: int, batch_size: int, kv_slots: Optional[int]) -> int:
    """Rows of a batch whose longest prompt has ``width`` tokens: ``batch_size``, or fewer where their KV
    cache would pass ``kv_slots`` (a multiple of 8 from 8 rows up: fewer batch shapes to record)."""
    if kv_slots is None:
        return batch_size
    fit = kv_slots // cache_slots(width, max_new_tokens)
    return max(1, min(batch_size, fit - fit % 8 if fit >= 8 else fit))


def free_generation_bytes(device: torch.device, budget_gib: Optional[float]) -> Optional[int]:
    """GPU memory generation may still take: the budget less what is allocated, else what the card has
    free plus this process's cached blocks (None off the GPU)."""
    if device.type != "cuda":
        return None
    allocated = torch.cuda.memory_allocated(device)
    if budget_gib is not None:
        return int(budget_gib * 2**30) - allocated
    return torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - allocated


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
    engine: str | Engine = "eager",
    kv_slots: Optional[int] = None,
    prefill_tokens: Optional[int] = None,
) -> tuple[list[str], GenerationStats]:
    """Replies to tokenised ``prompts`` (lists of ids ending in the assistant header), in input order.

    The model must already be in inference mode. ``engine``: an :class:`~.engines.Engine` of ``model``,
    within its :meth:`~.engines.Engine.prepared` (:class:`Generator` makes it so), or an engine's name
    (made here, with ``prefill_tokens``). A batch holds ``batch_size`` rows, or fewer where their KV
    cache would pass ``kv_slots`` (:func:`batch_rows`); ``stats.batch_size`` is the largest batch that
    ran (after an out-of-memory retry at half the size, at most that).
    """
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    stop = torch.tensor(list(stop_ids), device=device)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    replies: list[str] = [""] * len(prompts)
    if isinstance(engine, str):
        engine = make_engine(engine, model, stop_ids, pad, prefill_tokens)
    stats = GenerationStats(rows=len(prompts), engine=engine.name)
    cap = max(1, batch_size)
    if decoding.temperature > 0:
        torch.manual_seed(decoding.seed)
    bar = tqdm(total=len(prompts), desc=desc, unit="row", disable=not progress or not prompts,
               file=sys.stderr, leave=False)
    start = 0
    while start < len(order):
        width = len(prompts[order[start]])
        chunk = order[start:start + batch_rows(width, decoding.max_new_tokens, cap, kv_slots)]
        batch = [prompts[i] for i in chunk]
        t0 = synchronized_time(device)
        try:
            new = engine(batch, width, decoding)
        except Exception as exc:  # noqa: BLE001 - only out-of-memory is retried
            if not _is_oom(exc) or len(chunk) == 1:
                raise
            out_of_memory = True
        else:
            out_of_memory = False
        if out_of_memory:  # outside the except block: its traceback no longer holds the failed batch's tensors
            cap = max(1, len(chunk) // 2)
            engine.release()
            if device.type == "cuda":
                gc.collect()
                torch.cuda.empty_cache()
            if on_oom is not None:
                on_oom(cap)
            continue
        stats.batch_size = max(stats.batch_size, len(chunk))
        # A row's reply ends at (and includes) its first stop token; later positions are padding.
        ended = torch.isin(new, stop)
        up_to_stop = (ended.cumsum(1) - ended.long()) == 0
        lengths = (up_to_stop & (new != pad)).sum(1)
        stats.seconds += synchronized_time(device) - t0
        stats.new_tokens += int(lengths.sum())
        texts = tokenizer.batch_decode(new, skip_special_tokens=True)
        for i, text in zip(chunk, texts):
            replies[i] = text.strip()
        start += len(chunk)
        bar.update(len(chunk))
        bar.set_postfix_str(f"{stats.tokens_per_sec:,.0f} new tok/s, batch {len(chunk)}, {engine.name}")
    bar.close()
    stats.batches, stats.prefill_seconds = list(engine.batches), engine.prefill_seconds
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
                 report: Callable[[str], None] = _to_stderr, engine: GenerationEngine = "auto",
                 weights: GenerationWeights = "adapter", memory_budget: MemoryBudget = None) -> None:
        from ..data.tokenizer import stop_token_ids

        self.model, self.tokenizer, self.backend = model, tokenizer, backend
        self.decoding = decoding
        self.batch_size = batch_size
        self.report = report
        self.engine = engine_for(resolve_engine(engine, backend.name), model, report)  # said here, once a run
        # ``auto`` merges on CUDA with the hf backend only: Unsloth patches transformers' Llama classes,
        # which a plain copy would then run through.
        self.merge = {"merged": True, "adapter": False}.get(
            weights, None if backend.name == "hf" and torch.cuda.is_available() else False)
        self.memory_budget = memory_budget  # the run's (model.memory.budget_gib): generation keeps to it too
        generation_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        self.stop_ids = stop_token_ids(tokenizer, generation_eos)
        self.last_plan: Optional[GenerationPlan] = None
        self._merged_bytes: Optional[int] = None

    def plan(self, prompts: Sequence[Sequence[int]], decoding: Decoding, allow_merged: bool) -> GenerationPlan:
        """The weights and batch size this call generates with (see :func:`plan_generation`)."""
        from .merged import compute_dtype_bytes, merged_bytes

        device = next(self.model.parameters()).device
        free = free_generation_bytes(device, resolve_budget_gib(self.memory_budget, device))
        merge = self.merge if allow_merged else False
        if merge is not False and self._merged_bytes is None:  # a model of the config without storage, once
            self._merged_bytes = merged_bytes(self.model)
        adapter_bytes = compute_dtype_bytes(self.model) if self.engine != "eager" else 0
        return plan_generation(self.model.config, max(map(len, prompts)), decoding.max_new_tokens, self.batch_size,
                               free, self._merged_bytes or 0, merge, adapter_bytes)

    def generate(self, prompts: Sequence[Sequence[int]], desc: str = "generating", progress: bool = True,
                 decoding: Optional[Decoding] = None, allow_merged: bool = True) -> tuple[list[str], GenerationStats]:
        """Replies (in input order) and :class:`GenerationStats` for tokenised generation prompts.
        ``allow_merged`` false: never on a merged copy (fit's validations: training holds the memory)."""
        from .merged import merged_copy

        was_training = self.model.training
        decoding = decoding or self.decoding
        self.backend.for_inference(self.model)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

        def smaller(batch_size: int) -> None:
            self.batch_size = batch_size
            self.report(f"{desc}: out of GPU memory, batch size now {batch_size} for the rest of this run")

        plan = self.plan(prompts, decoding, allow_merged) if prompts else GenerationPlan(False, self.batch_size)
        said = self.last_plan and (self.last_plan.merged, self.last_plan.batch_size)
        if (plan.merged or plan.kv_slots is not None) and said != (plan.merged, plan.batch_size):
            self.report(f"{desc}: {plan.describe(self.engine)}")
        self.last_plan = plan
        device = next(self.model.parameters()).device
        start = time.perf_counter()
        model = merged_copy(self.model) if plan.merged else self.model
        merge_seconds = synchronized_time(device) - start  # the copy's kernels are its time, not the first batch's
        engine = make_engine(self.engine, model, self.stop_ids, self.tokenizer.pad_token_id, plan.prefill_tokens)
        try:
            with engine.prepared():
                replies, stats = generate_replies(model, self.tokenizer, prompts, decoding, plan.batch_size,
                                                  self.stop_ids, desc=desc, progress=progress, on_oom=smaller,
                                                  engine=engine, kv_slots=plan.kv_slots)
            if plan.merged:  # the copy is part of what this call's replies cost
                stats.weights, stats.merge_seconds = "merged", merge_seconds
                stats.seconds += merge_seconds
            return replies, stats
        finally:
            del model, engine
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if was_training:
                self.backend.for_training(self.model)

