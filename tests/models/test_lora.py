"""LoRA settings: one type from the module's options or an adapter directory to peft and the records."""
import json

from bengali_empathy.models.lora import DEFAULT_LORA, LoraSettings


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
