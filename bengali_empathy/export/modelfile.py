"""The Ollama ``Modelfile`` of a GGUF export: its chat template, system prompt, stop tokens and context length.

Ollama renders prompts with a Go template of its own (``text/template`` over ``.System`` and ``.Messages``), not the
Jinja template inside the GGUF, so the training format is written a second time here, in Go. It is derived from the
adapter's Jinja template (rendered once with marker texts and cut at the markers), so a changed preamble (Llama 3.1's
knowledge-cutoff lines) or another family (ChatML) follows the template instead of a copy kept here. Ollama
prepends the bos itself where the tokenizer does (the GGUF's ``add_bos_token``: Llama 3's ``<|begin_of_text|>``),
so the Go template starts after it.
"""
from __future__ import annotations

import json

from ..errors import UserError
from ..data.tokenizer import prepended_ids, render_chat, stop_token_ids

MODELFILE = "Modelfile"
_MARKS = {"system": "\x01", "user": "\x02", "assistant": "\x03"}
# A longer chat, which the Go template derived from the first three messages must render as the Jinja one does.
_CHECK = [*_MARKS.items(), ("user", "\x04"), ("assistant", "\x05"), ("user", "\x06")]


def ollama_template(tokenizer) -> str:
    """The Go template that renders a chat exactly as ``tokenizer``'s chat template does, for a template that writes
    every message as a header naming its role, the text and an end of turn (Llama 3, ChatML).

    From the Jinja template rendered with marker texts: its text before the system text, the end of a turn (what
    follows the assistant text) and a turn's header (what the generation prompt appends, the role's name in it made
    ``.Role``). Message texts are inserted as they are: the Jinja template may trim them (Llama 3's does), Ollama
    does not, so the two agree on texts without leading or trailing white space (as the training data are)."""
    messages = [{"role": r, "content": m} for r, m in _MARKS.items()]
    closed = render_chat(tokenizer, messages)
    header = render_chat(tokenizer, messages, generation_prompt=True)[len(closed):]
    head, _, rest = closed.partition(_MARKS["system"])
    after_system, _, rest = rest.partition(_MARKS["user"])
    after_user, _, end = rest.partition(_MARKS["assistant"])
    role_header = header.replace("assistant", "{{ .Role }}")
    bos = _added_bos(tokenizer)
    if (not (end and header.count("assistant") == 1 and after_user == end + header
             and after_system == end + role_header.replace("{{ .Role }}", "user") and head.startswith(bos))
            or any("{{" in piece for piece in (head, end, header))):
        raise UserError("the adapter's chat template does not write each message as a header, the text and an end of "
                        "turn: no Ollama template can be written")
    head = head[len(bos):]
    expected = head + "".join((role_header.replace("{{ .Role }}", r) if r != "system" else "") + m + end
                              for r, m in _CHECK) + header
    if render_chat(tokenizer, [{"role": r, "content": m} for r, m in _CHECK], generation_prompt=True)[len(bos):] \
            != expected:
        raise UserError("the adapter's chat template writes later turns otherwise than the first: no Ollama template "
                        "can be written")
    return (f"{head}{{{{ .System }}}}{_go_text(end)}\n"
            "{{- range .Messages }}\n"
            '{{- if eq .Role "user" "assistant" }}' f"{role_header}{{{{ .Content }}}}{_go_text(end)}\n"
            "{{- end }}\n"
            f"{{{{- end }}}}{header}")


def _added_bos(tokenizer) -> str:
    """The bos text when the tokenizer prepends its bos to a text (and Ollama, reading the GGUF, does too), else ''."""
    return tokenizer.bos_token if prepended_ids(tokenizer) == [tokenizer.bos_token_id] else ""


def _go_text(text: str) -> str:
    """``text`` for the Go template, its trailing white space (ChatML's new line after ``<|im_end|>``) as a string
    action: the ``{{-`` that follows it (one action a line) trims white space in the template's own text."""
    kept = text.rstrip()
    return kept + (f"{{{{ {json.dumps(text[len(kept):])} }}}}" if kept != text else "")


def modelfile_text(gguf_name: str, tokenizer, system_prompt: str, num_ctx: int) -> str:
    """A Modelfile for ``ollama create``: FROM the GGUF beside it, the training format, system prompt, stop tokens
    (the tokenizer's: :func:`~.data.tokenizer.stop_token_ids`) and length."""
    template = ollama_template(tokenizer)
    for what, text in (("system prompt", system_prompt), ("chat template", template)):
        if '"""' in text:
            raise UserError(f'the {what} contains """, which a Modelfile cannot quote')
    stops = "".join(f'PARAMETER stop "{t}"\n' for t in tokenizer.convert_ids_to_tokens(stop_token_ids(tokenizer)))
    return (f"FROM ./{gguf_name}\n"
            f'TEMPLATE """{template}"""\n'
            f'SYSTEM """{system_prompt}"""\n'
            f"{stops}"
            f"PARAMETER num_ctx {num_ctx}\n")
