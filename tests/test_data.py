import json

import pytest
import torch

from bengali_empathy.data import (
    IGNORE_INDEX, ChatFormatter, Collator, CorpusReader, Dialogue, EmpatheticDialogueDataModule, StreamingDataset,
    bundled_corpus_path, pack_examples,
)
from bengali_empathy.errors import UserError

D = Dialogue(id="x1", prompt="আমার খুব মন খারাপ।", response="আপনার কষ্টটা বুঝতে পারছি। কী হয়েছে বলবেন?")


def test_bundled_corpus_is_real_bengali_and_a_few_hundred_pairs():
    rows = [json.loads(line) for line in bundled_corpus_path().read_text(encoding="utf-8").splitlines()]
    assert 150 <= len(rows) <= 1000
    assert len({r["id"] for r in rows}) == len(rows)
    assert len({r["prompt"] for r in rows}) == len(rows)
    for r in rows:
        bengali = sum("\u0980" <= ch <= "\u09ff" for ch in r["prompt"] + r["response"])
        assert bengali / len(r["prompt"] + r["response"]) > 0.6


def test_prompt_is_masked_and_reply_ends_with_eot(tokenizer):
    fmt = ChatFormatter(tokenizer, max_seq_length=1024)
    ex = fmt.encode(D)
    ids, labels = ex["input_ids"], ex["labels"]
    n_prompt = len(ex["prompt_ids"])
    assert ids[:n_prompt] == ex["prompt_ids"]
    assert all(x == IGNORE_INDEX for x in labels[:n_prompt])
    assert labels[n_prompt:] == ids[n_prompt:]
    assert ids[-1] == tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert tokenizer.decode(ids[n_prompt:-1]) == D.response
    prompt_text = tokenizer.decode(ex["prompt_ids"])
    assert prompt_text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert "সহমর্মী" in prompt_text and D.prompt in prompt_text  # Bengali system prompt + user turn


def test_too_long_error_truncate_drop(tokenizer):
    n = len(ChatFormatter(tokenizer, max_seq_length=4096).encode(D)["input_ids"])
    with pytest.raises(UserError, match="longer than max_seq_length"):
        ChatFormatter(tokenizer, max_seq_length=n - 3).encode(D)
    ex = ChatFormatter(tokenizer, max_seq_length=n - 3, on_too_long="truncate").encode(D)
    assert len(ex["input_ids"]) == n - 3 and len(ex["labels"]) == n - 3
    assert ChatFormatter(tokenizer, max_seq_length=n - 3, on_too_long="drop").encode(D) is None


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def test_split_is_stable_and_same_when_streaming(tmp_path, tokenizer):
    rows = [{"id": f"r{i}", "prompt": f"প্রশ্ন {i}", "response": f"উত্তর {i}"} for i in range(300)]
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    _write_jsonl(a, rows)
    _write_jsonl(b, rows[::-1])
    ra, rb = CorpusReader(a).read_all(), CorpusReader(b).read_all()
    for split in ("train", "val", "test"):
        assert sorted(d.id for d in ra[split]) == sorted(d.id for d in rb[split])
        assert [d.id for d in CorpusReader(a).iter_split(split)] == [d.id for d in ra[split]]
    assert 15 <= len(ra["val"]) <= 45 and 15 <= len(ra["test"]) <= 45  # ~10% each
    ids = [set(d.id for d in ra[s]) for s in ("train", "val", "test")]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    # the streaming dataset yields exactly the in-memory train split
    fmt = ChatFormatter(tokenizer, max_seq_length=512)
    streamed = [ex["id"] for ex in StreamingDataset(CorpusReader(a), fmt, "train")]
    assert streamed == [d.id for d in ra["train"]]


def test_csv_with_custom_columns(tmp_path):
    p = tmp_path / "c.csv"
    p.write_text('situation,reply\n"আমি ক্লান্ত, খুব ক্লান্ত।","বিশ্রাম নিন।"\n', encoding="utf-8")
    dm = EmpatheticDialogueDataModule(corpus_path=str(p), prompt_column="situation", response_column="reply",
                                      val_fraction=0.0, test_fraction=0.0)
    dm.setup()
    assert dm.stats["train"]["dialogues"] == 1
    assert dm.datasets["train"][0]["prompt"] == "আমি ক্লান্ত, খুব ক্লান্ত।"


@pytest.mark.parametrize("content,suffix,message", [
    (None, ".jsonl", "corpus file not found"),
    ("", ".jsonl", "corpus is empty"),
    ('{"question": "ক", "answer": "খ"}\n', ".jsonl", "missing column"),
    ("a,b\n1,2\n", ".csv", "missing column"),
    ("{not json\n", ".jsonl", "invalid JSON"),
    ("x", ".parquet", "unsupported corpus format"),
])
def test_bad_corpus_gives_clear_error(tmp_path, content, suffix, message):
    p = tmp_path / f"corpus{suffix}"
    if content is not None:
        p.write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match=message):
        EmpatheticDialogueDataModule(corpus_path=str(p))


def test_collator_pads_right_for_training_and_left_for_generation():
    batch = [
        {"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "prompt_ids": [1], "id": "a", "prompt": "p", "reference": "r"},
        {"input_ids": [4, 5], "labels": [-100, 5], "prompt_ids": [4, 6], "id": "b", "prompt": "q", "reference": "s"},
    ]
    out = Collator(pad_id=0, pad_to_multiple_of=4)(batch)
    assert out["input_ids"].tolist() == [[1, 2, 3, 0], [4, 5, 0, 0]]
    assert out["labels"].tolist() == [[-100, 2, 3, -100], [-100, 5, -100, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0]]
    assert out["gen_input_ids"].tolist() == [[0, 1], [4, 6]]
    assert out["gen_attention_mask"].tolist() == [[0, 1], [1, 1]]


def test_packing_restarts_positions_and_keeps_examples_apart(tiny_lora):
    backend, model, tok = tiny_lora
    fmt = ChatFormatter(tok, max_seq_length=4096)
    exs = [fmt.encode(Dialogue(id=str(i), prompt=p, response=r)) for i, (p, r) in enumerate(
        [("আমি একা।", "আমি আছি, বলুন।"), ("ভয় লাগছে।", "ভয় পাওয়া স্বাভাবিক।"), ("খুশি!", "অভিনন্দন!")])]
    packed = list(pack_examples(exs, 4096))
    assert len(packed) == 1 and packed[0]["n_examples"] == 3
    lens = [len(e["input_ids"]) for e in exs]
    assert packed[0]["position_ids"][lens[0]] == 0 and packed[0]["position_ids"][lens[0] - 1] == lens[0] - 1
    # the packed loss equals the token-weighted loss of the examples run one by one
    collate = Collator(tok.pad_token_id)
    model.eval()
    with torch.no_grad():
        lp, n_p = backend.loss(model, collate(packed))
        singles = [backend.loss(model, collate([e])) for e in exs]
    weighted = sum(l * n for l, n in singles) / sum(n for _, n in singles)
    assert int(n_p) == sum(int(n) for _, n in singles)
    assert float(lp) == pytest.approx(float(weighted), rel=1e-4)
    # and packs never exceed the limit
    assert all(len(p["input_ids"]) <= 2 * max(lens) for p in pack_examples(exs * 4, 2 * max(lens)))


def test_datamodule_on_bundled_sample(tokenizer):
    dm = EmpatheticDialogueDataModule(max_seq_length=768, batch_size=4)
    dm.setup()
    assert dm.stats["train"]["dialogues"] > 100 and dm.stats["val"]["dialogues"] > 5
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == batch["labels"].shape
    assert batch["input_ids"].shape[0] == 4
    assert (batch["labels"] != IGNORE_INDEX).sum() > 0
