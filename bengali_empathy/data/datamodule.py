"""The LightningDataModule: options -> corpus files and formats -> encoded splits -> loaders, and the corpus facts."""
from __future__ import annotations

import sys
from functools import cached_property
from pathlib import Path
from typing import Optional

import lightning as L

from ..errors import UserError
from ..schema import CorpusFacts
from .tokenizer import load_tokenizer
from .batching import Collator
from .chat_format import PROBE_TURNS, ChatEncoder
from .encode import EncodeOptions, OnTooLong, RowEncoder, TrainOn, check_options, encode_in_memory
from .files import bundled_corpus_path, corpus_files, first_row
from .formats import DEFAULT_SYSTEM_PROMPT, CorpusFormat, Objective, Split
from .splits import Batching, CorpusSplits, InMemorySplits, StreamedSplits
from .stats import format_stats

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
        deduplicate: drop conversations identical to an earlier one (same system prompt and turns after NFC
            and white-space normalisation) before the split; counted as ``dropped_duplicate``. In memory only.
        text_column: raw text, one document per row (continued pretraining): ``<|begin_of_text|>`` + text +
            ``<|end_of_text|>``, the loss on every token, no chat format (with ``pack``: rows of ``max_seq_length``).
        objective: what the rows are for (linked from ``model.objective``): ``sft`` dialogues or raw text;
            ``dpo`` rows of ``prompt`` or ``messages`` (ending in a user turn) with ``chosen`` / ``rejected``;
            ``kto`` rows with ``completion`` / ``label`` (see :mod:`.pairs`).
    """

    def __init__(
        self, corpus_path: Optional[str] = None, tokenizer_path: Optional[str] = None,
        prompt_column: str = "prompt", response_column: str = "response", messages_column: Optional[str] = None,
        prompt_template: Optional[str] = None, response_template: Optional[str] = None,
        system_column: Optional[str] = None, id_column: Optional[str] = "id", group_column: Optional[str] = None,
        category_column: Optional[str] = None, system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        max_seq_length: int = 2048, on_too_long: OnTooLong = "error", train_on: TrainOn = "all_assistant",
        val_fraction: float = 0.1, test_fraction: float = 0.1, batch_size: int = 4,
        eval_batch_size: Optional[int] = None, pack: bool = False, group_by_length: bool = False,
        streaming: bool = False, shuffle_buffer: int = 1000, num_workers: int = 0, num_proc: Optional[int] = None,
        predict_split: Split = "test", max_predict_samples: Optional[int] = None, deduplicate: bool = False,
        seed: int = 42, text_column: Optional[str] = None, objective: Objective = "sft",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        check_options(batch_size, max_seq_length, val_fraction, test_fraction, deduplicate, streaming)
        if pack and objective != "sft":
            raise UserError(f"data.pack packs dialogues and raw text; objective {objective} compares whole replies: "
                            "set data.pack to false (data.group_by_length cuts the padding instead)")
        self.corpus_path = str(corpus_path) if corpus_path else str(bundled_corpus_path())
        # Bad columns or templates fail here, before any output is written.
        self.formats = {f: CorpusFormat(list(first_row(f)), str(f), prompt_column, response_column, messages_column,
                                        prompt_template, response_template, system_column, id_column, group_column,
                                        category_column, text_column, objective) for f in corpus_files(self.corpus_path)}
        self.splits: Optional[CorpusSplits] = None
        self.facts = CorpusFacts(self.corpus_path,
                                 training_texts=lambda: self.splits.training_texts() if self.splits else None,
                                 batching={"pack": pack, "group_by_length": group_by_length, "streaming": streaming})

    @cached_property
    def tokenizer(self):
        return load_tokenizer(self.hparams.tokenizer_path)

    def collator(self) -> Collator:
        return Collator(self.tokenizer.pad_token_id)

    @property
    def options(self) -> EncodeOptions:
        h = self.hparams
        return EncodeOptions(h.system_prompt, h.max_seq_length, h.on_too_long, h.train_on, h.val_fraction,
                             h.test_fraction, h.seed)

    def _encoders(self) -> dict[Path, RowEncoder]:
        chat = ChatEncoder(self.tokenizer)
        chat.check(self.hparams.system_prompt, PROBE_TURNS, f"tokenizer {self.hparams.tokenizer_path or 'embedded'}")
        return {f: RowEncoder(fmt, chat, self.options, str(f)) for f, fmt in self.formats.items()}

    def encoded(self):
        """The whole corpus encoded in memory (Arrow, cached: see :func:`~.encode.encode_in_memory`)."""
        return encode_in_memory(self._encoders(), self.options, self.hparams.num_proc)

    def setup(self, stage: Optional[str] = None) -> None:
        h = self.hparams
        batching = Batching(h.batch_size, h.eval_batch_size or h.batch_size, h.max_seq_length, h.pack,
                            h.group_by_length, h.num_workers, h.seed, self.collator())
        trainer = self.trainer
        rank_world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        if h.streaming:
            # The CLI's prepare() runs before DDP has started: shard the streams again once the
            # ranks are known, or every rank would stream the same rows.
            if self.splits is None or self.splits.sharded_for != rank_world:
                self.splits = StreamedSplits(self._encoders(), batching, h.shuffle_buffer, h.on_too_long == "error",
                                             *rank_world)
        elif self.splits is None:
            self.splits = InMemorySplits(self.encoded(), batching, h.deduplicate, h.on_too_long == "error",
                                         self.corpus_path)
            self.facts.stats.update(self.splits.stats)

    def compute_stats(self) -> dict[str, dict]:
        """Per-split statistics; streaming reads the corpus once for them."""
        self.setup()
        self.facts.stats.update(self.splits.compute_stats())
        return self.facts.stats

    def prepare(self) -> None:
        """Tokenise and validate up front (called by the CLI before a run), and print the statistics."""
        self.setup("fit")
        if self.facts.stats:
            print(format_stats(self.facts.stats, self.hparams.max_seq_length, self.hparams.deduplicate),
                  file=sys.stderr, flush=True)
        self.splits.check_echoes(list(dict.fromkeys(("val", "test", self.hparams.predict_split))))

    def train_dataloader(self):
        trainer = self.trainer
        return self.splits.loader("train", True, current_epoch=(lambda: trainer.current_epoch) if trainer else None)

    def val_dataloader(self):
        return self.splits.loader("val", False)

    def test_dataloader(self):
        return self.splits.loader("test", False)

    def predict_dataloader(self):
        return self.splits.loader(self.hparams.predict_split, False, self.hparams.max_predict_samples)
