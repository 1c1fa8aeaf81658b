"""The train/val/test splits of an encoded corpus, in memory or streamed, behind one interface.

:class:`InMemorySplits` holds the corpus encoded in an Arrow dataset (HF's cache: a second run
starts from it), deduplicated, counted and split; :class:`StreamedSplits` reads it lazily (a
shuffle buffer whose order changes every epoch, sharded per rank) and counts rows as they pass.
Both answer the data module the same questions (:class:`CorpusSplits`): the loaders, the
statistics, the training texts, the row counts of a streamed epoch. Loaders are torchdata
``StatefulDataLoader``s: Lightning saves their position in checkpoints, so a run resumed
mid-epoch continues with the batches it would have seen.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Protocol

import numpy as np
from torch.utils.data import IterableDataset
from torchdata.stateful_dataloader import StatefulDataLoader

from ..errors import UserError
from ..schema import TrainingTexts
from .batching import EpochSampler, PackedDataset, pack_examples, pack_groups
from .encode import PREFERENCE_COLUMNS, RowEncoder, raise_reference_in_prompt, too_long_error, where
from .files import diagnose_any, load_file
from .formats import SPLITS
from .stats import KEPT, Tokenize, split_stats, text_stats

# What an evaluation example carries (a training example needs only the first two).
EVAL_COLUMNS = ["input_ids", "label_spans", "prompt_len", "file", "line", "id", "prompt", "reference", "category",
                "reference_in_prompt", *PREFERENCE_COLUMNS]
STAT_INPUTS = ["status", "raw_tokens", "n_tokens", "group", "n_turns", "reply_tokens"]


@dataclass(frozen=True)
class Batching:
    """How the splits are batched (the ``data.*`` options of the same names)."""

    batch_size: int
    eval_batch_size: int
    max_seq_length: int
    pack: bool
    group_by_length: bool
    num_workers: int
    seed: int
    collate_fn: Callable[[list[dict]], dict]


class CorpusSplits(Protocol):
    """What the data module asks of its splits, in memory or streamed."""

    stats: dict[str, dict]  # per split; a stream has them after compute_stats()
    datasets: dict  # per split: what trains (packed or not) or what is evaluated

    def loader(self, split: str, train: bool, limit: Optional[int] = None,
               current_epoch: Optional[Callable[[], int]] = None) -> StatefulDataLoader:
        """A resumable loader of ``split``: the training order of the trainer's ``current_epoch`` (counted
        from 0 outside a Trainer), or evaluation rows (at most ``limit``)."""

    def training_texts(self) -> Optional[TrainingTexts]:
        """Every turn of the kept training rows (``None`` for a stream: that would take an extra pass)."""

    def check_echoes(self, splits: list[str]) -> None:
        """Refuse rows of ``splits`` whose reference occurs in their prompt (a stream checks as the rows arrive)."""

    def counts(self, split: str) -> dict[str, int]:
        """Row statuses of ``split`` seen in the last streamed pass of this process (empty in memory)."""

    def compute_stats(self, tokenize: Optional[Tokenize] = None) -> dict[str, dict]:
        """Per-split statistics (a stream reads the corpus once for them); with ``tokenize``, also the tokens per word
        and per character of every turn's text of the split's rows (:func:`~.stats.text_stats`)."""


def _columns(ds, names: list[str]) -> dict:
    return ds.select_columns(names).with_format("numpy")[:]


class InMemorySplits:
    """The splits of a corpus encoded in memory (one Arrow dataset of :data:`~.encode.ENCODED_COLUMNS`)."""

    def __init__(self, encoded, batching: Batching, deduplicate: bool, fail_too_long: bool, corpus: str) -> None:
        self.batching = batching
        if fail_too_long:
            _raise_if_too_long(encoded, batching.max_seq_length)
        split_col = _columns(encoded, ["split"])["split"]
        duplicate = _duplicates(encoded) if deduplicate else np.zeros(len(encoded), dtype=bool)
        self.stats: dict[str, dict] = {}
        self.datasets: dict = {}
        self.eval_views: dict = {}  # kept rows with what evaluation needs, train included
        self.train_lengths: list[int] = []
        self.texts: dict = {}  # every row's turns, dropped rows too: what the corpus says, for text_stats
        for split in SPLITS:
            rows = np.flatnonzero(split_col == split)
            part = encoded.select(rows)
            self.texts[split] = part.select_columns(["texts"])
            cols = _columns(part, STAT_INPUTS)
            cols["status"] = np.where(duplicate[rows] & np.isin(cols["status"], KEPT), "duplicate", cols["status"])
            self.stats[split] = split_stats(cols, batching.max_seq_length)
            kept = np.flatnonzero(np.isin(cols["status"], KEPT))
            part = part.select(kept)
            self.eval_views[split] = self.datasets[split] = part.select_columns(EVAL_COLUMNS)
            if split == "train":
                self.train_texts = part.select_columns(["texts"])
                self.train_lengths = cols["n_tokens"][kept].tolist()
                part = part.select_columns(["input_ids", "label_spans", *PREFERENCE_COLUMNS])
                if batching.pack:
                    order = np.random.default_rng(batching.seed).permutation(len(kept))
                    groups = pack_groups(zip(order.tolist(), cols["n_tokens"][kept][order].tolist()),
                                         batching.max_seq_length)
                    part = PackedDataset(part, list(groups))
                self.datasets[split] = part
        if not self.stats["train"]["kept"]:
            raise UserError(f"no training conversations in {corpus} after the split "
                            f"({self.stats['train']['rows']} rows went to train)")

    def loader(self, split: str, train: bool, limit: Optional[int] = None,
               current_epoch: Optional[Callable[[], int]] = None) -> StatefulDataLoader:
        b = self.batching
        ds = self.datasets[split] if train else self.eval_views[split]
        if limit is not None:
            ds = ds.select(range(min(limit, len(ds))))
        sampler = None
        if train:
            grouped = b.group_by_length and not b.pack
            sampler = EpochSampler(len(ds), b.seed, self.train_lengths if grouped else None, b.batch_size)
            # A resumed run builds its loader before Lightning's per-epoch set_epoch call:
            # start from the restored epoch so the skipped-to position is in the right order.
            sampler.set_epoch(current_epoch() if current_epoch is not None else 0)
        return StatefulDataLoader(ds, batch_size=b.batch_size if train else b.eval_batch_size, sampler=sampler,
                                  collate_fn=b.collate_fn, num_workers=b.num_workers)

    def training_texts(self) -> Optional[TrainingTexts]:
        return [text for turns in self.train_texts["texts"] for text in turns]

    def check_echoes(self, splits: list[str]) -> None:
        for split in splits:
            view = self.eval_views[split]
            flags = _columns(view, ["reference_in_prompt"])["reference_in_prompt"]
            if flags.any():
                row = view[int(np.flatnonzero(flags)[0])]
                raise_reference_in_prompt(where(row["file"], row["line"]))

    def counts(self, split: str) -> dict[str, int]:
        return {}

    def compute_stats(self, tokenize: Optional[Tokenize] = None) -> dict[str, dict]:
        if tokenize is not None:
            for split, texts in self.texts.items():
                turns = (t for batch in texts.iter(batch_size=1024) for row in batch["texts"] for t in row)
                self.stats[split].update(text_stats(turns, tokenize))
        return self.stats


def _raise_if_too_long(encoded, limit: int) -> None:
    cols = _columns(encoded, ["status", "raw_tokens"])
    too_long = np.flatnonzero(cols["status"] == "too_long")
    if too_long.size:
        first = encoded[int(too_long[0])]
        lengths = cols["raw_tokens"][too_long]
        counted = (int(too_long.size), len(encoded), int(np.percentile(lengths, 50)), int(np.percentile(lengths, 99)))
        raise too_long_error(where(first["file"], first["line"]), first["raw_tokens"], limit, counted)


def _duplicates(encoded) -> np.ndarray:
    """Rows whose conversation equals an earlier one's (the first of each is kept)."""
    keys = _columns(encoded, ["dedup_key"])["dedup_key"]
    _, first = np.unique(keys, return_index=True)
    duplicate = np.ones(len(encoded), dtype=bool)
    duplicate[first] = False
    return duplicate & (keys != "")


# --------------------------------------------------------------------------- streamed


class StreamSplit(IterableDataset):
    """One split of a streamed corpus: HF ``IterableDataset`` rows -> kept examples (-> packs).

    Counts every row's status as it passes (dropped and truncated rows are reported per
    epoch), turns reader failures into one line naming the file, and forwards ``set_epoch`` /
    ``state_dict`` / ``load_state_dict`` to the HF stream so the shuffle order changes every
    epoch and a resumed run continues where it stopped.
    """

    def __init__(self, stream, files: list[Path], pack_to: Optional[int] = None, fail_too_long: bool = False,
                 max_seq_length: int = 0) -> None:
        self.stream, self.files, self.pack_to = stream, files, pack_to
        self.fail_too_long, self.max_seq_length = fail_too_long, max_seq_length
        self.counts: dict[str, int] = {}

    def view(self, limit: Optional[int] = None) -> StreamSplit:
        """The same rows unpacked (evaluation), at most ``limit`` of them."""
        stream = self.stream if limit is None else self.stream.take(limit)
        return StreamSplit(stream, self.files, None, self.fail_too_long, self.max_seq_length)

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
                elif ex["status"] == "too_long" and self.fail_too_long:
                    raise too_long_error(where(ex["file"], ex["line"]), ex["raw_tokens"], self.max_seq_length, None)
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - a reader failure mid-stream: name the file and line
            raise diagnose_any(self.files, exc) from None

    def __iter__(self) -> Iterator[dict]:
        if not self.pack_to:
            yield from self._kept()
            return
        for group in pack_groups(((ex, len(ex["input_ids"])) for ex in self._kept()), self.pack_to):
            yield pack_examples(group)


class StreamLoader(StatefulDataLoader):
    """The loader of a streamed training split: a new shuffle order on every pass.

    Lightning sets the epoch on samplers only, and an iterable dataset has none: the loader sets
    it on the stream as a pass starts (in the main process, so worker copies get it), from the
    trainer's epoch when there is one (a resumed run shuffles as the first run did), else by
    counting its own passes.
    """

    def __init__(self, *args, current_epoch: Optional[Callable[[], int]] = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.current_epoch = current_epoch
        self.passes = 0

    def __iter__(self):
        self.dataset.set_epoch(self.current_epoch() if self.current_epoch is not None else self.passes)
        self.passes += 1
        return super().__iter__()


class StreamedSplits:
    """The splits of a streamed corpus, sharded for one rank of ``world``."""

    def __init__(self, encoders: dict[Path, RowEncoder], batching: Batching, shuffle_buffer: int,
                 fail_too_long: bool, rank: int = 0, world: int = 1) -> None:
        import datasets
        from datasets.distributed import split_dataset_by_node

        self.batching, self.sharded_for = batching, (rank, world)
        self.stats: dict[str, dict] = {}
        self.datasets: dict[str, StreamSplit] = {}
        files = list(encoders)
        for split in SPLITS:
            streams = []
            for f, enc in encoders.items():
                s = load_file(f, streaming=True)
                # Parsed once: the split is read off the parsed columns, which the encoder then tokenises.
                s = s.map(enc.parse, batched=True, batch_size=256, with_indices=True, remove_columns=enc.fmt.columns)
                s = s.filter(lambda sp, want=split: sp == want, input_columns="split")
                streams.append(s.map(enc.encode, batched=True, batch_size=256, remove_columns=["system", "turns"]))
            stream = streams[0] if len(streams) == 1 else datasets.concatenate_datasets(streams)
            if split == "train" and shuffle_buffer > 1:
                stream = stream.shuffle(seed=batching.seed, buffer_size=shuffle_buffer)
            if world > 1:
                stream = split_dataset_by_node(stream, rank=rank, world_size=world)
            pack_to = batching.max_seq_length if split == "train" and batching.pack else None
            self.datasets[split] = StreamSplit(stream, files, pack_to, fail_too_long, batching.max_seq_length)

    def loader(self, split: str, train: bool, limit: Optional[int] = None,
               current_epoch: Optional[Callable[[], int]] = None) -> StatefulDataLoader:
        b = self.batching
        ds = self.datasets[split]
        if not train:  # evaluating on the training split: unpacked rows with prompts and references
            return StatefulDataLoader(ds.view(limit), batch_size=b.eval_batch_size, collate_fn=b.collate_fn,
                                      num_workers=b.num_workers)
        return StreamLoader(ds, batch_size=b.batch_size, collate_fn=b.collate_fn, num_workers=b.num_workers,
                            current_epoch=current_epoch)

    def training_texts(self) -> Optional[TrainingTexts]:
        return None

    def check_echoes(self, splits: list[str]) -> None:
        """Nothing to check up front: the collator refuses an echo as the row streams in."""

    def counts(self, split: str) -> dict[str, int]:
        return dict(self.datasets[split].counts)

    def compute_stats(self, tokenize: Optional[Tokenize] = None) -> dict[str, dict]:
        if not self.stats or tokenize is not None:
            for split in SPLITS:
                cols: dict = {k: [] for k in STAT_INPUTS}
                texts: list[str] = []
                for ex in self.datasets[split].stream:
                    for k in cols:
                        cols[k].append(ex[k])
                    texts += ex["texts"]
                self.stats[split] = split_stats(cols, self.batching.max_seq_length)
                if tokenize is not None:
                    self.stats[split].update(text_stats(texts, tokenize))
        return self.stats

