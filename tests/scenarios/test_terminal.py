"""What the README's fit prints: no third-party notices, the right epoch, where its files are and what to run next.
(next_steps' own texts: tests/test_cli.py; an empty reply in chat, predictions and the web page:
tests/generation/test_chat.py, tests/test_schema.py, tests/apps/test_serve.py.)"""
from pathlib import Path

NOISE = ("💡 Tip", "litlogger", "set_vital", "LeafSpec", "Epoch 0/-2", "Epoch 0/-1")


def test_the_readme_fit_prints_no_notices_and_ends_with_the_next_commands(default_fit):
    cwd, run_dir, r = default_fit
    printed = r.stdout + r.stderr
    assert [n for n in NOISE if n in printed] == []
    assert "Epoch 0" in r.stdout  # the progress bar, step-bounded: no "/-2"
    adapter = Path("lightning_logs") / "version_0" / "adapter"
    assert (cwd / adapter).is_dir()
    after = r.stderr[r.stderr.index("next:"):]
    # the run's own saved config: every option it ran with, command-line ones included
    assert (f"python -m bengali_empathy predict --config {adapter.parent / 'config.yaml'} "
            f"--model.adapter_path {adapter} --model.compare_base true") in after
    for command in (f"report {adapter.parent}", f"chat --adapter {adapter}", f"serve --adapter {adapter}",
                    f"export --adapter {adapter}"):
        assert f"python -m bengali_empathy {command}" in after
