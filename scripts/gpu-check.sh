#!/usr/bin/env bash
# The one script a GPU machine runs: builds llmq with all its cores for the card it has, runs the GPU tests
# (ctest -L gpu: every CUDA kernel against the CPU reference, llama-27m on CUDA against the CPU engine; in the
# background while the first checkpoint is synthesized, the benchmarks waiting for them), then
# the benchmark matrix on synthetic checkpoints (`llmq synth`): METHODS x BATCHES on each of SHAPES, prompt
# 128 and 128 generated tokens (every batch size of a format in one `llmq bench --batches`: the model is
# loaded once), plus one batch-1 prefill of PREFILL tokens per (shape, method). Writes
# bench/results/<date>-<card>.json (one record per run) and prints a table last.
#
# Environment (defaults in brackets):
#   SHAPES   [llama-3-8b llama-2-7b] (empty: none)  METHODS [bf16 fp8 int8-sq w8a16 w4a16-awq]
#   BATCHES  [1 16 64]                          PREFILL [2048] (0: no prefill run)
#   RUN_TESTS [1]   WORK [/tmp/llmq-gpu-check] (synthetic models, up to ~50 GB; deleted as it goes)
#   QJOBS    [1] (quantizations at a time, in the background while the GPU tests and benchmarks run; with 2 the
#            tests, which share the CPU with them and which the benchmarks wait for, took 286 s on an H100 machine
#            of session 33, against 181 s one at a time on session 32's)
#   COMMIT   (recorded; default: git rev-parse HEAD, with "-dirty" where the tracked files differ from it: on a
#            copied checkout HEAD can be stale, which then shows as dirty; pass the commit there)
#   OUT      (if set, results and logs are copied there)
#   LM_HEAD  [none]; int8: every quantized checkpoint gets `llmq quantize --lm-head int8` (recorded as "lm_head")
#   DEVICE   [cuda]; cpu runs the same plumbing on the CPU (with SHAPES=tiny) to check the script itself
#   RESULT   [bench/results/<date>-<card>.json]
#   AB       variants to time against the defaults on the same machine, separated by ";", each a list of environment
#            assignments (e.g. AB="LLMQ_WGEMM_TILED_CLUSTER=0;LLMQ_WGEMM_TILED_EPI=3"): every (shape, method) runs the
#            default and then each variant, alternated ROUNDS [1] times; every record names its variant ("env", ""
#            for the defaults). Without AB and with ROUNDS 1, one run each as before.
# Under a time limit run it as `timeout 570 scripts/gpu-check.sh`: on SIGTERM it writes what it measured so far
# (marked "incomplete") once the running benchmark returns.
#
# w4a16-awq on a random-weight model: AWQ's search needs real activations to mean anything and takes hours
# for 8B parameters on a CPU, so the matrix quantizes with w4a16-rtn, which writes the same format and runs the
# same kernels (recorded as "quantized_with": "w4a16-rtn").
#
# On a machine without package access or ../shared, run scripts/gpu-pack.sh beforehand and carry .gpu.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
SHAPES=${SHAPES-"llama-3-8b llama-2-7b"}  # set but empty: no benchmarks (tests only)
METHODS=${METHODS-"bf16 fp8 int8-sq w8a16 w4a16-awq"}
BATCHES=${BATCHES-"1 16 64"}
PREFILL=${PREFILL:-2048}
RUN_TESTS=${RUN_TESTS:-1}
WORK=${WORK:-/tmp/llmq-gpu-check}
COMMIT=${COMMIT:-$(c=$(git rev-parse HEAD 2>/dev/null) && { git diff --quiet HEAD && echo "$c" || echo "$c-dirty"; } || echo unknown)}
DEVICE=${DEVICE:-cuda}
export LM_HEAD=${LM_HEAD:-none}
BATCH_LIST=$(echo $BATCHES | tr ' ' ',')  # llmq bench --batches
JOBS=$(nproc)
QJOBS=${QJOBS:-1}
AB=${AB:-}
ROUNDS=${ROUNDS:-1}
IFS=';' read -ra VARIANTS <<< "$AB"
VARIANTS=("" "${VARIANTS[@]}")  # the defaults first
for v in "${VARIANTS[@]}"; do
  for a in $v; do
    [[ "$a" =~ ^[A-Za-z_][A-Za-z0-9_]*=.*$ ]] || { echo "gpu-check: AB: '$a' is not NAME=VALUE" >&2; exit 2; }
  done
done
[[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || { echo "gpu-check: ROUNDS must be a positive integer, not '$ROUNDS'" >&2; exit 2; }
. scripts/gpu-env.sh  # sets SHARED

if [ "$DEVICE" = cuda ]; then
  CARD=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
  CAP=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)
  ARCH=${CUDA_ARCH:-$([ "$CAP" = 90 ] && echo 90a-real || echo "$CAP-real")}
else  # a dry run of the script's plumbing on the CPU
  CARD=cpu
  CAP=none
  ARCH=${CUDA_ARCH:-90a-real}
fi
echo "== $CARD (sm_$CAP), building for $ARCH with $JOBS jobs"
t0=$(date +%s)
cmake -S . -B build/gpu -DCMAKE_BUILD_TYPE=Release -DLLMQ_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$ARCH" \
  -DLLMQ_SHARED_DIR="$SHARED" >/dev/null
cmake --build build/gpu -j"$JOBS" 2>&1 | grep -E "error|warning|spill" || true
[ -x build/gpu/llmq ] || { echo "gpu-check: build failed" >&2; exit 1; }
echo "== built in $(( $(date +%s) - t0 )) s"
LLMQ="$ROOT/build/gpu/llmq"

# The GPU tests run in the background while the first shape's checkpoint is synthesized and quantized (host
# work); the benchmarks wait for them, so that nothing else runs on the GPU while they time it.
TESTS="not run"
TPID=""
if [ "$RUN_TESTS" = 1 ]; then
  echo "== GPU tests (in the background)"
  TESTS="cut short"
  t_tests=$(date +%s)
  # Three at a time, ahead of the quantization beside them (which runs at a lower priority, nice 10): their CPU
  # reference work competes with it. On the H100 machine (16 cores) the set took 212 s one at a time (session 29)
  # and 274 s four at a time (session 30; CudaModel.EveryFormatMatchesCpuEngine 228 s of it), both beside the
  # quantization at the same priority, against 105 s three at a time with nothing beside them. Three at a time
  # beside the quantization at nice 10: 152 s, and the whole default matrix finished in 584 s (session 31, H100).
  ctest --test-dir build/gpu -L gpu --output-on-failure -V -j 3 > /tmp/llmq-gpu-tests.log 2>&1 &
  TPID=$!
fi
wait_tests() {
  [ -n "$TPID" ] || return 0
  wait "$TPID" || true
  TPID=""
  grep -E "Test +#|nll cpu|ppl cpu|Failure|Expected|Which is|Value of|tests passed|tests failed" /tmp/llmq-gpu-tests.log | head -120 || true
  if grep -q "100% tests passed" /tmp/llmq-gpu-tests.log; then TESTS="passed"; else TESTS="FAILED"; fi
  echo "== GPU tests: $TESTS ($(( $(date +%s) - t_tests )) s)"
}

mkdir -p "$WORK"
REC="$WORK/records.jsonl"
: > "$REC"
# The results file and the table, also when the run is cut short (a time limit's SIGTERM): what was measured
# is never lost.
finish() {
  trap - TERM INT
  local slug result
  slug=$(echo "$CARD" | tr '[:upper:] ' '[:lower:]-' | tr -cd 'a-z0-9-')
  result=${RESULT:-"bench/results/$(date +%F)-$slug.json"}
  mkdir -p "$(dirname "$result")"
  python3 - "$REC" "$result" "$TESTS" "$1" <<'PY'
import json, sys
recs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
out = {"tests": sys.argv[3], "records": recs}
if sys.argv[4] != "complete":
    out["incomplete"] = sys.argv[4]
json.dump(out, open(sys.argv[2], "w"), indent=1)
print(f"\nGPU tests: {sys.argv[3]}   results: {sys.argv[2]}" + ("" if sys.argv[4] == "complete" else f"   ({sys.argv[4]})"))
ab = any(r.get("env") for r in recs)  # an AB run: the variant of each record last
print(f"{'shape':<11} {'method':<10} {'batch':>5} {'prompt':>6} {'decode tok/s':>12} {'GB/s':>7} {'roofline':>8} "
      f"{'prefill tok/s':>13} {'TFLOP/s':>7} {'peak GiB':>8}" + ("  env" if ab else ""))
for r in recs:
    env = f"  {r.get('env') or '(defaults)'}" if ab else ""
    if "error" in r:
        print(f"{r['shape']:<11} {r['method']:<10} {r['batch']:>5} {r['prompt_len']:>6}  error: {r['error']}{env}")
        continue
    print(f"{r['shape']:<11} {r['method']:<10} {r['batch']:>5} {r['prompt_len']:>6} {r['decode_tokens_per_s']:>12.1f} "
          f"{r['achieved_gbps']:>7.0f} {r['roofline_pct']:>7.1f}% {r['prefill_tokens_per_s']:>13.0f} "
          f"{r['prefill_gflops'] / 1000:>7.1f} {r['peak_memory_bytes'] / 2**30:>8.1f}{env}")
PY
  if [ -n "${OUT:-}" ]; then cp "$result" /tmp/llmq-gpu-tests.log "$OUT"/ 2>/dev/null || true; fi
}
QPID=""
trap 'finish "cut short by a signal"; [ -n "$QPID" ] && kill "$QPID" 2>/dev/null; [ -n "$TPID" ] && kill "$TPID" 2>/dev/null; exit 143' TERM INT
CALIB="$SHARED/data/c4/c4_validation_2k.jsonl"
run_bench() {  # shape method quantized_with dir [env]: one llmq bench, the model loaded once, for every batch of
  # BATCHES (prompt 128, 128 generated) and the PREFILL-token prefill, under a variant's environment assignments (AB)
  # if given (llmq bench --prefill-len; one process per method instead of two saves a model load each, ~10 a run)
  local out args=()
  if [ -n "$BATCHES" ]; then
    args=(--batches "$BATCH_LIST" --prompt-len 128 --gen-len 128)
    [ "$PREFILL" -gt 0 ] && args+=(--prefill-len "$PREFILL")
  else
    args=(--batches 1 --prompt-len "$PREFILL" --gen-len 1)
  fi
  local variant=${5:-}
  # shellcheck disable=SC2086  # the variant's assignments are words
  if out=$(env $variant "$LLMQ" bench "$4" --device "$DEVICE" "${args[@]}" --json 2>"$WORK/bench.err"); then
    BENCH_JSON="$out" python3 - "$1" "$2" "$3" "$CARD" "$COMMIT" "$variant" <<'PY' >> "$REC"
import json, os, sys, datetime
runs = json.loads(os.environ["BENCH_JSON"])["runs"]
shape, method, qw, card, commit, variant = sys.argv[1:]
for r in runs:
    rec = {"shape": shape, "method": method, "quantized_with": qw, "batch": r["batch"], "prompt_len": r["prompt_len"],
           "env": variant,
           "gen_len": r["gen_len"], "card": card, "commit": commit, "date": datetime.date.today().isoformat(),
           "lm_head": "none" if method == "bf16" else os.environ["LM_HEAD"]}
    for k in ["decode_tokens_per_s", "prefill_tokens_per_s", "ttft_ms", "tpot_ms", "achieved_gbps", "peak_gbps",
              "roofline_pct", "prefill_gflops", "peak_gflops", "prefill_pct_of_peak_flops", "weight_bytes",
              "bytes_per_token", "peak_memory_bytes", "device"]:
        rec[k] = r.get(k)
    print(json.dumps(rec))
PY
  else
    local msg
    msg=$(tail -1 "$WORK/bench.err")
    echo "bench failed: $1 $2: $msg"
    method_errors "$1" "$2" "$msg" "$variant"
  fi
}
method_errors() {  # shape method message [env]: an error record for each run the matrix has for this (shape, method)
  if [ -n "$BATCHES" ]; then error_records "$1" "$2" "$BATCH_LIST" 128 "$3" "${4:-}"; fi
  if [ "$PREFILL" -gt 0 ]; then error_records "$1" "$2" 1 "$PREFILL" "$3" "${4:-}"; fi
}
error_records() {  # shape method batches(comma-separated) prompt message [env]: one error record per batch
  local b
  for b in ${3//,/ }; do
    echo "{\"shape\": \"$1\", \"method\": \"$2\", \"batch\": $b, \"prompt_len\": $4, \"env\": $(printf '%s' "${6:-}" | python3 -c 'import json,sys; print(json.dumps(sys.stdin.read()))'), \"error\": $(printf '%s' "$5" | python3 -c 'import json,sys; print(json.dumps(sys.stdin.read().strip()))')}" >> "$REC"
  done
}

quantized_with() {  # method: the method its checkpoint is quantized with (w4a16-awq: w4a16-rtn, see the header)
  if [ "$1" = w4a16-awq ]; then echo w4a16-rtn; else echo "$1"; fi
}
quantize_one() {  # shape method base dir: one quantization (nice 10: the GPU tests beside it come first)
  local t0
  t0=$(date +%s)
  if nice -n 10 "$LLMQ" quantize "$3" -o "$4" --method "$2" --calib "$CALIB" --calib-samples 4 --calib-seq-len 128 \
       --lm-head "$LM_HEAD" >/dev/null 2>"$4.err"; then
    echo "== quantize $1 $2: $(( $(date +%s) - t0 )) s"
  else
    echo "quantize $1 $2 failed: $(tail -1 "$4.err")"
    touch "$4.failed"
  fi
}

for shape in $SHAPES; do
  base="$WORK/$shape"
  if [ ! -d "$base" ]; then
    t0=$(date +%s)
    # A shape that cannot be made (unknown name, full disk) is an error record for each of its runs, not the
    # end of the script: set -e ended it here before, with nothing written.
    if ! "$LLMQ" synth --shape "$shape" -o "$base" --tokenizer models/llama-7m-demo/tokenizer.json >/dev/null 2>"$WORK/synth.err"; then
      err="synth: $(head -1 "$WORK/synth.err")"  # llmq's one-line error (CLI11's hint follows a usage error)
      echo "$err"
      for method in $METHODS; do method_errors "$shape" "$method" "$err"; done
      rm -rf "$base"
      continue
    fi
    echo "== synth $shape: $(( $(date +%s) - t0 )) s"
  fi
  # Quantize the formats on the CPU in the background, QJOBS at a time in the order the benchmarks take them,
  # while the GPU benchmarks those already written (a quantized directory appears only when complete: quantize
  # renames it at the end). One at a time, the quantizations were the run's critical path: on an H100 machine
  # whose build took 125 s, llama-3-8b's four took 298 s beside the GPU tests (session 32).
  (
    running=0
    for method in $METHODS; do
      [ "$method" = bf16 ] && continue
      qw=$(quantized_with "$method")
      dir="$WORK/$shape-$qw"
      [ -d "$dir" ] && continue
      quantize_one "$shape" "$qw" "$base" "$dir" &
      running=$((running + 1))
      if [ "$running" -ge "$QJOBS" ]; then
        wait -n || true
        running=$((running - 1))
      fi
    done
    wait || true
  ) &
  QPID=$!
  wait_tests
  for method in $METHODS; do
    qw=$(quantized_with "$method")
    dir="$base"
    if [ "$method" != bf16 ]; then
      dir="$WORK/$shape-$qw"
      while [ ! -d "$dir" ] && [ ! -e "$dir.failed" ]; do sleep 2; done
      [ -e "$dir.failed" ] && continue
    fi
    # Every batch size and the prefill run on the model loaded once.
    if [ -n "$BATCHES" ] || [ "$PREFILL" -gt 0 ]; then
      for ((round = 0; round < ROUNDS; ++round)); do
        for v in "${VARIANTS[@]}"; do run_bench "$shape" "$method" "$qw" "$dir" "$v"; done
      done
    fi
    if [ "$method" != bf16 ]; then rm -rf "$dir"; fi
  done
  wait "$QPID" || true
  QPID=""
  # The last shape's ~20-50 GB are deleted after the results are written (a time limit falling in the cleanup
  # cut the whole run short, session 29).
  [ "$shape" = "${SHAPES##* }" ] || rm -rf "$base" "$WORK/$shape-"*
done
wait_tests
finish complete
for shape in $SHAPES; do rm -rf "${WORK:?}/$shape" "$WORK/$shape-"*; done
