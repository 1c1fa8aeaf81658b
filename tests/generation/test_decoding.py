"""Decoding options as ``generate`` keyword arguments (bengali_empathy.generation.decoding)."""
from bengali_empathy.generation.decoding import Decoding


def test_decoding_options_reach_generate():
    kw = Decoding(max_new_tokens=9, temperature=0.7, top_p=0.9, top_k=40, repetition_penalty=1.2,
                  no_repeat_ngram_size=3).generate_kwargs()
    assert kw == {"max_new_tokens": 9, "do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 40,
                  "repetition_penalty": 1.2, "no_repeat_ngram_size": 3}
    assert Decoding().generate_kwargs() == {"max_new_tokens": 128, "do_sample": False}
