#!/usr/bin/env bash
# Installs what the build needs, builds llmq with warnings as errors, and runs the whole test suite with CTest:
#   1. Release build: unit tests, tokenizer conformance, exactness against transformers (reference.json),
#      and perplexity on the held-out texts (label "perplexity", a few minutes on 2 cores);
#   2. AddressSanitizer + UndefinedBehaviorSanitizer build (CPU code): every test except the perplexity runs
#      and the all-methods accuracy sweep (each method's code still runs there through the other quant tests).
# With nvcc present the release build includes the CUDA backend; its tests (label "gpu") run where a GPU is
# and are reported as skipped elsewhere. On a GPU machine, scripts/gpu-check.sh runs them with the benchmarks.
# Options: --fast (skip the perplexity label), --no-sanitize (skip step 2). CI runs it without options.
set -euo pipefail
cd "$(dirname "$0")/.."
FAST=0
SANITIZE=1
for a in "$@"; do
  case "$a" in
    --fast) FAST=1 ;;
    --no-sanitize) SANITIZE=0 ;;
    *) echo "usage: scripts/test.sh [--fast] [--no-sanitize]" >&2; exit 2 ;;
  esac
done
scripts/setup.sh
T0=$SECONDS
phase() { echo "== [$((SECONDS - T0)) s] $*"; }
JOBS=$(nproc)
SHARED="$(pwd)/../shared"
if [ ! -d "$SHARED/models" ]; then
  echo "test.sh: ../shared (models and data) is missing beside the checkout; the model tests need it" >&2
  exit 1
fi

# The CUDA backend is compiled wherever nvcc is (CI has no GPU: the "gpu" tests report themselves skipped).
if ! command -v nvcc >/dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then export PATH="/usr/local/cuda/bin:$PATH"; fi
phase "release build ($(command -v nvcc >/dev/null && echo "with the CUDA backend: $(nvcc --version | tail -1)" || echo "CPU only: no nvcc"))"
# CUDA targets: the default build's (CMakeLists.txt: SASS for sm_80, sm_89, sm_90a); LLMQ_TEST_CUDA_ARCHS overrides.
# (Until 43ba1c7 sm_80 was PTX only here: cuda_fp8.h's software E4M3 conversion, expanded into every FP8 loop,
# took NVVM ~7 and ptxas ~13 minutes on gemv.cu alone on a 2-core VM; fp8_sw.hpp's bit mapping takes seconds.)
CUDA_ARCHS="${LLMQ_TEST_CUDA_ARCHS:-80-real;89-real;90a-real}"
cmake -S . -B build/release -DCMAKE_BUILD_TYPE=Release -DLLMQ_WERROR=ON -DLLMQ_SHARED_DIR="$SHARED" \
  -DCMAKE_CUDA_ARCHITECTURES="$CUDA_ARCHS" >/dev/null
cmake --build build/release -j"$JOBS"
phase "release tests"
EXCLUDE=()
[ "$FAST" = 1 ] && EXCLUDE=(-LE perplexity)
ctest --test-dir build/release --output-on-failure "${EXCLUDE[@]}"

if [ "$SANITIZE" = 1 ]; then
  phase "ASan + UBSan build"
  # CPU code only: the CUDA runtime and ASan do not mix, and the release build already compiled the CUDA code.
  # -g1 (line tables: stack traces keep files, lines and functions) instead of -g: the full debug info of the
  # template-heavy tests was a large share of this build's time on CI's 2 cores.
  cmake -S . -B build/sanitize -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O2 -g1 -DNDEBUG" \
    -DLLMQ_SANITIZE=ON -DLLMQ_WERROR=ON -DLLMQ_CUDA=OFF -DLLMQ_SHARED_DIR="$SHARED" >/dev/null
  cmake --build build/sanitize -j"$JOBS"
  phase "ASan + UBSan tests (all but perplexity and the accuracy sweep)"
  # One OpenMP thread a test and $JOBS tests at a time: on 2 cores these tests took ~580 CPU-seconds so against
  # ~820 with two threads each (whose -j2 run was no faster than one test at a time, 423 against 417 s). The
  # release run above keeps the multi-threaded paths and their determinism checks.
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 OMP_NUM_THREADS=1 \
    ctest --test-dir build/sanitize --output-on-failure -j"$JOBS" -LE perplexity -E EveryMethodLoadsAndStaysWithinBudget
fi
phase "done"
