"""LoRA settings: one type from the module's options or an adapter directory to peft and the records."""
import json

import torch

from bengali_empathy.models.lora import DEFAULT_LORA, LoraSettings
from bengali_empathy.training.module import EmpathyLM


def test_the_modules_default_is_the_default_and_the_seed_is_no_part_of_an_adapters_identity():
    import inspect

    from bengali_empathy.training.module import EmpathyLM

    assert inspect.signature(EmpathyLM).parameters["lora"].default == DEFAULT_LORA
    assert LoraSettings(seed=1) == DEFAULT_LORA and hash(LoraSettings(seed=1)) == hash(DEFAULT_LORA)
    assert LoraSettings(target_modules=["q_proj"]).target_modules == ("q_proj",)  # lists from YAML: hashable


def test_adapter_directory_to_settings_to_peft_to_record(tmp_path):
    lora = LoraSettings(r=8, alpha=32, dropout=0.05, target_modules=["v_proj", "q_proj"], modules_to_save=["lm_head"])
    lora.to_peft().save_pretrained(str(tmp_path))  # adapter_config.json, as peft writes it with an adapter
    read = LoraSettings.from_adapter(tmp_path)
    assert read == LoraSettings(r=8, alpha=32, dropout=0.05, target_modules=["q_proj", "v_proj"],
                                modules_to_save=["lm_head"])
    lora.check_matches(read, str(tmp_path))  # the order of the modules does not matter
    config = read.to_peft()
    assert (config.r, config.lora_alpha, config.lora_dropout) == (8, 32, 0.05)
    assert set(config.target_modules) == {"q_proj", "v_proj"} and config.modules_to_save == ["lm_head"]
    record = read.as_record()
    assert record == {"r": 8, "alpha": 32, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"],
                      "modules_to_save": ["lm_head"], "seed": 3407}
    assert json.loads(json.dumps(record)) == record  # plain JSON for run.json and the registry
    assert LoraSettings(**record) == read


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


def test_tied_embeddings_stay_tied(tmp_path):
    """A model whose LM head is its embedding (SmolLM2) keeps one trained copy of both, counts it as trained under
    both names (continued pretraining's modules_to_save), and loads back tied."""
    from peft import PeftModel, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from bengali_empathy.models.lora import LoraSettings, check_modules_trained

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, tie_word_embeddings=True)
    model = get_peft_model(LlamaForCausalLM(cfg), LoraSettings(modules_to_save=("embed_tokens", "lm_head"))
                           .to_peft(tied_embeddings=True))
    base = model.get_base_model()
    emb = base.get_input_embeddings().modules_to_save["default"].weight
    head = base.get_output_embeddings().modules_to_save["default"].weight
    with torch.no_grad():
        emb.add_(1.0)
    assert torch.equal(emb, head)
    check_modules_trained(model, ("embed_tokens", "lm_head"))
    model.save_pretrained(tmp_path / "adapter")
    torch.manual_seed(1)
    again = PeftModel.from_pretrained(LlamaForCausalLM(cfg), tmp_path / "adapter").get_base_model()
    loaded = again.get_input_embeddings().modules_to_save["default"].weight
    assert torch.equal(loaded, emb)
    assert loaded.data_ptr() == again.get_output_embeddings().modules_to_save["default"].weight.data_ptr()
