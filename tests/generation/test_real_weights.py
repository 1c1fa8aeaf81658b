"""SmolLM2-135M-Instruct's real weights (fp32 on CPU) through generation and the validation loss: the fast engines'
greedy replies, the merged copy's logits, the memory plan's sizes and the held-out loss, each against an
independent computation. A Llama with 9 query and 3 key/value heads and tied embeddings: not the shapes of the
tiny model (4 and 2 heads, its own head) that the other generation tests run on.

SmolLM2 is loaded once for the module (as training loads it: hf backend, LoRA r16 on q,k,v,o); its LoRA B is set
to small random values, so the tuned model is not its base. The module took 85 s on a shared 2-core x86 CPU with
one thread, 56 s of it the engines' test.
"""
import json
from pathlib import Path

import pytest
import torch

from bengali_empathy.data import DEFAULT_SYSTEM_PROMPT, ChatEncoder, EmpatheticDialogueDataModule
from bengali_empathy.data.tokenizer import stop_token_ids
from bengali_empathy.generation.decoding import Decoding
from bengali_empathy.generation.engines import make_engine
from bengali_empathy.models.backends import HFPeftBackend
from bengali_empathy.models.loading import load_lora_model
from bengali_empathy.models.lora import LoraSettings
from bengali_empathy.models.modeling import resolve_model_path

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m-instruct"

# Short turns and a short system prompt: the default Bengali one is 247 SmolLM2 tokens (byte-level BPE spends
# about ten tokens on a Bengali word), and three engines prefilling 32 such prompts would take minutes on one core.
SYSTEM = "You are a kind listener."
USER = ["আমি খুব একা।", "আজ মনটা ভারী।", "ভয় লাগছে।", "ঘুম আসে না।", "মন খারাপ।", "কেউ বোঝে না।",
        "মা অসুস্থ।", "চাকরি নেই।", "বন্ধু রাগ করেছে।", "খুব ক্লান্ত।", "কান্না পাচ্ছে।", "বাড়ির কথা মনে পড়ে।",
        "একা লাগে।", "সব শেষ মনে হয়।", "আজ ভালো লাগছে না।", "একটু কথা বলবেন?",
        "I lost my job today.", "My sister hasn't called in weeks.", "I failed my exam.", "Can you help me calm down?",
        "I feel tired all the time.", "Nobody listens to me.", "My dog died last night.", "I worry about money.",
        "I had a fight with my dad.", "I miss home.", "Work is too much.", "I can't sleep.", "I feel so alone.",
        "My friend moved away.", "I'm scared of the interview.", "Is it normal to feel numb?"]
ASSISTANT = ["I'm here. What happened?", "বলুন।", "Tell me more.", "কেন?", "How long has it felt this way?"]
TURNS = [1, 1, 3, 1, 5, 1, 3, 1]  # per conversation, cycled: 1 to 5 turns, ending with the user's


def conversations() -> list[list[dict]]:
    """32 conversations of 1 to 5 turns: the last is ``USER[i]`` (every one different), earlier user turns are
    English (Bengali ones would make prompts of 150 tokens)."""
    out = []
    for i in range(32):
        turns = TURNS[i % len(TURNS)]
        out.append([{"role": "user", "content": USER[16 + (i + 3 * k) % 16] if k < turns - 1 else USER[i]}
                    if k % 2 == 0 else {"role": "assistant", "content": ASSISTANT[(i + k) % len(ASSISTANT)]}
                    for k in range(turns)])
    return out


@pytest.fixture(scope="module")
def smollm2():
    """(backend, model in eval mode, tokenizer): SmolLM2 with a LoRA whose B is small and random."""
    backend = HFPeftBackend(load_in_4bit=False, gradient_checkpointing=False)
    model, tok = load_lora_model(backend, MODEL, 1024, LoraSettings())
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.01)
    return backend, model.eval(), tok


def _replies(new: torch.Tensor, stop: list[int]) -> list[list[int]]:
    """Each row's new token ids up to and including its first stop token (what follows is padding)."""
    out = []
    for row in new.tolist():
        end = next((k for k, t in enumerate(row) if t in stop), len(row) - 1)
        out.append(row[:end + 1])
    return out


def test_the_fast_engines_reply_as_the_eager_engine_token_for_token(smollm2):
    """32 chat prompts in one batch, 32 new tokens: the static engine (sliced prefill, grouped-query decoding
    attention over 3 key/value heads of 3 query heads each) and the compiled one (its own decoding loop; no
    CUDA graph on the CPU, and no torch.compile anywhere) give the eager engine's token ids exactly: real logits
    are peaked, no near-ties. Measured: 998 tokens of at most 1,024 (rows stop), all equal; eager 19 s,
    static 17 s, compiled 18 s (each about half prefill)."""
    _, model, tok = smollm2
    chat = ChatEncoder(tok)
    prompts = sorted((chat.prompt_ids(SYSTEM, turns) for turns in conversations()), key=len, reverse=True)
    stop = stop_token_ids(tok, model.generation_config.eos_token_id)
    decoding = Decoding(max_new_tokens=32)
    replies = {}
    for name in ("eager", "static", "compiled"):
        engine = make_engine(name, model, stop, tok.pad_token_id)
        assert engine.name == name  # a Llama: no fallback
        with engine.prepared():
            replies[name] = _replies(engine(prompts, len(prompts[0]), decoding), stop)
    want = replies["eager"]
    assert len(prompts[0]) > 2 * len(prompts[-1])  # mixed lengths: the short rows are mostly left padding
    assert sum(map(len, want)) > 24 * 32 and any(len(r) < 32 for r in want)  # long replies, and rows that stop
    assert replies["static"] == want
    assert replies["compiled"] == want


def test_the_merged_copy_has_the_adapter_models_logits(smollm2):
    """LoRA folded into the weights of a model whose output head is its input embedding: the copy's logits are
    the adapter model's (fp32), its head is still its embedding, and its size is what the plan counts.

    Measured: 8.5e-5 at most, on logits of up to 44. That is fp32 rounding with little room: SmolLM2's hidden
    states reach 25,000 from the 12th layer (a float32 step of 0.002 there), and a float64 copy is 6e-5 from
    either float32 model; with the adapter disabled the copy's logits are the model's bit for bit."""
    from bengali_empathy.generation.decoder import left_padded
    from bengali_empathy.generation.merged import merged_bytes, merged_copy

    _, model, tok = smollm2
    chat = ChatEncoder(tok)
    prompts = sorted((chat.prompt_ids(SYSTEM, turns) for turns in conversations()[:4]), key=len, reverse=True)
    ids, mask = left_padded(prompts, len(prompts[0]), tok.pad_token_id)
    real = mask.bool()  # padding positions compute nothing that is used
    with torch.no_grad():
        tuned = model(input_ids=ids, attention_mask=mask).logits[real]
        with model.disable_adapter():
            base = model(input_ids=ids, attention_mask=mask).logits[real]
        copy = merged_copy(model, torch.float32)
        merged = copy(input_ids=ids, attention_mask=mask).logits[real]
    assert (tuned - base).abs().max() > 0.1  # the adapter changes the function
    assert copy.get_output_embeddings().weight is copy.get_input_embeddings().weight
    assert (merged - tuned).abs().max() < 1e-4
    assert merged_bytes(model, torch.float32) == 4 * sum(p.numel() for p in copy.parameters())


def test_the_memory_plan_counts_smollm2s_weights_and_kv_cache(smollm2):
    """The plan's sizes from the configuration (tied embeddings counted once, head width 64 of 9 heads, 3 of
    them for keys and values) equal the tensors' own."""
    from bengali_empathy.generation.decoder import DecodeStep
    from bengali_empathy.generation.generator import kv_bytes_per_token
    from bengali_empathy.models.memory import GIB, weights_gib

    _, model, _ = smollm2
    base = model.get_base_model()
    base_params = sum(p.numel() for p in base.parameters()) - sum(
        p.numel() for n, p in base.named_parameters() if "lora_" in n)
    assert round(weights_gib(resolve_model_path(MODEL), quantized=False) * GIB) == 2 * base_params  # 16-bit
    step = DecodeStep(model, rows=3, cache_len=256)  # fp32 cache, as the model computes
    cache = sum(t.numel() * t.element_size() for layer in step.cache.layers for t in (layer.keys, layer.values))
    assert cache == 3 * 256 * kv_bytes_per_token(model.config, dtype_bytes=4)


def test_the_held_out_loss_is_transformers_own(smollm2):
    """The base model's loss on the data module's first validation batch (its encoded rows and label masks,
    through the backend's loss, as validation computes it) = transformers' cross-entropy of the same
    conversations rendered by ``apply_chat_template``, labelled by hand: each assistant reply and its
    <|im_end|>. Measured: 823 reply tokens in both, 1.4793 nats, a relative difference of 1e-8."""
    backend, model, tok = smollm2
    data = EmpatheticDialogueDataModule(tokenizer_path=str(resolve_model_path(MODEL)), max_seq_length=1024,
                                        eval_batch_size=2)
    data.setup("validate")
    batch = next(iter(data.val_dataloader()))
    header = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    end = tok.convert_tokens_to_ids("<|im_end|>")
    nll, tokens = 0.0, 0
    with torch.no_grad(), model.disable_adapter():
        loss, n = backend.loss(model, batch)
        for k, row in enumerate(batch["eval_rows"]):
            line = Path(row.file).read_text(encoding="utf-8").splitlines()[row.line - 1]
            messages = [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}] + json.loads(line)["messages"]
            ids = tok.apply_chat_template(messages, tokenize=True)
            ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
            assert batch["input_ids"][k, :len(ids)].tolist() == ids
            labels = [-100] * len(ids)
            for start in (i + len(header) for i in range(len(ids)) if ids[i:i + len(header)] == header):
                stop = ids.index(end, start) + 1
                labels[start:stop] = ids[start:stop]
            out = model.get_base_model()(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]))
            reply_tokens = sum(t != -100 for t in labels)
            nll += float(out.loss) * reply_tokens
            tokens += reply_tokens
    assert len(batch["eval_rows"]) == 2 and int(n) == tokens
    assert abs(float(loss) - nll / tokens) <= 0.005 * nll / tokens
