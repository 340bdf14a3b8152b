#!/usr/bin/env bash
# Builds the CPU extension with AddressSanitizer and UndefinedBehaviorSanitizer
# (FASTATTN_SANITIZE=1, see setup.py) into a copy of the package, then runs the CPU kernel tests against it (every instruction-set variant
# this CPU runs). Any sanitizer report fails the run: undefined behaviour aborts
# (-fno-sanitize-recover), and ASan aborts on the first error. The timings of both steps
# are printed.
#
# Usage: tools/sanitize_cpu.sh [WORKDIR] [-- PYTEST_ARGS...]
#   WORKDIR  where the copy and its build go (default: build/sanitize in the source tree,
#            kept so that a rerun recompiles only what changed). Environment: PYTHON (default
#            python), MAX_JOBS (default 2), CC/CXX (default gcc/g++: the runtime preloaded
#            into Python is the compiler's own libasan).
#   PYTEST_ARGS  default: tests/test_cpu_kernels.py and the CPU cases of tests/test_numerics.py,
#                tests/test_kvcache.py (paged caches read in place), tests/test_varlen.py
#                (packed sequences), tests/test_dropout.py (the vectorised Philox) and
#                tests/test_sinks.py (the split-KV merge) and tests/test_alibi.py (ALiBi's
#                vectorised distances)
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python}"
export MAX_JOBS="${MAX_JOBS:-2}"
export CC="${CC:-gcc}" CXX="${CXX:-g++}"
WORK="$ROOT/build/sanitize"
if [[ $# -ge 1 && "$1" != "--" ]]; then
    WORK="$(mkdir -p "$1" && cd "$1" && pwd)"
    shift
fi
[[ $# -ge 1 && "$1" == "--" ]] && shift
PYTEST_ARGS=("$@")
if [[ ${#PYTEST_ARGS[@]} -eq 0 ]]; then
    PYTEST_ARGS=(tests/test_cpu_kernels.py tests/test_numerics.py tests/test_kvcache.py tests/test_varlen.py
                 tests/test_dropout.py tests/test_sinks.py tests/test_alibi.py -k "not triton and not example")
fi

# The copy: sources, package and tests, without compiled modules of other builds. tar keeps
# the files' times, so a rerun rebuilds only the objects whose sources changed.
mkdir -p "$WORK/src"
tar -C "$ROOT" --exclude=./.git --exclude=./build --exclude=./dist --exclude='*.so' \
    --exclude='__pycache__' -cf - setup.py pyproject.toml csrc fastattn tests |
    tar -C "$WORK/src" -xf -

start=$(date +%s)
(
    cd "$WORK/src"
    FASTATTN_SANITIZE=1 FASTATTN_SKIP_CUDA=1 "$PYTHON" setup.py build_ext --inplace >"$WORK/build.log" 2>&1
) || { tail -n 40 "$WORK/build.log"; echo "sanitize_cpu: build failed (log: $WORK/build.log)" >&2; exit 1; }
echo "sanitize_cpu: built in $(($(date +%s) - start)) s"

# Python itself is not instrumented, so the ASan runtime must be loaded first; leak checking
# is off (the interpreter keeps its allocations until exit).
LIBASAN="$("$CXX" -print-file-name=libasan.so)"
LIBUBSAN="$("$CXX" -print-file-name=libubsan.so)"
start=$(date +%s)
cd "$WORK/src"
LD_PRELOAD="$LIBASAN:$LIBUBSAN" \
ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:allocator_may_return_null=1" \
UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1" \
PYTHONPATH="$WORK/src" \
    "$PYTHON" -m pytest -q -p no:cacheprovider "${PYTEST_ARGS[@]}"
echo "sanitize_cpu: tests ran in $(($(date +%s) - start)) s"
