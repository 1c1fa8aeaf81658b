"""Whole runs on small corpora other than the README's: the DailyDialog-bn conversations through fit, validate and
predict, and validation every n steps across the epochs of a corpus smaller than n batches (the CLI in-process)."""
import json

import pytest

from conftest import DAILYDIALOG, QUICK, run_cli, tensorboard_events


def _qa_csv(path, rows=24):
    """A small Q&A corpus."""
    lines = ["prompt,response"] + [f"প্রশ্ন {i}: আমার মন খারাপ।,আমি শুনছি {i}; বলুন।" for i in range(rows)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# Half of the 24 rows for validation: 9 training rows, 3 batches per epoch, fewer than the default
# config's 4 steps between validations.
SMALL = ["--data.split.val_fraction", "0.5"]


@pytest.mark.slow
def test_dailydialog_conversations_fit_validate_predict(tmp_path):
    corpus = str(DAILYDIALOG)
    args = [*QUICK, "--data.corpus_path", corpus, "--data.max_seq_length", "1024", "--data.encoding.on_too_long",
            "truncate_history", "--trainer.max_steps", "4",
            "--trainer.val_check_interval", "4"]
    r = run_cli(["fit", *args], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "truncated" in r.stderr
    adapter = tmp_path / "lightning_logs" / "version_0" / "adapter"
    for cmd in ("validate", "predict"):
        r = run_cli([cmd, *args, "--model.adapter_path", str(adapter)], cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
    rows = (tmp_path / "lightning_logs" / "version_2" / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(rows) == 4 and json.loads(rows[0])["id"].startswith("ddbn-sample-")


def test_validation_every_n_steps_spans_epochs_of_a_small_corpus(tmp_path):
    corpus = _qa_csv(tmp_path / "qa.csv")
    r = run_cli(["fit", *QUICK, *SMALL, "--data.corpus_path", corpus, "--trainer.max_steps", "4"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "packed rows attend" not in r.stdout  # rows of one conversation each: no packed attention to name
    vdir = tmp_path / "lightning_logs" / "version_0"
    ea = tensorboard_events(vdir)
    assert [e.step for e in ea.Scalars("val/loss")] == [3]  # after step 4 (logged at 0-based step 3)
    assert ea.Scalars("epoch")[-1].value == 1  # in the small corpus's second epoch
    assert (vdir / "adapter" / "adapter_model.safetensors").is_file()
