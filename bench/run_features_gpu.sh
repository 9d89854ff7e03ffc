#!/usr/bin/env bash
# The feature benchmarks (quantized KV, LoRA, MoE, tiered KV, prompt scoring, speculative decoding,
# structured outputs, the serving sweep) on one GPU, JSON into $OUT (default bench/results), each step
# capped so that one slow benchmark cannot starve the others. Pick steps with STEPS (default: all).
#   PYTHONPATH=. OUT=/some/dir STEPS="kv_quant lora" bash bench/run_features_gpu.sh
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=${PYTHONPATH:-.}
OUT=${OUT:-bench/results}
STEPS=${STEPS:-"kv_quant lora moe_gemm tiered prompt_logprobs spec_decode structured serving kv_quant_long moe"}
GPU=${GPU:-h100}
mkdir -p "$OUT"
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jpaged_jax_cache}

status=0
step() {  # step SECONDS NAME ARGS...: run one benchmark if NAME is in STEPS, log it, remember a failure
  local limit=$1 name=$2
  shift 2
  case " $STEPS " in *" $name "*) ;; *) return ;; esac
  echo "=== $name: python -m $* (limit ${limit}s)"
  local t0=$SECONDS
  timeout "$limit" python3 -m "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 15 "$OUT/$name.log"
  echo "=== $name: status $rc after $((SECONDS - t0)) s"
  [ "$rc" -eq 0 ] || status=1
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
step 200 kv_quant bench.kv_quant_gpu --sections check,decode_kernel,decode_step,offline \
  --out "$OUT/kv_quant_gpu_$GPU.json"
step 150 lora bench.lora --out "$OUT/lora_llama3-8b_$GPU.json"
step 80 moe_gemm bench.moe --sections gemm --out "$OUT/moe_gemm_$GPU.json"
step 140 tiered bench.tiered_kv --out "$OUT/tiered_kv_llama3-8b_$GPU.json"
step 120 prompt_logprobs bench.prompt_logprobs --out "$OUT/prompt_logprobs_llama3-8b_$GPU.json"
step 150 spec_decode bench.spec_decode --out "$OUT/spec_decode_llama3-8b_$GPU.json"
step 140 structured bench.structured --out "$OUT/structured_llama3-8b_$GPU.json"
step 420 serving bench.serving --model llama3-8b --request-rates 1,4,8,16,32,inf --num-prompts 500 \
  --out "$OUT/serving_sweep_llama3-8b_$GPU.json"
step 300 kv_quant_long bench.kv_quant_gpu --sections long --out "$OUT/kv_quant_gpu_long_$GPU.json"
step 400 moe bench.moe --sections decode,offline --out "$OUT/moe_qwen3-30b-a3b_$GPU.json"
exit $status
