"""linear_sum_assignment: scipy's optimal assignments of a batch of problems
(wrapper, scipy's reading of array-likes, fake kernel; not differentiable)."""
from __future__ import annotations

import torch

from .. import _checks, reference
from ._common import _interruptible, _native


def linear_sum_assignment(cost, maximize: bool = False) -> tuple:
    """Optimal assignments of a batch of problems: scipy.optimize.linear_sum_assignment for each.

    Solved in parallel across the batch on the CPU, with scipy's answer, ties included (its shortest
    augmenting path algorithm, Crouse 2016, with its order of scanning and tie rule; square problems with
    a unique optimum take a faster start from Jonker-Volgenant's initialisation, certified by the duals
    to give the same optimum; see csrc/cpu/linear_sum_assignment.cpp). Seed 004, appendix D.2.1 (the
    Hungarian rounding of a stitching layer's P) and definition 5.2 (G_ReLU-Procrustes via the linear sum
    assignment problem). As in scipy, +inf entries are forbidden pairs (-inf with maximize=True); NaN or
    the other infinity raises ValueError "... contains invalid numeric entries", a problem with no finite
    assignment ValueError "... cost matrix is infeasible". Ctrl-C stops a long batch.

    Args:
        cost: a tensor (B, n, m) or (n, m), float32 or float64; or, as in scipy, any array-like (numpy
            array of any real dtype, np.matrix, nested lists), read as scipy reads it (a string, object
            or complex array raises scipy's TypeError).
        maximize: maximise the total instead (a bool; scipy takes any truthy object) (default False).

    Returns:
        (rows, cols), int64 of shape (B, min(n, m)) with rows sorted in each problem, so
        cost[b, rows[b], cols[b]].sum() is the optimum; one (n, m) problem gives scipy's pair of 1-D
        arrays. A tensor in gives tensors out (on the input's device: CUDA tensors are solved by the CPU
        kernel, the algorithm being sequential), anything else numpy arrays.
    """
    import numpy as np

    as_numpy = not isinstance(cost, torch.Tensor)
    if as_numpy:
        cost = torch.from_numpy(_scipy_cost_matrix(cost))
    # Entries are checked by the kernel (or scipy), which allows +inf as scipy does,
    # while the problem is in cache: a separate pass over the batch cost more than
    # solving weight-matching problems.
    _checks.tensor("cost", cost, ndims=(2, 3), shape="(B, n, m) or (n, m)", finite=False)
    if not isinstance(maximize, (bool, np.bool_)):
        raise TypeError(f"maximize must be a bool, got {type(maximize).__name__}")
    unbatched = cost.dim() == 2
    batch = cost.unsqueeze(0) if unbatched else cost
    if batch.device.type == "meta" or not _native():
        op = torch.ops.spectral_ext.linear_sum_assignment if batch.device.type == "meta" else \
            reference.linear_sum_assignment
        rows, cols = op(batch, bool(maximize))
    else:
        rows, cols = _interruptible(torch.ops.spectral_ext.linear_sum_assignment, batch.detach().cpu(),
                                    bool(maximize))
        rows, cols = rows.to(cost.device), cols.to(cost.device)
    if unbatched:
        rows, cols = rows[0], cols[0]
    if as_numpy:
        return rows.numpy(), cols.numpy()
    return rows, cols


def _scipy_cost_matrix(cost):
    """A cost that is not a tensor, read as scipy reads it (PyArray_ContiguousFromAny
    to float64): an array (np.matrix included; any object with __array__) is cast
    under numpy's "safe" rule, so strings, objects, complex and float128 raise scipy's
    TypeError; anything else (nested lists, scalars) is np.array(cost, dtype=float64),
    which parses number strings and reads None as NaN, as scipy does."""
    import numpy as np

    if isinstance(cost, np.ndarray) or hasattr(cost, "__array__"):
        array = np.asarray(cost)
        if not np.can_cast(array.dtype, np.float64, casting="safe"):
            raise TypeError(f"Cannot cast array data from {array.dtype!r} to dtype('float64') according to the "
                            "rule 'safe'")
    array = np.asarray(cost, dtype=np.float64)
    if array.ndim not in (2, 3):
        raise ValueError(f"expected a matrix (2-D array), got a {array.ndim} array (spectral_ext also takes a "
                         "batch of them, (B, n, m))")
    return np.ascontiguousarray(array)


# ---------------------------------------------------------------- fake kernel

@torch.library.register_fake("spectral_ext::linear_sum_assignment")
def _linear_sum_assignment_fake(cost, maximize=False):
    k = min(cost.shape[1], cost.shape[2])
    return (cost.new_empty((cost.shape[0], k), dtype=torch.int64),
            cost.new_empty((cost.shape[0], k), dtype=torch.int64))
