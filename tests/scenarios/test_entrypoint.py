"""``python -m bengali_empathy`` itself, in a new interpreter (every other CLI test calls ``main`` in-process)."""
import pytest

from conftest import DEFAULT, run_module


@pytest.mark.slow
def test_python_m_bengali_empathy_answers_and_reports_bad_input(tmp_path):
    r = run_module(["chat", "--max-new-tokens", "2", "-m", "আমি খুব একা।"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(r.stdout.strip().splitlines()) == 1
    r = run_module(["fit", *DEFAULT, "--model.backend", "vllm"], cwd=tmp_path)
    err = [line for line in r.stderr.strip().splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(err) == 1 and "model.backend" in err[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not list(tmp_path.iterdir())
