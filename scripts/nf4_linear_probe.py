"""bitsandbytes NF4 matrix products of the Llama-3.1-8B layer shapes at decoding batch sizes (GPU).

Usage: python scripts/nf4_linear_probe.py
Per shape: dequantisation alone, ``bnb.matmul_4bit`` (what a 4-bit decoding step runs) and a bf16
``linear`` on the dequantised weight, at 16-256 rows, each timed call after call with CUDA events
(launch overhead included); then the sums over one decoding step's 224 products (32 layers of
q, k, v, o, gate, up, down). Prints one JSON line each.
"""
import json

import bitsandbytes as bnb
import bitsandbytes.functional as F
import torch

ROWS = (16, 64, 128, 256)
LAYER = [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096), (14336, 4096), (14336, 4096), (4096, 14336)]


def timed_ms(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


@torch.no_grad()
def main() -> None:
    by_shape = {}
    for n, k in sorted(set(LAYER)):
        weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        packed, state = F.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
        dense = F.dequantize_4bit(packed, state)
        dequant = timed_ms(lambda: F.dequantize_4bit(packed, state))
        row = {"shape": [n, k], "dequant_ms": round(dequant, 4), "dequant_GBps": round(n * k * 2.5 / dequant / 1e6)}
        for m in ROWS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            row[f"bnb_M{m}_ms"] = round(timed_ms(lambda: bnb.matmul_4bit(x, packed.t(), quant_state=state)), 4)
            row[f"bf16_M{m}_ms"] = round(timed_ms(lambda: torch.nn.functional.linear(x, dense)), 4)
        print(json.dumps(row), flush=True)
        by_shape[(n, k)] = row
    for m in ROWS:
        step = {key: round(32 * sum(by_shape[s][key] for s in LAYER), 2)
                for key in (f"bnb_M{m}_ms", f"bf16_M{m}_ms", "dequant_ms")}
        print(json.dumps({"per_step_32_layers": m, "bnb_ms": step[f"bnb_M{m}_ms"], "bf16_ms": step[f"bf16_M{m}_ms"],
                          "dequant_ms": step["dequant_ms"]}))


if __name__ == "__main__":
    main()
