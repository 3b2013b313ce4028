"""Linear algebra shared by the method modules."""
from __future__ import annotations

import contextlib
from typing import NamedTuple

import numpy as np
import torch


def _matmul(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """A @ B, through numpy's OpenBLAS where it is the faster BLAS (_openblas_is_faster; CPU tensors without
    autograd; strided views are handed over without copies)."""
    if A.device.type == "cpu" and not (A.requires_grad or B.requires_grad) and A.dtype == B.dtype \
            and A.dtype in (torch.float32, torch.float64) and _openblas_is_faster():
        # below _THREADED_WORK OpenBLAS runs one thread anyway: no limit to set
        with _openblas_threads() if A.numel() * B.shape[-1] >= _THREADED_WORK else contextlib.nullcontext():
            return torch.from_numpy(A.numpy() @ B.numpy())
    return A @ B


def _eigh(G: torch.Tensor):
    """torch.linalg.eigh, or numpy's (OpenBLAS LAPACK syevd) where that is faster (_numpy_eig)."""
    if _numpy_eig(G):
        with _openblas_threads():
            lam, X = np.linalg.eigh(G.numpy())
        return torch.from_numpy(lam), torch.from_numpy(X)
    return torch.linalg.eigh(G)


def _eigvalsh(G: torch.Tensor) -> torch.Tensor:
    """torch.linalg.eigvalsh, or numpy's where that is faster (_numpy_eig)."""
    # LAPACK's two-stage values-only solvers (?syevd/?syev/?syevr_2stage, exported by numpy's and scipy's
    # bundled OpenBLAS 0.3.31, not by scipy.linalg.lapack or torch's MKL) were probed through ctypes on the AMD
    # EPYC (float64, one thread, CPU time, medians): slower than numpy's syevd where our Grams are, 15.3 / 52.7 /
    # 157 ms against 11.6 / 41.7 / 135 ms at n = 512 / 896 / 1376 (the matrix sits in L3, so dsytrd's BLAS-2
    # half is not memory-bound), even at 2048 (506 / 521 ms), faster only from about 3072 (1.64 / 2.24 s; 4096:
    # 3.89 / 6.02 s), eigenvalues equal to 1.2e-14 lambda_max; scipy's ev/evd/evr/evx drivers are numpy's
    # times (to 2%). So syevd stays.
    if _numpy_eig(G):
        with _openblas_threads():
            return torch.from_numpy(np.linalg.eigvalsh(G.numpy()))
    return torch.linalg.eigvalsh(G)


def _sign_fix(U, S, V):
    # The largest |entry| is positive when max > -min: one pass each, 9x faster than argmax down the
    # columns of a 25088 x 4096 V; equal magnitudes (and zero vectors) go to argmax, whose first
    # maximal index settles the tie.
    high, low = V.amax(dim=-2, keepdim=True), V.amin(dim=-2, keepdim=True)
    sign = torch.where(high > -low, 1.0, -1.0).to(V.dtype)
    tie = high == -low
    if bool(tie.any()):
        pivot = torch.sign(torch.gather(V, -2, V.abs().argmax(dim=-2, keepdim=True)))
        sign = torch.where(tie, torch.where(pivot == 0, torch.ones_like(pivot), pivot), sign)
    return U * sign, S, V * sign


def _gram(M: torch.Tensor, panel: int = 512) -> torch.Tensor:
    """M M^T for a (..., r, c) batch with r <= c. Tall CPU Grams are built
    from row panels, the lower triangle only, each a plain matmul (gemm,
    _matmul): (r / panel + 1) / (2 r / panel) of a full product's flops, and
    on a 4096 x 25088 float32 map 3.5 s against BLAS syrk's 9.9 s
    (OpenBLAS, one thread); the upper triangle is the mirror, bit for bit."""
    r = M.shape[-2]
    if M.device.type != "cpu" or r < 2 * panel:
        return _matmul(M, M.mT)
    G = M.new_empty(*M.shape[:-1], r)
    for i0 in range(0, r, panel):
        i1 = min(r, i0 + panel)
        P = _matmul(M[..., i0:i1, :], M[..., :i1, :].mT)
        G[..., i0:i1, :i1] = P
        G[..., :i0, i0:i1] = P[..., :i0].mT
        # the diagonal block's upper triangle from its lower (a gemm need not round (i, j) as (j, i))
        block = P[..., i0:i1]
        G[..., i0:i1, i0:i1] = block.tril() + block.tril(-1).mT
    return G


# float32 products W^T u_i carry an error of about 6e-8 sigma_1 / sigma_i (measured): below this ratio it is
# under 1e-6 and the product runs 2.4x faster than in float64.
_FLOAT32_PRODUCT_RATIO = 16


def _other_side(M: torch.Tensor, M32: torch.Tensor | None, X: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """M^T X / S: float32 (for float32 results, M32 given) on the columns with
    sigma_i >= sigma_1 / 16, float64 on the rest."""
    if M32 is None:
        return _matmul(M.mT, X) / S.unsqueeze(-2)
    q = int((S >= S[..., :1] / _FLOAT32_PRODUCT_RATIO).sum(-1).min())
    Y = M32.new_empty(*M32.shape[:-2], M32.shape[-1], S.shape[-1])
    Y[..., :q] = _matmul(M32.mT, X[..., :q].float()) / S[..., :q].float().unsqueeze(-2)
    if q < S.shape[-1]:
        Y[..., q:] = _matmul(M.mT, X[..., q:]) / S[..., q:].unsqueeze(-2)
    return Y


def _gram_svd(W: torch.Tensor, top: int | None):
    """U, S, V (decreasing) of W from the eigenpairs of the smaller Gram matrix
    (the other side's vectors are W^T u_i / sigma_i); None when the kept
    singular values fall below 1e-6 sigma_1 (1e-3 for a float32 Gram), where
    that division loses accuracy."""
    r = min(W.shape[-2:])
    k = r if top is None else min(top, r)
    partial = k < r // 2 and W.device.type == "cpu"
    wide = W.shape[-2] <= W.shape[-1]
    # float32 results: the float32 map itself for the well-conditioned products (see _other_side).
    M32 = (W if wide else W.mT) if W.dtype == torch.float32 and W.device.type == "cpu" else None
    # A few leading pairs of a float32 map: a float32 Gram resolves them (see signed_svd).
    W = W.float() if partial and W.dtype == torch.float32 else W.double()
    M = W if wide else W.mT
    G = _gram(M)
    if partial:
        import scipy.linalg

        # MRRR on the requested eigenpairs only (LAPACK ?syevr): exact to rounding, far cheaper than all r.
        # G is a symmetric temporary of ours: its transpose is the Fortran-ordered array LAPACK works in, no copy.
        pairs = [scipy.linalg.eigh(g.numpy().T, subset_by_index=[r - k, r - 1], driver="evr", overwrite_a=True)
                 for g in G.reshape(-1, r, r)]
        lam = torch.from_numpy(np.stack([p[0] for p in pairs])).reshape(*G.shape[:-2], k)
        X = torch.from_numpy(np.stack([p[1] for p in pairs])).reshape(*G.shape[:-2], r, k)
    else:
        lam, X = _eigh(G)
        lam, X = lam[..., r - k:], X[..., r - k:]
    lam, X = lam.flip(-1), X.flip(-1)
    S = lam.clamp_min(0).sqrt()
    if bool((S[..., -1] <= (1e-3 if S.dtype == torch.float32 else 1e-6) * S[..., 0]).any()):
        return None
    Y = _other_side(M, None if partial else M32, X, S)
    return (X, S, Y) if wide else (Y, S, X)


def signed_svd(W: torch.Tensor, top: int | None = None):
    """Thin SVD W = U diag(S) V^T of a matrix or a batch (..., m, n), with the
    project's deterministic sign (DESIGN.md): each right singular vector v_i
    is flipped so that its entry of largest absolute value is positive (the
    first such entry on ties), and u_i with it.

    float64 input: LAPACK on the tall orientation (a wide W is decomposed as
    W^T, 3-7x faster with MKL), reference quality. Other dtypes: the
    eigenpairs of the smaller Gram matrix computed in float64 (the J^T J
    trick, 2-3x faster than LAPACK's SVD here, and more accurate than a
    float32 SVD: sigma_i to about 1e-16 (sigma_1 / sigma_i)^2 relative), the
    other side's vectors as W^T u_i / sigma_i; where some sigma_i falls below
    1e-6 sigma_1 (rank deficiency) LAPACK is used instead. For a float32 W
    that product runs in float32 on the columns with sigma_i >= sigma_1 / 16
    (error about 6e-8 sigma_1 / sigma_i, so below 1e-6; 2.4x faster on the
    4096 x 25088 VGG classifier) and in float64 on the others. Results come
    back in W's dtype.

    `top` = k < min(m, n) keeps the k leading triplets only, from the exact
    eigenpairs of the Gram matrix, not a randomized approximation (on the
    flat spectra of initialised networks its trailing vectors are wrong);
    Lanczos (ARPACK on the explicit Gram: 970 products for k = 128) and
    Chebyshev-filtered subspace iteration do converge there, but on VGG11's
    4096 x 4096 Gram they were no faster than ?syevr (7.0-7.7 s against
    7.2-8.5 s, one thread), so they are not used. On the CPU with k < min(m, n) / 2 only the k leading eigenpairs
    are computed (LAPACK's MRRR, ?syevr), and a float32 W keeps its Gram in
    float32: sigma_i then carries an absolute error of about 6e-8 sigma_1^2 /
    sigma_i (relative 6e-8 (sigma_1 / sigma_i)^2, below 1e-5 for the leading
    neurons of trained and random layers alike), the vectors about 6e-8
    sigma_1^2 / (sigma_i^2 - sigma_(i+1)^2); elsewhere all eigenpairs in float64
    as above. So U_k, S_k, V_k are the leading columns of the full SVD to that
    accuracy and the adjacencies built from them the top-left blocks of the
    full ones. float64 W: LAPACK, then truncated.

    Returns U (..., m, k), S (..., k), V (..., n, k) with k = min(m, n) or top."""
    m, n = W.shape[-2:]
    k = min(m, n) if top is None else min(top, m, n)
    if W.dtype != torch.float64 and min(m, n) > 0:
        out = _gram_svd(W, top)
        if out is not None:
            return _sign_fix(*(t.to(W.dtype) for t in out))
    A = W.double() if W.dtype != torch.float64 else W
    if m < n:
        Ut, S, Vth = torch.linalg.svd(A.mT, full_matrices=False)
        U, V = Vth.mT, Ut
    else:
        U, S, Vh = torch.linalg.svd(A, full_matrices=False)
        V = Vh.mT
    U, S, V = U[..., :k], S[..., :k], V[..., :k]
    return _sign_fix(*(t.to(W.dtype) for t in (U, S, V)))


class BlockDiagonal(NamedTuple):
    """A block-diagonal matrix given by its diagonal blocks (g, r, c) (a grouped convolution's flattening)."""
    blocks: torch.Tensor


def block_diagonal_svd(U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, top: int | None = None):
    """The signed SVD of a block-diagonal matrix from its blocks' (U (g, r, m),
    S (g, m), V (g, c, m)): U and V block-diagonal, singular values the union
    of the blocks' in decreasing order (ties in block order). Each vector is
    zero outside its block, so the blocks' signs are the project's sign."""
    g, r, m = U.shape
    order = torch.sort(S.reshape(-1), descending=True, stable=True).indices
    if top is not None:
        order = order[:top]
    block, column = order // m, order % m
    k = order.numel()
    U_full = U.new_zeros(g, r, k)
    V_full = V.new_zeros(g, V.shape[1], k)
    j = torch.arange(k, device=U.device)
    U_full[block, :, j] = U[block, :, column]
    V_full[block, :, j] = V[block, :, column]
    return U_full.reshape(g * r, k), S.reshape(-1)[order], V_full.reshape(-1, k)


def batched_signed_svd(matrices: dict, top: int | None = None, progress: bool = False,
                       desc: str = "SVDs") -> dict:
    """signed_svd of many matrices, one batched call per distinct shape (and
    dtype/device): {key: W} -> {key: (U, S, V)}; `top` as in signed_svd; a
    progress bar over the matrices when asked (it shows after 2 s). A
    BlockDiagonal value is decomposed block by block (block_diagonal_svd):
    a depthwise convolution's SVD costs its blocks', not the dense map's."""
    from tqdm.auto import tqdm

    groups: dict = {}
    for key, W in matrices.items():
        blocks = isinstance(W, BlockDiagonal)
        W = W.blocks if blocks else W
        groups.setdefault((blocks, tuple(W.shape), W.dtype, W.device), []).append(key)
    out = {}
    with tqdm(total=len(matrices), desc=desc, disable=not progress, delay=2, leave=False) as bar:
        for (blocks, *_), keys in groups.items():
            tensors = [matrices[k].blocks if blocks else matrices[k] for k in keys]
            U, S, V = signed_svd(torch.stack(tensors) if len(keys) > 1 else tensors[0].unsqueeze(0), top)
            for i, k in enumerate(keys):
                out[k] = block_diagonal_svd(U[i], S[i], V[i], top) if blocks else (U[i], S[i], V[i])
            bar.update(len(keys))
    return out


def gram_singular_values(M: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Singular values (decreasing, float64) of a matrix or a batch (..., r, c)
    from the eigenvalues of the smaller Gram matrix (the J^T J trick of seed
    003 section 3.2): float64 resolves sigma_i down to about 1e-8 sigma_1,
    far below the float32 tolerance of equation 4, and it is 10-20x faster
    than batched LAPACK SVDs on small layers. dtype=torch.float32 forms the
    Gram and its eigenvalues in float32 (the opt-in fast route of the weight
    metrics; its error is stated there). On a CPU whose vendor is not
    Intel the products and the large eigenproblems go to numpy's OpenBLAS
    (_matmul, _eigvalsh, _openblas_is_faster)."""
    if dtype != torch.float64:
        M = M.to(dtype)
        if min(M.shape[-2:]) == 0:
            return M.new_zeros(*M.shape[:-2], 0, dtype=torch.float64)
        small = M if M.shape[-2] <= M.shape[-1] else M.mT
        return _eigvalsh(_matmul(small, small.mT)).flip(-1).clamp_min(0).double().sqrt()
    M = M.double()
    if min(M.shape[-2:]) == 0:
        return M.new_zeros(*M.shape[:-2], 0)
    small = M if M.shape[-2] <= M.shape[-1] else M.mT
    return _eigvalsh(_matmul(small, small.mT)).flip(-1).clamp_min(0).sqrt()


_OPENBLAS_EIG_N = 192  # below it torch's batched eigensolvers have less per-matrix overhead than numpy's


def _numpy_eig(G: torch.Tensor) -> bool:
    return G.device.type == "cpu" and not G.requires_grad and G.dtype in (torch.float32, torch.float64) \
        and G.shape[-1] >= _OPENBLAS_EIG_N and _openblas_is_faster()


def _openblas_is_faster() -> bool:
    """torch's CPU BLAS and LAPACK are MKL, which runs generic code paths on
    other vendors' CPUs: on an AMD EPYC (AVX2, one thread) numpy's OpenBLAS
    took 0.052 s for nine 512 x 512 float64 Gram products against MKL's
    0.100 s, and 0.149 s against 0.213 s for their eigenvalues (equal to
    1e-13). Decided once per process from /proc/cpuinfo's vendor_id (Linux);
    MKL elsewhere."""
    global _OPENBLAS_CHOICE
    if _OPENBLAS_CHOICE is None:
        try:
            with open("/proc/cpuinfo") as info:
                vendor = next((line.split(":", 1)[1].strip() for line in info if line.startswith("vendor_id")), "")
        except OSError:
            vendor = ""
        _OPENBLAS_CHOICE = bool(vendor) and vendor != "GenuineIntel" and torch.backends.mkl.is_available()
    return _OPENBLAS_CHOICE


_OPENBLAS_CHOICE: bool | None = None
_THREADED_WORK = 1 << 22  # multiply-adds of a product from which the thread limit is set (it costs 20 us)
_BLAS_CONTROLLER = None


def _openblas_threads():
    """numpy's OpenBLAS held to torch's thread count for one call: torch.set_num_threads is the setting this
    package's users make (one thread per side when a machine is shared), and OpenBLAS would take every core."""
    global _BLAS_CONTROLLER
    if _BLAS_CONTROLLER is None:
        try:
            import threadpoolctl
        except ImportError:
            return contextlib.nullcontext()
        _BLAS_CONTROLLER = threadpoolctl.ThreadpoolController()
    return _BLAS_CONTROLLER.limit(limits=torch.get_num_threads(), user_api="blas")


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

    warnings.warn(f"the model's weights are {', '.join(narrow)}: the spectra are computed in float32",
                  RuntimeWarning, stacklevel=3)
    return torch.float32
