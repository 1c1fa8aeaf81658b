"""A run's records: at fit end the adapter, then run.json, then the registry row, each seeing the one before."""
import json

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger

from bengali_empathy.records import registry
from bengali_empathy.records import run as records
from bengali_empathy.data import EmpatheticDialogueDataModule
from bengali_empathy.models.memory import MemorySettings
from bengali_empathy.training.module import EmpathyLM, GenerationSettings, OptimizerSettings
from bengali_empathy.records.registry import ExperimentRegistry, connect
from bengali_empathy.schema import CorpusFacts


def test_fit_writes_the_adapter_then_run_json_then_the_registry_row(monkeypatch, tmp_path, tiny_model_path):
    seen = []
    log_dir = tmp_path / "logs" / "version_0"
    write_run_record, record_run = records.write_run_record, registry.record_run

    def run_json(directory, *args):
        seen.append(("run.json", (directory / "adapter" / "adapter_model.safetensors").is_file()))
        return write_run_record(directory, *args)

    def registry_row(db, *args):
        seen.append(("registry", (log_dir / "run.json").is_file() and (log_dir / "adapter").is_dir()))
        return record_run(db, *args)

    monkeypatch.setattr(records, "write_run_record", run_json)
    monkeypatch.setattr(registry, "record_run", registry_row)
    db = tmp_path / "experiments.db"
    lm = EmpathyLM(model_name_or_path=str(tiny_model_path), backend="hf", max_seq_length=768, train_batch_size=2,
                   memory=MemorySettings(load_in_4bit=False, gradient_checkpointing=False),
                   generation=GenerationSettings(val_batches=0), optimization=OptimizerSettings(optimizer="adamw"))
    # What the CLI hands over once the data module is prepared (no reaching into the trainer's data module).
    lm.connect(CorpusFacts("corpus.jsonl", {"train": {"rows": 12, "kept": 12}}, batching={"pack": True}))
    trainer = L.Trainer(accelerator="cpu", max_steps=2, limit_val_batches=0, num_sanity_val_steps=0,
                        logger=TensorBoardLogger(tmp_path, name="logs"), enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[ExperimentRegistry(str(db))])
    trainer.fit(lm, datamodule=EmpatheticDialogueDataModule(max_seq_length=768, batch_size=2))
    assert seen == [("run.json", True), ("registry", True)]
    run = json.loads((log_dir / "run.json").read_text())
    assert run["data"]["corpus"] == "corpus.jsonl" and run["data"]["stats"]["train"]["rows"] == 12
    assert run["data"]["pack"] is True and run["data"]["batch_size"] == 2 and run["trainer"]["steps"] == 2
    assert run["model"]["lora"] == lm.lora.as_record() and run["trainer"]["optimizer"] == "adamw"
    with connect(db) as con:
        (metrics, lora), = con.execute("SELECT metrics, lora_config FROM LLAMAExperiments").fetchall()
    run_row = json.loads(metrics)["run"]
    assert run_row["stage"] == "fit" and run_row["log_dir"] == str(log_dir.resolve())
    assert run_row["corpus"] == "corpus.jsonl" and json.loads(lora) == run["model"]["lora"]


def test_without_a_log_directory_the_registry_still_gets_the_fit(tmp_path):
    from types import SimpleNamespace

    stored = []

    class Sink(records.RunRecordSink):
        def store_fit(self, record):
            stored.append(record)

    trainer = SimpleNamespace(log_dir=None, is_global_zero=True, callbacks=[Sink()], callback_metrics={},
                              global_step=3)
    run = records.RunInfo("m", "m", "hf", False, records.LoraSettings(), 1, 10, 768, False, None, "adamw", 1e-3)
    assert records.write_fit_records(trainer, run, 1.0, save_adapters=lambda _: stored.append("adapter")) is None
    assert len(stored) == 1 and stored[0].metrics["run"]["log_dir"] is None and stored[0].metrics["run"]["steps"] == 3
