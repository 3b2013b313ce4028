"""Builds spectral_ext._C: a CUDAExtension or a CppExtension (CPU kernels only).

Build against the torch you run: ``pip install --no-build-isolation -e .``

Which one (the reason is compiled in and shown by ``spectral_ext.build_info()``):
- ``FORCE_CUDA=1``: the CUDA kernels, or a build error when torch is a CPU build
  or no CUDA toolkit is found (CI: the .cu files must compile and link).
- ``FORCE_CUDA=0``: CPU kernels only.
- otherwise: the CUDA kernels when torch is a CUDA build, a toolkit is found
  AND a GPU is visible; else CPU kernels only, saying why (compiling sm_90
  kernels costs a CPU-only user most of the build).

The toolkit: ``CUDA_HOME`` (or ``CUDA_PATH``), else ``/usr/local/cuda``, else
the nvcc on PATH, resolved to its real directory (``/usr/local/bin/nvcc`` may
be a wrapper script: torch would guess ``/usr/local`` and fail to link
``-lcudart``).
"""
import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup



def _is_toolkit(home):
    return bool(home) and os.path.isfile(os.path.join(home, "bin", "nvcc")) and \
        os.path.isfile(os.path.join(home, "include", "cuda_runtime.h"))


def _nvcc_home(nvcc):
    """The toolkit an nvcc on PATH belongs to, through symlinks and wrapper
    scripts (nvcc's dry run names its own bin directory as _HERE_)."""
    home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if _is_toolkit(home):
        return home
    try:
        out = subprocess.run([nvcc, "--dryrun", "-E", "-x", "cu", os.devnull], capture_output=True, text=True, timeout=60)
        found = re.search(r"^#\$ _HERE_=(.+)$", out.stdout + out.stderr, re.M)
    except (OSError, subprocess.SubprocessError):
        return None
    home = found and os.path.dirname(os.path.realpath(found.group(1).strip()))
    return home if _is_toolkit(home) else None


def find_cuda_home():
    """(path or None, how it was found or why not)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home:
            if _is_toolkit(home):
                return home, f"{var}={home}"
            return None, f"{var}={home} holds no CUDA toolkit (bin/nvcc, include/cuda_runtime.h)"
    if _is_toolkit("/usr/local/cuda"):
        return "/usr/local/cuda", "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = _nvcc_home(nvcc)
        if home:
            return home, f"nvcc on PATH ({nvcc} -> {home})"
        return None, f"the nvcc on PATH ({nvcc}) belongs to no toolkit directory found"
    return None, "no CUDA toolkit (CUDA_HOME unset, no /usr/local/cuda, no nvcc on PATH)"


def choose_backend():
    """(use_cuda, reason token compiled into the module, message)."""
    import torch

    force = os.environ.get("FORCE_CUDA", "")
    if force == "0":
        return False, "FORCE_CUDA_0", "FORCE_CUDA=0"
    home, how = find_cuda_home()
    if force == "1":
        if torch.version.cuda is None:
            sys.exit(f"FORCE_CUDA=1 but torch {torch.__version__} is a CPU-only build: install a CUDA build "
                     "of torch, or unset FORCE_CUDA")
        if home is None:
            sys.exit(f"FORCE_CUDA=1 but {how}: set CUDA_HOME to the toolkit, or unset FORCE_CUDA")
        os.environ["CUDA_HOME"] = home  # before torch.utils.cpp_extension reads it
        return True, "FORCE_CUDA_1", f"FORCE_CUDA=1, toolkit from {how}"
    if torch.version.cuda is None:
        return False, "cpu_torch", f"torch {torch.__version__} is a CPU-only build"
    if home is None:
        return False, "no_toolkit", how
    os.environ["CUDA_HOME"] = home
    if not torch.cuda.is_available():
        return False, "no_gpu", "no GPU visible (FORCE_CUDA=1 compiles the CUDA kernels anyway)"
    return True, "gpu_visible", f"a GPU is visible, toolkit from {how}"


def extension():
    use_cuda, reason, message = choose_backend()
    print(f"spectral_ext: building {'CPU and CUDA' if use_cuda else 'CPU-only'} kernels: {message}",
          file=sys.stderr)
    from torch.utils import cpp_extension  # after CUDA_HOME is settled: it is read on import

    cpu_sources = ["csrc/ops.cpp", "csrc/module.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    # -fopenmp: at::parallel_for is inline OpenMP; without it our loops run on one core.
    # -Wno-psabi: 64-byte vector types in the runtime-dispatched kernels (csrc/cpu/simd.h).
    cxx = ["-O3", "-g0", "-fopenmp", "-Wno-psabi"]
    macros = [("SPECTRAL_EXT_BUILD_REASON", reason)]  # a bare token: no quoting through ninja
    if use_cuda:
        cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]  # in case it was imported before
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")  # without it and a GPU, torch's build fails
        return cpp_extension, cpp_extension.CUDAExtension(
            "spectral_ext._C",
            cpu_sources + sorted(glob.glob("csrc/cuda/*.cu")),
            define_macros=macros + [("SPECTRAL_EXT_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=["-fopenmp"],
        )
    return cpp_extension, cpp_extension.CppExtension(
        "spectral_ext._C", cpu_sources, define_macros=macros, extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"]
    )


def main():
    # SPECTRAL_EXT_NO_BUILD=1: metadata and the `spectral-ext` command only (the Makefile's
    # editable install, whose compile `setup.py build_ext --inplace` then does incrementally).
    if os.environ.get("SPECTRAL_EXT_NO_BUILD") == "1":
        ext_modules, cmdclass = [], {}
    else:
        cpp_extension, ext = extension()
        ext_modules = [ext]
        cmdclass = {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}
    setup(
        packages=find_packages(include=["spectral_ext", "spectral_ext.*"]),
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )


if __name__ == "__main__":  # also under pip (setuptools runs setup.py as __main__); tests import it
    main()
