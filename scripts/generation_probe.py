"""Generation throughput of one loaded model at several batch sizes and prompt lengths (GPU probe).

Usage: python scripts/generation_probe.py MODEL_DIR [--backend unsloth|hf] [--no-4bit] [--batch 128]
       [--prompt-len 16 1000]
Each (batch, prompt length) runs twice: the first includes compilation for new shapes.
"""
import argparse
import json
import sys
import time

from bengali_empathy.backends import preimport_unsloth

preimport_unsloth("predict")

import torch  # noqa: E402

from bengali_empathy.generation import Decoding, generate_replies  # noqa: E402
from bengali_empathy.module import EmpathyLM  # noqa: E402
from bengali_empathy.tokenizer import stop_token_ids  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--backend", default="unsloth")
    p.add_argument("--batch", type=int, nargs="+", default=[128])
    p.add_argument("--prompt-len", type=int, nargs="+", default=[16, 1000])
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--no-4bit", action="store_true", help="16-bit base weights instead of NF4")
    a = p.parse_args()
    lm = EmpathyLM(model_name_or_path=a.model, backend=a.backend, max_seq_length=2048, gradient_checkpointing=False,
                   load_in_4bit=not a.no_4bit)
    lm.configure_model()
    lm.backend.for_inference(lm.model)
    g = torch.Generator().manual_seed(0)
    for bs in a.batch:
        for n in a.prompt_len:
            prompts = [torch.randint(1000, 120000, (n - (i % 7),), generator=g).tolist() for i in range(bs)]
            for r in range(a.repeat):
                t = time.perf_counter()
                _, st = generate_replies(lm.model, lm.tokenizer, prompts, Decoding(max_new_tokens=a.new), bs,
                                         stop_token_ids(lm.tokenizer), progress=False)
                print(json.dumps({"batch": bs, "prompt_len": n, "run": r, "new_tokens": st.new_tokens,
                                  "seconds": round(time.perf_counter() - t, 2),
                                  "tokens_per_sec": round(st.tokens_per_sec), "peak_gib": st.peak_gpu_memory_gib}),
                      flush=True)


if __name__ == "__main__":
    sys.exit(main())
