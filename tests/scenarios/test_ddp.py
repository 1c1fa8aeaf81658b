"""Lightning DDP with two CPU processes (gloo): fit (with its validation) and predict on the embedded default."""
import json
import math

import pytest

from conftest import ROOT, run_cli, run_module

DDP = ["--config", str(ROOT / "configs" / "default.yaml"), "--trainer.devices", "2", "--trainer.strategy", "ddp",
       "--trainer.accelerator", "cpu", "--model.decoding.max_new_tokens", "4"]


@pytest.mark.slow
def test_two_process_fit_validate_predict(tmp_path):
    """Two launches of two real rank processes each (DDP re-launches the command line per rank): ``fit``, whose
    validation is Lightning's validation loop over both ranks (what ``validate`` runs), then ``predict`` on the
    adapter it wrote, against the same ``predict`` in one process."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from bengali_empathy.records.registry import connect

    r = run_module(["fit", *DDP, "--trainer.max_steps", "1", "--trainer.val_check_interval", "1"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    logs = tmp_path / "lightning_logs"
    assert (logs / "version_0" / "adapter" / "adapter_model.safetensors").is_file()  # written once, by rank 0
    assert sorted(p.name for p in logs.iterdir()) == ["experiments.db", "version_0"]
    adapter = str(logs / "version_0" / "adapter")
    ea = EventAccumulator(str(logs / "version_0"))
    ea.Reload()
    assert len(ea.Scalars("val/loss")) == 1  # one validation, after the one step
    loss, ppl = ea.Scalars("val/loss")[-1].value, ea.Scalars("val/perplexity")[-1].value
    assert math.log(ppl) == pytest.approx(loss, rel=1e-5)  # one token-weighted loss, reduced over both ranks

    # 9 rows over 2 ranks: the distributed sampler's split is uneven; every row must come back once.
    r = run_module(["predict", *DDP, "--model.adapter_path", adapter, "--data.predict.max_samples", "9",
                    "--model.compare_base", "true"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    pdir = logs / "version_1"
    assert not list(pdir.glob("rank*"))
    rows = [json.loads(x) for x in (pdir / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    single = run_cli(["predict", *DDP[:2], "--trainer.accelerator", "cpu", "--model.decoding.max_new_tokens", "4",
                      "--model.adapter_path", adapter, "--data.predict.max_samples", "9"], cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    one = [json.loads(x) for x in (logs / "version_2" / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [row["id"] for row in rows] == [row["id"] for row in one]  # the same rows, once each, in input order
    assert [row["prediction"] for row in rows] == [row["prediction"] for row in one]
    metrics = json.loads((pdir / "metrics.json").read_text())
    solo = json.loads((logs / "version_2" / "metrics.json").read_text())
    assert metrics["n"] == 9 and metrics["generation"]["ranks"] == 2
    assert metrics["reply_tokens"] == solo["reply_tokens"]  # unrepeated sampler in predict: no row counted twice
    assert metrics["loss"] == pytest.approx(solo["loss"], rel=1e-4)
    assert metrics["chrf"] == pytest.approx(solo["chrf"], abs=1e-6)
    with connect(logs / "experiments.db") as con:  # one record per run, by rank 0
        assert con.execute("SELECT COUNT(*) FROM LLAMAExperiments").fetchone()[0] == 3
        assert con.execute("SELECT COUNT(*) FROM GeneratedResponses WHERE experiment_id = 2").fetchone()[0] == 9
