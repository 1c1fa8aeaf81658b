"""Packing, first-fit groups and the collator's loss tensors and generation prompts (bengali_empathy.data.batching)."""
import pytest

from bengali_empathy.data import Collator, pack_examples, pack_groups
from conftest import packable_examples, packed_and_single_batches, packed_and_weighted_loss


def test_collator_pads_right_for_training_and_keeps_generation_prompts_unpadded():
    batch = [
        {"input_ids": [1, 2, 3], "label_spans": [1, 3], "prompt_len": 1, "file": "c.jsonl", "line": 1, "id": "a",
         "prompt": "p", "reference": "r"},
        {"input_ids": [4, 5], "label_spans": [1, 2], "prompt_len": 1, "file": "c.jsonl", "line": 2, "id": "b",
         "prompt": "q", "reference": "s"},
    ]
    out = Collator(pad_id=0, pad_to_multiple_of=4)(batch)
    assert out["input_ids"].tolist() == [[1, 2, 3, 0], [4, 5, 0, 0]]
    assert out["labels"].tolist() == [[-100, 2, 3, -100], [-100, 5, -100, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0]]
    assert [r.prompt_ids for r in out["eval_rows"]] == [[1], [4]]
    assert [(r.where, r.id, r.reference) for r in out["eval_rows"]] == [("c.jsonl: row 1", "a", "r"),
                                                                         ("c.jsonl: row 2", "b", "s")]
    assert not {"gen_input_ids", "gen_attention_mask", "id", "prompt", "reference", "category", "row"} & set(out)



def test_packing_multi_turn_equals_per_conversation_loss(tiny_lora):
    backend, model, tok = tiny_lora
    exs = packable_examples(tok)
    packed = pack_examples(exs)
    assert packed["seq_lens"] == [len(e["input_ids"]) for e in exs]
    pb, singles = packed_and_single_batches(tok, exs)
    assert pb["position_ids"][0, len(exs[0]["input_ids"])] == 0 and pb["attention_mask"] is None
    width = pb["input_ids"].shape[1]
    assert int(pb["packed_seq_lengths"].sum()) == 2 * width
    lp, n_p, weighted, n_s = packed_and_weighted_loss(backend, model, pb, singles)
    assert int(n_p) == n_s
    assert float(lp) == pytest.approx(weighted, rel=1e-4)



def test_first_fit_packing_fills_rows_and_respects_the_limit():
    lengths = [5, 3, 4, 8, 1, 1, 4]
    groups = list(pack_groups(enumerate(lengths), 8))
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in g) <= 8 for g in groups)
    assert groups == [[0, 1], [2, 4, 5], [3], [6]]  # 1s fill the second pack, not a new one
    assert [len(g) for g in pack_groups(enumerate(lengths), 8, open_packs=1)] == [2, 1, 1, 3]
