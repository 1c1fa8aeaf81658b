"""``data-stats``: the corpus statistics per split, printed and as JSON, read as the config trains on them
(bengali_empathy.apps.data_stats; the CLI in-process)."""
import json

from conftest import DEFAULT, ROOT, run_cli


def test_data_stats_command(tmp_path):
    r = run_cli(["data-stats", *DEFAULT, "--data.max_seq_length", "600", "--json", str(tmp_path / "s.json")],
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    stats = json.loads((tmp_path / "s.json").read_text())
    assert set(stats) == {"train", "val", "test"}
    train = stats["train"]
    assert train["rows"] == train["kept"] + train["dropped_too_long"] and train["dropped_too_long"] > 0
    assert train["tokens_p50"] <= train["tokens_p90"] <= train["tokens_p99"] <= train["tokens_max"]
    assert "over_max_pct" in r.stdout and "note: on_too_long=error" in r.stdout


def write(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_data_stats_reads_pairs_as_the_config_trains_on_them(tmp_path):
    write(tmp_path / "prefs.jsonl", [{"prompt": "আমি একা।", "chosen": "আমি আছি।", "rejected": "জানি না।"}] * 3)
    r = run_cli(["data-stats", "--config", ROOT / "configs" / "dpo.yaml", "--data.split.val_fraction", "0",
                 "--data.split.test_fraction", "0"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-1500:]
    train = next(line.split() for line in r.stdout.splitlines() if line.split()[:1] == ["train"])
    assert train[1] == "3" and train[3] == "6"  # rows, turns (prompt + chosen reply)
