#!/usr/bin/env bash
# Builds datatrove in its own venv (it needs huggingface-hub>=1.6, which conflicts with our pins).
# Usage: bash bench/build_datatrove_venv.sh [VENV_DIR]   (default: build/datatrove-venv)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-build/datatrove-venv}
[ -x "$VENV/bin/python" ] || python3.11 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "datatrove==0.10.1" "numpy<2.2" "xxhash<3.5" regex nltk tokenizers spacy
"$VENV/bin/python" -c "import datatrove; print('datatrove', datatrove.__version__ if hasattr(datatrove, '__version__') else 'ok')"
