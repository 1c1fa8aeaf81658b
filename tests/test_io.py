"""Atomic writes: a failed write leaves the old file or directory as it was, and no temporary leftovers."""
import pytest

from bengali_empathy._io import atomic_directory, atomic_write_text, replace_directory


def test_a_failed_text_write_keeps_the_old_file_and_leaves_nothing(tmp_path):
    target = tmp_path / "metrics.json"
    atomic_write_text(target, "old\n")
    with pytest.raises(UnicodeEncodeError):
        atomic_write_text(target, "new and half written " + "\ud800")  # a lone surrogate fails mid-write
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
    atomic_write_text(tmp_path / "sub" / "run.json", "রান\n")
    assert (tmp_path / "sub" / "run.json").read_text(encoding="utf-8") == "রান\n"


def test_a_directory_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "adapter"
    with atomic_directory(target) as tmp:
        (tmp / "weights").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            (tmp / "weights").write_text("half")
            raise RuntimeError("disk full")
    assert (target / "weights").read_text() == "old"
    with atomic_directory(target) as tmp:  # replaced whole
        (tmp / "weights").write_text("new")
    assert [p.name for p in target.iterdir()] == ["weights"] and (target / "weights").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_a_directory_that_must_not_be_replaced_is_kept(tmp_path):
    target = tmp_path / "merged"
    target.mkdir()
    (target / "config.json").write_text("theirs")
    with pytest.raises(FileExistsError):
        with atomic_directory(target, replace=False) as tmp:
            (tmp / "config.json").write_text("ours")
    assert (target / "config.json").read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]


def test_replacing_a_directory_keeps_no_leftovers(tmp_path):
    target, new = tmp_path / "adapter", tmp_path / ".adapter.tmp-1"
    target.mkdir()
    (target / "weights").write_text("old")
    new.mkdir()
    (new / "weights").write_text("new")
    replace_directory(new, target)
    assert (target / "weights").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
