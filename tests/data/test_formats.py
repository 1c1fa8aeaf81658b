"""Corpus layouts -> conversations, the group split and bad rows (bengali_empathy.data.formats)."""

import pytest

from bengali_empathy.data import (
    CorpusColumns, EmpatheticDialogueDataModule, EncodingSettings, split_of,
)
from bengali_empathy.errors import UserError
from conftest import conversations, dailydialog_turn_rows, write_jsonl

CONV = [{"role": "user", "content": "আজ মনটা ভারী।"}, {"role": "assistant", "content": "কী হয়েছে, বলবেন?"},
        {"role": "user", "content": "চাকরিটা চলে গেল।"}, {"role": "assistant", "content": "খুব কঠিন সময়, আমি শুনছি।"}]


def test_messages_and_sharegpt_are_detected(tmp_path):
    write_jsonl(tmp_path / "m.jsonl", [{"id": "a", "messages": [{"role": "system", "content": "নিজস্ব"}] + CONV}])
    (c,) = conversations(tmp_path / "m.jsonl")
    assert c.system == "নিজস্ব" and c.turns == CONV and c.id == "a"
    share = [{"from": {"user": "human", "assistant": "gpt"}[t["role"]], "value": t["content"]} for t in CONV]
    write_jsonl(tmp_path / "s.jsonl", [{"conversations": share}])
    (c,) = conversations(tmp_path / "s.jsonl")
    assert c.turns == CONV and c.system is None


def test_system_column_overrides_default_per_row(tmp_path):
    p = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "ক", "response": "খ", "sys": "বিশেষ নির্দেশ"},
                                           {"prompt": "গ", "response": "ঘ", "sys": ""}])
    a, b = conversations(p, system_column="sys")
    assert a.system == "বিশেষ নির্দেশ" and b.system is None


def test_group_column_keeps_a_dialogue_in_one_split(tmp_path):
    rows = [{"id": f"d{d}-t{t}", "dialogue_id": f"d{d}", "prompt": f"প্রশ্ন {d} {t}", "response": f"উত্তর {d} {t}"}
            for d in range(100) for t in range(5)]
    p = write_jsonl(tmp_path / "turns.jsonl", rows)
    convs = conversations(p)  # dialogue_id is picked up as the group by default
    splits: dict = {}
    for c in convs:
        splits.setdefault(c.group, set()).add(split_of(c.group, 0.1, 0.1, 42))
    assert len(splits) == 100 and all(len(s) == 1 for s in splits.values())
    per_row = {split_of(c.id, 0.1, 0.1, 42) for c in convs if c.group == "d0"}
    assert len({split_of(c.id, 0.1, 0.1, 42) for c in convs}) == 3 and per_row  # ids alone would scatter


def test_dailydialog_turn_rows_never_straddle_splits(tmp_path):
    dialogues = dailydialog_turn_rows(tmp_path / "dialogues.jsonl")
    dm = EmpatheticDialogueDataModule(corpus_path=str(tmp_path / "dialogues.jsonl"), max_seq_length=4096,
                                      encoding=EncodingSettings(on_too_long="drop"))
    cols = dm.encoded().select_columns(["group", "split"])[:]
    by_group: dict = {}
    for g, s in zip(cols["group"], cols["split"]):
        by_group.setdefault(g, set()).add(s)
    assert len(by_group) == dialogues and all(len(s) == 1 for s in by_group.values())
    assert set().union(*by_group.values()) == {"train", "val", "test"}


@pytest.mark.parametrize("rows,kwargs,message", [
    ([{"messages": [{"role": "narrator", "content": "ক"}, {"role": "assistant", "content": "খ"}]}], {},
     "row 1: turn 1 has unknown role 'narrator'"),
    ([{"messages": CONV}, {"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "খ"}]}],
     {}, "row 2: turn 1 (user) has empty content"),
    ([{"messages": [{"role": "user", "content": "ক"}]}], {}, "row 1: the conversation has no assistant turn"),
    ([{"messages": [{"role": "user", "content": "ক"}, {"role": "user", "content": "খ"},
                    {"role": "assistant", "content": "গ"}]}], {}, "turns 1 and 2 are both user turns"),
    ([{"messages": CONV[:3]}], {}, "ends with a user turn"),
    ([{"q": "ক", "a": "খ"}], {"columns": CorpusColumns(prompt_template="{q} {title}", response_template="{a}")},
     "missing column(s) 'title'"),
])
def test_bad_rows_name_file_and_row(tmp_path, rows, kwargs, message):
    p = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(UserError, match="bad.jsonl") as err:
        EmpatheticDialogueDataModule(corpus_path=str(p), **kwargs).setup()
    assert message in str(err.value)
