"""Training-throughput benchmark: tokens/s and peak GPU memory of one backend and loop.

``python -m bengali_empathy benchmark --arch llama-3.1-8b --backend unsloth --loop lightning``

Random-token batches of ``batch_size x seq_len`` (every position trained) go
through the same EmpathyLM module used by ``fit``, either in a plain PyTorch
loop or under a Lightning Trainer (with a sanity-check validation that
generates, as a real ``fit`` does). Steps after ``--warmup`` are timed with CUDA
synchronisation; peak memory is ``torch.cuda.max_memory_allocated`` over the
run, model weights included. ``--arch llama-3.1-8b`` writes a random-weight
Llama-3.1-8B checkpoint (bf16) to the cache once.
"""
from __future__ import annotations

import itertools
import json
import sys
import time
from pathlib import Path
from typing import Optional

import torch


def random_batches(n: int, batch_size: int, seq_len: int, seed: int = 0, prompt_len: int = 16):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 128000, (batch_size, seq_len), generator=g)
        labels = ids.clone()
        labels[:, :1] = -100
        prompt = ids[:, :prompt_len]
        out.append({
            "input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids),
            "position_ids": torch.arange(seq_len).expand(batch_size, -1).clone(), "n_tokens": ids.numel(),
            "gen_input_ids": prompt, "gen_attention_mask": torch.ones_like(prompt),
            "id": [str(i) for i in range(batch_size)], "prompt": ["ক"] * batch_size, "reference": ["খ"] * batch_size,
            "category": [None] * batch_size,
        })
    return out


def corpus_batches(path: str, n: int, batch_size: int, seq_len: int, pack: bool, group_by_length: bool,
                   tokenizer_path: Optional[str]):
    """``n`` training batches (and one validation batch) of a real corpus, as ``fit`` builds them."""
    from .data import EmpatheticDialogueDataModule

    dm = EmpatheticDialogueDataModule(corpus_path=path, tokenizer_path=tokenizer_path, max_seq_length=seq_len,
                                      on_too_long="truncate_history", batch_size=batch_size, pack=pack,
                                      group_by_length=group_by_length)
    dm.setup()
    train, out = dm.train_dataloader(), []
    while len(out) < n:
        out += list(itertools.islice(iter(train), n - len(out)))
    return out, [next(iter(dm.val_dataloader()))]


def model_path_for(arch: str, model_path: Optional[str]) -> str:
    from .modeling import LLAMA31_8B_ARCH, TINY_MODEL, write_random_model
    from .tokenizer import cache_dir

    if model_path:
        return model_path
    if arch == "tiny":
        return TINY_MODEL
    if arch == "llama-3.1-8b":
        target = cache_dir() / "random-llama-3.1-8b"
        if not (target / "config.json").is_file():
            t = time.perf_counter()
            dev = "cuda" if torch.cuda.is_available() else "cpu"
            write_random_model(target, arch=LLAMA31_8B_ARCH, dtype="bfloat16", device=dev)
            print(f"wrote random Llama-3.1-8B to {target} in {time.perf_counter() - t:.0f}s", file=sys.stderr)
            if dev == "cuda":
                torch.cuda.empty_cache()
        return str(target)
    raise SystemExit(f"unknown arch {arch}")


def _gib(x: int) -> float:
    return round(x / 2**30, 2)


def run(args) -> dict:
    from .module import EmpathyLM

    cuda = torch.cuda.is_available()
    path = model_path_for(args.arch, args.model_path)
    t_load = time.perf_counter()
    lm = EmpathyLM(model_name_or_path=path, backend=args.backend, load_in_4bit=not args.no_4bit,
                   max_seq_length=args.seq_len, gradient_checkpointing=not args.no_gradient_checkpointing,
                   optimizer=args.optimizer, max_new_tokens=4, val_generate_batches=1, log_samples=0,
                   save_adapter_on_fit_end=False)
    lm.configure_model()
    if not args.rearm:
        # Reproduces the bug the package guards against: Lightning's train() alone, so the
        # checkpointing flags that Unsloth's for_inference clears stay off.
        lm.backend.for_training = lambda model: model.train()
    load_s = time.perf_counter() - t_load
    device = torch.device("cuda" if cuda else "cpu")
    if not lm.backend.quantized:
        lm.to(device)
    total_steps = args.warmup + args.steps
    if args.corpus:
        from .modeling import TINY_MODEL

        batches, val_batches = corpus_batches(args.corpus, total_steps, args.batch_size, args.seq_len, args.pack,
                                              args.group_by_length, None if path == TINY_MODEL else path)
    else:
        batches = random_batches(total_steps, args.batch_size, args.seq_len)
        val_batches = batches[:1]
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    result = {
        "arch": args.arch, "backend": lm.backend.name, "loop": args.loop, "seq_len": args.seq_len,
        "batch_size": args.batch_size, "steps_timed": args.steps, "corpus": args.corpus, "packed": args.pack,
        "group_by_length": args.group_by_length, "quantized_4bit": lm.backend.quantized,
        "gradient_checkpointing_requested": not args.no_gradient_checkpointing,
        "trainable_params": lm.param_counts[0], "rearm_checkpointing": args.rearm, "load_s": round(load_s, 1),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
    }
    times: dict = {}
    gc_seen: list = []
    precision_ctx = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else None

    if args.loop == "plain":
        lm.backend.for_training(lm.model)
        opt = lm.configure_optimizers()["optimizer"]
        for i, batch in enumerate(batches):
            if i == args.warmup:
                if cuda:
                    torch.cuda.synchronize()
                times["t0"] = time.perf_counter()
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            if precision_ctx:
                with precision_ctx():
                    loss, _ = lm(batch)
            else:
                loss, _ = lm(batch)
            loss.backward()
            gc_seen.append(lm.backend.gradient_checkpointing_active(lm.model))
            opt.step()
            opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times["t1"] = time.perf_counter()
        result["final_loss"] = round(float(loss), 4)
    else:
        import lightning as L
        from torch.utils.data import DataLoader

        class Timer(L.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if batch_idx == args.warmup:
                    if cuda:
                        torch.cuda.synchronize()
                    times["t0"] = time.perf_counter()

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                gc_seen.append(lm.backend.gradient_checkpointing_active(lm.model))
                if batch_idx == total_steps - 1:
                    if cuda:
                        torch.cuda.synchronize()
                    times["t1"] = time.perf_counter()
                    result["final_loss"] = round(float(outputs["loss"]), 4)

        def loader(bs):
            return DataLoader(bs, batch_size=None)

        trainer = L.Trainer(
            accelerator="gpu" if cuda else "cpu", devices=1, precision="bf16-mixed" if cuda else "32-true",
            max_steps=total_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, num_sanity_val_steps=1 if args.sanity_val else 0,
            limit_val_batches=1, val_check_interval=None, check_val_every_n_epoch=1000, callbacks=[Timer()],
        )
        trainer.fit(lm, train_dataloaders=loader(batches), val_dataloaders=loader(val_batches))
    if "t1" not in times:
        raise SystemExit("benchmark did not complete its timed steps")
    dt = times["t1"] - times["t0"]
    # Non-padding tokens: a padded or partly filled packed row counts only what it holds.
    result["tokens_per_sec"] = round(sum(int(b["n_tokens"]) for b in batches[args.warmup:]) / dt, 1)
    result["fill"] = round(sum(int(b["n_tokens"]) for b in batches[args.warmup:])
                           / sum(b["input_ids"].numel() for b in batches[args.warmup:]), 3)
    result["step_s"] = round(dt / args.steps, 4)
    result["gradient_checkpointing_active"] = bool(gc_seen) and all(gc_seen[args.warmup:])
    if cuda:
        result["peak_mem_allocated_gib"] = _gib(torch.cuda.max_memory_allocated())
        result["peak_mem_reserved_gib"] = _gib(torch.cuda.max_memory_reserved())
    return result


def main(argv: Optional[list[str]] = None) -> int:
    from jsonargparse import ArgumentParser

    p = ArgumentParser(prog="python -m bengali_empathy benchmark", description=__doc__.split("\n\n")[0],
                       exit_on_error=False)
    p.add_argument("--arch", default="tiny", choices=["tiny", "llama-3.1-8b"])
    p.add_argument("--model-path", default=None, help="local checkpoint to benchmark instead of --arch")
    p.add_argument("--backend", default="auto", choices=["auto", "unsloth", "hf"])
    p.add_argument("--loop", default="lightning", choices=["lightning", "plain"])
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--optimizer", default="auto")
    p.add_argument("--no-4bit", action="store_true")
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    p.add_argument("--no-sanity-val", dest="sanity_val", action="store_false",
                   help="skip the sanity-check validation (with generation) before training")
    p.add_argument("--no-rearm", dest="rearm", action="store_false",
                   help="do not re-arm Unsloth's gradient checkpointing after eval/generate (reproduces the bug)")
    p.add_argument("--corpus", default=None, help="train on this corpus's batches instead of random tokens")
    p.add_argument("--pack", action="store_true", help="with --corpus: pack conversations into seq-len rows")
    p.add_argument("--group-by-length", action="store_true",
                   help="with --corpus and no --pack: batch conversations of similar length together")
    p.add_argument("--json", default=None, help="append the result as one JSON line to this file")
    args = p.parse_args(argv)
    result = run(args)
    line = json.dumps(result, ensure_ascii=False)
    print(line)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
    return 0
