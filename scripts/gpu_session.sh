#!/usr/bin/env bash
# Runs on the lent GPU machine: installs carried wheels, runs the GPU tests and the benchmarks.
# Usage: bash scripts/gpu_session.sh STAGE   (STAGE: tests | bench8b | both)
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
export BENGALI_EMPATHY_CACHE=/tmp/be_cache
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 - <<'PY'
import torch, transformers, peft, lightning
print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__, "lightning", lightning.__version__)
import unsloth, bitsandbytes
print("unsloth", unsloth.__version__, "bitsandbytes", bitsandbytes.__version__)
PY
stage=${1:-both}
if [ "$stage" = tests ] || [ "$stage" = both ]; then
  timeout 300 python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tail -25
fi
B="python3 -m bengali_empathy benchmark --arch llama-3.1-8b --seq-len 2048 --batch-size 2 --json $OUT/bench.jsonl"
if [ "$stage" = bench8b ] || [ "$stage" = both ]; then
  timeout 240 $B --backend unsloth --loop lightning --steps ${STEPS:-15} --warmup 3 2>&1 | tail -4
  timeout 150 $B --backend unsloth --loop plain --steps ${STEPS:-15} --warmup 3 2>&1 | tail -2
  timeout 200 $B --backend hf --loop lightning --steps 8 --warmup 2 2>&1 | tail -2
fi
cat $OUT/bench.jsonl 2>/dev/null
