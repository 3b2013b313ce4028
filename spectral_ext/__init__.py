"""spectral_ext: spectral analysis of neural networks in weight and
representation space, on compiled CPU and CUDA operators."""
from __future__ import annotations

import torch  # loads libtorch, which the compiled module links against

try:
    from . import _C
except ImportError as error:  # no silent fallback to slow code
    raise ImportError(
        "spectral_ext's compiled module spectral_ext._C is missing or does not load "
        f"({error}). Build it against the torch you run, from the repository root:\n"
        "    pip install --no-build-isolation -e .\n"
        "(or `make build`; with a CUDA toolkit set CUDA_HOME=/usr/local/cuda). "
        "After a torch upgrade, rebuild."
    ) from error

from . import _ops  # the operators' Python wrappers and fake kernels: registered on import
from ._ops import (OPERATORS, conv_adjacency, current_backend, linear_sum_assignment, max_kernel_gram,
                   signal_projection, sinkhorn, use_backend)

# The method modules load on first use (PEP 562): `spectral-ext zoo` then imports
# what it runs, not scipy.stats, networkx and matplotlib with every method.
_EXPORTS = {
    "covariance": ("activation_covariance", "align", "clip", "rainbow"),
    "layers": ("ModelGraph", "chain_graph", "discover"),
    "rank": ("classification_dimension", "independence_deficit", "jacobian_partial_rank", "numerical_rank",
             "perturbed_pca_dimension", "stable_rank"),
    "receptive_fields": ("hypergraph", "semantic_hierarchy", "signals"),
    "spectra": ("alpha_hat", "fit_power_law", "fit_power_laws", "layer_spectra", "weight_singular_values"),
    "similarity": ("cka", "pairwise_similarity", "procrustes", "procrustes_distance", "similarity_matrix"),
    "stitching": ("stitch", "stitching_penalty"),
    "symmetry": ("apply_symmetry", "intertwiner_group"),
    "zoo.generator": ("make_digits_zoo",),
    "spectral_neurons": ("SVR", "co_svr", "kernel_connections", "sobel_similarity", "spectral_activations", "svr",
                         "svr_many"),
}
_DEFINED_IN = {name: module for module, names in _EXPORTS.items() for name in names}
# A module and a function never share a name: spectral_ext.svr is a function, its module spectral_neurons.
_MODULES = ("compat", "covariance", "datasets", "encoders", "layers", "plot", "rank", "receptive_fields",
            "reference", "similarity", "spectra", "spectral_neurons", "stitching", "symmetry", "training", "zoo")


def __getattr__(name: str):
    import importlib

    if name in _DEFINED_IN:
        value = getattr(importlib.import_module(f".{_DEFINED_IN[name]}", __name__), name)
    elif name in _MODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'spectral_ext' has no attribute {name!r}")
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_DEFINED_IN) | set(_MODULES))


__version__ = "0.1.0"


# setup.py's reason tokens (compiled into _C) in words.
_BUILD_REASONS = {
    "FORCE_CUDA_1": "CUDA kernels compiled: FORCE_CUDA=1",
    "gpu_visible": "CUDA kernels compiled: a CUDA build of torch, a CUDA toolkit and a visible GPU",
    "FORCE_CUDA_0": "CPU kernels only: FORCE_CUDA=0",
    "cpu_torch": "CPU kernels only: torch was a CPU-only build",
    "no_toolkit": "CPU kernels only: no CUDA toolkit found (set CUDA_HOME)",
    "no_gpu": "CPU kernels only: no GPU was visible at build time (rebuild with FORCE_CUDA=1 to compile "
              "the CUDA kernels anyway)",
}


def build_info() -> dict:
    """What was compiled in and where each operator can run.

    Args:
        None.

    Returns:
        A dict with the keys cuda_compiled (bool), build_reason (why setup.py compiled the CUDA kernels or
        not, in words), built_with_torch (the version the extension was compiled against), torch_version
        (the one running now), cuda_available (bool), operators ({name: ["CPU", "CUDA", ...]} from the
        dispatcher's registrations).
    """
    info = dict(_C.compiled_info())
    token = info.get("build_reason")
    info["build_reason"] = _BUILD_REASONS.get(token, f"unknown ({token or 'built before build reasons'})")
    info["torch_version"] = torch.__version__
    info["cuda_available"] = torch.cuda.is_available()
    info["operators"] = {
        name: [key for key in ("CPU", "CUDA")
               if torch._C._dispatch_has_kernel_for_dispatch_key(f"spectral_ext::{name}", key)]
        for name in OPERATORS
    }
    return info


__all__ = [
    "activation_covariance", "align", "alpha_hat", "apply_symmetry", "build_info", "chain_graph", "cka",
    "classification_dimension", "clip", "co_svr", "conv_adjacency", "current_backend", "discover",
    "fit_power_law", "fit_power_laws", "weight_singular_values",
    "hypergraph", "independence_deficit", "intertwiner_group", "jacobian_partial_rank", "kernel_connections",
    "layer_spectra", "linear_sum_assignment", "make_digits_zoo", "max_kernel_gram", "ModelGraph",
    "numerical_rank", "pairwise_similarity", "perturbed_pca_dimension", "plot", "procrustes",
    "procrustes_distance", "rainbow",
    "reference", "semantic_hierarchy", "signal_projection", "signals",
    "similarity_matrix", "sinkhorn", "sobel_similarity", "spectral_activations", "stable_rank", "stitch",
    "stitching_penalty", "SVR", "svr", "svr_many", "use_backend", "zoo",
]
