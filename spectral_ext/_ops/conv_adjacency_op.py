"""conv_adjacency: the squared-overlap adjacency of spectral neurons (wrapper,
fake kernel, autograd)."""
from __future__ import annotations

import torch

from .. import _checks, reference
from ._common import _CHUNK_ELEMENTS, _finite, _gib, _native, _refuse_unallocatable


def conv_adjacency(U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """Squared-overlap adjacency of spectral neurons (seed 000 sections 2.3, 4.2).

    a[n, m] = sum_z (sum_k U[k, m] V[k, z, n])^2. K2 = 1 is the fully connected case, K2 = kernel area
    the conv case, K2 = H*W the conv -> flatten -> Linear case. Refused up front (ValueError naming U and
    V and the size) when the result and the intermediates of the route would not fit in the device's
    free memory (expanded inputs can ask for terabytes).

    Args:
        U: (B, c, M) or (c, M).
        V: (B, c, K2, N) or (c, K2, N).

    Returns:
        The adjacency, a tensor (B, N, M) (or (N, M) for unbatched inputs).
    """
    _checks.tensor("U", U, ndims=(2, 3), shape="(B, c, M) or (c, M)", finite=False)
    _checks.tensor("V", V, ndims=(3, 4), shape="(B, c, K2, N) or (c, K2, N)", finite=False)
    _checks.same_device_dtype(U=U, V=V)
    if V.dim() != U.dim() + 1:
        raise ValueError(f"V must have one more dimension than U (U {tuple(U.shape)}, V {tuple(V.shape)})")
    unbatched = U.dim() == 2
    if unbatched:
        U, V = U.unsqueeze(0), V.unsqueeze(0)
    if V.shape[0] != U.shape[0] or V.shape[1] != U.shape[1]:
        raise ValueError(f"U (B, c, M) and V (B, c, K2, N) must agree on B and c, got U {tuple(U.shape)} "
                         f"and V {tuple(V.shape)}")
    B, c, M = U.shape
    K2, N = V.shape[2], V.shape[3]
    size = U.element_size()
    result = B * N * M * size
    if not _native():  # the twin's (B, K2, N, M) products and their squares
        needed = result + 2 * B * K2 * N * M * size
    else:  # the kernel's contiguous copies; on the CPU also a chunk of taps' products (csrc/cpu/conv_adjacency.cpp)
        needed = result + (0 if U.is_contiguous() else U.numel() * size) \
            + (0 if V.is_contiguous() else B * c * K2 * N * size)
        if U.device.type == "cpu" and B * N * M:
            chunk = max(1, min(K2, (1 << 23) // (B * N * M)))
            needed += chunk * B * N * M * size + (B * c * chunk * N * size if chunk < K2 else 0)
    _refuse_unallocatable(needed, U.device, f"conv_adjacency of U {tuple(U.shape)} and V {tuple(V.shape)} (a "
                          f"({B}, {N}, {M}) result of {_gib(result)})",
                          "pass fewer spectral neurons (U's M, V's N), taps (K2) or batches at a time", U, V)
    op = torch.ops.spectral_ext.conv_adjacency if _native() else reference.conv_adjacency
    out = op(U, V)
    _finite(out, U=U, V=V)
    return out.squeeze(0) if unbatched else out


# ---------------------------------------------------------------- fake kernel

@torch.library.register_fake("spectral_ext::conv_adjacency")
def _conv_adjacency_fake(U, V):
    return U.new_empty((U.shape[0], V.shape[3], U.shape[2]))


# ---------------------------------------------------------------- autograd
# The backward is written with plain tensor ops (no autograd inside), so
# torch.compile can trace it; it recomputes what the forward did not keep.

def _conv_adjacency_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _conv_adjacency_backward(ctx, grad):
    # da/dU and da/dV through inner[b, z, n, m] = sum_k U V, built for a chunk of
    # taps at a time and weighted in place: (B, K2, N, M) never exists.
    U, V = ctx.saved_tensors
    K2 = V.shape[2]
    step = max(1, _CHUNK_ELEMENTS // max(1, grad.numel()))
    gU = torch.zeros_like(U) if ctx.needs_input_grad[0] else None
    gV = torch.empty_like(V) if ctx.needs_input_grad[1] else None
    for z0 in range(0, K2, step):
        Vz = V[:, :, z0:z0 + step]
        weighted = torch.einsum("bkm,bkzn->bznm", U, Vz).mul_(grad.unsqueeze(1)).mul_(2)
        if gU is not None:
            gU += torch.einsum("bznm,bkzn->bkm", weighted, Vz)
        if gV is not None:
            gV[:, :, z0:z0 + step] = torch.einsum("bznm,bkm->bkzn", weighted, U)
    return gU, gV


torch.library.register_autograd("spectral_ext::conv_adjacency", _conv_adjacency_backward,
                                setup_context=_conv_adjacency_setup)
