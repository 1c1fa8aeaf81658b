"""The LightningDataModule: options -> corpus files and formats -> encoded splits -> loaders, and the corpus facts."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Optional

import lightning as L

from ..errors import UserError
from ..schema import CorpusFacts
from .tokenizer import load_tokenizer, read_chat_template
from .batching import Collator
from .chat_format import PROBE_TURNS, ChatEncoder
from .encode import EncodeOptions, EncodingSettings, RowEncoder, SplitSettings, check_options, encode_in_memory
from .files import bundled_corpus_path, corpus_files, first_row
from .formats import DEFAULT_SYSTEM_PROMPT, CorpusColumns, Objective, Split
from .splits import Batching, CorpusSplits, InMemorySplits, StreamedSplits
from .stats import format_stats

@dataclass(frozen=True)
class LoaderSettings:
    """How the loaders read (``data.loading``).

    Args:
        shuffle_buffer: streaming shuffle buffer (rows).
        num_workers: DataLoader worker processes.
        num_proc: processes for tokenising in memory (``None``: all cores for large corpora).
    """

    shuffle_buffer: int = 1000
    num_workers: int = 0
    num_proc: Optional[int] = None


@dataclass(frozen=True)
class PredictSettings:
    """What ``predict`` reads (``data.predict``): the ``split``, and at most ``max_samples`` conversations of it
    (``None`` = all)."""

    split: Split = "test"
    max_samples: Optional[int] = None


class EmpatheticDialogueDataModule(L.LightningDataModule):
    """LightningDataModule for Bengali conversations (single exchanges or multi-turn).

    Args:
        corpus_path: a .jsonl/.json/.csv/.tsv/.parquet file, a directory of them, or a glob;
            ``None`` uses the bundled sample (pairs + multi-turn conversations).
        tokenizer_path: local tokenizer/checkpoint directory; ``None`` uses the embedded
            Llama-3.1 tokenizer (linked to ``model.model_name_or_path`` by the CLI).
        system_prompt: default system turn (Bengali).
        max_seq_length: longest tokenised conversation.
        batch_size / eval_batch_size: training and evaluation batch sizes.
        pack: concatenate training conversations into rows of ``max_seq_length`` tokens.
        group_by_length: without packing, batch conversations of similar length together
            (less padding; the order still changes every epoch).
        streaming: read the corpus lazily (shuffle buffer, sharded per rank) instead of an Arrow cache.
        objective: what the rows are for (linked from ``model.objective.name``): ``sft`` dialogues or raw text;
            ``dpo`` rows of ``prompt`` or ``messages`` (ending in a user turn) with ``chosen`` / ``rejected``;
            ``kto`` rows with ``completion`` / ``label`` (see :mod:`.pairs`).
        columns: the corpus layout (:class:`~.formats.CorpusColumns`).
        encoding: too-long conversations, which replies are trained on and the chat template
            (:class:`~.encode.EncodingSettings`).
        split: the hash split and deduplication (:class:`~.encode.SplitSettings`).
        loading / predict: see :class:`LoaderSettings` and :class:`PredictSettings`.
    """

    def __init__(
        self, corpus_path: Optional[str] = None, tokenizer_path: Optional[str] = None,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT, max_seq_length: int = 2048, batch_size: int = 4,
        eval_batch_size: Optional[int] = None, pack: bool = False, group_by_length: bool = False,
        streaming: bool = False, objective: Objective = "sft", columns: CorpusColumns = CorpusColumns(),
        encoding: EncodingSettings = EncodingSettings(), split: SplitSettings = SplitSettings(),
        loading: LoaderSettings = LoaderSettings(), predict: PredictSettings = PredictSettings(),
    ) -> None:
        super().__init__()
        # The objective is the model's (linked from model.objective.name, a group there): Lightning refuses to log
        # one key with two different values.
        self.save_hyperparameters(ignore=["objective"])
        # The groups as given (under the CLI, hparams hold them as the config's plain dicts).
        self.columns, self.encoding, self.split, self.loading, self.predict = columns, encoding, split, loading, predict
        check_options(batch_size, max_seq_length, split.deduplicate, streaming)
        if pack and objective != "sft":
            raise UserError(f"data.pack packs dialogues and raw text; objective {objective} compares whole replies: "
                            "set data.pack to false (data.group_by_length cuts the padding instead)")
        self.corpus_path = str(corpus_path) if corpus_path else str(bundled_corpus_path())
        # Bad columns or templates fail here, before any output is written.
        self.chat_template = read_chat_template(encoding.chat_template) if encoding.chat_template else None
        self.formats = {f: columns.format_of(list(first_row(f)), str(f), objective)
                        for f in corpus_files(self.corpus_path)}
        self.splits: Optional[CorpusSplits] = None
        self.facts = CorpusFacts(self.corpus_path,
                                 training_texts=lambda: self.splits.training_texts() if self.splits else None,
                                 batching={"pack": pack, "group_by_length": group_by_length, "streaming": streaming})

    @cached_property
    def tokenizer(self):
        tok = load_tokenizer(self.hparams.tokenizer_path)
        if self.chat_template is not None:
            tok.chat_template = self.chat_template
        elif not tok.chat_template:  # the embedded tokenizer always has one
            raise UserError(f"the tokenizer of {self.hparams.tokenizer_path} has no chat template: set "
                            "data.encoding.chat_template to a template file or Jinja text (e.g. ChatML)")
        return tok

    def collator(self) -> Collator:
        return Collator(self.tokenizer.pad_token_id)

    @property
    def options(self) -> EncodeOptions:
        h = self.hparams
        return EncodeOptions(h.system_prompt, h.max_seq_length, self.encoding.on_too_long, self.encoding.train_on,
                             self.split.val_fraction, self.split.test_fraction, self.split.seed)

    def _encoders(self) -> dict[Path, RowEncoder]:
        where = ("data.encoding.chat_template" if self.chat_template is not None
                 else f"tokenizer {self.hparams.tokenizer_path or 'embedded'}")
        try:
            chat = ChatEncoder(self.tokenizer)
        except UserError as exc:  # a template this package cannot train on: say which one
            raise UserError(f"{where}: {exc}") from exc
        chat.check(self.hparams.system_prompt, PROBE_TURNS, where)
        return {f: RowEncoder(fmt, chat, self.options, str(f)) for f, fmt in self.formats.items()}

    def encoded(self):
        """The whole corpus encoded in memory (Arrow, cached: see :func:`~.encode.encode_in_memory`)."""
        return encode_in_memory(self._encoders(), self.options, self.loading.num_proc)

    def setup(self, stage: Optional[str] = None) -> None:
        h = self.hparams
        self.facts.chat_template = self.tokenizer.chat_template
        batching = Batching(h.batch_size, h.eval_batch_size or h.batch_size, h.max_seq_length, h.pack,
                            h.group_by_length, self.loading.num_workers, self.split.seed, self.collator())
        trainer = self.trainer
        rank_world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        if h.streaming:
            # The CLI's prepare() runs before DDP has started: shard the streams again once the
            # ranks are known, or every rank would stream the same rows.
            if self.splits is None or self.splits.sharded_for != rank_world:
                self.splits = StreamedSplits(self._encoders(), batching, self.loading.shuffle_buffer,
                                             self.encoding.on_too_long == "error", *rank_world)
        elif self.splits is None:
            self.splits = InMemorySplits(self.encoded(), batching, self.split.deduplicate,
                                         self.encoding.on_too_long == "error", self.corpus_path)
            self.facts.stats.update(self.splits.stats)

    def compute_stats(self) -> dict[str, dict]:
        """Per-split statistics, with the tokenizer's tokens per word and per character of the turns' texts
        (:func:`~.stats.text_stats`); streaming reads the corpus once for them."""
        self.setup()
        tok = self.tokenizer
        tokenize = lambda texts: tok(texts, add_special_tokens=False)["input_ids"]  # noqa: E731
        self.facts.stats.update(self.splits.compute_stats(tokenize))
        return self.facts.stats

    def prepare(self) -> None:
        """Tokenise and validate up front (called by the CLI before a run), and print the statistics."""
        self.setup("fit")
        if self.facts.stats:
            print(format_stats(self.facts.stats, self.hparams.max_seq_length, self.split.deduplicate),
                  file=sys.stderr, flush=True)
        self.splits.check_echoes(list(dict.fromkeys(("val", "test", self.predict.split))))

    def train_dataloader(self):
        trainer = self.trainer
        return self.splits.loader("train", True, current_epoch=(lambda: trainer.current_epoch) if trainer else None)

    def val_dataloader(self):
        return self.splits.loader("val", False)

    def test_dataloader(self):
        return self.splits.loader("test", False)

    def predict_dataloader(self):
        return self.splits.loader(self.predict.split, False, self.predict.max_samples)
