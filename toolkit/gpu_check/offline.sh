#!/usr/bin/env bash
# `make gpu-check-offline`: the GPU check on a bare CUDA machine with no network
# (docs/gpu.md). Uses the machine's own python3 and its packages (torch, cupy, onnx,
# onnxruntime, ...) plus the wheels `make gpu-wheels` put in .whl/, installed with one
# `pip install --no-index --no-deps --target` call; then `python3 -m mclx.gpu_check`
# (JSON report on stdout and in .whl/gpu-check.json) and `pytest -m gpu`.
#
# Exit: 0 both passed (checks whose package is absent, TensorRT or onnxruntime-gpu,
# skipped with the reason); 1 something that ran failed; 2 no wheels to install;
# 77 skipped: no NVIDIA GPU here (one JSON line with the reason, before anything else).
set -u
cd "$(dirname "$0")/../.." || exit 2
PY=${PYTHON3:-python3}
WHEELS=${WHEELS:-.whl}
SITE="$WHEELS/site"
"$PY" toolkit/gpu_check/probe.py >/dev/null || exec "$PY" toolkit/gpu_check/probe.py
shopt -s nullglob
wheels=("$WHEELS"/*.whl)
if [ ${#wheels[@]} -eq 0 ]; then
    echo "gpu-check-offline: error: no wheels in $WHEELS/ (run 'make gpu-wheels' where PyPI is reachable, and carry $WHEELS/ here)" >&2
    exit 2
fi
rm -rf "$SITE"
if "$PY" -m pip --version >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --disable-pip-version-check \
        --target "$SITE" "${wheels[@]}" || exit 1
else  # a python3 without pip: these wheels need no more than unpacking
    echo "gpu-check-offline: no pip for $PY; unpacking the wheels into $SITE" >&2
    "$PY" -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]' \
        "$SITE" "${wheels[@]}" || exit 1
fi
site_abs=$(cd "$SITE" && pwd) || exit 1
export PYTHONPATH="$site_abs${PYTHONPATH:+:$PYTHONPATH}"
# shellcheck disable=SC2086  # GPU_CHECK_ARGS: words for the check (--only, --skip, ...)
"$PY" -m mclx.gpu_check --out "$WHEELS/gpu-check.json" ${GPU_CHECK_ARGS:-}
check=$?
"$PY" -m pytest -m gpu -q -p no:cacheprovider -rs tests
tests=$?
echo "gpu-check-offline: python -m mclx.gpu_check exit $check, pytest -m gpu exit $tests" >&2
if [ "$check" -eq 0 ] && [ "$tests" -eq 0 ]; then exit 0; fi
exit 1
