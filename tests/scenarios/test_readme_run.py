"""The README's main job end to end: ``fit --config configs/default.yaml`` (the shared default fit), then predict /
validate / chat / export / report on its adapter, each as a user runs it (the CLI in-process).

These tests share the session's default fit and make one pytest-xdist group, on the worker that computes the fit
(conftest.py's ``pytest_collection_modifyitems`` names this file)."""
import json
from pathlib import Path

import pytest
import torch

from conftest import QUICK, run_cli, tensorboard_events


@pytest.mark.slow
def test_default_fit_visibly_learns_and_logs(default_fit):
    _, vdir, r = default_fit
    assert (vdir / "adapter" / "adapter_model.safetensors").is_file()
    assert "dropped_too_long" in r.stderr and "train" in r.stderr  # the data statistics table is printed
    ea = tensorboard_events(vdir)
    for tag in ("train/loss_step", "val/loss", "val/perplexity", "val/bleu", "val/rougeL", "val/chrf", "lr",
                "perf/tokens_per_sec"):
        assert tag in ea.Tags()["scalars"], tag
    val = [e.value for e in ea.Scalars("val/loss")]
    assert len(val) >= 3 and val[-1] <= 0.6 * val[0], val
    table = ea.Tensors("samples/text_summary")[-1].tensor_proto.string_val[0].decode()
    predictions = [line.split(" | ")[2] for line in table.splitlines()[2:]]  # | prompt | reference | prediction |
    assert predictions and all(sum("\u0980" <= ch <= "\u09ff" for ch in p) >= 3 for p in predictions), table
    hparams = (vdir / "hparams.yaml").read_text(encoding="utf-8")
    assert "data/train/tokens_p90" in hparams and "data/val/rows" in hparams
    # TensorBoard's HPARAMS view gets the final validation scores, not a placeholder -1
    assert [e.value for e in ea.Scalars("hp_metric")] == [pytest.approx(val[-1])]
    assert ea.Scalars("hp/val_chrf")[-1].value == pytest.approx(ea.Scalars("val/chrf")[-1].value)


@pytest.mark.slow
def test_predict_on_the_adapter_scores_tuned_and_base(default_fit, tmp_path):
    adapter = default_fit[1] / "adapter"
    r = run_cli(["predict", *QUICK, "--model.adapter_path", str(adapter), "--model.compare_base", "true",
                 "--data.columns.category", "emotion", "--model.generation.batch_size", "3"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    pdir = tmp_path / "lightning_logs" / "version_0"
    rows = [json.loads(x) for x in (pdir / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 4 and {"id", "prompt", "reference", "prediction", "base_prediction", "category"} <= set(rows[0])
    metrics = json.loads((pdir / "metrics.json").read_text())
    assert {"bleu", "rougeL", "chrf", "perplexity", "loss", "base", "delta", "by_category", "checks",
            "warnings"} <= set(metrics)
    assert metrics["loss"] < 6.0  # the trained adapter (and head) were loaded: random init is above 11
    assert metrics["base"]["loss"] > 11.0  # the same rows with the adapter (and trained head) switched off
    assert metrics["delta"]["loss"] == pytest.approx(metrics["loss"] - metrics["base"]["loss"])
    assert metrics["generation"]["rows"] == 4 and metrics["generation"]["batch_size"] == 3
    assert sum(c["n"] for c in metrics["by_category"].values()) == 4


@pytest.mark.slow
def test_predict_on_a_merged_copy_gives_the_adapter_models_replies(default_fit, tmp_path):
    """predict on the merged copy (LoRA and the trained head folded into the base): Bengali replies as
    the adapter model's are, and metrics.json, the log and TensorBoard say what ran. (The copy's logits
    agree with the adapter model's to ~1e-6, tests/test_merged.py; the tiny models' near-ties make the
    greedy replies differ after a few tokens, the random base's as much as the tuned.)"""
    adapter = default_fit[1] / "adapter"
    outputs = {}
    for weights in ("adapter", "merged"):
        r = run_cli(["predict", *QUICK, "--model.adapter_path", str(adapter), "--model.compare_base", "true",
                     "--model.generation.weights", weights, "--model.decoding.max_new_tokens", "8",
                     "--trainer.default_root_dir", weights], cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        pdir = tmp_path / weights / "lightning_logs" / "version_0"
        outputs[weights] = ([json.loads(x) for x in (pdir / "predictions.jsonl").read_text().splitlines()],
                            json.loads((pdir / "metrics.json").read_text()), r.stderr)
    (_, metrics, _), (merged_rows, merged_metrics, log) = outputs["adapter"], outputs["merged"]
    assert all(sum("\u0980" <= ch <= "\u09ff" for ch in r["prediction"]) >= 3 for r in merged_rows)
    assert all(r["prediction"] != r["base_prediction"] for r in merged_rows)  # the adapter was merged in
    assert metrics["generation"]["weights"] == "adapter" and merged_metrics["generation"]["weights"] == "merged"
    assert merged_metrics["generation"]["base"]["weights"] == "merged"
    assert "merged 16-bit copy (LoRA folded into the dequantised base), eager engine" in log
    rate = tensorboard_events(tmp_path / "merged" / "lightning_logs" / "version_0").Scalars("predict/generated_tokens_per_sec")
    assert rate[-1].value == pytest.approx(merged_metrics["generation"]["tokens_per_sec"])


@pytest.mark.slow
def test_validate_on_the_adapter(default_fit, tmp_path):
    r = run_cli(["validate", *QUICK, "--model.adapter_path", str(default_fit[1] / "adapter")], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "val/perplexity" in r.stdout and "val/bits_per_char" in r.stdout


@pytest.mark.slow
def test_chat_answers_each_message_once(default_fit, tmp_path):
    adapter = str(default_fit[1] / "adapter")
    r = run_cli(["chat", "--adapter", adapter, "--max-new-tokens", "3", "-m", "আমি খুব একা।", "-m", "ভয় লাগছে।"],
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(r.stdout.strip().splitlines()) == 2
    r = run_cli(["chat", "--adapter", adapter, "--max-new-tokens", "2"], cwd=tmp_path, stdin="একা\n\nভয়\n")
    assert r.returncode == 0 and len(r.stdout.strip().splitlines()) == 2  # the empty line is skipped


@pytest.mark.slow
def test_export_merges_the_adapter(default_fit, tmp_path):
    adapter = default_fit[1] / "adapter"
    merged = tmp_path / "merged"
    r = run_cli(["export", "--adapter", str(adapter), "--output", str(merged), "--dtype", "float32"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    from transformers import AutoModelForCausalLM

    from bengali_empathy.models.backends import HFPeftBackend, LoraSettings

    mm = AutoModelForCausalLM.from_pretrained(str(merged)).eval()
    pm, _ = HFPeftBackend(load_in_4bit=False, gradient_checkpointing=False).load(
        Path(json.loads((adapter / "bengali_empathy.json").read_text())["base_model"]), 768, LoraSettings(),
        str(adapter))
    pm.eval()
    ids = torch.tensor([[128000, 11372, 228, 11372, 106, 62456]])
    with torch.no_grad():
        assert torch.allclose(mm(ids).logits, pm(input_ids=ids).logits, atol=1e-4)


@pytest.mark.slow
def test_report_on_the_default_run(default_fit, tmp_path):
    cwd, vdir, _ = default_fit
    r = run_cli(["test", *QUICK, "--model.adapter_path", str(vdir / "adapter"), "--model.compare_base", "true"],
                cwd=cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    eval_dir = max((cwd / "lightning_logs").glob("version_*"), key=lambda d: int(d.name.split("_")[1]))
    r = run_cli(["report", str(vdir), "--output", str(tmp_path / "report")], cwd=cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    report = (tmp_path / "report" / "REPORT.md").read_text(encoding="utf-8")
    for png in ("loss.png", "learning_rate.png", "tokens_per_sec.png", "memory.png"):
        data = (tmp_path / "report" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png
        assert f"]({png})" in report
    cells = {line.split(" | ")[0].strip("| "): line.split(" | ")[1].strip(" |")
             for line in report.splitlines() if line.startswith("| ") and " | " in line}
    ea = tensorboard_events(vdir)
    run = json.loads((vdir / "run.json").read_text())
    assert cells["final val/loss"] == f"{ea.Scalars('val/loss')[-1].value:.4f}"
    assert cells["final val/chrf"] == f"{ea.Scalars('val/chrf')[-1].value:.4f}"
    assert cells["trainable parameters"] == f"{run['model']['trainable_params']:,}"
    assert cells["steps"] == "24" and cells["LoRA r / alpha / dropout"] == "16 / 16 / 0.0"
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    assert f"lightning_logs/{eval_dir.name}`" in report.split("Evaluation: ")[1].splitlines()[0]
    assert cells["chrF++"] == f"{metrics['chrf']:.4f}" and cells["NLL (nats/token)"] == f"{metrics['loss']:.4f}"
    assert "## Sample generations" in report and "## Honesty checks" in report
    (tmp_path / "notes.db").write_text("my notes\n")
    r = run_cli(["report", str(vdir), "--output", str(tmp_path / "r2"), "--db", str(tmp_path / "notes.db")], cwd=cwd)
    err = [line for line in r.stderr.strip().splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(err) == 1 and "not an SQLite database" in err[0], r.stderr[-2000:]
    assert (tmp_path / "notes.db").read_text() == "my notes\n" and not (tmp_path / "r2").exists()
