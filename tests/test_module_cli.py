import json
from pathlib import Path

import pytest
import torch

from bengali_empathy.backends import HFPeftBackend, LoraSettings, _backend_from_argv, preimport_unsloth, resolve_backend
from bengali_empathy.errors import UserError
from bengali_empathy.module import EmpathyLM, cosine_with_warmup
from conftest import ROOT, TWO_PAIRS, encode_pairs, run_cli


def test_backend_resolution_and_errors():
    with pytest.raises(UserError, match="unknown backend"):
        resolve_backend("vllm")
    if not torch.cuda.is_available():
        assert resolve_backend("auto") == "hf"
        with pytest.raises(UserError, match="needs a CUDA GPU"):
            resolve_backend("unsloth")
        assert preimport_unsloth(["fit"]) is False


def test_backend_read_from_argv_and_config(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  backend: hf\n")
    assert _backend_from_argv(["fit", "--config", str(cfg)]) == "hf"
    assert _backend_from_argv(["fit", "--config", str(cfg), "--model.backend=unsloth"]) == "unsloth"
    assert _backend_from_argv(["chat", "--backend", "hf"]) == "hf"
    assert _backend_from_argv(["fit"]) == "auto"


def test_reply_only_loss_equals_hf_full_logits_loss(tiny_lora):
    backend, model, tok = tiny_lora
    from bengali_empathy.data import Collator

    batch = Collator(tok.pad_token_id)(encode_pairs(tok, TWO_PAIRS))
    model.eval()
    with torch.no_grad():
        ours, n = backend.loss(model, batch)
        ref = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert float(ours) == pytest.approx(float(ref), rel=1e-5)
    assert int(n) == int((batch["labels"][:, 1:] != -100).sum())


def test_llama31_8b_lora_has_13_6m_trainable_params():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from bengali_empathy.modeling import LLAMA31_8B_ARCH, llama31_config

    with torch.device("meta"):
        model = LlamaForCausalLM(llama31_config(LLAMA31_8B_ARCH))
    total = sum(p.numel() for p in model.parameters())
    assert total == 8_030_261_248  # Llama-3.1-8B
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0,
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 13_631_488


def test_cosine_schedule():
    assert cosine_with_warmup(0, 10, 100) == pytest.approx(0.1)
    assert cosine_with_warmup(9, 10, 100) == pytest.approx(1.0)
    assert cosine_with_warmup(10, 10, 100) == pytest.approx(1.0)
    assert cosine_with_warmup(55, 10, 100) == pytest.approx(0.5)
    assert cosine_with_warmup(100, 10, 100, floor=0.1) == pytest.approx(0.1)


def test_checkpoint_keeps_only_lora_weights(tiny_model_path):
    lm = EmpathyLM(model_name_or_path=str(tiny_model_path), backend="hf", load_in_4bit=False,
                   gradient_checkpointing=False)
    lm.configure_model()
    ckpt = {"state_dict": lm.state_dict()}
    lm.on_save_checkpoint(ckpt)
    assert ckpt["state_dict"] and all("lora_" in k for k in ckpt["state_dict"])
    assert sum(v.numel() for v in ckpt["state_dict"].values()) == 14336


def test_hf_gradient_checkpointing_survives_eval_and_generate(tiny_model_path):
    lm = EmpathyLM(model_name_or_path=str(tiny_model_path), backend="hf", load_in_4bit=False, max_new_tokens=2)
    lm.configure_model()
    lm.model.train()
    assert lm.backend.gradient_checkpointing_active(lm.model)
    lm.chat("আমি খুব ক্লান্ত।")
    assert lm.model.training and lm.backend.gradient_checkpointing_active(lm.model)


TINY = ["--config", str(ROOT / "configs" / "default.yaml"), "--trainer.max_steps", "8", "--trainer.log_every_n_steps", "1",
        "--trainer.val_check_interval", "4", "--trainer.limit_val_batches", "1", "--model.max_new_tokens", "4",
        "--data.max_predict_samples", "4"]


@pytest.mark.slow
def test_fit_predict_chat_export_end_to_end(tmp_path):
    r = run_cli(["fit", *TINY], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    vdir = tmp_path / "lightning_logs" / "version_0"
    adapter = vdir / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(next(vdir.glob("events.out.tfevents*"))))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    for tag in ("train/loss_step", "val/loss", "val/perplexity", "val/bleu", "val/rougeL", "val/chrf", "lr",
                "perf/tokens_per_sec"):
        assert tag in tags, tag
    assert "samples/text_summary" in ea.Tags()["tensors"]
    losses = [e.value for e in ea.Scalars("train/loss_step")]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3  # it learns

    r = run_cli(["predict", *TINY, "--model.adapter_path", str(adapter)], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    pdir = tmp_path / "lightning_logs" / "version_1"
    rows = [json.loads(x) for x in (pdir / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 4 and set(rows[0]) == {"id", "prompt", "reference", "prediction"}
    metrics = json.loads((pdir / "metrics.json").read_text())
    assert {"bleu", "rougeL", "chrf", "perplexity", "loss"} <= set(metrics)
    assert metrics["loss"] < 11.9  # the trained adapter was loaded (random init starts above 12)

    r = run_cli(["validate", *TINY, "--model.adapter_path", str(adapter)], cwd=tmp_path)
    assert r.returncode == 0 and "val/perplexity" in r.stdout

    r = run_cli(["chat", "--adapter", str(adapter), "--max-new-tokens", "3", "-m", "আমি খুব একা।"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(r.stdout.strip().splitlines()) == 1

    merged = tmp_path / "merged"
    r = run_cli(["export", "--adapter", str(adapter), "--output", str(merged), "--dtype", "float32"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    from transformers import AutoModelForCausalLM

    from bengali_empathy.backends import HFPeftBackend

    mm = AutoModelForCausalLM.from_pretrained(str(merged)).eval()
    be = HFPeftBackend(load_in_4bit=False, gradient_checkpointing=False)
    pm, _ = be.load(Path(json.loads((adapter / "bengali_empathy.json").read_text())["base_model"]), 768,
                    LoraSettings(), str(adapter))
    pm.eval()
    ids = torch.tensor([[128000, 11372, 228, 11372, 106, 62456]])
    with torch.no_grad():
        assert torch.allclose(mm(ids).logits, pm(input_ids=ids).logits, atol=1e-4)


def test_print_config(tmp_path):
    r = run_cli(["fit", "--config", str(ROOT / "configs" / "default.yaml"), "--print_config"], cwd=tmp_path)
    assert r.returncode == 0
    assert "model_name_or_path: tiny-random-llama" in r.stdout and "corpus_path" in r.stdout


@pytest.mark.parametrize("extra,message", [
    (["--data.corpus_path", "missing.jsonl"], "corpus file not found"),
    (["--data.corpus_path", "wrong.jsonl"], "missing column"),
    (["--data.corpus_path", "empty.jsonl"], "corpus is empty"),
    (["--model.backend", "vllm"], "unknown backend"),
    (["--data.max_seq_length", "64"], "longer than max_seq_length"),
    (["--model.model_name_or_path", "/no/such/model"], "model directory not found"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, extra, message):
    (tmp_path / "wrong.jsonl").write_text('{"question": "ক", "answer": "খ"}\n', encoding="utf-8")
    (tmp_path / "empty.jsonl").write_text("", encoding="utf-8")
    r = run_cli(["fit", "--config", str(ROOT / "configs" / "default.yaml"), *extra], cwd=tmp_path)
    assert r.returncode == 2
    err = [line for line in r.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(err) == 1 and message in err[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert not any((tmp_path / "lightning_logs").glob("version_*/*"))
