"""The command line's own behaviour (cli.py): bad input as one ``error:`` line that writes nothing, old option names
that name their new place, the option groups of --print_config. Whole runs are in tests/scenarios/."""
import json

import pytest
import torch

from bengali_empathy.cli import next_steps
from conftest import DEFAULT, QUICK, run_cli


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
    (["--data.encoding.chat_template", "missing.jinja"],
     "data.encoding.chat_template 'missing.jinja' is neither Jinja text nor a file"),
    (["--data.encoding.chat_template", "{% for m in messages %}{{ m['content'] }}{% endfor %}"],
     "data.encoding.chat_template: the tokenizer's chat template does not close an assistant reply with a special"),
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
    assert data["encoding"] == {"on_too_long": "error", "train_on": "all_assistant", "chat_template": None}


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


def test_evaluation_runs_say_what_they_wrote_and_how_to_report_it(tmp_path):
    (tmp_path / "predictions.jsonl").write_text("{}\n")
    (tmp_path / "metrics.json").write_text("{}\n")
    text = next_steps("predict", tmp_path, ["c.yaml"], "runs/version_0/adapter")
    assert f"predict wrote: {tmp_path / 'predictions.jsonl'}, {tmp_path / 'metrics.json'}" in text
    assert "python -m bengali_empathy report runs/version_0" in text
    assert "report " + str(tmp_path) in next_steps("validate", tmp_path, [], None)



def test_fit_without_an_adapter_says_so(tmp_path):
    assert "no adapter saved" in next_steps("fit", tmp_path, ["c.yaml"], None)


def test_a_missing_gguf_model_is_one_line_and_writes_nothing(tmp_path):
    """The data module's tokenizer link converts a .gguf model: a missing file stops the parse with the
    converter's own line, not jsonargparse's account of the link."""
    r = run_cli(["fit", *DEFAULT, "--model.model_name_or_path", "absent.gguf"], cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [f"error: GGUF file not found: {tmp_path / 'absent.gguf'}"]
    assert list(tmp_path.iterdir()) == []


def test_running_out_of_gpu_memory_is_one_error_line_with_what_to_change():
    from bengali_empathy.cli import as_user_error

    error = as_user_error(torch.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 2.50 GiB. GPU 0 has a total capacity of 139.81 GiB of which 1.2 GiB "
        "is free.\nOf the allocated memory 12.1 GiB is allocated by PyTorch"))
    assert str(error).startswith("out of GPU memory (Tried to allocate 2.50 GiB): lower data.batch_size")
    assert "\n" not in str(error) and "model.memory.budget_gib" in str(error)
    assert as_user_error(RuntimeError("a bug")) is None


@pytest.mark.parametrize("fails", [False, True])
def test_a_lightning_command_leaves_no_process_group_up_at_exit(tmp_path, monkeypatch, fails):
    """A DDP rank's run, ended or failed, destroys its process group (a one-rank gloo group stands in for it):
    gloo groups left up aborted two-rank runs at exit."""
    import torch.distributed as dist

    from bengali_empathy import cli

    def command(args):
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
        if fails:
            raise RuntimeError("a rank's fault")

    monkeypatch.setattr(cli, "lightning_cli", command)
    try:
        if fails:
            with pytest.raises(RuntimeError, match="a rank's fault"):
                cli.lightning_main([])
        else:
            assert cli.lightning_main([]) == 0
        left_up = dist.is_initialized()
    finally:
        if dist.is_initialized():  # the next test in this process starts without one either way
            dist.destroy_process_group()
    assert not left_up
