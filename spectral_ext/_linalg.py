"""Linear algebra shared by the method modules."""
from __future__ import annotations

import torch


def signed_svd(W: torch.Tensor):
    """Thin SVD W = U diag(S) V^T of a matrix or a batch (..., m, n), with the
    project's deterministic sign (DESIGN.md): each right singular vector v_i
    is flipped so that its entry of largest absolute value is positive (the
    first such entry on ties), and u_i with it.

    Returns U (..., m, k), S (..., k), V (..., n, k) with k = min(m, n)."""
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    V = Vh.transpose(-2, -1)
    # argmax returns the first maximal index, which settles ties.
    pivot = V.abs().argmax(dim=-2, keepdim=True)
    sign = torch.sign(torch.gather(V, -2, pivot))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return U * sign, S, V * sign


def batched_signed_svd(matrices: dict) -> dict:
    """signed_svd of many matrices, one batched call per distinct shape (and
    dtype/device): {key: W} -> {key: (U, S, V)}."""
    groups: dict = {}
    for key, W in matrices.items():
        groups.setdefault((tuple(W.shape), W.dtype, W.device), []).append(key)
    out = {}
    for keys in groups.values():
        U, S, V = signed_svd(torch.stack([matrices[k] for k in keys]))
        for i, k in enumerate(keys):
            out[k] = (U[i], S[i], V[i])
    return out


def gram_singular_values(M: torch.Tensor) -> torch.Tensor:
    """Singular values (decreasing, float64) of a matrix or a batch (..., r, c)
    from the eigenvalues of the smaller Gram matrix (the J^T J trick of seed
    003 section 3.2): float64 resolves sigma_i down to about 1e-8 sigma_1,
    far below the float32 tolerance of equation 4, and it is 10-20x faster
    than batched LAPACK SVDs on small layers."""
    M = M.double()
    if min(M.shape[-2:]) == 0:
        return M.new_zeros(*M.shape[:-2], 0)
    gram = M @ M.mT if M.shape[-2] <= M.shape[-1] else M.mT @ M
    return torch.linalg.eigvalsh(gram).flip(-1).clamp_min(0).sqrt()


def compute_dtype(dtype, weights) -> torch.dtype | None:
    """The dtype to factorise weights in: `dtype` when given; float32, with a
    warning, for float16/bfloat16 weights (no SVD kernel for them and too few
    bits for the spectrum); else None (their own dtype)."""
    if dtype is not None:
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be None or a floating torch.dtype, got {dtype!r}")
        if dtype in (torch.float16, torch.bfloat16):
            raise ValueError(f"dtype {dtype} is too narrow for an SVD; use torch.float32 or torch.float64")
        return dtype
    narrow = sorted({str(w.dtype).replace("torch.", "") for w in weights
                     if w.dtype in (torch.float16, torch.bfloat16)})
    if not narrow:
        return None
    import warnings

    warnings.warn(f"the model's weights are {', '.join(narrow)}: computing the spectra in float32",
                  RuntimeWarning, stacklevel=3)
    return torch.float32
