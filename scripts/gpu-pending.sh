#!/usr/bin/env bash
# The measurements owed by kernels written without a GPU (opt-in until measured; README marks them "not yet run on
# a GPU"), for the first device calls of the next session that has one. Each part fits one 10-minute call:
#   PART=a  builds (scripts/gpu-tune.sh), runs their tests, and llmq-kbench's fp8 and int8 rows at 1-64 tokens
#           against the defaults and cuBLASLt;
#   PART=e  llmq-kbench's w4a16 and w8a16 rows, LEAN 0 and 1;
#   PART=b  4-layer llama-3-8b W8A8 decode (fp8, int8-sq) at batch 1, 16 and 64, default against each switch;
#   PART=d  the same for weight-only (w4a16-rtn, w8a16);
#   PART=c  where a batch-64 and a batch-1 decode step goes, kernel by kernel (LLMQ_CUDA_TRACE), bf16 / fp8 /
#           int8-sq / w4a16 (the W8A8 batch-64 and the batch-1 targets of issue 4 are the ones still open).
# Opt-ins covered:
#   LLMQ_WGEMM_TILED_LEAN=1  (session 21) the tiled kernel's copies from a per-thread plan made once
#   LLMQ_WGEMM_TILED_W8A8=1  (session 22) W8A8 codes at 9-64 tokens through the tiled kernel instead of cuBLASLt
#   LLMQ_WGEMM_TILED_MIN_T=N (session 22) the tiled kernel from N tokens (batch 1 with LLMQ_GEMV_PREFER_T=0)
# When a switch is measured and made the default or dropped, take it out of this script.
# Usage on the device: OUT=$OUT PART=a scripts/gpu-pending.sh (then e, b, d, c)
set -uo pipefail
cd "$(dirname "$0")/.."
PART=${PART:-a}
export OUT=${OUT:-/tmp}
RUN_TESTS=0 KBENCH=0 METHODS="" scripts/gpu-tune.sh || exit 1
# llmq-kbench rows (us, GB/s, % of copy bandwidth) of the given formats, LEAN 0 and 1: wgemm / tiled / tiled with
# split K / GEMV, at 1 and 8 tokens too (the tiled kernel forced, against the GEMV and the one-token INT4 kernel).
kbench() {
  echo "== llmq-kbench $*"
  for lean in 0 1; do
    for f in "$@"; do
      LLMQ_WGEMM_TILED_LEAN=$lean build/gpu/llmq-kbench --only matmul --t 1,8,16,32,64 --format "$f" 2>&1 |
        grep -E "^(qkv|o|gate_up|down) " | sed "s/^/lean=$lean /"
    done
  done
}
case "$PART" in
  a)
    echo "== tests"
    t0=$(date +%s)
    build/gpu/tests/test_cuda --gtest_filter='CudaWgemm.*:CudaElementwise.*:CudaModel.QkvRaw*:CudaModel.W8A8Wide*' \
      > "$OUT/pending-tests.log" 2>&1
    grep -E "^\[ +(OK|FAILED) +\]|Failure|Expected|Which is|worst|largest" "$OUT/pending-tests.log" | head -60
    LLMQ_WGEMM_TILED_LEAN=1 build/gpu/tests/test_cuda --gtest_filter='CudaModel.WeightOnlyWide*' > "$OUT/pending-lean.log" 2>&1
    grep -E "^\[ +(OK|FAILED) +\]|Failure|largest" "$OUT/pending-lean.log" | sed 's/^/LEAN=1 /' | head -20
    echo "== tests in $(( $(date +%s) - t0 )) s"
    kbench fp8 int8
    echo "== cuBLASLt at 16 and 64 tokens (what W8A8 takes by default there)"
    build/gpu/llmq-kbench --only gemm --t 16,64 2>&1 | grep -E " lt "
    ;;
  e)
    kbench w4a16 w8a16
    ;;
  b)  # (at batch 1 the second switch set runs the tiled kernel instead of the GEMV)
    RUN_TESTS=0 KBENCH=0 METHODS="fp8 int8-sq" BATCHES="1 16 64" PREFILL=0 PROFILE=none \
      AB="LLMQ_WGEMM_TILED_W8A8=1 LLMQ_WGEMM_TILED_W8A8=1,LLMQ_WGEMM_TILED_MIN_T=1,LLMQ_GEMV_PREFER_T=0" \
      scripts/gpu-tune.sh | grep -v "^== built\|building for"
    ;;
  d)
    RUN_TESTS=0 KBENCH=0 METHODS="w4a16-rtn w8a16" BATCHES="1 16 64" PREFILL=0 PROFILE=none \
      AB="LLMQ_WGEMM_TILED_LEAN=1 LLMQ_WGEMM_TILED=1 LLMQ_WGEMM_TILED=1,LLMQ_WGEMM_TILED_LEAN=1 LLMQ_WGEMM_TILED=1,LLMQ_WGEMM_TILED_MIN_T=1,LLMQ_WGEMM_TILED_LEAN=1,LLMQ_GEMV_PREFER_T=0" \
      scripts/gpu-tune.sh | grep -v "^== built\|building for"
    ;;
  c)
    RUN_TESTS=0 KBENCH=0 METHODS="bf16 fp8 int8-sq w4a16-rtn" BATCHES="64 1" PREFILL=0 PROFILE=trace \
      scripts/gpu-tune.sh | grep -v "^== built\|building for"
    ;;
  *) echo "PART is a, b, c, d or e" >&2; exit 2 ;;
esac
