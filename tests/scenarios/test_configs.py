"""Every shipped config parses, and builds its model, data module and trainer where this machine can."""
import json

import pytest
import torch
import yaml

from conftest import ROOT, run_cli

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_configs_are_shipped():
    assert {c.name for c in CONFIGS} >= {"default.yaml", "llama31_8b_hf.yaml", "llama31_8b_unsloth.yaml", "dpo.yaml",
                                         "pretrain.yaml"}


def flat(options) -> dict:
    """An options section with its groups' keys dotted (``lora.r``)."""
    options = options.as_dict() if hasattr(options, "as_dict") else dict(options)
    return {f"{key}.{k}" if isinstance(value, dict) else key: v
            for key, value in options.items() for k, v in (value.items() if isinstance(value, dict) else [(key, value)])}


@pytest.mark.parametrize("cfg", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_shipped_config_parses(tmp_path, cfg):
    r = run_cli(["fit", "--config", cfg, "--print_config"], cwd=tmp_path)
    assert r.returncode == 0, (cfg.name, r.stderr[-2000:])
    assert "model_name_or_path" in r.stdout and "group_by_length" in r.stdout
    printed = yaml.safe_load(r.stdout)
    for section in ("model", "data"):
        for key, value in flat(yaml.safe_load(cfg.read_text())[section]).items():
            assert flat(printed[section])[key] == value, (cfg.name, section, key)


@pytest.mark.parametrize("cfg", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_shipped_config_instantiates(tmp_path, monkeypatch, cfg):
    """The config's classes resolve and take its values; a GPU config builds with what this machine lacks
    (the GPU, the 8B checkpoint, Unsloth) replaced."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from bengali_empathy.cli import lightning_cli

    raw = yaml.safe_load(cfg.read_text())
    replaced = {}
    if raw["trainer"]["accelerator"] == "gpu" and not torch.cuda.is_available():
        replaced["trainer.accelerator"] = "cpu"
    if raw["model"]["model_name_or_path"] != "tiny-random-llama" \
            and not (ROOT / raw["model"]["model_name_or_path"]).is_dir():
        replaced["model.model_name_or_path"] = "tiny-random-llama"
    if raw["model"]["backend"] == "unsloth" and not torch.cuda.is_available():
        replaced["model.backend"] = "hf"
    monkeypatch.chdir(tmp_path)
    corpus = tmp_path / raw["data"]["corpus_path"] if raw["data"].get("corpus_path") else None
    if corpus is not None and not corpus.is_file():  # the config names the user's corpus, relative to cwd
        corpus.parent.mkdir(parents=True, exist_ok=True)
        row = {"prompt": "আমি একা।", "response": "আমি আছি।"}  # a row of the config's layout
        if raw["model"].get("objective", {}).get("name") == "dpo":
            row = {"prompt": "আমি একা।", "chosen": "আমি আছি।", "rejected": "জানি না।"}
        if raw["data"].get("columns", {}).get("text"):
            row = {raw["data"]["columns"]["text"]: "আমি একা। আমি আছি।"}
        corpus.write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    args = ["--config", str(cfg)] + [x for k, v in replaced.items() for x in (f"--{k}", v)]
    monkeypatch.setattr("sys.argv", ["bengali_empathy"])  # the arguments are lightning_cli's, not pytest's
    cli = lightning_cli(args, run=False)
    for key, value in flat(raw["model"]).items():
        if f"model.{key}" not in replaced:
            assert flat(cli.model.hparams)[key] == value, (cfg.name, key)
    for key, value in flat(raw["data"]).items():
        assert flat(cli.datamodule.hparams)[key] == value, (cfg.name, key)
    trainer = cli.trainer
    assert trainer.max_steps == raw["trainer"].get("max_steps", -1)
    assert trainer.max_epochs == raw["trainer"].get("max_epochs", None if "max_steps" in raw["trainer"] else 1000)
    assert trainer.val_check_interval == raw["trainer"]["val_check_interval"]
    assert trainer.check_val_every_n_epoch == raw["trainer"].get("check_val_every_n_epoch", 1)
    assert trainer.precision == raw["trainer"]["precision"]
    assert trainer.accumulate_grad_batches == raw["trainer"].get("accumulate_grad_batches", 1)
    assert trainer.log_every_n_steps == raw["trainer"]["log_every_n_steps"]
    for spec in raw["trainer"].get("callbacks", []):
        (callback,) = [c for c in trainer.callbacks if type(c).__name__ == spec["class_path"].rsplit(".", 1)[1]]
        assert isinstance(callback, ModelCheckpoint) and callback.monitor == spec["init_args"]["monitor"]
    assert not replaced or cfg.name != "default.yaml"  # the embedded default needs nothing this machine lacks ...
    if not replaced:  # ... and builds in full here
        cli.model.configure_model()
        assert cli.model.param_counts[0] > 0
