"""The CUDA kernels compile for sm_80 and sm_90 without register spills (no GPU needed)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import check_cuda_compile  # noqa: E402


def test_parse_ptxas_report():
    report = """ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_80'
ptxas info    : Function properties for _Z3fooPf
    16 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 40 registers, used 0 barriers, 1024 bytes smem, 360 bytes cmem[0]
"""
    (k,) = check_cuda_compile.parse_ptxas(report)
    assert (k["name"], k["arch"], k["regs"], k["smem"]) == ("_Z3fooPf", "sm_80", 40, 1024)
    assert (k["stack"], k["spill_stores"], k["spill_loads"]) == (16, 8, 12)


@pytest.mark.slow  # nvcc compiles every unit for two architectures: minutes on 2 cores
@pytest.mark.skipif(check_cuda_compile.find_nvcc() is None, reason="nvcc not found")
def test_cuda_kernels_compile_without_spills(tmp_path):
    report = tmp_path / "ptxas.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "check_cuda_compile.py"), "--json", str(report)],
        # 806 kernels (dropout and packed-sequence variants): 4 to 12 minutes on 2 shared cores
        capture_output=True, text=True, timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    kernels = json.loads(report.read_text())["kernels"]
    names = " ".join(k["kernel"] for k in kernels)
    for kernel in ("fwd_kernel", "bwd_dq_kernel", "bwd_dkdv_kernel", "softmax_fwd_warp_kernel",
                   "softmax_fwd_block_kernel", "softmax_bwd_warp_kernel"):
        assert kernel in names, f"{kernel} missing from the ptxas report"
    assert {k["arch"] for k in kernels} == {"sm_80", "sm_90"}
