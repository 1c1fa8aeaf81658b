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
from conftest import QUICK, ROOT, run_cli, write_jsonl

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
    assert streamed.facts.stats == dm.compute_stats()  # tokens per word and character too, each split's
    assert dm.facts.stats["val"]["text_words"] == 3 * 2 * dm.facts.stats["val"]["rows"]  # প্রশ্ন/উত্তর নম্বর i


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


# --------------------------------------------------------------------------- the chat template a run trains in

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'"
          " + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
META_LLAMA31_TEMPLATE = ROOT / "tests" / "data" / "templates" / "llama-3.1-instruct.jinja"
# Two training steps, validated once (2 batches, the first also generated), on 24 pairs.
TWO_STEPS = [*QUICK, "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.num_sanity_val_steps",
             "0", "--data.split.val_fraction", "0.25", "--data.split.test_fraction", "0"]


def chatml_checkpoint(directory, texts):
    """A tiny random Llama over a byte-level BPE trained on ``texts``, with ChatML's special tokens and no chat
    template (as a base model's tokenizer may have none)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=800, special_tokens=[
        "<|endoftext|>", "<|im_start|>", "<|im_end|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                  clean_up_tokenization_spaces=False)
    tok.save_pretrained(str(directory))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=None,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(str(directory))
    assert not list(directory.glob("chat_template*"))
    return directory


def meta_checkpoint(directory, tiny_model_path):
    """The tiny random Llama whose tokenizer_config.json carries Meta's official Llama-3.1-Instruct template (as the
    checkpoints Meta publishes have it)."""
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        (directory / name).symlink_to(tiny_model_path / name)
    config = json.loads((tiny_model_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["chat_template"] = META_LLAMA31_TEMPLATE.read_text(encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return directory


def loss_rows(monkeypatch):
    """The (ids, labels) of every row the backend computes a loss on while a run goes, padding cut off."""
    from bengali_empathy.models.backends import HFPeftBackend

    rows, loss = [], HFPeftBackend.loss

    def recorded(self, model, batch):
        for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
            n = int(mask.sum())
            rows.append((ids[:n].tolist(), labels[:n].tolist()))
        return loss(self, model, batch)

    monkeypatch.setattr(HFPeftBackend, "loss", recorded)
    return rows


def test_a_checkpoint_without_a_chat_template_needs_one(tmp_path):
    corpus = write_jsonl(tmp_path / "p.jsonl", _pairs(24))
    chatml_checkpoint(tmp_path / "base", [r[k] for r in _pairs(24) for k in ("prompt", "response")])
    r = run_cli(["fit", *TWO_STEPS, "--data.corpus_path", corpus, "--model.model_name_or_path", tmp_path / "base"],
                cwd=tmp_path)
    err = [line for line in r.stderr.strip().splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert err == [f"error: the tokenizer of {tmp_path / 'base'} has no chat template: set "
                   "data.encoding.chat_template to a template file or Jinja text (e.g. ChatML)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "p.jsonl"]


@pytest.mark.parametrize("case", ["chatml-by-option", "meta-in-checkpoint"])
def test_fit_trains_chats_and_saves_the_adapter_in_the_runs_chat_template(tmp_path, monkeypatch, tiny_model_path,
                                                                          case):
    """A checkpoint without a template trained in ChatML given by data.encoding.chat_template, and a checkpoint
    carrying Meta's official template: every row the loss sees is ``apply_chat_template``'s ids with the loss on
    the replies and their end of turn; the adapter's tokenizer, and chat on it, have the template."""
    from argparse import Namespace

    from transformers import AutoTokenizer

    from bengali_empathy.apps.chat import replier_for
    from bengali_empathy.data import DEFAULT_SYSTEM_PROMPT
    from bengali_empathy.data.tokenizer import load_tokenizer, stop_token_ids

    rows = _pairs(24)
    corpus = write_jsonl(tmp_path / "p.jsonl", rows)
    base = tmp_path / "base"
    base.mkdir()
    if case == "chatml-by-option":
        chatml_checkpoint(base, [DEFAULT_SYSTEM_PROMPT] + [r[k] for r in rows for k in ("prompt", "response")])
        (tmp_path / "chatml.jinja").write_text(CHATML, encoding="utf-8")
        template, end_of_turn, extra = CHATML, "<|im_end|>", ["--data.encoding.chat_template", "chatml.jinja"]
    else:
        meta_checkpoint(base, tiny_model_path)
        template, end_of_turn, extra = META_LLAMA31_TEMPLATE.read_text(encoding="utf-8"), "<|eot_id|>", []
    seen = loss_rows(monkeypatch)
    r = run_cli(["fit", *TWO_STEPS, "--data.corpus_path", corpus, "--model.model_name_or_path", base, *extra],
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]

    reference = AutoTokenizer.from_pretrained(str(base))  # the checkpoint's own files, read by transformers alone
    reference.chat_template = template
    eot = reference.convert_tokens_to_ids(end_of_turn)
    expected = {}
    for row in rows:
        ids = reference.apply_chat_template([{"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
                                             {"role": "user", "content": row["prompt"]},
                                             {"role": "assistant", "content": row["response"]}], tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        expected[tuple(ids)] = reference(row["response"], add_special_tokens=False)["input_ids"] + [eot]
    assert len(seen) > 8  # two training batches of 4 and the validation batches
    for ids, labels in seen:
        assert tuple(ids) in expected
        assert [t for t in labels if t != -100] == expected[tuple(ids)]

    adapter = tmp_path / "lightning_logs" / "version_0" / "adapter"
    saved = load_tokenizer(adapter)
    assert saved.chat_template == template and stop_token_ids(saved)[0] == eot
    assert json.loads((adapter / "bengali_empathy.json").read_text(encoding="utf-8"))["chat_template"] == template
    replier = replier_for(Namespace(model=None, adapter=str(adapter), backend="hf", system_prompt=None,
                                    max_new_tokens=4, no_4bit=True))
    assert replier.tokenizer.chat_template == template and replier.stop_ids[0] == eot
