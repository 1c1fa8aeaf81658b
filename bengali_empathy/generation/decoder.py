"""Decoding from a prefilled static KV cache: the prefill of the ``static`` and ``compiled`` engines, and
the ``compiled`` engine's decoding, one model step per CUDA-graph replay.

:func:`prefill` fills a static cache with every prompt but its last token, in slices of rows of at
most ``PREFILL_TOKENS`` tokens, as if the batch were left-padded (see its docstring).

transformers' ``generate`` launches the 8B model's ~600 kernels of a decoding step one by one from
Python, and checks its stopping criteria on the host every step: on an H200 a step at batch 128-256
took 50-70 ms with the ``static`` engine; replayed as a graph it took 20-34 ms at batch 256 (caches of
768-2,304 slots). Here the step (embedding, every layer, the output head) is recorded once as a CUDA
graph for a batch size and a cache length and replayed with one launch; choosing the next token,
the stop tokens and the padding of finished rows stay in PyTorch outside the graph, and the host
looks at whether every row has stopped only every ``CHECK_EVERY`` steps. The cache length is the
batch's longest prompt plus ``max_new_tokens``, rounded up to ``CACHE_BUCKET``: batches (sorted longest
first) of one bucket share a graph, and a shorter bucket records a new one (a fraction of a second)
rather than attending over the longest batch's cache length. Where the varlen kernel runs, each row's
query reads only its own filled slots (:mod:`..models.varlen`); elsewhere the step attends with the
grouped-query decoding attention of :mod:`..models.attention`, and where a batch's prompts differ much
in length its rows attend in groups that each skip their left padding (:func:`row_groups`). Both the
prefill and the steps run Liger's fused norm, rotary and MLP kernels where they run (:mod:`..models.fused`).
Chat streams each step's token through ``on_step``.

The step computes what ``generate`` computes for left-padded rows (positions counted from the
attention mask, finished rows fed padding), so greedy replies equal the ``eager`` engine's; off the
GPU the same step runs without a graph (that is what the CPU tests compare).
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable, Optional, Sequence

import torch

from ..models.fused import fused_kernels, fuses
from ..models.gpu import head_dim, synchronized_time
from ..models.lora import base_model
from ..models.varlen import (packed_kwargs, packed_through_kernel, token_major, varlen_available,
                             varlen_implementation)

CACHE_BUCKET = 256  # cache lengths are multiples of this: batches of one bucket replay one graph
CHECK_EVERY = 8  # decoding steps between the host's checks whether every row has stopped
ROW_GROUP = 32  # rows of a group that attends from its own first slot (see row_groups)
# A group's first slot is a multiple of this. With every group ROW_GROUP rows and its first slot and the
# attended length both multiples of CACHE_BUCKET, a step's attention calls repeat the shapes of the
# graphs recorded before, whose kernel plans (cuDNN's) are then reused.
GROUP_SLOT = CACHE_BUCKET
PREFILL_TOKENS = 16384  # prompt tokens per prefill forward (padding included)


def left_padded(prompts: Sequence[Sequence[int]], width: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids and attention mask of ``prompts`` left-padded to ``width``."""
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, p in enumerate(prompts):
        if p:
            ids[r, width - len(p):] = torch.as_tensor(p, dtype=torch.long)
            mask[r, width - len(p):] = 1
    return ids, mask


@torch.no_grad()  # the LoRA weights require gradients: no autograd graph of a whole batch's prefill
def prefill(model, cache, prompts: Sequence[Sequence[int]], width: int, pad: int,
            token_budget: Optional[int] = None) -> str:
    """Fill the static ``cache`` with the keys and values of every prompt but its last token, as if the
    batch were left-padded to ``width``; ``generate`` then starts from the last prompt token. Returns how
    the slices ran: ``packed`` or ``padded``.

    ``prompts`` are sorted longest first. They run in slices of rows of at most ``token_budget``
    tokens (default ``PREFILL_TOKENS``, padding included): a long batch's prefill fits (batch 256 of
    600-token prompts is ~150k tokens at once otherwise). Where the varlen attention kernel runs
    (:mod:`..models.varlen`), a slice's prompts are concatenated into one row without padding, each
    attending to itself (:func:`_packed_slice`); elsewhere the slice is padded to its own longest prompt
    (:func:`_padded_slice`).
    A prompt's keys go right-aligned into its row of the cache, where the batch's left padding puts them;
    the padded slots stay masked. Positions are counted as ``generate`` counts them (from the mask).
    """
    token_budget = token_budget or PREFILL_TOKENS
    cache.reset()
    device = next(model.parameters()).device
    packed = packed_through_kernel(model)
    prefix = width - 1
    start = 0
    lengths = [len(p) - 1 for p in prompts]
    while start < len(prompts) and prefix > 0:
        longest = lengths[start]
        part = prompts[start:_slice_end(lengths, start, token_budget, packed)]
        if longest > 0:
            if packed:
                counts = lengths[start:start + len(part)]
                done = _packed_slice(model, part, device)
                rows = torch.repeat_interleave(torch.arange(start, start + len(part)), torch.tensor(counts)).to(device)
                slots = torch.cat([torch.arange(prefix - n, prefix) for n in counts]).to(device)
            else:
                done = _padded_slice(model, part, longest, pad, device)
            for layer, computed in zip(cache.layers, done.layers):
                if not layer.is_initialized:
                    shape = (len(prompts), computed.keys.shape[1], 0, computed.keys.shape[3])
                    layer.lazy_initialization(computed.keys.new_empty(shape), computed.values.new_empty(shape))
                if packed:  # (1, kv heads, tokens, dim) -> each token into its row and slot
                    layer.keys[rows, :, slots] = computed.keys[0].transpose(0, 1)
                    layer.values[rows, :, slots] = computed.values[0].transpose(0, 1)
                else:
                    layer.keys[start:start + len(part), :, prefix - longest:prefix] = computed.keys
                    layer.values[start:start + len(part), :, prefix - longest:prefix] = computed.values
            del done
        start += len(part)
    for layer in cache.layers:
        if layer.is_initialized:
            layer.cumulative_length.fill_(prefix)
    return "packed" if packed else "padded"


def _slice_end(lengths: Sequence[int], start: int, token_budget: int, packed: bool) -> int:
    """The end of the prefill slice that begins at row ``start`` (``lengths`` sorted longest first): as many
    rows as fit in ``token_budget`` tokens, the padding to the slice's longest included where it is padded;
    at least one."""
    if not packed:
        return start + max(1, token_budget // max(lengths[start], 1))
    end, tokens = start + 1, lengths[start]
    while end < len(lengths) and tokens + lengths[end] <= token_budget:
        tokens += lengths[end]
        end += 1
    return end


def _padded_slice(model, part: Sequence[Sequence[int]], longest: int, pad: int, device: torch.device):
    """The keys and values (a ``DynamicCache``) of ``part``'s prompts but their last tokens, left-padded."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers import DynamicCache

    # Not SDPA's cuDNN kernel: on an H200 its first padded-mask prefill of a process took 19.6 s against
    # 7.7 s for the same prompts later (10.3 s against 8.2 s with the other kernels).
    kernels = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    ids, mask = left_padded([p[:-1] for p in part], longest, pad)
    positions = (mask.cumsum(-1) - 1).masked_fill_(mask == 0, 1)
    computed = DynamicCache()
    with sdpa_kernel(kernels), fused_kernels(model):
        base_model(model).get_decoder()(input_ids=ids.to(device), attention_mask=mask.to(device),
                                        position_ids=positions.to(device), past_key_values=computed,
                                        use_cache=True)
    return computed


def _packed_slice(model, part: Sequence[Sequence[int]], device: torch.device):
    """The keys and values (a ``DynamicCache`` of one row) of ``part``'s prompts but their last tokens,
    concatenated without padding: each prompt attends to itself through the varlen kernel."""
    from transformers import DynamicCache

    tokens = [p[:-1] for p in part if len(p) > 1]
    ids = torch.tensor([t for p in tokens for t in p], device=device)[None]
    positions = torch.cat([torch.arange(len(p)) for p in tokens]).to(device)[None]
    computed = DynamicCache()
    with varlen_implementation(model), fused_kernels(model):
        base_model(model).get_decoder()(input_ids=ids, position_ids=positions, past_key_values=computed,
                                        use_cache=True, **packed_kwargs(positions))
    return computed


def cache_slots(width: int, max_new_tokens: int) -> int:
    """KV-cache slots of a batch whose longest prompt has ``width`` tokens: prompt and reply, in buckets."""
    return -(-(width + max_new_tokens) // CACHE_BUCKET) * CACHE_BUCKET


def row_groups(lengths: Sequence[int], width: int) -> tuple[tuple[int, int], ...]:
    """``((first_row, first_slot), ...)`` for :func:`.attention.gqa_decode_attention`: groups of ``ROW_GROUP``
    rows of a batch left-padded to ``width`` (``lengths`` sorted longest first) that attend from their
    longest row's first slot, rounded down to ``GROUP_SLOT``; ``((0, 0),)`` (one group) where that would
    leave more than seven eighths of the padded reads (another graph to record would cost more)."""
    groups = tuple((first, (width - lengths[first]) // GROUP_SLOT * GROUP_SLOT)
                   for first in range(0, len(lengths), ROW_GROUP))
    skipped = sum(slot * len(lengths[first:first + ROW_GROUP]) for first, slot in groups)
    return groups if skipped * 8 >= len(lengths) * width else ((0, 0),)


class RotaryTable(torch.nn.Module):
    """The model's rotary embedding looked up from a table computed before recording: transformers computes
    it from the position ids, which a graph can record, but Unsloth's replacement (which it installs for
    every Llama built after it loaded, merged copies included) reads the largest position on the host,
    which a recording cannot."""

    def __init__(self, rotary: torch.nn.Module, positions: int, device: torch.device) -> None:
        super().__init__()
        x = torch.zeros(1, 1, device=device)  # fp32: the table in the precision the embedding computes in
        self.cos, self.sin = (t[0] for t in rotary(x, position_ids=torch.arange(positions, device=device)[None]))

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[position_ids].to(x.dtype), self.sin[position_ids].to(x.dtype)


class DecodeStep:
    """One decoding step of ``model`` for ``rows`` rows and a static cache of ``cache_len`` slots.

    Its inputs are fixed tensors written in place (``input_ids``, ``position_ids``, and either the varlen
    segments or a boolean ``mask`` over the cache's slots). Where the varlen kernel decodes
    (:mod:`..models.varlen`), the cache is token-major and each row's query reads only the slots from its
    first prompt token to its newest token: one graph for every step. Elsewhere a step attends to the
    cache's first slots that can hold tokens yet, rounded up to ``CACHE_BUCKET`` (a 2,048-token reply
    does not pay for its end while it begins), in the batch's :func:`row_groups` (new groups: new
    graphs); on CUDA each of those lengths is a graph, recorded when decoding first reaches it.
    """

    def __init__(self, model, rows: int, cache_len: int) -> None:
        from transformers import StaticCache

        config = model.config
        device = next(model.parameters()).device
        dtype = model.get_input_embeddings().weight.dtype
        self.model, self.rows, self.cache_len = model, rows, cache_len
        self.cache = StaticCache(config=config, max_cache_len=cache_len)
        self.cache.early_initialization(rows, config.num_key_value_heads, head_dim(config), dtype, device)
        self.varlen = varlen_available(device, dtype, decoding=True)
        if self.varlen:
            token_major(self.cache)
            self.first_slot = torch.zeros(rows, dtype=torch.int32, device=device)  # each row's first prompt slot
            self.segments = {"cu_seq_lens_q": torch.arange(rows + 1, dtype=torch.int32, device=device),
                             "cu_seq_lens_k": torch.zeros(rows + 1, dtype=torch.int32, device=device),
                             "max_length_q": 1, "max_length_k": cache_len,
                             "seqused_k": torch.zeros(rows, dtype=torch.int32, device=device)}
        else:
            self.mask = torch.zeros((rows, 1, 1, cache_len), dtype=torch.bool, device=device)
        self.input_ids = torch.zeros((rows, 1), dtype=torch.long, device=device)
        self.position_ids = torch.zeros((rows, 1), dtype=torch.long, device=device)
        self.graphed = device.type == "cuda"
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # attended slots -> graph, logits
        self.capture_seconds = 0.0
        self.row_groups: tuple[tuple[int, int], ...] = ((0, 0),)
        self.decoder = base_model(model).get_decoder()
        self.rotary = self.decoder.rotary_emb
        self.rotary_table = RotaryTable(self.rotary, cache_len + 1, device)

    def use_row_groups(self, groups: tuple[tuple[int, int], ...]) -> None:
        """Attend in ``groups`` (:func:`row_groups`) from now on; the graphs of other groups are dropped.
        A varlen step has no groups: each row reads its own slots."""
        if groups != self.row_groups and not self.varlen:
            self.graphs.clear()
            self.row_groups = groups

    def begin(self, ids: torch.Tensor, mask: torch.Tensor) -> None:
        """Set the inputs for a batch's first step: ``ids`` and ``mask`` (rows, width) left-padded prompts
        whose all but last tokens are in the cache; the step feeds each row's last token."""
        width = ids.shape[1]
        self.input_ids.copy_(ids[:, -1:])
        self.position_ids.copy_(mask.sum(1, keepdim=True) - 1)
        if self.varlen:
            self.first_slot.copy_(width - mask.sum(1))
            starts = torch.arange(self.rows + 1, device=self.first_slot.device) * self.cache_len
            starts[:-1] += self.first_slot
            self.segments["cu_seq_lens_k"].copy_(starts)
        else:
            self.mask.zero_()
            self.mask[:, 0, 0, :width] = mask.bool()

    def advance(self, chosen: torch.Tensor, slot: int) -> None:
        """Set the inputs for the next step: ``chosen`` (one token per row) goes into cache ``slot``."""
        self.input_ids.copy_(chosen[:, None])
        self.position_ids.add_(1)
        if not self.varlen:  # the varlen segments count the new slot from ``filled`` at the next call
            self.mask[:, 0, 0, slot] = True

    def attended(self, filled: int) -> int:
        """Cache slots a step attends to where ``filled`` slots hold tokens (a graph for each such length)."""
        if self.varlen:
            return self.cache_len  # the kernel reads each row's filled slots of the whole cache
        return min(self.cache_len, -(-filled // CACHE_BUCKET) * CACHE_BUCKET)

    def _forward(self, attended: int) -> torch.Tensor:
        if self.varlen:
            attention, attends = varlen_implementation(self.model), self.segments
        else:
            attention = contextlib.nullcontext()
            attends = {"attention_mask": self.mask[..., :attended], "row_groups": self.row_groups}
        self.decoder.rotary_emb = self.rotary_table
        try:
            with fused_kernels(self.model), attention:
                out = self.model(input_ids=self.input_ids, position_ids=self.position_ids, past_key_values=self.cache,
                                 use_cache=True, logits_to_keep=1, **attends)
        finally:
            self.decoder.rotary_emb = self.rotary
        return out.logits[:, -1]

    @torch.no_grad()
    def _record(self, attended: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """A graph of the step attending to ``attended`` slots, recorded mid-decoding: the warm-up forward
        writes this step's own keys and values and advances the cache, which is set back after."""
        start = time.perf_counter()
        written = [layer.cumulative_length.clone() for layer in self.cache.layers]
        # A caller's autocast would keep weight casts made in the recording in its cache, which frees them
        # when it closes while the graph still uses their memory: record with the same autocast, uncached.
        autocast = torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"),
                                  enabled=torch.is_autocast_enabled("cuda"), cache_enabled=False)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), autocast:  # kernels pick their algorithms and workspaces before the recording
            for _ in range(1 if self.graphs else 2):
                self._forward(attended)
        torch.cuda.current_stream().wait_stream(side)
        pool = next(iter(self.graphs.values()))[0].pool() if self.graphs else None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool), autocast:  # the graphs of one step never run at once: one pool
            logits = self._forward(attended)
        for layer, length in zip(self.cache.layers, written):
            layer.cumulative_length.copy_(length)
        self.capture_seconds += synchronized_time(self.input_ids.device) - start
        return graph, logits

    def __call__(self, filled: int) -> torch.Tensor:
        """The next-token logits (rows, vocabulary) of the tokens in ``input_ids``, written into the cache,
        where ``filled`` slots (this step's own included) hold tokens."""
        attended = self.attended(filled)
        if self.varlen:
            torch.sub(filled, self.first_slot, out=self.segments["seqused_k"])  # this step's own slot included
        if not self.graphed:
            return self._forward(attended)
        if attended not in self.graphs:
            self.graphs[attended] = self._record(attended)
        graph, logits = self.graphs[attended]
        graph.replay()
        return logits


class GraphDecoder:
    """Replies to batches of prompts with :class:`DecodeStep`: the ``compiled`` engine of :mod:`.engines`.

    Keeps the step of the last batch shape (rows, cache bucket) and records a new one when it changes.
    """

    def __init__(self, model, decoding, stop_ids: Sequence[int], pad: int,
                 prefill_tokens: Optional[int] = None) -> None:
        self.model, self.decoding, self.pad, self.prefill_tokens = model, decoding, pad, prefill_tokens
        self.device = next(model.parameters()).device
        self.stop = torch.tensor(list(stop_ids), device=self.device)
        self.processors = decoding.logits_processors()
        self.step: Optional[DecodeStep] = None
        self.batches: list[dict] = []  # per batch: rows, width, cache length, prefill kind and prompt tokens,
        # decoding attention, elementwise kernels (models/fused.py), prefill/capture/decode seconds, steps

    def release(self) -> None:
        """Drop the recorded step and its cache (before a retry at a smaller batch)."""
        self.step = None

    def use_decoding(self, decoding) -> None:
        """Decode with ``decoding`` from the next call on (a chat's settings per reply)."""
        self.decoding, self.processors = decoding, decoding.logits_processors()

    def _step_for(self, rows: int, width: int) -> DecodeStep:
        cache_len = cache_slots(width, self.decoding.max_new_tokens)
        if self.step is None or (self.step.rows, self.step.cache_len) != (rows, cache_len):
            self.step = None  # its cache and graph memory go before the next ones are allocated
            self.step = DecodeStep(self.model, rows, cache_len)
        return self.step

    @torch.no_grad()
    def __call__(self, prompts: Sequence[Sequence[int]], width: int,
                 on_step: Optional[Callable[[torch.Tensor], bool]] = None) -> torch.Tensor:
        """The new tokens (rows, ``max_new_tokens``) for ``prompts`` (sorted longest first, ``width`` the
        longest): each row's reply up to and including its stop token, padding after.

        ``on_step`` (a streamed reply) sees each step's tokens, one per row, and ends decoding by
        returning True; with it the host checks for stopped rows after every step."""
        step = self._step_for(len(prompts), width)
        step.use_row_groups(row_groups([len(p) for p in prompts], width))
        t0 = time.perf_counter()
        kind = prefill(self.model, step.cache, prompts, width, self.pad, self.prefill_tokens)
        ids, mask = left_padded(prompts, width, self.pad)
        ids, mask = ids.to(self.device), mask.to(self.device)
        step.begin(ids, mask)
        prefilled = synchronized_time(self.device)
        new_tokens = self.decoding.max_new_tokens
        sequences = torch.cat([ids, ids.new_full((len(prompts), new_tokens), self.pad)], 1)
        done = torch.zeros(len(prompts), dtype=torch.bool, device=self.device)
        captured = step.capture_seconds
        check_every = 1 if on_step is not None else CHECK_EVERY
        for k in range(new_tokens):
            logits = step(width + k)
            chosen = self._choose(sequences[:, :width + k], logits)
            chosen = chosen.masked_fill(done, self.pad)
            sequences[:, width + k] = chosen
            done |= torch.isin(chosen, self.stop)
            ended = on_step is not None and on_step(chosen)
            if ended or k + 1 == new_tokens or ((k + 1) % check_every == 0 and bool(done.all())):
                break
            step.advance(chosen, width + k)
        capture = step.capture_seconds - captured
        self.batches.append({"rows": len(prompts), "width": width, "cache": step.cache_len, "prefill": kind,
                             "decode": "varlen" if step.varlen else "row groups",
                             "kernels": "fused" if fuses(self.model) else "eager",
                             "prompt_tokens": sum(len(p) - 1 for p in prompts),
                             "prefill_s": prefilled - t0, "capture_s": capture,
                             "decode_s": synchronized_time(self.device) - prefilled - capture, "steps": k + 1})
        return sequences[:, width:]

    def _choose(self, so_far: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if self.processors is None:
            return logits.argmax(-1)
        scores = self.processors(so_far, logits.float())
        if self.decoding.temperature > 0:
            return torch.multinomial(torch.softmax(scores, -1), 1)[:, 0]
        return scores.argmax(-1)
