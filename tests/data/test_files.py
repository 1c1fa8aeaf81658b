"""Which files a corpus path names and how each is read: CSV/TSV/Parquet/JSON, directories and globs, the bundled
sample, and reader failures as one error naming the line (bengali_empathy.data.files)."""
import json

import pytest

from bengali_empathy.data import EmpatheticDialogueDataModule, bundled_corpus_path
from bengali_empathy.errors import UserError
from conftest import conversations, write_jsonl


def test_csv_templates_with_multiline_quotes_bom_crlf(tmp_path):
    p = tmp_path / "counsel.csv"
    text = ('\ufeffTopics,Question-Title,Questions,Answers\r\n'
            'উদ্বেগ,"রাতে ঘুম আসে না","প্রতি রাতে চিন্তা হয়,\r\nবুক ধড়ফড় করে। ""কী করব""?","ঘুমের আগে ধীরে শ্বাস নিন।"\r\n')
    p.write_bytes(text.encode("utf-8"))
    (c,) = conversations(p, prompt_template="{Question-Title}\n{Questions}", response_template="{Answers}",
                         category_column="Topics")
    assert c.turns[0]["content"] == 'রাতে ঘুম আসে না\nপ্রতি রাতে চিন্তা হয়,\r\nবুক ধড়ফড় করে। "কী করব"?'
    assert c.turns[1]["content"] == "ঘুমের আগে ধীরে শ্বাস নিন।" and c.category == "উদ্বেগ"



def test_tsv_parquet_json_directory_and_glob(tmp_path):
    import pandas as pd  # installed with datasets
    rows = [{"id": f"r{i}", "prompt": f"প্রশ্ন {i}", "response": f"উত্তর {i}"} for i in range(4)]
    pd.DataFrame(rows).to_csv(tmp_path / "a.tsv", sep="\t", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "b.parquet")
    (tmp_path / "c.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    for name in ("a.tsv", "b.parquet", "c.json"):
        assert [c.turns[1]["content"] for c in conversations(tmp_path / name)] == [r["response"] for r in rows]
    d = tmp_path / "dir"
    d.mkdir()
    write_jsonl(d / "1.jsonl", rows[:2])
    write_jsonl(d / "2.jsonl", rows[2:])
    assert [c.id for c in conversations(d)] == ["r0", "r1", "r2", "r3"]
    assert [c.id for c in conversations(str(d / "*.jsonl"))] == ["r0", "r1", "r2", "r3"]



def test_malformed_json_line_and_non_utf8_name_the_line(tmp_path):
    p = tmp_path / "broken.jsonl"
    p.write_text('{"prompt": "ক", "response": "খ"}\n{"prompt": "গ", "response": \n', encoding="utf-8")
    with pytest.raises(UserError, match=r"broken.jsonl:2: invalid JSON"):
        EmpatheticDialogueDataModule(corpus_path=str(p)).setup()
    p = tmp_path / "latin1.csv"
    p.write_bytes("prompt,response\nক,খ\ncaf\xe9,ok\n".encode("utf-8").replace(b"\xc3\xa9", b"\xe9"))
    with pytest.raises(UserError, match=r"latin1.csv:3: not UTF-8"):
        EmpatheticDialogueDataModule(corpus_path=str(p)).setup()



@pytest.mark.parametrize("body, message", [
    ("ভয় লাগছে, কী করব,ভয় স্বাভাবিক।\nএকা,আছি\n", "unquoted.csv:2: the first row has more fields than the header"),
    ("একা,আছি\nভয় লাগছে, কী করব,ভয় স্বাভাবিক।\n", "Expected 2 fields in line 3, saw 3"),  # pandas says it
])
def test_csv_row_with_an_unquoted_delimiter_is_one_error_not_shifted_columns(tmp_path, body, message):
    """pandas reads a first row with one field too many with the first column as the index (every
    prompt would be the next column's text): that must not pass silently."""
    p = tmp_path / "unquoted.csv"
    p.write_text("prompt,response\n" + body, encoding="utf-8")
    with pytest.raises(UserError, match=r"unquoted.csv") as err:
        EmpatheticDialogueDataModule(corpus_path=str(p)).setup()
    assert message in str(err.value)


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
