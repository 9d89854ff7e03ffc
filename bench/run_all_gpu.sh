#!/usr/bin/env bash
# The end-to-end benchmark set on one GPU (kernels bench excluded), JSON into $OUT (default bench/results).
# The issues' full-size workloads (each script's defaults, bench/README.md), except HF's batch-1
# latency at 64 new tokens; about 9 minutes on an H100. Every step is capped so that one slow
# benchmark cannot starve the others.
#   PYTHONPATH=. OUT=/some/dir bash bench/run_all_gpu.sh
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=.
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
# Compiled steps are shared between the scripts (same model shape, same buckets).
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jpaged_jax_cache}

status=0
step() {  # step SECONDS NAME ARGS...: run one benchmark, log its output, remember a failure
  local limit=$1 name=$2
  shift 2
  echo "=== $name: python -m $* (limit ${limit}s)"
  timeout "$limit" python -m "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { echo "=== $name failed with status $rc"; status=1; }
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt"
step 150 latency bench.latency --model llama3-8b --profile --hf --hf-modes eager,static --hf-new-tokens 64 \
  --out "$OUT/latency_llama3-8b.json"
step 240 throughput_llama3-8b bench.throughput --model llama3-8b --workloads fixed,nano \
  --hf --hf-batch-sizes 128,256 --out "$OUT/throughput_llama3-8b.json"
step 100 throughput_qwen3-0.6b bench.throughput --model qwen3-0.6b --workloads nano \
  --out "$OUT/throughput_qwen3-0.6b.json"
step 120 prefix bench.prefix --model llama3-8b --out "$OUT/prefix_llama3-8b.json"
exit $status
