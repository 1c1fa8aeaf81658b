import contextlib
import io
import json
import logging
import os
import subprocess
import sys
import traceback
import types
from pathlib import Path
from unittest import mock

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Each pytest-xdist worker (and the interpreters it starts) computes on one core: two workers with
    # two threads each on a 2-core machine spend their time waiting for each other.
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
DEFAULT = ["--config", str(ROOT / "configs" / "default.yaml")]  # the README's main command's config


# On the command line limit_val_batches 1 is the float 1.0 (every batch), so 2 is the fewest whole batches.
QUICK = [*DEFAULT, "--trainer.limit_val_batches", "2", "--model.decoding.max_new_tokens", "4",
         "--data.predict.max_samples", "4"]


def tensorboard_events(vdir):
    """The TensorBoard scalars a run directory holds."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(next(vdir.glob("events.out.tfevents*"))))
    ea.Reload()
    return ea


# A six-turn Bengali conversation (grief), for chat-format, encoding and packing tests.
LONG_CONV = [
    {"role": "user", "content": "গত মাসে আমার বাবা মারা গেছেন। এখনো বিশ্বাস হয় না।"},
    {"role": "assistant", "content": "আপনার বাবার মৃত্যুর খবরে আমি গভীরভাবে দুঃখিত। এই শোক খুব ভারী।"},
    {"role": "user", "content": "রাতে ঘুম আসে না, সারাক্ষণ তাঁর কথা মনে পড়ে।"},
    {"role": "assistant", "content": "ঘুম না আসা শোকের খুব সাধারণ প্রতিক্রিয়া। তাঁর কোন স্মৃতিটা বেশি মনে পড়ে?"},
    {"role": "user", "content": "ছোটবেলায় উনি আমাকে নদীর ধারে হাঁটতে নিয়ে যেতেন।"},
    {"role": "assistant", "content": "কী সুন্দর স্মৃতি। সেই হাঁটাগুলো আপনাদের ভালোবাসার চিহ্ন হয়ে থাকবে।"},
]


def tokenized(chat, system, turns):
    """(system ids, [(role, ids)]) of a conversation, as :meth:`ChatEncoder.assemble` takes it."""
    texts = chat.tokenize([system] + [t["content"] for t in turns])
    return texts[0], [(t["role"], x) for t, x in zip(turns, texts[1:])]


def write_jsonl(path, rows) -> str:
    """``rows`` as a JSONL corpus at ``path``; its path as a corpus_path takes it."""
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def conversations(path, **kwargs):
    """Every row of a corpus as (system, turns), through the same format detection as the data module."""
    from bengali_empathy.data.files import corpus_files, load_file
    from bengali_empathy.data.formats import CorpusFormat

    out = []
    for f in corpus_files(str(path)):
        ds = load_file(f, streaming=False)
        fmt = CorpusFormat(ds.column_names, str(f), **kwargs)
        out += [fmt.conversation(row, f"{f}: row {i + 1}") for i, row in enumerate(ds)]
    return out


@pytest.fixture(scope="session")
def tokenizer():
    from bengali_empathy.data.tokenizer import load_tokenizer

    return load_tokenizer(None)


@pytest.fixture(scope="session")
def tiny_model_path():
    from bengali_empathy.models.modeling import tiny_model_dir

    return tiny_model_dir()


@pytest.fixture(scope="session")
def tiny_lora(tiny_model_path):
    """(backend, model, tokenizer) for the tiny model through the hf backend, fp32 on CPU."""
    from bengali_empathy.models.backends import HFPeftBackend, LoraSettings

    backend = HFPeftBackend(load_in_4bit=False, gradient_checkpointing=False)
    model, tok = backend.load(tiny_model_path, 768, LoraSettings(), None)
    return backend, model, tok


def trained_tiny_lora(tiny_model_path, max_seq_length, modules_to_save=()):
    """(backend, model in eval mode, tokenizer): the tiny model (hf backend, fp32) with a LoRA whose B is not
    zero, and any ``modules_to_save`` moved off their base weights too, so tuned and base models differ."""
    from bengali_empathy.models.backends import HFPeftBackend, LoraSettings

    backend = HFPeftBackend(load_in_4bit=False, gradient_checkpointing=False)
    model, tok = backend.load(tiny_model_path, max_seq_length, LoraSettings(modules_to_save=modules_to_save), None)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return backend, model.eval(), tok


# Architectures other than Llama (model type -> LoRA targets, configuration), tiny and random (:func:`tiny_lora_of`).
OTHER_ARCHITECTURES = {"mistral": (("q_proj", "k_proj", "v_proj", "o_proj"), {"num_key_value_heads": 2}),
                       "gpt_neox": (("query_key_value", "dense"), {})}


def tiny_lora_of(model_type, tokenizer):
    """A tiny random model of an :data:`OTHER_ARCHITECTURES` type for ``tokenizer`` (the embedded one), fp32, in
    eval mode, with a LoRA (the hf backend's peft config) whose B is not zero."""
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from bengali_empathy.models.lora import LoraSettings

    targets, arch = OTHER_ARCHITECTURES[model_type]
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **arch)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_config(config), LoraSettings(target_modules=targets).to_peft())
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


@pytest.fixture(scope="session")
def chat(tokenizer):
    from bengali_empathy.data import ChatEncoder

    return ChatEncoder(tokenizer)


def encode_pairs(tokenizer, pairs, system=None):
    """Encoded examples (as the data module stores them) of single-exchange (prompt, reply) pairs."""
    from bengali_empathy.data import DEFAULT_SYSTEM_PROMPT, ChatEncoder

    chat = ChatEncoder(tokenizer)
    out = []
    for i, (p, r) in enumerate(pairs):
        sys_ids, p_ids, r_ids = chat.tokenize([system or DEFAULT_SYSTEM_PROMPT, p, r])
        ids, spans = chat.assemble(sys_ids, [("user", p_ids), ("assistant", r_ids)])
        out.append({"input_ids": ids, "label_spans": [x for s in spans for x in s], "prompt_len": spans[-1][0],
                    "file": "pairs.jsonl", "line": i + 1, "id": str(i), "prompt": p, "reference": r,
                    "category": None})
    return out


def packable_examples(tokenizer) -> list[dict]:
    """Three encoded conversations (two one-turn pairs and a long multi-turn one) to pack."""
    from bengali_empathy.data import DEFAULT_SYSTEM_PROMPT, ChatEncoder

    chat = ChatEncoder(tokenizer)
    exs = [{k: e[k] for k in ("input_ids", "label_spans")} for e in encode_pairs(tokenizer, TWO_PAIRS)]
    ids, spans = chat.assemble(*tokenized(chat, DEFAULT_SYSTEM_PROMPT, LONG_CONV))
    return exs + [{"input_ids": ids, "label_spans": [x for s in spans for x in s]}]


def packed_and_single_batches(tokenizer, exs: list[dict]) -> tuple[dict, list[dict]]:
    """``exs`` as one batch of two packed rows (the second padded) and as one batch per conversation."""
    from bengali_empathy.data import Collator, pack_examples

    collate = Collator(tokenizer.pad_token_id)
    return collate([pack_examples(exs[:2]), pack_examples(exs[2:])]), [collate([e]) for e in exs]


def packed_and_weighted_loss(backend, model, packed: dict, singles: list[dict]) -> tuple:
    """The packed batch's loss and reply-token count, and the per-conversation losses' token-weighted mean
    and total count (eval mode, no gradients)."""
    model.eval()
    with torch.no_grad():
        lp, n_p = backend.loss(model, packed)
        losses = [backend.loss(model, b) for b in singles]
    n = sum(int(c) for _, c in losses)
    return lp, n_p, sum(float(l) * int(c) for l, c in losses) / n, n


def segment_sdpa(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale, window_size, seqused_k):
    """A stand-in for the CUDA varlen kernel (``varlen._flash_kernel``): the module's own per-segment SDPA
    reference; counts its calls."""
    from bengali_empathy.models.varlen import segment_attention

    segment_sdpa.calls += 1
    return segment_attention(query, key, value, cu_seq_q, cu_seq_k, scale, window_size, seqused_k)


@pytest.fixture
def stand_in_kernel(monkeypatch):
    """The varlen path on the CPU: :func:`segment_sdpa` as the kernel, available on every device."""
    from bengali_empathy.generation import decoder
    from bengali_empathy.models import varlen

    segment_sdpa.calls = 0
    monkeypatch.setattr(varlen, "_flash_kernel", segment_sdpa)
    for user in (varlen, decoder):  # the modules that ask (packed forwards, generation's decoding steps)
        monkeypatch.setattr(user, "varlen_available", lambda device, dtype, decoding=False: True)
    return segment_sdpa


@pytest.fixture
def stand_in_fused_kernels(monkeypatch):
    """Liger's fused kernels (models/fused.py) on the CPU: stand-ins that compute RMSNorm, the rotary embedding
    and SiLU-times-up as written out here, available on every device; ``.calls`` counts each one's calls."""
    import collections

    import torch.nn.functional as F

    from bengali_empathy.models import fused

    calls = collections.Counter()

    def rms_norm(x, weight, eps):
        calls["rms_norm"] += 1
        x32 = x.float()
        return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    def rotary(q, k, cos, sin):
        calls["rotary"] += 1
        half = q.shape[-1] // 2
        turned = [torch.cat((-x[..., half:], x[..., :half]), -1) for x in (q, k)]
        return tuple(x * cos[:, None] + t * sin[:, None] for x, t in zip((q, k), turned))

    def silu_mul(gate, up):
        calls["silu_mul"] += 1
        return F.silu(gate) * up

    for name, stand_in in (("rms_norm", rms_norm), ("rotary", rotary), ("silu_mul", silu_mul)):
        monkeypatch.setattr(fused, name, stand_in)
    monkeypatch.setattr(fused, "fused_available", lambda device, config: True)
    return types.SimpleNamespace(calls=calls)


def two_pair_batch(tokenizer, device="cpu"):
    """The collated batch of :data:`TWO_PAIRS` (tensors on ``device``)."""
    from bengali_empathy.data import Collator

    batch = Collator(tokenizer.pad_token_id)(encode_pairs(tokenizer, TWO_PAIRS))
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


TWO_PAIRS = [("আমি একা।", "আমি আছি, বলুন কী হয়েছে।"), ("আজ খুব ভয় লাগছে, কী করব?", "ভয় পাওয়া স্বাভাবিক, আমি শুনছি।")]

# 77 DailyDialog-bn conversations (CC BY-NC-SA 4.0; tests/fixtures/dailydialog_bn/README.md says what and whence)
DAILYDIALOG = ROOT / "tests" / "fixtures" / "dailydialog_bn" / "conversations.jsonl"


def dailydialog_turn_rows(path):
    """Write the DailyDialog-bn slice as one row per turn, as the sample's dialogues.jsonl has it (``id``,
    ``dialogue_id``, ``turn``, ``prompt`` = the turn before, ``response``, ``history`` = every turn before),
    to ``path``; return the number of dialogues."""
    out = []
    conversations = [json.loads(line) for line in DAILYDIALOG.read_text(encoding="utf-8").splitlines()]
    for c in conversations:
        turns = [m["content"] for m in c["messages"]]
        out += [{"id": f"{c['id']}-t{i:02d}", "dialogue_id": c["id"], "turn": i, "prompt": turns[i - 1],
                 "response": turns[i], "history": turns[:i]} for i in range(1, len(turns))]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out), encoding="utf-8")
    return len(conversations)


def run_cli(args, cwd, stdin=None):
    """``python -m bengali_empathy ARGS`` run in this process (as torchtune and litgpt test their recipes).

    ``cli.main(args)`` runs with ``cwd`` as the working directory and ``stdin`` as standard input; what
    it prints to stdout/stderr (also through logging handlers, which keep the stream they were made
    with) is captured. An exception that escapes ``main`` is exit status 1 with its traceback in stderr,
    as the interpreter would have it. The working directory, environment, torch's default dtype and
    thread count and the logging streams are restored afterwards.
    """
    from bengali_empathy.cli import main

    args = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    saved = (os.getcwd(), dict(os.environ), torch.get_default_dtype(), torch.get_num_threads())
    handlers = _stream_handlers()
    try:
        os.chdir(cwd)
        for handler in handlers:
            _point(handler, err)
        with (contextlib.redirect_stdout(out), contextlib.redirect_stderr(err),
              mock.patch.object(sys, "stdin", io.StringIO(stdin or "")),
              mock.patch.object(sys, "argv", ["bengali_empathy"])):  # the arguments are main's, not pytest's
            try:
                code = main(args)
            except SystemExit as exc:  # --help, --print_config: 0; sys.exit("message"): printed, status 1
                if isinstance(exc.code, str):
                    print(exc.code, file=sys.stderr)
                code = 1 if isinstance(exc.code, str) else exc.code or 0
            except Exception:  # what the interpreter does with an uncaught exception
                traceback.print_exc(file=sys.stderr)
                code = 1
    finally:
        for handler, stream in handlers.items():
            _point(handler, sys.stderr if getattr(stream, "closed", False) else stream)
        os.chdir(saved[0])
        os.environ.clear()
        os.environ.update(saved[1])
        torch.set_default_dtype(saved[2])
        torch.set_num_threads(saved[3])
    return subprocess.CompletedProcess(["bengali_empathy", *args], code, out.getvalue(), err.getvalue())


def _point(handler: logging.StreamHandler, stream) -> None:
    """Point ``handler`` at ``stream``. A handler made while an earlier test captured output (capsys) may hold
    that test's stream, closed since: setStream would flush it and fail, so it is replaced as it is."""
    if getattr(handler.stream, "closed", False):
        handler.stream = stream
    else:
        handler.setStream(stream)


def _stream_handlers() -> dict:
    """Every logging handler that writes to a console stream, with that stream."""
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    return {h: h.stream for lg in loggers for h in lg.handlers
            if type(h) is logging.StreamHandler and h.stream is not None}


def run_module(args, cwd, timeout=600, stdin=None):
    """``python -m bengali_empathy ARGS`` in a new interpreter (the entry point itself; DDP launches)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)  # this checkout's code
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=path)
    return subprocess.run([sys.executable, "-m", "bengali_empathy", *map(str, args)], cwd=cwd, env=env,
                          input=stdin, capture_output=True, text=True, timeout=timeout)


def _shared_fit(tmp_path_factory, name: str, args: list) -> tuple:
    """``python -m bengali_empathy fit ARGS`` once per test session (once for all pytest-xdist workers):
    (its working directory, its run directory, the run)."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by the workers of this session
    cwd, result = root / name, root / f"{name}.json"
    with FileLock(str(root / f"{name}.lock")):
        if result.is_file():
            r = subprocess.CompletedProcess(**json.loads(result.read_text(encoding="utf-8")))
        else:
            cwd.mkdir()
            r = run_cli(["fit", *args], cwd=cwd)
            result.write_text(json.dumps({"args": r.args, "returncode": r.returncode, "stdout": r.stdout,
                                          "stderr": r.stderr}), encoding="utf-8")
    assert r.returncode == 0, r.stderr[-3000:]
    return cwd, cwd / "lightning_logs" / "version_0", r


@pytest.fixture(scope="session")
def default_fit(tmp_path_factory):
    """``python -m bengali_empathy fit --config configs/default.yaml``, exactly as README runs it, once per
    test session: (its working directory, its run directory, the run).

    Tests read what it wrote and may run further commands on its adapter; only the report test adds runs
    beside it (a test run in the same lightning_logs, as a user would).
    """
    return _shared_fit(tmp_path_factory, "default_fit", DEFAULT)


# configs/smollm2_bn.yaml cut to 3 steps of 2 conversations of at most 512 tokens (every sample conversation is
# longer: the oldest exchanges dropped): a real model's adapter, its validation replies and scores in about a minute
# on one core.
SMOLLM2 = ["--config", str(ROOT / "configs" / "smollm2_bn.yaml"), "--trainer.max_steps", "3",
           "--trainer.val_check_interval", "3", "--data.max_seq_length", "512",
           "--data.encoding.on_too_long", "truncate_history", "--data.eval_batch_size", "2",
           "--model.decoding.max_new_tokens", "8", "--model.generation.log_samples", "2",
           "--data.predict.max_samples", "4"]


@pytest.fixture(scope="session")
def smollm2_fit(tmp_path_factory):
    """The real model (SmolLM2-135M-Instruct, ChatML) fitted once per test session with :data:`SMOLLM2`:
    (its working directory, its run directory, the run). Its readers run further commands on its adapter."""
    return _shared_fit(tmp_path_factory, "smollm2_fit", SMOLLM2)


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# Module fixtures that run a fit (tens of seconds): their tests share one pytest-xdist worker.
FIT_FIXTURES = {"dpo_fit", "fitted", "pretrain_fit"}


def pytest_configure(config):
    # pytest-xdist's --dist loadgroup hands out work units (a group, or one test) in the order
    # pytest_collection_modifyitems below leaves them, instead of the biggest groups first: the
    # groups that read the default fit would otherwise all start at once, one worker computing the fit
    # and the other waiting for it.
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups; after pytest-randomly's shuffle
def pytest_collection_modifyitems(items):
    """Group and order the tests for two pytest-xdist workers (longest first, with the default fit's readers
    after the fit); the order within each class is the collection's (or pytest-randomly's).

    1. the tests of tests/scenarios/test_readme_run.py (each reads the shared default fit): one group, on the
       worker that computes the fit;
    2. the tests of the real model's shared fit (one group per module), slow tests that need no default fit
       (two-process DDP, the DailyDialog fit, ...) and the tests of a module fixture's fit (one group each): the
       other worker starts on these while the default fit runs;
    3. the other modules' tests that read the default fit, one group per module (a module's fixtures
       over the fit -- the web server, the GGUF exports -- are built once, on one worker), by the time
       they start the fit is there;
    4. the rest.
    """
    def rank(item):
        names = getattr(item, "fixturenames", ())
        shared = [f for f in ("default_fit", "smollm2_fit") if f in names]
        if shared:
            module = Path(str(item.fspath)).stem
            item.add_marker(pytest.mark.xdist_group(f"{shared[0]}_{module}"))
            if module == "test_readme_run":
                return 0
            return 1 if shared[0] == "smollm2_fit" else 2
        fits = sorted(FIT_FIXTURES.intersection(names))
        if fits:  # the tests that read one module fixture's fit, together: it runs once
            item.add_marker(pytest.mark.xdist_group(fits[0]))
        return 1 if fits or item.get_closest_marker("slow") else 3

    items.sort(key=rank)  # stable
