#!/usr/bin/env bash
# Installs the Debian packages llmq needs to build and test. Idempotent; safe to run again.
set -euo pipefail
PKGS=(build-essential cmake git python3
      nlohmann-json3-dev   # config.json, tokenizer.json, safetensors headers, --json output
      libpcre2-dev         # Unicode-class regexes of the tokenizers' pre-tokenizers (\p{L}, \p{N}, lookahead)
      libutf8proc-dev      # NFC normalization (Qwen2 tokenizer) and Unicode helpers
      zlib1g-dev           # reading gzip-compressed tokenizer.json.gz
      libcli11-dev         # command-line parsing
      libgtest-dev         # unit and model tests
      libomp-dev)          # OpenMP runtime headers (GCC's libgomp is used with g++)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
