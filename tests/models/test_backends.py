"""Backends: which one a name resolves to, the registry's choices, and the reply-only loss
(bengali_empathy.models.backends)."""
import pytest
import torch

from bengali_empathy.errors import UserError
from bengali_empathy.models.backends import preimport_unsloth, resolve_backend
from conftest import two_pair_batch


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



def test_every_registered_backend_is_a_choice_and_auto_resolves_to_one():
    from bengali_empathy.models.backends import BACKENDS, REGISTRY, resolve_backend

    assert set(BACKENDS) == {"auto"} | set(REGISTRY)
    assert resolve_backend("auto") in REGISTRY
