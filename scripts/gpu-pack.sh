#!/usr/bin/env bash
# Prepares .gpu/ (git-ignored) for a GPU machine that has no package access and no ../shared beside the
# checkout: the Debian packages llmq builds against, and the test data the GPU tests read (llama-27m,
# compressed; docs-en.txt; a slice of the C4 calibration file). Run it here, then carry .gpu to the machine;
# scripts/gpu-check.sh unpacks it there.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED="$(pwd)/../shared"
rm -rf .gpu
mkdir -p .gpu/debs .gpu/shared/data/eval .gpu/shared/data/c4 .gpu/shared/models
(cd .gpu/debs && apt-get download nlohmann-json3-dev libpcre2-dev libpcre2-8-0 libutf8proc-dev libutf8proc2 \
  libcli11-dev libgtest-dev zlib1g-dev 2>&1 | grep -v "^W: Download is performed unsandboxed" || true)
tar cf - -C "$SHARED/models" llama-27m | xz -T0 -6 > .gpu/shared/models/llama-27m.tar.xz
cp "$SHARED/data/eval/docs-en.txt" .gpu/shared/data/eval/
head -n 300 "$SHARED/data/c4/c4_validation_2k.jsonl" > .gpu/shared/data/c4/c4_validation_2k.jsonl
du -sh .gpu
