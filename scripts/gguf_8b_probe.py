"""Sizes, wall times and peak host memory of `export` for the Llama-3.1-8B architecture (the GPU machine's gguf8b step).

Usage: python scripts/gguf_8b_probe.py BASE WORKDIR OUT_JSONL
  BASE: a random-weight bf16 8B checkpoint (`bash scripts/gpu_bench.sh model8b` makes /tmp/llama8b).

Makes a LoRA adapter for BASE (r=16 on q/k/v/o with random, nonzero A and B, saved as fit saves one), then runs
`python -m bengali_empathy export` for bf16 hf, f16 GGUF and q4_k_m GGUF one after another, each in its own process,
and writes one JSON line per step (as soon as it ends): its wall time, the peak resident memory of its process (the
child's rusage) and the size written. Each output is deleted before the next step (64 GB disk: the base, the merged bf16 copy and the f16 file
beside the q4_k_m one would not fit together).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


def make_adapter(base: Path, directory: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from bengali_empathy.models.checkpoints import AdapterInfo, save_adapter
    from bengali_empathy.data import DEFAULT_SYSTEM_PROMPT
    from bengali_empathy.models.lora import LoraSettings
    from bengali_empathy.data.tokenizer import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.bfloat16)  # on CPU: peft only adds LoRA
    lora = LoraSettings()
    torch.manual_seed(0)
    # init_lora_weights=False: A and B random, so the merge changes every targeted weight.
    model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=0.0,
                                             target_modules=list(lora.target_modules), init_lora_weights=False))
    info = AdapterInfo(model_name_or_path=str(base), base_model=str(base), backend="hf", lora=lora.as_record(),
                       system_prompt=DEFAULT_SYSTEM_PROMPT, max_seq_length=2048,
                       chat_template=load_tokenizer(base).chat_template)
    save_adapter(model, load_tokenizer(base), directory, info)


def timed(args: list[str]) -> dict:
    """Wall time and peak RSS of ``python -m bengali_empathy ARGS`` (the child's own rusage)."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "bengali_empathy", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    print(out[-1500:], flush=True)
    return {"rc": proc.returncode, "wall_s": round(wall, 1), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2),
            "last_line": out.strip().splitlines()[-1][:300] if out.strip() else ""}


def size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def main(base: str, workdir: str, out_jsonl: str) -> None:
    base_path, work = Path(base), Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    adapter = work / "adapter"
    start = time.perf_counter()
    if not adapter.exists():
        make_adapter(base_path, adapter)
    common = {"base": str(base_path.resolve()), "cpus": os.cpu_count(),
              "adapter_s": round(time.perf_counter() - start, 1)}
    steps = {"hf_bf16": ["--format", "hf"], "gguf_f16": ["--format", "gguf", "--quant", "f16"],
             "gguf_q4_k_m": ["--format", "gguf", "--quant", "q4_k_m"]}
    for name, extra in steps.items():
        output = work / name
        shutil.rmtree(output, ignore_errors=True)
        step = timed(["export", "--adapter", str(adapter), "--output", str(output), *extra])
        step["bytes"] = size(output) if output.exists() else None
        step["disk_free_gib_after"] = round(shutil.disk_usage(work).free / 2**30, 1)
        line = json.dumps({"step": name, **step, **common})
        with open(out_jsonl, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
        print(line, flush=True)
        shutil.rmtree(output, ignore_errors=True)
    shutil.rmtree(adapter, ignore_errors=True)


if __name__ == "__main__":
    main(*sys.argv[1:4])
