"""max_kernel_gram: the Gram matrix of the max kernel (wrapper, fake kernel,
autograd)."""
from __future__ import annotations

import torch

from .. import _checks, reference
from ._common import _CHUNK_ELEMENTS, _finite, _gib, _native, _refuse_unallocatable


def max_kernel_gram(X: torch.Tensor, Y: torch.Tensor | None = None) -> torch.Tensor:
    """Gram matrix of the max kernel behind G_ReLU-CKA (seed 004 definition 5.3).

    K[i, j] = max_c sum_s X[i, c, s] Y[j, c, s]: C is the channel axis the max runs over, S the spatial
    axis summed over (S = 1 for fully connected features).

    Memory: the result and, on the CPU, a copy of X (and Y) packed into 64-row tiles where both have 32
    rows or more; a side with fewer is read in place (any strides: an expanded input is never copied), so
    the peak is about the inputs' size. Refused up front (ValueError naming X and the size) when that
    would not fit in the device's free memory.

    Args:
        X: (N, C, S).
        Y: (N', C, S), or None for the self Gram of X, computed symmetric (default None).

    Returns:
        K, a tensor (N, N').
    """
    _checks.tensor("X", X, ndims=(3,), shape="(N, C, S)", finite=False)
    if Y is not None:
        _checks.tensor("Y", Y, ndims=(3,), shape="(N', C, S)", finite=False)
        _checks.same_device_dtype(X=X, Y=Y)
        if Y.shape[1:] != X.shape[1:]:
            raise ValueError(f"X (N, C, S) and Y (N', C, S) must agree on C and S, got X {tuple(X.shape)} "
                             f"and Y {tuple(Y.shape)}")
    if X.shape[1] == 0:
        raise ValueError("X must have at least one channel (C > 0): the max runs over channels")
    N, C, S = X.shape
    Np = X.shape[0] if Y is None else Y.shape[0]
    size = X.element_size()
    result = N * Np * size
    sides = [N] + ([] if Y is None else [Np])
    if not _native():  # the twin's blocks of (rows, N', C, S) products, the blocks' results and their cat
        needed = 2 * result + 2 * min(N, max(1, (1 << 22) // max(1, Np * C * S))) * Np * C * S * size
    elif X.device.type == "cpu":  # the 64-row tiles (csrc/cpu/max_kernel_gram.cpp: none below 32 rows)
        needed = result + (0 if min(N, Np) < 32 else sum(-(-n // 64) * 64 for n in sides) * C * S * size)
    else:  # channel-major copies
        needed = result + sum(sides) * C * S * size
    _refuse_unallocatable(needed, X.device, f"max_kernel_gram of X {tuple(X.shape)}"
                          + ("" if Y is None else f" and Y {tuple(Y.shape)}")
                          + f" (a {N} x {Np} result of {_gib(result)})",
                          "pass fewer samples (rows of X or Y), or smaller C x S, at a time",
                          *([X] if Y is None else [X, Y]))
    op = torch.ops.spectral_ext.max_kernel_gram if _native() else reference.max_kernel_gram
    out = op(X, Y)
    _finite(out, X=X, **({} if Y is None else {"Y": Y}))
    return out


# ---------------------------------------------------------------- fake kernel

@torch.library.register_fake("spectral_ext::max_kernel_gram")
def _max_kernel_gram_fake(X, Y=None):
    return X.new_empty((X.shape[0], (X if Y is None else Y).shape[0]))


# ---------------------------------------------------------------- autograd
# The backward is written with plain tensor ops (no autograd inside), so
# torch.compile can trace it; it recomputes what the forward did not keep.

def _max_kernel_gram_setup(ctx, inputs, output):
    X, Y = inputs
    ctx.self_gram = Y is None
    ctx.save_for_backward(X, X if Y is None else Y)


def _max_kernel_gram_backward(ctx, grad):
    # The max passes the gradient to the winning channel (the first on ties). The
    # winners are recomputed for a chunk of rows at a time, so only a
    # (rows, N', C) slice of the products exists, never (N, N', C).
    X, Y = ctx.saved_tensors
    N, C = X.shape[:2]
    step = max(1, _CHUNK_ELEMENTS // max(1, Y.shape[0] * C))
    gX, gY = torch.empty_like(X), torch.zeros_like(Y)
    for i0 in range(0, N, step):
        Xc = X[i0:i0 + step]
        winner = torch.einsum("ics,jcs->ijc", Xc, Y).argmax(-1)
        routed = torch.nn.functional.one_hot(winner, C).to(grad.dtype).mul_(grad[i0:i0 + step].unsqueeze(-1))
        gX[i0:i0 + step] = torch.einsum("ijc,jcs->ics", routed, Y)
        gY += torch.einsum("ijc,ics->jcs", routed, Xc)
    if ctx.self_gram:
        return gX + gY, None
    return gX, gY


torch.library.register_autograd("spectral_ext::max_kernel_gram", _max_kernel_gram_backward,
                                setup_context=_max_kernel_gram_setup)
