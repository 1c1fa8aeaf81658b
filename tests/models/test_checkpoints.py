"""The adapter directory: metadata, checks, atomic replacement, the best checkpoint's adapter, export from .ckpt."""
from dataclasses import replace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from safetensors.torch import load_file

from bengali_empathy.models.checkpoints import check_adapter, lora_state_from_ckpt, read_info
from bengali_empathy.data import EmpatheticDialogueDataModule
from bengali_empathy.errors import UserError
from bengali_empathy.models.lora import LoraSettings
from bengali_empathy.models.memory import MemorySettings
from bengali_empathy.training.module import EmpathyLM, GenerationSettings, OptimizerSettings

LORA = LoraSettings(r=16, alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], modules_to_save=[])


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, tiny_model_path):
    """A short fit with a val/loss ModelCheckpoint: (log dir, best .ckpt path, the module)."""
    root = tmp_path_factory.mktemp("fit")
    dm = EmpatheticDialogueDataModule(max_seq_length=768, batch_size=2, system_prompt="তুমি সহমর্মী সহায়ক।")
    # The system prompt reaches the model as the CLI links it (data.system_prompt -> model.system_prompt).
    lm = EmpathyLM(model_name_or_path=str(tiny_model_path), backend="hf", max_seq_length=768, learning_rate=0.01,
                   system_prompt="তুমি সহমর্মী সহায়ক।",
                   memory=MemorySettings(load_in_4bit=False, gradient_checkpointing=False),
                   generation=GenerationSettings(val_batches=0), optimization=OptimizerSettings(optimizer="adamw"))
    ckpt = ModelCheckpoint(dirpath=root / "ckpt", monitor="val/loss", mode="min", save_top_k=1)
    trainer = L.Trainer(accelerator="cpu", max_steps=4, val_check_interval=2, limit_val_batches=1,
                        num_sanity_val_steps=0, logger=TensorBoardLogger(root, name="logs"),
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[ckpt])
    trainer.fit(lm, datamodule=dm)
    return root / "logs" / "version_0", ckpt.best_model_path, lm


def test_adapter_records_its_training_settings(fitted, tiny_model_path):
    log_dir, _, _ = fitted
    info = read_info(log_dir / "adapter")
    assert info.base_model == str(tiny_model_path) and info.backend == "hf"
    assert info.system_prompt == "তুমি সহমর্মী সহায়ক।" and info.max_seq_length == 768
    assert info.lora["r"] == 16 and "<|start_header_id|>" in info.chat_template


def test_best_checkpoint_adapter_holds_the_best_weights(fitted):
    log_dir, best, lm = fitted
    best_state = lora_state_from_ckpt(best)
    saved = load_file(str(log_dir / "adapter-best" / "adapter_model.safetensors"))
    key = next(k for k in best_state if "lora_A" in k)
    saved_key = key.replace(".default", "")
    assert torch.equal(saved[saved_key], best_state[key])
    last = load_file(str(log_dir / "adapter" / "adapter_model.safetensors"))
    assert torch.equal(last[saved_key], dict(lm.model.named_parameters())[key].detach())


def test_export_from_a_checkpoint_merges_its_weights(fitted, tmp_path):
    from transformers import AutoModelForCausalLM

    from bengali_empathy.export.hf import merge_adapter

    log_dir, best, _ = fitted
    merged = merge_adapter(log_dir / "adapter", tmp_path / "merged", dtype="float32", ckpt=best)
    mm = AutoModelForCausalLM.from_pretrained(str(merged)).eval()
    lm = EmpathyLM(model_name_or_path=read_info(log_dir / "adapter").base_model, backend="hf",
                   adapter_path=str(log_dir / "adapter-best"),
                   memory=MemorySettings(load_in_4bit=False, gradient_checkpointing=False))
    lm.configure_model()
    lm.model.eval()
    ids = torch.tensor([[128000, 11372, 228, 11372, 106, 62456]])
    with torch.no_grad():
        assert torch.allclose(mm(ids).logits, lm.model(input_ids=ids).logits, atol=1e-4)
    with pytest.raises(UserError, match="not a Lightning checkpoint"):
        merge_adapter(log_dir / "adapter", tmp_path / "m2", ckpt=str(log_dir / "adapter" / "adapter_config.json"))


def test_adapter_checks(fitted, tmp_path):
    adapter = str(fitted[0] / "adapter")
    base = read_info(adapter).base_model
    check_adapter(adapter, base, LORA)
    with pytest.raises(UserError, match="has r 16, but model.lora.r is 8"):
        check_adapter(adapter, base, replace(LORA, r=8))
    with pytest.raises(UserError, match="has target_modules"):
        check_adapter(adapter, base, replace(LORA, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(UserError, match="was trained on"):
        check_adapter(adapter, str(tmp_path), LORA)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a LoRA adapter directory"):
        check_adapter(str(tmp_path / "empty"), base, LORA)


def test_chat_uses_the_adapters_system_prompt_and_length(fitted, monkeypatch, capsys):
    from bengali_empathy.models.backends import HFPeftBackend
    from bengali_empathy.apps.chat import chat_main
    from bengali_empathy.generation.chat import Replier, Reply

    seen, loaded = [], []
    real_load = HFPeftBackend.load

    def load(self, model_path, max_seq_length, lora, adapter_path):
        loaded.append((max_seq_length, lora.r))
        return real_load(self, model_path, max_seq_length, lora, adapter_path)

    def fake_stream(self, turns, decoding=None, base=False):
        seen.append((self.system_prompt, self.max_seq_length, *loaded[-1]))
        yield Reply("উত্তর", 1, 0, 0, done=True)

    monkeypatch.setattr(HFPeftBackend, "load", load)
    monkeypatch.setattr(Replier, "stream", fake_stream)
    assert chat_main(["--adapter", str(fitted[0] / "adapter"), "-m", "আমি একা।"]) == 0
    assert seen == [("তুমি সহমর্মী সহায়ক।", 768, 768, 16)]
    assert capsys.readouterr().out.strip() == "উত্তর"
