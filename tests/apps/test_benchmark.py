"""``benchmark``: a run on corpus rows; its own options' bad input as one line, nothing written
(bengali_empathy.apps.benchmark)."""
import json

import pytest
import torch

from conftest import DAILYDIALOG, run_cli


@pytest.mark.parametrize("pack", [True, False])
def test_a_corpus_run_counts_the_tokens_its_rows_hold_and_names_packed_rows_attention(tmp_path, pack):
    r = run_cli(["benchmark", "--backend", "hf", "--loop", "plain", "--seq-len", 256, "--batch-size", 2,
                 "--steps", 2, "--warmup", 1, "--corpus", DAILYDIALOG, *(["--pack"] if pack else []),
                 "--json", "b.jsonl"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    line = json.loads((tmp_path / "b.jsonl").read_text())
    assert line["packed"] is pack and line["steps_timed"] == 2
    # padding is not counted: a step's tokens are at most its 2 x 256 slots' filled share
    assert 0 < line["tokens_per_sec"] * line["step_s"] <= line["fill"] * 2 * 256 * 1.001
    if pack:
        assert line["packed_attention"] == "a block-diagonal mask (SDPA)"  # no varlen kernel on the CPU
    else:
        assert "packed_attention" not in line


@pytest.mark.parametrize("loop", ["plain", "lightning"])
def test_a_profile_records_steps_after_the_timed_ones(tmp_path, loop):
    from bengali_empathy.apps.benchmark import PROFILED_STEPS

    r = run_cli(["benchmark", "--backend", "hf", "--loop", loop, "--seq-len", 64, "--batch-size", 1, "--steps", 2,
                 "--warmup", 1, "--no-sanity-val", "--profile", "prof/ops.txt", "--json", "b.jsonl"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    line = json.loads((tmp_path / "b.jsonl").read_text())
    assert line["steps_timed"] == 2 and line["profile"] == "prof/ops.txt" and line["checkpointing_as_planned"]
    table = (tmp_path / "prof" / "ops.txt").read_text()
    assert table.startswith(f"{PROFILED_STEPS} training steps after the timed ones")
    calls = {row.split()[0]: int(row.split()[-1]) for row in map(str.strip, table.splitlines())
             if row.startswith(("aten::", "Optimizer.step"))}
    assert calls.get("aten::mm", 0) > 0, table[:2000]  # the tiny model's matrix products
    # the profiled steps, and only they: one optimizer step each
    assert [n for name, n in calls.items() if name.startswith("Optimizer.step")] == [PROFILED_STEPS], table[:2000]


def test_benchmark_bad_input_is_one_line_and_writes_nothing(tmp_path):
    cases = [(["--memory-budget", "lots"], "memory budget must be a number of GiB, auto or none, not 'lots'"),
             (["--profile", "p.txt", "--loop", "trl"], "--profile records this package's own steps"),
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
