"""Preference rows through the corpus layer: layouts, bad rows as one line, the pair batch, KTO labels."""
import json

import pytest
import torch

from conftest import ROOT, run_cli


def write(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


HISTORY = [{"role": "user", "content": "আজ মনটা ভারী।"}, {"role": "assistant", "content": "কী হয়েছে, বলবেন?"},
           {"role": "user", "content": "চাকরিটা চলে গেল।"}]


def test_pairs_of_both_layouts_encode_chosen_and_rejected(tmp_path, chat):
    from bengali_empathy.data import DEFAULT_SYSTEM_PROMPT, EmpatheticDialogueDataModule, SplitSettings

    rows = [{"messages": HISTORY, "chosen": "খুব কষ্টের খবর। আমি শুনছি।", "rejected": "ঠিক আছে।", "conversation_id": "c1"},
            {"messages": HISTORY, "chosen": "খুব কষ্টের খবর। আমি শুনছি।", "rejected": "ঠিক আছে।", "conversation_id": "c1"}]
    write(tmp_path / "a.jsonl", rows)
    write(tmp_path / "b.jsonl", [{"prompt": "আমি একা।", "chosen": "আমি আছি।", "rejected": "জানি না।"}])
    dm = EmpatheticDialogueDataModule(corpus_path=str(tmp_path), objective="dpo", batch_size=2,
                                      split=SplitSettings(val_fraction=0, test_fraction=0, deduplicate=True))
    dm.setup()
    assert dm.facts.stats["train"]["kept"] == 2 and dm.facts.stats["train"]["dropped_duplicate"] == 1
    batch = next(iter(dm.train_dataloader()))
    assert batch["pairs"] == 2 and batch["input_ids"].shape[0] == 4 and "eval_rows" not in batch
    # row k and row k + pairs share the history; the labels are the final reply (+ <|eot_id|>) only
    system = chat.tokenize([DEFAULT_SYSTEM_PROMPT])[0]
    pairs = {("খুব কষ্টের খবর। আমি শুনছি।", "ঠিক আছে।"): HISTORY,  # (chosen, rejected): the history before them
             ("আমি আছি।", "জানি না।"): [{"role": "user", "content": "আমি একা।"}]}
    seen = []
    for k in range(2):
        chosen, rejected = batch["labels"][k], batch["labels"][k + 2]
        texts = tuple(chat.tokenizer.batch_decode([chosen[chosen != -100], rejected[rejected != -100]],
                                                  skip_special_tokens=True))
        assert texts in pairs, texts  # the chosen reply in row k, the rejected one in row k + pairs
        seen.append(texts)
        history = pairs[texts]
        turns = [(t["role"], ids) for t, ids in zip(history, chat.tokenize([t["content"] for t in history]))]
        for row, reply in ((k, texts[0]), (k + 2, texts[1])):  # each row: the whole conversation, then its reply
            expected, _ = chat.assemble(system, turns + [("assistant", chat.tokenize([reply])[0])])
            assert batch["input_ids"][row, :len(expected)].tolist() == expected
    assert sorted(seen) == sorted(pairs)  # the deduplicated pair and the other file's pair, once each


@pytest.mark.parametrize("row, message", [
    ({"prompt": "আমি একা।", "rejected": "জানি না।"}, "missing column(s) 'chosen'"),
    ({"prompt": "আমি একা।", "chosen": None, "rejected": "জানি না।"}, "row 2: no value for 'chosen'"),
    ({"prompt": "আমি একা।", "chosen": "আমি আছি। ", "rejected": " আমি  আছি।"},
     "row 2: 'chosen' and 'rejected' are the same reply"),
    ({"prompt": "আমি একা।", "chosen": "আমি আছি।", "rejected": "  "}, "row 2: 'rejected' is empty"),
    ({"prompt": "", "chosen": "আমি আছি।", "rejected": "জানি না।"}, "row 2: 'prompt' is empty"),
    ({"messages": HISTORY[:2], "chosen": "আমি আছি।", "rejected": "জানি না।"},
     "row 2: the history of a preference row must end with a user turn"),
])
def test_bad_pair_rows_are_one_line_naming_the_row(tmp_path, row, message):
    good = {"prompt": "ঘুম আসে না।", "chosen": "আমি আছি।", "rejected": "জানি না।"}
    if "messages" in row:
        good = {"messages": HISTORY, "chosen": "আমি আছি।", "rejected": "জানি না।"}
    if "chosen" not in row:  # a column missing from the whole file
        good = {k: v for k, v in good.items() if k != "chosen"}
    write(tmp_path / "prefs.jsonl", [good, row])
    r = run_cli(["fit", "--config", ROOT / "configs" / "dpo.yaml", "--registry.db_path", "null"], cwd=tmp_path)
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: prefs.jsonl") and message in last, last
    assert not (tmp_path / "lightning_logs").exists()


def test_kto_rows_carry_their_labels_and_train(tmp_path, tiny_lora):
    from bengali_empathy.data import EmpatheticDialogueDataModule, SplitSettings
    from bengali_empathy.training.preference import PreferenceObjective

    rows = [{"prompt": "আমি একা।", "completion": "আমি আছি, বলুন।", "label": True},
            {"prompt": "আমি একা।", "completion": "তো?", "label": "false"},
            {"prompt": "ঘুম আসে না।", "completion": "কবে থেকে এমন হচ্ছে?", "label": 1}]
    write(tmp_path / "kto.jsonl", rows)
    dm = EmpatheticDialogueDataModule(corpus_path=str(tmp_path / "kto.jsonl"), objective="kto", batch_size=3,
                                      split=SplitSettings(val_fraction=0, test_fraction=0))
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["desirable"].dtype == torch.bool and sorted(batch["desirable"].tolist()) == [False, True, True]
    backend, model, _ = tiny_lora
    objective = PreferenceObjective("kto", 0.1)
    loss, metrics = objective.loss(backend, model, batch)
    # a fresh LoRA (B = 0) is its base: every reward 0, each term 1 - sigmoid(0) = 0.5
    assert loss.item() == pytest.approx(0.5) and metrics["reward_accuracy"].item() == 0.5
    write(tmp_path / "kto.jsonl", rows + [{"prompt": "আমি একা।", "completion": "হুম।", "label": "maybe"}])
    r = run_cli(["fit", "--config", ROOT / "configs" / "dpo.yaml", "--model.objective.name", "kto",
                 "--data.corpus_path", "kto.jsonl"], cwd=tmp_path)
    assert r.stderr.strip().splitlines()[-1] == "error: kto.jsonl: row 4: 'label' must be true or false, not 'maybe'"
