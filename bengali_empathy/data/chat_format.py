"""The Llama-3.1 chat format as token ids, assembled turn by turn (and checked against the tokenizer's template)."""
from __future__ import annotations

import json

from ..errors import UserError
from .tokenizer import END_OF_TEXT

# A conversation to compare the assembly with ``apply_chat_template`` on: the format does not depend on
# the texts, and a fixed one checks the tokenizer before any corpus row is read.
PROBE_TURNS = [{"role": "user", "content": "আজ মনটা ভারী।"}, {"role": "assistant", "content": "কী হয়েছে, বলবেন?"},
               {"role": "user", "content": "চাকরিটা চলে গেল। Okay 123"}, {"role": "assistant", "content": "আমি শুনছি।"}]


class ChatEncoder:
    """The Llama-3.1 chat format as token ids, assembled turn by turn.

    ``<|begin_of_text|>`` + system header + the template's preamble (Llama 3.1's
    knowledge-cutoff lines) + system text + ``<|eot_id|>``, then for every turn its
    role header, its text and ``<|eot_id|>``. Texts are tokenised on their own
    (pre-tokenisation never merges across the header's ``\\n\\n``), so the spans of
    the replies fall out of the assembly; :meth:`check` compares the result with
    ``tokenizer.apply_chat_template`` on real rows.
    """

    def __init__(self, tokenizer) -> None:
        from .tokenizer import end_of_turn_id

        self.tokenizer = tokenizer
        self.eot = end_of_turn_id(tokenizer)
        marker = "\x07"
        head = "<|start_header_id|>system<|end_header_id|>\n\n"
        text = tokenizer.apply_chat_template([{"role": "system", "content": marker}], tokenize=False)
        if not isinstance(text, str) or head not in text or marker not in text:
            raise UserError("the tokenizer's chat template is not the Llama-3 format (no system header)")
        before = text.split(marker, 1)[0]
        prefix, preamble = before.split(head, 1)
        self.prefix = self._ids(prefix)
        self.system_header = self._ids(head + preamble)
        self.headers = {r: self._ids(f"<|start_header_id|>{r}<|end_header_id|>\n\n") for r in ("user", "assistant")}
        self.end_of_text = tokenizer.convert_tokens_to_ids(END_OF_TEXT)

        from .tokenizer import llama3_tiktoken

        self.fast = llama3_tiktoken(tokenizer)
        self._memo: dict[str, list[int]] = {}

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids of many texts (tiktoken when the tokenizer is Llama-3's BPE, else the fast tokenizer's batch).

        Text that spells a special token (``<|...|>``) goes through the tokenizer, which
        parses it as the special token exactly as ``apply_chat_template`` does. Texts
        given to :meth:`remember` (the default system prompt most rows share) are memoised.
        """
        out: list = [None] * len(texts)
        slow = []
        for i, t in enumerate(texts):
            if t in self._memo:
                out[i] = self._memo[t]
            elif self.fast is not None and "<|" not in t:
                out[i] = self.fast.encode_ordinary(t)
            else:
                slow.append(i)
        if slow:
            for i, ids in zip(slow, self.tokenizer([texts[i] for i in slow], add_special_tokens=False)["input_ids"]):
                out[i] = list(ids)
        return out

    def remember(self, text: str) -> None:
        """Keep the ids of a text that starts most conversations (the default system prompt)."""
        self._memo[text] = self.tokenize([text])[0]

    def assemble(self, system_ids: list[int], turns: list[tuple[str, list[int]]],
                 generation_prompt: bool = False) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids of a conversation and the ``(start, end)`` span of every assistant reply (its ``<|eot_id|>`` included).

        A raw-text row (one turn of role ``text``) is ``<|begin_of_text|>`` + the text + ``<|end_of_text|>``,
        one span over every token after the first: continued pretraining learns the language, not a format."""
        if turns and turns[0][0] == "text":
            ids = self.prefix + turns[0][1] + [self.end_of_text]
            return ids, [(len(self.prefix), len(ids))]
        ids = self.prefix + self.system_header + system_ids + [self.eot]
        spans = []
        for role, t in turns:
            ids += self.headers[role]
            start = len(ids)
            ids += t + [self.eot]
            if role == "assistant":
                spans.append((start, len(ids)))
        if generation_prompt:
            ids += self.headers["assistant"]
        return ids, spans

    def prompt_ids(self, system: str, turns: list[dict]) -> list[int]:
        """Generation prompt for a chat: the turns so far and an open assistant header."""
        texts = self.tokenize([system] + [t["content"] for t in turns])
        return self.assemble(texts[0] if system else [], [(t["role"], x) for t, x in zip(turns, texts[1:])],
                             generation_prompt=True)[0]

    def check(self, system: str, turns: list[dict], where: str) -> None:
        """Fail unless the assembly equals the tokenizer's own chat template for this conversation."""
        ours = self.prompt_ids(system, turns)[: -len(self.headers["assistant"])]
        msgs = [{"role": "system", "content": system}] + turns
        ref = self.tokenizer.apply_chat_template(msgs, tokenize=True)
        ref = list(ref["input_ids"] if hasattr(ref, "keys") else ref)
        if ours != ref:
            k = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), min(len(ours), len(ref)))
            raise UserError(f"{where}: the tokenizer's chat template differs from the Llama-3 format at token {k}; "
                            "this package formats Llama-3 chat only")

    def cache_key(self) -> str:
        probe = self._ids("আমি আজ খুব একা বোধ করছি। Hello 123\n")
        return json.dumps([len(self.tokenizer), self.prefix, self.system_header, self.headers, self.eot, probe])

