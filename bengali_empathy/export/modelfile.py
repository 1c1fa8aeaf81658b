"""The Ollama ``Modelfile`` of a GGUF export: its chat template, system prompt, stop tokens and context length.

Ollama renders prompts with a Go template of its own (``text/template`` over ``.System`` and ``.Messages``), not the
Jinja template inside the GGUF, so the training format is written a second time here, in Go. It is derived from the
adapter's Jinja template (rendered once with marker texts and cut at the markers), so a changed preamble (Llama 3.1's
knowledge-cutoff lines) follows the template instead of a copy kept here. Ollama prepends ``<|begin_of_text|>``
itself (the GGUF says ``add_bos_token``), so the Go template starts at the system header.
"""
from __future__ import annotations

from ..errors import UserError
from ..data.tokenizer import END_HEADER, END_OF_TEXT, EOM, EOT, START_HEADER

MODELFILE = "Modelfile"
STOP_TOKENS = (EOT, EOM, END_OF_TEXT)
_MARKS = {"system": "\x01", "user": "\x02", "assistant": "\x03"}


def ollama_template(tokenizer) -> str:
    """The Go template that renders a chat exactly as ``tokenizer``'s (Llama-3) chat template does.

    Message texts are inserted as they are: the Jinja template trims them, Ollama does not, so the two agree on
    texts without leading or trailing white space (as the training data are)."""
    text = tokenizer.apply_chat_template([{"role": r, "content": m} for r, m in _MARKS.items()], tokenize=False,
                                         add_generation_prompt=True)
    bos = tokenizer.bos_token or ""
    turns = {r: f"{START_HEADER}{r}{END_HEADER}\n\n" for r in ("user", "assistant")}
    head, sep, rest = text.partition(_MARKS["system"] + EOT)
    expected = (turns["user"] + _MARKS["user"] + EOT + turns["assistant"] + _MARKS["assistant"] + EOT
                + turns["assistant"])
    if not sep or not head.startswith(bos) or rest != expected or "{{" in head:
        raise UserError("the adapter's chat template is not the Llama-3 format: no Ollama template can be written")
    return (f"{head[len(bos):]}{{{{ .System }}}}{EOT}\n"
            "{{- range .Messages }}\n"
            '{{- if eq .Role "user" "assistant" }}' f"{START_HEADER}{{{{ .Role }}}}{END_HEADER}\n\n"
            f"{{{{ .Content }}}}{EOT}\n"
            "{{- end }}\n"
            f"{{{{- end }}}}{turns['assistant']}")


def modelfile_text(gguf_name: str, tokenizer, system_prompt: str, num_ctx: int) -> str:
    """A Modelfile for ``ollama create``: FROM the GGUF beside it, the training format, system prompt and length."""
    template = ollama_template(tokenizer)
    for what, text in (("system prompt", system_prompt), ("chat template", template)):
        if '"""' in text:
            raise UserError(f'the {what} contains """, which a Modelfile cannot quote')
    stops = "".join(f'PARAMETER stop "{t}"\n' for t in STOP_TOKENS)
    return (f"FROM ./{gguf_name}\n"
            f'TEMPLATE """{template}"""\n'
            f'SYSTEM """{system_prompt}"""\n'
            f"{stops}"
            f"PARAMETER num_ctx {num_ctx}\n")
