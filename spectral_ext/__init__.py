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

from . import plot, reference, zoo, zoo_report  # plot: matplotlib is imported by its functions only
from ._ops import (OPERATORS, conv_adjacency, current_backend, linear_sum_assignment, max_kernel_gram,
                   signal_projection, sinkhorn, use_backend)
from .covariance import activation_covariance, align, clip, rainbow
from .layers import ModelGraph, chain_graph, discover
from .rank import (classification_dimension, independence_deficit, jacobian_partial_rank, numerical_rank,
                   perturbed_pca_dimension, stable_rank)
from . import signals, svr  # callable modules: spectral_ext.svr(model, ...) calls the function svr.svr
from .signals import hypergraph, semantic_hierarchy
from .spectra import alpha_hat, fit_power_law, fit_power_laws, layer_spectra, weight_singular_values
from .similarity import cka, pairwise_similarity, procrustes, procrustes_distance, similarity_matrix
from .stitching import stitch, stitching_penalty
from .symmetry import apply_symmetry, intertwiner_group
from .zoo_generator import make_digits_zoo
from .svr import SVR, co_svr, kernel_connections, sobel_similarity, spectral_activations, svr_many

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

    Keys: cuda_compiled (bool), build_reason (why setup.py compiled the CUDA
    kernels or not, in words), built_with_torch (the version the extension was
    compiled against), torch_version (the one running now), cuda_available,
    operators ({name: ["CPU", "CUDA", ...]} from the dispatcher's registrations).
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
    "numerical_rank", "pairwise_similarity", "perturbed_pca_dimension", "plot", "procrustes", "rainbow",
    "reference", "semantic_hierarchy", "signal_projection", "signals",
    "similarity_matrix", "sinkhorn", "sobel_similarity", "spectral_activations", "stable_rank", "stitch",
    "stitching_penalty", "SVR", "svr", "svr_many", "use_backend", "zoo", "zoo_report",
]
