"""``python -m bengali_empathy export``: merge an adapter into its base, as 16-bit Hugging Face weights
(:mod:`.hf`) or one GGUF file with an Ollama Modelfile (:mod:`.gguf`)."""
from __future__ import annotations

from typing import Literal, Optional

from ..errors import UserError


def main(argv: list[str]) -> int:
    """Merge an adapter (or a fit checkpoint's LoRA weights) into its base model: 16-bit HF weights, or a GGUF."""
    from jsonargparse import ArgumentParser

    from .gguf import Quant

    p = ArgumentParser(prog="python -m bengali_empathy export", exit_on_error=False,
                       description="Merge a LoRA adapter into its base model and save 16-bit Hugging Face weights, "
                                   "or (--format gguf) one GGUF file for llama.cpp with an Ollama Modelfile.")
    p.add_argument("--adapter", type=str, required=True, help="LoRA adapter directory")
    p.add_argument("--output", type=str, required=True, help="directory for the merged checkpoint (must not exist)")
    p.add_argument("--ckpt", type=Optional[str], default=None,
                   help="a fit .ckpt whose LoRA weights replace the adapter's (e.g. the best val/loss checkpoint)")
    p.add_argument("--model", type=Optional[str], default=None,
                   help="base checkpoint (default: the one recorded in the adapter)")
    p.add_argument("--dtype", type=Literal["bfloat16", "float16", "float32"], default="bfloat16",
                   help="dtype the base is loaded and merged in (and, for hf, saved in)")
    p.add_argument("--format", type=Literal["hf", "gguf"], default="hf",
                   help="hf: safetensors for transformers / vLLM; gguf: llama.cpp / Ollama")
    p.add_argument("--quant", type=Optional[Quant], default=None,
                   help="GGUF weights (default q4_k_m); k-quants by llama.cpp's quantizer")
    a = p.parse_args(argv)
    if a.format == "hf":
        if a.quant is not None:
            raise UserError("--quant applies to --format gguf only")
        from .hf import merge_adapter

        out = merge_adapter(a.adapter, a.output, base=a.model, dtype=a.dtype, ckpt=a.ckpt)
        print(f"merged model written to {out}")
        return 0
    from .gguf import export_gguf

    done = export_gguf(a.adapter, a.output, a.quant or "q4_k_m", base=a.model, dtype=a.dtype, ckpt=a.ckpt)
    types = ", ".join(f"{k} {v}" for k, v in done["tensor_types"].items())
    fallback = (f"; {done['fallback']} tensors fell back to another type (rows not divisible by the quant's block)"
                if done["fallback"] else "")
    print(f"GGUF written to {done['gguf']} ({done['bytes'] / 2**20:.1f} MiB; tensors {types}{fallback}), "
          f"Ollama Modelfile to {done['modelfile']}")
    return 0
