#!/usr/bin/env bash
# Installs, builds, and shows the bundled demo model (models/llama-7m-demo): its shape, a generation, and its
# perplexity on held-out text.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cmake -S . -B build/release -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build/release -j"$(nproc)" --target llmq
LLMQ=build/release/llmq
MODEL=models/llama-7m-demo

echo; echo "== llmq info $MODEL"
$LLMQ info $MODEL
echo; echo "== llmq generate $MODEL -p 'def fibonacci(n):' -n 64"
$LLMQ generate $MODEL -p 'def fibonacci(n):' -n 64
echo; echo "== llmq generate (sampled: --temp 0.8 --top-p 0.95 --seed 1)"
$LLMQ generate $MODEL -p 'The Linux kernel' -n 48 --temp 0.8 --top-p 0.95 --seed 1
TEXT=../shared/data/eval/docs-en.txt
if [ -f "$TEXT" ]; then
  echo; echo "== llmq perplexity $MODEL --text $TEXT --max-windows 32"
  $LLMQ perplexity $MODEL --text "$TEXT" --max-windows 32
else
  echo; echo "== llmq perplexity $MODEL --text README.md --ctx 128 (../shared not found)"
  $LLMQ perplexity $MODEL --text README.md --ctx 128
fi
echo; echo "== llmq bench $MODEL --device cpu"
$LLMQ bench $MODEL --device cpu --prompt-len 128 --gen-len 64
