"""Encoded examples -> batches: first-fit packing, the per-epoch training order, and the collator.

:class:`Collator` pads examples into the loss tensors (``input_ids``, ``labels`` with
:data:`IGNORE_INDEX` outside the replies, ``attention_mask``, ``position_ids``, ``n_tokens``) and,
for evaluation examples, carries the rows as ``eval_rows``: :class:`~bengali_empathy.schema.EvalRow`
with the generation prompt unpadded (the generator pads per batch). A batch of DPO pairs is the
chosen rows followed by the rejected rows (``pairs`` = how many pairs), so one forward pass scores
both; a KTO batch carries its labels as ``desirable``.
"""
from __future__ import annotations

from typing import Iterable, Iterator, Optional

import torch
from torch.utils.data import Dataset

from ..schema import EvalRow
from .encode import raise_reference_in_prompt, where

IGNORE_INDEX = -100


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
    """Pads encoded examples into the loss tensors (right padding); evaluation examples (with a
    ``prompt_len``) also become ``eval_rows``."""

    def __init__(self, pad_id: int, pad_to_multiple_of: int = 8) -> None:
        self.pad_id = pad_id
        self.multiple = max(1, pad_to_multiple_of)

    def _width(self, n: int) -> int:
        return ((n + self.multiple - 1) // self.multiple) * self.multiple

    def __call__(self, batch: list[dict]) -> dict:
        if batch[0].get("rejected_ids"):  # DPO pairs: the rejected replies as rows of their own
            rejected = [{"input_ids": ex["rejected_ids"], "label_spans": ex["rejected_spans"]} for ex in batch]
            return {**self._rows(batch + rejected), "pairs": len(batch)}  # scored for rewards, never generated
        out = self._rows(batch)
        if batch[0].get("desirable") is not None:
            out["desirable"] = torch.tensor([bool(ex["desirable"]) for ex in batch])
        elif "prompt_len" in batch[0]:
            out["eval_rows"] = [eval_row(ex) for ex in batch]
        return out

    def _rows(self, batch: list[dict]) -> dict:
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
        return out


def eval_row(ex: dict) -> EvalRow:
    """The evaluation row of an encoded example (a streamed corpus is checked for echoes here, as rows arrive)."""
    if ex.get("reference_in_prompt"):
        raise_reference_in_prompt(where(ex["file"], ex["line"]))
    return EvalRow(file=ex["file"], line=ex["line"], id=ex["id"], prompt=ex["prompt"], reference=ex["reference"],
                   prompt_ids=list(ex["input_ids"][: ex["prompt_len"]]), category=ex.get("category"))
