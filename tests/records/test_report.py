"""Which runs the report puts together (a fit and the evaluations of its adapter), and no run as one line."""
import yaml

from bengali_empathy.records.report import find_evaluation, find_fit
from conftest import run_cli


def test_a_relative_adapter_path_is_found_from_any_directory(tmp_path, monkeypatch):
    """`test --model.adapter_path lightning_logs/version_0/adapter` ran in tmp_path; the report (and the
    web page's Runs tab) may be made from anywhere."""
    logs = tmp_path / "lightning_logs"
    fit, evaluation = logs / "version_0", logs / "version_1"
    (fit / "adapter").mkdir(parents=True)
    (fit / "run.json").write_text("{}")
    evaluation.mkdir()
    (evaluation / "metrics.json").write_text("{}")
    (evaluation / "config.yaml").write_text(yaml.safe_dump({"model": {"adapter_path": "lightning_logs/version_0/adapter"}}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert find_fit(evaluation) == fit
    assert find_evaluation(fit) == evaluation


def test_the_category_table_has_a_row_per_category_and_model_with_every_text_score():
    from bengali_empathy.evaluation.metrics import SCORE_NAMES, TEXT_SCORES
    from bengali_empathy.records.report import _category_section

    scores = {k: 0.25 for k in TEXT_SCORES} | {"n": 2}
    lines = _category_section({"by_category": {"sad": {**scores, "base": {**scores, "distinct_2": 0.5}}}})
    assert lines[2] == "| " + " | ".join(["category", "model", "rows", *(SCORE_NAMES[k] for k in TEXT_SCORES)]) + " |"
    assert lines[4].startswith("| sad | tuned | 2 | 0.2500 |") and "| base | 2 |" in lines[5]
    assert lines[5].count("0.5000") == 1 and len(lines) == 7  # the rows, then the blank line
    plain = _category_section({"by_category": {"sad": scores}})
    assert plain[2].startswith("| category | rows | BLEU |") and plain[4].startswith("| sad | 2 |")


def test_report_without_a_run_is_one_line(tmp_path):
    (tmp_path / "empty_dir").mkdir()
    for target, message in ((tmp_path / "empty_dir", "no run in"), (tmp_path / "missing", "not found")):
        r = run_cli(["report", str(target)], cwd=tmp_path)
        assert r.returncode == 2 and "Traceback" not in r.stderr
        err = [line for line in r.stderr.strip().splitlines() if line.startswith("error:")]
        assert len(err) == 1 and message in err[0], r.stderr[-2000:]
    assert list((tmp_path / "empty_dir").iterdir()) == []
