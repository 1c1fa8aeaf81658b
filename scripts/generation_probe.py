"""Generation throughput of each engine on a corpus's prompts, and its agreement with the eager engine (GPU).

Usage: python scripts/generation_probe.py MODEL_DIR --corpus FILE [--rows 512] [--no-4bit] [--backend hf]
       [--run ENGINE:BATCH:NEW[:WEIGHTS] ...] [--peaked SCALE] [--json OUT]
WEIGHTS: adapter (default) or merged (the LoRA folded into a 16-bit copy, as evaluation does where it fits).
Each ``--run`` generates replies for the same ``--rows`` prompts (the corpus's training rows, as
``predict --data.predict.split train`` reads them) and prints one JSON line: wall seconds of the whole
call (the compile of a first batch included), generated tokens/s, sliced-prefill seconds, peak GPU
memory. ``--peaked S`` then multiplies the output head by S (random weights give near-flat logits,
where bf16 rounding decides the argmax) and compares each engine's first 32 greedy tokens with eager's.
"""
import argparse
import json
import sys
import time

from bengali_empathy.models.backends import preimport_unsloth

preimport_unsloth("predict")

import torch  # noqa: E402

from bengali_empathy.data import EmpatheticDialogueDataModule, EncodingSettings, PredictSettings  # noqa: E402
from bengali_empathy.generation.decoding import Decoding  # noqa: E402
from bengali_empathy.generation.generator import Generator  # noqa: E402
from bengali_empathy.models.memory import MemorySettings  # noqa: E402
from bengali_empathy.training.module import EmpathyLM  # noqa: E402


def corpus_prompts(corpus: str, model: str, rows: int) -> list[list[int]]:
    from bengali_empathy.models.modeling import tokenizer_path_for

    dm = EmpatheticDialogueDataModule(corpus_path=corpus, tokenizer_path=tokenizer_path_for(model), max_seq_length=2048,
                                      encoding=EncodingSettings(on_too_long="drop"),
                                      predict=PredictSettings(split="train", max_samples=rows))
    dm.setup("predict")
    return [r.prompt_ids for batch in dm.predict_dataloader() for r in batch["eval_rows"]][:rows]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--corpus", required=True)
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--backend", default="hf")
    p.add_argument("--no-4bit", action="store_true", help="16-bit base weights instead of NF4")
    p.add_argument("--run", nargs="*", default=["eager:128:128", "compiled:128:128"])
    p.add_argument("--peaked", type=float, default=0.0)
    p.add_argument("--peaked-rows", type=int, default=128)
    p.add_argument("--peaked-engines", nargs="+", default=["eager:64", "static:64", "compiled:64"],
                   help="ENGINE:BATCH[:WEIGHTS] runs compared with the first")
    p.add_argument("--fp32", action="store_true", help="compute in float32 (bf16 rounding out of the comparison)")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    out = open(a.json, "a") if a.json else None

    def emit(row: dict) -> None:
        line = json.dumps({"model": a.model, "4bit": not a.no_4bit, **row})
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()

    lm = EmpathyLM(model_name_or_path=a.model, backend=a.backend, max_seq_length=2048,
                   memory=MemorySettings(gradient_checkpointing=False, load_in_4bit=not a.no_4bit, budget_gib=None))
    lm.configure_model()
    cuda = torch.cuda.is_available()
    model = lm.model.to("cuda") if a.no_4bit and cuda else lm.model
    if a.fp32:
        model = model.float()
    prompts = corpus_prompts(a.corpus, a.model, a.rows)
    lengths = sorted(len(x) for x in prompts)
    emit({"rows": len(prompts), "prompt_len_p50": lengths[len(lengths) // 2], "prompt_len_max": lengths[-1]})
    for spec in a.run:
        engine, batch, new, weights = (spec.split(":") + ["adapter"])[:4]
        gen = Generator(model, lm.tokenizer, lm.backend, Decoding(max_new_tokens=int(new)), int(batch), engine=engine,
                        weights=weights)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        try:
            _, st = gen.generate(prompts, progress=False)
        except Exception as exc:  # noqa: BLE001 - a probe reports and goes on
            emit({"run": spec, "error": repr(exc)[:300]})
            continue
        emit({"run": spec, "wall_s": round(time.perf_counter() - t, 2), **st.as_dict()})
    if a.peaked:
        head = model.get_output_embeddings()
        with torch.no_grad():
            head.weight.mul_(a.peaked)
        few = prompts[: a.peaked_rows]
        replies = {}
        for spec in a.peaked_engines:
            engine, batch, weights = (spec.split(":") + ["adapter"])[:3]
            gen = Generator(model, lm.tokenizer, lm.backend, Decoding(max_new_tokens=32), int(batch), engine=engine,
                            weights=weights)
            replies[spec] = gen.generate(few, progress=False)[0]
        reference = a.peaked_engines[0]
        for spec in a.peaked_engines[1:]:
            same = sum(x == y for x, y in zip(replies[spec], replies[reference]))
            emit({"peaked": a.peaked, "fp32": a.fp32, "run": spec, "against": reference, "rows": len(few),
                  "same_32_tokens": same, "share": round(same / len(few), 3)})


if __name__ == "__main__":
    sys.exit(main())
