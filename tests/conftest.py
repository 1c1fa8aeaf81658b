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


def run_cli(args, cwd, timeout=600):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "bengali_empathy", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
