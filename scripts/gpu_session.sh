#!/usr/bin/env bash
# Runs on the lent GPU machine: installs carried wheels, runs GPU tests and benchmarks.
# Usage: bash scripts/gpu_session.sh STEP...
#   STEP: tests | unsloth | unsloth_plain | norearm | hf | hf_plain | corpus_packed | corpus_unpacked | corpus_grouped
# corpus_* read $CORPUS (default .gpu_data/conversations.jsonl: carry a copy of
# ../shared/data/dailydialog_bn_sample/conversations.jsonl there, git-ignored).
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
export BENGALI_EMPATHY_CACHE=/tmp/be_cache
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
CORPUS=${CORPUS:-.gpu_data/conversations.jsonl}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
B="python3 -m bengali_empathy benchmark --arch llama-3.1-8b --seq-len 2048 --json $OUT/bench.jsonl"
S=${STEPS:-25}
for step in "$@"; do
  echo "=== $step $(date +%T)"
  case $step in
    tests) timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -x -m gpu tests/test_gpu.py -p no:cacheprovider \
             -W ignore::UserWarning --tb=short >"$OUT/gpu_tests.log" 2>&1; tail -30 "$OUT/gpu_tests.log" ;;
    unsloth) timeout 240 $B --batch-size 2 --backend unsloth --loop lightning --steps $S --warmup 5 2>&1 | tail -1 ;;
    unsloth_plain) timeout 200 $B --batch-size 2 --backend unsloth --loop plain --steps $S --warmup 5 2>&1 | tail -1 ;;
    norearm) timeout 200 $B --batch-size 2 --backend unsloth --loop lightning --steps 10 --warmup 3 --no-rearm 2>&1 | tail -1 ;;
    hf) timeout 300 $B --batch-size 2 --backend hf --loop lightning --steps 8 --warmup 2 2>&1 | tail -1 ;;
    hf_plain) timeout 300 $B --batch-size 2 --backend hf --loop plain --steps 8 --warmup 2 2>&1 | tail -1 ;;
    corpus_packed) timeout 300 $B --batch-size 2 --backend unsloth --loop lightning --steps $S --warmup 5 \
             --corpus "$CORPUS" --pack 2>&1 | tail -1 ;;
    corpus_unpacked) timeout 300 $B --batch-size ${UNPACKED_BS:-8} --backend unsloth --loop lightning --steps $S \
             --warmup 5 --corpus "$CORPUS" 2>&1 | tail -1 ;;
    corpus_grouped) timeout 300 $B --batch-size ${UNPACKED_BS:-8} --backend unsloth --loop lightning --steps $S \
             --warmup 5 --corpus "$CORPUS" --group-by-length 2>&1 | tail -1 ;;
  esac
done
echo "=== done $(date +%T)"
