"""Builds spectral_ext._C: a CUDAExtension when a CUDA build of torch and a CUDA
toolkit are present (or FORCE_CUDA=1), else a CppExtension.

Build against the torch you run: ``pip install --no-build-isolation -e .``
"""
import glob
import os
import shutil

from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def want_cuda() -> bool:
    # Never torch.cuda.is_available(): a GPU-less build machine must still
    # compile the CUDA kernels when the toolkit is there.
    if os.environ.get("FORCE_CUDA") == "1":
        return True
    if os.environ.get("FORCE_CUDA") == "0":
        return False
    import torch

    home = cpp_extension.CUDA_HOME
    has_nvcc = (home is not None and os.path.exists(os.path.join(home, "bin", "nvcc"))) or shutil.which("nvcc")
    return torch.version.cuda is not None and bool(has_nvcc)


def extension():
    cpu_sources = ["csrc/ops.cpp", "csrc/module.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    # -fopenmp: at::parallel_for is inline OpenMP; without it our loops run on one core.
    # -Wno-psabi: 64-byte vector types in the runtime-dispatched kernels (csrc/cpu/simd.h).
    cxx = ["-O3", "-g0", "-fopenmp", "-Wno-psabi"]
    if want_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        return cpp_extension.CUDAExtension(
            "spectral_ext._C",
            cpu_sources + sorted(glob.glob("csrc/cuda/*.cu")),
            define_macros=[("SPECTRAL_EXT_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=["-fopenmp"],
        )
    return cpp_extension.CppExtension(
        "spectral_ext._C", cpu_sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"]
    )


setup(
    packages=find_packages(include=["spectral_ext", "spectral_ext.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
