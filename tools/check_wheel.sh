#!/usr/bin/env bash
# Builds fastattn's wheel from a clean copy of the source tree (timed), installs it into a
# fresh virtual environment that sees the installed torch (--system-site-packages), and checks,
# from a folder outside the source tree, that the installed package is the one imported and
# that `python -m fastattn check` and `python -m fastattn info` succeed.
#
# Usage: tools/check_wheel.sh [WORKDIR]
#   WORKDIR  where the copy, the wheel and the venv go (default: a temporary folder, removed
#            at exit). Environment: PYTHON (default python), MAX_JOBS (default 2), and the
#            build variables of setup.py (FASTATTN_SKIP_CUDA, TORCH_CUDA_ARCH_LIST...).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python}"
export MAX_JOBS="${MAX_JOBS:-2}"
if [[ $# -ge 1 ]]; then
    WORK="$(mkdir -p "$1" && cd "$1" && pwd)"
else
    WORK="$(mktemp -d)"
    trap 'rm -rf "$WORK"' EXIT
fi
case "$WORK/" in
    "$ROOT"/*) echo "check_wheel: WORKDIR must be outside the source tree $ROOT" >&2; exit 2 ;;
esac
rm -rf "$WORK/src" "$WORK/dist" "$WORK/venv" "$WORK/run"
mkdir -p "$WORK/src" "$WORK/run"

# A clean copy: no build/ objects or compiled modules from earlier builds, so the time is a
# full build's.
tar -C "$ROOT" --exclude=./.git --exclude=./build --exclude=./dist --exclude='*.so' \
    --exclude='*.egg-info' --exclude=__pycache__ --exclude=./bench_out -cf - . | tar -C "$WORK/src" -xf -

echo "== building the wheel (MAX_JOBS=$MAX_JOBS)"
start=$(date +%s)
"$PYTHON" -m pip wheel --no-build-isolation --no-deps -w "$WORK/dist" "$WORK/src"
build_seconds=$(( $(date +%s) - start ))
wheels=("$WORK"/dist/fastattn-*.whl)
if [[ ${#wheels[@]} -ne 1 || ! -f "${wheels[0]}" ]]; then
    echo "check_wheel: expected one fastattn wheel in $WORK/dist" >&2
    exit 1
fi
WHEEL="${wheels[0]}"
echo "wheel build time: ${build_seconds}s ($(basename "$WHEEL"), $(du -h "$WHEEL" | cut -f1))"
"$PYTHON" - "$WHEEL" <<'PY'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
if not any(n.startswith("fastattn/_C") and n.endswith((".so", ".pyd")) for n in names):
    sys.exit("check_wheel: the wheel has no compiled fastattn/_C extension")
PY

echo "== installing into a fresh venv"
"$PYTHON" -m venv --system-site-packages "$WORK/venv"
VPY="$WORK/venv/bin/python"
# --ignore-installed: a fastattn installed outside the venv (an editable install) must not
# count as already satisfying the wheel.
"$VPY" -m pip install --quiet --no-deps --ignore-installed "$WHEEL"

cd "$WORK/run"  # outside the source tree, so `import fastattn` cannot pick up the sources
unset PYTHONPATH
"$VPY" - "$ROOT" <<'PY'
import os, sys
import fastattn
from fastattn import ops
path = os.path.realpath(fastattn.__file__)
venv, source = os.path.realpath(sys.prefix), os.path.realpath(sys.argv[1])
print(f"fastattn {fastattn.__version__} imported from {path}")
if not path.startswith(venv + os.sep) or path.startswith(source + os.sep):
    sys.exit(f"check_wheel: fastattn was imported from {path}, not from the venv {venv}")
if ops._C is None:
    sys.exit(f"check_wheel: the installed fastattn._C does not load: {ops.C_IMPORT_ERROR}")
PY
echo "== python -m fastattn check"
"$VPY" -m fastattn check
echo "== python -m fastattn info"
"$VPY" -m fastattn info
echo "check_wheel: OK (build ${build_seconds}s)"
