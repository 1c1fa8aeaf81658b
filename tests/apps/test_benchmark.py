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
