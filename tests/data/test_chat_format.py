"""The chat format read from the tokenizer's own template, per template family (bengali_empathy.data.chat_format).

Every family is checked against ``tokenizer.apply_chat_template``: Llama 3.1 (the embedded tokenizer, and Meta's
official template with tools and the knowledge-cutoff preamble), ChatML (SmolLM2's template over a byte-level BPE
trained here) and Gemma (no system role: the system text goes into the first user turn).
"""
import copy
from pathlib import Path

import pytest

from bengali_empathy.data.chat_format import ChatEncoder
from bengali_empathy.data.formats import DEFAULT_SYSTEM_PROMPT
from bengali_empathy.data.encode import EncodeOptions, fit_to_length
from bengali_empathy.data.tokenizer import read_chat_template, stop_token_ids
from bengali_empathy.errors import UserError

# SmolLM2-Instruct's template: ChatML, with a default system turn when a chat has none; texts are not trimmed.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Gemma's template (as Gemma 3 writes it, for text): no system role, so the system text and a blank line open
# the first user turn; the assistant is ``model``; roles must alternate from the user.
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}{%- else -%}"
    "{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)
from conftest import LONG_CONV, tokenized

META_LLAMA31_TEMPLATE = Path(__file__).parent / "templates" / "llama-3.1-instruct.jinja"

SENTENCES = [
    "আজ মনটা খুব ভারী লাগছে।", "কী হয়েছে, বলবেন? আমি শুনছি।", "চাকরিটা চলে গেল, কী করব বুঝতে পারছি না।",
    "এটা সত্যিই কঠিন সময়। আপনি একা নন।", "You are a kind assistant who answers in Bengali.",
    "I lost my job today and I feel alone.", "That sounds really hard. I am here to listen.",
]
SYSTEM = "আপনি একজন সহমর্মী সহকারী। Answer in Bengali."
CONVERSATION = [
    {"role": "user", "content": "আজ মনটা খুব ভারী লাগছে।"},
    {"role": "assistant", "content": "কী হয়েছে, বলবেন? আমি শুনছি।"},
    {"role": "user", "content": "চাকরিটা চলে গেল। I feel alone."},
    {"role": "assistant", "content": "এটা সত্যিই কঠিন সময়। You are not alone."},
    {"role": "user", "content": "ধন্যবাদ।"},
    {"role": "assistant", "content": "আমি আছি, যখন ইচ্ছে বলবেন।"},
]


def chatml_tokenizer():
    """A byte-level BPE trained on a few sentences, with ChatML's special tokens, no bos and the end of turn as its
    eos (as SmolLM2-Instruct's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(SENTENCES, trainers.BpeTrainer(
        vocab_size=600, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                  clean_up_tokenization_spaces=False)
    tok.chat_template = SMOLLM2_TEMPLATE
    return tok


def gemma_tokenizer(llama):
    """Llama 3's vocabulary with Gemma's turn tokens added and Gemma's template."""
    tok = copy.deepcopy(llama)
    tok.add_tokens(["<start_of_turn>", "<end_of_turn>"], special_tokens=True)
    tok.chat_template = GEMMA_TEMPLATE
    return tok


def meta_llama_tokenizer(llama):
    tok = copy.deepcopy(llama)
    tok.chat_template = read_chat_template(str(META_LLAMA31_TEMPLATE))
    return tok


FAMILIES = {"llama3.1": lambda llama: llama, "meta-llama3.1": meta_llama_tokenizer,
            "chatml": lambda llama: chatml_tokenizer(), "gemma": gemma_tokenizer}
END_OF_TURN = {"llama3.1": "<|eot_id|>", "meta-llama3.1": "<|eot_id|>", "chatml": "<|im_end|>",
               "gemma": "<end_of_turn>"}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tokenizer):
    tok = FAMILIES[request.param](tokenizer)
    return request.param, tok, ChatEncoder(tok)


def reference(tok, messages, generation_prompt=False):
    ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def with_system(system, turns):
    return ([{"role": "system", "content": system}] if system else []) + turns


@pytest.mark.parametrize("system", [SYSTEM, ""])
@pytest.mark.parametrize("n_turns", [2, 6])
def test_conversation_ids_equal_apply_chat_template(family, system, n_turns):
    name, tok, chat = family
    turns = CONVERSATION[:n_turns]
    ids, spans = chat.assemble(*chat.tokenized(system, turns))
    assert ids == reference(tok, with_system(system, turns))
    # the generation prompt of the final reply, with the history before it
    assert chat.prompt_ids(system, turns[:-1]) == reference(tok, with_system(system, turns[:-1]), True)
    chat.check(system, turns, "here")


@pytest.mark.parametrize("train_on", ["all_assistant", "last_assistant"])
def test_labels_cover_the_replies_and_their_end_of_turn_token(family, train_on):
    name, tok, chat = family
    opts = EncodeOptions(SYSTEM, 4096, "error", train_on, 0.0, 0.0, 0)
    enc = fit_to_length(chat, *chat.tokenized(SYSTEM, CONVERSATION), opts)
    trained = [tok.decode(enc.ids[s:e]) for s, e in enc.spans]
    replies = [t["content"] + END_OF_TURN[name] for t in CONVERSATION if t["role"] == "assistant"]
    assert trained == (replies if train_on == "all_assistant" else replies[-1:])
    assert enc.ids[:enc.prompt_len] == reference(tok, with_system(SYSTEM, CONVERSATION[:-1]), True)


def test_truncate_history_keeps_the_system_prompt(family):
    name, tok, chat = family
    last_exchange = reference(tok, with_system(SYSTEM, CONVERSATION[-2:]))
    opts = EncodeOptions(SYSTEM, len(last_exchange) + 2, "truncate_history", "all_assistant", 0.0, 0.0, 0)
    enc = fit_to_length(chat, *chat.tokenized(SYSTEM, CONVERSATION), opts)
    assert enc.status == "truncated" and enc.ids == last_exchange
    assert [tok.decode(enc.ids[s:e]) for s, e in enc.spans] == [CONVERSATION[-1]["content"] + END_OF_TURN[name]]


def test_stop_ids_end_the_turn_and_the_text(family):
    name, tok, chat = family
    stops = stop_token_ids(tok)
    assert stops[0] == chat.eot == tok.convert_tokens_to_ids(END_OF_TURN[name])
    assert tok.eos_token_id in stops
    assert stop_token_ids(tok, generation_eos=[7, chat.eot]) == stops + [7]


def test_llama_stop_ids_stay_llama_3s(tokenizer):
    assert stop_token_ids(tokenizer) == tokenizer.convert_tokens_to_ids(["<|eot_id|>", "<|eom_id|>",
                                                                         "<|end_of_text|>"])


def test_raw_text_is_bos_text_eos(family):
    name, tok, chat = family
    text = tok("আজ মনটা খুব ভারী।", add_special_tokens=False)["input_ids"]
    ids, spans = chat.assemble([], [("text", text)])
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    eos = tok.convert_tokens_to_ids("<|end_of_text|>" if name != "chatml" else "<|endoftext|>")
    assert ids == bos + text + [eos] and spans == [(len(bos), len(ids))]


def test_templates_that_trim_get_trimmed_texts(family):
    name, tok, chat = family
    padded = [{"role": t["role"], "content": f" {t['content']}\n"} for t in CONVERSATION[:2]]
    if name == "chatml":  # SmolLM2 keeps white space, so no conversation of stripped texts can differ
        assert not any(chat.trimmed.values())
    assert chat.prompt_ids(SYSTEM, padded[:1]) == reference(tok, with_system(SYSTEM, padded[:1]), True)


def test_meta_template_trains_as_the_embedded_one(tokenizer, chat):
    meta = ChatEncoder(meta_llama_tokenizer(tokenizer))
    assert meta.fast is not None  # the same vocabulary: tiktoken's speed path still applies
    assert meta.assemble(*meta.tokenized(SYSTEM, CONVERSATION)) == chat.assemble(*chat.tokenized(SYSTEM, CONVERSATION))


def llama_like(content_filter: str) -> str:
    """Llama 3's turns with ``content_filter`` applied to every message text."""
    return ("{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content']"
            + content_filter + " + '<|eot_id|>' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")


@pytest.mark.parametrize("template, message", [
    (None, "the tokenizer has no chat template"),
    ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}",
     "does not close an assistant reply with a special token"),
    (llama_like(" | replace(' ', '_')"), "changes system texts otherwise than trimming them"),
    (llama_like(" | upper"), "differs from apply_chat_template at token"),
])
def test_chat_encoder_refuses_a_template_it_cannot_assemble(tokenizer, template, message):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    with pytest.raises(UserError, match=message):
        ChatEncoder(tok)
    assert llama_like("") and ChatEncoder(tokenizer)  # the same tokenizer with a template it can assemble


def test_a_chat_template_is_read_as_text_or_from_a_file(tmp_path):
    assert read_chat_template(SMOLLM2_TEMPLATE) == SMOLLM2_TEMPLATE
    assert read_chat_template(str(META_LLAMA31_TEMPLATE)) == META_LLAMA31_TEMPLATE.read_text(encoding="utf-8")
    with pytest.raises(UserError, match="chat_template .*missing.jinja' is neither Jinja text nor a file"):
        read_chat_template(str(tmp_path / "missing.jinja"))


@pytest.mark.parametrize("turns", [
    LONG_CONV,
    [{"role": "user", "content": "?কেন এমন হলো\nবুঝি না"}, {"role": "assistant", "content": "Okay 123, চলুন  কথা বলি।"}],
    [{"role": "assistant", "content": "নমস্কার! কেমন আছেন?"}, {"role": "user", "content": "ভালো না।"},
     {"role": "assistant", "content": "শুনে খারাপ লাগল।"}],
])
def test_chat_encoder_equals_apply_chat_template(tokenizer, chat, turns):
    ids, spans = chat.assemble(*tokenized(chat, DEFAULT_SYSTEM_PROMPT, turns))
    ref = tokenizer.apply_chat_template([{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}] + turns, tokenize=True)
    assert ids == list(ref["input_ids"] if hasattr(ref, "keys") else ref)
    replies = [t["content"] for t in turns if t["role"] == "assistant"]
    assert [tokenizer.decode(ids[s:e]) for s, e in spans] == [r + "<|eot_id|>" for r in replies]
    chat.check(DEFAULT_SYSTEM_PROMPT, turns, "here")



def test_fast_tokenize_equals_the_tokenizer(tokenizer, chat):
    assert chat.fast is not None  # the embedded tokenizer is Meta's Llama-3 BPE
    texts = [t["content"] for t in LONG_CONV] + [DEFAULT_SYSTEM_PROMPT, "Okay 123,  চলুন\n\nকথা বলি।",
                                                  "লিখলাম <|eot_id|> আর <|start_header_id|>", " শুরুতে ফাঁকা"]
    assert chat.tokenize(texts) == [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def test_a_raw_text_starts_with_what_the_tokenizer_prepends_not_its_bos_token():
    """SmolLM2's tokenizer names <|im_start|> its bos but never prepends it: a raw text (continued pretraining) is
    its tokens and <|endoftext|>, not a ChatML turn opener before them."""
    from bengali_empathy.data.tokenizer import load_tokenizer
    from bengali_empathy.models.modeling import tokenizer_path_for

    tok = load_tokenizer(tokenizer_path_for("smollm2-135m-instruct"))
    assert tok.bos_token == "<|im_start|>"
    text = tok("আজ মনটা খুব ভারী।", add_special_tokens=False)["input_ids"]
    ids, spans = ChatEncoder(tok).assemble([], [("text", text)])
    assert ids == text + [tok.convert_tokens_to_ids("<|endoftext|>")] and spans == [(0, len(ids))]
