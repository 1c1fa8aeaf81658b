import re

import pytest
import torch

from bengali_empathy.errors import UserError
from bengali_empathy.generation.decoding import Decoding
from bengali_empathy.models.backends import preimport_unsloth, resolve_backend
from bengali_empathy.models.lora import LoraSettings
from bengali_empathy.models.memory import MemorySettings
from bengali_empathy.training.module import EmpathyLM, GenerationSettings, OptimizerSettings
from bengali_empathy.training.preference import ObjectiveSettings
from conftest import TWO_PAIRS, two_pair_batch


def test_backend_resolution_and_errors():
    with pytest.raises(UserError, match="unknown backend"):
        resolve_backend("vllm")
    if not torch.cuda.is_available():
        assert resolve_backend("auto") == "hf"
        with pytest.raises(UserError, match="needs a CUDA GPU"):
            resolve_backend("unsloth")
        assert preimport_unsloth("fit") is False
    # Commands that load no model never import Unsloth, on any machine.
    assert preimport_unsloth("runs") is False and preimport_unsloth(None) is False


def test_reply_only_loss_equals_hf_full_logits_loss(tiny_lora):
    backend, model, tok = tiny_lora
    batch = two_pair_batch(tok)
    model.eval()
    with torch.no_grad():
        ours, n = backend.loss(model, batch)
        ref = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert float(ours) == pytest.approx(float(ref), rel=1e-5)
    assert int(n) == int((batch["labels"][:, 1:] != -100).sum())


def test_llama31_8b_lora_has_13_6m_trainable_params_with_the_project_defaults():
    import inspect

    from peft import get_peft_model
    from transformers import LlamaForCausalLM

    from bengali_empathy.models.lora import LoraSettings
    from bengali_empathy.models.modeling import LLAMA31_8B_ARCH, llama31_config

    lora = inspect.signature(EmpathyLM).parameters["lora"].default
    assert lora == LoraSettings()
    with torch.device("meta"):
        model = LlamaForCausalLM(llama31_config(LLAMA31_8B_ARCH))
    assert sum(p.numel() for p in model.parameters()) == 8_030_261_248  # Llama-3.1-8B
    model = get_peft_model(model, lora.to_peft())
    assert model.get_nb_trainable_parameters()[0] == 13_631_488


def test_schedule_warms_up_then_decays_to_the_floor(tiny_model_path):
    from types import SimpleNamespace

    lm = EmpathyLM(model_name_or_path=str(tiny_model_path), backend="hf", learning_rate=1e-3,
                   memory=MemorySettings(load_in_4bit=False),
                   optimization=OptimizerSettings(warmup_ratio=0.1, min_lr_ratio=0.1, optimizer="adamw"))
    lm.configure_model()
    lm.trainer = SimpleNamespace(estimated_stepping_batches=100)
    out = lm.configure_optimizers()
    opt, sched = out["optimizer"], out["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(101):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(0.5e-3) and lrs[10] == pytest.approx(1e-3)
    assert lrs[55] == pytest.approx(1e-4 + 0.9e-3 * 0.5, rel=1e-6)  # half way down the cosine
    assert lrs[100] == pytest.approx(1e-4)  # min_lr_ratio of the peak
    assert lm.param_counts[0] == sum(p.numel() for p in lm.model.parameters() if p.requires_grad)


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


def test_reply_characters_are_those_of_the_reference_replies(tiny_model_path):
    lm = EmpathyLM(model_name_or_path=str(tiny_model_path), backend="hf", memory=MemorySettings(load_in_4bit=False))
    lm.configure_model()
    from bengali_empathy.evaluation.evaluator import reply_chars

    batch = two_pair_batch(lm.tokenizer)
    assert reply_chars(lm.tokenizer, batch) == sum(len(reply) for _, reply in TWO_PAIRS)


def test_every_registered_backend_is_a_choice_and_auto_resolves_to_one():
    from bengali_empathy.models.backends import BACKENDS, REGISTRY, resolve_backend

    assert set(BACKENDS) == {"auto"} | set(REGISTRY)
    assert resolve_backend("auto") in REGISTRY


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
                   kv_slots, prefill_tokens):
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
