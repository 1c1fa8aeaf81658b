"""Which runs the report puts together: a fit and the evaluations of its adapter."""
import yaml

from bengali_empathy.records.report import find_evaluation, find_fit


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
