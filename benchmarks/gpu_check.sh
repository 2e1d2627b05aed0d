#!/usr/bin/env bash
# benchmarks/gpu_check.py on a bare GPU machine (PyTorch, transformers, no megatron-core, no network).
#
#   bash benchmarks/gpu_check.sh --fetch-wheels   # here, with network: the wheels into .whl/ (git-ignored)
#   bash benchmarks/gpu_check.sh [gpu_check.py options]   # there, with .whl/ carried: install, run, results in $OUT
#
# The wheels are what the image lacks and this checkout imports: megatron-core (the pinned 0.19.2)
# and Hydra (hydra-core, omegaconf, antlr4-python3-runtime, the last built here: it ships no wheel),
# at the versions this checkout's venv runs; about 3 MB. The project itself travels as the working
# tree and is imported from it (PYTHONPATH), so the check runs exactly the committed code.
# docs/gpu_speed.md has the device `run` call.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=.whl

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    PY="${PYTHON:-.venv/bin/python}"
    version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
    rm -rf "$WHEELS" && mkdir -p "$WHEELS"
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        -d "$WHEELS" "megatron-core==$(version megatron-core)" "hydra-core==$(version hydra-core)" \
        "omegaconf==$(version omegaconf)"
    "$PY" -m pip wheel --quiet --no-deps -w "$WHEELS" "antlr4-python3-runtime==$(version antlr4-python3-runtime)"
    ls -l "$WHEELS"
    echo "gpu_check.sh: $(ls "$WHEELS" | wc -l) wheels, $(du -sh "$WHEELS" | cut -f1) in $WHEELS/ (carry: [\"$WHEELS\"])"
    exit 0
fi

ls "$WHEELS"/megatron_core-*.whl >/dev/null 2>&1 || {
    echo "gpu_check.sh: no $WHEELS/megatron_core-*.whl: run 'bash benchmarks/gpu_check.sh --fetch-wheels' first" \
         "and carry $WHEELS" >&2; exit 2; }
SITE="${GPU_CHECK_SITE:-/tmp/gpu_check_site}"
python3 -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec python3 benchmarks/gpu_check.py --out "${OUT:?set OUT to the results folder}" "$@"
