"""Chat formatting, reply labels, length policy, packing, streaming and the data module (bengali_empathy.data)."""
import json

import pytest
import torch

from bengali_empathy.data import (
    DEFAULT_SYSTEM_PROMPT, IGNORE_INDEX, Collator, EmpatheticDialogueDataModule, EncodingSettings, LoaderSettings,
    PredictSettings, SplitSettings, bundled_corpus_path, format_stats, pack_examples, pack_groups,
)
from bengali_empathy.errors import UserError
from conftest import TWO_PAIRS, encode_pairs

LONG_CONV = [
    {"role": "user", "content": "গত মাসে আমার বাবা মারা গেছেন। এখনো বিশ্বাস হয় না।"},
    {"role": "assistant", "content": "আপনার বাবার মৃত্যুর খবরে আমি গভীরভাবে দুঃখিত। এই শোক খুব ভারী।"},
    {"role": "user", "content": "রাতে ঘুম আসে না, সারাক্ষণ তাঁর কথা মনে পড়ে।"},
    {"role": "assistant", "content": "ঘুম না আসা শোকের খুব সাধারণ প্রতিক্রিয়া। তাঁর কোন স্মৃতিটা বেশি মনে পড়ে?"},
    {"role": "user", "content": "ছোটবেলায় উনি আমাকে নদীর ধারে হাঁটতে নিয়ে যেতেন।"},
    {"role": "assistant", "content": "কী সুন্দর স্মৃতি। সেই হাঁটাগুলো আপনাদের ভালোবাসার চিহ্ন হয়ে থাকবে।"},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def dm_for(tmp_path, rows, **kwargs):
    dm = EmpatheticDialogueDataModule(corpus_path=write_jsonl(tmp_path / "c.jsonl", rows), **kwargs)
    dm.setup()
    return dm


def test_bundled_sample_has_pairs_and_multi_turn_bengali():
    pairs = [json.loads(x) for x in (bundled_corpus_path() / "sample_dialogues.jsonl").read_text("utf-8").splitlines()]
    convs = [json.loads(x) for x in (bundled_corpus_path() / "sample_conversations.jsonl").read_text("utf-8")
             .splitlines()]
    assert len(pairs) == 210 and len(convs) >= 60
    assert all(4 <= len(c["messages"]) <= 8 for c in convs)
    assert len({c["emotion"] for c in convs}) >= 10
    replies = [m["content"] for c in convs for m in c["messages"] if m["role"] == "assistant"]
    assert len(set(replies)) == len(replies)  # written, not templated
    for text in [m["content"] for c in convs for m in c["messages"]] + [p["response"] for p in pairs]:
        assert sum("\u0980" <= ch <= "\u09ff" for ch in text) / len(text) > 0.6


@pytest.mark.parametrize("turns", [
    LONG_CONV,
    [{"role": "user", "content": "?কেন এমন হলো\nবুঝি না"}, {"role": "assistant", "content": "Okay 123, চলুন  কথা বলি।"}],
    [{"role": "assistant", "content": "নমস্কার! কেমন আছেন?"}, {"role": "user", "content": "ভালো না।"},
     {"role": "assistant", "content": "শুনে খারাপ লাগল।"}],
])
def test_chat_encoder_equals_apply_chat_template(tokenizer, chat, turns):
    ids, spans = chat.assemble(*_tokenized(chat, DEFAULT_SYSTEM_PROMPT, turns))
    ref = tokenizer.apply_chat_template([{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}] + turns, tokenize=True)
    assert ids == list(ref["input_ids"] if hasattr(ref, "keys") else ref)
    replies = [t["content"] for t in turns if t["role"] == "assistant"]
    assert [tokenizer.decode(ids[s:e]) for s, e in spans] == [r + "<|eot_id|>" for r in replies]
    chat.check(DEFAULT_SYSTEM_PROMPT, turns, "here")


def _tokenized(chat, system, turns):
    texts = chat.tokenize([system] + [t["content"] for t in turns])
    return texts[0], [(t["role"], x) for t, x in zip(turns, texts[1:])]


@pytest.mark.parametrize("train_on", ["all_assistant", "last_assistant"])
def test_labels_cover_exactly_the_trained_replies(tmp_path, tokenizer, train_on):
    dm = dm_for(tmp_path, [{"messages": LONG_CONV}], split=SplitSettings(val_fraction=0.0, test_fraction=0.0),
                encoding=EncodingSettings(train_on=train_on))
    ex = dm.splits.datasets["train"][0]
    batch = dm.collator()([ex])
    labels, ids = batch["labels"][0], batch["input_ids"][0]
    trained = tokenizer.decode(ids[labels != IGNORE_INDEX])
    replies = [t["content"] + "<|eot_id|>" for t in LONG_CONV if t["role"] == "assistant"]
    assert trained == ("".join(replies) if train_on == "all_assistant" else replies[-1])
    assert int((labels != IGNORE_INDEX).sum()) == sum(e - s for s, e in zip(ex["label_spans"][::2],
                                                                               ex["label_spans"][1::2]))


def test_eval_prompt_is_history_up_to_the_final_reply(tmp_path, tokenizer):
    dm = dm_for(tmp_path, [{"id": "c", "messages": LONG_CONV}],
                split=SplitSettings(val_fraction=0.0, test_fraction=0.0))
    ex = dm.encoded()[0]
    prompt = tokenizer.decode(ex["input_ids"][: ex["prompt_len"]])
    assert prompt.endswith(LONG_CONV[4]["content"] + "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert LONG_CONV[5]["content"] not in prompt  # the reference is never inside the prompt
    assert ex["reference"] == LONG_CONV[5]["content"] and ex["prompt"] == LONG_CONV[4]["content"]


def test_too_long_policies(tmp_path, tokenizer, chat):
    full = len(chat.assemble(*_tokenized(chat, DEFAULT_SYSTEM_PROMPT, LONG_CONV))[0])
    final_only = len(chat.assemble(*_tokenized(chat, DEFAULT_SYSTEM_PROMPT, LONG_CONV[4:]))[0])
    rows = [{"id": "long", "messages": LONG_CONV}, {"id": "short", "messages": [
        {"role": "user", "content": "ক"}, {"role": "assistant", "content": "খ"}]}]
    limit = final_only + 5
    common = dict(max_seq_length=limit, split=SplitSettings(val_fraction=0.0, test_fraction=0.0))
    with pytest.raises(UserError, match=f"row 1: conversation is {full} tokens, longer than max_seq_length={limit}"):
        dm_for(tmp_path, rows, **common)
    dm = dm_for(tmp_path, rows, **common, encoding=EncodingSettings(on_too_long="drop"))
    st = dm.facts.stats["train"]
    assert (st["rows"], st["kept"], st["dropped_too_long"], st["dropped_empty"]) == (2, 1, 1, 0)
    assert "dropped_too_long" in format_stats(dm.facts.stats, limit)
    empty = dm_for(tmp_path, [{"prompt": "গ", "response": " "}, {"prompt": "ক", "response": "খ"}], **common)
    assert (empty.facts.stats["train"]["dropped_empty"], empty.facts.stats["train"]["kept"]) == (1, 1)
    dm = dm_for(tmp_path, rows, **common,
                encoding=EncodingSettings(on_too_long="truncate"))  # the cut would remove the whole final reply
    assert (dm.facts.stats["train"]["truncated"], dm.facts.stats["train"]["dropped_too_long"]) == (0, 1)
    dm = dm_for(tmp_path, rows, max_seq_length=full - 5, encoding=EncodingSettings(on_too_long="truncate"),
                split=SplitSettings(val_fraction=0.0, test_fraction=0.0))
    assert dm.facts.stats["train"]["truncated"] == 1
    assert max(len(ex["input_ids"]) for ex in dm.splits.datasets["train"]) == full - 5
    dm = dm_for(tmp_path, rows, **common, encoding=EncodingSettings(on_too_long="truncate_history"))
    enc = dm.encoded()
    long = enc[0]
    assert long["status"] == "truncated" and long["n_tokens"] == final_only and long["n_turns"] == 2
    text = tokenizer.decode(long["input_ids"])
    assert DEFAULT_SYSTEM_PROMPT in text and LONG_CONV[4]["content"] in text and LONG_CONV[0]["content"] not in text
    # with room for two exchanges, only the oldest one goes
    two = len(chat.assemble(*_tokenized(chat, DEFAULT_SYSTEM_PROMPT, LONG_CONV[2:]))[0])
    dm = dm_for(tmp_path, rows, max_seq_length=two, encoding=EncodingSettings(on_too_long="truncate_history"),
                split=SplitSettings(val_fraction=0.0, test_fraction=0.0))
    assert dm.encoded()[0]["n_turns"] == 4


def test_collator_pads_right_for_training_and_keeps_generation_prompts_unpadded():
    batch = [
        {"input_ids": [1, 2, 3], "label_spans": [1, 3], "prompt_len": 1, "file": "c.jsonl", "line": 1, "id": "a",
         "prompt": "p", "reference": "r"},
        {"input_ids": [4, 5], "label_spans": [1, 2], "prompt_len": 1, "file": "c.jsonl", "line": 2, "id": "b",
         "prompt": "q", "reference": "s"},
    ]
    out = Collator(pad_id=0, pad_to_multiple_of=4)(batch)
    assert out["input_ids"].tolist() == [[1, 2, 3, 0], [4, 5, 0, 0]]
    assert out["labels"].tolist() == [[-100, 2, 3, -100], [-100, 5, -100, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0]]
    assert [r.prompt_ids for r in out["eval_rows"]] == [[1], [4]]
    assert [(r.where, r.id, r.reference) for r in out["eval_rows"]] == [("c.jsonl: row 1", "a", "r"),
                                                                         ("c.jsonl: row 2", "b", "s")]
    assert not {"gen_input_ids", "gen_attention_mask", "id", "prompt", "reference", "category", "row"} & set(out)


def test_packing_multi_turn_equals_per_conversation_loss(tiny_lora):
    backend, model, tok = tiny_lora
    from bengali_empathy.data import ChatEncoder

    chat = ChatEncoder(tok)
    exs = encode_pairs(tok, TWO_PAIRS)
    ids, spans = chat.assemble(*_tokenized(chat, DEFAULT_SYSTEM_PROMPT, LONG_CONV))
    exs.append({"input_ids": ids, "label_spans": [x for s in spans for x in s]})
    packed = pack_examples(exs)
    assert packed["seq_lens"] == [len(e["input_ids"]) for e in exs]
    collate = Collator(tok.pad_token_id)
    pb = collate([pack_examples(exs[:2]), pack_examples(exs[2:])])  # two packed rows, the second padded
    assert pb["position_ids"][0, len(exs[0]["input_ids"])] == 0 and pb["attention_mask"] is None
    width = pb["input_ids"].shape[1]
    assert int(pb["packed_seq_lengths"].sum()) == 2 * width
    model.eval()
    with torch.no_grad():
        lp, n_p = backend.loss(model, pb)
        singles = [backend.loss(model, collate([{k: e[k] for k in ("input_ids", "label_spans")}])) for e in exs]
    weighted = sum(l * n for l, n in singles) / sum(n for _, n in singles)
    assert int(n_p) == sum(int(n) for _, n in singles)
    assert float(lp) == pytest.approx(float(weighted), rel=1e-4)


def test_first_fit_packing_fills_rows_and_respects_the_limit():
    lengths = [5, 3, 4, 8, 1, 1, 4]
    groups = list(pack_groups(enumerate(lengths), 8))
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in g) <= 8 for g in groups)
    assert groups == [[0, 1], [2, 4, 5], [3], [6]]  # 1s fill the second pack, not a new one
    assert [len(g) for g in pack_groups(enumerate(lengths), 8, open_packs=1)] == [2, 1, 1, 3]


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


def test_datamodule_on_bundled_sample(tokenizer):
    dm = EmpatheticDialogueDataModule(max_seq_length=1024, batch_size=4)
    dm.setup()
    assert dm.facts.stats["train"]["kept"] > 200 and dm.facts.stats["val"]["kept"] > 10
    assert dm.facts.stats["train"]["turns"] > 2 * dm.facts.stats["train"]["rows"]  # multi-turn conversations are in
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == batch["labels"].shape and batch["input_ids"].shape[0] == 4
    assert (batch["labels"] != IGNORE_INDEX).sum() > 0


def test_fast_tokenize_equals_the_tokenizer(tokenizer, chat):
    assert chat.fast is not None  # the embedded tokenizer is Meta's Llama-3 BPE
    texts = [t["content"] for t in LONG_CONV] + [DEFAULT_SYSTEM_PROMPT, "Okay 123,  চলুন\n\nকথা বলি।",
                                                  "লিখলাম <|eot_id|> আর <|start_header_id|>", " শুরুতে ফাঁকা"]
    assert chat.tokenize(texts) == [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


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


def test_reference_inside_the_prompt_is_refused_but_short_repeats_are_not(tmp_path):
    echo = "আমি সবসময় আপনার পাশে আছি, চিন্তা করবেন না"
    rows = [{"id": f"r{i}", "messages": [{"role": "user", "content": f"কথা {i}"},
                                         {"role": "assistant", "content": "ঠিক আছে।"},
                                         {"role": "user", "content": "ঠিক আছে।"},  # a short reply said before: fine
                                         {"role": "assistant", "content": "ঠিক আছে।"}]} for i in range(40)]
    path = write_jsonl(tmp_path / "ok.jsonl", rows)
    EmpatheticDialogueDataModule(corpus_path=path, predict=PredictSettings(split="train")).prepare()
    rows[5]["messages"][2]["content"] = f"আপনি বলেছিলেন: {echo}।"
    rows[5]["messages"][3]["content"] = echo + "।"
    path = write_jsonl(tmp_path / "echo.jsonl", rows)
    dm = EmpatheticDialogueDataModule(corpus_path=path,
                                      predict=PredictSettings(split="train"))  # every split is evaluated
    with pytest.raises(UserError, match="echo.jsonl: row 6: the reference reply already occurs earlier"):
        dm.prepare()


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
