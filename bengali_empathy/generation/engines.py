"""The generation engines: one interface that batch evaluation (:mod:`.generator`) and conversations
(:mod:`.chat`) both decode through, so both prepare the weights the same way.

``eager`` is transformers' ``generate`` with its dynamic KV cache and SDPA attention: the reference,
the model as it trains (its fp32 parts in fp32). ``static`` prefills all but the last token of every
prompt (:func:`.decoder.prefill`) into a static KV cache, and ``generate`` decodes from there.
``compiled`` prefills the same way and decodes with :class:`.decoder.GraphDecoder`: each step one
replay of a recorded CUDA graph. The two fast engines attend with the grouped-query decoding attention
of :mod:`..models.attention` and run a 4-bit model in its 16-bit compute dtype
(:func:`.merged.compute_dtype_weights`); they need the ``hf`` backend (Unsloth generates with its own
kernels) and a Llama-architecture model (:func:`engine_for`: another generates eagerly, said in one line).

An engine is made for one model (:func:`make_engine`). It decodes within :meth:`Engine.prepared`, and
its call takes left-padded prompts and returns their new tokens; ``on_step`` (a streamed reply) sees
each step's tokens and ends decoding by returning True.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Callable, ContextManager, Iterator, Literal, Optional, Sequence

import torch

from ..errors import UserError
from ..models.gpu import synchronized_time
from .decoder import GraphDecoder, left_padded, prefill
from .decoding import Decoding
from .merged import compute_dtype_weights

GenerationEngine = Literal["auto", "compiled", "static", "eager"]
OnStep = Callable[[torch.Tensor], bool]

log = logging.getLogger(__name__)

# The model types the fast engines are written for: Llama's decoder (Llama 3.x, SmolLM2; any head counts, tied
# embeddings or not). Others differ where the fast engines do not look: Gemma 2's soft-capped attention
# (the grouped decoding attention computes plain softmax attention), Mistral's sliding-window cache layers
# (the prefill writes full-length ones), GPT-NeoX's configuration (no ``num_key_value_heads``).
FAST_ENGINE_MODEL_TYPES = frozenset({"llama"})


def resolve_engine(engine: GenerationEngine, backend_name: str) -> str:
    """The engine ``engine`` names on this machine with this backend (``auto``: ``compiled`` on CUDA with
    the ``hf`` backend, else ``eager``)."""
    if engine == "auto":
        return "compiled" if backend_name == "hf" and torch.cuda.is_available() else "eager"
    if engine in ("compiled", "static") and backend_name != "hf":
        raise UserError(f"model.generation_engine '{engine}' needs model.backend 'hf' ({backend_name} generates "
                        "with its own kernels); use 'auto' or 'eager'")
    return engine


def engine_for(engine: str, model, report: Callable[[str], None] = log.warning) -> str:
    """``engine`` for ``model``, or ``eager`` where ``engine`` is a fast one and ``model`` is not of a type in
    :data:`FAST_ENGINE_MODEL_TYPES` (said through ``report``, in one line)."""
    if engine == "eager":
        return engine
    model_type = getattr(model.config, "model_type", None)
    if model_type in FAST_ENGINE_MODEL_TYPES:
        return engine
    report(f"generation: the {engine} engine is written for Llama models; this {model_type} model generates with "
           "the eager engine")
    return "eager"


def grouped_decode_attention(model) -> ContextManager:
    """Within: the model attends with :func:`.attention.gqa_decode_attention` (restored after)."""
    from ..models.attention import attention_implementation, register

    return attention_implementation(model, register())


def _streaming(on_step: OnStep) -> dict:
    """``generate``'s streamer and stopping criterion that hand each step's tokens to ``on_step`` and stop
    once it returns True."""
    from transformers import StoppingCriteria, StoppingCriteriaList
    from transformers.generation.streamers import BaseStreamer

    class StepStreamer(BaseStreamer):
        prompt_seen = stopped = False

        def put(self, value) -> None:
            if not self.prompt_seen:  # generate() hands over the prompt first
                self.prompt_seen = True
                return
            self.stopped = bool(on_step(value.reshape(-1))) or self.stopped

        def end(self) -> None:
            pass

    class StopWhenAsked(StoppingCriteria):  # generate() asks after handing the step's tokens to the streamer
        def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
            return torch.full((input_ids.shape[0],), streamer.stopped, dtype=torch.bool, device=input_ids.device)

    streamer = StepStreamer()
    return {"streamer": streamer, "stopping_criteria": StoppingCriteriaList([StopWhenAsked()])}


class Engine:
    """The ``eager`` engine, and the interface of them all.

    Args:
        model: the model it decodes with (a LoRA model, or a merged copy)
        stop_ids: the tokens that end a reply; pad: the padding id
        prefill_tokens: prompt tokens per prefill slice of the fast engines (None: ``PREFILL_TOKENS``)
        weights: the 16-bit copies of the model's fp32 parameters, shared by engines of one model (chat's
            tuned and base model); kept for the engine's life, so a CUDA graph recorded with them replays
            in a later :meth:`prepared`
    """

    name = "eager"

    def __init__(self, model, stop_ids: Sequence[int], pad: int, prefill_tokens: Optional[int] = None,
                 weights: Optional[dict] = None) -> None:
        self.model, self.stop_ids, self.pad, self.prefill_tokens = model, list(stop_ids), pad, prefill_tokens
        self.weights = {} if weights is None else weights
        self.device = next(model.parameters()).device
        self.prefill_seconds = 0.0

    @property
    def batches(self) -> list[dict]:
        """The compiled engine's profile of each batch (:class:`.decoder.GraphDecoder`)."""
        return []

    def prepared(self) -> ContextManager:
        """The context the engine decodes in."""
        return contextlib.nullcontext()

    def release(self) -> None:
        """Drop what a batch shape holds (before a retry at a smaller batch)."""

    def __call__(self, prompts: Sequence[Sequence[int]], width: int, decoding: Decoding,
                 on_step: Optional[OnStep] = None) -> torch.Tensor:
        """The new tokens (rows, up to ``max_new_tokens``) for ``prompts`` (sorted longest first, ``width``
        the longest): each row's reply up to and including its stop token, padding after."""
        ids, mask = left_padded(prompts, width, self.pad)
        out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                  eos_token_id=self.stop_ids, pad_token_id=self.pad, use_cache=True,
                                  **decoding.generate_kwargs(), **self._cache(prompts, width, decoding),
                                  **(_streaming(on_step) if on_step is not None else {}))
        return out[:, width:]

    def _cache(self, prompts: Sequence[Sequence[int]], width: int, decoding: Decoding) -> dict:
        return {}


class StaticEngine(Engine):
    """``generate`` from a prefilled static KV cache of the batch's width plus ``max_new_tokens``."""

    name = "static"

    @contextlib.contextmanager
    def prepared(self) -> Iterator[None]:
        with compute_dtype_weights(self.model, self.weights), grouped_decode_attention(self.model):
            yield

    def _cache(self, prompts: Sequence[Sequence[int]], width: int, decoding: Decoding) -> dict:
        from transformers import StaticCache

        start = synchronized_time(self.device)
        cache = StaticCache(config=self.model.config, max_cache_len=width + decoding.max_new_tokens)
        prefill(self.model, cache, prompts, width, self.pad, self.prefill_tokens)
        self.prefill_seconds += synchronized_time(self.device) - start
        return {"past_key_values": cache, "disable_compile": True}  # the decoding step left uncompiled


class CompiledEngine(StaticEngine):
    """The prefill of ``static``, then :class:`.decoder.GraphDecoder`'s CUDA-graph steps."""

    name = "compiled"

    def __init__(self, model, stop_ids: Sequence[int], pad: int, prefill_tokens: Optional[int] = None,
                 weights: Optional[dict] = None) -> None:
        super().__init__(model, stop_ids, pad, prefill_tokens, weights)
        self.decoder: Optional[GraphDecoder] = None

    @property
    def batches(self) -> list[dict]:
        return self.decoder.batches if self.decoder is not None else []

    def release(self) -> None:
        if self.decoder is not None:
            self.decoder.release()

    def __call__(self, prompts: Sequence[Sequence[int]], width: int, decoding: Decoding,
                 on_step: Optional[OnStep] = None) -> torch.Tensor:
        if self.decoder is None:
            self.decoder = GraphDecoder(self.model, decoding, self.stop_ids, self.pad, self.prefill_tokens)
        self.decoder.use_decoding(decoding)
        new = self.decoder(prompts, width, on_step=on_step)
        self.prefill_seconds = sum(b["prefill_s"] for b in self.decoder.batches)
        return new


ENGINES = {engine.name: engine for engine in (Engine, StaticEngine, CompiledEngine)}


def make_engine(name: str, model, stop_ids: Sequence[int], pad: int, prefill_tokens: Optional[int] = None,
                weights: Optional[dict] = None) -> Engine:
    """The engine ``name`` (``eager``, ``static`` or ``compiled``: see :func:`resolve_engine`) for ``model``
    (``eager`` for a model the fast engines are not written for: :func:`engine_for`)."""
    return ENGINES[engine_for(name, model)](model, stop_ids, pad, prefill_tokens, weights)
