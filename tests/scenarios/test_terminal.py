"""What a run's terminal says: no third-party notices, the right epoch, where its files are and what to run next,
and an empty reply shown as such."""
import io
from pathlib import Path

from bengali_empathy.cli import next_steps
from bengali_empathy.generation.chat import EMPTY_REPLY, Reply, chat_loop
from bengali_empathy.schema import EvalRow

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


def test_evaluation_runs_say_what_they_wrote_and_how_to_report_it(tmp_path):
    (tmp_path / "predictions.jsonl").write_text("{}\n")
    (tmp_path / "metrics.json").write_text("{}\n")
    text = next_steps("predict", tmp_path, ["c.yaml"], "runs/version_0/adapter")
    assert f"predict wrote: {tmp_path / 'predictions.jsonl'}, {tmp_path / 'metrics.json'}" in text
    assert "python -m bengali_empathy report runs/version_0" in text
    assert "report " + str(tmp_path) in next_steps("validate", tmp_path, [], None)


def test_fit_without_an_adapter_says_so(tmp_path):
    assert "no adapter saved" in next_steps("fit", tmp_path, ["c.yaml"], None)


class _Replier:
    """Answers every message with the given texts, as :class:`Replier.stream` streams them."""

    max_seq_length = 768

    def __init__(self, text: str) -> None:
        self.text = text

    def stream(self, turns, decoding=None):
        yield Reply(self.text, prompt_tokens=5, history_turns=0, dropped_turns=0, done=True)


def test_chat_shows_an_empty_reply_as_such():
    out, notes = io.StringIO(), []
    chat_loop(_Replier(""), ["আজ মন খারাপ।"], out, notes.append)
    assert out.getvalue() == "\n" and notes == [EMPTY_REPLY]
    out, notes = io.StringIO(), []
    chat_loop(_Replier("আমি শুনছি।"), ["আজ মন খারাপ।"], out, notes.append)
    assert out.getvalue() == "আমি শুনছি।\n" and notes == []


def test_predictions_mark_empty_replies():
    row = EvalRow("c.jsonl", 1, "1", "p", "r", prediction=" ", base_prediction="উত্তর")
    assert row.output()["prediction_empty"] is True and row.output()["base_prediction_empty"] is False
    assert "base_prediction_empty" not in EvalRow("c.jsonl", 1, "1", "p", "r", prediction="x").output()


def test_the_web_page_says_a_reply_is_empty():
    import pytest

    pytest.importorskip("gradio")  # the serve extra
    from bengali_empathy.apps.serve import describe

    assert EMPTY_REPLY in describe(Reply("", 5, 0, 0, done=True), 768)
    assert EMPTY_REPLY not in describe(Reply("", 5, 0, 0, done=False), 768)  # still streaming
