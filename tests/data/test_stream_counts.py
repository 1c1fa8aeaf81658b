"""The per-epoch report of a streamed corpus (bengali_empathy.data.stream_counts)."""

from bengali_empathy.data import EmpatheticDialogueDataModule, EncodingSettings, SplitSettings, StreamCounts
from conftest import write_jsonl


def _pairs(n):
    return [{"id": f"r{i}", "prompt": f"প্রশ্ন নম্বর {i}", "response": f"উত্তর নম্বর {i}"} for i in range(n)]



def test_stream_counts_callback_prints_and_logs_the_epochs_rows(tmp_path, capsys):
    rows = _pairs(20) + [{"id": "long", "prompt": "দীর্ঘ " * 300, "response": "খ"}, {"id": "e", "prompt": "ক",
                                                                                      "response": ""}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    dm = EmpatheticDialogueDataModule(corpus_path=path, streaming=True, max_seq_length=256,
                                      encoding=EncodingSettings(on_too_long="drop"),
                                      split=SplitSettings(val_fraction=0.0, test_fraction=0.0))
    dm.setup()
    list(dm.train_dataloader())
    logged = {}

    class Module:
        print = staticmethod(print)

        def log(self, name, value, **kwargs):
            logged[name] = value

    class Trainer:
        datamodule = dm

    StreamCounts().on_train_epoch_end(Trainer(), Module())
    assert "streamed train rows this epoch: 20 kept, 0 truncated, 1 dropped as too long, 1 dropped as empty" \
        in capsys.readouterr().out
    assert logged == {"data/train_truncated_rows": 0.0, "data/train_too_long_rows": 1.0, "data/train_empty_rows": 1.0}
    in_memory = EmpatheticDialogueDataModule(corpus_path=path, max_seq_length=256,
                                             encoding=EncodingSettings(on_too_long="drop"))
    in_memory.setup()
    Trainer.datamodule = in_memory
    StreamCounts().on_train_epoch_end(Trainer(), Module())  # counted before the run: nothing to report
    assert capsys.readouterr().out == "" and len(logged) == 3
