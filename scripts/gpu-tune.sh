#!/usr/bin/env bash
# Kernel tuning run for a GPU machine (the short loop; scripts/gpu-check.sh is the full matrix): builds for
# the card, optionally runs the GPU tests, runs llmq-kbench (every decode matmul format at llama-3-8b shapes,
# the prefill GEMMs, prefill attention), then profiles `llmq bench` per kernel on a llama-3-8b checkpoint cut
# to LAYERS layers (every matrix at full size: per-op times are those of the full model) for each of METHODS
# at batch 1, 64 and a PREFILL-token prefill. Logs go to $OUT when set.
#
# Environment: RUN_TESTS [1] (kernel tests first, model tests last), KBENCH [1], METHODS [bf16 fp8 w4a16-rtn] (empty: no profiles), LAYERS [4],
#              PREFILL [2048], BATCHES [1 64],
#              PROFILE [trace] (trace: LLMQ_CUDA_TRACE, every kernel of the decode graphs in order; events:
#              LLMQ_CUDA_PROFILE, eager launches timed per op; none),
#              AB [] (space-separated engine switches, e.g. "LLMQ_NO_FUSE_ROPE=1 LLMQ_WGEMM_MAX_T=16": each batch's
#              bench and the prefill also run once with each, tpot printed next to the default's; no profile for them;
#              several switches at once joined by commas, e.g. "LLMQ_WGEMM_TILED=1,LLMQ_WGEMM_TILED_STAGES=3"),
#              TARGETS [] (build only these targets, e.g. "llmq test_cuda"; empty: everything)
# On a machine without package access or ../shared, run scripts/gpu-pack.sh beforehand and carry .gpu.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
RUN_TESTS=${RUN_TESTS:-1}
KBENCH=${KBENCH:-1}
METHODS=${METHODS-"bf16 fp8 w4a16-rtn"}
LAYERS=${LAYERS:-4}
PREFILL=${PREFILL:-2048}
BATCHES=${BATCHES:-"1 64"}
AB=${AB:-}
PROFILE=${PROFILE:-trace}
profile() {  # llmq bench arguments: one run with the chosen per-kernel report on stderr
  case "$PROFILE" in
    trace) LLMQ_CUDA_TRACE=1 "$LLMQ" bench "$@" 2>&1 >/dev/null | grep -v "^llmq: note" ;;
    events) LLMQ_CUDA_PROFILE=1 "$LLMQ" bench "$@" 2>&1 >/dev/null | grep -v "^llmq: note" ;;
  esac
}
LOG=${OUT:-/tmp}
. scripts/gpu-env.sh  # sets SHARED
CAP=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)
ARCH=${CUDA_ARCH:-$([ "$CAP" = 90 ] && echo 90a-real || echo "$CAP-real")}
echo "== $(nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader | head -1), building for $ARCH"
t0=$(date +%s)
cmake -S . -B build/gpu -DCMAKE_BUILD_TYPE=Release -DLLMQ_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$ARCH" \
  -DLLMQ_SHARED_DIR="$SHARED" >/dev/null || exit 1
cmake --build build/gpu -j"$(nproc)" ${TARGETS:+--target $TARGETS} > "$LOG/build.log" 2>&1 || { grep -E "error" "$LOG/build.log" | head -20; exit 1; }
echo "== built in $(( $(date +%s) - t0 )) s"
LLMQ="$ROOT/build/gpu/llmq"

# The kernel tests first (seconds), the whole-model tests (minutes: they quantize llama-27m) last.
gpu_tests() {  # gtest filter, log name
  local t0
  t0=$(date +%s)
  build/gpu/tests/test_cuda --gtest_filter="$1" > "$LOG/$2.log" 2>&1
  grep -E "Failure|Expected|Which is|Value of|PASSED|FAILED|nll cpu|ppl cpu" "$LOG/$2.log" | head -40
  echo "== $2 in $(( $(date +%s) - t0 )) s"
}
[ "$RUN_TESTS" = 1 ] && gpu_tests 'CudaGemv*:CudaWgemm*:CudaMatmul*:CudaElementwise*:CudaAttention*:CudaHost*' kernel-tests
if [ "$KBENCH" = 1 ]; then
  build/gpu/llmq-kbench 2>&1 | tee "$LOG/kbench.txt"
fi
if [ -n "$METHODS" ]; then
  W=/tmp/llmq-tune
  rm -rf "$W"
  mkdir -p "$W"
  "$LLMQ" synth --shape llama-3-8b --layers "$LAYERS" -o "$W/bf16" --tokenizer models/llama-7m-demo/tokenizer.json >/dev/null 2>&1
  for m in $METHODS; do
    dir="$W/bf16"
    if [ "$m" != bf16 ]; then
      dir="$W/$m"
      "$LLMQ" quantize "$W/bf16" -o "$dir" --method "$m" --calib "$SHARED/data/c4/c4_validation_2k.jsonl" \
        --calib-samples 4 --calib-seq-len 128 >/dev/null 2>"$W/q.err" || { tail -1 "$W/q.err"; continue; }
    fi
    for b in $BATCHES; do
      echo "--- $m, $LAYERS layers, batch $b, prompt 128, gen 32: graphed, then per op"
      for sw in default $AB; do
        printf '%-26s ' "$sw"
        ( [ "$sw" = default ] || export ${sw//,/ }
          "$LLMQ" bench "$dir" --device cuda --batch "$b" --prompt-len 128 --gen-len 32 --repeats 2 --json 2>/dev/null ) |
          python3 -c 'import json,sys; r=json.load(sys.stdin); print("decode %.1f tok/s, tpot %.3f ms, %.0f GB/s (%.1f%%)" % (r["decode_tokens_per_s"], r["tpot_ms"], r["achieved_gbps"], r["roofline_pct"]))' ||
          echo "failed"
      done
      profile "$dir" --device cuda --batch "$b" --prompt-len 128 --gen-len 32 --repeats 1
    done
    if [ "$PREFILL" -gt 0 ]; then
      echo "--- $m, $LAYERS layers, prefill $PREFILL"
      for sw in default $AB; do
        printf '%-26s ' "$sw"
        ( [ "$sw" = default ] || export ${sw//,/ }
          "$LLMQ" bench "$dir" --device cuda --prompt-len "$PREFILL" --gen-len 1 --repeats 2 --json 2>/dev/null ) |
          python3 -c 'import json,sys; r=json.load(sys.stdin); print("prefill %.0f tok/s, ttft %.1f ms, %.1f TFLOP/s (%.1f%%)" % (r["prefill_tokens_per_s"], r["ttft_ms"], r["prefill_gflops"]/1e3, r["prefill_pct_of_peak_flops"] if "prefill_pct_of_peak_flops" in r else 0))' ||
          echo "failed"
      done
      profile "$dir" --device cuda --prompt-len "$PREFILL" --gen-len 1 --repeats 1
    fi
    [ "$m" != bf16 ] && rm -rf "$dir"
  done
fi
if [ "$RUN_TESTS" = 1 ]; then gpu_tests 'CudaModel*' model-tests; fi
exit 0
