"""Typed wrappers over torch.ops.spectral_ext.*: validation, unbatched inputs,
backend choice, fake kernels (for torch.compile) and autograd formulas.

One module per operator of csrc/ops.cpp's schema list, its wrapper, fake
kernel and autograd registration side by side (torchvision/ops' layout);
_common holds what several share (the compiled library, the backend switch,
Ctrl-C, the finiteness and memory checks). The plain-PyTorch twins, the
specification, stay in spectral_ext/reference.py.

The modules are named <operator>_op, never <operator>: importing a submodule
sets it as an attribute of this package, so a module `sinkhorn` would replace
the function `spectral_ext._ops.sinkhorn` once imported (the function or the
module, depending on import order). Importing this package imports every
module, which registers the fake kernels and autograd formulas.
"""
from __future__ import annotations

from ._common import (BACKENDS, CPU_ONLY, OPERATORS, _CHUNK_ELEMENTS, _backend, _finite, _gib, _interruptible,
                      _native, _refuse_unallocatable, current_backend, use_backend)
from .conv_adjacency_op import (_conv_adjacency_backward, _conv_adjacency_fake, _conv_adjacency_setup,
                                conv_adjacency)
from .signal_projection_op import (_as_pairs, _conv_geometry, _signal_projection_backward, _signal_projection_fake,
                                   _signal_projection_setup, signal_projection)
from .sinkhorn_scaling_op import _kernel_out_of_range, _marginal, _sinkhorn_scaling_fake
from .sinkhorn_op import (MAX_ITERS, _sinkhorn, _sinkhorn_backward, _sinkhorn_fake, _sinkhorn_setup,
                          _sinkhorn_validate, sinkhorn)
from .max_kernel_gram_op import (_max_kernel_gram_backward, _max_kernel_gram_fake, _max_kernel_gram_setup,
                                 max_kernel_gram)
from .linear_sum_assignment_op import _linear_sum_assignment_fake, _scipy_cost_matrix, linear_sum_assignment
from .network_simplex_op import _network_simplex_fake

__all__ = ["BACKENDS", "CPU_ONLY", "MAX_ITERS", "OPERATORS", "conv_adjacency", "current_backend",
           "linear_sum_assignment", "max_kernel_gram", "signal_projection", "sinkhorn", "use_backend"]
