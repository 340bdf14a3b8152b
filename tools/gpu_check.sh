#!/usr/bin/env bash
# GPU validation of fastattn on a CUDA machine (no internet needed).
#
#   OUT=/some/dir tools/gpu_check.sh [STEP ...]
#
# Steps (default: all, in this order):
#   versions  python/torch/triton/nvcc versions and nvidia-smi
#   build     TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} python setup.py build_ext --inplace
#   prebuilt  instead of build: reassemble the library from the parts an earlier run left in
#             $PREBUILT_DIR (same machine image, same sources)
#   ptxas     tools/check_cuda_compile.py for the same arch (registers, spills)
#   test      pytest tests/test_cuda_kernels.py, tests/test_triton.py and tests/test_gpu_api.py
#   sanitize  compute-sanitizer (memcheck, racecheck, synccheck) on a small forward/backward
#             and a KV-cache decode call
#   bench     benchmarks/gpu.py: TFLOP/s against every SDPA kernel, softmax and KV-cache decode
#             GB/s against a copy
#   sass      HGMMA (wgmma) / HMMA counts per compiled Triton kernel and in the CUDA library
#   suite     the whole test suite with the GPU present
# Each step has a time limit (BUILD_LIMIT, TEST_LIMIT, BENCH_LIMIT, SANITIZE_LIMIT, SUITE_LIMIT
# seconds), all of them together TOTAL_LIMIT; BENCH_ARGS go to benchmarks/gpu.py. A summary table is
# printed last. $OUT (default ./gpu_check_out) ends with three kinds of file: the benchmark's
# gpu_bench.json, gpu_check_logs.tgz (every log), and the built library in parts (_C.so.part*).
set -u -o pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# The extension holds inline C++ library code from its compiler's headers; it must run against
# that compiler's libstdc++ or newer. Where the compiler is newer than the system library (a
# toolchain of its own), formatting a number in an error message crashed inside the extension.
cxx_lib=$(${CXX:-c++} -print-file-name=libstdc++.so.6 2>/dev/null)
case "$cxx_lib" in /*) export LD_LIBRARY_PATH="$(dirname "$cxx_lib")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ;; esac
export OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
ARCH=${TORCH_CUDA_ARCH_LIST:-9.0}
STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=(versions build ptxas test sanitize bench sass suite)
SUMMARY=()
END=$((SECONDS + ${TOTAL_LIMIT:-86400}))

run_step() {  # run_step NAME TIMEOUT_S COMMAND...: logs to $OUT/NAME.log, records rc and time
  local name=$1 limit=$2
  shift 2
  local left=$((END - SECONDS))  # a step never runs past TOTAL_LIMIT, so the logs get packed
  if [ "$left" -lt 10 ]; then
    SUMMARY+=("$(printf '%-22s skipped (TOTAL_LIMIT reached)' "$name")")
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name: $*"
  local start=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log"
  SUMMARY+=("$(printf '%-22s rc=%-4s %5ss  %s' "$name" "$rc" "$((SECONDS - start))" "$OUT/$name.log")")
}

step_versions() {
  run_step versions 120 bash -c '
    python --version; nvcc --version | tail -n 2; ${CXX:-c++} --version | head -n 1
    echo "compiler libstdc++: $(${CXX:-c++} -print-file-name=libstdc++.so.6)"; nvidia-smi
    python - <<PY
import json, os, torch
info = {"torch": torch.__version__, "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "capability": torch.cuda.get_device_capability() if torch.cuda.is_available() else None}
try:
    import triton
    info["triton"] = triton.__version__
except ImportError as e:
    info["triton"] = f"unavailable: {e}"
print(json.dumps(info, indent=1))
json.dump(info, open(os.path.join(os.environ["OUT"], "versions.json"), "w"), indent=1)
PY'
}

check_library() {
  run_step build_status 60 python -c "import fastattn._C as c; print('with_cuda', c.with_cuda, 'archs', c.cuda_archs); import fastattn.dispatch as d; print(d.backends())"
}

step_build() {
  run_step build "${BUILD_LIMIT:-900}" env TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
    python setup.py build_ext --inplace
  check_library
}

step_prebuilt() {
  local suffix
  suffix=$(python -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
  cat "${PREBUILT_DIR:?set PREBUILT_DIR}"/_C.so.part* >"fastattn/_C$suffix"
  check_library
}

step_ptxas() {
  local archs=()
  for a in ${ARCH//;/ }; do archs+=(--arch "${a//./}"); done
  run_step ptxas 900 python tools/check_cuda_compile.py "${archs[@]}" --json "$OUT/ptxas.json"
}

step_test() {  # the GPU tests; -n runs them in parallel where pytest-xdist is installed
  local parallel=()
  python -c "import xdist" 2>/dev/null && parallel=(-n "${PYTEST_WORKERS:-8}")
  run_step pytest_gpu "${TEST_LIMIT:-900}" python -m pytest -q -rfEs "${parallel[@]}" -p no:cacheprovider \
    tests/test_cuda_kernels.py tests/test_triton.py tests/test_gpu_api.py --junitxml="$OUT/pytest_gpu.xml"
}

write_sanitize_py() {
  cat >"$OUT/sanitize_workload.py" <<'PY'
# Forward, backward and softmax of both GPU backends on small odd shapes (partial tiles, GQA,
# masks, the causal rules and a sliding window, dropout, sinks, softcap, ALiBi where the backend
# has it), padded and packed (varlen), and one paged KV-cache decode call. Triton's autotuner runs every config of a case, so each
# is checked.
import torch
import fastattn  # registers the ops
from fastattn.capabilities import CAPABILITIES
from fastattn.reference import CAUSAL, CAUSAL_TOP_LEFT, UNBOUNDED, Window
torch.manual_seed(0)
ops = torch.ops.fastattn
rng_state = torch.tensor([2**40 + 7, 3], device="cuda")
sinks = torch.randn(4, device="cuda")
slopes = torch.rand(1, 4, device="cuda")
for prefix, backend in (("", "cuda"), ("triton_", "triton")):
    fwd, bwd = getattr(ops, prefix + "attn_fwd"), getattr(ops, prefix + "attn_bwd")
    softmax_fwd, softmax_bwd = getattr(ops, prefix + "softmax_fwd"), getattr(ops, prefix + "softmax_bwd")
    has_alibi = "alibi" in CAPABILITIES[backend].features
    for dtype, D, rule, masked, p, with_sinks, softcap, alibi in (
        (torch.float16, 64, CAUSAL, False, 0.0, False, 0.0, False),
        (torch.bfloat16, 128, CAUSAL_TOP_LEFT, True, 0.0, True, 0.0, True),
        (torch.float16, 40, UNBOUNDED, True, 0.0, False, 0.0, False),
        (torch.bfloat16, 96, CAUSAL, True, 0.2, False, 0.0, True),
        (torch.float16, 64, Window(37, 0), False, 0.1, True, 0.0, False),
        (torch.float16, 32, Window(20, 9), False, 0.0, False, 0.0, True),
        (torch.bfloat16, 128, CAUSAL, True, 0.0, False, 30.0, True),  # softcap under a mask
        (torch.float16, 64, UNBOUNDED, True, 0.1, False, 5.0, False),
    ):
        q = torch.randn(1, 4, 150, D, device="cuda", dtype=dtype)
        k = torch.randn(1, 2, 130, D, device="cuda", dtype=dtype)
        v = torch.randn(1, 2, 130, D, device="cuda", dtype=dtype)
        mask = (torch.rand(1, 1, 150, 130, device="cuda") > 0.2).expand(1, 4, 150, 130) if masked else None
        dropout = {"dropout_p": p, "rng_state": rng_state} if p else {}
        bias = {"alibi_slopes": slopes} if alibi and has_alibi else {}
        out, _, stats = fwd(q, k, v, mask, D ** -0.5, *rule, softcap, **dropout,
                            sinks=sinks if with_sinks else None, **bias)
        grads = bwd(torch.randn_like(out), q, k, v, out, stats, mask, D ** -0.5, True, *rule, softcap, **dropout, **bias)
        x = torch.randn(2, 3, 33, 1500 if masked else 100, device="cuda", dtype=dtype)
        y = softmax_fwd(x, None, 0.5, *rule)
        softmax_bwd(torch.randn_like(y), y)
        # Packed sequences (an empty one included) with the same options, less the mask.
        cu_q = torch.tensor([0, 70, 70, 150], device="cuda", dtype=torch.int32)
        cu_k = torch.tensor([0, 50, 60, 130], device="cuda", dtype=torch.int32)
        varlen_fwd, varlen_bwd = getattr(ops, prefix + "varlen_fwd"), getattr(ops, prefix + "varlen_bwd")
        packed = [t[0].transpose(0, 1).contiguous() for t in (q, k, v)]
        bias = {"alibi_slopes": slopes.expand(3, 4).contiguous()} if alibi and has_alibi else {}
        out, _, stats = varlen_fwd(*packed, cu_q, cu_k, 80, 70, D ** -0.5, rule.left, rule.right, softcap, **dropout,
                                   sinks=sinks if with_sinks else None, **bias)
        varlen_bwd(torch.randn_like(out), *packed, out, stats, cu_q, cu_k, 80, 70, D ** -0.5, rule.left, rule.right,
                   softcap, **dropout, **bias)
    # KV-cache decoding: 3 new queries of a GQA group against pages of 32 in shuffled order, rows
    # of different lengths (one empty, one split across CTAs), sinks and ALiBi.
    kvcache_fwd = getattr(ops, prefix + "attn_fwd_kvcache")
    k_pages = torch.randn(130, 2, 32, 64, device="cuda", dtype=torch.float16)
    v_pages = torch.randn_like(k_pages)
    table = torch.randperm(130, device="cuda")[:120].view(3, 40).to(torch.int32)
    seqlens = torch.tensor([0, 45, 1100], device="cuda", dtype=torch.int32)
    kvcache_fwd(torch.randn(3, 4, 3, 64, device="cuda", dtype=torch.float16), k_pages, v_pages, seqlens, table,
                0.125, -1, 0, 0.0, sinks, slopes.expand(3, 4).contiguous())
    torch.cuda.synchronize()
    print(prefix or "cuda ", "workload done")
PY
}

step_sanitize() {
  if ! command -v compute-sanitizer >/dev/null; then
    echo "compute-sanitizer not found"; SUMMARY+=("sanitize               skipped (no compute-sanitizer)"); return
  fi
  write_sanitize_py
  for tool in memcheck racecheck synccheck; do
    run_step "sanitize_$tool" "${SANITIZE_LIMIT:-600}" compute-sanitizer --tool "$tool" --error-exitcode 3 \
      python "$OUT/sanitize_workload.py"
  done
}

step_bench() {
  # shellcheck disable=SC2086
  run_step bench "${BENCH_LIMIT:-600}" python benchmarks/gpu.py --out "$OUT/gpu_bench.json" ${BENCH_ARGS:-}
}

step_suite() {  # the whole test suite with the GPU present (CPU tests included), in parallel
  run_step suite "${SUITE_LIMIT:-600}" python -m pytest tests -q -rfEs -n "${PYTEST_WORKERS:-8}" -p no:cacheprovider
}

step_sass() {  # which matrix instructions the compiled kernels use: HGMMA (Hopper's wgmma) or
  # HMMA (mma.sync), per Triton kernel in Triton's cache and for the CUDA library
  run_step sass 300 bash -c '
    for cubin in $(find "${TRITON_CACHE_DIR:-$HOME/.triton/cache}" -name "*.cubin" 2>/dev/null); do
      sass=$(cuobjdump --dump-sass "$cubin")
      printf "%-40s HGMMA %5d  HMMA %5d\n" "$(basename "$cubin" .cubin)" \
        "$(grep -c HGMMA <<<"$sass")" "$(grep -c HMMA <<<"$sass")"
    done | sort | uniq -c
    lib=$(ls fastattn/_C*.so | head -n 1)
    sass=$(cuobjdump --dump-sass "$lib")
    echo "CUDA library: HGMMA $(grep -c HGMMA <<<"$sass"), HMMA $(grep -c HMMA <<<"$sass")"'
}

step_pack() {  # at most a few files come back from the device machine: one archive of logs,
  # the built library in 15 MiB parts (cat them back together to reuse it without a rebuild)
  tar czf "$OUT/gpu_check_logs.tgz" -C "$OUT" --exclude='*.tgz' --exclude='_C.so.part*' --exclude='gpu_bench.json' \
    $(cd "$OUT" && ls | grep -v -e '\.tgz$' -e '^_C\.so\.part' -e '^gpu_bench\.json$')
  local lib
  lib=$(ls fastattn/_C*.so 2>/dev/null | head -n 1)
  [ -n "$lib" ] && split -b 15M "$lib" "$OUT/_C.so.part"
  find "$OUT" -mindepth 1 -maxdepth 1 ! -name '*.tgz' ! -name '_C.so.part*' ! -name 'gpu_bench.json' -exec rm -rf {} +
}

for s in "${STEPS[@]}"; do
  case "$s" in
    versions | build | prebuilt | ptxas | test | sanitize | bench | sass | suite) "step_$s" ;;
    *) echo "unknown step: $s (expected versions build prebuilt ptxas test sanitize bench sass suite)"; exit 2 ;;
  esac
done

echo
echo "=== summary (logs in $OUT)"
printf '%s\n' "${SUMMARY[@]}" | tee "$OUT/summary.txt"
if [ -f "$OUT/bench.log" ]; then
  echo "=== GPU benchmark (TFLOP/s; x best = ratio to the fastest SDPA kernel of the case)"
  tail -n 70 "$OUT/bench.log"
fi
step_pack
exit 0
