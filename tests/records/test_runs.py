"""``runs``: the experiment list with each run's scores (bengali_empathy.records.runs; the CLI in-process)."""
from conftest import run_cli


def test_runs_lists_the_scores_of_fits_and_of_evaluations(tmp_path):
    from bengali_empathy.records.registry import record_run

    db = tmp_path / "e.db"
    record_run(db, "m", {}, 2.5, 2.0, {"val/loss": 2.0, "val/chrf": 30.0, "val/bleu": 1.5, "train/loss": 2.5}, [])
    record_run(db, "m", {}, None, None, {"loss": 1.5, "chrf": 40.0, "val/chrf": 99.0}, [])
    r = run_cli(["runs", "--db", str(db)], cwd=tmp_path)
    fit, evaluation = r.stdout.splitlines()[1:3]
    assert fit.endswith("val/bleu=1.5000, val/chrf=30.0000, val/loss=2.0000"), fit
    assert evaluation.endswith("chrf=40.0000, loss=1.5000"), evaluation  # its own scores first
