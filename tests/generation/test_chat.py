"""Conversations (bengali_empathy.generation.chat): whole-grapheme streaming, the history length rule, one
generation at a time, and terminal chat as a conversation."""
import io
import threading
import time

import pytest
import regex
import torch
from conftest import run_cli, trained_tiny_lora

from bengali_empathy.generation.chat import EMPTY_REPLY, GraphemeStreamer, Replier, Reply, chat_loop, settled_text
from bengali_empathy.data import DEFAULT_SYSTEM_PROMPT, ChatEncoder
from bengali_empathy.errors import UserError
from bengali_empathy.generation.decoding import Decoding

# A conjunct (ক্ষ), vowel signs and a nukta-like sign (য়): clusters that span several code points.
REPLY = "ক্ষমা করবেন, কী হয়েছে?"


def _byte_tokens(tokenizer, text):
    """One token per UTF-8 byte of ``text`` (byte-level BPE has a token for every byte)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    as_char = bytes_to_unicode()
    vocab = tokenizer.get_vocab()
    return [vocab[as_char[b]] for b in text.encode("utf-8")]


def test_streamed_text_never_shows_a_broken_character_or_grapheme(tokenizer):
    ids = _byte_tokens(tokenizer, REPLY)
    assert tokenizer.decode(ids) == REPLY
    naive = [tokenizer.decode(ids[:k]) for k in range(1, len(ids))]
    assert any("\ufffd" in t for t in naive)  # the token sequence does split characters
    streamer = GraphemeStreamer(tokenizer)
    streamer.put(torch.tensor([[1, 2, 3]]))  # the prompt, as generate() hands it over first
    for i in ids:
        streamer.put(torch.tensor([i]))
    streamer.end()
    shown = list(streamer)
    assert shown[-1] == REPLY
    boundaries = {m.end() for m in regex.finditer(r"\X", REPLY)}
    assert len(shown) > 5 and all(REPLY.startswith(t) and len(t) in boundaries and "\ufffd" not in t
                                  for t in shown)
    assert "ক্" not in shown and "ক" not in shown  # the conjunct appears whole or not at all


def test_settled_text_holds_back_the_last_grapheme_and_white_space():
    assert settled_text("  কী হ") == "কী"
    assert settled_text("কী হয়", final=True) == "কী হয়"
    assert settled_text("কী \ufffd", final=True) == "কী"


@pytest.fixture(scope="module")
def replier(tiny_lora):
    backend, model, tok = tiny_lora
    was_training = model.training
    yield Replier(model, tok, backend, DEFAULT_SYSTEM_PROMPT, 768, Decoding(max_new_tokens=4))
    model.train(was_training)


def _turns(*texts):
    return [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(texts)]


def test_prompt_is_the_whole_history_until_it_outgrows_the_length(replier, tokenizer):
    chat = ChatEncoder(tokenizer)
    history = _turns("আমি খুব একা। " * 3, "আমি আছি। " * 3, "আজও ঘুম আসছে না। " * 3, "বলুন। " * 3, "ভয় লাগছে।")
    ids, dropped = replier.prompt(history, 4)
    assert dropped == 0 and ids == chat.prompt_ids(DEFAULT_SYSTEM_PROMPT, history)
    just_under = len(chat.prompt_ids(DEFAULT_SYSTEM_PROMPT, history[2:])) + 4
    replier.max_seq_length = just_under  # room for the last two exchanges only: the oldest one goes
    try:
        ids, dropped = replier.prompt(history, 4)
        assert dropped == 2 and ids == chat.prompt_ids(DEFAULT_SYSTEM_PROMPT, history[2:])
        with pytest.raises(UserError, match="the message is too long: with the system prompt it makes a"):
            replier.prompt(_turns("ভয় " * 400), 4)
    finally:
        replier.max_seq_length = 768
    with pytest.raises(UserError, match="the message is empty"):
        replier.prompt(_turns("  "), 4)


def test_requests_from_many_threads_generate_one_at_a_time(replier, monkeypatch):
    active, most = [0], [0]
    real = replier.model.generate

    def counting(*args, **kwargs):
        active[0] += 1
        most[0] = max(most[0], active[0])
        time.sleep(0.05)  # long enough for the other threads to arrive
        try:
            return real(*args, **kwargs)
        finally:
            active[0] -= 1

    monkeypatch.setattr(replier.model, "generate", counting)
    replies = []
    threads = [threading.Thread(target=lambda b=b: replies.append(replier.reply(_turns("আমি একা।"), base=b)))
               for b in (False, True, False, True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] == 1 and len(replies) == 4 and all(r.done and r.new_tokens >= 1 for r in replies)


def test_a_reader_that_leaves_frees_the_model(replier):
    stream = replier.stream(_turns("আমি একা।"), Decoding(max_new_tokens=64))
    next(stream)
    stream.close()  # the web page closed mid-reply
    assert replier._lock.acquire(timeout=5)
    replier._lock.release()


@pytest.mark.slow
def test_terminal_chat_is_one_conversation(default_fit, tmp_path):
    adapter = str(default_fit[1] / "adapter")

    def chat(stdin):
        r = run_cli(["chat", "--adapter", adapter, "--max-new-tokens", "8"], cwd=tmp_path, stdin=stdin)
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout.splitlines(), [line for line in r.stderr.splitlines() if line.startswith("error:")]

    a, b = "আমি খুব একা।", "ভয় লাগছে।"
    b_alone, _ = chat(f"{b}\n")
    after_a, _ = chat(f"{a}\n{b}\n")
    reset, errors = chat(f"{a}\n/reset\n{'ভয় ' * 800}\n{b}\n\n")  # a message too long for the context between
    assert len(b_alone) == 1 and len(after_a) == 2 and len(reset) == 2
    assert after_a[1] != b_alone[0]  # the second reply saw the first exchange
    assert reset == [after_a[0], b_alone[0]]  # a new conversation; the refused message left no trace
    assert len(errors) == 1 and "the message is too long" in errors[0]


@pytest.fixture(scope="module")
def trained_lora(tiny_model_path):
    """(backend, model, tokenizer): the tiny model with a LoRA whose B is not zero (tuned != base)."""
    return trained_tiny_lora(tiny_model_path, 768)


@pytest.mark.parametrize("base", [False, True], ids=["tuned", "base"])
def test_static_and_compiled_engines_stream_the_eager_engines_reply(trained_lora, base):
    """Chat on the GPU decodes like evaluation's static or compiled engine; on the CPU in fp32 each is the
    eager reply, streamed as it grows, for the tuned model and for its base (adapter disabled)."""
    backend, model, tok = trained_lora
    turns = _turns("আমি একা।", "আমি আছি।", "আজ খুব ভয় লাগছে, কী করব?")
    replies = {}
    for engine in ("eager", "static", "compiled"):
        replier = Replier(model, tok, backend, DEFAULT_SYSTEM_PROMPT, 768, Decoding(max_new_tokens=12), engine=engine)
        replies[engine] = [r for r in replier.stream(turns, base=base)]
    eager = replies["eager"][-1]
    assert len(eager.text) > 5
    for engine in ("static", "compiled"):
        last = replies[engine][-1]
        assert (last.text, last.new_tokens) == (eager.text, eager.new_tokens), engine
    assert len({r.text for r in replies["compiled"]}) > 2  # streamed: the text grew over several updates
    assert model.get_base_model().config._attn_implementation == "sdpa"  # restored after the reply


def test_the_compiled_engine_keeps_a_decoder_each_for_the_tuned_and_the_base_model(trained_lora):
    """A graph records the adapter as it stood: the base model's replies have their own decoder, which
    the next base reply reuses, and they differ from the tuned model's."""
    backend, model, tok = trained_lora
    replier = Replier(model, tok, backend, DEFAULT_SYSTEM_PROMPT, 768, Decoding(max_new_tokens=12), engine="compiled")
    turns = _turns("আজ খুব ভয় লাগছে, কী করব?")
    tuned, base = replier.reply(turns), replier.reply(turns, base=True)
    engines = dict(replier._engines)
    assert replier.reply(turns, base=True).text == base.text != tuned.text
    assert replier._engines == engines and set(engines) == {False, True}


def test_a_reader_that_leaves_ends_compiled_decoding(tiny_lora):
    backend, model, tok = tiny_lora
    replier = Replier(model, tok, backend, DEFAULT_SYSTEM_PROMPT, 768, Decoding(max_new_tokens=64), engine="compiled")
    replier.reply(_turns("আমি একা।"), Decoding(max_new_tokens=2))  # makes the tuned model's decoder
    decoder, steps = replier._engines[False].decoder, []
    choose = decoder._choose

    def slow_choice(so_far, logits):  # a step slower than the reader
        steps.append(1)
        time.sleep(0.02)
        return choose(so_far, logits)

    decoder._choose = slow_choice
    stream = replier.stream(_turns("আমি একা।"))
    next(stream)
    stream.close()  # the web page closed mid-reply
    assert replier._lock.acquire(timeout=5)
    replier._lock.release()
    assert 1 <= len(steps) < 32  # it stopped soon after the reader left, not after 64 tokens


class _Replier:
    """Answers every message with the given texts, as :class:`Replier.stream` streams them."""

    max_seq_length = 768

    def __init__(self, text: str) -> None:
        self.text = text

    def stream(self, turns, decoding=None):
        yield Reply(self.text, prompt_tokens=5, history_turns=0, dropped_turns=0, done=True)



def test_chat_shows_an_empty_reply_as_such():
    out, notes = io.StringIO(), []
    chat_loop(_Replier(""), ["আজ মন খারাপ।"], out, notes.append)
    assert out.getvalue() == "\n" and notes == [EMPTY_REPLY]
    out, notes = io.StringIO(), []
    chat_loop(_Replier("আমি শুনছি।"), ["আজ মন খারাপ।"], out, notes.append)
    assert out.getvalue() == "আমি শুনছি।\n" and notes == []
