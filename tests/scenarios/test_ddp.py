"""Lightning DDP with two CPU processes (gloo): fit, validate and predict on the embedded default."""
import json
import math

import pytest

from conftest import ROOT, run_cli, run_module

DDP = ["--config", str(ROOT / "configs" / "default.yaml"), "--trainer.devices", "2", "--trainer.strategy", "ddp",
       "--trainer.accelerator", "cpu", "--model.decoding.max_new_tokens", "4"]


@pytest.mark.slow
def test_two_process_fit_validate_predict(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from bengali_empathy.records.registry import connect

    # DDP re-launches the command line per rank, so the two-process runs are real interpreters.
    r = run_module(["fit", *DDP, "--trainer.max_steps", "2", "--trainer.val_check_interval", "2"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    logs = tmp_path / "lightning_logs"
    assert (logs / "version_0" / "adapter" / "adapter_model.safetensors").is_file()  # written once, by rank 0
    assert sorted(p.name for p in logs.iterdir()) == ["experiments.db", "version_0"]
    adapter = str(logs / "version_0" / "adapter")

    r = run_module(["validate", *DDP, "--model.adapter_path", adapter], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    ea = EventAccumulator(str(logs / "version_1"))
    ea.Reload()
    loss, ppl = ea.Scalars("val/loss")[-1].value, ea.Scalars("val/perplexity")[-1].value
    assert math.log(ppl) == pytest.approx(loss, rel=1e-5)  # one token-weighted loss, reduced over both ranks

    # 9 rows over 2 ranks: the distributed sampler's split is uneven; every row must come back once.
    r = run_module(["predict", *DDP, "--model.adapter_path", adapter, "--data.predict.max_samples", "9",
                    "--model.compare_base", "true"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    pdir = logs / "version_2"
    assert not list(pdir.glob("rank*"))
    rows = [json.loads(x) for x in (pdir / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    single = run_cli(["predict", *DDP[:2], "--trainer.accelerator", "cpu", "--model.decoding.max_new_tokens", "4",
                      "--model.adapter_path", adapter, "--data.predict.max_samples", "9"], cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    one = [json.loads(x) for x in (logs / "version_3" / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [row["id"] for row in rows] == [row["id"] for row in one]  # the same rows, once each, in input order
    assert [row["prediction"] for row in rows] == [row["prediction"] for row in one]
    metrics = json.loads((pdir / "metrics.json").read_text())
    solo = json.loads((logs / "version_3" / "metrics.json").read_text())
    assert metrics["n"] == 9 and metrics["generation"]["ranks"] == 2
    assert metrics["reply_tokens"] == solo["reply_tokens"]  # unrepeated sampler in predict: no row counted twice
    assert metrics["loss"] == pytest.approx(solo["loss"], rel=1e-4)
    assert metrics["chrf"] == pytest.approx(solo["chrf"], abs=1e-6)
    with connect(logs / "experiments.db") as con:  # one record per run, by rank 0
        assert con.execute("SELECT COUNT(*) FROM LLAMAExperiments").fetchone()[0] == 4
        assert con.execute("SELECT COUNT(*) FROM GeneratedResponses WHERE experiment_id = 3").fetchone()[0] == 9
