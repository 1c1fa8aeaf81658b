"""A tokenizer's chat format as token ids, assembled turn by turn from pieces of its own chat template."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from ..errors import UserError
from .tokenizer import document_end_id, end_of_turn_id, llama3_tiktoken, prepended_ids, render_chat

# A conversation to compare the assembly with ``apply_chat_template`` on: the format does not depend on
# the texts, and a fixed one checks the tokenizer before any corpus row is read.
PROBE_SYSTEM = "আপনি একজন সহমর্মী সহকারী।"
PROBE_TURNS = [{"role": "user", "content": "আজ মনটা ভারী।"}, {"role": "assistant", "content": "কী হয়েছে, বলবেন?"},
               {"role": "user", "content": "চাকরিটা চলে গেল। Okay 123"}, {"role": "assistant", "content": "আমি শুনছি।"}]

# Stands for the i-th message text when a template is rendered to find its pieces: BEL is neither white
# space (``| trim`` keeps it) nor anything a template writes.
_MARK = "\x07{}\x07"


@dataclass(frozen=True)
class Layout:
    """The template's own text around the message texts of one sequence of roles, as token ids.

    ``pieces[0]`` comes first; then every message text is followed by the piece after it. The texts
    appear in the rendered text in ``order`` (indices into the messages: Gemma folds the system text into
    the first user turn, after that turn's header, but a template may put it anywhere)."""

    pieces: tuple[tuple[int, ...], ...]
    order: tuple[int, ...]
    generation_header: tuple[int, ...]  # what ``add_generation_prompt`` appends: the open assistant header


class ChatEncoder:
    """The tokenizer's chat format as token ids, assembled turn by turn.

    For every sequence of roles (system or not, then the turns) the chat template is rendered once with
    marker texts and cut at the markers; the literal pieces between are tokenised once (:class:`Layout`).
    A conversation is then the pieces with its texts' ids in between, each text tokenised on its own
    (tiktoken when the tokenizer is Meta's Llama-3 BPE), so the span of every reply falls out of the
    assembly: the reply and the end-of-turn token the template closes it with (``<|eot_id|>``,
    ``<|im_end|>``, ``<end_of_turn>``, ``</s>``), none of the template's own text.

    Tokenising texts on their own is exact when the template's text never merges with a message's
    into one token: a special token follows every text, or the plain text that does is tokenised with
    it (:meth:`content`), and what precedes a text (a header's new line) does not merge with it. The
    constructor compares the assembly with ``tokenizer.apply_chat_template`` on :data:`PROBE_TURNS`
    (and :meth:`check` on any conversation): a template that fails is refused.
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.eot = end_of_turn_id(tokenizer)  # first: says when there is no template at all
        self.bos = prepended_ids(tokenizer)  # a raw text's start: what the tokenizer itself puts first
        self.end_of_text = document_end_id(tokenizer)
        self.fast = llama3_tiktoken(tokenizer)
        self._memo: dict[str, list[int]] = {}
        self._layouts: dict[tuple[str, ...], Layout] = {}
        self._specials = sorted({*tokenizer.all_special_tokens,
                                 *(t.content for t in tokenizer.added_tokens_decoder.values() if t.special)} - {""})
        self.trimmed, self.glued = self._content_rules()
        self.check(PROBE_SYSTEM, PROBE_TURNS, "the tokenizer's chat template")

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def _pieces(self, roles: tuple[str, ...], contents: list[str],
                marks: list[str]) -> tuple[list[str], list[int], str]:
        """The conversation of ``roles`` and ``contents`` rendered and cut at ``marks`` (one in each content): its
        pieces, the order the marks appear in, and what the generation prompt adds."""
        messages = [{"role": r, "content": c} for r, c in zip(roles, contents)]
        text = render_chat(self.tokenizer, messages)
        with_header = render_chat(self.tokenizer, messages, generation_prompt=True)
        if not with_header.startswith(text):
            raise UserError("the tokenizer's chat template writes a conversation differently when it adds the "
                            "generation prompt: a prompt cannot be assembled from pieces")
        if [text.count(m) for m in marks] != [1] * len(marks):
            raise UserError(f"the tokenizer's chat template drops or repeats message texts (roles {', '.join(roles)}):"
                            " its format cannot be assembled from pieces")
        order = sorted(range(len(marks)), key=lambda i: text.index(marks[i]))
        pieces, rest = [], text
        for i in order:
            before, _, rest = rest.partition(marks[i])
            pieces.append(before)
        return pieces + [rest], order, with_header[len(text):]

    def layout(self, roles: tuple[str, ...]) -> Layout:
        """The :class:`Layout` of a role sequence (``system`` first when the conversation has a system text)."""
        if roles not in self._layouts:
            marks = [_MARK.format(i) for i in range(len(roles))]
            pieces, order, header = self._pieces(roles, marks, marks)
            for k, i in enumerate(order):
                glued = self.glued.get(roles[i], "")
                if self._text_run(pieces[k + 1]) != glued:
                    raise UserError(f"the tokenizer's chat template writes different text after {roles[i]} texts in "
                                    f"different turns (roles {', '.join(roles)}): texts cannot be tokenised alike")
                pieces[k + 1] = pieces[k + 1][len(glued):]  # tokenised with the text before it
            ids = tuple(tuple(self._ids(p)) for p in pieces)
            for k, i in enumerate(order):
                if roles[i] == "assistant" and ids[k + 1][:1] != (self.eot,):
                    raise UserError(f"the tokenizer's chat template does not end every assistant reply with "
                                    f"{self.tokenizer.convert_ids_to_tokens(self.eot)} (roles {', '.join(roles)})")
            self._layouts[roles] = Layout(ids, tuple(order), tuple(self._ids(header)))
        return self._layouts[roles]

    def _text_run(self, piece: str) -> str:
        """The start of ``piece`` up to its first special token."""
        return piece[:min([piece.find(t) for t in self._specials if t in piece], default=len(piece))]

    def _content_rules(self) -> tuple[dict[str, bool], dict[str, str]]:
        """Per role, whether the template trims message texts (Llama 3's ``| trim``; any other change is refused),
        and the plain text it writes right after one (Gemma's ``\\n\\n`` after the system text, which opens the
        first user turn; none where a special token follows).

        That text is tokenised with the message's (:meth:`content`): a tokenizer may merge the two (Llama 3's
        BPE writes ``।\\n\\n`` as one token). Every caller passes texts without surrounding white space (the corpus
        formats and the chat strip them), which trimming leaves alone."""
        roles = ("system", "user", "assistant", "user", "assistant")
        marks = [_MARK.format(i) for i in range(len(roles))]
        plain, order, _ = self._pieces(roles, marks, marks)
        trimmed: dict[str, bool] = {}
        glued: dict[str, str] = {}
        for i, role in enumerate(roles):
            padded, _, _ = self._pieces(roles, marks[:i] + [f" \n{marks[i]}\n "] + marks[i + 1:], marks)
            k = order.index(i)
            kept = plain[:k] + [plain[k] + " \n", "\n " + plain[k + 1]] + plain[k + 2:]
            verdict = True if padded == plain else False if padded == kept else None
            if verdict is None or trimmed.get(role, verdict) != verdict:
                raise UserError(f"the tokenizer's chat template changes {role} texts otherwise than trimming them: "
                                "its format cannot be assembled from separately tokenised texts")
            trimmed[role] = verdict
            glued.setdefault(role, self._text_run(plain[k + 1]))
        return trimmed, glued

    def content(self, role: str, text: str) -> str:
        """``text`` as it is tokenised for a message of ``role``: trimmed where the template trims, followed by the
        plain text the template writes after it (see :meth:`_content_rules`); an empty text stays empty."""
        text = text.strip() if self.trimmed.get(role) else text
        return text + self.glued.get(role, "") if text else ""

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
        """Ids of a conversation and the ``(start, end)`` span of every assistant reply (its end-of-turn token
        included). Empty ``system_ids``: no system message (the template's default, if it has one).

        A raw-text row (one turn of role ``text``) is the tokenizer's bos (if it has one) + the text + its
        end of text (:func:`~.tokenizer.document_end_id`), one span over every token after the bos:
        continued pretraining learns the language, not a format."""
        if turns and turns[0][0] == "text":
            ids = self.bos + turns[0][1] + [self.end_of_text]
            return ids, [(len(self.bos), len(ids))]
        roles = ("system",) * bool(system_ids) + tuple(r for r, _ in turns)
        texts = [system_ids] * bool(system_ids) + [t for _, t in turns]
        layout = self.layout(roles)
        ids = list(layout.pieces[0])
        spans = []
        for i, piece in zip(layout.order, layout.pieces[1:]):
            start = len(ids)
            ids += texts[i]
            if roles[i] == "assistant":
                spans.append((start, len(ids) + 1))  # the piece after a reply starts with the end-of-turn token
            ids += piece
        if generation_prompt:
            ids += layout.generation_header
        return ids, spans

    def tokenized(self, system: str, turns: list[dict]) -> tuple[list[int], list[tuple[str, list[int]]]]:
        """The ids :meth:`assemble` takes for a conversation of texts (``system`` empty: none)."""
        texts = self.tokenize([self.content("system", system)] + [self.content(t["role"], t["content"])
                                                                   for t in turns])
        return (texts[0] if system else []), [(t["role"], x) for t, x in zip(turns, texts[1:])]

    def prompt_ids(self, system: str, turns: list[dict]) -> list[int]:
        """Generation prompt for a chat: the turns so far and an open assistant header."""
        return self.assemble(*self.tokenized(system, turns), generation_prompt=True)[0]

    def check(self, system: str, turns: list[dict], where: str) -> None:
        """Fail unless the assembly equals the tokenizer's own chat template for this conversation (and, when it
        ends in a reply, for the generation prompt before that reply)."""
        messages = [{"role": "system", "content": system}] * bool(system) + turns
        cases = [(self.assemble(*self.tokenized(system, turns))[0], messages, False)]
        if turns and turns[-1]["role"] == "assistant":
            cases.append((self.prompt_ids(system, turns[:-1]), messages[:-1], True))
        for ours, msgs, generation_prompt in cases:
            ref = self.tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=generation_prompt)
            ref = list(ref["input_ids"] if hasattr(ref, "keys") else ref)
            if ours != ref:
                k = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), min(len(ours), len(ref)))
                what = "generation prompt" if generation_prompt else "conversation"
                raise UserError(f"{where}: a {what} assembled from the chat template's pieces differs from "
                                f"apply_chat_template at token {k} ({ref[k:k + 3]} expected, got {ours[k:k + 3]}): "
                                "this template cannot be trained on turn by turn")

    def cache_key(self) -> str:
        # ends in white space before digits, which SmolLM's pre-tokenizer splits otherwise than GPT-2's (the one
        # older GGUF imports gave it): a changed pre-tokenizer is a changed key
        probe = self._ids("আমি আজ খুব একা বোধ করছি। Hello 123\n\n১২")
        template = hashlib.sha256(self.tokenizer.chat_template.encode("utf-8")).hexdigest()
        return json.dumps([len(self.tokenizer), template, self.bos, self.end_of_text, self.eot, self.trimmed, self.glued,
                           probe])
