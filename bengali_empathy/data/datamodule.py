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


def tokenizer_path_for(model_name_or_path: str) -> Optional[str]:
    """The data module reads the tokenizer of the model being trained (the embedded one for the tiny model)."""
    from ..models.modeling import TINY_MODEL

    return None if model_name_or_path == TINY_MODEL else model_name_or_path


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


def stats_main(argv: list[str]) -> int:
    """Print per-split corpus statistics for a config's ``data`` section (no model is loaded)."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    from ..models.modeling import TINY_MODEL

    p = ArgumentParser(prog="python -m bengali_empathy data-stats",
                       description="Rows, conversations, turns, token-length percentiles, % over max_seq_length "
                                   "and reply tokens per split, for the data section of a fit config.")
    p.add_argument("--config", action=ActionConfigFile)
    p.add_class_arguments(EmpatheticDialogueDataModule, "data")
    # The rest of a fit config is accepted and ignored, except the model path that selects the tokenizer.
    p.add_argument("--model", type=dict, default={})
    p.add_argument("--trainer", type=dict, default={})
    p.add_argument("--seed_everything", type=Optional[int], default=None)
    p.add_argument("--json", type=Optional[str], default=None, help="also write the statistics to this JSON file")
    cfg = p.parse_args(argv)
    data = cfg.data.as_dict() if hasattr(cfg.data, "as_dict") else dict(cfg.data)
    if data.get("tokenizer_path") is None:
        data["tokenizer_path"] = tokenizer_path_for((cfg.model or {}).get("model_name_or_path", TINY_MODEL))
    data["objective"] = (cfg.model or {}).get("objective", "sft")  # linked in fit: the rows' layout follows it
    counted_not_raised = data.get("on_too_long") == "error"
    if counted_not_raised:  # count every too-long row instead of stopping at the first
        data["on_too_long"] = "drop"
    dm = EmpatheticDialogueDataModule(**data)
    stats = dm.compute_stats()
    print(format_stats(stats, dm.hparams.max_seq_length))
    if counted_not_raised and any(s["dropped_too_long"] for s in stats.values()):
        print("note: on_too_long=error, so fit would stop at the first of the dropped_too_long rows; "
              "set data.on_too_long to drop, truncate or truncate_history")
    if cfg.json:
        import json

        from .._io import atomic_write_text

        atomic_write_text(Path(cfg.json), json.dumps(stats, indent=2) + "\n")
    return 0
