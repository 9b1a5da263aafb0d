#!/usr/bin/env bash
# Quantization accuracy matrix (issue: quantization pipeline): every method on a model, calibrated on C4 with
# the defaults, evaluated with `llmq eval` on docs-en.txt (ctx 512, first 64 windows); then calibration on
# code (the first half of code-py.txt) versus C4, evaluated on the second half of code-py.txt.
# Writes bench/results/<date>-quant-<model>.json and prints a table. Takes ~15 minutes on 2 cores for llama-27m.
# Usage: scripts/quant-eval.sh [MODEL] [WINDOWS]
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-../shared/models/llama-27m}
WINDOWS=${2:-64}
LLMQ=build/release/llmq
[ -x $LLMQ ] || { cmake -S . -B build/release -DCMAKE_BUILD_TYPE=Release >/dev/null; cmake --build build/release -j"$(nproc)" --target llmq; }
SHARED=../shared
C4=$SHARED/data/c4/c4_validation_2k.jsonl
DOCS=$SHARED/data/eval/docs-en.txt
WORK=$(mktemp -d /tmp/llmq-quant-eval-XXXXXX)
trap 'rm -rf "$WORK"' EXIT
NAME=$(basename "$MODEL")
OUT=bench/results/$(date -u +%Y-%m-%d)-quant-$NAME.json
COMMIT=$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src || echo "-dirty")

# code-py.txt split in halves: calibrate on the first, evaluate on the second
python3 - "$SHARED/data/eval/code-py.txt" "$WORK" <<'PY'
import sys
t = open(sys.argv[1], encoding="utf-8").read()
h = len(t) // 2
open(sys.argv[2] + "/code-calib.txt", "w", encoding="utf-8").write(t[:h])
open(sys.argv[2] + "/code-eval.txt", "w", encoding="utf-8").write(t[h:])
PY

records=()
run() {  # name, eval text, quantize args...
  local name=$1 text=$2; shift 2
  local q e
  q=$($LLMQ quantize "$MODEL" -o "$WORK/$name" "$@" --json 2>"$WORK/$name.log")
  e=$($LLMQ eval "$WORK/$name" --baseline "$MODEL" --text "$text" --max-windows "$WINDOWS" --json 2>/dev/null)
  records+=("$(python3 -c 'import json,sys; q=json.loads(sys.argv[1]); e=json.loads(sys.argv[2]); q["quantize_seconds"]=q.pop("seconds"); e["eval_seconds"]=e.pop("seconds"); q.update(e); q["run"]=sys.argv[3]; q["eval_text"]=sys.argv[4]; q["args"]=sys.argv[5]; print(json.dumps(q))' "$q" "$e" "$name" "$(basename "$text")" "$*")")
  rm -rf "${WORK:?}/$name"
}
run fp8 "$DOCS" --method fp8 --calib "$C4"
run fp8-kvfp8 "$DOCS" --method fp8 --kv-cache fp8 --calib "$C4"
run int8-sq "$DOCS" --method int8-sq --calib "$C4"
run w8a16 "$DOCS" --method w8a16
run w4a16-rtn "$DOCS" --method w4a16-rtn
run w4a16-awq "$DOCS" --method w4a16-awq --calib "$C4"
run w4a16-gptq "$DOCS" --method w4a16-gptq --calib "$C4"
run code:rtn "$WORK/code-eval.txt" --method w4a16-rtn
run code:gptq-c4 "$WORK/code-eval.txt" --method w4a16-gptq --calib "$C4"
run code:gptq-code "$WORK/code-eval.txt" --method w4a16-gptq --calib "$WORK/code-calib.txt"
run code:awq-c4 "$WORK/code-eval.txt" --method w4a16-awq --calib "$C4"
run code:awq-code "$WORK/code-eval.txt" --method w4a16-awq --calib "$WORK/code-calib.txt"

printf '%s\n' "${records[@]}" | python3 -c '
import json, sys
recs = [json.loads(l) for l in sys.stdin if l.strip()]
meta = {"model": sys.argv[1], "commit": sys.argv[2], "windows": int(sys.argv[3]), "machine": sys.argv[4]}
json.dump({"meta": meta, "runs": recs}, open(sys.argv[5], "w"), indent=1)
print("%-16s %-13s %9s %9s %9s %8s %7s %8s" % ("run", "eval text", "ppl", "delta%", "KLD", "top-1%", "bits", "quant s"))
for r in recs:
    print("%-16s %-13s %9.4f %+9.3f %9.5f %8.2f %7.2f %8.1f" % (r["run"], r["eval_text"], r["ppl"], r["delta_ppl_pct"], r["mean_kld"], 100*r["top1_agreement"], r["bits_per_weight"], r["quantize_seconds"]))
' "$MODEL" "$COMMIT" "$WINDOWS" "$(grep -m1 "model name" /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores" "$OUT"
echo "wrote $OUT"
