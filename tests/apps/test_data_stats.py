"""``data-stats``: the corpus statistics per split, printed and as JSON, read as the config trains on them
(bengali_empathy.apps.data_stats; the CLI in-process)."""
import json

from conftest import DEFAULT, ROOT, run_cli


def test_data_stats_command(tmp_path):
    r = run_cli(["data-stats", *DEFAULT, "--data.max_seq_length", "600", "--json", str(tmp_path / "s.json")],
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    stats = json.loads((tmp_path / "s.json").read_text())
    assert set(stats) == {"train", "val", "test"}
    train = stats["train"]
    assert train["rows"] == train["kept"] + train["dropped_too_long"] and train["dropped_too_long"] > 0
    assert train["tokens_p50"] <= train["tokens_p90"] <= train["tokens_p99"] <= train["tokens_max"]
    assert "over_max_pct" in r.stdout and "note: on_too_long=error" in r.stdout


def write(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_data_stats_reads_pairs_as_the_config_trains_on_them(tmp_path):
    write(tmp_path / "prefs.jsonl", [{"prompt": "আমি একা।", "chosen": "আমি আছি।", "rejected": "জানি না।"}] * 3)
    r = run_cli(["data-stats", "--config", ROOT / "configs" / "dpo.yaml", "--data.split.val_fraction", "0",
                 "--data.split.test_fraction", "0"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-1500:]
    train = next(line.split() for line in r.stdout.splitlines() if line.split()[:1] == ["train"])
    assert train[1] == "3" and train[3] == "6"  # rows, turns (prompt + chosen reply)


# Two rows written for hand counts. Words as text.words_bn splits them: 5, 5, 5 and 6 (the dash is no word, the
# danda, comma and question mark are split off). The last reply spells বলো with a decomposed vowel sign (ে + া),
# which NFC composes into one character (ো).
HAND_ROWS = [{"prompt": "আজ মনটা খুব ভারী লাগছে।", "response": "কী হয়েছে — বলবেন? আমি শুনছি।"},
             {"prompt": "চাকরিটা চলে গেল, কী করব?", "response": "একা লাগে? আমি আছি, কথা বল\u09c7\u09be।"}]
HAND_WORDS = 5 + 5 + 5 + 6
ONLY_TRAIN = ["--data.split.val_fraction", "0", "--data.split.test_fraction", "0"]


def _train_stats(tmp_path, *extra):
    corpus = write(tmp_path / "two.jsonl", HAND_ROWS)
    out = tmp_path / f"stats{len(list(tmp_path.glob('stats*.json')))}.json"
    r = run_cli(["data-stats", *DEFAULT, *ONLY_TRAIN, "--data.corpus_path", corpus, "--json", out, *extra], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(out.read_text())["train"], r.stdout


def test_tokens_per_word_and_character_count_the_turns_texts_alone(tmp_path, tokenizer):
    import unicodedata

    texts = [row[k] for row in HAND_ROWS for k in ("prompt", "response")]
    assert len(unicodedata.normalize("NFC", texts[-1])) == len(texts[-1]) - 1
    chars = sum(len(unicodedata.normalize("NFC", t)) for t in texts)
    tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    train, stdout = _train_stats(tmp_path)
    # neither the system prompt nor the chat template's own tokens are counted
    assert (train["text_words"], train["text_chars"], train["text_tokens"]) == (HAND_WORDS, chars, tokens)
    assert train["tokens_per_word"] == round(tokens / HAND_WORDS, 3) and train["tokens_per_char"] == round(tokens / chars, 3)
    head, row = (line.split() for line in stdout.splitlines()[1:3])
    assert head[-2:] == ["tokens_per_word", "tokens_per_char"] and row[-2:] == [str(train["tokens_per_word"]),
                                                                                str(train["tokens_per_char"])]
    assert "without the chat template's tokens" in stdout.splitlines()[0]


def test_another_tokenizer_counts_the_same_words_in_its_own_tokens(tmp_path):
    from transformers import AutoTokenizer

    from bengali_empathy.models.modeling import resolve_model_path

    llama, _ = _train_stats(tmp_path)
    smollm2, _ = _train_stats(tmp_path, "--tokenizer", "smollm2-135m-instruct")
    own = AutoTokenizer.from_pretrained(str(resolve_model_path("smollm2-135m-instruct")))
    texts = [row[k] for row in HAND_ROWS for k in ("prompt", "response")]
    assert smollm2["text_tokens"] == sum(len(own(t, add_special_tokens=False)["input_ids"]) for t in texts)
    assert (smollm2["text_words"], smollm2["text_chars"]) == (llama["text_words"], llama["text_chars"])
    # SmolLM2's vocabulary has few Bengali pieces: more tokens per word than Llama 3's
    assert smollm2["tokens_per_word"] > 1.2 * llama["tokens_per_word"]

    r = run_cli(["data-stats", *DEFAULT, "--tokenizer", "no_such_dir"], cwd=tmp_path)
    err = [line for line in r.stderr.strip().splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(err) == 1 and "--tokenizer no_such_dir is not a checkpoint or tokenizer" in err[0]
