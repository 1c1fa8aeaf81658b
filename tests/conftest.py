import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tokenizer():
    from bengali_empathy.tokenizer import load_tokenizer

    return load_tokenizer(None)


@pytest.fixture(scope="session")
def tiny_model_path():
    from bengali_empathy.modeling import tiny_model_dir

    return tiny_model_dir()


@pytest.fixture(scope="session")
def tiny_lora(tiny_model_path):
    """(backend, model, tokenizer) for the tiny model through the hf backend, fp32 on CPU."""
    from bengali_empathy.backends import HFPeftBackend, LoraSettings

    backend = HFPeftBackend(load_in_4bit=False, gradient_checkpointing=False)
    model, tok = backend.load(tiny_model_path, 768, LoraSettings(), None)
    return backend, model, tok


@pytest.fixture(scope="session")
def chat(tokenizer):
    from bengali_empathy.data import ChatEncoder

    return ChatEncoder(tokenizer)


def encode_pairs(tokenizer, pairs, system=None):
    """Encoded examples (as the data module stores them) of single-exchange (prompt, reply) pairs."""
    from bengali_empathy.data import DEFAULT_SYSTEM_PROMPT, ChatEncoder

    chat = ChatEncoder(tokenizer)
    out = []
    for i, (p, r) in enumerate(pairs):
        sys_ids, p_ids, r_ids = chat.tokenize([system or DEFAULT_SYSTEM_PROMPT, p, r])
        ids, spans = chat.assemble(sys_ids, [("user", p_ids), ("assistant", r_ids)])
        out.append({"input_ids": ids, "label_spans": [x for s in spans for x in s], "prompt_len": spans[-1][0],
                    "file": "pairs.jsonl", "line": i + 1, "id": str(i), "prompt": p, "reference": r,
                    "category": None})
    return out


def two_pair_batch(tokenizer, device="cpu"):
    """The collated batch of :data:`TWO_PAIRS` (tensors on ``device``)."""
    from bengali_empathy.data import Collator

    batch = Collator(tokenizer.pad_token_id)(encode_pairs(tokenizer, TWO_PAIRS))
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


TWO_PAIRS = [("আমি একা।", "আমি আছি, বলুন কী হয়েছে।"), ("আজ খুব ভয় লাগছে, কী করব?", "ভয় পাওয়া স্বাভাবিক, আমি শুনছি।")]

SHARED_DATA = ROOT.parent / "shared" / "data" / "dailydialog_bn_sample"
requires_shared = pytest.mark.skipif(not (SHARED_DATA / "conversations.jsonl").is_file(),
                                     reason="../shared/data/dailydialog_bn_sample is absent")


def run_cli(args, cwd, timeout=600, stdin=None):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "bengali_empathy", *args], cwd=cwd, env=env, input=stdin,
                          capture_output=True, text=True, timeout=timeout)


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
