"""Conversation -> ids and reply labels, the length policy and the reference-in-prompt check
(bengali_empathy.data.encode)."""

import pytest

from bengali_empathy.data import (
    DEFAULT_SYSTEM_PROMPT, IGNORE_INDEX, EmpatheticDialogueDataModule, EncodingSettings, PredictSettings,
    SplitSettings, format_stats,
)
from bengali_empathy.errors import UserError
from conftest import LONG_CONV, tokenized, write_jsonl


def dm_for(tmp_path, rows, **kwargs):
    dm = EmpatheticDialogueDataModule(corpus_path=write_jsonl(tmp_path / "c.jsonl", rows), **kwargs)
    dm.setup()
    return dm


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
    full = len(chat.assemble(*tokenized(chat, DEFAULT_SYSTEM_PROMPT, LONG_CONV))[0])
    final_only = len(chat.assemble(*tokenized(chat, DEFAULT_SYSTEM_PROMPT, LONG_CONV[4:]))[0])
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
    two = len(chat.assemble(*tokenized(chat, DEFAULT_SYSTEM_PROMPT, LONG_CONV[2:]))[0])
    dm = dm_for(tmp_path, rows, max_seq_length=two, encoding=EncodingSettings(on_too_long="truncate_history"),
                split=SplitSettings(val_fraction=0.0, test_fraction=0.0))
    assert dm.encoded()[0]["n_turns"] == 4


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
