#!/usr/bin/env bash
# Hardware-counter profiles (Nsight Compute) of the kernels that bound issue 4's open speed targets, for a GPU
# machine whose runtime lets ncu read the counters (Firecracker here; not gVisor). Builds build/gpu if it is
# missing, then profiles one launch of each (after warm-up launches) through llmq-kbench:
#   wgemm_i4_kernel  INT4 gate_up at 16 tokens (W4A16 at batch 16: 30% of the copy bandwidth)
#   flash_prefill_kernel  2048-token prefill attention (a third of the BF16 prefill time)
#   gemv_vec_kernel  FP8 x FP8 qkv at 1 token (the FP8 batch-1 row)
#   wgemm_tiled_kernel  INT4 gate_up at 16 tokens (the tiled kernel W4A16 batch 16 takes), default and with
#                    LLMQ_WGEMM_TILED_ILP=1 (set tiled; not in the default set)
# printing the speed of light, occupancy, launch statistics and warp stall reasons. Logs go to $OUT when set.
#   graph            (not in the default set) the batch-1 decode step of a 4-layer llama-3-8b fp8 cut as ONE
#                    workload (ncu --graph-profiling graph): its time, DRAM bytes and DRAM throughput over the
#                    whole graph, with PDL on and off. Question (session 34): the step moves 218 MB a layer at an
#                    effective ~2.1 TB/s however the loads are spread between kernels. Is the DRAM busy at low
#                    efficiency, or idle between kernels? Its first run (session 35) profiled nothing (skip count past the end).
# Environment: KERNELS [i4 flash fp8gemv] (a subset to run), NCU [ncu].
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
LOG=${OUT:-/tmp}
KERNELS=${KERNELS:-"i4 flash fp8gemv"}
NCU=${NCU:-ncu}
. scripts/gpu-env.sh  # sets SHARED
if [ ! -x build/gpu/llmq-kbench ]; then
  CAP=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)
  ARCH=${CUDA_ARCH:-$([ "$CAP" = 90 ] && echo 90a-real || echo "$CAP-real")}
  cmake -S . -B build/gpu -DCMAKE_BUILD_TYPE=Release -DLLMQ_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$ARCH" \
    -DLLMQ_SHARED_DIR="$SHARED" >/dev/null || exit 1
  cmake --build build/gpu -j"$(nproc)" --target llmq-kbench llmq > "$LOG/build.log" 2>&1 || { grep error "$LOG/build.log" | head; exit 1; }
fi
K=build/gpu/llmq-kbench
SECTIONS="--section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis"
prof() {  # name kernel-regex skip kbench-args...
  local name=$1 kern=$2 skip=$3
  shift 3
  echo "=== $name ($kern)"
  # shellcheck disable=SC2086
  timeout 240 "$NCU" --clock-control none -k "regex:$kern" -s "$skip" -c 1 $SECTIONS "$K" "$@" > "$LOG/ncu-$name.txt" 2>&1
  grep -E "Duration|Memory Throughput|DRAM Throughput|L1/TEX Hit|L2 Hit|Compute \(SM\)|Registers Per|Shared Memory Config|Achieved Occupancy|Theoretical Occ|Warp Cycles Per Issued|Issued Warp|No Eligible|Stall|Block Limit" \
    "$LOG/ncu-$name.txt" | head -40
}
for k in $KERNELS; do
  case $k in
    i4) prof i4-t16-gate_up wgemm_i4_kernel 3 --only matmul --format w4a16 --t 16 --matrix gate_up
        ( export LLMQ_WGEMM_I4_ONE_CTA=1; prof i4-t16-gate_up-one-cta wgemm_i4_kernel 3 --only matmul --format w4a16 --t 16 --matrix gate_up ) ;;
    flash) prof flash-2048 flash_prefill_kernel 1 --only attention ;;
    fp8gemv) prof fp8-gemv-t1-qkv gemv_vec_kernel 3 --only matmul --format fp8 --t 1 --matrix qkv ;;
    tiled) prof tiled-t16-gate_up wgemm_tiled_kernel 3 --only matmul --format w4a16 --t 16 --matrix gate_up
           ( export LLMQ_WGEMM_TILED_ILP=1; prof tiled-t16-gate_up-ilp wgemm_tiled_kernel 3 --only matmul --format w4a16 --t 16 --matrix gate_up ) ;;
    graph)
      W=/tmp/llmq-profile
      L=build/gpu/llmq
      if [ ! -d "$W/fp8" ]; then
        mkdir -p "$W"
        "$L" synth --shape llama-3-8b --layers 4 -o "$W/bf16" --tokenizer models/llama-7m-demo/tokenizer.json >/dev/null 2>&1
        "$L" quantize "$W/bf16" -o "$W/fp8" --method fp8 --calib "$SHARED/data/c4/c4_validation_2k.jsonl" \
          --calib-samples 4 --calib-seq-len 128 >/dev/null 2>&1 || { echo "graph: quantize failed"; continue; }
      fi
      for sw in LLMQ_NOOP=1 LLMQ_NO_PDL=1; do
        echo "=== decode graph, fp8 batch 1, $sw"
        # The eager prefill's kernels come first as workloads of their own; skip well past them and print a few
        # graph workloads (each one decode step of 4 layers). Session 35: -s 400 with 32 generated tokens skipped
        # every workload ("No graphs were profiled"), hence 512 tokens (~600 workloads) and -s 200.
        env "$sw" timeout 300 "$NCU" --graph-profiling graph --clock-control none -s 200 -c 3 \
          --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed \
          "$L" bench "$W/fp8" --device cuda --batch 1 --prompt-len 128 --gen-len 512 --repeats 1 > "$LOG/ncu-graph-$sw.txt" 2>&1
        grep -E "gpu__time_duration|dram__bytes_read|dram__throughput|==PROF==|Graph|graph" "$LOG/ncu-graph-$sw.txt" | head -30
      done ;;
    *) echo "unknown kernel set $k" ;;
  esac
done
