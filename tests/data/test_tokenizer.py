from bengali_empathy.data.tokenizer import (
    LLAMA3_PATTERN, llama31_special_tokens, meta_tokenizer_model_path, stop_token_ids,
)

BN = "আমি আজ খুব একা বোধ করছি। কেউ আমার কথা শোনে না, আর সব কিছু অর্থহীন লাগে।"


def test_special_token_ids_match_llama31(tokenizer):
    assert len(tokenizer) == 128256
    expected = {
        128000: "<|begin_of_text|>", 128001: "<|end_of_text|>", 128002: "<|reserved_special_token_0|>",
        128003: "<|reserved_special_token_1|>", 128004: "<|finetune_right_pad_id|>",
        128005: "<|reserved_special_token_2|>", 128006: "<|start_header_id|>", 128007: "<|end_header_id|>",
        128008: "<|eom_id|>", 128009: "<|eot_id|>", 128010: "<|python_tag|>",
        128011: "<|reserved_special_token_3|>", 128255: "<|reserved_special_token_247|>",
    }
    for i, tok in expected.items():
        assert tokenizer.convert_ids_to_tokens(i) == tok
    assert llama31_special_tokens()[-1] == "<|reserved_special_token_247|>"
    assert tokenizer.pad_token_id == 128004
    assert tokenizer.bos_token_id == 128000
    assert stop_token_ids(tokenizer)[:3] == [128009, 128008, 128001]


def test_bengali_encoding_matches_meta_tiktoken(tokenizer):
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(str(meta_tokenizer_model_path()))
    enc = tiktoken.Encoding("llama3", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens={})
    for text in (BN, "Hello, world! 12345", "মিশ্র text ও ১২৩ সংখ্যা।\nনতুন লাইন"):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids == enc.encode(text)
        assert tokenizer.decode(ids) == text
    assert tokenizer(BN)["input_ids"][0] == 128000  # <|begin_of_text|> prepended


def test_chat_template_is_llama31(tokenizer):
    msgs = [{"role": "system", "content": "সিস্টেম"}, {"role": "user", "content": "প্রশ্ন"}]
    text = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\nসিস্টেম<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nপ্রশ্ন<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_loaded_tokenizers_are_separate_copies_and_follow_their_files(tmp_path):
    import shutil

    from bengali_empathy.data.tokenizer import embedded_tokenizer_dir, load_tokenizer

    directory = shutil.copytree(embedded_tokenizer_dir(), tmp_path / "tok")
    first, second = load_tokenizer(directory), load_tokenizer(directory)
    first.padding_side = "left"  # one caller's change is not another's
    assert second is not first and second.padding_side == "right" and load_tokenizer(directory).padding_side == "right"
    assert first("আমি একা।")["input_ids"] == second("আমি একা।")["input_ids"]
    config = directory / "tokenizer_config.json"
    import json

    cfg = json.loads(config.read_text(encoding="utf-8"))
    cfg["model_max_length"] = 4321
    config.write_text(json.dumps(cfg), encoding="utf-8")  # a changed directory is read again
    assert load_tokenizer(directory).model_max_length == 4321
