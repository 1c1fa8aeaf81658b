"""GGUF export for llama.cpp and Ollama: the merged model as one file of llama.cpp's ``llama`` architecture.

The file is written by llama.cpp's own ``gguf`` package as its ``convert_hf_to_gguf.py`` writes a ``LlamaModel``:
tensor names from gguf's tensor-name map; q/k rows permuted (Hugging Face keeps the two rotary halves of a head
apart, ggml's RoPE rotates adjacent pairs); Llama 3's RoPE scaling as a ``rope_freqs`` tensor; no output matrix for
tied embeddings (SmolLM2's: llama.cpp then uses ``token_embd``); norms in f32, the other weights in f16; the
adapter's byte-level BPE vocabulary with merges, special ids, the chat template and the name of llama.cpp's
pre-tokenizer that splits text as the tokenizer does (Llama 3's ``llama-bpe``, SmolLM's ``smollm``, GPT-2's: any
other is refused). q8_0 and q4_k_m are made from that f16 file by llama.cpp's quantizer (``llama_model_quantize``
through llama-cpp-python), never by code of ours.

Before anything is kept, llama.cpp loads the file's vocabulary and must (1) tokenise a Bengali chat rendered from
the file's own template, and a text where the pre-tokenizers part, to exactly the training tokens and (2) end
generation at the tokenizer's stop tokens (Llama 3's <|eot_id|>, <|eom_id|>, <|end_of_text|>; SmolLM2's <|im_end|>,
<|endoftext|>) (:func:`check_gguf`). The export directory (the GGUF and an Ollama ``Modelfile``) is filled under a
temporary name and renamed at the end; the disk space it needs is estimated before anything is loaded.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Literal, Optional

from .._io import atomic_directory
from ..errors import UserError
from ..models.gpu import head_dim
from ..models.gguf_import import llama3_rope_factors

Quant = Literal["f16", "q8_0", "q4_k_m"]
LLAMA_FTYPE = {"f16": 1, "q8_0": 7, "q4_k_m": 15}  # llama.h's enum llama_ftype
# Upper bounds of a weight's bytes in each file type: q8_0 is 34 bytes per 32 weights; q4_k_m mixes Q4_K, Q5_K and
# Q6_K (210 bytes per 256 weights, its largest); a matrix whose rows do not fit the blocks falls back to F16.
_BYTES_PER_WEIGHT = {"f16": 2.0, "q8_0": 34 / 32, "q4_k_m": 210 / 256}
_BLOCK = {"f16": 1, "q8_0": 32, "q4_k_m": 256}
_VOCAB_BYTES = 12 << 20  # Llama 3's tokens, types and merges and the template: 7.8 MB in the tiny model's file
PROBE_CHAT = [{"role": "user", "content": "আজ মনটা খুব ভারী লাগছে, কাউকে বলতে পারছি না।"},
              {"role": "assistant", "content": "আমি শুনছি। কী হয়েছে, বলবেন?"},
              {"role": "user", "content": "চাকরিটা চলে গেল। Okay 123"}]
# Plain text where llama.cpp's pre-tokenizers part (after the spirit of convert_hf_to_gguf.py's chktxt): runs of
# white space before digits (SmolLM's splits digits first, GPT-2's does not), numbers of 1-4 digits (Llama 3 groups
# three), contractions, mixed scripts, emoji.
PROBE_TEXT = ("\n\n১২ টাকা  ৩৪৫৬ আর\t\t7 8  99 3333 33.3 3...3\n \n\n  আমি-তুমি it's I'VE we'd ঢাকা🙂🦙 😶\u200d🌫️"
              " ((গ)) [x]  \t\n ")


def gguf_name(quant: str) -> str:
    return f"model-{quant}.gguf"


def export_gguf(adapter: str | os.PathLike, output: str | os.PathLike, quant: Quant = "q4_k_m",
                base: Optional[str] = None, dtype: str = "bfloat16", ckpt: Optional[str] = None) -> dict:
    """Write ``output/model-<quant>.gguf`` and ``output/Modelfile`` for the merged adapter; returns what was written."""
    from ..models.checkpoints import read_info
    from ..models.loading import base_model_path
    from .hf import merged_model
    from .modelfile import MODELFILE, modelfile_text

    gguf, llama_cpp = _gguf_packages()
    adapter, output = Path(adapter), Path(output)
    if output.exists():
        raise UserError(f"output directory already exists: {output}")
    info = read_info(adapter)
    chat = adapter_chat(adapter)
    system_prompt = info.system_prompt if info and info.system_prompt is not None else _default_system_prompt()
    max_seq_length = info.max_seq_length if info and info.max_seq_length else None
    if max_seq_length is None:
        raise UserError(f"{adapter} does not record its max_seq_length (bengali_empathy.json): "
                        "export --format gguf needs an adapter written by fit")
    base_path = base_model_path(adapter, base)
    need = estimate_bytes(base_path, quant)
    free = shutil.disk_usage(_existing_parent(output)).free
    if free < need:
        raise UserError(f"not enough disk space for {output}: the {quant} export needs about {need / 2**30:.1f} GiB "
                        f"(estimated), {free / 2**30:.1f} GiB are free")
    model, _ = merged_model(adapter, base, dtype, ckpt)
    name = gguf_name(quant)
    with atomic_directory(output, replace=False) as tmp:
        f16 = tmp / (name if quant == "f16" else ".f16.gguf")
        write_f16_gguf(gguf, model, adapter, chat.tokenizer.chat_template, f16, system_prompt, max_seq_length,
                       adapter.name)
        del model
        fallback = None
        if quant != "f16":
            fallback = quantize(llama_cpp, f16, tmp / name, quant)
            f16.unlink()
        types = check_gguf(tmp / name, chat, system_prompt)
        (tmp / MODELFILE).write_text(modelfile_text(name, chat.tokenizer, system_prompt, max_seq_length),
                                     encoding="utf-8")
    return {"gguf": output / name, "modelfile": output / MODELFILE, "bytes": (output / name).stat().st_size,
            "tensor_types": types, "fallback": fallback}


def _gguf_packages():
    try:
        import gguf
        import llama_cpp
    except ImportError as exc:
        raise UserError(f"--format gguf needs the gguf extra ({exc.name} is missing): "
                        "pip install -e '.[gguf]'") from exc
    return gguf, llama_cpp


def _default_system_prompt() -> str:
    from ..data import DEFAULT_SYSTEM_PROMPT

    return DEFAULT_SYSTEM_PROMPT


def adapter_chat(adapter: Path):
    """The training format (:class:`~.data.ChatEncoder`) over the tokenizer fit saved in the adapter, with the chat
    template it was trained with; refused when either is absent, the template has no Ollama form or llama.cpp has
    no pre-tokenizer of the tokenizer's."""
    from ..models.checkpoints import read_info
    from ..data import ChatEncoder
    from ..data.tokenizer import llama_cpp_pre_tokenizer, llama_cpp_pre_tokenizers, load_tokenizer
    from .modelfile import ollama_template

    if not (adapter / "tokenizer.json").is_file():
        raise UserError(f"{adapter} has no tokenizer (tokenizer.json): a GGUF must carry the vocabulary the adapter "
                        "was trained with")
    info = read_info(adapter)
    config = adapter / "tokenizer_config.json"
    saved = (any((adapter / p).is_file() for p in ("chat_template.jinja", "chat_template.json"))
             or (config.is_file() and "chat_template" in json.loads(config.read_text(encoding="utf-8"))))
    template = info.chat_template if info else None
    if template is None and not saved:
        raise UserError(f"{adapter} has no chat template (chat_template.jinja or bengali_empathy.json): "
                        "the GGUF must carry the format the adapter was trained with")
    tokenizer = load_tokenizer(adapter)
    if template is not None:
        tokenizer.chat_template = template
    chat = ChatEncoder(tokenizer)  # refuses a template it cannot assemble
    ollama_template(tokenizer)  # and, before any weights are converted, one Ollama's Go template cannot write
    if llama_cpp_pre_tokenizer(tokenizer) is None:
        raise UserError(f"{adapter}'s tokenizer is not a byte-level BPE split by one of llama.cpp's pre-tokenizers "
                        f"{', '.join(llama_cpp_pre_tokenizers())}: a GGUF of it would not tokenise as training did")
    return chat


def _existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def estimate_bytes(base_path: Path, quant: str) -> int:
    """Disk the export needs at its peak: the f16 file, and for a quantized export the quantized file beside it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(base_path), local_files_only=True)
    with torch.device("meta"):
        shapes = [p.shape for p in AutoModelForCausalLM.from_config(config).parameters()]

    def size(q: str) -> float:
        return sum(math.prod(s) * (_BYTES_PER_WEIGHT[q] if len(s) > 1 and s[-1] % _BLOCK[q] == 0 else 2.0)
                   for s in shapes) + _VOCAB_BYTES

    return int(size("f16") + (size(quant) if quant != "f16" else 0))


# --------------------------------------------------------------------------- writing


def permute_rotary(weight, n_head: int):
    """Rows of a q/k projection reordered from Hugging Face's rotary layout (two halves) to ggml's (pairs),
    as ``LlamaModel.permute`` in llama.cpp's convert_hf_to_gguf.py."""
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def write_f16_gguf(gguf, model, tokenizer_dir: Path, chat_template: str, path: Path, system_prompt: str,
                   max_seq_length: int, name: str) -> None:
    """One GGUF of ``model`` (a merged LlamaForCausalLM) in f16 with the vocabulary of the tokenizer saved in
    ``tokenizer_dir`` (a byte-level BPE, see :func:`adapter_chat`), tensors streamed to disk one at a time."""
    import numpy as np
    import torch

    cfg = model.config
    if cfg.model_type != "llama":
        raise UserError(f"GGUF export writes Llama models; the base model is a {cfg.model_type}")
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    width = head_dim(cfg)
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(f"bengali_empathy {name}")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_freq_base(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_rope_dimension_count(width)
    writer.add_key_length(width)
    writer.add_value_length(width)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_vocab(gguf, writer, Path(tokenizer_dir), chat_template, cfg.vocab_size)
    writer.add_string("bengali_empathy.system_prompt", system_prompt)
    writer.add_uint32("bengali_empathy.max_seq_length", max_seq_length)

    plan = []  # (gguf name, tensor source, numpy dtype)
    if (factors := llama3_rope_factors(cfg)) is not None:
        plan.append((gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight",
                     torch.tensor(factors, dtype=torch.float32), np.float32))
    for hf_name, param in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # llama.cpp uses token_embd as the output matrix when output.weight is absent
        new_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new_name is None:
            raise UserError(f"the merged model has a tensor llama.cpp's llama architecture lacks: {hf_name}")
        plan.append((new_name, param, np.float32 if param.ndim == 1 else np.float16))
    for new_name, t, dt in plan:
        writer.add_tensor_info(new_name, tuple(t.shape), np.dtype(dt), t.numel() * np.dtype(dt).itemsize)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for new_name, t, dt in plan:
        t = t.detach().to(torch.float32 if dt is np.float32 else torch.float16)
        if new_name.endswith(("attn_q.weight", "attn_k.weight")):
            t = permute_rotary(t, n_head if new_name.endswith("attn_q.weight") else n_kv)
        writer.write_tensor_data(t.contiguous().numpy())
    writer.close()


def _add_vocab(gguf, writer, directory: Path, chat_template: str, n_vocab: int) -> None:
    """The adapter's byte-level BPE as llama.cpp reads it: tokens (special added ones as control tokens), the
    pre-tokenizer's name, merges, special ids, whether a bos is prepended, the end of turn (and Llama 3's <|eom_id|>).

    The tokens and types are read as convert_hf_to_gguf.py's ``get_vocab_base`` reads them, from the tokenizer's
    added tokens: gguf's ``BpeVocab`` makes control tokens only of added tokens outside the BPE vocabulary, which
    SmolLM's <|im_end|> is not (and refuses the byte-fallback flag transformers' GGUF import sets)."""
    from ..data.tokenizer import EOM, end_of_turn_id, llama_cpp_pre_tokenizer, load_tokenizer, prepended_ids

    tokenizer = load_tokenizer(directory)
    tokenizer.chat_template = chat_template
    vocab = tokenizer.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    if sorted(by_id) != list(range(n_vocab)):
        raise UserError(f"the tokenizer has {len(by_id)} tokens, the model's embedding {n_vocab}")
    added = tokenizer.added_tokens_decoder
    tokens = [by_id[i] for i in range(n_vocab)]
    types = [gguf.TokenType.NORMAL if i not in added else
             gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED for i in range(n_vocab)]
    with _quiet("gguf"):  # it warns of Meta's own pair template (BOS $A BOS $B)
        special = gguf.SpecialVocab(directory, load_merges=True, n_vocab=n_vocab)
    # SmolLM's tokenizer prepends nothing but says so nowhere SpecialVocab reads; without the flag Ollama would
    # prepend the bos (<|im_start|>): its default is to
    special.add_special_token.setdefault("bos", bool(prepended_ids(tokenizer)))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(llama_cpp_pre_tokenizer(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special.chat_template = chat_template
    special.add_to_gguf(writer, quiet=True)
    writer.add_eot_token_id(end_of_turn_id(tokenizer))
    if EOM in vocab:
        writer.add_eom_token_id(vocab[EOM])


@contextmanager
def _quiet(logger: str):
    """``logger``'s warnings held back for the block."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def quantize(llama_cpp, source: Path, target: Path, quant: str) -> Optional[str]:
    """llama.cpp's quantizer: ``source`` (f16 GGUF) to ``target`` in ``quant``, on every core; returns llama.cpp's
    own count of the tensors whose rows did not fit the quant's blocks and took another type ("fallback")."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_FTYPE[quant]
    params.nthread = os.cpu_count() or 1
    with llama_log() as log:
        rc = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama.cpp could not quantize {source} to {quant} (status {rc})")
    found = re.search(r"(\d+ of \d+) tensor\(s\) required fallback", "".join(log))
    return found.group(1) if found else None


@contextmanager
def llama_log():
    """llama.cpp's log lines during the block, collected instead of printed."""
    import ctypes

    import llama_cpp
    from llama_cpp import _logger

    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(level, text, user_data):
        lines.append(text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


# --------------------------------------------------------------------------- checking


def check_gguf(path: Path, chat, system_prompt: str) -> dict[str, int]:
    """Refuse a GGUF that llama.cpp would prompt or stop differently from training.

    llama.cpp loads its vocabulary; the chat template in the file, rendered as llama-cpp-python renders it for
    ``create_chat_completion``, must tokenise a Bengali chat to the ids ``chat`` (the training format) gives, and
    :data:`PROBE_TEXT` to the tokenizer's ids (a pre-tokenizer named wrongly parts them); the tokenizer's stop
    tokens and the file's eos must all end generation. Returns how many tensors of each ggml type llama.cpp's
    loader counted.
    """
    from llama_cpp import llama_cpp as C
    from llama_cpp._internals import LlamaModel
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from ..data.tokenizer import stop_token_ids

    params = C.llama_model_default_params()
    params.vocab_only = True
    with llama_log() as log:  # the vocabulary, no weights, no context
        llm = LlamaModel(path_model=str(path), params=params, verbose=False)
    try:
        template = llm.metadata().get("tokenizer.chat_template")
        if not template:
            raise UserError(f"{path.name} carries no chat template")
        bos, eos = llm.token_bos(), llm.token_eos()
        formatter = Jinja2ChatFormatter(template, eos_token=llm.token_get_text(eos), bos_token=llm.token_get_text(bos))
        prompt = formatter(messages=[{"role": "system", "content": system_prompt}, *PROBE_CHAT]).prompt
        ours = llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
        text = llm.tokenize(PROBE_TEXT.encode("utf-8"), add_bos=False, special=False)
        not_eog = [i for i in stop_token_ids(chat.tokenizer) + [eos] if not C.llama_vocab_is_eog(llm.vocab, i)]
    finally:
        llm.close()
    for what, got, trained in (("a chat rendered from the file's template", ours,
                                chat.prompt_ids(system_prompt, PROBE_CHAT)),
                               ("a text", text, chat.tokenize([PROBE_TEXT])[0])):
        if got != trained:
            k = next((i for i, (a, b) in enumerate(zip(got, trained)) if a != b), min(len(got), len(trained)))
            raise UserError(f"{path.name}: llama.cpp's tokens of {what} differ from the training tokens at token {k} "
                            f"({len(got)} vs {len(trained)} tokens)")
    if not_eog or eos != chat.tokenizer.eos_token_id:
        raise UserError(f"{path.name}: llama.cpp would not stop at token(s) {not_eog or [eos]}")
    return {m.group(1): int(m.group(2)) for line in log if (m := re.search(r"- type +(\w+): +(\d+) tensors", line))}
