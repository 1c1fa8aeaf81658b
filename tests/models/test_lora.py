"""LoRA settings: one type from the module's options or an adapter directory to peft and the records."""
import json

from bengali_empathy.models.lora import DEFAULT_LORA, LoraSettings


def test_options_round_trip_and_defaults_are_the_modules():
    import inspect

    from bengali_empathy.training.module import EmpathyLM

    defaults = {k: p.default for k, p in inspect.signature(EmpathyLM).parameters.items()}
    assert LoraSettings.from_options(**defaults) == DEFAULT_LORA
    lora = LoraSettings(r=8, alpha=32, dropout=0.05, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    assert LoraSettings.from_options(**lora.options()) == lora
    assert lora.options()["lora_r"] == 8 and lora.options()["target_modules"] == ["q_proj", "v_proj"]


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
                      "modules_to_save": ["lm_head"]}
    assert json.loads(json.dumps(record)) == record  # plain JSON for run.json and the registry
    assert LoraSettings(**record) == read
