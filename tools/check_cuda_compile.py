#!/usr/bin/env python3
"""Compiles every csrc/cuda/*.cu with nvcc (no GPU needed) and checks the ptxas report.

For each architecture (default sm_80 and sm_90) and translation unit, runs
`nvcc -c -Xptxas -v` with the flags setup.py uses, prints one table row per kernel
(registers, stack, spill stores/loads, shared memory) and exits non-zero on a compile error
or on any spill. Units compile in parallel (--jobs, default: CPU count).

    python tools/check_cuda_compile.py [--arch 80 --arch 90] [--jobs N] [--json FILE]
"""
import argparse
import concurrent.futures
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Same flags as setup.py's nvcc list.
NVCC_FLAGS = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"]

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'")
_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def find_nvcc():
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
        candidate = os.path.join(cuda_home, "bin", "nvcc")
        nvcc = candidate if os.path.exists(candidate) else None
    return nvcc


def parse_ptxas(text):
    """Kernels of a `-Xptxas -v` report: list of dicts (name, arch, regs, stack, spills)."""
    kernels, current = [], None
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            current = {"name": m.group(1), "arch": m.group(2), "regs": None, "stack": 0,
                       "spill_stores": 0, "spill_loads": 0, "smem": 0}
            kernels.append(current)
            continue
        if current is None:
            continue
        m = _STACK.search(line)
        if m:
            current["stack"], current["spill_stores"], current["spill_loads"] = map(int, m.groups())
        m = _USED.search(line)
        if m:
            current["regs"] = int(m.group(1))
            m = _SMEM.search(line)
            if m:
                current["smem"] = int(m.group(1))
    return kernels


def demangle(names):
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if tool is None or not names:
        return names
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout
    lines = out.splitlines()
    return lines if len(lines) == len(names) else names


def short_name(name):
    name = name.replace("fastattn::cuda::", "").replace("(anonymous namespace)::", "")
    name = name.replace("__nv_bfloat16", "bf16")
    name = name.replace("__half", "fp16")
    return re.sub(r"^void ", "", re.sub(r"\([^()]*\)$", "", name))


def compile_unit(nvcc, source, arch, workdir):
    obj = os.path.join(workdir, f"{os.path.basename(source)}.sm{arch}.o")
    cmd = [nvcc, *NVCC_FLAGS, f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v",
           "-c", source, "-o", obj]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    return source, arch, proc.returncode, proc.stdout + proc.stderr


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", action="append", help="SM version, e.g. 80 (repeatable)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--json", help="also write the per-kernel report to this file")
    parser.add_argument("sources", nargs="*", help="default: csrc/cuda/*.cu")
    args = parser.parse_args(argv)
    archs = args.arch or ["80", "90"]
    sources = args.sources or sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    nvcc = find_nvcc()
    if nvcc is None:
        print("nvcc not found (set CUDA_HOME or put nvcc on PATH)", file=sys.stderr)
        return 2
    if not sources:
        print("no CUDA sources found", file=sys.stderr)
        return 2

    failures, kernels = [], []
    with tempfile.TemporaryDirectory() as workdir:
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            jobs = [pool.submit(compile_unit, nvcc, s, a, workdir) for a in archs for s in sources]
            for job in jobs:
                source, arch, rc, text = job.result()
                if rc != 0:
                    failures.append(f"{os.path.relpath(source, ROOT)} (sm_{arch}):\n{text}")
                    continue
                for k in parse_ptxas(text):
                    k["source"] = os.path.relpath(source, ROOT)
                    kernels.append(k)

    names = demangle([k["name"] for k in kernels])
    for k, n in zip(kernels, names):
        k["kernel"] = short_name(n)
    kernels.sort(key=lambda k: (k["arch"], k["source"], k["kernel"]))
    width = max([len(k["kernel"]) for k in kernels] + [6])
    print(f"{'arch':<6} {'kernel':<{width}} {'regs':>4} {'stack':>5} {'spill_st':>8} "
          f"{'spill_ld':>8}")
    spilled = []
    for k in kernels:
        flag = ""
        if k["spill_stores"] or k["spill_loads"]:
            spilled.append(k)
            flag = "  <- SPILLS"
        print(f"{k['arch']:<6} {k['kernel']:<{width}} {k['regs'] or 0:>4} {k['stack']:>5} "
              f"{k['spill_stores']:>8} {k['spill_loads']:>8}{flag}")
    print(f"{len(kernels)} kernels, {len(sources)} sources x {len(archs)} archs, "
          f"{len(spilled)} with spills, {len(failures)} compile failures")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"kernels": kernels, "failures": failures}, f, indent=1)
    for failure in failures:
        print(f"COMPILE ERROR in {failure}", file=sys.stderr)
    if not kernels and not failures:
        print("ptxas reported no kernels (is -Xptxas -v honoured?)", file=sys.stderr)
        return 1
    return 1 if failures or spilled else 0


if __name__ == "__main__":
    sys.exit(main())
