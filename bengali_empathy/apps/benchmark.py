"""Training-throughput benchmark: tokens/s and peak GPU memory of one backend and loop.

``python -m bengali_empathy benchmark --arch llama-3.1-8b --backend unsloth --loop lightning``

Random-token batches of ``batch_size x seq_len`` (every position trained) go
through the same EmpathyLM module used by ``fit``, either in a plain PyTorch
loop or under a Lightning Trainer (with a sanity-check validation that
generates, as a real ``fit`` does), with the checkpointing split that
``--memory-budget`` buys (:mod:`.memory`). ``--loop trl`` runs Unsloth's own
recommended path instead: TRL's SFTTrainer on the same model, LoRA, batches and
8-bit AdamW. Steps after ``--warmup`` are timed with CUDA synchronisation; peak
memory is ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` over the
timed run, model weights included. ``--arch llama-3.1-8b`` writes a random-weight
Llama-3.1-8B checkpoint (bf16) to the cache once.

``--compare 7,14,22,auto`` runs TRL's path and this package at each budget, each in
its own process, and prints one table. ``--profile FILE`` runs :data:`PROFILED_STEPS` more
steps after the timed ones under torch's profiler (which would slow the timed steps) and
writes the operators that took their time, device time first, as a table to FILE.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Optional

import torch

PROFILED_STEPS = 3  # steps after the timed ones that --profile records


def random_batches(n: int, batch_size: int, seq_len: int, seed: int = 0, prompt_len: int = 16):
    """``n`` full-length random-token training batches (the memory probe's kind), with evaluation columns."""
    from ..models.memory import probe_batch
    from ..schema import EvalRow

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        batch = probe_batch(batch_size, seq_len, generator=g)
        prompts = batch["input_ids"][:, :prompt_len].tolist()
        rows = [EvalRow("random", i + 1, str(i), "ক", "খ", ids) for i, ids in enumerate(prompts)]
        out.append({**batch, "n_tokens": batch["input_ids"].numel(), "eval_rows": rows})
    return out


def corpus_batches(path: str, n: int, batch_size: int, seq_len: int, pack: bool, group_by_length: bool,
                   tokenizer_path: Optional[str]):
    """``n`` training batches (and one validation batch) of a real corpus, as ``fit`` builds them."""
    from ..data import EmpatheticDialogueDataModule, EncodingSettings

    dm = EmpatheticDialogueDataModule(corpus_path=path, tokenizer_path=tokenizer_path, max_seq_length=seq_len,
                                      batch_size=batch_size, pack=pack, group_by_length=group_by_length,
                                      encoding=EncodingSettings(on_too_long="truncate_history"))
    dm.setup()
    train, out = dm.train_dataloader(), []
    while len(out) < n:
        out += list(itertools.islice(iter(train), n - len(out)))
    return out, [next(iter(dm.val_dataloader()))]


def model_path_for(arch: str, model_path: Optional[str]) -> str:
    from ..models.modeling import LLAMA31_8B_ARCH, TINY_MODEL, write_random_model
    from ..data.tokenizer import cache_dir

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


def parse_budget(text: str):
    """``14`` -> 14.0, ``auto`` -> "auto", ``none`` -> None (every layer checkpointed)."""
    if text.lower() in ("none", "null"):
        return None
    if text == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        from ..errors import UserError

        raise UserError(f"memory budget must be a number of GiB, auto or none, not {text!r}") from None


def run(args) -> dict:
    if args.loop == "trl":
        return run_trl(args)
    from ..generation.decoding import Decoding
    from ..models.memory import MemorySettings, plan_training_memory
    from ..training.module import EmpathyLM, GenerationSettings, OptimizerSettings

    cuda = torch.cuda.is_available()
    path = model_path_for(args.arch, args.model_path)
    t_load = time.perf_counter()
    lm = EmpathyLM(model_name_or_path=path, backend=args.backend, max_seq_length=args.seq_len,
                   save_adapter_on_fit_end=False,
                   memory=MemorySettings(load_in_4bit=not args.no_4bit,
                                         gradient_checkpointing=not args.no_gradient_checkpointing,
                                         budget_gib=parse_budget(args.memory_budget)),
                   optimization=OptimizerSettings(optimizer=args.optimizer), decoding=Decoding(max_new_tokens=4),
                   generation=GenerationSettings(val_batches=1, log_samples=0))
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
    profiled = PROFILED_STEPS if args.profile else 0
    if args.corpus:
        from ..models.modeling import TINY_MODEL

        batches, val_batches = corpus_batches(args.corpus, total_steps + profiled, args.batch_size, args.seq_len,
                                              args.pack, args.group_by_length, None if path == TINY_MODEL else path)
    else:
        batches = random_batches(total_steps + profiled, args.batch_size, args.seq_len)
        val_batches = batches[:1]
    profiler = StepProfiler(args.profile, cuda) if args.profile else None
    # Planned here, before any Trainer: the plain loop has none, and under one fit keeps this plan.
    lm.memory_plan = plan_training_memory(lm.model, lm.backend, lm.memory.budget_gib, args.batch_size,
                                          args.seq_len, report=lambda line: print(line, file=sys.stderr),
                                          packed=bool(args.corpus and args.pack))
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    plan = lm.memory_plan
    result = {
        "arch": args.arch, "backend": lm.backend.name, "loop": args.loop, "seq_len": args.seq_len,
        "batch_size": args.batch_size, "steps_timed": args.steps, "corpus": args.corpus, "packed": args.pack,
        "group_by_length": args.group_by_length, "quantized_4bit": lm.backend.quantized,
        "gradient_checkpointing_requested": not args.no_gradient_checkpointing,
        "memory_budget": args.memory_budget, "budget_gib": plan.budget_gib if plan else None,
        "checkpointed_layers": plan.checkpointed_layers if plan else None, "layers": plan.layers if plan else None,
        "memory_plan": plan.as_dict() if plan else None,
        "trainable_params": lm.param_counts[0], "rearm_checkpointing": args.rearm, "load_s": round(load_s, 1),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
    }
    times: dict = {}
    gc_seen: list = []

    def start_of_timed_steps() -> None:
        if cuda:
            torch.cuda.synchronize()
        times["t0"] = time.perf_counter()

    def end_of_timed_steps(loss: torch.Tensor) -> None:
        """The clock, the last loss and the peak memory, at the end of the timed steps (a profile runs after)."""
        if cuda:
            torch.cuda.synchronize()
            result["peak_mem_allocated_gib"] = _gib(torch.cuda.max_memory_allocated())
            result["peak_mem_reserved_gib"] = _gib(torch.cuda.max_memory_reserved())
        times["t1"] = time.perf_counter()
        result["final_loss"] = round(float(loss.detach()), 4)
    # The precision the steps run in: Lightning's bf16-mixed on CUDA, which the plain loop enters itself.
    precision_ctx = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
    if args.corpus and args.pack:  # the timed path: the kernel against the mask differs several-fold
        with precision_ctx():
            result["packed_attention"] = lm.backend.packed_attention(lm.model)

    if args.loop == "plain":
        lm.backend.for_training(lm.model)
        opt = lm.configure_optimizers()["optimizer"]

        def train_step(batch: dict) -> torch.Tensor:
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            with precision_ctx():
                loss, _ = lm(batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        for i, batch in enumerate(batches[:total_steps]):
            if i == args.warmup:
                start_of_timed_steps()
            loss = train_step(batch)
            gc_seen.append(lm.backend.checkpointing_as_planned(lm.model))
        end_of_timed_steps(loss)
        if profiler:
            profiler.start()
            for batch in batches[total_steps:]:
                train_step(batch)
            profiler.stop()
    else:
        import lightning as L
        from torch.utils.data import DataLoader

        class Timer(L.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if batch_idx == args.warmup:
                    start_of_timed_steps()
                if batch_idx == total_steps:
                    profiler.start()

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                if batch_idx < total_steps:
                    gc_seen.append(lm.backend.checkpointing_as_planned(lm.model))
                if batch_idx == total_steps - 1:
                    end_of_timed_steps(outputs["loss"])
                if batch_idx == total_steps + profiled - 1 and profiler:
                    profiler.stop()

        def loader(bs):
            return DataLoader(bs, batch_size=None)

        import tempfile

        root = tempfile.TemporaryDirectory()  # the run.json that fit ends with goes nowhere
        trainer = L.Trainer(
            default_root_dir=root.name,
            accelerator="gpu" if cuda else "cpu", devices=1, precision="bf16-mixed" if cuda else "32-true",
            max_steps=total_steps + profiled, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, num_sanity_val_steps=1 if args.sanity_val else 0,
            limit_val_batches=1, val_check_interval=None, check_val_every_n_epoch=1000, callbacks=[Timer()],
        )
        with root:
            trainer.fit(lm, train_dataloaders=loader(batches), val_dataloaders=loader(val_batches))
    if "t1" not in times:
        raise SystemExit("benchmark did not complete its timed steps")
    dt = times["t1"] - times["t0"]
    timed = batches[args.warmup:total_steps]
    # Non-padding tokens: a padded or partly filled packed row counts only what it holds.
    result["tokens_per_sec"] = round(sum(int(b["n_tokens"]) for b in timed) / dt, 1)
    result["fill"] = round(sum(int(b["n_tokens"]) for b in timed) / sum(b["input_ids"].numel() for b in timed), 3)
    result["step_s"] = round(dt / args.steps, 4)
    # Every timed step trained with the planned split (all layers checkpointed without a budget).
    result["checkpointing_as_planned"] = bool(gc_seen) and all(gc_seen[args.warmup:])
    if profiler:
        result["profile"] = args.profile
    return result


class StepProfiler:
    """torch's profiler over the steps between :meth:`start` and :meth:`stop`; ``stop`` writes the operators
    that took the time to ``path``, most device time first (CPU time without a GPU)."""

    def __init__(self, path: str, cuda: bool) -> None:
        from torch.profiler import ProfilerActivity, profile

        self.path, self.cuda = Path(path), cuda
        self.profile = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []))

    def start(self) -> None:
        self.profile.__enter__()

    def stop(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.profile.__exit__(None, None, None)
        key = "self_device_time_total" if self.cuda else "self_cpu_time_total"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(f"{PROFILED_STEPS} training steps after the timed ones, sorted by {key}\n"
                             + self.profile.key_averages().table(sort_by=key, row_limit=40), encoding="utf-8")


def run_trl(args) -> dict:
    """Unsloth's own recommended path on the same model, LoRA, batches and optimizer: TRL's SFTTrainer."""
    import tempfile

    from ..models.backends import resolve_backend
    from ..models.lora import LoraSettings

    if resolve_backend(args.backend) != "unsloth":
        from ..errors import UserError

        raise UserError("--loop trl is Unsloth's trainer: it needs a CUDA GPU with the unsloth extra")
    from unsloth import FastLanguageModel  # noqa: I001 - before trl and transformers
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    path = model_path_for(args.arch, args.model_path)
    lora = LoraSettings()
    total_steps = args.warmup + args.steps
    t_load = time.perf_counter()
    model, tokenizer = FastLanguageModel.from_pretrained(model_name=path, max_seq_length=args.seq_len, dtype=None,
                                                         load_in_4bit=not args.no_4bit, local_files_only=True)
    model = FastLanguageModel.get_peft_model(
        model, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules),
        bias="none", use_gradient_checkpointing=False if args.no_gradient_checkpointing else "unsloth",
        random_state=3407, max_seq_length=args.seq_len)
    load_s = time.perf_counter() - t_load
    ids = torch.cat([b["input_ids"] for b in random_batches(total_steps, args.batch_size, args.seq_len)])
    dataset = Dataset.from_dict({"input_ids": ids.tolist()})
    times: dict = {}

    class Timer(TrainerCallback):
        def on_step_begin(self, _args, state, control, **kwargs):
            if state.global_step == args.warmup:
                torch.cuda.synchronize()
                times["t0"] = time.perf_counter()

        def on_step_end(self, _args, state, control, **kwargs):
            if state.global_step == total_steps:
                torch.cuda.synchronize()
                times["t1"] = time.perf_counter()

    with tempfile.TemporaryDirectory() as out_dir:
        config = SFTConfig(output_dir=out_dir, per_device_train_batch_size=args.batch_size,
                           gradient_accumulation_steps=1, max_steps=total_steps, learning_rate=2e-4,
                           optim="adamw_8bit", bf16=True, logging_steps=total_steps, save_strategy="no",
                           report_to="none", max_length=args.seq_len, packing=False, seed=3407,
                           dataloader_num_workers=0, dataset_num_proc=1)
        trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=dataset, args=config,
                             callbacks=[Timer()])
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        stats = trainer.train()
    dt = times["t1"] - times["t0"]
    return {
        "arch": args.arch, "backend": "unsloth", "loop": "trl", "seq_len": args.seq_len,
        "batch_size": args.batch_size, "steps_timed": args.steps, "quantized_4bit": not args.no_4bit,
        "gradient_checkpointing_requested": not args.no_gradient_checkpointing, "memory_budget": None,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "load_s": round(load_s, 1), "device": torch.cuda.get_device_name(),
        "final_loss": round(float(stats.training_loss), 4),
        "tokens_per_sec": round(args.steps * args.batch_size * args.seq_len / dt, 1),
        "step_s": round(dt / args.steps, 4),
        "peak_mem_allocated_gib": _gib(torch.cuda.max_memory_allocated()),
        "peak_mem_reserved_gib": _gib(torch.cuda.max_memory_reserved()),
    }


def compare(args) -> list[dict]:
    """TRL's SFTTrainer, then this package at each budget of ``args.compare``, each in a fresh process."""
    import subprocess
    import tempfile

    common = ["--arch", args.arch, "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size),
              "--steps", str(args.steps), "--warmup", str(args.warmup), "--backend", args.backend]
    if args.model_path:
        common += ["--model-path", args.model_path]
    budgets = [b.strip() for b in args.compare.split(",") if b.strip()]
    for b in budgets:
        parse_budget(b)
    runs = [["--loop", "trl"]] + [["--loop", args.loop, "--memory-budget", b] for b in budgets]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, extra in enumerate(runs):
            out = Path(tmp) / f"{i}.jsonl"
            cmd = [sys.executable, "-m", "bengali_empathy", "benchmark", *common, *extra, "--json", str(out)]
            print("running: benchmark " + " ".join(common + extra), file=sys.stderr, flush=True)
            proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if proc.returncode != 0 or not out.is_file():
                tail = proc.stderr.strip().splitlines()[-3:]
                results.append({"loop": extra[1], "memory_budget": extra[-1] if len(extra) > 2 else None,
                                "error": " | ".join(tail)})
                continue
            results.append(json.loads(out.read_text(encoding="utf-8").splitlines()[-1]))
            print(json.dumps(results[-1], ensure_ascii=False), flush=True)
    return results


def comparison_table(results: list[dict]) -> str:
    """Markdown: tokens/s and peak memory of each run, relative to the first (TRL's SFTTrainer)."""
    ref = results[0].get("tokens_per_sec") if results else None
    lines = ["| path | budget (GiB) | layers checkpointed | tokens/s | vs SFTTrainer | peak allocated (GiB) "
             "| peak reserved (GiB) |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in results:
        path = "Unsloth + TRL SFTTrainer" if r.get("loop") == "trl" else f"bengali_empathy ({r.get('loop')})"
        if "error" in r:
            lines.append(f"| {path} | {r.get('memory_budget')} | failed: {r['error']} | | | | |")
            continue
        budget = r.get("memory_budget") or ("-" if r.get("loop") == "trl" else "none")
        if r.get("budget_gib") is not None and r.get("memory_budget") == "auto":
            budget = f"auto ({r['budget_gib']:.1f})"
        layers = f"{r['checkpointed_layers']} of {r['layers']}" if r.get("layers") else "all"
        speed = f"{r['tokens_per_sec'] / ref:.2f}x" if ref else ""
        memory = " | ".join(f"{r[k]:.2f}" if k in r else "-" for k in ("peak_mem_allocated_gib",
                                                                         "peak_mem_reserved_gib"))
        lines.append(f"| {path} | {budget} | {layers} | {r['tokens_per_sec']:,.0f} | {speed} | {memory} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    from jsonargparse import ArgumentParser

    p = ArgumentParser(prog="python -m bengali_empathy benchmark", description=__doc__.split("\n\n")[0],
                       exit_on_error=False)
    p.add_argument("--arch", default="tiny", choices=["tiny", "llama-3.1-8b"])
    p.add_argument("--model-path", default=None, help="local checkpoint to benchmark instead of --arch")
    p.add_argument("--backend", default="auto", choices=["auto", "unsloth", "hf"])
    p.add_argument("--loop", default="lightning", choices=["lightning", "plain", "trl"],
                   help="this package under Lightning or in a plain loop, or Unsloth's own TRL SFTTrainer")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--optimizer", default="auto")
    p.add_argument("--memory-budget", default="none",
                   help="model.memory.budget_gib: GiB, auto, or none (every layer checkpointed)")
    p.add_argument("--compare", default=None,
                   help="comma-separated budgets, e.g. 7,14,22,auto: TRL's SFTTrainer and this package at "
                        "each, each in its own process, as one table")
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
    p.add_argument("--profile", default=None,
                   help=f"write to this file the operators that took the time of {PROFILED_STEPS} steps run "
                        "after the timed ones under torch's profiler")
    args = p.parse_args(argv)
    if args.profile and (args.compare or args.loop == "trl"):
        from ..errors import UserError

        raise UserError("--profile records this package's own steps: not with --compare or --loop trl")
    results = compare(args) if args.compare else [run(args)]
    for result in results:
        line = json.dumps(result, ensure_ascii=False)
        if not args.compare:  # compare printed each as it finished
            print(line)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            with open(args.json, "a", encoding="utf-8") as fh:
                fh.write(line + "\n")
    if args.compare:
        print(comparison_table(results))
    return 0
