#!/usr/bin/env bash
# GPU validation of fastattn on a CUDA machine (no internet needed).
#
#   OUT=/some/dir tools/gpu_check.sh [STEP ...]
#
# Steps (default: all, in this order):
#   versions  python/torch/triton/nvcc versions and nvidia-smi
#   build     TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} python setup.py build_ext --inplace
#   ptxas     tools/check_cuda_compile.py for the same arch (registers, spills)
#   test      pytest tests/test_cuda_kernels.py and tests/test_triton.py
#   sanitize  compute-sanitizer (memcheck, racecheck, synccheck) on a small forward/backward
#   bench     CUDA kernel timings (TFLOP/s, GB/s vs copy) and benchmarks/attention.py --device cuda
# Logs and JSON land in $OUT (default ./gpu_check_out); a summary table is printed last.
set -u -o pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
ARCH=${TORCH_CUDA_ARCH_LIST:-9.0}
STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=(versions build ptxas test sanitize bench)
SUMMARY=()

run_step() {  # run_step NAME TIMEOUT_S COMMAND...: logs to $OUT/NAME.log, records rc and time
  local name=$1 limit=$2
  shift 2
  echo "=== $name: $*"
  local start=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log"
  SUMMARY+=("$(printf '%-22s rc=%-4s %5ss  %s' "$name" "$rc" "$((SECONDS - start))" "$OUT/$name.log")")
}

step_versions() {
  run_step versions 120 bash -c '
    python --version; nvcc --version | tail -n 2; nvidia-smi
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

step_build() {
  run_step build 900 env TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
    python setup.py build_ext --inplace
  run_step build_status 60 python -c "import fastattn._C as c; print('with_cuda', c.with_cuda, 'archs', c.cuda_archs); import fastattn.dispatch as d; print(d.backends())"
}

step_ptxas() {
  local archs=()
  for a in ${ARCH//;/ }; do archs+=(--arch "${a//./}"); done
  run_step ptxas 900 python tools/check_cuda_compile.py "${archs[@]}" --json "$OUT/ptxas.json"
}

step_test() {
  run_step pytest_cuda 900 python -m pytest -q -rs tests/test_cuda_kernels.py --junitxml="$OUT/pytest_cuda.xml"
  run_step pytest_triton 900 python -m pytest -q -rs tests/test_triton.py --junitxml="$OUT/pytest_triton.xml"
}

write_sanitize_py() {
  cat >"$OUT/sanitize_workload.py" <<'PY'
import torch
ops = torch.ops.fastattn
import fastattn  # registers the ops
torch.manual_seed(0)
for dtype, D, causal, masked in ((torch.float16, 64, 1, False), (torch.bfloat16, 128, 2, True), (torch.float16, 40, 0, True)):
    q = torch.randn(1, 4, 150, D, device="cuda", dtype=dtype)
    k = torch.randn(1, 2, 130, D, device="cuda", dtype=dtype)
    v = torch.randn(1, 2, 130, D, device="cuda", dtype=dtype)
    mask = (torch.rand(1, 1, 150, 130, device="cuda") > 0.2).expand(1, 4, 150, 130) if masked else None
    out, _, stats = ops.attn_fwd(q, k, v, mask, D ** -0.5, causal)
    grads = ops.attn_bwd(torch.randn_like(out), q, k, v, out, stats, mask, D ** -0.5, causal, True)
    x = torch.randn(2, 3, 33, 1500 if masked else 100, device="cuda", dtype=dtype)
    y = ops.softmax_fwd(x, None, 0.5, causal)
    ops.softmax_bwd(torch.randn_like(y), y)
torch.cuda.synchronize()
print("sanitizer workload done")
PY
}

step_sanitize() {
  if ! command -v compute-sanitizer >/dev/null; then
    echo "compute-sanitizer not found"; SUMMARY+=("sanitize               skipped (no compute-sanitizer)"); return
  fi
  write_sanitize_py
  for tool in memcheck racecheck synccheck; do
    run_step "sanitize_$tool" 600 compute-sanitizer --tool "$tool" --error-exitcode 3 \
      --kernel-name regex:fastattn python "$OUT/sanitize_workload.py"
  done
}

write_bench_py() {
  cat >"$OUT/cuda_bench.py" <<'PY'
import json, os, statistics, torch
import torch.nn.functional as F
import fastattn  # registers the ops
ops = torch.ops.fastattn
dev = "cuda"

def timed(fn, iters=30):
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)

rows = []
buf = torch.empty(512 * 1024 * 1024, dtype=torch.uint8, device=dev)
dst = torch.empty_like(buf)
copy_gbs = 2 * buf.numel() / timed(lambda: dst.copy_(buf)) / 1e6
rows.append({"case": "copy 512MiB", "ms": None, "value": round(copy_gbs, 1), "unit": "GB/s"})
del buf, dst

for B, H, S, D, causal, pad in ((4, 16, 2048, 128, 0, False), (4, 16, 2048, 128, 1, False),
                                (2, 16, 4096, 128, 0, False), (8, 16, 1024, 64, 0, False),
                                (4, 16, 2048, 64, 1, False), (4, 16, 2048, 128, 0, True)):
    q, k, v = (torch.randn(B, H, S, D, device=dev, dtype=torch.bfloat16) for _ in range(3))
    mask = None
    if pad:
        mask = (torch.arange(S, device=dev) < S // 2)[None, None, None, :].expand(B, H, S, S)
    scale = D ** -0.5
    flops = 4 * B * H * S * S * D * (0.5 if causal else 1.0) * (0.5 if pad else 1.0)
    name = f"B{B} H{H} S{S} D{D}" + (" causal" if causal else "") + (" keypad50%" if pad else "")
    ms = timed(lambda: ops.attn_fwd(q, k, v, mask, scale, causal))
    rows.append({"case": f"attn fwd {name}", "ms": round(ms, 3), "value": round(flops / ms / 1e9, 1), "unit": "TFLOP/s"})
    sdpa_mask = mask
    sms = timed(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask, is_causal=bool(causal)))
    rows.append({"case": f"sdpa fwd {name}", "ms": round(sms, 3), "value": round(flops / sms / 1e9, 1), "unit": "TFLOP/s"})
    out, _, stats = ops.attn_fwd(q, k, v, mask, scale, causal)
    do = torch.randn_like(out)
    ms = timed(lambda: ops.attn_bwd(do, q, k, v, out, stats, mask, scale, causal, False))
    rows.append({"case": f"attn bwd {name}", "ms": round(ms, 3), "value": round(2.5 * flops / ms / 1e9, 1), "unit": "TFLOP/s"})
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    so = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=sdpa_mask, is_causal=bool(causal))
    sms = timed(lambda: torch.autograd.grad(so, (qg, kg, vg), do, retain_graph=True))
    rows.append({"case": f"sdpa bwd {name}", "ms": round(sms, 3), "value": round(2.5 * flops / sms / 1e9, 1), "unit": "TFLOP/s"})

for B, H, R, C, dtype, masked in ((8, 16, 1024, 1024, torch.float16, False), (8, 16, 1024, 1024, torch.float16, True),
                                  (4, 16, 512, 4096, torch.bfloat16, False), (4, 16, 2048, 2048, torch.float32, False)):
    x = torch.randn(B, H, R, C, device=dev, dtype=dtype)
    mask = (torch.rand(B, 1, 1, C, device=dev) > 0.1).expand(B, H, R, C) if masked else None
    nbytes = 2 * x.numel() * x.element_size()
    ms = timed(lambda: ops.softmax_fwd(x, mask, 0.125, 0))
    name = f"B{B} H{H} R{R} C{C} {str(dtype)[6:]}" + (" keypad" if masked else "")
    rows.append({"case": f"softmax fwd {name}", "ms": round(ms, 3), "value": round(nbytes / ms / 1e6, 1), "unit": "GB/s",
                 "of_copy": round(nbytes / ms / 1e6 / copy_gbs, 3)})
    y = ops.softmax_fwd(x, mask, 0.125, 0)
    ms = timed(lambda: ops.softmax_bwd(y, y))
    rows.append({"case": f"softmax bwd {name}", "ms": round(ms, 3), "value": round(1.5 * nbytes / ms / 1e6, 1), "unit": "GB/s",
                 "of_copy": round(1.5 * nbytes / ms / 1e6 / copy_gbs, 3)})
    tms = timed(lambda: torch.softmax(x * 0.125, -1))
    rows.append({"case": f"torch softmax {name}", "ms": round(tms, 3), "value": None, "unit": ""})

json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, open(os.path.join(os.environ["OUT"], "cuda_bench.json"), "w"), indent=1)
for r in rows:
    extra = f"  ({r['of_copy']:.0%} of copy)" if "of_copy" in r else ""
    ms = "" if r["ms"] is None else r["ms"]
    value = "" if r["value"] is None else r["value"]
    print(f"{r['case']:<48} {ms:>9} ms  {value:>8} {r['unit']}{extra}")
PY
}

step_bench() {
  write_bench_py
  run_step cuda_bench 600 python "$OUT/cuda_bench.py"
  if [ -f benchmarks/attention.py ]; then
    run_step bench_attention 600 python benchmarks/attention.py --device cuda --out "$OUT/bench_attention.json"
  else
    SUMMARY+=("bench_attention        skipped (benchmarks/attention.py not found)")
  fi
}

for s in "${STEPS[@]}"; do
  case "$s" in
    versions | build | ptxas | test | sanitize | bench) "step_$s" ;;
    *) echo "unknown step: $s (expected versions build ptxas test sanitize bench)"; exit 2 ;;
  esac
done

echo
echo "=== summary (logs in $OUT)"
printf '%s\n' "${SUMMARY[@]}" | tee "$OUT/summary.txt"
if [ -f "$OUT/cuda_bench.log" ]; then
  echo "=== CUDA kernel timings"
  tail -n 40 "$OUT/cuda_bench.log"
fi
exit 0
