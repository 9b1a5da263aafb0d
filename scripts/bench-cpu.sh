#!/usr/bin/env bash
# CPU benchmark matrix on a shared model: llama.cpp's llama-bench protocol (pp512: prefill 512 tokens; tg128:
# generate 128 tokens from an empty context), plus decode after a 512-token prompt. Writes
# bench/results/<date>-cpu-<host>.json (one record per run, with the commit) and prints a table.
# Usage: scripts/bench-cpu.sh [MODEL] (default ../shared/models/llama-27m)
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-../shared/models/llama-27m}
LLMQ=build/release/llmq
[ -x $LLMQ ] || { cmake -S . -B build/release -DCMAKE_BUILD_TYPE=Release >/dev/null; cmake --build build/release -j"$(nproc)" --target llmq; }
COMMIT=$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src || echo "-dirty")
DATE=$(date -u +%Y-%m-%d)
OUT=bench/results/$DATE-cpu-$(hostname -s).json
runs=("pp512 --prompt-len 512 --gen-len 1" "tg128 --prompt-len 1 --gen-len 128" "tg128@512 --prompt-len 512 --gen-len 128")
echo "[" > "$OUT.tmp"
first=1
printf "%-10s %12s %12s %10s %10s %8s\n" run prefill_tok/s decode_tok/s GFLOP/s GB/s roof%
for r in "${runs[@]}"; do
  name=${r%% *}; args=${r#* }
  j=$($LLMQ bench "$MODEL" $args --repeats 5 --json)
  [ $first = 1 ] || echo "," >> "$OUT.tmp"
  first=0
  python3 - "$j" "$name" "$MODEL" "$COMMIT" "$DATE" >> "$OUT.tmp" <<'PY'
import json, sys
j = json.loads(sys.argv[1]); j.update(run=sys.argv[2], model=sys.argv[3], commit=sys.argv[4], date=sys.argv[5])
print(json.dumps(j, indent=1))
PY
  python3 -c "
import json,sys; j=json.loads(sys.argv[1])
print('%-10s %12.1f %12.1f %10.1f %10.1f %8.1f' % (sys.argv[2], j['prefill_tokens_per_s'], j['decode_tokens_per_s'], j['prefill_gflops'], j['achieved_gbps'], j['roofline_pct']))" "$j" "$name"
done
echo "]" >> "$OUT.tmp"
mv "$OUT.tmp" "$OUT"
echo "wrote $OUT"
