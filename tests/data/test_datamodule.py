"""The data module's contract with the model (eval_rows, facts, predict on any split), one parse per row, streams
sharded once DDP's ranks are known, and bad corpora as one ``error:`` line (the CLI in-process)."""
import json
import sys
from collections import Counter

import pytest

from bengali_empathy.cli import main
from bengali_empathy.data import (
    IGNORE_INDEX, CorpusFormat, EmpatheticDialogueDataModule, LoaderSettings, PredictSettings, SplitSettings,
)
from bengali_empathy.errors import UserError
from bengali_empathy.schema import CorpusFacts, EvalRow
from conftest import ROOT, write_jsonl

DEFAULT = ["--config", str(ROOT / "configs" / "default.yaml")]


def _pairs(n):
    return [{"id": f"r{i}", "prompt": f"প্রশ্ন নম্বর {i}", "response": f"উত্তর নম্বর {i}"} for i in range(n)]


@pytest.mark.parametrize("streaming", [False, True])
def test_eval_rows_are_unpadded_prompts_with_file_and_line(tmp_path, streaming):
    rows = _pairs(40)
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    dm = EmpatheticDialogueDataModule(corpus_path=path, streaming=streaming, eval_batch_size=4,
                                      loading=LoaderSettings(shuffle_buffer=0), split=SplitSettings(val_fraction=0.3))
    dm.setup()
    examples = list(dm.splits.datasets["val"])
    batches = list(dm.val_dataloader())
    got = [r for b in batches for r in b["eval_rows"]]
    assert len(got) == len(examples) > 4 and all(isinstance(r, EvalRow) for r in got)
    for r, ex in zip(got, examples):
        assert r.prompt_ids == list(ex["input_ids"][: ex["prompt_len"]])
        assert r.file == path and rows[r.line - 1]["id"] == r.id and r.reference == rows[r.line - 1]["response"]
        assert r.where == f"{path}: row {r.line}"
    for b in batches:  # the prompt is the start of the (right-padded) loss row, not padded itself
        for i, r in enumerate(b["eval_rows"]):
            assert b["input_ids"][i, : len(r.prompt_ids)].tolist() == r.prompt_ids
            assert int(b["attention_mask"][i].sum()) > len(r.prompt_ids)


def test_facts_carry_the_corpus_stats_and_training_texts(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", _pairs(50))
    dm = EmpatheticDialogueDataModule(corpus_path=path)
    facts = dm.facts
    assert isinstance(facts, CorpusFacts) and facts.corpus_path == path and facts.stats == {}
    assert facts.training_texts() is None  # not set up yet
    dm.setup()
    assert set(facts.stats) == {"train", "val", "test"} and facts.stats["train"]["kept"] > 30
    texts = facts.training_texts()  # every turn of every kept training conversation
    assert len(texts) == 2 * facts.stats["train"]["kept"]
    prompts, replies = texts[::2], texts[1::2]
    assert all(p.startswith("প্রশ্ন নম্বর") for p in prompts) and all(r.startswith("উত্তর নম্বর") for r in replies)
    streamed = EmpatheticDialogueDataModule(corpus_path=path, streaming=True)
    streamed.setup()
    assert streamed.facts.stats == {} and streamed.facts.training_texts() is None
    assert streamed.compute_stats()["train"]["kept"] == facts.stats["train"]["kept"]
    assert streamed.facts.stats["train"]["kept"] == facts.stats["train"]["kept"]


@pytest.mark.parametrize("streaming", [False, True])
def test_each_row_is_parsed_once(tmp_path, monkeypatch, streaming):
    path = write_jsonl(tmp_path / "p.jsonl", _pairs(30))
    calls = Counter()
    parse = CorpusFormat.conversation

    def counted(self, row, where):
        calls[where] += 1
        return parse(self, row, where)

    dm = EmpatheticDialogueDataModule(corpus_path=path, streaming=streaming, loading=LoaderSettings(shuffle_buffer=0),
                                      split=SplitSettings(val_fraction=0.0, test_fraction=0.0))
    monkeypatch.setattr(CorpusFormat, "conversation", counted)
    dm.setup()
    assert len(list(dm.splits.datasets["train"])) == 30
    assert len(calls) == 30 and set(calls.values()) == {1}


def _fit_error(tmp_path, monkeypatch, capsys, *extra):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["bengali_empathy"])  # LightningCLI would read pytest's arguments too
    rc = main(["fit", *DEFAULT, *extra])
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert not (tmp_path / "lightning_logs").exists()
    return lines[0]


def _non_utf8(tmp_path, suffix):
    rows = _pairs(30)
    if suffix == ".jsonl":
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    elif suffix == ".json":
        text = json.dumps(rows, ensure_ascii=False, indent=1)
    else:
        text = "prompt\tresponse\n" + "".join(f"{r['prompt']}\t{r['response']}\n" for r in rows)
    p = tmp_path / f"latin1{suffix}"
    p.write_bytes(text.encode("utf-8").replace("উত্তর নম্বর 7".encode("utf-8"), b"caf\xe9 7"))
    return p, text.splitlines().index(next(x for x in text.splitlines() if "উত্তর নম্বর 7" in x)) + 1


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".tsv"])
def test_non_utf8_corpus_is_one_line_naming_file_and_line(tmp_path, monkeypatch, capsys, suffix):
    p, line = _non_utf8(tmp_path, suffix)
    assert f"{p.name}:{line}: not UTF-8 text" in _fit_error(tmp_path, monkeypatch, capsys, "--data.corpus_path",
                                                             str(p))
    with pytest.raises(UserError, match=f"{p.name}:{line}: not UTF-8 text"):  # a .json fails on its first row
        streamed = EmpatheticDialogueDataModule(corpus_path=str(p), streaming=True,
                                                loading=LoaderSettings(shuffle_buffer=0))
        streamed.setup()
        for split in ("train", "val", "test"):
            list(streamed.splits.datasets[split])


def test_row_without_the_response_key_is_a_broken_row(tmp_path, monkeypatch, capsys):
    rows = _pairs(20)
    rows[5] = {"id": "x", "prompt": "কিছু একটা"}
    p = write_jsonl(tmp_path / "missing.jsonl", rows)
    message = _fit_error(tmp_path, monkeypatch, capsys, "--data.corpus_path", p)
    assert "missing.jsonl: row 6: no value for 'response' (the key is missing or null" in message
    streamed = EmpatheticDialogueDataModule(corpus_path=p, streaming=True, loading=LoaderSettings(shuffle_buffer=0))
    streamed.setup()
    with pytest.raises(UserError, match="missing.jsonl: row 6: no value for 'response'"):
        list(streamed.splits.datasets["train"])


def test_too_long_error_counts_the_rows_over_the_limit(tmp_path, monkeypatch, capsys):
    rows = _pairs(20)
    for i, n in ((3, 100), (8, 200), (12, 300)):
        rows[i]["prompt"] = "দীর্ঘ " * n
    p = write_jsonl(tmp_path / "long.jsonl", rows)
    message = _fit_error(tmp_path, monkeypatch, capsys, "--data.corpus_path", p, "--data.max_seq_length", "300")
    assert "long.jsonl: row 4: conversation is" in message and "longer than max_seq_length=300" in message
    assert "3 of 20 rows are longer (p50 " in message and "p99 " in message and "data.encoding.on_too_long" in message
    streamed = EmpatheticDialogueDataModule(corpus_path=p, streaming=True, max_seq_length=300,
                                            loading=LoaderSettings(shuffle_buffer=0),
                                            split=SplitSettings(val_fraction=0.0, test_fraction=0.0))
    streamed.setup()
    with pytest.raises(UserError, match="long.jsonl: row 4: conversation is .* the first of the stream"):
        list(streamed.splits.datasets["train"])


@pytest.mark.parametrize("streaming", [False, True])
def test_predict_on_the_training_split_has_prompts_even_when_packed(tmp_path, streaming):
    path = write_jsonl(tmp_path / "p.jsonl", _pairs(60))
    dm = EmpatheticDialogueDataModule(corpus_path=path, streaming=streaming, pack=True, eval_batch_size=4,
                                      loading=LoaderSettings(shuffle_buffer=0),
                                      predict=PredictSettings(split="train", max_samples=6))
    dm.setup()
    batches = list(dm.predict_dataloader())
    assert sum(len(b["eval_rows"]) for b in batches) == 6
    assert all(b["input_ids"].shape[0] == len(b["eval_rows"]) for b in batches)
    assert all(r.reference.startswith("উত্তর নম্বর") and r.prompt_ids for b in batches for r in b["eval_rows"])



def test_datamodule_on_bundled_sample(tokenizer):
    dm = EmpatheticDialogueDataModule(max_seq_length=1024, batch_size=4)
    dm.setup()
    assert dm.facts.stats["train"]["kept"] > 200 and dm.facts.stats["val"]["kept"] > 10
    assert dm.facts.stats["train"]["turns"] > 2 * dm.facts.stats["train"]["rows"]  # multi-turn conversations are in
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == batch["labels"].shape and batch["input_ids"].shape[0] == 4
    assert (batch["labels"] != IGNORE_INDEX).sum() > 0



def test_streams_prepared_before_ddp_are_sharded_once_ranks_are_known(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", _pairs(120))

    class Rank:  # what the data module reads of a DDP trainer
        global_rank, world_size = 0, 2

        def __init__(self, r):
            self.global_rank = r

    seen = []
    for r in (0, 1):
        dm = EmpatheticDialogueDataModule(corpus_path=path, streaming=True, loading=LoaderSettings(shuffle_buffer=0))
        dm.setup()  # the CLI's prepare(): one process, no ranks yet
        dm.trainer = Rank(r)
        dm.setup("fit")  # Lightning's setup inside the DDP process
        seen.append({tuple(ex["input_ids"]) for ex in dm.splits.datasets["train"]})
    assert seen[0] and seen[1] and not seen[0] & seen[1]
