"""The encoded splits in memory or streamed: the same rows either way, the per-epoch order, ranks, the counts of a
stream and deduplication (bengali_empathy.data.splits)."""

import pytest

from bengali_empathy.data import (
    EmpatheticDialogueDataModule, EncodingSettings, LoaderSettings, PredictSettings, SplitSettings,
)
from bengali_empathy.errors import UserError
from conftest import write_jsonl


def _pairs(n):
    return [{"id": f"r{i}", "prompt": f"প্রশ্ন নম্বর {i}", "response": f"উত্তর নম্বর {i}"} for i in range(n)]



def test_streaming_split_equals_in_memory_and_predict_cap(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", _pairs(200))
    mem = EmpatheticDialogueDataModule(corpus_path=path, predict=PredictSettings(max_samples=5))
    mem.setup()
    st = EmpatheticDialogueDataModule(corpus_path=path, streaming=True, loading=LoaderSettings(shuffle_buffer=0),
                                      predict=PredictSettings(max_samples=5))
    st.setup()
    for split in ("val", "test"):
        assert [ex["id"] for ex in st.splits.datasets[split]] == list(mem.splits.datasets[split]["id"])
    assert len(list(st.splits.datasets["train"])) == len(mem.splits.datasets["train"])
    for dm in (mem, st):
        assert sum(len(b["eval_rows"]) for b in dm.predict_dataloader()) == 5



def _unpadded(loader):
    return [tuple(b["input_ids"][0][b["attention_mask"][0].bool()].tolist()) for b in loader]



def test_streaming_order_changes_every_epoch_and_ranks_are_disjoint(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", _pairs(120))
    dm = EmpatheticDialogueDataModule(corpus_path=path, streaming=True, batch_size=1,
                                      loading=LoaderSettings(shuffle_buffer=50))
    dm.setup()
    loader = dm.train_dataloader()  # nobody calls set_epoch: the loader counts its passes
    first = _unpadded(loader)
    second = _unpadded(loader)
    assert sorted(first) == sorted(second) and first != second

    class Rank:
        def __init__(self, r):
            self.global_rank, self.world_size = r, 2

    seen = []
    for r in (0, 1):
        dm = EmpatheticDialogueDataModule(corpus_path=path, streaming=True, loading=LoaderSettings(shuffle_buffer=50))
        dm.trainer = Rank(r)
        dm.setup()
        seen.append({tuple(ex["input_ids"]) for ex in dm.splits.datasets["train"]})
    assert seen[0] and seen[1] and not (seen[0] & seen[1])
    assert seen[0] | seen[1] == set(first)



def test_streaming_counts_dropped_and_truncated_rows(tmp_path):
    rows = _pairs(30) + [{"id": "long", "prompt": "দীর্ঘ " * 300, "response": "খ"}, {"id": "e", "prompt": "ক", "response": ""}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    dm = EmpatheticDialogueDataModule(corpus_path=path, streaming=True, max_seq_length=256,
                                      encoding=EncodingSettings(on_too_long="drop"),
                                      split=SplitSettings(val_fraction=0.0, test_fraction=0.0))
    dm.setup()
    assert len(list(dm.splits.datasets["train"])) == 30
    assert dm.splits.counts("train") == {"ok": 30, "too_long": 1, "empty": 1}



def test_deduplicate_drops_normalised_repeats_before_the_split(tmp_path):
    base = [{"id": f"r{i}", "prompt": f"প্রশ্ন নম্বর {i}", "response": f"উত্তর নম্বর {i}"} for i in range(30)]
    repeats = [{"id": "d1", "prompt": "প্রশ্ন  নম্বর 3 ", "response": "উত্তর নম্বর 3"},  # white space differs
               {"id": "d2", "prompt": "য\u09bcাত্রা", "response": "শুভ"},  # NFD ...
               {"id": "d3", "prompt": "\u09dfাত্রা", "response": "শুভ"}]  # ... and NFC: one conversation
    path = write_jsonl(tmp_path / "d.jsonl", base + repeats)
    kept = lambda dm: sum(s["kept"] for s in dm.facts.stats.values())  # noqa: E731
    plain = EmpatheticDialogueDataModule(corpus_path=path)
    plain.setup()
    dedup = EmpatheticDialogueDataModule(corpus_path=path, split=SplitSettings(deduplicate=True))
    dedup.setup()
    assert kept(plain) == 33 and kept(dedup) == 31
    assert sum(s["dropped_duplicate"] for s in dedup.facts.stats.values()) == 2
    with pytest.raises(UserError, match="deduplicate needs the corpus in memory"):
        EmpatheticDialogueDataModule(corpus_path=path, streaming=True, split=SplitSettings(deduplicate=True))


def test_streamed_training_split_follows_the_trainers_epoch(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", _pairs(80))

    class Trainer:  # what the loader reads of Lightning's trainer
        global_rank, world_size, current_epoch = 0, 1, 0

    dm = EmpatheticDialogueDataModule(corpus_path=path, streaming=True, batch_size=1,
                                      loading=LoaderSettings(shuffle_buffer=40))
    dm.setup()
    passes = dm.train_dataloader()
    epoch0, epoch1 = _unpadded(passes), _unpadded(passes)
    resumed = EmpatheticDialogueDataModule(corpus_path=path, streaming=True, batch_size=1,
                                           loading=LoaderSettings(shuffle_buffer=40))
    resumed.trainer = Trainer()
    resumed.setup()
    loader = resumed.train_dataloader()
    Trainer.current_epoch = 1  # a run resumed in epoch 1 shuffles as the first run's second pass did
    assert _unpadded(loader) == epoch1 != epoch0
    Trainer.current_epoch = 0
    assert _unpadded(loader) == epoch0
