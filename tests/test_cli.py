"""The command line, as a user runs it: the README's main job, then predict / validate / chat / export on its adapter."""
import json
from pathlib import Path

import pytest
import torch

from conftest import DAILYDIALOG, DEFAULT, run_cli

# On the command line limit_val_batches 1 is the float 1.0 (every batch), so 2 is the fewest whole batches.
QUICK = [*DEFAULT, "--trainer.limit_val_batches", "2", "--model.decoding.max_new_tokens", "4",
         "--data.predict.max_samples", "4"]


def _events(vdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(next(vdir.glob("events.out.tfevents*"))))
    ea.Reload()
    return ea


@pytest.mark.slow
def test_default_fit_visibly_learns_and_logs(default_fit):
    _, vdir, r = default_fit
    assert (vdir / "adapter" / "adapter_model.safetensors").is_file()
    assert "dropped_too_long" in r.stderr and "train" in r.stderr  # the data statistics table is printed
    ea = _events(vdir)
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
    rate = _events(tmp_path / "merged" / "lightning_logs" / "version_0").Scalars("predict/generated_tokens_per_sec")
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
    ea = _events(vdir)
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


@pytest.mark.slow
def test_dailydialog_conversations_fit_validate_predict(tmp_path):
    corpus = str(DAILYDIALOG)
    args = [*QUICK, "--data.corpus_path", corpus, "--data.max_seq_length", "1024", "--data.encoding.on_too_long",
            "truncate_history", "--trainer.max_steps", "4",
            "--trainer.val_check_interval", "4"]
    r = run_cli(["fit", *args], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "truncated" in r.stderr
    adapter = tmp_path / "lightning_logs" / "version_0" / "adapter"
    for cmd in ("validate", "predict"):
        r = run_cli([cmd, *args, "--model.adapter_path", str(adapter)], cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
    rows = (tmp_path / "lightning_logs" / "version_2" / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(rows) == 4 and json.loads(rows[0])["id"].startswith("ddbn-sample-")


@pytest.mark.parametrize("extra,message", [
    (["--data.corpus_path", "missing.jsonl"], "corpus file not found"),
    (["--data.corpus_path", "wrong.jsonl"], "missing column"),
    (["--data.corpus_path", "empty.jsonl"], "corpus is empty"),
    (["--data.corpus_path", "role.jsonl"], "role.jsonl: row 2: turn 2 has unknown role 'bot'"),
    (["--data.corpus_path", "latin1.csv"], "latin1.csv:2: not UTF-8"),
    (["--data.corpus_path", "role.jsonl", "--data.columns.prompt_template", "{title}"], "missing column(s) 'title'"),
    (["--model.backend", "vllm"], "model.backend"),
    (["--model.optimization.optimizer", "sgd"], "model.optimization.optimizer"),
    (["--model.learning_rate", "-0.1"], "model.learning_rate must be positive, not -0.1"),
    (["--model.lora.r", "0"], "model.lora.r must be a positive integer, not 0"),
    (["--model.generation.batch_size", "0"], "model.generation.batch_size must be at least 1, not 0"),
    (["--model.generation.engine", "fast"], "model.generation.engine"),
    (["--model.generation.weights", "fp8"], "model.generation.weights"),
    (["--model.compare_base", "maybe"], "model.compare_base"),
    (["--data.split.deduplicate", "true", "--data.streaming", "true"],
     "data.split.deduplicate needs the corpus in memory"),
    (["--trainer.max_steps", "-5"], "`max_steps` must be a non-negative integer or -1"),
    (["--model.model_name_or_path", "no_weights"], "has a config.json but no weights"),
    (["--model.adapter_path", "not_adapter"], "not_adapter is not a LoRA adapter directory"),
    (["--model.adapter_path", "other_adapter"], "was trained on /models/Llama-3.1-8B-Instruct"),
    (["--registry.db_path", "notes.db"], "notes.db is not an SQLite database"),
    (["--data.corpus_path", "echo.jsonl", "--data.predict.split", "train"],
     "echo.jsonl: row 1: the reference reply already occurs earlier in the conversation"),
    (["--trainer.max_steps", "abc"], "trainer.max_steps"),
    (["--data.encoding.on_too_long", "cut"], "data.encoding.on_too_long"),
    (["--data.encoding.train_on", "every_turn"], "data.encoding.train_on"),
    (["--data.corpus_path", "role.jsonl", "--data.columns.group", "dialogue"], "missing column(s) 'dialogue'"),
    (["--data.corpus_path", "role.jsonl", "--data.columns.messages", "chat"], "missing column(s) 'chat'"),
    (["--data.max_seq_length", "64"], "longer than max_seq_length"),
    (["--model.model_name_or_path", "/no/such/model"], "model directory not found"),
    (["--model.memory.budget_gib", "-2"], "model.memory.budget_gib must be a positive number of GiB"),
    (["--model.memory.budget_gib", "lots"], "model.memory.budget_gib"),
    (["--data.split.val_fraction", "1.5"], "data.split.val_fraction must be in [0, 1), not 1.5"),
    (["--model.objective.name", "dpo", "--model.objective.dpo_beta", "0"],
     "model.objective.dpo_beta must be positive, not 0.0"),
    pytest.param(["--model.optimization.optimizer", "adamw_8bit"], "needs a CUDA GPU",  # found once the run has begun
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only error")),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, extra, message):
    (tmp_path / "wrong.jsonl").write_text('{"question": "ক", "answer": "খ"}\n', encoding="utf-8")
    (tmp_path / "empty.jsonl").write_text("", encoding="utf-8")
    ok = {"messages": [{"role": "user", "content": "ক"}, {"role": "assistant", "content": "খ"}]}
    bad = {"messages": [{"role": "user", "content": "ক"}, {"role": "bot", "content": "খ"}]}
    (tmp_path / "role.jsonl").write_text(json.dumps(ok) + "\n" + json.dumps(bad) + "\n", encoding="utf-8")
    (tmp_path / "latin1.csv").write_bytes(b"prompt,response\ncaf\xe9,ok\n")
    (tmp_path / "notes.db").write_text("my notes\n")
    echo = {"messages": [{"role": "user", "content": "আপনি বলেছিলেন আমি সবসময় আপনার পাশে আছি"},
                         {"role": "assistant", "content": "আমি সবসময় আপনার পাশে আছি"}]}
    (tmp_path / "echo.jsonl").write_text(json.dumps(echo, ensure_ascii=False) + "\n", encoding="utf-8")
    (tmp_path / "no_weights").mkdir()
    (tmp_path / "no_weights" / "config.json").write_text("{}")
    (tmp_path / "no_weights" / "tokenizer.json").write_text("{}")
    (tmp_path / "not_adapter").mkdir()
    (tmp_path / "other_adapter").mkdir()
    (tmp_path / "other_adapter" / "adapter_config.json").write_text("{}")
    (tmp_path / "other_adapter" / "bengali_empathy.json").write_text(json.dumps(
        {"model_name_or_path": "/models/Llama-3.1-8B-Instruct", "base_model": "/models/Llama-3.1-8B-Instruct"}))
    r = run_cli(["fit", *DEFAULT, *extra], cwd=tmp_path)
    assert r.returncode == 2
    err = [line for line in r.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(err) == 1 and message in err[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "lightning_logs").exists()
    assert (tmp_path / "notes.db").read_text() == "my notes\n"


def test_runs_and_rate_bad_input_is_one_line(tmp_path):
    from bengali_empathy.records.registry import record_run

    db = tmp_path / "e.db"
    record_run(db, "m", {}, None, None, {}, [])
    (tmp_path / "notes.db").write_text("my notes\n")
    for args, message in ((["runs", "show", "99", "--db", str(db)], "no experiment '99'"),
                          (["runs", "--db", str(tmp_path / "notes.db")], "not an SQLite database"),
                          (["runs", "--db", str(tmp_path / "missing.db")], "experiment database not found"),
                          (["rate", "1", "--db", str(db)], "no generated replies"),
                          (["rate", "1", "--n", "0", "--db", str(db)], "--n must be at least 1"),
                          (["runs", "show", "1", "--samples", "-1", "--db", str(db)], "--samples must be at least 0"),
                          (["chat", "--max-new-tokens", "0", "-m", "x"], "--max-new-tokens must be at least 1")):
        r = run_cli(args, cwd=tmp_path)
        assert r.returncode == 2 and "Traceback" not in r.stderr, (args, r.stderr[-2000:])
        err = [line for line in r.stderr.strip().splitlines() if line.startswith("error:")]
        assert len(err) == 1 and message in err[0], (args, r.stderr[-2000:])
    assert (tmp_path / "notes.db").read_text() == "my notes\n"
    r = run_cli(["runs", "--db", str(db)], cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.splitlines()[1].split()[0] == "1"


def test_runs_lists_the_scores_of_fits_and_of_evaluations(tmp_path):
    from bengali_empathy.records.registry import record_run

    db = tmp_path / "e.db"
    record_run(db, "m", {}, 2.5, 2.0, {"val/loss": 2.0, "val/chrf": 30.0, "val/bleu": 1.5, "train/loss": 2.5}, [])
    record_run(db, "m", {}, None, None, {"loss": 1.5, "chrf": 40.0, "val/chrf": 99.0}, [])
    r = run_cli(["runs", "--db", str(db)], cwd=tmp_path)
    fit, evaluation = r.stdout.splitlines()[1:3]
    assert fit.endswith("val/bleu=1.5000, val/chrf=30.0000, val/loss=2.0000"), fit
    assert evaluation.endswith("chrf=40.0000, loss=1.5000"), evaluation  # its own scores first


def test_benchmark_bad_input_is_one_line_and_writes_nothing(tmp_path):
    cases = [(["--memory-budget", "lots"], "memory budget must be a number of GiB, auto or none, not 'lots'"),
             (["--compare", "7,lots"], "memory budget must be a number of GiB, auto or none, not 'lots'"),
             (["--loop", "sgd"], "--loop")]
    if not torch.cuda.is_available():
        cases.append((["--loop", "trl"], "needs a CUDA GPU with the unsloth extra"))
    for args, message in cases:
        r = run_cli(["benchmark", *args, "--json", "b.jsonl"], cwd=tmp_path)
        assert r.returncode == 2 and "Traceback" not in r.stderr, (args, r.stderr[-2000:])
        err = [line for line in r.stderr.strip().splitlines() if line.startswith("error:")]
        assert len(err) == 1 and message in err[0], (args, r.stderr[-2000:])
    assert not list(tmp_path.iterdir())


def test_rate_reads_scores_from_standard_input_and_stops_at_end_of_input(tmp_path):
    from bengali_empathy.records.human_ratings import rating_summary
    from bengali_empathy.records.registry import record_run

    db = tmp_path / "e.db"
    rows = [{"prompt": f"প্রশ্ন {i}", "reference": "উ", "prediction": f"জবাব {i}", "base_prediction": f"খ {i}"}
            for i in range(5)]
    eid = record_run(db, "m", {}, None, None, {"run": {"log_dir": str(tmp_path / "run")}}, rows)
    r = run_cli(["rate", str(tmp_path / "run"), "--n", "4", "--blind", "true", "--db", str(db)], cwd=tmp_path,
                stdin="5 4 4 5 4\nআন্তরিক\n1 2 3 4 5\n\n")  # two answers, then the input ends
    assert r.returncode == 0, r.stderr[-2000:]
    assert "stopped: 2 rated" in r.stdout
    summary = rating_summary(db, eid)
    assert sum(s["n"] for s in summary.values()) == 2


def test_report_without_a_run_is_one_line(tmp_path):
    (tmp_path / "empty_dir").mkdir()
    for target, message in ((tmp_path / "empty_dir", "no run in"), (tmp_path / "missing", "not found")):
        r = run_cli(["report", str(target)], cwd=tmp_path)
        assert r.returncode == 2 and "Traceback" not in r.stderr
        err = [line for line in r.stderr.strip().splitlines() if line.startswith("error:")]
        assert len(err) == 1 and message in err[0], r.stderr[-2000:]
    assert list((tmp_path / "empty_dir").iterdir()) == []


@pytest.mark.parametrize("bad_line,message", [
    ('{"prompt": "ভাঙা লাইন", "response": \n', "stream.jsonl:21: invalid JSON"),
    (json.dumps({"prompt": "দীর্ঘ " * 400, "response": "খ"}, ensure_ascii=False) + "\n",
     "stream.jsonl: row 21: conversation is"),
], ids=["malformed-json-line", "too-long-row"])
def test_streaming_late_data_error_names_file_and_row(tmp_path, bad_line, message):
    good = [json.dumps({"prompt": f"প্রশ্ন {i}", "response": f"উত্তর {i}"}, ensure_ascii=False) + "\n" for i in range(40)]
    (tmp_path / "stream.jsonl").write_text("".join(good[:20]) + bad_line + "".join(good[20:]), encoding="utf-8")
    r = run_cli(["fit", *QUICK, "--data.corpus_path", str(tmp_path / "stream.jsonl"), "--data.streaming", "true",
                 "--data.loading.shuffle_buffer", "0", "--trainer.max_steps", "30"], cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    err = [line for line in r.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(err) == 1 and message in err[0], r.stderr[-2000:]
    assert not list(tmp_path.glob("lightning_logs/*/adapter*"))


def _qa_csv(path, rows=24):
    """A small Q&A corpus."""
    lines = ["prompt,response"] + [f"প্রশ্ন {i}: আমার মন খারাপ।,আমি শুনছি {i}; বলুন।" for i in range(rows)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# Half of the 24 rows for validation: 9 training rows, 3 batches per epoch, fewer than the default
# config's 4 steps between validations.
SMALL = ["--data.split.val_fraction", "0.5"]


def test_validation_every_n_steps_spans_epochs_of_a_small_corpus(tmp_path):
    corpus = _qa_csv(tmp_path / "qa.csv")
    r = run_cli(["fit", *QUICK, *SMALL, "--data.corpus_path", corpus, "--trainer.max_steps", "4"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    vdir = tmp_path / "lightning_logs" / "version_0"
    ea = _events(vdir)
    assert [e.step for e in ea.Scalars("val/loss")] == [3]  # after step 4 (logged at 0-based step 3)
    assert ea.Scalars("epoch")[-1].value == 1  # in the small corpus's second epoch
    assert (vdir / "adapter" / "adapter_model.safetensors").is_file()


def test_a_trainer_option_lightning_rejects_is_one_line(tmp_path):
    corpus = _qa_csv(tmp_path / "qa.csv")
    r = run_cli(["fit", *QUICK, *SMALL, "--data.corpus_path", corpus, "--trainer.check_val_every_n_epoch", "1",
                 "--trainer.max_steps", "4"], cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    err = [line for line in r.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "`val_check_interval` (4) must be less than or equal" in err[0], r.stderr[-2000:]
    assert not (tmp_path / "lightning_logs").exists()


def test_print_config_shows_the_option_groups(tmp_path):
    import yaml

    r = run_cli(["fit", *DEFAULT, "--print_config"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    config = yaml.safe_load(r.stdout)
    model, data = config["model"], config["data"]
    assert {"lora", "memory", "objective", "optimization", "decoding", "generation"} <= set(model)
    assert model["lora"]["modules_to_save"] == ["lm_head"] and model["decoding"]["max_new_tokens"] == 24
    assert model["learning_rate"] == 0.02 and model["objective"]["name"] == "sft"
    assert {"columns", "encoding", "split", "loading", "predict"} <= set(data)
    assert data["columns"]["prompt"] == "prompt" and data["predict"]["max_samples"] == 16


@pytest.mark.parametrize("command", ["fit", "data-stats"])
@pytest.mark.parametrize("old,value,new", [
    ("model.lora_r", "8", "model.lora.r"),
    ("model.max_new_tokens", "8", "model.decoding.max_new_tokens"),
    ("model.objective", "dpo", "model.objective.name"),
    ("data.prompt_column", "question", "data.columns.prompt"),
    ("data.val_fraction", "0.2", "data.split.val_fraction"),
])
def test_an_old_flat_option_names_its_new_place(tmp_path, command, old, value, new):
    import yaml

    section, key = old.split(".")
    (tmp_path / "old.yaml").write_text(yaml.safe_dump({section: {key: yaml.safe_load(value)}}), encoding="utf-8")
    for args in ([*DEFAULT, f"--{old}", value], [*DEFAULT, f"--{old}={value}"], [*DEFAULT, "--config", "old.yaml"]):
        r = run_cli([command, *args], cwd=tmp_path)
        assert r.returncode == 2, (args, r.stderr[-2000:])
        err = [line for line in r.stderr.strip().splitlines() if line.startswith("error:")]
        assert err == [f"error: {old} is now {new}"], (args, r.stderr[-2000:])
        assert not (tmp_path / "lightning_logs").exists()


def test_every_moved_option_has_a_place_that_the_parser_knows(tmp_path):
    from bengali_empathy.cli import MOVED_OPTIONS, lightning_cli

    cli = lightning_cli([*DEFAULT, "--trainer.logger", "false"], run=False)
    config = cli.config.as_dict() if hasattr(cli.config, "as_dict") else cli.config
    for old, new in MOVED_OPTIONS.items():
        section, group, field = new.split(".")
        assert field in config[section][group], (old, new)
        assert old.split(".")[1] not in config[section] or old == "model.objective", old


def test_no_init_in_the_package_takes_more_than_15_parameters():
    import ast

    from conftest import ROOT

    too_many = []
    for path in sorted((ROOT / "bengali_empathy").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef) and node.name == "__init__":
                a = node.args
                count = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) - 1  # not self
                if count > 15:
                    too_many.append(f"{path.relative_to(ROOT)}:{node.lineno} ({count})")
    assert not too_many, too_many
