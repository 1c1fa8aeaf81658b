#!/usr/bin/env bash
# GPU tests and benchmarks on a CUDA machine, from the repository root: bash scripts/gpu_bench.sh STEP...
#   STEP: tests (every test marked gpu) | unsloth | unsloth_plain | norearm | hf | hf_plain | corpus_packed | corpus_unpacked | corpus_grouped
#         | corpus_packed_hf | sft
#         | model8b | predict | predicts | compare | fitbudget | probe | profile | gguf8b | dpo8b
# Environment:
#   WHEELS=DIR   optional: a directory of wheels (e.g. unsloth, bitsandbytes, this package's dependencies) to
#                install offline into /tmp/site first; without it the script uses the Python environment it
#                runs in (e.g. after `pip install -e '.[unsloth,test]'`).
#   OUT=DIR      where results and logs go (default /tmp/out).
#   CORPUS=FILE  the `messages` JSONL of the corpus_* / predict / fitbudget / dpo8b / probe / profile steps
#                (default .gpu_data/conversations.jsonl, git-ignored: e.g. a copy of a DailyDialog-bn
#                conversations.jsonl such as tests/fixtures/dailydialog_bn/conversations.jsonl).
# model8b writes a random-weight Llama-3.1-8B checkpoint (bf16) into the cache and links it as /tmp/llama8b; the
# steps that take /tmp/llama8b need it first.
# sft: Unsloth's own TRL SFTTrainer (padding-free, batch $SFT_BS, default 8) on $CORPUS and /tmp/llama8b through
# $SFT_PROBE, a script taking MODEL_DIR CORPUS --bs --steps --warmup that prints one JSON line.
# unsloth, hf, corpus_*: $BUDGET (default none) is the memory budget, e.g. the sft step's peak; PROFILE=1: each
# writes the operators that took the time of the steps after the timed ones to $OUT/STEP.profile.txt
# (benchmark --profile).
# compare: Unsloth's TRL SFTTrainer and this package at each memory budget of $BUDGETS, one table.
# fitbudget: `fit` of the 8B config on $CORPUS for 30 steps at each budget of $FIT_BUDGETS: the plan line,
# tokens/s and the peak against the budget.
# predict: `predict` end to end on /tmp/llama8b for each generation batch size in $GEN_BS, on $ROWS training
# rows of $CORPUS, with $PREDICT_ARGS.
# predicts: `predict` of the 8B hf config per entry of $VARIANTS ("NAME|ARGS;NAME|ARGS...").
# probe: scripts/generation_probe.py on /tmp/llama8b with $PROBE_ARGS (engines, batch sizes, reply lengths).
# profile: scripts/engine_profile.py on /tmp/llama8b, one process per entry of $PROFILES (prefill variants,
# first call against later calls, kernel profiles, decoding steps).
# gguf8b: export of a random LoRA adapter on /tmp/llama8b as bf16 hf, f16 GGUF and q4_k_m GGUF: wall time, peak
# host memory and size of each (scripts/gguf_8b_probe.py), one JSON line each in $OUT/gguf8b.jsonl.
# dpo8b: DPO (policy + reference passes) of /tmp/llama8b with Unsloth at the 14 GiB budget for $DPO_STEPS steps
# of $DPO_BS pairs, on pairs built from $CORPUS by scripts/make_preference_pairs.py.
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
export BENGALI_EMPATHY_CACHE=${BENGALI_EMPATHY_CACHE:-/tmp/be_cache}
if [ -n "${WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$WHEELS"/*.whl 2>&1 | tail -2
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
CORPUS=${CORPUS:-.gpu_data/conversations.jsonl}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
B="python3 -m bengali_empathy benchmark --arch llama-3.1-8b --seq-len 2048 --json $OUT/bench.jsonl"
S=${STEPS:-25}
# bench SECONDS ARGS...: one benchmark run; its whole output goes to $OUT/STEP.log, its result line to stdout;
# with PROFILE=1 the operators of the steps after the timed ones go to $OUT/STEP.profile.txt
bench() { timeout "$1" $B "${@:2}" ${PROFILE:+--profile "$OUT/$step.profile.txt"} 2>&1 | tee -a "$OUT/$step.log" \
  | tail -1; }
for step in "$@"; do
  echo "=== $step $(date +%T)"
  case $step in
    tests) # -v: each test's outcome is in the log as it ends, so a run cut short by the timeout still says which passed
           timeout ${TEST_TIMEOUT:-480} python3 -m pytest -v -m gpu --durations=0 tests/scenarios/test_gpu.py \
             tests/scenarios/test_ddp.py ${PYTEST_K:+-k "$PYTEST_K"} -p no:cacheprovider -rP \
             -W ignore::UserWarning --tb=short >"$OUT/gpu_tests.log" 2>&1
           grep -E "PASSED|FAILED|passed|failed|^E " "$OUT/gpu_tests.log" | tail -40 ;;
    unsloth) bench 240 --batch-size 2 --backend unsloth --loop lightning --steps $S --warmup 5 \
             --memory-budget ${BUDGET:-none} ;;
    unsloth_plain) bench 200 --batch-size 2 --backend unsloth --loop plain --steps $S --warmup 5 ;;
    norearm) bench 200 --batch-size 2 --backend unsloth --loop lightning --steps 10 --warmup 3 --no-rearm ;;
    hf) bench 300 --batch-size 2 --backend hf --loop lightning --steps 8 --warmup 2 --memory-budget ${BUDGET:-none} ;;
    hf_plain) bench 300 --batch-size 2 --backend hf --loop plain --steps 8 --warmup 2 ;;
    corpus_packed) bench 300 --batch-size ${PACKED_BS:-2} --backend unsloth --loop lightning --steps $S --warmup 5 \
             --corpus "$CORPUS" --pack --memory-budget ${BUDGET:-none} ;;
    corpus_packed_hf) bench 300 --batch-size ${PACKED_BS:-2} --backend hf --loop lightning --steps $S --warmup 5 \
             --corpus "$CORPUS" --pack --memory-budget ${BUDGET:-none} ;;
    sft) timeout 300 python3 "$SFT_PROBE" /tmp/llama8b "$CORPUS" --bs ${SFT_BS:-8} --steps $S --warmup 5 \
             2>"$OUT/sft.err" | tail -1 | tee -a "$OUT/bench.jsonl" ;;
    corpus_unpacked) bench 300 --batch-size ${UNPACKED_BS:-8} --backend unsloth --loop lightning --steps $S \
             --warmup 5 --corpus "$CORPUS" ;;
    corpus_grouped) bench 300 --batch-size ${UNPACKED_BS:-8} --backend unsloth --loop lightning --steps $S \
             --warmup 5 --corpus "$CORPUS" --group-by-length --memory-budget ${BUDGET:-none} ;;
    compare) timeout ${COMPARE_TIMEOUT:-540} $B --batch-size 2 --steps $S --warmup 5 \
             --compare ${BUDGETS:-none,7,14,22,auto} 2>"$OUT/compare.err" | tee "$OUT/compare.out" ;;
    fitbudget) for b in ${FIT_BUDGETS:-14}; do
               timeout ${FIT_TIMEOUT:-300} python3 -m bengali_empathy fit --config configs/llama31_8b_unsloth.yaml \
                 --model.model_name_or_path /tmp/llama8b --data.corpus_path "$CORPUS" --model.memory.budget_gib $b \
                 --trainer.max_steps 30 --trainer.max_epochs -1 --trainer.val_check_interval 20 \
                 --trainer.limit_val_batches 1 --model.decoding.max_new_tokens 16 --trainer.default_root_dir "$OUT/fit_b$b" \
                 >"$OUT/fit_b$b.log" 2>&1
               echo "rc=$? budget=$b"; grep -aE "^(memory budget|peak GPU|error)|out of GPU memory|Error" "$OUT/fit_b$b.log" | head -20
               for f in $(find "$OUT/fit_b$b" -name "events.out*" -o -name run.json); do cp "$f" "$OUT/b${b}_$(basename $f)"; done
             done ;;
    dpo8b) python3 scripts/make_preference_pairs.py "$CORPUS" /tmp/dpo_pairs.jsonl
           timeout ${DPO_TIMEOUT:-280} python3 -m bengali_empathy fit --config configs/llama31_8b_unsloth.yaml \
             --model.model_name_or_path /tmp/llama8b --model.objective.name dpo --model.learning_rate 5e-6 \
             --model.memory.budget_gib 14 --data.corpus_path /tmp/dpo_pairs.jsonl --data.batch_size ${DPO_BS:-4} \
             --data.eval_batch_size ${DPO_BS:-4} --trainer.max_steps ${DPO_STEPS:-20} --trainer.max_epochs -1 \
             --trainer.val_check_interval ${DPO_STEPS:-20} --trainer.limit_val_batches 1 --trainer.log_every_n_steps 5 \
             --trainer.default_root_dir /tmp/dpo8b >"$OUT/dpo8b.log" 2>&1
           echo "rc=$?"; grep -aE "^(memory budget|peak GPU|backend=|error)|out of GPU memory|Error" "$OUT/dpo8b.log" | head -20
           python3 - /tmp/dpo8b <<'PY'
import json, pathlib, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
run = next(pathlib.Path(sys.argv[1]).rglob("run.json")).parent
acc = EventAccumulator(str(run)); acc.Reload()
tags = acc.Tags()["scalars"]
for tag in ("perf/tokens_per_sec", "gpu/max_mem_reserved_gib", "train/reward_accuracy", "train/reward_margin"):
    if tag in tags:
        print(tag, [(e.step, round(e.value, 3)) for e in acc.Scalars(tag)])
rec = json.loads((run / "run.json").read_text())
print("peak GiB", rec["peak_memory_gib"], "wall_s", round(rec["wall_seconds"], 1), "plan", rec["model"]["memory_plan"])
PY
           for f in $(find /tmp/dpo8b -name "events.out*" -o -name run.json); do cp "$f" "$OUT/dpo8b_$(basename $f)"; done ;;
    model8b) M8=$BENGALI_EMPATHY_CACHE/random-llama-3.1-8b  # where benchmark --arch llama-3.1-8b looks too
             [ -f $M8/config.json ] || timeout 400 python3 -c "from bengali_empathy.models.modeling import \
             write_random_model, LLAMA31_8B_ARCH; write_random_model('$M8', LLAMA31_8B_ARCH, \
             dtype='bfloat16', device='cuda')"; ln -sfn $M8 /tmp/llama8b; ls /tmp/llama8b/ ;;
    gguf8b) timeout ${GGUF_TIMEOUT:-530} python3 scripts/gguf_8b_probe.py /tmp/llama8b /tmp/gguf8b "$OUT/gguf8b.jsonl" \
             >"$OUT/gguf8b.log" 2>&1; echo "rc=$?"; tail -4 "$OUT/gguf8b.log"; rm -rf /tmp/gguf8b; df -h /tmp | tail -1 ;;
    predict) for bs in ${GEN_BS:-128}; do
               timeout ${PREDICT_TIMEOUT:-400} python3 -m bengali_empathy predict --config configs/llama31_8b_unsloth.yaml \
                 --model.model_name_or_path /tmp/llama8b --data.corpus_path "$CORPUS" --data.predict.split train \
                 --data.predict.max_samples ${ROWS:-512} --model.decoding.max_new_tokens 128 --model.generation.batch_size $bs \
                 --trainer.default_root_dir "$OUT/predict_bs$bs" ${PREDICT_ARGS:-} >"$OUT/predict_bs$bs.log" 2>&1
               echo "rc=$? bs=$bs"; grep -E "^(wrote|generated|tuned|warning|error)|out of GPU memory" "$OUT/predict_bs$bs.log"
               nvidia-smi --query-gpu=memory.used --format=csv,noheader
             done ;;
    predicts) # $VARIANTS: "NAME|ARGS;NAME|ARGS..." -- `predict` of the 8B hf config (4-bit) on $ROWS training rows
             # of $CORPUS per variant; prints the plan line and metrics.json's generation statistics.
             printf '%s\n' "${VARIANTS:-}" | tr ';' '\n' | while IFS='|' read -r name args; do
               [ -n "$name" ] || continue
               timeout ${PREDICT_TIMEOUT:-400} python3 -m bengali_empathy predict --config configs/llama31_8b_hf.yaml \
                 --model.model_name_or_path /tmp/llama8b --data.corpus_path "$CORPUS" --data.predict.split train \
                 --data.predict.max_samples ${ROWS:-512} --trainer.default_root_dir "$OUT/predict_$name" $args \
                 >"$OUT/predict_$name.log" 2>&1
               echo "rc=$? $name: $args"
               grep -aE "generating:|^(wrote|generated|error)|out of GPU memory|Error" "$OUT/predict_$name.log" | tail -4
               find "$OUT/predict_$name" -name metrics.json | head -1 | xargs -r python3 -c \
                 "import json,sys; print('$name', json.dumps(json.load(open(sys.argv[1])).get('generation')))" \
                 | tee -a "$OUT/predicts.jsonl"
             done ;;
    profile) # $PROFILES: "ARGS;ARGS..." -- one process of scripts/engine_profile.py per entry (default $PROFILE_ARGS)
             printf '%s\n' "${PROFILES:-${PROFILE_ARGS:-}}" | tr ';' '\n' | while read -r args; do
               timeout ${PROFILE_TIMEOUT:-400} python3 scripts/engine_profile.py /tmp/llama8b --corpus "$CORPUS" \
                 --json "$OUT/profile.jsonl" $args 2>>"$OUT/profile.err" | cut -c1-400; echo "rc=$? $args"
             done ;;
    probe) timeout ${PROBE_TIMEOUT:-480} python3 scripts/generation_probe.py /tmp/llama8b --corpus "$CORPUS" \
             --json "$OUT/probe.jsonl" ${PROBE_ARGS:-} 2>"$OUT/probe.err"; echo "rc=$?"; tail -3 "$OUT/probe.err" ;;
  esac
done
echo "=== done $(date +%T)"
