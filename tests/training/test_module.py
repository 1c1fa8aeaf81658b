import re

import pytest

from bengali_empathy.errors import UserError
from bengali_empathy.generation.decoding import Decoding
from bengali_empathy.models.lora import LoraSettings
from bengali_empathy.models.memory import MemorySettings
from bengali_empathy.training.module import EmpathyLM, GenerationSettings, OptimizerSettings
from bengali_empathy.training.preference import ObjectiveSettings
from conftest import two_pair_batch


def test_checkpoint_keeps_only_lora_weights(tiny_model_path):
    lm = EmpathyLM(model_name_or_path=str(tiny_model_path), backend="hf",
                   memory=MemorySettings(load_in_4bit=False, gradient_checkpointing=False))
    lm.configure_model()
    ckpt = {"state_dict": lm.state_dict()}
    lm.on_save_checkpoint(ckpt)
    assert ckpt["state_dict"] and all("lora_" in k for k in ckpt["state_dict"])
    assert sum(v.numel() for v in ckpt["state_dict"].values()) == 14336


def test_hf_checkpointing_split_survives_eval_and_generate(tiny_model_path):
    from bengali_empathy.models.gradient_checkpointing import checkpointed_layer_count, decoder_layers

    lm = EmpathyLM(model_name_or_path=str(tiny_model_path), backend="hf", memory=MemorySettings(load_in_4bit=False),
                   decoding=Decoding(max_new_tokens=2))
    lm.configure_model()
    lm.backend.for_training(lm.model)
    assert checkpointed_layer_count(lm.model) == 2 and lm.backend.checkpointing_as_planned(lm.model)
    lm.backend.checkpointed_layers = 1  # what a memory plan sets
    lm.backend.for_training(lm.model)
    assert [layer.gradient_checkpointing for layer in decoder_layers(lm.model)] == [True, False]
    lm.generator.generate([lm.tokenizer("আমি খুব ক্লান্ত।")["input_ids"]], progress=False)
    assert lm.model.training and lm.backend.checkpointing_as_planned(lm.model)
    for layer in decoder_layers(lm.model):  # as Unsloth's for_inference leaves them
        layer.gradient_checkpointing = False
    assert not lm.backend.checkpointing_as_planned(lm.model)
    lm.on_train_batch_start(two_pair_batch(lm.tokenizer), 0)  # the guard before each epoch's first step
    assert [layer.gradient_checkpointing for layer in decoder_layers(lm.model)] == [True, False]


@pytest.mark.parametrize("group,option,value,message", [
    (GenerationSettings, "batch_size", 0, "model.generation.batch_size must be at least 1, not 0"),
    (Decoding, "temperature", -0.5, "model.decoding.temperature must be at least 0"),
    (Decoding, "top_p", 0.0, "model.decoding.top_p must be in (0, 1]"),
    (Decoding, "top_k", -1, "model.decoding.top_k must be at least 0"),
    (Decoding, "repetition_penalty", 0.0, "model.decoding.repetition_penalty must be positive"),
    (Decoding, "no_repeat_ngram_size", -2, "model.decoding.no_repeat_ngram_size must be at least 0"),
    (Decoding, "max_new_tokens", 0, "model.decoding.max_new_tokens must be at least 1"),
    (GenerationSettings, "val_batches", -2, "model.generation.val_batches must be at least -1"),
    (LoraSettings, "r", 0, "model.lora.r must be a positive integer, not 0"),
    (LoraSettings, "target_modules", [], "model.lora.target_modules must be a non-empty list, not []"),
    (OptimizerSettings, "warmup_ratio", 1.0, "model.optimization.warmup_ratio must be in [0, 1), not 1.0"),
    (ObjectiveSettings, "dpo_beta", 0.0, "model.objective.dpo_beta must be positive, not 0.0"),
    (MemorySettings, "budget_gib", -1.0, "model.memory.budget_gib must be a positive number of GiB"),
])
def test_group_options_out_of_range_are_user_errors_with_the_dotted_name(group, option, value, message):
    with pytest.raises(UserError, match=re.escape(message)):
        group(**{option: value})


def test_generation_keeps_the_batch_size_it_halved_to(monkeypatch, tiny_model_path):
    from bengali_empathy.generation import generator as generation

    asked = []

    def small_card(model, tokenizer, prompts, decoding, batch_size, stop_ids, desc, progress, on_oom, engine,
                   kv_slots):
        asked.append(batch_size)
        while batch_size > 2:  # as generate_replies does on out-of-memory
            batch_size //= 2
            on_oom(batch_size)
        return [""] * len(prompts), generation.GenerationStats()

    monkeypatch.setattr(generation, "generate_replies", small_card)
    lm = EmpathyLM(model_name_or_path=str(tiny_model_path), backend="hf", memory=MemorySettings(load_in_4bit=False),
                   generation=GenerationSettings(batch_size=16))
    lm.configure_model()
    lm.generate_texts([[128000, 9906]] * 3, progress=False)
    lm.generate_texts([[128000, 9906]] * 3, progress=False)
    assert asked == [16, 2]


def test_each_objective_is_one_object_the_module_calls_without_branching(tmp_path):
    """sft and dpo/kto implement one interface (training loss, evaluation step, finish, last): the module holds it
    as a child module and its training step calls it whatever the objective."""
    import ast
    import inspect

    from bengali_empathy.training import module as module_file
    from bengali_empathy.training.module import EmpathyLM
    from bengali_empathy.training.objectives import Objective, SupervisedObjective
    from bengali_empathy.training.preference import ObjectiveSettings, PreferenceObjective

    sft = EmpathyLM()
    dpo = EmpathyLM(objective=ObjectiveSettings(name="dpo"))
    assert isinstance(sft.objective, SupervisedObjective) and isinstance(dpo.objective, PreferenceObjective)
    assert isinstance(dpo.objective, Objective) and dict(sft.named_children())["objective"] is sft.objective
    assert sft.objective.losses is sft.objective.evaluator.losses  # metric states follow the module's device
    assert list(dpo.objective.parameters()) == [] and list(dpo.objective.buffers()) == []  # nothing stands in
    assert sft.training_texts() is None  # before the corpus is connected
    source = ast.parse(inspect.getsource(module_file))
    branching = [n for n in ast.walk(source) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "isinstance"
                 and any(getattr(a, "id", None) in ("PreferenceObjective", "SupervisedObjective") for a in n.args)]
    assert branching == []
