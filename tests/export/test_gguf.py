"""`export --format gguf`, checked by llama.cpp itself (llama-cpp-python) against the Hugging Face merged model.

The README's default fit's adapter is exported once per quant (f16, q8_0, q4_k_m). llama.cpp must load each, tokenise
a Bengali chat built from the file's own template to the training tokens and give next-token logits close to the
merged transformers model's; the f16 file's greedy reply must be transformers' and transformers' GGUF reader must get
the same weights back. The Ollama Modelfile's Go template is rendered by Go's text/template where Go is installed.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import TWO_PAIRS, encode_pairs, run_cli

gguf = pytest.importorskip("gguf", reason="the gguf extra is not installed (pip install -e '.[gguf]')")
pytest.importorskip("llama_cpp", reason="the gguf extra is not installed (pip install -e '.[gguf]')")

pytestmark = pytest.mark.slow
QUANTS = ("f16", "q8_0", "q4_k_m")
# Next-token logits of llama.cpp against transformers (float32 merge) after both TWO_PAIRS prompts. Measured on the
# default fit (2-core x86 CPU): cosine f16 1.00000, q8_0 1.00000, q4_k_m 0.99998, argmax equal for all three. The
# tiny model's q4_k_m is Q5_0/Q8_0 by llama.cpp's fallback (see below) and its logits come mostly from the trained
# lm_head (Q8_0), so these bounds say nothing of Q4_K on the 8B model; they leave room for other CPUs' kernels.
MIN_COSINE = {"f16": 0.999, "q8_0": 0.9995, "q4_k_m": 0.999}


def _adapter(default_fit):
    return default_fit[1] / "adapter"


@pytest.fixture(scope="module")
def exports(default_fit, tmp_path_factory):
    """{quant: (export directory, the CLI run)} for the default fit's adapter, merged in float32."""
    root = tmp_path_factory.mktemp("gguf")
    done = {}
    for quant in QUANTS:
        r = run_cli(["export", "--adapter", _adapter(default_fit), "--output", root / quant, "--format", "gguf",
                     "--quant", quant, "--dtype", "float32"], cwd=root)
        assert r.returncode == 0, r.stderr[-3000:]
        done[quant] = (root / quant, r)
    return done


@pytest.fixture(scope="module")
def merged(default_fit):
    """(the adapter merged into the base by transformers + peft in float32, the adapter's tokenizer, its settings)."""
    from bengali_empathy.models.checkpoints import read_info
    from bengali_empathy.export.hf import merged_model
    from bengali_empathy.data.tokenizer import load_tokenizer

    model, _ = merged_model(_adapter(default_fit), dtype="float32")
    return model.eval(), load_tokenizer(_adapter(default_fit)), read_info(_adapter(default_fit))


def _llama(path, n_ctx=256, **kw):
    from llama_cpp import Llama

    return Llama(str(path), n_ctx=n_ctx, n_threads=1, verbose=False, seed=0, **kw)


def _gguf_file(exports, quant):
    directory = exports[quant][0]
    return directory / f"model-{quant}.gguf"


def _prompts(tokenizer, system):
    """Generation prompts as training encodes them: (messages, ids) of both TWO_PAIRS exchanges."""
    out = []
    for (p, r), ex in zip(TWO_PAIRS, encode_pairs(tokenizer, TWO_PAIRS, system)):
        out.append(([{"role": "system", "content": system}, {"role": "user", "content": p}],
                    ex["input_ids"][: ex["prompt_len"]]))
    return out


def _template_tokens(llm, messages):
    """What llama-cpp-python's chat completion feeds llama.cpp: the GGUF's own template, rendered and tokenised."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    bos = llm.detokenize([llm.token_bos()], special=True).decode()
    eos = llm.detokenize([llm.token_eos()], special=True).decode()
    prompt = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], eos_token=eos, bos_token=bos)(
        messages=messages).prompt
    return llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)


@pytest.mark.parametrize("quant", QUANTS)
def test_llama_cpp_loads_each_export_and_prompts_as_training(exports, merged, quant):
    _, tokenizer, info = merged
    r = exports[quant][1]
    assert f"GGUF written to {exports[quant][0] / f'model-{quant}.gguf'}" in r.stdout
    llm = _llama(_gguf_file(exports, quant))
    assert llm.metadata["tokenizer.ggml.pre"] == "llama-bpe" and llm.metadata["general.architecture"] == "llama"
    assert llm.metadata["bengali_empathy.system_prompt"] == info.system_prompt
    assert llm.metadata["bengali_empathy.max_seq_length"] == "768"
    assert llm.metadata["tokenizer.chat_template"] == info.chat_template
    assert (llm.token_bos(), llm.token_eos(), int(llm.metadata["tokenizer.ggml.eot_token_id"]),
            int(llm.metadata["tokenizer.ggml.padding_token_id"])) == (128000, 128009, 128009, 128004)
    for messages, trained in _prompts(tokenizer, info.system_prompt):
        assert _template_tokens(llm, messages) == trained


def test_quantized_tensor_types_follow_llama_cpps_fallback(exports, merged):
    """The tiny model's rows (64 and 172 weights) do not fit k-quant blocks of 256: llama.cpp falls back per
    tensor (Q4_K -> Q5_0, Q6_K -> Q8_0: blocks of 32), and to F16 where 32 does not divide the row (the 172-wide
    ffn_down); q8_0 falls back to F16 for ffn_down only. The 8B model's rows (4096, 14336) take the k-quants.
    The CLI reports the tensor types llama.cpp's loader counts."""
    model = merged[0]
    shapes = [p.shape for p in model.parameters()]
    vectors = sum(len(s) == 1 for s in shapes) + 1  # the norms, and rope_freqs
    odd = sum(len(s) == 2 and s[1] % 32 != 0 for s in shapes)
    fits = len(shapes) - vectors + 1 - odd

    def reported(quant):
        line = exports[quant][1].stdout
        return {k: int(v) for k, v in (x.split() for x in line.split("tensors ", 1)[1].split(";")[0].split(")")[0]
                                       .split(", "))}

    assert (vectors, odd) == (6, 2)
    assert reported("f16") == {"f32": vectors, "f16": len(shapes) - vectors + 1}
    assert reported("q8_0") == {"f32": vectors, "f16": odd, "q8_0": fits}
    q4 = reported("q4_k_m")
    assert q4.pop("f32") == vectors and q4.pop("f16") == odd
    assert set(q4) <= {"q5_0", "q8_0"} and sum(q4.values()) == fits
    assert "of 22 tensors fell back to another type" in exports["q4_k_m"][1].stdout


@pytest.mark.parametrize("quant", QUANTS)
def test_next_token_logits_agree_with_transformers(exports, merged, quant):
    model, tokenizer, info = merged
    llm = _llama(_gguf_file(exports, quant), logits_all=True)
    for _, ids in _prompts(tokenizer, info.system_prompt):
        cos, ours, ref = next_token_agreement(llm, model, ids)
        print(f"{quant}: cosine {cos:.5f}, argmax {ours} vs {ref}")
        assert cos >= MIN_COSINE[quant]
        if quant == "f16":
            assert ours == ref


def next_token_agreement(llm, model, ids) -> tuple[float, int, int]:
    """(cosine of llama.cpp's next-token logits after ``ids`` with transformers', llama.cpp's argmax, theirs);
    llama.cpp's cache holds ``ids`` afterwards."""
    llm.reset()
    llm.eval(ids)
    ours = torch.tensor(llm.scores[len(ids) - 1])
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0, -1]
    return torch.nn.functional.cosine_similarity(ours, ref, dim=0).item(), ours.argmax().item(), ref.argmax().item()


def test_f16_greedy_reply_is_transformers_reply(exports, merged):
    model, tokenizer, info = merged
    llm = _llama(_gguf_file(exports, "f16"))
    from bengali_empathy.data.tokenizer import stop_token_ids

    for messages, ids in _prompts(tokenizer, info.system_prompt)[:1]:
        with torch.no_grad():
            ref = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False,
                                 eos_token_id=stop_token_ids(tokenizer), pad_token_id=tokenizer.pad_token_id)
        ref = ref[0, len(ids):].tolist()
        ours = []
        for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0):
            ours.append(token)
            if token in stop_token_ids(tokenizer) or len(ours) == 16:
                break
        assert ours == ref
        # The user-facing path: chat completion from the file's template, stopped by the file's stop tokens.
        reply = llm.create_chat_completion(messages, temperature=0.0, max_tokens=16)["choices"][0]["message"]
        assert reply["content"] == tokenizer.decode([t for t in ref if t not in stop_token_ids(tokenizer)])
    # The tiny model never ends a reply within 16 tokens: pushed to each stop token, llama.cpp ends the reply there.
    for stop in stop_token_ids(tokenizer):
        choice = llm.create_chat_completion(messages, temperature=0.0, max_tokens=16,
                                            logit_bias={str(stop): 100.0})["choices"][0]
        assert (choice["message"]["content"], choice["finish_reason"]) == ("", "stop"), stop


def test_transformers_reads_the_f16_file_back(exports, merged):
    from transformers import AutoModelForCausalLM

    model = merged[0]
    # config= skips a second parse of the file (GGUFReader reads Llama 3's 128,256 tokens and 280,147 merges in
    # Python, ~10 s a pass); the weights' loader still reads the heads for its inverse q/k permutation from the file.
    back = AutoModelForCausalLM.from_pretrained(str(exports["f16"][0]), gguf_file="model-f16.gguf",
                                                config=model.config, dtype=torch.float32)
    ours, theirs = model.state_dict(), back.state_dict()
    assert set(ours) == set(theirs)
    for k, v in ours.items():
        expected = v if v.ndim == 1 else v.to(torch.float16).to(torch.float32)
        assert torch.equal(theirs[k], expected), k


def test_a_wrong_template_or_eos_fails_the_checks(exports, merged, tmp_path):
    """llama-cpp-python's stock Llama 3 template (without the knowledge-cutoff lines this model was trained
    with) gives other tokens than training; the check export runs before keeping a file refuses a base model's
    eos (<|end_of_text|>) in place of <|eot_id|>, the stop token llama-cpp-python's chat handler stops at."""
    from llama_cpp.llama_chat_format import LLAMA3_INSTRUCT_CHAT_TEMPLATE, Jinja2ChatFormatter

    from bengali_empathy.data import ChatEncoder
    from bengali_empathy.errors import UserError
    from bengali_empathy.export.gguf import check_gguf
    from bengali_empathy.data.tokenizer import BEGIN_OF_TEXT, END_OF_TEXT, EOT

    _, tokenizer, info = merged
    llm = _llama(_gguf_file(exports, "f16"))
    for messages, trained in _prompts(tokenizer, info.system_prompt):
        stock = Jinja2ChatFormatter(LLAMA3_INSTRUCT_CHAT_TEMPLATE, eos_token=EOT, bos_token=BEGIN_OF_TEXT)(
            messages=messages).prompt
        assert llm.tokenize(stock.encode("utf-8"), add_bos=False, special=True) != trained
    # The same file with a base model's eos: the uint32 after the key, patched in a copy.
    data = bytearray(_gguf_file(exports, "f16").read_bytes())
    at = data.index(b"tokenizer.ggml.eos_token_id") + len(b"tokenizer.ggml.eos_token_id")
    uint32 = 4  # GGUF's value type
    assert int.from_bytes(data[at:at + 4], "little") == uint32
    assert int.from_bytes(data[at + 4:at + 8], "little") == tokenizer.convert_tokens_to_ids(EOT)
    data[at + 4:at + 8] = tokenizer.convert_tokens_to_ids(END_OF_TEXT).to_bytes(4, "little")
    (tmp_path / "base_eos.gguf").write_bytes(data)
    with pytest.raises(UserError, match="would not stop"):
        check_gguf(tmp_path / "base_eos.gguf", ChatEncoder(tokenizer), info.system_prompt)


def test_modelfile_beside_the_gguf(exports, merged):
    _, tokenizer, info = merged
    for quant in QUANTS:
        text = (exports[quant][0] / "Modelfile").read_text(encoding="utf-8")
        lines = text.splitlines()
        assert lines[0] == f"FROM ./model-{quant}.gguf" and (exports[quant][0] / lines[0][7:]).is_file()
        assert f'SYSTEM """{info.system_prompt}"""' in text
        assert [x for x in lines if x.startswith("PARAMETER")] == [
            'PARAMETER stop "<|eot_id|>"', 'PARAMETER stop "<|eom_id|>"', 'PARAMETER stop "<|end_of_text|>"',
            "PARAMETER num_ctx 768"]


GO_RENDER = """package main

import ("encoding/json"; "os"; "text/template")

type Message struct { Role string; Content string }

func main() {
	var v struct { Template string; System string; Messages []Message }
	if err := json.NewDecoder(os.Stdin).Decode(&v); err != nil { panic(err) }
	template.Must(template.New("t").Parse(v.Template)).Execute(os.Stdout, v)
}
"""


def _ollama_render(template, system, messages, tmp_path):
    """``template`` rendered as Ollama renders a chat: Go's text/template over .System and .Messages."""
    binary = tmp_path / "render"
    if not binary.exists():
        (tmp_path / "render.go").write_text(GO_RENDER)
        env = {**os.environ, "GOCACHE": str(tmp_path / "gocache"), "GOPATH": str(tmp_path / "gopath"),
               "GO111MODULE": "off"}
        r = subprocess.run(["go", "build", "-o", str(binary), str(tmp_path / "render.go")], capture_output=True,
                           text=True, timeout=300, env=env)
        assert r.returncode == 0, r.stderr
    data = json.dumps({"Template": template, "System": system,
                       "Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]})
    r = subprocess.run([str(binary)], input=data, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def ollama_prompt_ids(export_dir, tokenizer, info, tmp_path):
    """(the Modelfile's TEMPLATE, the training tokens of PROBE_CHAT, and a function giving the tokens of a template
    rendered by Go's text/template over PROBE_CHAT, with the BOS Ollama adds)."""
    from bengali_empathy.data import ChatEncoder
    from bengali_empathy.export.gguf import PROBE_CHAT

    text = (export_dir / "Modelfile").read_text(encoding="utf-8")
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    trained = ChatEncoder(tokenizer).prompt_ids(info.system_prompt, PROBE_CHAT)

    def tokens(template):
        rendered = _ollama_render(template, info.system_prompt, PROBE_CHAT, tmp_path)
        return tokenizer(rendered, add_special_tokens=True)["input_ids"]

    return template, trained, tokens


@pytest.mark.skipif(shutil.which("go") is None, reason="Go is not installed (apt-get install golang-go)")
def test_ollama_template_renders_the_training_tokens(exports, merged, tmp_path):
    """Rendered by Go's text/template (Ollama's engine) and tokenised with the BOS Ollama adds, the Modelfile's
    TEMPLATE gives the training tokens of a multi-turn Bengali chat; Ollama's stock llama3 template does not."""
    _, tokenizer, info = merged
    template, trained, tokens = ollama_prompt_ids(exports["f16"][0], tokenizer, info, tmp_path)
    assert tokens(template) == trained
    stock = template.replace("Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n", "")
    assert stock != template and tokens(stock) != trained


def _one_error(r):
    errors = [x for x in r.stderr.strip().splitlines() if x.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1, r.stderr[-2000:]
    return errors[0]


def test_export_refusals_leave_nothing(default_fit, exports, tmp_path, monkeypatch):
    adapter = _adapter(default_fit)
    gg = ["--format", "gguf", "--quant", "q8_0"]
    (tmp_path / "taken").mkdir()
    assert "already exists" in _one_error(run_cli(["export", "--adapter", adapter, "--output", tmp_path / "taken",
                                                   *gg], cwd=tmp_path))
    assert "--quant applies to --format gguf" in _one_error(
        run_cli(["export", "--adapter", adapter, "--output", tmp_path / "o", "--quant", "f16"], cwd=tmp_path))
    assert "q5_k" in _one_error(run_cli(["export", "--adapter", adapter, "--output", tmp_path / "o", "--format",
                                         "gguf", "--quant", "q5_k"], cwd=tmp_path))
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "llama_cpp", None)  # as without the extra
        assert "pip install -e '.[gguf]'" in _one_error(
            run_cli(["export", "--adapter", adapter, "--output", tmp_path / "o", *gg], cwd=tmp_path))
    import bengali_empathy.export.gguf as ge
    from bengali_empathy.models.loading import base_model_path

    need = ge.estimate_bytes(base_model_path(adapter), "q8_0")
    peak = sum(_gguf_file(exports, q).stat().st_size for q in ("f16", "q8_0"))  # the f16 file beside the q8_0 one
    assert peak <= need <= 1.2 * peak, (need, peak)
    monkeypatch.setattr(ge.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 30, 10 << 30, need - 1))
    err = _one_error(run_cli(["export", "--adapter", adapter, "--output", tmp_path / "o", *gg], cwd=tmp_path))
    assert "not enough disk space" in err and f"{(need - 1) / 2**30:.1f} GiB are free" in err
    monkeypatch.undo()
    no_tok, no_template = tmp_path / "no_tok", tmp_path / "no_template"
    shutil.copytree(adapter, no_tok, ignore=shutil.ignore_patterns("tokenizer.json"))
    shutil.copytree(adapter, no_template, ignore=shutil.ignore_patterns("chat_template.jinja"))
    meta = json.loads((no_template / "bengali_empathy.json").read_text(encoding="utf-8"))
    (no_template / "bengali_empathy.json").write_text(json.dumps({**meta, "chat_template": None}), encoding="utf-8")
    assert "has no tokenizer" in _one_error(run_cli(["export", "--adapter", no_tok, "--output", tmp_path / "o", *gg],
                                                    cwd=tmp_path))
    assert "has no chat template" in _one_error(
        run_cli(["export", "--adapter", no_template, "--output", tmp_path / "o", *gg], cwd=tmp_path))

    def broken(gguf, model, tokenizer_dir, template, path, *args):
        path.write_bytes(b"GGUF" + bytes(100))  # half a file, then the writer fails (a stand-in)
        raise RuntimeError("a stand-in for a failing write")

    monkeypatch.setattr(ge, "write_f16_gguf", broken)
    r = run_cli(["export", "--adapter", adapter, "--output", tmp_path / "o", *gg], cwd=tmp_path)
    assert r.returncode == 1 and "a stand-in" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["no_template", "no_tok", "taken"]  # no half-written export


def test_the_adapter_loads_in_plain_peft(default_fit, merged, tmp_path):
    """transformers + peft alone (this package made unimportable) load the adapter and compute the merged logits."""
    ids = merged[1]("আমি আজ খুব একা।")["input_ids"]
    code = f"""
import importlib.abc, json, sys, torch
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "bengali_empathy":
            raise ImportError("no bengali_empathy here")
sys.meta_path.insert(0, Block())
from peft import AutoPeftModelForCausalLM
model = AutoPeftModelForCausalLM.from_pretrained({str(_adapter(default_fit))!r}).eval()
with torch.no_grad():
    print(json.dumps(model(torch.tensor([{ids}])).logits[0, -1].tolist()))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    with torch.no_grad():
        ref = merged[0](torch.tensor([ids])).logits[0, -1]
    assert torch.allclose(torch.tensor(json.loads(r.stdout.strip().splitlines()[-1])), ref, atol=1e-4)


def test_an_exported_gguf_is_a_model_path_again(exports, merged, tmp_path, monkeypatch):
    """model.model_name_or_path may be a .gguf: it is dequantised once into the cache as a checkpoint with its
    tokenizer, chat template and stop tokens: the exported weights (f16, as the file holds them) under the model's
    own configuration, Llama 3.1's RoPE scaling included (transformers' GGUF reader alone drops it)."""
    from transformers import AutoModelForCausalLM

    from bengali_empathy.data import ChatEncoder
    from bengali_empathy.data.tokenizer import load_tokenizer, stop_token_ids
    from bengali_empathy.models.modeling import resolve_model_path

    monkeypatch.setenv("BENGALI_EMPATHY_CACHE", str(tmp_path))
    path = _gguf_file(exports, "f16")
    converted = resolve_model_path(str(path))
    assert converted.parent == tmp_path / "gguf" and (converted / "config.json").is_file()
    assert resolve_model_path(str(path)) == converted  # converted once
    model, tokenizer, info = merged
    back = AutoModelForCausalLM.from_pretrained(str(converted), dtype=torch.float32).eval()
    for key in ("rope_parameters", "rms_norm_eps", "num_key_value_heads", "tie_word_embeddings"):
        assert getattr(back.config, key) == getattr(model.config, key), key
    ours, theirs = model.state_dict(), back.state_dict()
    assert set(ours) == set(theirs)
    for k, v in ours.items():
        assert torch.equal(theirs[k], v if v.ndim == 1 else v.to(torch.float16).to(torch.float32)), k
    converted_tokenizer = load_tokenizer(str(converted))
    assert converted_tokenizer.chat_template == tokenizer.chat_template
    assert stop_token_ids(converted_tokenizer) == stop_token_ids(tokenizer)
    # the training format over either tokenizer: the same ids for a conversation and its generation prompt
    turns = [{"role": "user", "content": "আজ মনটা খুব ভারী লাগছে।"}, {"role": "assistant", "content": "কী হয়েছে?"},
             {"role": "user", "content": "চাকরিটা চলে গেল।"}]
    assert (ChatEncoder(converted_tokenizer).prompt_ids(info.system_prompt, turns)
            == ChatEncoder(tokenizer).prompt_ids(info.system_prompt, turns))
