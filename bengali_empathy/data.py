"""Conversations -> tokens: Llama-3 chat formatting, reply-only labels, length policy, packing, batching.

The corpus module turns rows into conversations; this module owns everything after:

* :class:`ChatEncoder` renders the Llama-3.1 chat format turn by turn, so the
  span of every assistant reply is known without re-tokenising (the result is
  checked against the tokenizer's own ``apply_chat_template``);
* :class:`RowEncoder` is the ``datasets.map`` transform: row -> conversation ->
  ids + label spans + the split, with ``on_too_long`` applied and every dropped or
  truncated row kept as a status (so it is counted, never silent);
* packing concatenates training conversations with restarting position ids;
* :class:`Collator` builds labels (``-100`` outside the replies) and the left-padded
  generation prompts;
* :class:`EmpatheticDialogueDataModule` wires it to Lightning: in memory (HF Arrow
  cache: a second run starts from the cache) or streamed (shuffle buffer that
  changes every epoch, sharded per rank), with resumable loaders.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import unicodedata
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator, Literal, Optional

import lightning as L
import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset

from .corpus import (
    DEFAULT_SYSTEM_PROMPT, SPLITS, Conversation, CorpusFormat, bundled_corpus_path, corpus_files, diagnose, load_file,
    split_of,
)
from .errors import UserError

IGNORE_INDEX = -100
# Bump when the encoded columns change, so old Arrow caches are not reused.
ENCODING_VERSION = 3

OnTooLong = Literal["error", "drop", "truncate", "truncate_history"]
TrainOn = Literal["all_assistant", "last_assistant"]
Split = Literal["train", "val", "test"]
KEPT = ("ok", "truncated")


# --------------------------------------------------------------------------- chat format


class ChatEncoder:
    """The Llama-3.1 chat format as token ids, assembled turn by turn.

    ``<|begin_of_text|>`` + system header + the template's preamble (Llama 3.1's
    knowledge-cutoff lines) + system text + ``<|eot_id|>``, then for every turn its
    role header, its text and ``<|eot_id|>``. Texts are tokenised on their own
    (pre-tokenisation never merges across the header's ``\\n\\n``), so the spans of
    the replies fall out of the assembly; :meth:`check` compares the result with
    ``tokenizer.apply_chat_template`` on real rows.
    """

    def __init__(self, tokenizer) -> None:
        from .tokenizer import end_of_turn_id

        self.tokenizer = tokenizer
        self.eot = end_of_turn_id(tokenizer)
        marker = "\x07"
        head = "<|start_header_id|>system<|end_header_id|>\n\n"
        text = tokenizer.apply_chat_template([{"role": "system", "content": marker}], tokenize=False)
        if not isinstance(text, str) or head not in text or marker not in text:
            raise UserError("the tokenizer's chat template is not the Llama-3 format (no system header)")
        before = text.split(marker, 1)[0]
        prefix, preamble = before.split(head, 1)
        self.prefix = self._ids(prefix)
        self.system_header = self._ids(head + preamble)
        self.headers = {r: self._ids(f"<|start_header_id|>{r}<|end_header_id|>\n\n") for r in ("user", "assistant")}

        from .tokenizer import llama3_tiktoken

        self.fast = llama3_tiktoken(tokenizer)
        self._memo: dict[str, list[int]] = {}

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids of many texts (tiktoken when the tokenizer is Llama-3's BPE, else the fast tokenizer's batch).

        Text that spells a special token (``<|...|>``) goes through the tokenizer, which
        parses it as the special token exactly as ``apply_chat_template`` does. Texts
        given to :meth:`remember` (the default system prompt most rows share) are memoised.
        """
        out: list = [None] * len(texts)
        slow = []
        for i, t in enumerate(texts):
            if t in self._memo:
                out[i] = self._memo[t]
            elif self.fast is not None and "<|" not in t:
                out[i] = self.fast.encode_ordinary(t)
            else:
                slow.append(i)
        if slow:
            for i, ids in zip(slow, self.tokenizer([texts[i] for i in slow], add_special_tokens=False)["input_ids"]):
                out[i] = list(ids)
        return out

    def remember(self, text: str) -> None:
        """Keep the ids of a text that starts most conversations (the default system prompt)."""
        self._memo[text] = self.tokenize([text])[0]

    def assemble(self, system_ids: list[int], turns: list[tuple[str, list[int]]],
                 generation_prompt: bool = False) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids of a conversation and the ``(start, end)`` span of every assistant reply (its ``<|eot_id|>`` included)."""
        ids = self.prefix + self.system_header + system_ids + [self.eot]
        spans = []
        for role, t in turns:
            ids += self.headers[role]
            start = len(ids)
            ids += t + [self.eot]
            if role == "assistant":
                spans.append((start, len(ids)))
        if generation_prompt:
            ids += self.headers["assistant"]
        return ids, spans

    def prompt_ids(self, system: str, turns: list[dict]) -> list[int]:
        """Generation prompt for a chat: the turns so far and an open assistant header."""
        texts = self.tokenize([system] + [t["content"] for t in turns])
        return self.assemble(texts[0] if system else [], [(t["role"], x) for t, x in zip(turns, texts[1:])],
                             generation_prompt=True)[0]

    def check(self, system: str, turns: list[dict], where: str) -> None:
        """Fail unless the assembly equals the tokenizer's own chat template for this conversation."""
        ours = self.prompt_ids(system, turns)[: -len(self.headers["assistant"])]
        msgs = [{"role": "system", "content": system}] + turns
        ref = self.tokenizer.apply_chat_template(msgs, tokenize=True)
        ref = list(ref["input_ids"] if hasattr(ref, "keys") else ref)
        if ours != ref:
            k = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), min(len(ours), len(ref)))
            raise UserError(f"{where}: the tokenizer's chat template differs from the Llama-3 format at token {k}; "
                            "this package formats Llama-3 chat only")

    def cache_key(self) -> str:
        probe = self._ids("আমি আজ খুব একা বোধ করছি। Hello 123\n")
        return json.dumps([len(self.tokenizer), self.prefix, self.system_header, self.headers, self.eot, probe])


# --------------------------------------------------------------------------- rows -> tokens


@dataclass(frozen=True)
class EncodeOptions:
    system_prompt: str
    max_seq_length: int
    on_too_long: str
    train_on: str
    val_fraction: float
    test_fraction: float
    seed: int


ENCODED_COLUMNS = ("input_ids", "label_spans", "prompt_len", "n_tokens", "raw_tokens", "reply_tokens", "status",
                   "n_turns", "id", "group", "split", "row", "prompt", "reference", "category", "dedup_key",
                   "reference_in_prompt")
# A final reply this short ("ঠিক আছে।") may well have been said earlier in a conversation without
# any leak; a longer one found in the conversation before it would be an echo to copy.
ECHO_MIN_WORDS = 4


def conversation_key(system: str, turns: list[dict]) -> str:
    """Duplicate key: the conversation's texts after NFC and white-space normalisation."""
    norm = lambda t: " ".join(unicodedata.normalize("NFC", t).split())  # noqa: E731
    text = "\x1e".join([norm(system)] + [f"{t['role']}\x1f{norm(t['content'])}" for t in turns])
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def reference_in_prompt(system: str, turns: list[dict]) -> bool:
    """Whether the final reply (of at least ``ECHO_MIN_WORDS`` words) occurs in the text before it."""
    from .metrics import normalize_bn

    reference = normalize_bn(turns[-1]["content"])
    if len(reference.split()) < ECHO_MIN_WORDS:
        return False
    before = normalize_bn(" ".join([system] + [t["content"] for t in turns[:-1]]))
    return f" {reference} " in f" {before} "


class RowEncoder:
    """``datasets.map`` transform of one corpus file: rows -> conversations -> token ids and label spans.

    Output columns: ``input_ids``; ``label_spans`` (flat ``[start, end, ...]`` of the
    trained replies); ``prompt_len`` (generation prompt = ``input_ids[:prompt_len]``,
    ending in the final reply's header); lengths; ``status`` (``ok``, ``truncated``,
    ``too_long`` or ``empty``, the last two dropped later but counted); the split;
    and ``id/group/row/prompt/reference/category`` for evaluation and error messages.
    """

    def __init__(self, fmt: CorpusFormat, chat: ChatEncoder, opts: EncodeOptions, file: str) -> None:
        self.fmt, self.chat, self.opts, self.file = fmt, chat, opts, file
        chat.remember(opts.system_prompt)

    def _conversations(self, batch: dict, rows: list[int]) -> list[Optional[Conversation]]:
        keys = list(batch)
        return [self.fmt.conversation({k: batch[k][i] for k in keys}, f"{self.file}: row {r}")
                for i, r in enumerate(rows)]

    def assign(self, batch: dict, indices: list[int]) -> dict:
        """Row numbers and splits only (cheap: streaming filters a split before tokenising)."""
        rows = [i + 1 for i in indices]
        convs = self._conversations(batch, rows)
        o = self.opts
        return {"row": rows, "split": [split_of(c.group if c else f"{self.file}\x00{r}", o.val_fraction,
                                                o.test_fraction, o.seed) for c, r in zip(convs, rows)]}

    def encode_with_split(self, batch: dict, indices: list[int]) -> dict:
        return self.encode({**batch, **self.assign(batch, indices)})

    def encode(self, batch: dict) -> dict:
        rows = batch["row"]
        convs = self._conversations({k: v for k, v in batch.items() if k not in ("row", "split")}, rows)
        texts = []
        for c in convs:
            if c is None:
                continue
            texts.append(self.opts.system_prompt if c.system is None else c.system)
            texts += [t["content"] for t in c.turns]
        ids = iter(self.chat.tokenize(texts))
        out = {k: [] for k in ENCODED_COLUMNS}
        for j, c in enumerate(convs):
            where = f"{self.file}: row {rows[j]}"
            if c is None:
                self._append(out, "empty", [], [], 0, 0, 0, where, j, batch, None)
                continue
            system_ids = next(ids)
            turns = [(t["role"], next(ids)) for t in c.turns]
            self._encode_one(out, system_ids, turns, c, where, j, batch)
        return out

    def _encode_one(self, out, system_ids, turns, c: Conversation, where, j, batch) -> None:
        o, chat = self.opts, self.chat
        limit = o.max_seq_length
        full, spans = chat.assemble(system_ids, turns)
        raw = len(full)
        status = "ok"
        if raw > limit:
            if o.on_too_long == "error":
                raise UserError(f"{where}: conversation is {raw} tokens, longer than max_seq_length={limit} (raise "
                                "data.max_seq_length or set data.on_too_long to drop, truncate or truncate_history)")
            if o.on_too_long == "drop":
                self._append(out, "too_long", [], [], 0, raw, len(turns), where, j, batch, c)
                return
            status = "truncated"
            if o.on_too_long == "truncate_history":
                last_user = max((k for k, (r, _) in enumerate(turns) if r == "user"), default=0)
                while len(full) > limit and last_user > 0:
                    drop = 2 if turns[0][0] == "user" and turns[1][0] == "assistant" and last_user >= 2 else 1
                    turns, last_user = turns[drop:], last_user - drop
                    full, spans = chat.assemble(system_ids, turns)
            full = full[:limit]
        if spans[-1][0] >= len(full):  # not one token of the final reply fits
            self._append(out, "too_long", [], [], 0, raw, len(turns), where, j, batch, c)
            return
        if o.train_on == "last_assistant":
            spans = spans[-1:]
        spans = [(s, min(e, len(full))) for s, e in spans if s < len(full)]
        self._append(out, status, full, spans, spans[-1][0], raw, len(turns), where, j, batch, c)

    @staticmethod
    def _append(out, status, ids, spans, prompt_len, raw, n_turns, where, j, batch, c) -> None:
        out["input_ids"].append(ids)
        out["label_spans"].append([x for s in spans for x in s])
        out["prompt_len"].append(prompt_len)
        out["n_tokens"].append(len(ids))
        out["raw_tokens"].append(raw)
        out["reply_tokens"].append(sum(e - s for s, e in spans))
        out["status"].append(status)
        out["n_turns"].append(n_turns)
        out["id"].append(c.id if c else where)
        out["group"].append(c.group if c else where)
        out["split"].append(batch["split"][j])
        out["row"].append(where)
        users = [t["content"] for t in c.turns if t["role"] == "user"] if c else []
        out["prompt"].append(users[-1] if users else "")
        out["reference"].append(c.turns[-1]["content"] if c else "")
        out["category"].append(c.category if c else None)
        out["dedup_key"].append(conversation_key(c.system or "", c.turns) if c else "")
        out["reference_in_prompt"].append(reference_in_prompt(c.system or "", c.turns) if c else False)


# --------------------------------------------------------------------------- packing and batching


def pack_groups(items: Iterable, max_seq_length: int, open_packs: int = 64) -> Iterator[list]:
    """First-fit packing of ``(item, length)`` pairs into groups of at most ``max_seq_length`` tokens.

    Each item goes into the first of up to ``open_packs`` open packs it fits in
    (closing the fullest when a new one is needed), which fills rows far better
    than filling one pack at a time when lengths vary (Bengali conversations run
    from a few hundred to several thousand tokens). Works on a stream.
    """
    packs: list[list] = []
    used: list[int] = []
    for item, n in items:
        k = next((i for i, u in enumerate(used) if u + n <= max_seq_length), None)
        if k is None:
            if len(packs) >= open_packs:
                full = max(range(len(used)), key=used.__getitem__)
                yield packs.pop(full)
                used.pop(full)
            packs.append([])
            used.append(0)
            k = len(packs) - 1
        packs[k].append(item)
        used[k] += n
    yield from packs


def pack_examples(examples: list[dict]) -> dict:
    """One packed training row from examples: ids concatenated, spans shifted, ``seq_lens`` per example.

    The collator turns ``seq_lens`` into position ids that restart at 0 for every
    example; with no attention mask transformers derives a block-diagonal causal
    mask from them, so packed conversations never attend to each other.
    """
    ids, spans, lens = [], [], []
    for ex in examples:
        off = len(ids)
        ids += ex["input_ids"]
        spans += [x + off for x in ex["label_spans"]]
        lens.append(len(ex["input_ids"]))
    return {"input_ids": ids, "label_spans": spans, "seq_lens": lens}


class PackedDataset(Dataset):
    """Map-style view of packed rows over an encoded split (packs hold indices, not copies)."""

    def __init__(self, encoded, groups: list[list[int]]) -> None:
        self.encoded = encoded
        self.groups = groups

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, k: int) -> dict:
        rows = self.encoded[self.groups[k]]
        return pack_examples([{"input_ids": a, "label_spans": b} for a, b in zip(rows["input_ids"], rows["label_spans"])])


class EpochSampler(torch.utils.data.Sampler):
    """Shuffled training order that is a function of (seed, epoch) alone.

    Lightning calls ``set_epoch`` on samplers, so every epoch has a new order and a
    run resumed mid-epoch replays exactly the order of the uninterrupted run (the
    stateful loader then skips the batches already seen). With ``lengths`` the
    order groups similar lengths into the same batch (transformers'
    length-grouped indices), which cuts padding without packing.
    """

    def __init__(self, n: int, seed: int, lengths: Optional[list[int]] = None, batch_size: int = 1) -> None:
        self.n, self.seed, self.lengths, self.batch_size = n, seed, lengths, batch_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        if self.lengths is None:
            return iter(torch.randperm(self.n, generator=g).tolist())
        from transformers.trainer_pt_utils import get_length_grouped_indices

        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=g))


class Collator:
    """Pads encoded examples into tensors: right padding for the loss, left-padded
    ``gen_input_ids`` (the prompt up to the final reply's header) for generation."""

    def __init__(self, pad_id: int, pad_to_multiple_of: int = 8) -> None:
        self.pad_id = pad_id
        self.multiple = max(1, pad_to_multiple_of)

    def _width(self, n: int) -> int:
        return ((n + self.multiple - 1) // self.multiple) * self.multiple

    def __call__(self, batch: list[dict]) -> dict:
        width = self._width(max(len(ex["input_ids"]) for ex in batch))
        packed = "seq_lens" in batch[0]
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        pos = torch.arange(width).repeat(len(batch), 1)
        segments: list[int] = []
        for i, ex in enumerate(batch):
            n = len(ex["input_ids"])
            row = torch.tensor(ex["input_ids"], dtype=torch.long)
            ids[i, :n] = row
            mask[i, :n] = 1
            sp = ex["label_spans"]
            for s, e in zip(sp[::2], sp[1::2]):
                labels[i, s:e] = row[s:e]
            if packed:
                pos[i, :n] = torch.cat([torch.arange(m) for m in ex["seq_lens"]])
                pos[i, n:] = torch.arange(width - n)  # padding forms its own (label-free) segment
                segments += list(ex["seq_lens"]) + ([width - n] if width > n else [])
        out = {"input_ids": ids, "labels": labels, "position_ids": pos, "n_tokens": mask.sum(),
               "attention_mask": None if packed else mask}
        if packed:
            # Segment lengths of the batch read row after row (padding included), for
            # kernels that attend within segments of one flattened row (Unsloth).
            out["packed_seq_lengths"] = torch.tensor(segments, dtype=torch.int32)
        if "prompt_len" in batch[0]:
            pw = max(ex["prompt_len"] for ex in batch)
            gen = torch.full((len(batch), pw), self.pad_id, dtype=torch.long)
            gmask = torch.zeros((len(batch), pw), dtype=torch.long)
            for i, ex in enumerate(batch):
                n = ex["prompt_len"]
                gen[i, pw - n:] = torch.tensor(ex["input_ids"][:n], dtype=torch.long)
                gmask[i, pw - n:] = 1
            out.update(gen_input_ids=gen, gen_attention_mask=gmask)
            for key in ("id", "prompt", "reference", "category", "row"):
                out[key] = [ex.get(key) for ex in batch]
            for ex in batch:  # a streamed corpus is checked here, as the rows arrive
                if ex.get("reference_in_prompt"):
                    raise_reference_in_prompt(ex.get("row") or ex.get("id"))
        return out


# --------------------------------------------------------------------------- statistics


def raise_reference_in_prompt(where: str) -> None:
    raise UserError(f"{where}: the reference reply already occurs earlier in the conversation, inside the prompt "
                    "given to generation: its scores would measure an echo (remove or fix the row)")


def split_stats(columns: dict, max_seq_length: int) -> dict:
    """Rows, conversations, turns, token-length percentiles, % over the limit and reply tokens of one split."""
    status = np.asarray(columns["status"], dtype=object)
    raw = np.asarray(columns["raw_tokens"], dtype=np.int64)
    nonempty = status != "empty"
    kept = np.isin(status, KEPT)
    lengths = raw[nonempty]
    pct = (lambda q: int(np.percentile(lengths, q))) if lengths.size else (lambda q: 0)
    return {
        "rows": int(status.size),
        "conversations": len(set(np.asarray(columns["group"], dtype=object)[nonempty].tolist())),
        "turns": int(np.asarray(columns["n_turns"], dtype=np.int64)[nonempty].sum()),
        "tokens_p50": pct(50), "tokens_p90": pct(90), "tokens_p99": pct(99), "tokens_max": pct(100),
        "over_max_pct": round(100.0 * float((lengths > max_seq_length).mean()) if lengths.size else 0.0, 2),
        "reply_tokens": int(np.asarray(columns["reply_tokens"], dtype=np.int64)[kept].sum()),
        "kept": int(kept.sum()),
        "truncated": int((status == "truncated").sum()),
        "dropped_too_long": int((status == "too_long").sum()),
        "dropped_empty": int((status == "empty").sum()),
        "dropped_duplicate": int((status == "duplicate").sum()),
    }


STAT_COLUMNS = ("rows", "conversations", "turns", "tokens_p50", "tokens_p90", "tokens_p99", "tokens_max",
                "over_max_pct", "reply_tokens", "kept", "truncated", "dropped_too_long", "dropped_empty",
                "dropped_duplicate")


def format_stats(stats: dict, max_seq_length: int) -> str:
    """A plain-text table of :func:`split_stats` per split."""
    head = ["split"] + [c.replace("tokens_", "") if c.startswith("tokens_p") or c == "tokens_max" else c
                        for c in STAT_COLUMNS]
    rows = [[s] + [str(stats[s][c]) for c in STAT_COLUMNS] for s in SPLITS if s in stats]
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    line = lambda r: "  ".join(x.rjust(w) for x, w in zip(r, widths))  # noqa: E731
    title = f"data (token lengths before truncation; max_seq_length={max_seq_length})"
    return "\n".join([title, line(head)] + [line(r) for r in rows])


def flat_stats(stats: dict) -> dict:
    """``{"data/train/rows": ..., ...}`` for TensorBoard hparams."""
    return {f"data/{s}/{k}": v for s, d in stats.items() for k, v in d.items()}


# --------------------------------------------------------------------------- streaming


EVAL_COLUMNS = ["input_ids", "label_spans", "prompt_len", "id", "prompt", "reference", "category", "row",
                "reference_in_prompt"]


class StreamSplit(IterableDataset):
    """One split of a streamed corpus: HF ``IterableDataset`` rows -> kept examples (-> packs).

    Counts every row's status as it passes (dropped and truncated rows are reported
    per epoch), turns reader failures into one line naming the file, and forwards
    ``set_epoch`` / ``state_dict`` / ``load_state_dict`` to the HF stream so the
    shuffle order changes every epoch and a resumed run continues where it stopped.
    """

    def __init__(self, stream, files: list[Path], pack_to: Optional[int] = None) -> None:
        self.stream = stream
        self.files = files
        self.pack_to = pack_to
        self.counts: dict[str, int] = {}

    def set_epoch(self, epoch: int) -> None:
        self.stream.set_epoch(epoch)

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)

    def _kept(self) -> Iterator[dict]:
        self.counts = {}
        try:
            for ex in self.stream:
                self.counts[ex["status"]] = self.counts.get(ex["status"], 0) + 1
                if ex["status"] in KEPT:
                    yield ex
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - a reader failure mid-stream: name the file and line
            for f in self.files:
                err = diagnose(f, exc)
                if not str(err).startswith("cannot read"):
                    raise err from None
            raise diagnose(self.files[0], exc) from None

    def __iter__(self) -> Iterator[dict]:
        if not self.pack_to:
            yield from self._kept()
            return
        for group in pack_groups(((ex, len(ex["input_ids"])) for ex in self._kept()), self.pack_to):
            yield pack_examples(group)


# --------------------------------------------------------------------------- data module


class EmpatheticDialogueDataModule(L.LightningDataModule):
    """LightningDataModule for Bengali conversations (single exchanges or multi-turn).

    Args:
        corpus_path: a .jsonl/.json/.csv/.tsv/.parquet file, a directory of them, or a glob;
            ``None`` uses the bundled sample (pairs + multi-turn conversations).
        tokenizer_path: local tokenizer/checkpoint directory; ``None`` uses the embedded
            Llama-3.1 tokenizer (linked to ``model.model_name_or_path`` by the CLI).
        prompt_column / response_column: one exchange per row from these two columns.
        messages_column: a column of ``{role, content}`` turns (or ShareGPT ``{from, value}``);
            auto-detected as ``messages`` / ``conversations`` when the prompt column is absent.
        prompt_template / response_template: build the turns from several columns,
            e.g. ``"{Question-Title}\\n{Questions}"``.
        system_column: per-row system prompt (empty cells use ``system_prompt``).
        id_column: row id (default ``id``; a hash of the text when absent).
        group_column: rows of one group always share a split (auto: ``conversation_id`` /
            ``dialogue_id`` / ``conv_id`` when present).
        category_column: a category/emotion label carried to predictions.
        system_prompt: default system turn (Bengali).
        max_seq_length: longest tokenised conversation.
        on_too_long: ``error``; ``drop`` the row; ``truncate`` its tail; or ``truncate_history``:
            drop the oldest whole turns (keeping the system prompt and the final exchange),
            then cut the reply's tail.
        train_on: loss on ``all_assistant`` replies or only the ``last_assistant`` one.
        val_fraction / test_fraction / seed: the stable hash split.
        batch_size / eval_batch_size: training and evaluation batch sizes.
        pack: concatenate training conversations into rows of ``max_seq_length`` tokens.
        group_by_length: without packing, batch conversations of similar length together
            (less padding; the order still changes every epoch).
        streaming: read the corpus lazily (shuffle buffer, sharded per rank) instead of an Arrow cache.
        shuffle_buffer: streaming shuffle buffer (rows).
        num_workers: DataLoader worker processes.
        num_proc: processes for tokenising in memory (``None``: all cores for large corpora).
        predict_split: split used by ``predict``.
        max_predict_samples: cap on conversations for ``predict`` (``None`` = all).
        deduplicate: drop conversations identical to an earlier one (same system prompt and turns
            after NFC and white-space normalisation) before the split; counted as ``dropped_duplicate``.
            In memory only.
    """

    def __init__(
        self,
        corpus_path: Optional[str] = None,
        tokenizer_path: Optional[str] = None,
        prompt_column: str = "prompt",
        response_column: str = "response",
        messages_column: Optional[str] = None,
        prompt_template: Optional[str] = None,
        response_template: Optional[str] = None,
        system_column: Optional[str] = None,
        id_column: Optional[str] = "id",
        group_column: Optional[str] = None,
        category_column: Optional[str] = None,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        max_seq_length: int = 2048,
        on_too_long: OnTooLong = "error",
        train_on: TrainOn = "all_assistant",
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        batch_size: int = 4,
        eval_batch_size: Optional[int] = None,
        pack: bool = False,
        group_by_length: bool = False,
        streaming: bool = False,
        shuffle_buffer: int = 1000,
        num_workers: int = 0,
        num_proc: Optional[int] = None,
        predict_split: Split = "test",
        max_predict_samples: Optional[int] = None,
        deduplicate: bool = False,
        seed: int = 42,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if batch_size < 1:
            raise UserError(f"batch_size must be >= 1, not {batch_size}")
        if max_seq_length < 16:
            raise UserError(f"max_seq_length must be >= 16, not {max_seq_length}")
        if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
            raise UserError(f"val_fraction ({val_fraction}) and test_fraction ({test_fraction}) "
                            "must be in [0, 1) and sum below 1")
        if deduplicate and streaming:
            raise UserError("data.deduplicate needs the corpus in memory: set data.streaming to false")
        self.corpus_path = str(corpus_path) if corpus_path else str(bundled_corpus_path())
        self.files = corpus_files(self.corpus_path)
        self._formats: dict[Path, CorpusFormat] = {}
        self._first_rows: dict[Path, dict] = {}
        for f in self.files:  # bad columns or templates fail here, before any output is written
            row = self._first_row(f)
            self._first_rows[f] = row
            self._formats[f] = CorpusFormat(
                list(row), str(f), prompt_column, response_column, messages_column, prompt_template,
                response_template, system_column, id_column, group_column, category_column)
        self.tokenizer_path = tokenizer_path
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.pack = pack
        self.streaming = streaming
        self._tokenizer = None
        self._train_lengths: list[int] = []
        self._eval_views: dict[str, Dataset] = {}  # kept rows with what evaluation needs, train included
        self._streams_for: tuple[int, int] = (0, 1)  # (rank, world size) the streams were sharded for
        self.datasets: dict[str, Dataset] = {}
        self.stats: dict[str, dict] = {}

    @staticmethod
    def _first_row(f: Path) -> dict:
        try:
            return next(iter(load_file(f, streaming=True)))
        except StopIteration:
            raise UserError(f"corpus is empty: {f}") from None
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - reader failure on the first rows
            raise diagnose(f, exc) from None

    # -- tokenizer / encoders
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from .tokenizer import load_tokenizer

            self._tokenizer = load_tokenizer(self.tokenizer_path)
        return self._tokenizer

    @property
    def options(self) -> EncodeOptions:
        h = self.hparams
        return EncodeOptions(h.system_prompt, h.max_seq_length, h.on_too_long, h.train_on, h.val_fraction,
                             h.test_fraction, h.seed)

    def chat_encoder(self) -> ChatEncoder:
        return ChatEncoder(self.tokenizer)

    def collator(self) -> Collator:
        return Collator(self.tokenizer.pad_token_id)

    def _encoders(self) -> dict[Path, RowEncoder]:
        chat = self.chat_encoder()
        encoders = {f: RowEncoder(self._formats[f], chat, self.options, str(f)) for f in self.files}
        f = self.files[0]
        conv = self._formats[f].conversation(self._first_rows[f], f"{f}: row 1")
        if conv is not None:
            chat.check(conv.system if conv.system is not None else self.hparams.system_prompt, conv.turns,
                       f"{f}: row 1")
        return encoders

    # -- in memory
    def _encode_in_memory(self):
        import datasets

        encoders = self._encoders()
        parts = []
        for f, enc in encoders.items():
            raw = load_file(f, streaming=False)
            key = json.dumps([ENCODING_VERSION, raw._fingerprint, enc.chat.cache_key(), asdict(self.options),
                              vars(enc.fmt)], sort_keys=True, default=str)
            fingerprint = hashlib.sha256(key.encode("utf-8")).hexdigest()[:32]
            num_proc = self.hparams.num_proc
            if num_proc is None:
                num_proc = min(os.cpu_count() or 1, 8) if len(raw) >= 20_000 else None
            parts.append(raw.map(enc.encode_with_split, batched=True, batch_size=256, with_indices=True,
                                 remove_columns=raw.column_names, new_fingerprint=fingerprint,
                                 num_proc=num_proc, desc=f"tokenising {f.name}"))
        return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)

    def _rank_and_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def setup(self, stage: Optional[str] = None) -> None:
        if self.streaming:
            # The CLI's prepare() runs before DDP has started: shard the streams again once the
            # ranks are known, or every rank would stream the same rows.
            if not self.datasets or self._streams_for != self._rank_and_world():
                self._setup_streaming()
            return
        if self.datasets:
            return
        encoded = self._encode_in_memory()
        split_col = encoded.select_columns(["split"]).with_format("numpy")[:]["split"]
        duplicate = np.zeros(len(encoded), dtype=bool)
        if self.hparams.deduplicate:
            keys = encoded.select_columns(["dedup_key"]).with_format("numpy")[:]["dedup_key"]
            _, first = np.unique(keys, return_index=True)
            duplicate[:] = True
            duplicate[first] = False
            duplicate &= keys != ""
        for split in SPLITS:
            rows = np.flatnonzero(split_col == split)
            part = encoded.select(rows)
            cols = part.select_columns(["status", "raw_tokens", "n_tokens", "group", "n_turns", "reply_tokens"]) \
                .with_format("numpy")[:]
            cols["status"] = np.where(duplicate[rows] & np.isin(cols["status"], KEPT), "duplicate", cols["status"])
            self.stats[split] = split_stats(cols, self.hparams.max_seq_length)
            kept = np.flatnonzero(np.isin(cols["status"], KEPT))
            part = part.select(kept)
            self._eval_views[split] = part.select_columns(EVAL_COLUMNS)
            if split == "train":
                self._train_lengths = cols["n_tokens"][kept].tolist()
                part = part.select_columns(["input_ids", "label_spans"])
                if self.pack:
                    order = np.random.default_rng(self.hparams.seed).permutation(len(kept))
                    lengths = cols["n_tokens"][kept][order].tolist()
                    groups = pack_groups(zip(order.tolist(), lengths), self.hparams.max_seq_length)
                    part = PackedDataset(part, list(groups))
            else:
                part = self._eval_views[split]
            self.datasets[split] = part
        if not self.stats["train"]["kept"]:
            raise UserError(f"no training conversations in {self.corpus_path} after the split "
                            f"({self.stats['train']['rows']} rows went to train)")

    # -- streaming
    def _setup_streaming(self) -> None:
        import datasets
        from datasets.distributed import split_dataset_by_node

        encoders = self._encoders()
        rank, world = self._streams_for = self._rank_and_world()
        for split in SPLITS:
            streams = []
            for f, enc in encoders.items():
                s = load_file(f, streaming=True)
                s = s.map(enc.assign, batched=True, batch_size=256, with_indices=True)
                s = s.filter(lambda sp, want=split: sp == want, input_columns="split")
                s = s.map(enc.encode, batched=True, batch_size=256, remove_columns=list(self._first_rows[f]))
                streams.append(s)
            stream = streams[0] if len(streams) == 1 else datasets.concatenate_datasets(streams)
            if split == "train" and self.hparams.shuffle_buffer > 1:
                stream = stream.shuffle(seed=self.hparams.seed, buffer_size=self.hparams.shuffle_buffer)
            if world > 1:
                stream = split_dataset_by_node(stream, rank=rank, world_size=world)
            pack_to = self.hparams.max_seq_length if split == "train" and self.pack else None
            self.datasets[split] = StreamSplit(stream, self.files, pack_to)

    def split_texts(self, split: str) -> Optional[tuple[list[str], list[str]]]:
        """Final user turns and final replies of a split's kept rows (``None`` when streaming:
        that would take a pass over the corpus)."""
        view = self._eval_views.get(split)
        return None if view is None else (view["prompt"], view["reference"])

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle a streamed training split for ``epoch`` (Lightning only does this for samplers)."""
        ds = self.datasets.get("train")
        if hasattr(ds, "set_epoch"):
            ds.set_epoch(epoch)

    def stream_counts(self, split: str) -> dict[str, int]:
        """Row statuses seen while streaming ``split`` in this process (empty in memory)."""
        ds = self.datasets.get(split)
        return dict(getattr(ds, "counts", {}) or {})

    def compute_stats(self) -> dict:
        """Per-split statistics; streaming reads the corpus once for them."""
        self.setup()
        if self.stats:
            return self.stats
        for split in SPLITS:
            ds: StreamSplit = self.datasets[split]
            cols = {k: [] for k in ("status", "raw_tokens", "group", "n_turns", "reply_tokens")}
            for ex in ds.stream:
                for k in cols:
                    cols[k].append(ex[k])
            self.stats[split] = split_stats(cols, self.hparams.max_seq_length)
        return self.stats

    def prepare(self) -> None:
        """Tokenise and validate up front (called by the CLI before a run), and print the statistics."""
        self.setup("fit")
        if self.stats:
            print(format_stats(self.stats, self.hparams.max_seq_length), file=sys.stderr, flush=True)
            if self.hparams.deduplicate:
                dropped = sum(s["dropped_duplicate"] for s in self.stats.values())
                print(f"deduplicate: dropped {dropped} conversations identical to an earlier one", file=sys.stderr)
        for split in dict.fromkeys(("val", "test", self.hparams.predict_split)):
            view = self._eval_views.get(split)
            if view is not None:
                flags = view.select_columns(["reference_in_prompt"]).with_format("numpy")[:]["reference_in_prompt"]
                if flags.any():
                    raise_reference_in_prompt(view[int(np.flatnonzero(flags)[0])]["row"])

    # -- loaders
    def _loader(self, split: str, train: bool, limit: Optional[int] = None):
        from torchdata.stateful_dataloader import StatefulDataLoader

        ds = self.datasets[split]
        if not train:  # evaluating on the training split: unpacked rows with prompts and references
            ds = self._eval_views.get(split, ds)
            if isinstance(ds, StreamSplit) and ds.pack_to:
                ds = StreamSplit(ds.stream, ds.files)
        if limit is not None:
            ds = StreamSplit(ds.stream.take(limit), ds.files) if isinstance(ds, StreamSplit) else \
                ds.select(range(min(limit, len(ds))))
        sampler = None
        if train and not isinstance(ds, StreamSplit):
            grouped = self.hparams.group_by_length and not self.pack
            sampler = EpochSampler(len(ds), self.hparams.seed, self._train_lengths if grouped else None,
                                   self.batch_size)
            # A resumed run builds its loader before Lightning's per-epoch set_epoch call:
            # start from the restored epoch so the skipped-to position is in the right order.
            sampler.set_epoch(self.trainer.current_epoch if self.trainer is not None else 0)
        # StatefulDataLoader: Lightning saves its position in checkpoints, so a run
        # resumed mid-epoch continues with the batches it would have seen.
        return StatefulDataLoader(ds, batch_size=self.batch_size if train else self.eval_batch_size, sampler=sampler,
                                  collate_fn=self.collator(), num_workers=self.hparams.num_workers)

    def train_dataloader(self):
        return self._loader("train", True)

    def val_dataloader(self):
        return self._loader("val", False)

    def test_dataloader(self):
        return self._loader("test", False)

    def predict_dataloader(self):
        return self._loader(self.hparams.predict_split, False, self.hparams.max_predict_samples)
