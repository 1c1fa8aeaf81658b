"""``benchmark``'s own options: bad input as one line, nothing written (bengali_empathy.apps.benchmark)."""
import torch

from conftest import run_cli


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
