"""Lightning DDP with two CPU processes (gloo): fit (with its validation) and predict on the embedded default."""
import json
import math

import pytest

from conftest import ROOT, requires_cuda, run_cli, run_module

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


RANK_PROBE = '''
import hashlib, json, os

import lightning as L


class RankProbe(L.Callback):
    """Per rank: a digest of every training row it trained on and, after the fit, of its LoRA weights."""

    def __init__(self, out: str):
        self.out, self.rows = out, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.rows += [hashlib.sha1(str(row.tolist()).encode()).hexdigest() for row in batch["input_ids"]]

    def on_train_end(self, trainer, pl_module):
        trained = sorted((n, p.detach().float().cpu()) for n, p in pl_module.model.named_parameters() if p.requires_grad)
        lora = hashlib.sha1(b"".join(t.numpy().tobytes() for _, t in trained)).hexdigest()
        with open(os.path.join(self.out, f"rank{trainer.global_rank}.json"), "w") as f:
            json.dump({"rows": self.rows, "lora": lora, "tensors": len(trained)}, f)
'''


def launch_two_ranks_on_one_device(args: list, cwd, probe_dir, timeout=900) -> list:
    """Two processes of ``fit ARGS`` as two nodes of one device each (what a launcher such as torchrun or SLURM
    would start): the environment Lightning reads, gloo between them, and :data:`RANK_PROBE` as a callback."""
    import os
    import socket
    import subprocess
    import sys

    (probe_dir / "rank_probe.py").write_text(RANK_PROBE)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = os.pathsep.join(p for p in (str(ROOT), str(probe_dir), os.environ.get("PYTHONPATH")) if p)
    command = [sys.executable, "-m", "bengali_empathy", "fit", *map(str, args), "--trainer.num_nodes", "2",
               "--trainer.devices", "1", "--trainer.strategy.class_path", "lightning.pytorch.strategies.DDPStrategy",
               "--trainer.strategy.init_args.process_group_backend", "gloo",
               "--trainer.callbacks+=rank_probe.RankProbe", "--trainer.callbacks.out", str(probe_dir)]
    ranks = [subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=path, MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=str(port), WORLD_SIZE="2", NODE_RANK=str(rank), LOCAL_RANK="0"))
             for rank in (0, 1)]
    return [(p.wait(timeout=timeout), p.communicate()[1]) for p in ranks]


@pytest.mark.slow
@pytest.mark.parametrize("device", [pytest.param("gpu", marks=[pytest.mark.gpu, requires_cuda]), "cpu"])
def test_two_ranks_sharing_one_device_train_disjoint_batches_to_the_same_adapter(tmp_path, device):
    """What a multi-GPU DDP fit does, on the one device available: two ranks over gloo, each a node with one
    device (on the GPU: Unsloth, 4-bit). Each rank trains on its own rows, the averaged gradients leave both with
    the same LoRA weights, validation is reduced over both, and rank 0 alone writes the adapter and the registry
    row."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from bengali_empathy.records.registry import connect

    backend = ["--model.backend", "unsloth"] if device == "gpu" else []
    ranks = launch_two_ranks_on_one_device(
        ["--config", ROOT / "configs" / "default.yaml", *backend, "--trainer.accelerator", device,
         "--trainer.max_steps", "3", "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "2",
         "--model.decoding.max_new_tokens", "4"], tmp_path, tmp_path)
    for rc, err in ranks:
        assert rc == 0, err[-3000:]
    probes = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(len(p["rows"]) > 0 for p in probes)
    assert not set(probes[0]["rows"]) & set(probes[1]["rows"])  # the distributed sampler: no row on both ranks
    assert probes[0]["lora"] == probes[1]["lora"] and probes[0]["tensors"] > 0  # gradients averaged
    logs = tmp_path / "lightning_logs"
    assert sorted(p.name for p in logs.iterdir()) == ["experiments.db", "version_0"]
    assert (logs / "version_0" / "adapter" / "adapter_model.safetensors").is_file()
    ea = EventAccumulator(str(logs / "version_0"))
    ea.Reload()
    assert len(ea.Scalars("val/loss")) == 1
    with connect(logs / "experiments.db") as con:
        assert con.execute("SELECT COUNT(*) FROM LLAMAExperiments").fetchone()[0] == 1
