"""The Llama-3.1 tokenizer, built offline from Meta's ``tokenizer.model``.

The ``llama-models`` package ships Meta's tiktoken BPE file; we convert it with
transformers' :class:`TikTokenConverter` into a fast tokenizer with the 256
Llama-3.1 special tokens and the Llama-3.1 chat template, and cache the result
on disk (conversion takes a few seconds, loading the cache a fraction of one).

For any tokenizer it also says what its chat template ends turns and texts with
(:func:`end_of_turn_id`, :func:`stop_token_ids`, :func:`document_end_id`), and which of llama.cpp's
pre-tokenizers splits text as it does (:func:`llama_cpp_pre_tokenizer`).
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Optional

from .._io import atomic_directory
from ..errors import UserError

BEGIN_OF_TEXT = "<|begin_of_text|>"
END_OF_TEXT = "<|end_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
EOM = "<|eom_id|>"
PAD = "<|finetune_right_pad_id|>"
ENDOFTEXT = "<|endoftext|>"  # GPT-2's end of text, kept by GPT-2-style vocabularies (SmolLM's id 0)
NUM_BASE_TOKENS = 128000
NUM_SPECIAL_TOKENS = 256

# Meta's pre-tokenisation pattern for Llama 3 (o200k-like, case-insensitive contractions).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Llama-3.1's chat template without tool calling: the system turn carries the
# knowledge-cutoff header exactly as Meta's template writes it.
LLAMA31_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] | trim %}"
    "{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\n' }}"
    "{{- 'Today Date: 26 Jul 2024\\n\\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


def llama31_special_tokens() -> list[str]:
    """The 256 special tokens of Llama 3.1, in id order 128000..128255."""
    named = [
        BEGIN_OF_TEXT,  # 128000
        END_OF_TEXT,  # 128001
        "<|reserved_special_token_0|>",  # 128002
        "<|reserved_special_token_1|>",  # 128003
        PAD,  # 128004
        "<|reserved_special_token_2|>",  # 128005
        START_HEADER,  # 128006
        END_HEADER,  # 128007
        EOM,  # 128008
        EOT,  # 128009
        "<|python_tag|>",  # 128010
    ]
    reserved = [f"<|reserved_special_token_{i}|>" for i in range(3, NUM_SPECIAL_TOKENS - len(named) + 3)]
    tokens = named + reserved
    assert len(tokens) == NUM_SPECIAL_TOKENS, len(tokens)
    return tokens


def meta_tokenizer_model_path() -> Path:
    """Path of Meta's Llama 3 ``tokenizer.model`` shipped by ``llama-models``."""
    try:
        import llama_models
    except ImportError as exc:  # pragma: no cover - dependency is declared
        raise UserError("the package 'llama-models' is needed for the embedded Llama-3 tokenizer") from exc
    path = Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"
    if not path.is_file():  # pragma: no cover
        raise UserError(f"llama-models has no Llama 3 tokenizer.model at {path}")
    return path


def cache_dir() -> Path:
    """Where converted artefacts (tokenizer, tiny model) are cached."""
    root = os.environ.get("BENGALI_EMPATHY_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "bengali_empathy"
    )
    return Path(root)


def build_llama3_tokenizer():
    """Convert Meta's tiktoken file into a ``PreTrainedTokenizerFast`` (no cache)."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    specials = llama31_special_tokens()
    converter = TikTokenConverter(
        vocab_file=str(meta_tokenizer_model_path()),
        pattern=LLAMA3_PATTERN,
        extra_special_tokens=specials,
    )
    backend = converter.converted()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BEGIN_OF_TEXT,
        eos_token=EOT,
        pad_token=PAD,
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = LLAMA31_CHAT_TEMPLATE
    tok.padding_side = "right"
    # The converter adds special tokens after the 128000 BPE ranks: verify ids.
    for offset, token in enumerate(specials):
        got = tok.convert_tokens_to_ids(token)
        if got != NUM_BASE_TOKENS + offset:  # pragma: no cover - guards against converter changes
            raise RuntimeError(f"special token {token} got id {got}, expected {NUM_BASE_TOKENS + offset}")
    return tok


def _add_bos_post_processor(tok) -> None:
    """Prepend <|begin_of_text|> on plain encodes, as Meta's tokenizer does."""
    from tokenizers import processors

    bos_id = tok.convert_tokens_to_ids(BEGIN_OF_TEXT)
    tok.backend_tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BEGIN_OF_TEXT}:0 $A:0",
                pair=f"{BEGIN_OF_TEXT}:0 $A:0 {BEGIN_OF_TEXT}:1 $B:1",
                special_tokens=[(BEGIN_OF_TEXT, bos_id)],
            ),
        ]
    )


def embedded_tokenizer_dir() -> Path:
    """Directory holding the converted Llama-3.1 tokenizer, creating it once."""
    target = cache_dir() / "llama3_tokenizer"
    if (target / "tokenizer.json").is_file() and (target / "tokenizer_config.json").is_file():
        return target
    tok = build_llama3_tokenizer()
    _add_bos_post_processor(tok)
    try:
        with atomic_directory(target, replace=False) as tmp:
            tok.save_pretrained(str(tmp))
    except FileExistsError:
        pass  # another process won the race; its copy is identical
    return target


def load_tokenizer(path: str | os.PathLike | None = None):
    """Load a tokenizer from a local checkpoint directory, or the embedded Llama-3.1 one.

    Guarantees a pad token (Llama 3.1's ``<|finetune_right_pad_id|>`` when the
    checkpoint has none) and right padding for training. Every call returns its own
    copy; the directory is parsed once per process while its files stay unchanged
    (parsing Llama-3's tokenizer.json takes ~2 s, a copy a third of that, and a run
    loads it twice: for the data and with the model).
    """
    import copy

    if path is None:
        path = embedded_tokenizer_dir()
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"tokenizer directory not found: {path}")
    stats = {p.name: p.stat() for p in path.iterdir() if p.is_file()}
    files = tuple(sorted((name, s.st_mtime_ns, s.st_size) for name, s in stats.items()))
    return copy.deepcopy(_parsed_tokenizer(str(path.resolve()), files))


@functools.lru_cache(maxsize=8)
def _parsed_tokenizer(path: str, files: tuple):
    """The tokenizer of ``path`` as :func:`load_tokenizer` prepares it (``files`` keys the cache)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - surfaced as one line
        raise UserError(f"cannot load a tokenizer from {path}: {exc}") from exc
    if tok.pad_token is None:
        if PAD in tok.get_vocab():
            tok.pad_token = PAD
        else:
            tok.pad_token = tok.eos_token
    # A Llama-3 base checkpoint ships no template, but its vocabulary has the header tokens of Llama 3.1's
    # format; for any other tokenizer without one the data module asks for data.encoding.chat_template.
    if not tok.chat_template and START_HEADER in tok.get_vocab():
        tok.chat_template = LLAMA31_CHAT_TEMPLATE
    tok.padding_side = "right"
    # transformers 5 ignores this WordPiece clean-up for BPE tokenizers anyway (it would strip spaces before
    # punctuation) and warns at every decode where a checkpoint (Llama 3's, a converted GGUF's) asks for it.
    tok.clean_up_tokenization_spaces = False
    return tok


def llama3_tiktoken(tok):
    """tiktoken's encoder of Meta's Llama-3 BPE if ``tok`` is exactly that BPE, else ``None``.

    On Bengali it encodes about four times faster than the fast tokenizer, which
    matters when a corpus is hundreds of millions of tokens. Used only after the
    whole vocabulary and a probe of scripts, digits and white space agree.
    """
    try:
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe
        from transformers.convert_slow_tokenizer import bytes_to_unicode
    except ImportError:  # pragma: no cover - both are dependencies
        return None
    if len(tok) != NUM_BASE_TOKENS + NUM_SPECIAL_TOKENS:
        return None
    ranks = load_tiktoken_bpe(str(meta_tokenizer_model_path()))
    to_unicode = bytes_to_unicode()
    vocab = tok.get_vocab()
    if any(vocab.get("".join(to_unicode[b] for b in piece)) != rank for piece, rank in ranks.items()):
        return None
    enc = tiktoken.Encoding("llama3", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens={})
    probe = ["আমি আজ খুব একা বোধ করছি। কেউ শোনে না!", "Hello, world! It's 2024.", "১২৩ 4567  তিন\n\nলাইন\t ",
             "মিশ্র text ও ১২৩।\r\nনতুন", "  leading and trailing  ", "emoji 🙂 and ঢাকা-চট্টগ্রাম"]
    if any(enc.encode_ordinary(t) != tok(t, add_special_tokens=False)["input_ids"] for t in probe):
        return None
    return enc


def read_chat_template(template_or_path: str) -> str:
    """The chat template that ``data.encoding.chat_template`` names: Jinja text as given, or the text of the file at
    that path (a ``.jinja`` file)."""
    if "{{" in template_or_path or "{%" in template_or_path:
        return template_or_path
    path = Path(template_or_path).expanduser()
    if not path.is_file():
        raise UserError(f"data.encoding.chat_template {template_or_path!r} is neither Jinja text nor a file")
    return path.read_text(encoding="utf-8")


def prepended_ids(tok) -> list[int]:
    """The ids the tokenizer puts before any text by itself (Llama 3's <|begin_of_text|>; none for SmolLM2, whose
    bos_token <|im_start|> it never prepends)."""
    ids = tok("\x01")["input_ids"]
    return ids[:len(ids) - len(tok("\x01", add_special_tokens=False)["input_ids"])]


def render_chat(tok, messages: list[dict], generation_prompt: bool = False) -> str:
    """``messages`` as the tokenizer's chat template writes them (text), or one :class:`UserError` line."""
    if not getattr(tok, "chat_template", None):
        raise UserError("the tokenizer has no chat template: add a chat_template.jinja to its directory")
    try:
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as exc:  # noqa: BLE001 - jinja's errors (and the template's raise_exception) as one line
        roles = ", ".join(m["role"] for m in messages)
        raise UserError(f"the tokenizer's chat template cannot render a conversation of roles ({roles}): "
                        f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc


def is_special(tok, token_id: int) -> bool:
    """Whether ``token_id`` is one of the tokenizer's special (control) tokens."""
    added = tok.added_tokens_decoder.get(token_id)
    return token_id in tok.all_special_ids or (added is not None and added.special)


def end_of_turn_id(tok) -> int:
    """The special token the chat template closes an assistant reply with (``<|eot_id|>`` for Llama 3,
    ``<|im_end|>`` for ChatML, ``<end_of_turn>`` for Gemma, ``</s>`` for Mistral).

    Read from the template: a reply rendered as a marker, and the first token after it.
    """
    marker = "\x071\x07"  # BEL and a digit: no template changes them (``| trim``, ``| upper``)
    text = render_chat(tok, [{"role": "user", "content": "\x070\x07"}, {"role": "assistant", "content": marker}])
    _, found, after = text.partition(marker)
    if not found:
        raise UserError("the tokenizer's chat template does not write an assistant reply as it is given")
    ids = tok(after, add_special_tokens=False)["input_ids"] if after else []
    if not ids or not is_special(tok, ids[0]):
        raise UserError(f"the tokenizer's chat template does not close an assistant reply with a special token "
                        f"(it writes {after[:20]!r} after one): replies could not learn to end")
    return ids[0]


def document_end_id(tok) -> int:
    """The token that ends a raw text (continued pretraining): ``<|end_of_text|>`` for Llama 3, ``<|endoftext|>`` for
    GPT-2-style vocabularies (SmolLM2) -- instruct tokenizers call their end of turn (``<|eot_id|>``, ``<|im_end|>``)
    their eos -- else the tokenizer's eos."""
    vocab = tok.get_vocab()
    for end in (END_OF_TEXT, ENDOFTEXT):
        if end in vocab:
            return vocab[end]
    if tok.eos_token_id is None:
        raise UserError("the tokenizer has no eos token to end a raw text with")
    return tok.eos_token_id


def stop_token_ids(tok, generation_eos=None) -> list[int]:
    """Token ids that end a reply: the template's end of turn, Llama 3's <|eom_id|> and <|end_of_text|> and
    GPT-2's <|endoftext|> where the vocabulary has them (llama.cpp ends generation at each), the tokenizer's eos
    and ``generation_eos`` (a generation config's ``eos_token_id``: one id, a list or ``None``). Without a chat
    template (a base model), the eos ones only."""
    vocab = tok.get_vocab()
    ids = [end_of_turn_id(tok)] if getattr(tok, "chat_template", None) else []
    ids += [vocab[t] for t in (EOM, END_OF_TEXT, ENDOFTEXT) if t in vocab]
    ids += [tok.eos_token_id]
    ids += generation_eos if isinstance(generation_eos, (list, tuple)) else [generation_eos]
    return list(dict.fromkeys(i for i in ids if i is not None))


def llama_cpp_pre_tokenizers() -> dict:
    """The byte-level BPE pre-tokenizers of llama.cpp this package names: llama.cpp's name (a GGUF's
    ``tokenizer.ggml.pre``) -> the Hugging Face pre-tokenizer that splits text as it does. llama.cpp's
    ``llama-vocab.cpp`` gives each name its split expressions; its tokenizer tests hold them to the Hugging Face
    tokenizer the name was made for (Meta's Llama 3, GPT-2, SmolLM's: GPT-2's after splitting every digit off)."""
    from tokenizers import Regex
    from tokenizers import pre_tokenizers as P

    gpt2 = P.ByteLevel(add_prefix_space=False, use_regex=True)
    return {"llama-bpe": P.Sequence([P.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
                                     P.ByteLevel(add_prefix_space=False, use_regex=False)]),
            "gpt-2": gpt2,
            "smollm": P.Sequence([P.Digits(individual_digits=True), gpt2])}


def llama_cpp_pre_tokenizer(tok) -> Optional[str]:
    """The name in :func:`llama_cpp_pre_tokenizers` of ``tok``'s pre-tokenizer when ``tok`` is a BPE without a
    normalizer, else None. Compared as the pre-tokenizers' definitions (offset trimming aside: it moves no token
    boundary), not as their output on some text, which could agree by chance."""
    backend = getattr(tok, "backend_tokenizer", None)  # a slow (Python) tokenizer has none
    if backend is None or type(backend.model).__name__ != "BPE" or _definition(backend.normalizer) not in (None, {
            "type": "Sequence", "normalizers": []}):
        return None
    ours = _definition(backend.pre_tokenizer)
    return next((name for name, pre in llama_cpp_pre_tokenizers().items() if _definition(pre) == ours), None)


def _definition(component) -> Optional[dict]:
    """A tokenizers component (normalizer, pre-tokenizer) as its JSON, without ``trim_offsets``."""
    if component is None:
        return None

    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k != "trim_offsets"}
        return [strip(v) for v in x] if isinstance(x, list) else x

    return strip(json.loads(component.__getstate__()))
