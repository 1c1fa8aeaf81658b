"""Continued pretraining: raw-text rows (every token trained, packed), embeddings with their own learning rate."""
import json

import pytest

from conftest import ROOT, run_cli

SAMPLE = ROOT / "bengali_empathy" / "resources" / "sample_conversations.jsonl"


def bengali_texts() -> list[dict]:
    """Raw Bengali text: every bundled multi-turn conversation as one paragraph."""
    rows = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [{"id": f"t{i}", "text": " ".join(t["content"] for t in r["messages"])} for i, r in enumerate(rows)]


def test_a_text_row_trains_every_token(tmp_path, tokenizer):
    from bengali_empathy.data import CorpusColumns, EmpatheticDialogueDataModule, SplitSettings

    texts = [{"text": "আজ মনটা ভারী।"}, {"text": "  "}, {"text": "চাকরিটা চলে গেল। Okay 123"}]
    (tmp_path / "raw.jsonl").write_text("".join(json.dumps(t, ensure_ascii=False) + "\n" for t in texts),
                                        encoding="utf-8")
    dm = EmpatheticDialogueDataModule(corpus_path=str(tmp_path / "raw.jsonl"), max_seq_length=64, pack=True,
                                      batch_size=1, columns=CorpusColumns(text="text"),
                                      split=SplitSettings(val_fraction=0, test_fraction=0))
    dm.setup()
    assert dm.facts.stats["train"]["dropped_empty"] == 1
    batch = next(iter(dm.train_dataloader()))  # both texts packed into one row
    expected = []
    for t in (texts[0]["text"], texts[2]["text"]):
        ids = tokenizer(t, add_special_tokens=False)["input_ids"]
        expected += [tokenizer.convert_tokens_to_ids("<|begin_of_text|>")] + ids + \
            [tokenizer.convert_tokens_to_ids("<|end_of_text|>")]
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    assert sorted(ids[: len(expected)].tolist()) == sorted(expected)
    # every token but each text's <|begin_of_text|> is a target; padding is not
    assert int((labels != -100).sum()) == len(expected) - 2


@pytest.fixture(scope="module")
def pretrain_fit(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("cpt")
    (cwd / "bn.jsonl").write_text("".join(json.dumps(t, ensure_ascii=False) + "\n" for t in bengali_texts()),
                                  encoding="utf-8")
    r = run_cli(["fit", "--config", ROOT / "configs" / "pretrain.yaml", "--data.corpus_path", "bn.jsonl",
                 "--data.max_seq_length", "128", "--data.batch_size", "2", "--trainer.max_steps", "6",
                 "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "1", "--registry.db_path", "null"],
                cwd=cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    return cwd / "lightning_logs" / "version_0", r.stdout


def test_pretraining_lowers_val_loss_with_two_learning_rates(pretrain_fit):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import yaml

    log_dir, stdout = pretrain_fit
    assert "packed rows attend through a block-diagonal mask (SDPA)" in stdout.splitlines()  # no kernel on the CPU
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    s = {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    assert s["val/loss"][-1] < s["val/loss"][0] - 0.5, s["val/loss"]
    model = yaml.safe_load((ROOT / "configs" / "pretrain.yaml").read_text())["model"]
    ratio = model["optimization"]["embedding_learning_rate"] / model["learning_rate"]
    assert len(s["lr/lora"]) == len(s["lr/embeddings"]) == 6
    for lora, emb in zip(s["lr/lora"][1:], s["lr/embeddings"][1:]):  # the same schedule, scaled
        assert emb == pytest.approx(ratio * lora, rel=1e-5)
    saved = json.loads((log_dir / "adapter" / "adapter_config.json").read_text())
    assert sorted(saved["modules_to_save"]) == ["embed_tokens", "lm_head"]


def test_modules_to_save_that_train_nothing_are_one_line(tmp_path):
    r = run_cli(["fit", "--config", ROOT / "configs" / "pretrain.yaml",
                 "--model.lora.modules_to_save", "[embed_tokenz]", "--registry.db_path", "null",
                 "--data.corpus_path", SAMPLE, "--data.columns.text", "id", "--trainer.max_steps", "1"], cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        "error: model.lora.modules_to_save names embed_tokenz, but no trainable copy of it is in the loaded model "
        "(a module name of the model, e.g. embed_tokens or lm_head, that the backend trains in full)")


def test_embedding_learning_rate_needs_modules_to_save(tmp_path):
    r = run_cli(["fit", "--config", ROOT / "configs" / "default.yaml",
                 "--model.optimization.embedding_learning_rate", "0.1", "--model.lora.modules_to_save", "[]"],
                cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith(
        "error: model.optimization.embedding_learning_rate is the learning rate of model.lora.modules_to_save, "
        "which is empty")
