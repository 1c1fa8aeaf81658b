"""GPU timing and the shape of a transformers model that sizes its memory: what training, generation and the
memory plan all measure with, in one place below them."""
from __future__ import annotations

import time

import torch


def head_dim(config) -> int:
    """Width of one attention head of a transformers model ``config`` (an object with its attributes)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def synchronized_time(device: torch.device) -> float:
    """``time.perf_counter()`` once the work queued on ``device`` has run (GPU kernels run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
