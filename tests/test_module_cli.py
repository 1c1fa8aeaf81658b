import pytest
import torch

from bengali_empathy.backends import _backend_from_argv, preimport_unsloth, resolve_backend
from bengali_empathy.errors import UserError
from bengali_empathy.module import EmpathyLM, cosine_with_warmup
from conftest import TWO_PAIRS, encode_pairs


def test_backend_resolution_and_errors():
    with pytest.raises(UserError, match="unknown backend"):
        resolve_backend("vllm")
    if not torch.cuda.is_available():
        assert resolve_backend("auto") == "hf"
        with pytest.raises(UserError, match="needs a CUDA GPU"):
            resolve_backend("unsloth")
        assert preimport_unsloth(["fit"]) is False


def test_backend_read_from_argv_and_config(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  backend: hf\n")
    assert _backend_from_argv(["fit", "--config", str(cfg)]) == "hf"
    assert _backend_from_argv(["fit", "--config", str(cfg), "--model.backend=unsloth"]) == "unsloth"
    assert _backend_from_argv(["chat", "--backend", "hf"]) == "hf"
    assert _backend_from_argv(["fit"]) == "auto"


def test_reply_only_loss_equals_hf_full_logits_loss(tiny_lora):
    backend, model, tok = tiny_lora
    from bengali_empathy.data import Collator

    batch = Collator(tok.pad_token_id)(encode_pairs(tok, TWO_PAIRS))
    model.eval()
    with torch.no_grad():
        ours, n = backend.loss(model, batch)
        ref = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert float(ours) == pytest.approx(float(ref), rel=1e-5)
    assert int(n) == int((batch["labels"][:, 1:] != -100).sum())


def test_llama31_8b_lora_has_13_6m_trainable_params():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from bengali_empathy.modeling import LLAMA31_8B_ARCH, llama31_config

    with torch.device("meta"):
        model = LlamaForCausalLM(llama31_config(LLAMA31_8B_ARCH))
    total = sum(p.numel() for p in model.parameters())
    assert total == 8_030_261_248  # Llama-3.1-8B
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0,
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 13_631_488


def test_cosine_schedule():
    assert cosine_with_warmup(0, 10, 100) == pytest.approx(0.1)
    assert cosine_with_warmup(9, 10, 100) == pytest.approx(1.0)
    assert cosine_with_warmup(10, 10, 100) == pytest.approx(1.0)
    assert cosine_with_warmup(55, 10, 100) == pytest.approx(0.5)
    assert cosine_with_warmup(100, 10, 100, floor=0.1) == pytest.approx(0.1)


def test_checkpoint_keeps_only_lora_weights(tiny_model_path):
    lm = EmpathyLM(model_name_or_path=str(tiny_model_path), backend="hf", load_in_4bit=False,
                   gradient_checkpointing=False)
    lm.configure_model()
    ckpt = {"state_dict": lm.state_dict()}
    lm.on_save_checkpoint(ckpt)
    assert ckpt["state_dict"] and all("lora_" in k for k in ckpt["state_dict"])
    assert sum(v.numel() for v in ckpt["state_dict"].values()) == 14336


def test_hf_gradient_checkpointing_survives_eval_and_generate(tiny_model_path):
    lm = EmpathyLM(model_name_or_path=str(tiny_model_path), backend="hf", load_in_4bit=False, max_new_tokens=2)
    lm.configure_model()
    lm.model.train()
    assert lm.backend.gradient_checkpointing_active(lm.model)
    lm.chat("আমি খুব ক্লান্ত।")
    assert lm.model.training and lm.backend.gradient_checkpointing_active(lm.model)


def test_reply_characters_are_those_of_the_reference_replies(tiny_model_path):
    from bengali_empathy.data import Collator

    from conftest import TWO_PAIRS, encode_pairs

    lm = EmpathyLM(model_name_or_path=str(tiny_model_path), backend="hf", load_in_4bit=False)
    lm.configure_model()
    batch = Collator(lm.tokenizer.pad_token_id)(encode_pairs(lm.tokenizer, TWO_PAIRS))
    assert lm._reply_chars(batch) == sum(len(reply) for _, reply in TWO_PAIRS)
