"""Where the compiled engine's time goes on the 8B (GPU): prefill variants, first call against later calls,
kernel profiles of a prefill slice and of a decoding step, and end-to-end generation per variant.

Usage: python scripts/engine_profile.py MODEL_DIR --corpus FILE [--variants FILE.py ...] [--json OUT]
Each ``--variants`` file is a module with a ``prefill`` function of :func:`bengali_empathy.generation.decoder.prefill`'s
signature; ``main`` is the package's own. Prints one JSON line per measurement.
"""
import argparse
import importlib.util
import json
import sys
import time

from bengali_empathy.models.backends import preimport_unsloth

preimport_unsloth("predict")

import torch  # noqa: E402

from bengali_empathy.generation import decoder  # noqa: E402
from bengali_empathy.models import fused  # noqa: E402
from bengali_empathy.models.gpu import synchronized_time  # noqa: E402
from bengali_empathy.generation.decoding import Decoding
from bengali_empathy.generation.engines import grouped_decode_attention  # noqa: E402
from bengali_empathy.generation.generator import Generator  # noqa: E402
from bengali_empathy.generation.merged import merged_copy  # noqa: E402
from bengali_empathy.models.memory import MemorySettings  # noqa: E402
from bengali_empathy.training.module import EmpathyLM  # noqa: E402

sys.path.insert(0, "scripts")
from generation_probe import corpus_prompts  # noqa: E402


def load_variant(path: str):
    spec = importlib.util.spec_from_file_location(path.rsplit("/", 1)[-1][:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.prefill


def no_fused_kernels(device, config) -> bool:
    """``fused.fused_available`` where the eager elementwise kernels are to run."""
    return False


def eager_kernels(prefill):
    """``prefill`` with the eager elementwise kernels."""
    def run(*args):
        available, fused.fused_available = fused.fused_available, no_fused_kernels
        try:
            return prefill(*args)
        finally:
            fused.fused_available = available
    return run


def kernel_table(prof, rows: int = 20) -> list:
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    events.sort(key=lambda e: -e.self_device_time_total)
    total = sum(e.self_device_time_total for e in events)
    return [[e.key[:70], round(e.self_device_time_total / 1e3, 1), round(e.self_device_time_total / total, 3)]
            for e in events[:rows]] + [["total_ms", round(total / 1e3, 1), 1.0]]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--corpus", required=True)
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--variants", nargs="*", default=[])
    p.add_argument("--batch-rows", type=int, default=256, help="rows of each of the two prefill/decoding batches "
                   "(their KV cache must fit beside the merged model)")
    p.add_argument("--budgets", nargs="*", type=int, default=[16384])
    p.add_argument("--e2e", nargs="*", default=[], help="max_new_tokens of end-to-end runs per variant")
    p.add_argument("--reps", type=int, default=2, help="prefills of each batch per variant (the first: the process's first)")
    p.add_argument("--no-main", action="store_true", help="only the --variants, not the package's own prefill")
    p.add_argument("--no-cudnn", action="store_true", help="SDPA without its cuDNN backend")
    p.add_argument("--kernels", action="store_true", help="kernel profiles of a prefill slice and a decoding step")
    p.add_argument("--eager-kernels", action="store_true",
                   help="the whole process without the fused elementwise kernels (models/fused.py)")
    p.add_argument("--fused-variant", action="store_true",
                   help="also the package's prefill without the fused kernels, as variant 'eager_kernels', and the "
                        "difference of its keys and values from main's")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    if a.no_cudnn:
        torch.backends.cuda.enable_cudnn_sdp(False)
    out = open(a.json, "a") if a.json else None

    def emit(row: dict) -> None:
        line = json.dumps(row)
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()

    if a.eager_kernels:
        fused.fused_available = no_fused_kernels
    variants = {} if a.no_main else {"main": decoder.prefill}
    if a.fused_variant:
        variants["eager_kernels"] = eager_kernels(decoder.prefill)
    for path in a.variants:
        variants[path.rsplit("/", 1)[-1][:-3]] = load_variant(path)
    lm = EmpathyLM(model_name_or_path=a.model, backend="hf", max_seq_length=2048,
                   memory=MemorySettings(gradient_checkpointing=False, budget_gib=None))
    lm.configure_model()
    lm.backend.for_inference(lm.model)
    prompts = sorted(corpus_prompts(a.corpus, a.model, a.rows), key=len, reverse=True)
    device = torch.device("cuda")
    t = time.perf_counter()
    model = merged_copy(lm.model)
    emit({"merge_s": round(synchronized_time(device) - t, 2), "rows": len(prompts),
          "tokens": sum(map(len, prompts))})
    pad = lm.tokenizer.pad_token_id
    rows = a.batch_rows
    batches = [prompts[:rows], prompts[rows:2 * rows]]
    width = len(batches[0][0])
    with grouped_decode_attention(model):
        step = decoder.DecodeStep(model, rows, decoder.cache_slots(width, 128))
        stats0 = torch.cuda.memory_stats()
        for rep in range(1, a.reps + 1):
            for name, fn in variants.items():
                for budget in a.budgets:
                    for b, batch in enumerate(batches):
                        s0 = torch.cuda.memory_stats()
                        t = synchronized_time(device)
                        fn(model, step.cache, batch, len(batch[0]), pad, budget)
                        secs = synchronized_time(device) - t
                        s1 = torch.cuda.memory_stats()
                        emit({"prefill": name, "no_cudnn": a.no_cudnn, "rep": rep, "budget": budget, "batch": b + 1, "s": round(secs, 3),
                              "tokens": sum(map(len, batch)), "tok_s": round(sum(map(len, batch)) / secs),
                              "cudaMalloc": s1["num_device_alloc"] - s0["num_device_alloc"],
                              "cudaFree": s1["num_device_free"] - s0["num_device_free"],
                              "retries": s1["num_alloc_retries"] - s0["num_alloc_retries"]})
        emit({"cudaMalloc_total": torch.cuda.memory_stats()["num_device_alloc"] - stats0["num_device_alloc"]})
        if a.fused_variant:  # the first batch's keys and values in the first, middle and last layers
            caches, layers = {}, (0, len(step.cache.layers) // 2, len(step.cache.layers) - 1)
            for name in ("main", "eager_kernels"):
                variants[name](model, step.cache, batches[0], width, pad, 16384)
                caches[name] = [torch.cat([step.cache.layers[i].keys, step.cache.layers[i].values]).clone()
                                for i in layers]
            # over the filled slots only (padding slots are zeros in both)
            filled = [(m != 0) | (e != 0) for m, e in zip(caches["main"], caches["eager_kernels"])]
            diffs = [(m.float() - e.float()).abs()[f] for m, e, f in zip(caches["main"], caches["eager_kernels"], filled)]
            emit({"kv_diff": "main - eager_kernels", "layers": layers, "filled_values": [int(f.sum()) for f in filled],
                  "max_abs": [round(float(d.max()), 4) for d in diffs], "mean_abs": [round(float(d.mean()), 6) for d in diffs],
                  "mean_abs_value": [round(float(e.float().abs()[f].mean()), 4)
                                     for e, f in zip(caches["eager_kernels"], filled)],
                  "equal_fraction": [round(float((d == 0).float().mean()), 4) for d in diffs]})
            del caches, diffs
        # Kernel profile of one slice (the longest prompts) per variant.
        part = batches[0][:max(1, 16384 // len(batches[0][0]))]
        for name, fn in variants.items() if a.kernels else ():
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                fn(model, step.cache, part, len(part[0]), pad, 16384)
                torch.cuda.synchronize()
            emit({"profile": f"prefill slice {len(part)}x{len(part[0])}", "variant": name,
                  "kernels": kernel_table(prof)})
        # A decoding step: replayed graph time per attended length, and the kernels of the step run directly.
        decoder.prefill(model, step.cache, batches[0], width, pad)
        ids, mask = decoder.left_padded(batches[0], width, pad)
        step.begin(ids.to(device), mask.to(device))
        groups = decoder.row_groups([len(x) for x in batches[0]], width)
        for grouped in (((0, 0),), groups):
            step.use_row_groups(grouped)
            for filled in (width, 1024, 512):
                step(filled)
                t = synchronized_time(device)
                for _ in range(20):
                    step(filled)
                emit({"decode_step_ms": round((synchronized_time(device) - t) / 20 * 1e3, 2), "rows": rows,
                      "attended": step.attended(filled), "cache": step.cache_len,
                      "no_cudnn": a.no_cudnn, "decode": "varlen" if step.varlen else "row groups",
                      "row_groups": grouped})
        if a.kernels:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    step._forward(step.attended(width))
                torch.cuda.synchronize()
            emit({"profile": "decode step x3, direct", "kernels": kernel_table(prof, 16)})
        del step
    del model
    torch.cuda.empty_cache()
    for new in a.e2e:
        for name, fn in variants.items():
            decoder.prefill = fn
            gen = Generator(lm.model, lm.tokenizer, lm.backend, Decoding(max_new_tokens=int(new)), 256,
                            engine="compiled", weights="merged")
            torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            _, st = gen.generate(prompts, progress=False)
            emit({"e2e": name, "eager_kernels": a.eager_kernels, "no_cudnn": a.no_cudnn, "new": int(new), "wall_s": round(time.perf_counter() - t, 2), **st.as_dict()})


if __name__ == "__main__":
    sys.exit(main())
