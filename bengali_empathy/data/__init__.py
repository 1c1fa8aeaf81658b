"""Corpus rows -> conversations -> tokens -> batches, and the LightningDataModule that wires them.

Lower modules first (each imports only from those above it):

* :mod:`.pairs` -- the history and replies of preference rows (DPO pairs, KTO labels);
* :mod:`.formats` -- rows -> :class:`Conversation` (the layouts, one transform each; raw text) and the
  stable hash split;
* :mod:`.files` -- which files a corpus path names, how each is read, what a reader failure means;
* :mod:`.chat_format` -- :class:`ChatEncoder`, the tokenizer's own chat format as token ids;
* :mod:`.encode` -- conversation -> ids + reply label spans + the length policy (:class:`RowEncoder`);
* :mod:`.stats` -- per-split statistics;
* :mod:`.batching` -- packing, the per-epoch order, :class:`Collator` (loss tensors + ``eval_rows``);
* :mod:`.splits` -- the encoded splits in memory or streamed, behind one interface;
* :mod:`.datamodule` -- :class:`EmpatheticDialogueDataModule` (its ``facts`` are the model's view);
* :mod:`.stream_counts` -- :class:`StreamCounts`, the per-epoch report of a streamed corpus.
"""
from .batching import IGNORE_INDEX, Collator, EpochSampler, PackedDataset, pack_examples, pack_groups
from .chat_format import ChatEncoder
from .datamodule import EmpatheticDialogueDataModule, LoaderSettings, PredictSettings
from .encode import (
    ENCODING_VERSION, EncodeOptions, EncodingSettings, OnTooLong, RowEncoder, SplitSettings, TrainOn,
)
from .files import bundled_corpus_path, corpus_files, diagnose, load_file
from .formats import (
    DEFAULT_SYSTEM_PROMPT, SPLITS, Conversation, CorpusColumns, CorpusFormat, Objective, Split, split_of,
)
from .splits import CorpusSplits, InMemorySplits, StreamedSplits, StreamSplit
from .stats import KEPT, flat_stats, format_stats, split_stats
from .stream_counts import StreamCounts

__all__ = [
    "IGNORE_INDEX", "Collator", "EpochSampler", "PackedDataset", "pack_examples", "pack_groups", "ChatEncoder",
    "EmpatheticDialogueDataModule", "LoaderSettings", "PredictSettings", "ENCODING_VERSION", "EncodeOptions",
    "EncodingSettings", "OnTooLong", "RowEncoder", "SplitSettings", "TrainOn", "CorpusColumns",
    "bundled_corpus_path", "corpus_files", "diagnose", "load_file", "DEFAULT_SYSTEM_PROMPT", "SPLITS",
    "Conversation", "CorpusFormat", "Objective", "Split", "split_of", "CorpusSplits", "InMemorySplits", "StreamedSplits",
    "StreamSplit", "KEPT", "flat_stats", "format_stats", "split_stats", "StreamCounts",
]
