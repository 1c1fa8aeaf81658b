"""Bengali empathetic-dialogue data: reading, splitting, chat formatting, masking, packing.

A corpus is a local CSV or JSONL file with one (prompt, response) pair a row.
Every row goes to train, val or test by a stable hash of its id (or its text),
so the split is the same in memory and when streaming, and does not move when
rows are added or reordered.
"""
from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from .errors import UserError

IGNORE_INDEX = -100

# "You are an empathetic, caring assistant. Understand the user's feelings
# attentively and reply in Bengali in warm, respectful, supportive language."
DEFAULT_SYSTEM_PROMPT = (
    "আপনি একজন সহমর্মী ও যত্নশীল সহকারী। ব্যবহারকারীর অনুভূতি মন দিয়ে বুঝুন "
    "এবং উষ্ণ, সম্মানজনক ও সহায়ক ভাষায় বাংলায় উত্তর দিন।"
)

SPLITS = ("train", "val", "test")


def bundled_corpus_path() -> Path:
    """The small Bengali empathetic-dialogue sample shipped with the package."""
    return Path(__file__).parent / "resources" / "sample_dialogues.jsonl"


# --------------------------------------------------------------------------- reading


def _detect_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    if suffix in (".csv", ".tsv"):
        return "csv"
    raise UserError(f"unsupported corpus format '{suffix}' for {path}: use .csv, .tsv or .jsonl")


def iter_rows(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, row)`` from a CSV/TSV/JSONL file, lazily (works on huge files)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"corpus file not found: {path}")
    fmt = _detect_format(path)
    with open(path, encoding="utf-8-sig", newline="") as fh:
        if fmt == "jsonl":
            for lineno, line in enumerate(fh, start=1):
                line = line.strip()
                if not line:
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UserError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
                if not isinstance(row, dict):
                    raise UserError(f"{path}:{lineno}: each JSONL line must be an object")
                yield lineno, row
        else:
            delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
            reader = csv.DictReader(fh, delimiter=delimiter)
            if reader.fieldnames is None:
                return
            for row in reader:
                yield reader.line_num, row


def split_of(key: str, val_fraction: float, test_fraction: float, seed: int) -> str:
    """Stable train/val/test assignment from a hash of ``key``."""
    digest = hashlib.blake2b(f"{seed}\x00{key}".encode("utf-8"), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


@dataclass
class Dialogue:
    """One (prompt, response) pair with its provenance."""

    id: str
    prompt: str
    response: str
    emotion: Optional[str] = None


class CorpusReader:
    """Validates a corpus file and yields :class:`Dialogue` rows of one split."""

    def __init__(
        self,
        path: str | os.PathLike,
        prompt_column: str = "prompt",
        response_column: str = "response",
        id_column: Optional[str] = "id",
        emotion_column: Optional[str] = "emotion",
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        seed: int = 42,
    ) -> None:
        self.path = Path(path)
        self.prompt_column = prompt_column
        self.response_column = response_column
        self.id_column = id_column
        self.emotion_column = emotion_column
        if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
            raise UserError(
                f"val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must be in [0, 1) and sum below 1"
            )
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed

    def check(self) -> None:
        """Fail fast with one clear line: missing file, wrong columns or empty corpus."""
        first = next(iter_rows(self.path), None)
        if first is None:
            raise UserError(f"corpus is empty: {self.path}")
        lineno, row = first
        missing = [c for c in (self.prompt_column, self.response_column) if c not in row]
        if missing:
            raise UserError(
                f"{self.path}: missing column(s) {', '.join(repr(c) for c in missing)}; "
                f"found {', '.join(repr(c) for c in row)} (set data.prompt_column / data.response_column)"
            )

    def _to_dialogue(self, lineno: int, row: dict) -> Optional[Dialogue]:
        prompt = row.get(self.prompt_column)
        response = row.get(self.response_column)
        if prompt is None or response is None:
            raise UserError(
                f"{self.path}:{lineno}: missing {self.prompt_column!r} or {self.response_column!r}"
            )
        prompt, response = str(prompt).strip(), str(response).strip()
        if not prompt or not response:
            return None  # blank rows carry no signal
        rid = row.get(self.id_column) if self.id_column else None
        rid = str(rid) if rid not in (None, "") else f"{prompt}\x00{response}"
        emotion = row.get(self.emotion_column) if self.emotion_column else None
        return Dialogue(id=rid, prompt=prompt, response=response, emotion=emotion)

    def iter_split(self, split: str) -> Iterator[Dialogue]:
        if split not in SPLITS:
            raise ValueError(split)
        for lineno, row in iter_rows(self.path):
            d = self._to_dialogue(lineno, row)
            if d is None:
                continue
            if split_of(d.id, self.val_fraction, self.test_fraction, self.seed) == split:
                yield d

    def read_all(self) -> dict[str, list[Dialogue]]:
        out: dict[str, list[Dialogue]] = {s: [] for s in SPLITS}
        for lineno, row in iter_rows(self.path):
            d = self._to_dialogue(lineno, row)
            if d is not None:
                out[split_of(d.id, self.val_fraction, self.test_fraction, self.seed)].append(d)
        if not any(out.values()):
            raise UserError(f"corpus has no non-empty {self.prompt_column!r}/{self.response_column!r} rows: {self.path}")
        return out


# --------------------------------------------------------------------------- formatting


class ChatFormatter:
    """Turns a dialogue into Llama-3.1 chat tokens with the prompt masked out of the loss.

    ``input_ids = chat_template(system, user) + assistant header + reply + <|eot_id|>``;
    labels are ``-100`` over everything before the reply, so the loss covers
    the reply and its end-of-turn token only.
    """

    def __init__(self, tokenizer, system_prompt: str = DEFAULT_SYSTEM_PROMPT, max_seq_length: int = 2048,
                 on_too_long: str = "error") -> None:
        from .tokenizer import end_of_turn_id

        if on_too_long not in ("error", "truncate", "drop"):
            raise UserError(f"on_too_long must be 'error', 'truncate' or 'drop', not {on_too_long!r}")
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.max_seq_length = max_seq_length
        self.on_too_long = on_too_long
        self.eot_id = end_of_turn_id(tokenizer)

    def messages(self, prompt: str) -> list[dict]:
        msgs = []
        if self.system_prompt:
            msgs.append({"role": "system", "content": self.system_prompt})
        msgs.append({"role": "user", "content": prompt})
        return msgs

    def prompt_ids(self, prompt: str) -> list[int]:
        out = self.tokenizer.apply_chat_template(self.messages(prompt), add_generation_prompt=True, tokenize=True)
        if isinstance(out, dict) or hasattr(out, "keys"):
            out = out["input_ids"]
        return list(out)

    def encode(self, d: Dialogue) -> Optional[dict]:
        p_ids = self.prompt_ids(d.prompt)
        r_ids = self.tokenizer(d.response, add_special_tokens=False)["input_ids"] + [self.eot_id]
        total = len(p_ids) + len(r_ids)
        if total > self.max_seq_length:
            if self.on_too_long == "error":
                raise UserError(
                    f"dialogue {d.id[:40]!r} is {total} tokens, longer than max_seq_length={self.max_seq_length} "
                    "(raise max_seq_length or set data.on_too_long to 'truncate' or 'drop')"
                )
            if self.on_too_long == "drop" or len(p_ids) >= self.max_seq_length:
                return None
            r_ids = r_ids[: self.max_seq_length - len(p_ids)]
        return {
            "input_ids": p_ids + r_ids,
            "labels": [IGNORE_INDEX] * len(p_ids) + r_ids,
            "prompt_ids": p_ids,
            "id": d.id,
            "prompt": d.prompt,
            "reference": d.response,
        }


def pack_examples(examples: Iterable[dict], max_seq_length: int) -> Iterator[dict]:
    """Greedily concatenate encoded examples into rows of at most ``max_seq_length`` tokens.

    Each packed row carries ``position_ids`` that restart at 0 for every example;
    with no attention mask, transformers turns that into a block-diagonal causal
    mask, so packed examples never attend to each other.
    """
    cur: dict = {"input_ids": [], "labels": [], "position_ids": [], "n_examples": 0}
    for ex in examples:
        n = len(ex["input_ids"])
        if cur["input_ids"] and len(cur["input_ids"]) + n > max_seq_length:
            yield cur
            cur = {"input_ids": [], "labels": [], "position_ids": [], "n_examples": 0}
        cur["input_ids"] += ex["input_ids"]
        cur["labels"] += ex["labels"]
        cur["position_ids"] += list(range(n))
        cur["n_examples"] += 1
    if cur["input_ids"]:
        yield cur


class Collator:
    """Pads a list of encoded examples into tensors (right padding for training,
    left-padded ``gen_input_ids`` for generation when prompts are present)."""

    def __init__(self, pad_id: int, pad_to_multiple_of: int = 8) -> None:
        self.pad_id = pad_id
        self.multiple = max(1, pad_to_multiple_of)

    def _width(self, n: int) -> int:
        return ((n + self.multiple - 1) // self.multiple) * self.multiple

    def __call__(self, batch: list[dict]) -> dict:
        width = self._width(max(len(ex["input_ids"]) for ex in batch))
        packed = "position_ids" in batch[0]
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        pos = torch.zeros((len(batch), width), dtype=torch.long)
        for i, ex in enumerate(batch):
            n = len(ex["input_ids"])
            ids[i, :n] = torch.tensor(ex["input_ids"])
            labels[i, :n] = torch.tensor(ex["labels"])
            mask[i, :n] = 1
            if packed:
                pos[i, :n] = torch.tensor(ex["position_ids"])
                pos[i, n:] = torch.arange(width - n)  # padding forms its own (masked-out) segment
            else:
                pos[i] = torch.arange(width)
        out = {"input_ids": ids, "labels": labels, "position_ids": pos, "n_tokens": mask.sum()}
        if packed:
            out["attention_mask"] = None
        else:
            out["attention_mask"] = mask
        if "prompt_ids" in batch[0]:
            pw = max(len(ex["prompt_ids"]) for ex in batch)
            gen = torch.full((len(batch), pw), self.pad_id, dtype=torch.long)
            gmask = torch.zeros((len(batch), pw), dtype=torch.long)
            for i, ex in enumerate(batch):
                n = len(ex["prompt_ids"])
                gen[i, pw - n:] = torch.tensor(ex["prompt_ids"])
                gmask[i, pw - n:] = 1
            out["gen_input_ids"] = gen
            out["gen_attention_mask"] = gmask
            out["id"] = [ex["id"] for ex in batch]
            out["prompt"] = [ex["prompt"] for ex in batch]
            out["reference"] = [ex["reference"] for ex in batch]
        return out


# --------------------------------------------------------------------------- datasets


class EncodedDataset(Dataset):
    def __init__(self, examples: list[dict]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return self.examples[i]


class StreamingDataset(IterableDataset):
    """Reads, encodes (and optionally packs) one split lazily, with a shuffle buffer.

    Safe with several DataLoader workers and several processes: rows are dealt
    out round-robin over (rank, worker) so no row is seen twice in an epoch.
    """

    def __init__(self, reader: CorpusReader, formatter: ChatFormatter, split: str, pack: bool = False,
                 shuffle_buffer: int = 0, seed: int = 42, rank: int = 0, world_size: int = 1) -> None:
        self.reader = reader
        self.formatter = formatter
        self.split = split
        self.pack = pack
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.epoch = 0
        self.rank = rank
        self.world_size = world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _shard(self, it: Iterator) -> Iterator:
        info = torch.utils.data.get_worker_info()
        workers, wid = (info.num_workers, info.id) if info else (1, 0)
        shards = workers * self.world_size
        index = self.rank * workers + wid
        return itertools.islice(it, index, None, shards)

    def _shuffled(self, it: Iterator) -> Iterator:
        if self.shuffle_buffer <= 1:
            yield from it
            return
        rng = random.Random(self.seed + self.epoch)
        buf: list = []
        for x in it:
            buf.append(x)
            if len(buf) >= self.shuffle_buffer:
                yield buf.pop(rng.randrange(len(buf)))
        rng.shuffle(buf)
        yield from buf

    def __iter__(self) -> Iterator[dict]:
        encoded = (self.formatter.encode(d) for d in self._shard(self.reader.iter_split(self.split)))
        encoded = (e for e in encoded if e is not None)
        encoded = self._shuffled(encoded)
        if self.pack:
            yield from pack_examples(encoded, self.formatter.max_seq_length)
        else:
            yield from encoded


class EmpatheticDialogueDataModule(L.LightningDataModule):
    """LightningDataModule for a Bengali empathetic-dialogue corpus.

    Args:
        corpus_path: CSV/TSV/JSONL file; ``None`` uses the bundled sample.
        tokenizer_path: local tokenizer/checkpoint directory; ``None`` uses the
            embedded Llama-3.1 tokenizer (linked to ``model.model_name_or_path`` by the CLI).
        prompt_column / response_column: column names of the user turn and the reply.
        system_prompt: system turn (Bengali by default).
        max_seq_length: longest tokenised dialogue.
        on_too_long: 'error' (default), 'truncate' the reply, or 'drop' the row.
        pack: concatenate training dialogues into rows of ``max_seq_length`` tokens.
        streaming: read the file lazily instead of loading it (for large corpora).
        predict_split: split used by ``predict`` ('test' by default).
        max_predict_samples: cap on dialogues for ``predict`` (``None`` = all).
    """

    def __init__(
        self,
        corpus_path: Optional[str] = None,
        tokenizer_path: Optional[str] = None,
        prompt_column: str = "prompt",
        response_column: str = "response",
        id_column: Optional[str] = "id",
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        max_seq_length: int = 2048,
        on_too_long: str = "error",
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        batch_size: int = 4,
        eval_batch_size: Optional[int] = None,
        pack: bool = False,
        streaming: bool = False,
        shuffle_buffer: int = 1000,
        num_workers: int = 0,
        predict_split: str = "test",
        max_predict_samples: Optional[int] = None,
        seed: int = 42,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if predict_split not in SPLITS:
            raise UserError(f"predict_split must be one of {SPLITS}, not {predict_split!r}")
        if batch_size < 1:
            raise UserError(f"batch_size must be >= 1, not {batch_size}")
        if max_seq_length < 16:
            raise UserError(f"max_seq_length must be >= 16, not {max_seq_length}")
        if on_too_long not in ("error", "truncate", "drop"):
            raise UserError(f"on_too_long must be 'error', 'truncate' or 'drop', not {on_too_long!r}")
        self.corpus_path = Path(corpus_path) if corpus_path else bundled_corpus_path()
        self.reader = CorpusReader(
            self.corpus_path, prompt_column, response_column, id_column,
            val_fraction=val_fraction, test_fraction=test_fraction, seed=seed,
        )
        self.reader.check()  # bad input fails here, before any output is written
        self.tokenizer_path = tokenizer_path
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.pack = pack
        self.streaming = streaming
        self._tokenizer = None
        self.datasets: dict[str, Dataset] = {}
        self.stats: dict[str, dict] = {}

    # -- tokenizer / formatter
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from .tokenizer import load_tokenizer

            self._tokenizer = load_tokenizer(self.tokenizer_path)
        return self._tokenizer

    @property
    def formatter(self) -> ChatFormatter:
        return ChatFormatter(self.tokenizer, self.hparams.system_prompt, self.hparams.max_seq_length,
                             self.hparams.on_too_long)

    def collator(self) -> Collator:
        return Collator(self.tokenizer.pad_token_id)

    # -- setup
    def setup(self, stage: Optional[str] = None) -> None:
        if self.datasets:
            return
        fmt = self.formatter
        if self.streaming:
            rank = self.trainer.global_rank if self.trainer is not None else 0
            world = self.trainer.world_size if self.trainer is not None else 1
            for split in SPLITS:
                self.datasets[split] = StreamingDataset(
                    self.reader, fmt, split, pack=self.pack and split == "train",
                    shuffle_buffer=self.hparams.shuffle_buffer if split == "train" else 0,
                    seed=self.hparams.seed, rank=rank, world_size=world,
                )
            return
        rows = self.reader.read_all()
        for split in SPLITS:
            enc = [e for e in (fmt.encode(d) for d in rows[split]) if e is not None]
            dropped = len(rows[split]) - len(enc)
            n_tok = sum(len(e["input_ids"]) for e in enc)
            n_lab = sum(sum(1 for x in e["labels"] if x != IGNORE_INDEX) for e in enc)
            self.stats[split] = {"dialogues": len(enc), "dropped": dropped, "tokens": n_tok, "reply_tokens": n_lab}
            if split == "train" and self.pack:
                rng = random.Random(self.hparams.seed)
                order = enc[:]
                rng.shuffle(order)
                enc = list(pack_examples(order, self.hparams.max_seq_length))
            self.datasets[split] = EncodedDataset(enc)
        if not self.stats["train"]["dialogues"]:
            raise UserError(f"no training dialogues in {self.corpus_path} after the split")

    def prepare(self) -> None:
        """Tokenise and validate everything up front (called by the CLI before running)."""
        self.setup("fit")

    # -- loaders
    def _loader(self, split: str, train: bool, limit: Optional[int] = None) -> DataLoader:
        ds = self.datasets[split]
        if limit is not None and isinstance(ds, EncodedDataset):
            ds = EncodedDataset(ds.examples[:limit])
        shuffle = train and isinstance(ds, EncodedDataset)
        return DataLoader(
            ds, batch_size=self.batch_size if train else self.eval_batch_size, shuffle=shuffle,
            collate_fn=self.collator(), num_workers=self.hparams.num_workers,
            generator=torch.Generator().manual_seed(self.hparams.seed) if shuffle else None,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.hparams.predict_split, False, self.hparams.max_predict_samples)
