"""A .gguf model path: one error line for each file that cannot become a checkpoint (the round trip of a real
export is in tests/export/test_gguf.py)."""
import pytest

from bengali_empathy.errors import UserError
from bengali_empathy.models.modeling import resolve_model_path, tokenizer_path_for

gguf = pytest.importorskip("gguf")  # the gguf extra


def _write(path, architecture: str, tensor_type=None) -> None:
    import numpy as np

    writer = gguf.GGUFWriter(str(path), architecture)
    if tensor_type is not None:
        writer.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.uint8), raw_dtype=tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BENGALI_EMPATHY_CACHE", str(tmp_path / "cache"))


def test_a_missing_file_is_one_line(tmp_path):
    with pytest.raises(UserError, match="GGUF file not found: .*absent.gguf"):
        resolve_model_path(str(tmp_path / "absent.gguf"))


def test_a_file_that_is_not_gguf_is_one_line(tmp_path):
    (tmp_path / "notes.gguf").write_text("not a model")
    with pytest.raises(UserError, match="notes.gguf: not a readable GGUF file"):
        resolve_model_path(str(tmp_path / "notes.gguf"))


def test_an_architecture_transformers_cannot_load_is_one_line(tmp_path):
    _write(tmp_path / "odd.gguf", "rwkv7")
    with pytest.raises(UserError, match="GGUF architecture 'rwkv7' is not one transformers can load .*llama"):
        resolve_model_path(str(tmp_path / "odd.gguf"))
    assert not (tmp_path / "cache" / "gguf").exists() or not any((tmp_path / "cache" / "gguf").iterdir())


def test_the_data_module_reads_the_converted_tokenizer_only_for_a_gguf(tmp_path):
    assert tokenizer_path_for("tiny-random-llama") is None
    assert tokenizer_path_for("/models/Llama-3.1-8B-Instruct") == "/models/Llama-3.1-8B-Instruct"
    with pytest.raises(UserError, match="GGUF file not found"):
        tokenizer_path_for(str(tmp_path / "absent.gguf"))


def test_llama3_rope_scaling_comes_back_from_the_factors_llama_cpp_keeps():
    """transformers' GGUF reader drops Llama 3.1's RoPE scaling; the factors in rope_freqs give it back, and
    factors of any other scaling are refused."""
    from bengali_empathy.models.gguf_import import llama3_rope_factors, llama3_rope_parameters
    from bengali_empathy.models.modeling import llama31_config

    factors = llama3_rope_factors(llama31_config())
    assert factors[0] == 1.0 and factors[-1] == 8.0  # high frequencies unscaled, the lowest scaled by 8
    read = llama31_config(rope_scaling=None)  # what the GGUF reader gives: rope_type default
    rope = llama3_rope_parameters("m.gguf", read, factors)
    assert {k: rope[k] for k in ("rope_type", "factor", "low_freq_factor", "high_freq_factor",
                                 "original_max_position_embeddings")} == {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}
    with pytest.raises(UserError, match="m.gguf: its RoPE frequency factors .* are not Llama 3's scaling"):
        llama3_rope_parameters("m.gguf", llama31_config(rope_scaling=None), [f * 1.5 for f in factors])
