"""Gradient checkpointing decided per decoder layer: a backend (:mod:`.backends`) arms it, the memory plan
(:mod:`.memory`) chooses how many layers keep it, training checks it is as planned."""
from __future__ import annotations

import torch


def decoder_layers(model) -> list[torch.nn.Module]:
    """The layers that can each be checkpointed or not (transformers' ``GradientCheckpointingLayer``)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def checkpointed_layer_count(model) -> int:
    """How many decoder layers have their checkpointing flag on now."""
    return sum(1 for m in decoder_layers(model) if m.gradient_checkpointing)


def limit_checkpointing(model, checkpointed: int) -> None:
    """Switch checkpointing off on all but the first ``checkpointed`` decoder layers (which stay as armed)."""
    for layer in decoder_layers(model)[checkpointed:]:
        layer.gradient_checkpointing = False
