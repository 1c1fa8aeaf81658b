import pytest
import torch


def test_a_rank_other_than_0_writes_the_same_complete_checkpoint_as_save_pretrained(tmp_path, monkeypatch):
    """A DDP fit resolves the embedded tiny model after the process group is up; whichever rank writes it first
    publishes it, so the second rank's copy must hold the weights too (transformers' save_pretrained writes
    none there) and load to the same model."""
    from transformers import AutoModelForCausalLM

    from bengali_empathy.models.modeling import llama31_config, write_random_model

    torch.manual_seed(0)
    expected = AutoModelForCausalLM.from_config(llama31_config(initializer_range=0.1))
    expected.save_pretrained(str(tmp_path / "save_pretrained"))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda *a, **k: 1)
    path = write_random_model(tmp_path / "rank1", initializer_range=0.1)
    monkeypatch.undo()

    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in path.iterdir()}
    written = AutoModelForCausalLM.from_pretrained(str(path))
    reference = AutoModelForCausalLM.from_pretrained(str(tmp_path / "save_pretrained"))
    assert written.config.to_diff_dict() == reference.config.to_diff_dict()
    got, want = written.state_dict(), reference.state_dict()
    assert got.keys() == want.keys() and len(got) > 0
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert not written.generation_config.do_sample


def test_a_checkpoint_another_process_wrote_first_is_kept(tmp_path):
    from bengali_empathy.models.modeling import write_random_model

    first = write_random_model(tmp_path / "m", seed=0)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert write_random_model(tmp_path / "m", seed=0) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left behind
