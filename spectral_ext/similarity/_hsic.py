"""CKA (seed 004 section 5 and appendix D.7): the linear, RBF, max
(G_ReLU-CKA, definition 5.3) and Laplace l1 (equation 5.6) kernels, the
seed 004 authors' "orthogonal CKA" (linear CKA on channel-normalised
features), Gram centring, the HSIC estimators and MinibatchCKA.

Accuracy: features are centred before any product (float32 ones in two
passes, the second removing the first mean's rounding; HSIC_1 and
the biased HSIC are invariant to shifting linear features, so this loses
nothing and removes the cancellation that makes float32 CKA packages err by
100%+ on ReLU features); every sum that cancels (the estimator's
corrections, Gram centring, the sums over a Gram's rows) runs in float64;
the matrix products of the centred features, kernel values and the sums
within one row (torch's cascade sums, tested to 1e-5 on CKA ~0.01) run in the
input dtype (measured: 3e-7 relative on float32 ReLU features, see
python_tests/test_similarity.py and test_similarity_speed.py)."""
from __future__ import annotations

import math
import warnings

import torch

from .. import _checks, _ops
from .._ops import max_kernel_gram
from ._layout import _SAFE_EXPONENT, _exponent, _feature_axis_of, _pair, _rescaled, _scaled, channel_normalize

KERNELS = ("linear", "rbf", "max", "laplace", "ortho")

def _median_offdiagonal(D: torch.Tensor, what: str, lower: bool = False) -> torch.Tensor:
    """The median of D[i, j] over the pairs i < j of a symmetric (N, N)
    matrix (torch.median's lower middle value for an even count); on the
    CPU by numpy's selection, O(N^2) instead of a sort. lower: D holds the
    pairs in its strict lower triangle (i > j) only."""
    n = D.shape[0]
    if n < 2:
        median = D.new_tensor(0.0)
    elif D.device.type == "cpu":
        import numpy as np

        A = D.detach().numpy()
        values = np.concatenate([A[i, :i] for i in range(1, n)] if lower else [A[i, i + 1:] for i in range(n - 1)])
        k = (values.size - 1) // 2
        values.partition(k)  # in place: values is a fresh array
        median = D.new_tensor(float(values[k]))
    else:
        upper = torch.triu(torch.ones(n, n, dtype=torch.bool, device=D.device), diagonal=1)
        median = D[upper.T if lower else upper].median()
    if not median > 0:
        raise ValueError(f"the median {what} between samples is 0 (most samples are identical): the kernel's "
                         "bandwidth is 0 and the measure is undefined; pass bandwidth/gamma or distinct samples")
    return median


def _squared_distances(F: torch.Tensor) -> torch.Tensor:
    """|f_i - f_j|^2 ((N, N), F's dtype) from one Gram product of the centred
    features: distances are shift invariant and centring keeps the product's
    cancellation small (kernel values need no float64; the HSIC sums that
    cancel run in float64 afterwards)."""
    F = F - F.mean(0, keepdim=True)  # any shift near the mean does
    rows = F.square().sum(1)
    sq = torch.addmm(rows[:, None] + rows[None, :], F, F.T, alpha=-2.0).clamp_min_(0)
    sq.diagonal().zero_()
    return sq


def _rbf_lower(R: torch.Tensor, bandwidth: float):
    """The RBF Gram of kernel_matrix as its strict lower triangle (zeros
    above; the diagonal is 1) from one syrk triangle, never mirrored (a
    transposed pass costs as much as the half matmul saves); None where
    syrk cannot run (see _syrk)."""
    F = _rescaled(R.reshape(R.shape[0], -1))  # the kernel is scale invariant (median bandwidth)
    F = F - F.mean(0, keepdim=True)  # distances are shift invariant
    G = _syrk(F.contiguous(), outer=True)
    if G is None:
        return None
    rows = torch.linalg.vecdot(F, F)
    # in place on G.T (the C-ordered lower triangle): no fresh N x N tensor
    sq = G.T.mul_(-2.0).add_(rows[:, None]).add_(rows[None, :]).clamp_min_(0)
    scale = bandwidth ** 2 * _median_offdiagonal(sq, "squared distance", lower=True)
    return sq.mul_(-0.5 / float(scale)).exp_().tril_(-1)


def kernel_matrix(X: torch.Tensor, kernel: str = "linear", bandwidth: float = 0.5,
                  gamma: float | None = None) -> torch.Tensor:
    """The (N, N) Gram matrix of features X for a CKA kernel.

    linear: <x_i, x_j> of the flattened features. rbf: exp(-|x_i - x_j|^2 / (2 s^2)) with
    s = bandwidth x the median distance (Kornblith et al.). max: max_c sum_s x~[i, c, s] x~[j, c, s] on
    channel-normalised features (definition 5.3 with appendix D.7.2; the max_kernel_gram operator, never
    the (N, N, C) tensor). laplace: exp(-gamma |x~_i - x~_j|_1) on channel-normalised features
    (equation 5.6), gamma = 1 / the median l1 distance by default. ortho: linear on channel-normalised
    features (the seed 004 authors' orthogonal CKA).

    Every kernel but linear is scale invariant (the median bandwidth, the channel normalisation): X is
    scaled by a power of two first where its magnitude would overflow or underflow. A linear Gram that
    overflows X's dtype is refused (ValueError): it has no finite value.

    Args:
        X: features (N, C, S).
        kernel: "linear", "rbf", "max", "laplace" or "ortho" (default "linear").
        bandwidth: the rbf kernel's s as a multiple of the median distance (default 0.5).
        gamma: the laplace kernel's gamma; None for 1 / the median l1 distance (default None).

    Returns:
        The Gram matrix, a tensor (N, N).
    """
    _check_kernel(kernel, bandwidth, gamma)
    if kernel in ("linear", "rbf"):
        F = X.reshape(X.shape[0], -1)
        if kernel == "linear":
            K = F @ F.T
            if not _checks.data_free(K) and not _checks.all_finite(K):
                _checks.tensor("X", X, ndims=(X.dim(),), shape="(N, C, S)")
                raise ValueError(f"the linear Gram of X overflows {str(K.dtype).replace('torch.', '')} (max |X| = "
                                 f"{float(X.abs().max()):.3g}): rescale X (cka is scale invariant and rescales "
                                 "itself)")
            return K
        sq = _squared_distances(_rescaled(F))
        scale = bandwidth ** 2 * _median_offdiagonal(sq, "squared distance")
        return sq.div_(-2 * scale).exp_()
    Xn = channel_normalize(X)
    if kernel == "max":
        # no output check: unit channels give |K| <= 1 (Cauchy-Schwarz), nothing can overflow
        Xn = Xn.contiguous()
        return torch.ops.spectral_ext.max_kernel_gram(Xn) if _ops._native() else max_kernel_gram(Xn)
    F = Xn.reshape(Xn.shape[0], -1)
    if kernel == "ortho":
        return F @ F.T
    l1 = torch.cdist(F, F, p=1)
    c = 1.0 / float(_median_offdiagonal(l1, "l1 distance")) if gamma is None else gamma
    return torch.exp(-c * l1)


def _centre_gram_(K: torch.Tensor, unbiased: bool) -> torch.Tensor:
    """In place on float64 K (a, n, n): the U-centred matrix (Szekely and
    Rizzo 2014: zero diagonal, then rows and columns centred with 1/(n-2)
    and the total with 1/((n-1)(n-2)), diagonal zero again) so that
    <U(K), U(L)> / (n(n-3)) is Song et al.'s HSIC_1 [NRK21, eq. 3]; biased:
    H K H, so <HKH, HLH> / (n-1)^2 = tr(KHLH) / (n-1)^2."""
    n = K.shape[-1]
    if unbiased:
        K.diagonal(dim1=-2, dim2=-1).zero_()
        rows = K.sum(-1)
        total = rows.sum(-1)
        K.sub_(rows[:, :, None] / (n - 2)).sub_(rows[:, None, :] / (n - 2))
        K.add_((total / ((n - 1) * (n - 2)))[:, None, None])
        K.diagonal(dim1=-2, dim2=-1).zero_()
    else:
        K.sub_(K.mean(-1, keepdim=True)).sub_(K.mean(-2, keepdim=True))
    return K


def _hsic_coefficients(n: int, unbiased: bool) -> tuple[float, float, float]:
    """(totals, rows, scale) of HSIC from <K, L>, the row sums and totals:
    unbiased, [NRK21] eq. 3, (<K~, L~> + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2)
    1'K~L~1) / (n(n-3)); biased, tr(KHLH) = <K, L> - 2/n 1'KL1 + 1'K1 1'L1 /
    n^2, over (n-1)^2."""
    if unbiased:
        return 1.0 / ((n - 1) * (n - 2)), -2.0 / (n - 2), 1.0 / (n * (n - 3))
    return 1.0 / n ** 2, -2.0 / n, 1.0 / (n - 1) ** 2


def _hsic_scale(n: int, unbiased: bool) -> float:
    return _hsic_coefficients(n, unbiased)[2]


def hsic(K: torch.Tensor, L: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """HSIC of every pair of Gram matrices, the HSIC_1 of seed 004 equation 5.4 (definition 5.3).

    unbiased=True: the estimator of Song et al. used by Nguyen et al. [NRK21, eq. 3],
    HSIC_1 = [tr(K~ L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3)) with K~, L~ the
    matrices with zeroed diagonals (needs n >= 4), computed as the inner product of U-centred matrices.
    unbiased=False: tr(K H L H) / (n-1)^2. Computed in float64.

    Args:
        K: Gram matrices (a, n, n).
        L: Gram matrices (b, n, n) of the same n samples.
        unbiased: the unbiased HSIC_1 estimator (True) or the biased one (False) (default True).

    Returns:
        A float64 tensor (a, b), the HSIC of K[i] and L[j] at [i, j].
    """
    n = K.shape[-1]
    if unbiased and n < 4:
        raise ValueError(f"the unbiased HSIC needs at least 4 samples per batch, got {n}")
    Uk = _centre_gram_(K.to(torch.float64, copy=True), unbiased).reshape(K.shape[0], -1)
    Ul = _centre_gram_(L.to(torch.float64, copy=True), unbiased).reshape(L.shape[0], -1)
    return (Uk @ Ul.T) * _hsic_scale(n, unbiased)


def _check_kernel(kernel, bandwidth=0.5, gamma=None):
    """The kernel's name and its options: bandwidth (rbf) and gamma (laplace) positive and finite."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    _checks.number("bandwidth", bandwidth, low=0, low_open=True)
    if gamma is not None:
        if kernel != "laplace":
            raise ValueError(f"gamma is the laplace kernel's option; kernel={kernel!r} does not use it")
        _checks.number("gamma", gamma, low=0, low_open=True)


def _syrk(F: torch.Tensor, outer: bool):
    """One triangle of F F' (outer) or F'F (the other triangle zero) by BLAS
    syrk, half the flops of a matmul (torch has no syrk); None where scipy's
    BLAS cannot take F (not a contiguous float32/64 CPU tensor)."""
    if F.device.type != "cpu" or not F.is_contiguous() or F.dtype not in (torch.float32, torch.float64) \
            or F.requires_grad:
        return None
    from scipy.linalg import blas

    syrk = blas.ssyrk if F.dtype == torch.float32 else blas.dsyrk
    # F's memory read in Fortran order is F' (d, n): trans=0 gives F'F, trans=1 gives F F'
    return torch.from_numpy(syrk(1.0, F.detach().numpy().T, trans=1 if outer else 0))


def _squared_norm64(A: torch.Tensor) -> torch.Tensor:
    """|A|_F^2 in float64 (one dot product of the float64 values, no squared copy)."""
    flat = A.to(torch.float64).reshape(-1)
    return torch.dot(flat, flat)


def _frobenius2_of_gram(F: torch.Tensor, blocks: int = 4) -> torch.Tensor:
    """|F'F|_F^2 = |F F'|_F^2 in float64 through the smaller of the two
    products (F: (n, d), centred): with F = [A_1 ... A_k] in column blocks
    (row blocks for F F'), sum over i <= j of (2 if i < j) |A_i'A_j|^2, the
    10 of 16 block products of one triangle as MKL matmuls (measured 25%
    faster than scipy's OpenBLAS syrk, which computes the triangle whole)."""
    n, d = F.shape
    parts = (F if d <= n else F.T).chunk(blocks if min(n, d) >= 64 * blocks else 1, dim=1)
    total = torch.zeros((), dtype=torch.float64, device=F.device)
    for i, A in enumerate(parts):
        for j in range(i, len(parts)):
            total += (2.0 if j > i else 1.0) * _squared_norm64(A.T @ parts[j])
    return total


def _constant(X: torch.Tensor) -> bool:
    """Every feature takes one value over the samples (exact, no tolerance)."""
    flat = X.reshape(X.shape[0], -1)
    return torch.equal(flat[1:], flat[:-1])  # each sample equals the next; stops at the first difference


def _gram(R, kernel, bandwidth, gamma):
    """kernel_matrix, the linear one of centred features: HSIC's Gram."""
    if kernel == "linear":
        # centring first removes the cancellation of a float32 Gram; HSIC is shift invariant, so the shift need
        # not be the exact mean and a float32 mean does
        F = R.reshape(R.shape[0], -1)
        copied = F.untyped_storage().data_ptr() != R.untyped_storage().data_ptr()  # reshape copied R's layout
        F = F.sub_(F.mean(0, keepdim=True)) if copied else F - F.mean(0, keepdim=True)  # one copy, not two
        return F @ F.T
    return kernel_matrix(R, kernel, bandwidth, gamma)


def _centred_features(R: torch.Tensor, kernel: str, out: torch.Tensor | None = None):
    """The linear route's share of one representation (N, C, S): its
    flattened features centred over the samples (channel-normalised first
    for "ortho"; float32 in two passes, the second taking out what the first
    mean's rounding left), written into `out` when given, and the float64
    squared row norms (sums of squares: no cancellation)."""
    F = (channel_normalize(R) if kernel == "ortho" else R).reshape(R.shape[0], -1)
    Fc = F - F.mean(0, keepdim=True)
    if F.dtype != torch.float64:
        Fc -= Fc.mean(0, keepdim=True)
    if out is not None:
        Fc = out.copy_(Fc)
    return Fc, torch.linalg.vecdot(Fc, Fc).to(torch.float64)


def _buffer(workspace, key, shape, dtype, device) -> torch.Tensor:
    """An uninitialised tensor for `key`, reused from `workspace` (a dict,
    or None for a fresh one) when the last one has this shape, dtype, device
    and inference mode (an inference tensor cannot be written outside
    torch.inference_mode): no allocation, so no fresh pages to fault in, per
    batch. Buffers over _WORKSPACE_BYTES are never kept."""
    if workspace is None:
        return torch.empty(shape, dtype=dtype, device=device)
    spec = (tuple(shape), dtype, device, torch.is_inference_mode_enabled())
    kept = workspace.get(key)
    if kept is not None and kept[0] == spec:
        return kept[1]
    buffer = torch.empty(shape, dtype=dtype, device=device)
    workspace.pop(key, None)
    if buffer.numel() * buffer.element_size() <= _WORKSPACE_BYTES:
        workspace[key] = (spec, buffer)
    return buffer


_WORKSPACE_BYTES = 1 << 28


_STACK_BYTES = 1 << 20


def _exponent_of(largest: float, dtype: torch.dtype) -> int:
    """_exponent from a representation's largest magnitude."""
    if not 0 < largest < math.inf:
        return 0
    e = math.frexp(largest)[1]
    return 0 if abs(e) <= _SAFE_EXPONENT.get(dtype, 16) else e


def _linear_grams_into(out, reps, index, exps, constant, scale, workspace, key, check=None):
    """The linear Grams of _gram of reps[i] (i in index, one shape and
    out's dtype) into out[i], a chunk of them at a time stacked into one
    reused (m, n, d) buffer: one copy, one max (scale: _exponent, written to
    exps, the chunk scaled in place), one mean and one in-place centring, one
    batched product written into out (no fresh N x N or N x d tensor per
    representation: a fresh one is an mmap whose pages fault in on every
    batch)."""
    n, d = reps[index[0]].shape[0], reps[index[0]].shape[1] * reps[index[0]].shape[2]
    size = max(1, min(len(index), _STACK_BYTES // max(1, n * d * out.element_size())))
    buffer = _buffer(workspace, f"{key}features{n}x{d}", (size, n, d), out.dtype, out.device)
    for start in range(0, len(index), size):
        part = index[start:start + size]
        F = buffer if len(part) == size else buffer[:len(part)]
        torch.stack([reps[i] for i in part], out=F.view(len(part), *reps[part[0]].shape))
        if n > 1 and not _checks.data_free(F):
            flat = F.reshape(len(part), -1)
            # a representation whose first two samples differ is not constant (most are: one comparison for all)
            stats = torch.stack((flat.amax(1), flat.amin(1), (F[:, 0] != F[:, 1]).any(1).to(F.dtype)), 1)
            for j, (high, low, differ) in enumerate(stats.tolist()):
                if check is not None and not (math.isfinite(high) and math.isfinite(low)):  # NaN propagates
                    raise ValueError(f"{check} contains NaN or infinite values")
                exps[part[j]] = _exponent_of(max(-low, high), out.dtype) if scale else 0
                constant[part[j]] = False if differ else None  # None: _constant decides
        else:
            if check is not None:
                for i in part:
                    if not _checks.data_free(reps[i]) and not _checks.all_finite(reps[i]):
                        raise ValueError(f"{check} contains NaN or infinite values")
            if scale:
                for i in part:
                    exps[i] = _exponent(reps[i])
        for j, e in enumerate(exps[i] for i in part):
            if e:  # _scaled, in place
                half = -e // 2
                F[j].mul_(2.0 ** half).mul_(2.0 ** (-e - half))
        F.sub_(F.mean(1, keepdim=True))  # a float32 mean does: see _gram
        if part == list(range(part[0], part[0] + len(part))):
            torch.bmm(F, F.transpose(1, 2), out=out[part[0]:part[0] + len(part)])
        else:
            out[part] = torch.bmm(F, F.transpose(1, 2))


def _stacked_grams(reps, kernel, bandwidth, gamma, workspace=None, key="", scale=False, check=None):
    """(Grams, exponents, constant): the (K, n, n) Grams of _gram in one tensor of the
    representations' common dtype (a reused buffer, _linear_grams_into for
    the linear kernel) and, scale: each representation's _exponent, the
    Gram being that of the representation scaled by it (_scaled); a fresh
    torch.stack where autograd records the operations. constant[i]: False
    where R_i is known not to be constant, else None (_constant decides)."""
    exps, constant = [0] * len(reps), [None] * len(reps)
    if check is not None and not all(kernel == "linear" and R.dtype == reps[0].dtype for R in reps):
        for R in reps:  # the maxima of _linear_grams_into test them otherwise
            if not _checks.data_free(R) and not _checks.all_finite(R):
                raise ValueError(f"{check} contains NaN or infinite values")
        check = None
    if torch.is_grad_enabled() and any(R.requires_grad for R in reps):
        if scale:
            exps = [_exponent(R) for R in reps]
        return torch.stack([_gram(_scaled(R, e), kernel, bandwidth, gamma) for R, e in zip(reps, exps)]), exps, \
            constant
    n = reps[0].shape[0]
    dtype = reps[0].dtype
    for R in reps[1:]:
        dtype = torch.promote_types(dtype, R.dtype)
    out = _buffer(workspace, key + "grams", (len(reps), n, n), dtype, reps[0].device)
    groups = {}
    for i, R in enumerate(reps):
        if kernel == "linear" and R.dtype == dtype:
            groups.setdefault(R.shape, []).append(i)
        else:
            e = exps[i] = _exponent(R) if scale else 0
            out[i].copy_(_gram(_scaled(R, e), kernel, bandwidth, gamma))
    for index in groups.values():
        _linear_grams_into(out, reps, index, exps, constant, scale, workspace, key, check)
    return out, exps, constant


# HSIC(K_i, K_i) below which (or not finite) the triangle route hands a batch to _stacked_grams' Gram route, which
# finds NaN and infinite features and scales the representations by powers of two: above it no float32 (float64)
# Gram entry or product of two entries that matters underflows, and any that overflowed made H infinite or NaN.
# Powers of two scale exactly, so the two routes give the same numbers.
_TRIANGLE_SMALLEST = {torch.float32: 2.0 ** -90, torch.float64: 2.0 ** -900}


def _triangle_cuts(n: int) -> list:
    """The row blocks of _triangle_hsic: two halves for n >= 32 divisible
    by 4 (the lower triangle's 3 of 4 blocks, measured 10-25% faster than
    the whole Gram), else the whole Gram."""
    return [0, n // 2, n] if n >= 32 and n % 4 == 0 else [0, n]


def _triangle_weights(cuts, workspace, device) -> torch.Tensor:
    """Float64 weights of the n-long chunks of _triangle_hsic's blocks: 1
    for the diagonal blocks' chunks, 2 for those below the diagonal."""
    n = cuts[-1]
    key = ("triangle_weights", tuple(cuts), device)
    weights = None if workspace is None else workspace.get(key)
    if weights is None:
        values = []
        for low, high in zip(cuts, cuts[1:]):
            width = high - low
            values += [1.0] * (width * width // n) + [2.0] * ((n - high) * width // n)
        weights = torch.tensor(values, dtype=torch.float64, device=device)
        if workspace is not None:
            workspace[key] = weights
    return weights


def _triangle_hsic(reps, unbiased: bool, workspace=None):
    """(H, constant) for the linear kernel's Gram route, or None: H (K, K)
    float64, the HSIC of every pair of reps (each (n, C, S) or (n, d); one
    dtype, float32 or float64; n >= 4) as _gram_hsic gives it for a list
    with itself (0 for a constant representation); constant[i]: R_i is
    constant.

    The features are stacked a chunk of same-shaped representations at a
    time into a reused buffer and centred (a float32 mean does, see _gram);
    of each Gram only the block lower triangle is formed (_triangle_cuts:
    with halves, F F_1' and F_2 F_2', 3/4 of the products), into reused
    (K, rows, width) blocks. Song et al.'s HSIC_1 is <K~, L~> from the
    blocks (products in the Grams' dtype summed over chunks of n, as
    _gram_inners sums rows; the chunks summed in float64, those below the
    diagonal twice) with the corrections of the float64 row sums and
    totals (each row summed in the Grams' dtype); biased: tr(KHLH) from
    <K, L>, the row sums and totals. All pairs take one batched product.

    None (the caller takes the Gram route of _stacked_grams) where some
    HSIC(K_i, K_i) of a representation that varies is not finite or below
    _TRIANGLE_SMALLEST: NaN or infinite features, or ones whose squares
    overflow or underflow."""
    K, n, dtype, device = len(reps), reps[0].shape[0], reps[0].dtype, reps[0].device
    cuts = _triangle_cuts(n)
    spans = list(zip(cuts, cuts[1:]))
    blocks = [_buffer(workspace, f"triangle{j}", (K, n - low, high - low), dtype, device)
              for j, (low, high) in enumerate(spans)]
    groups = {}
    for i, R in enumerate(reps):
        groups.setdefault(R.shape, []).append(i)
    order = [i for index in groups.values() for i in index]  # the representations' places in the blocks
    differ = []
    start = 0
    for shape, index in groups.items():
        d = math.prod(shape[1:])
        size = max(1, min(len(index), _STACK_BYTES // max(1, n * d * blocks[0].element_size())))
        buffer = _buffer(workspace, f"triangle_features{n}x{d}", (size, n, d), dtype, device)
        for first in range(0, len(index), size):
            part = index[first:first + size]
            F = buffer if len(part) == size else buffer[:len(part)]
            torch.stack([reps[i] for i in part], out=F.view(len(part), *shape))
            differ.append((F[:, 0] != F[:, 1]).any(1))  # a representation whose first two samples differ varies
            F.sub_(F.sum(1, keepdim=True), alpha=1.0 / n)  # centred (any shift near the mean does, see _gram)
            for (low, high), block in zip(spans, blocks):
                torch.bmm(F[:, low:], F[:, low:high].transpose(1, 2), out=block[start:start + len(part)])
            start += len(part)
    constant = [False] * K
    for position, varies in enumerate((differ[0] if len(differ) == 1 else torch.cat(differ)).tolist()):
        if not varies and _constant(reps[order[position]]):
            if not bool(torch.isfinite(reps[order[position]][0]).all()):
                return None  # inf everywhere is "constant" to torch.equal: the Gram route refuses it by name
            constant[order[position]] = True
            for block in blocks:  # its HSICs are exactly 0
                block[position].zero_()
    if unbiased:
        for (low, high), block in zip(spans, blocks):
            block[:, :high - low].diagonal(dim1=1, dim2=2).zero_()
    # K~ 1 (unbiased), K 1 (biased): each row summed in the Grams' dtype (the rows of the blocks above the diagonal
    # are the columns of those below it), then float64
    rows = blocks[0].sum(-1)
    if len(blocks) > 1:
        h = cuts[1]
        rows.add_(torch.cat((blocks[0][:, h:].sum(1), blocks[1].sum(-1)), 1))
    rows = rows.to(torch.float64)
    totals = rows.sum(-1)
    # <K_i, K_j> of every pair: the blocks' n-long chunks (c, K, n), one batched product in the Grams' dtype, the
    # chunks summed in float64 with their weights
    if len(blocks) == 1:
        chunks = blocks[0].view(K, -1, n).transpose(0, 1)
    else:
        chunks = _buffer(workspace, "triangle_chunks", (sum(b[0].numel() for b in blocks) // n, K, n), dtype, device)
        torch.cat([block.view(K, -1, n).transpose(0, 1) for block in blocks], 0, out=chunks)
    products = torch.bmm(chunks, chunks.transpose(1, 2))
    inner = _triangle_weights(cuts, workspace, device) @ products.view(products.shape[0], -1).to(torch.float64)
    t, r, scale = _hsic_coefficients(n, unbiased)
    half = 0.5 * scale
    H = torch.addmm(inner.view(K, K), rows, rows.T, beta=half, alpha=r * half).addr_(totals, totals, alpha=t * half)
    H = H + H.T  # symmetric by definition, though float32 products may round per side
    smallest = _TRIANGLE_SMALLEST[dtype]
    if not all(smallest <= v < math.inf for v, i in zip(H.diagonal().tolist(), order) if not constant[i]):
        return None
    if order != list(range(K)):
        back = sorted(range(K), key=order.__getitem__)  # each representation's position in the blocks
        H = H[back][:, back]
    return H, constant


class _Batch:
    """One batch's representations reduced to what HSIC needs: centred
    features (feature route, linear kernels) or Grams (Gram route), each
    computed once and shared by every pair.

    Gram route: the Grams K_i stacked in float64 (K, n^2), with zeroed
    diagonals (K~_i) for the unbiased HSIC, their float64 row sums (K, n)
    and totals (K,): Song et al.'s HSIC_1 (and the biased HSIC) of a pair
    is <K~, L~> plus corrections from these (_gram_hsic, as _hsic_direct
    for one pair), so the U-centred (or H K H) matrices are never formed."""

    def __init__(self, reps, kernel, bandwidth, gamma, unbiased, route, workspace=None, key="", scale=False,
                 check=None):
        """scale (Gram route): each representation scaled by its _exponent
        first, the exponents in self.exps (else the caller has scaled them);
        check (Gram route): the representations' name, their finiteness not
        yet checked (ValueError)."""
        self.n = reps[0].shape[0]
        self.constant = [_constant(R) for R in reps] if route != "grams" else None
        self.route = route
        self.exps = [0] * len(reps)
        if route == "features":
            self.features, self.norms = [], []
            for R in reps:
                Fc, norms = _centred_features(R, kernel)
                self.features.append(Fc)
                self.norms.append(norms)
        elif route == "direct":  # one pair of large Grams: kept in their dtype
            lower = [_rbf_lower(R, bandwidth) for R in reps] if kernel == "rbf" else [None]
            self.lower = all(K is not None for K in lower)
            if self.lower:
                self.grams = lower
                self.terms = [_gram_terms(K, lower=True) for K in lower]
            else:
                self.grams = [_gram(R, kernel, bandwidth, gamma) for R in reps]
                self.terms = [_gram_terms(K) for K in self.grams]
        else:
            stacked, self.exps, constant = _stacked_grams(reps, kernel, bandwidth, gamma, workspace, key, scale,
                                                          check)
            self.constant = [_constant(R) if c is None else c for R, c in zip(reps, constant)]
            if stacked.dtype not in (torch.float32, torch.float64) or stacked.requires_grad:
                stacked = stacked.to(torch.float64)  # a copy: the in-place writes below leave autograd's graph
            self.diag = stacked.diagonal(dim1=-2, dim2=-1).to(torch.float64, copy=True)
            if unbiased:
                stacked.diagonal(dim1=-2, dim2=-1).zero_()
            # K~ 1 (unbiased), K 1 (biased): each row summed in the Grams' dtype (as _gram_terms), then float64
            self.rows = stacked.sum(-1).to(torch.float64)
            self.totals = self.rows.sum(-1)
            self.grams = stacked


def _gram_inners(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """(<A_i, B_j>) (a, b) of stacked Grams A (a, n, n), B (b, n, n) in
    float64: float64 Grams by one product; float32 ones as _inners sums them
    (the products and the sums within one row in float32, the rows summed in
    float64), every pair by one batched product over the rows, (n, a, n) x
    (n, n, b): one pass over the float32 Grams, no float64 copy."""
    if A.dtype != B.dtype:
        A, B = A.to(torch.float64), B.to(torch.float64)
    if A.dtype == torch.float64:
        return A.reshape(A.shape[0], -1) @ B.reshape(B.shape[0], -1).T
    return torch.bmm(A.transpose(0, 1), B.permute(1, 2, 0)).sum(0, dtype=torch.float64)


def _gram_selves(A: torch.Tensor) -> torch.Tensor:
    """(<A_i, A_i>) (a,) in float64, summed as _gram_inners sums them."""
    if A.dtype == torch.float64:
        flat = A.reshape(A.shape[0], -1)
        return torch.linalg.vecdot(flat, flat)
    return torch.linalg.vecdot(A, A).sum(-1, dtype=torch.float64)


def _gram_hsic(a: _Batch, b: _Batch, same: bool, unbiased: bool):
    """(xy, xx, yy): the HSICs of every pair of the Gram route's batches a
    and b and their self terms, from one product of the stacked Grams
    (_gram_inners): unbiased, [NRK21] eq. 3 (<K~, L~> + 1'K~1 1'L~1 /
    ((n-1)(n-2)) - 2/(n-2) 1'K~L~1) / (n(n-3)); biased, tr(KHLH) = <K, L>
    - 2/n 1'KL1 + 1'K1 1'L1 / n^2, over (n-1)^2; all in float64."""
    totals, rows, scale = _hsic_coefficients(a.n, unbiased)
    xy = torch.addmm(_gram_inners(a.grams, b.grams), a.rows, b.rows.T, alpha=rows)
    xy = xy.addr_(a.totals, b.totals, alpha=totals).mul_(scale)
    if same:  # one list with itself: symmetric by definition, though float32 row products round per side
        xy = (xy + xy.T).mul_(0.5)
        xx = xy.diagonal().clone()
        return xy, xx, xx

    def selves(batch):
        terms = torch.linalg.vecdot(batch.rows, batch.rows).mul_(rows).add_(_gram_selves(batch.grams))
        return terms.addcmul_(batch.totals, batch.totals, value=totals).mul_(scale)

    return xy, selves(a), selves(b)


def _gram_terms(K: torch.Tensor, lower: bool = False):
    """What HSIC needs from one Gram matrix without a float64 copy: its
    diagonal, row sums and total (each row summed in K's dtype, torch's
    pairwise sum, the rows in float64: 9x faster than a float64 sum).
    lower: K holds the strict lower triangle of a symmetric Gram with unit
    diagonal (RBF, _rbf_lower)."""
    if lower:
        diag = torch.ones(K.shape[0], dtype=torch.float64, device=K.device)
        rows = (K.sum(1) + K.sum(0)).to(torch.float64) + diag
    else:
        diag = K.diagonal().to(torch.float64)
        rows = K.sum(1).to(torch.float64)
    return diag, rows, rows.sum()


def _inners(pairs, rows: int = 64) -> list:
    """[sum A * B for (A, B) in pairs] (matrices of one shape): row dot
    products in the matrices' dtype (cascade sums), summed in float64, in
    one pass over blocks of `rows` rows: each block is read from memory
    once and its products are taken in L2 through one buffer (no N x N
    product tensor, no float64 copy)."""
    first = pairs[0][0]
    n = first.shape[0]
    buffer = torch.empty((min(rows, n), first.shape[1]), dtype=first.dtype, device=first.device)
    totals = [torch.zeros((), dtype=torch.float64, device=first.device) for _ in pairs]
    for start in range(0, n, rows):
        part = buffer[:min(rows, n - start)]
        for total, (A, B) in zip(totals, pairs):
            torch.mul(A[start:start + rows], B[start:start + rows], out=part)
            total += part.sum(1).sum(dtype=torch.float64)
    return totals


def _hsic_direct(n: int, tk, tl, inner, unbiased: bool, lower: bool = False) -> torch.Tensor:
    """HSIC of one pair of (n, n) Gram matrices K, L from eq. 3 of [NRK21]
    (unbiased) or tr(KHLH) / (n-1)^2, the sums over rows in float64 (no
    centred copies): tk, tl their _gram_terms, inner = sum K * L (_inners).
    lower: K and L hold strict lower triangles (_rbf_lower)."""
    (dk, rk, sk), (dl, rl, sl) = tk, tl
    full = 2.0 * inner + dk @ dl if lower else inner
    if not unbiased:
        return (full - 2.0 / n * (rk @ rl) + sk * sl / n ** 2) / (n - 1) ** 2
    rk, rl = rk - dk, rl - dl  # K~ 1, L~ 1
    trace = full - dk @ dl
    return (trace + (sk - dk.sum()) * (sl - dl.sum()) / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (rk @ rl)) \
        / (n * (n - 3))


def _feature_hsic(trace: torch.Tensor, kx: torch.Tensor, ky: torch.Tensor, n: int, unbiased: bool):
    """(a, b) HSICs of linear kernels from centred features X_i, Y_j (no
    N x N matrix): trace[i, j] = |X_i'Y_j|^2 = tr(K_i L_j), kx (a, n), ky
    (b, n) the float64 squared row norms (the Grams' diagonals). Unbiased
    ([NRK21] eq. 3): tr(K~L~) = |X'Y|^2 - kx.ky, 1'K~1 = -sum kx and
    K~1 = -kx because X'1 = 0; biased: tr(KHLH) = |X'Y|^2."""
    if not unbiased:
        return trace / (n - 1) ** 2
    sx, sy = kx.sum(1), ky.sum(1)
    return (trace - (kx @ ky.T) * (1 + 2.0 / (n - 2)) + torch.outer(sx, sy) / ((n - 1) * (n - 2))) / (n * (n - 3))


def _feature_traces(a: _Batch, b: _Batch, same: bool) -> torch.Tensor:
    """(len(a), len(b)) |X_i'Y_j|^2 in float64, N D D' per pair (a self
    term through the smaller product; when same, the upper triangle mirrored)."""
    out = torch.empty(len(a.features), len(b.features), dtype=torch.float64, device=a.features[0].device)
    for i, X in enumerate(a.features):
        for j, Y in enumerate(b.features):
            if same and j < i:
                out[i, j] = out[j, i]
            else:
                out[i, j] = _frobenius2_of_gram(X) if same and i == j else _squared_norm64(X.T @ Y)
    return out


def _self_feature_hsic(a: _Batch, unbiased: bool) -> torch.Tensor:
    """(len(a),) HSIC(K_i, K_i) of _feature_hsic."""
    rows = torch.stack(a.norms)
    traces = torch.diag(torch.stack([_frobenius2_of_gram(X) for X in a.features]))
    return _feature_hsic(traces, rows, rows, a.n, unbiased).diagonal()


def _route(kernel, n, dims_a, dims_b) -> str:
    """The cheaper exact route for linear kernels: Gram matrices cost
    n^2 (sum of dims) plus n^2 per pair, centred features n D D' per pair
    and n D min(n, D) per self term."""
    if kernel not in ("linear", "ortho"):
        return "grams"
    grams = n * n * (sum(dims_a) + sum(dims_b) + len(dims_a) * len(dims_b))
    features = n * sum(dims_a) * sum(dims_b) + sum(n * d * min(n, d) for d in list(dims_a) + list(dims_b))
    return "features" if features < grams else "grams"


def _cka_from_hsic(xy: torch.Tensor, xx: torch.Tensor, yy: torch.Tensor):
    """CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) (seed 004 equation
    5.4) of the (a, b) cross HSICs xy and the self terms xx (a,), yy (b,):
    NaN in the rows and columns whose self term is not positive (a constant
    representation, or an unbiased estimate <= 0 from too few samples),
    where CKA is undefined. Returns (cka, bad_x, bad_y)."""
    bad_x, bad_y = ~(xx > 0), ~(yy > 0)
    denominator = (xx.clamp_min(0)[:, None] * yy.clamp_min(0)[None, :]).sqrt()
    cka = xy / torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    return cka.masked_fill(bad_x[:, None] | bad_y[None, :], float("nan")), bad_x, bad_y


def _undefined(names, bad, constant) -> list[str]:
    """The names (default #i) of the representations whose CKA is undefined, saying why."""
    names = names if names is not None else [f"#{i}" for i in range(len(bad))]
    return [f"{names[i]} ({'constant' if constant[i] else 'HSIC estimate <= 0: too few samples'})"
            for i in range(len(bad)) if bad[i]]


class MinibatchCKA:
    """CKA accumulated over minibatches (Nguyen et al. [NRK21], the
    minibatch CKA behind seed 004 Fig. 2, 5, 9, with the kernels of section
    5 and appendix D.7): the mean of the per-batch unbiased HSICs, so the
    dataset never needs to fit in memory. Each representation of a batch is
    reduced once (centred features or one U-centred Gram, in float64), every
    pair is an inner product of those. CKA is scale invariant and so is this:
    a representation too large or too small for its squares is scaled by a
    power of two first (the linear kernel's sums kept at the largest scale
    seen). The channel normalisation of the max,
    Laplace and ortho kernels uses each batch's statistics (it keeps their
    invariance).

    update(Xs, Ys) takes lists of representations of the same batch (or single
    tensors), each (N, C, S) or laid out as feature_axis says; value()
    returns the (len(Xs), len(Ys)) CKA matrix, a float64 tensor (1 x 1 for
    single tensors). Pass Ys=None to compare Xs with themselves (each
    reduced once)."""

    def __init__(self, kernel: str = "linear", unbiased: bool = True, bandwidth: float = 0.5,
                 gamma: float | None = None):
        _check_kernel(kernel, bandwidth, gamma)
        self.kernel, self.unbiased, self.bandwidth, self.gamma = kernel, unbiased, bandwidth, gamma
        self.xy = self.xx = self.yy = None
        self.varied_x = self.varied_y = None
        self.batches = 0
        self._workspace = {}  # buffers reused by the batches of one shape (_buffer)

    def _reps(self, reps, name, feature_axis):
        """as_channels of each representation ((N, d) ones left 2-D, as _add
        takes them), all but its finiteness test (_add runs it: on the Gram
        route of the linear kernel from what it computes anyway, one pass
        fewer per representation)."""
        reps = [reps] if isinstance(reps, torch.Tensor) else list(reps)
        if not reps:
            raise ValueError(f"{name} lists no representation")
        out = []
        flat = feature_axis is None or (type(feature_axis) is int and feature_axis in (1, -1))
        for R in reps:
            if flat and isinstance(R, torch.Tensor) and R.dim() == 2 and R.dtype in _checks.FLOAT_DTYPES \
                    and R.shape[0] and R.shape[1]:
                out.append(R)  # (N, d): as _add takes it
                continue
            _checks.tensor(name, R, ndims=range(2, 7), shape="(N, d), (N, C, H, W) or (N, tokens, features)",
                           finite=False)
            axis = _feature_axis_of(name, R, feature_axis)
            R = R.movedim(axis, 1) if axis != 1 else R
            if R.shape[1] == 0 or R.shape[0] == 0:
                raise ValueError(f"{name} has no samples or no features (shape {tuple(R.shape)})")
            out.append(R if R.dim() == 3 else R.reshape(R.shape[0], R.shape[1], -1))
        return out

    def update(self, Xs, Ys=None, feature_axis: int | None = None) -> None:
        Xs = self._reps(Xs, "X", feature_axis)
        self._add(Xs, None if Ys is None else self._reps(Ys, "Y", feature_axis), check=("X", "Y"))

    def _add(self, Xs: list, Ys: list | None = None, check=None) -> None:
        """update() of representations already checked and laid out (N, C, S)
        or (N, d) (cka and similarity_matrix check theirs at the edge, naming
        them); check: the names of Xs and Ys, whose finiteness is not
        checked yet."""
        same = Ys is None
        Ys = Xs if same else Ys
        reps = Xs if same else Xs + Ys
        shapes = [R.shape for R in reps]
        n = {shape[0] for shape in shapes}
        if len(n) != 1:
            raise ValueError(f"every representation of a batch must hold the same samples, got sizes {sorted(n)}")
        n = n.pop()
        if self.unbiased and n < 4:
            raise ValueError(f"the unbiased HSIC needs at least 4 samples per batch, got {n}")
        dims = [shape.numel() // n if n else math.prod(shape[1:]) for shape in shapes]
        dims_a, dims_b = dims[:len(Xs)], [] if same else dims[len(Xs):]
        route = _route(self.kernel, n, dims_a, dims_b)
        if route == "grams" and len(Xs) == 1 and len(Ys) == 1:
            route = "direct"
        if route == "grams" and self._triangle_route(reps, n, dims) \
                and self._add_triangle(reps, len(Xs), same):
            return
        Xs = [R if R.dim() == 3 else R.reshape(R.shape[0], R.shape[1], -1) for R in Xs]
        Ys = Xs if same else [R if R.dim() == 3 else R.reshape(R.shape[0], R.shape[1], -1) for R in Ys]
        # the other kernels' Grams are scale invariant and rescale inside (kernel_matrix, channel_normalize); the
        # Gram route scales the linear ones as it stacks them
        scale = self.kernel == "linear"
        if check is not None and not (route == "grams" and scale):
            for name, reps in zip(check, (Xs, Ys)):
                for R in reps:
                    if not _checks.data_free(R) and not _checks.all_finite(R):
                        raise ValueError(f"{name} contains NaN or infinite values")
            check = None
        if route != "grams" and scale:
            exps_a = [_exponent(R) for R in Xs]
            exps_b = exps_a if same else [_exponent(R) for R in Ys]
            Xs = [_scaled(R, e) for R, e in zip(Xs, exps_a)]
            Ys = Xs if same else [_scaled(R, e) for R, e in zip(Ys, exps_b)]
        options = (self.kernel, self.bandwidth, self.gamma, self.unbiased, route, self._workspace)
        a = _Batch(Xs, *options, "a", scale and route == "grams", check and check[0])
        b = a if same else _Batch(Ys, *options, "b", scale and route == "grams", check and check[1])
        if route == "grams" or not scale:
            exps_a, exps_b = a.exps, b.exps
        if route == "features":
            xy = _feature_hsic(_feature_traces(a, b, same), torch.stack(a.norms), torch.stack(b.norms), n,
                               self.unbiased)
            xx = torch.diagonal(xy).clone() if same else _self_feature_hsic(a, self.unbiased)
            yy = xx if same else _self_feature_hsic(b, self.unbiased)
        elif route == "direct":
            K, L, lower, ta, tb = a.grams[0], b.grams[0], a.lower, a.terms[0], b.terms[0]
            kk, kl, ll = _inners([(K, K)]) * 3 if same else _inners([(K, K), (K, L), (L, L)])  # one pass
            xx = _hsic_direct(n, ta, ta, kk, self.unbiased, lower).reshape(1)
            yy = xx if same else _hsic_direct(n, tb, tb, ll, self.unbiased, lower).reshape(1)
            xy = xx.reshape(1, 1) if same else _hsic_direct(n, ta, tb, kl, self.unbiased, lower).reshape(1, 1)
        else:
            xy, xx, yy = _gram_hsic(a, b, same, self.unbiased)
        self._accumulate(xy, xx, yy, exps_a, exps_b, a.constant, b.constant)

    def _triangle_route(self, reps, n, dims) -> bool:
        """Whether _triangle_hsic takes a batch of the Gram route: the linear
        kernel, n >= 4, one float dtype, features, and no autograd graph."""
        first = reps[0]
        return self.kernel == "linear" and n >= 4 and first.dtype in _checks.FLOAT_DTYPES \
            and all(R.dtype is first.dtype for R in reps) and min(dims) > 0 and not _checks.data_free(first) \
            and not (torch.is_grad_enabled() and any(R.requires_grad for R in reps))

    def _add_triangle(self, reps, a: int, same: bool) -> bool:
        """A batch's representations (Xs + Ys, Xs the first a) added through
        _triangle_hsic; False (nothing added) where it hands them back."""
        result = _triangle_hsic(reps, self.unbiased, self._workspace)
        if result is None:
            return False
        H, constant = result
        if same:
            xx = H.diagonal().clone()
            self._accumulate(H, xx, xx, [0] * a, [0] * a, constant, constant)
        else:
            diagonal = H.diagonal()
            self._accumulate(H[:a, a:].contiguous(), diagonal[:a].clone(), diagonal[a:].clone(), [0] * a,
                             [0] * (len(constant) - a), constant[:a], constant[a:])
        return True

    def _accumulate(self, xy, xx, yy, exps_a, exps_b, constant_a, constant_b) -> None:
        """One batch's HSICs added to the sums: xy (a, b), xx (a,), yy (b,)
        float64 of the representations scaled by 2^-exps_a, 2^-exps_b
        (_scaled); constant_a, constant_b: which are constant in this batch."""
        # a constant representation has HSIC exactly 0 (not rounding noise) in this batch
        if any(constant_a) or any(constant_b):
            ca = torch.tensor(constant_a, device=xy.device)
            cb = torch.tensor(constant_b, device=xy.device)
            xy = xy.masked_fill(ca[:, None] | cb[None, :], 0.0)
            xx, yy = xx.masked_fill(ca, 0.0), yy.masked_fill(cb, 0.0)
        if self.xy is None:
            self.xy, self.xx, self.yy = xy, xx, yy
            self._varied = ([not c for c in constant_a], [not c for c in constant_b])
            self.varied_x = torch.tensor(self._varied[0], device=xy.device)
            self.varied_y = torch.tensor(self._varied[1], device=xy.device)
            self._exps = (list(exps_a), list(exps_b))
            self.ex = torch.tensor(exps_a, dtype=torch.float64, device=xy.device)
            self.ey = torch.tensor(exps_b, dtype=torch.float64, device=xy.device)
        else:
            if self.xy.shape != xy.shape:
                raise ValueError(f"this batch has {tuple(xy.shape)} representation pairs, earlier ones "
                                 f"{tuple(self.xy.shape)}")
            if self.kernel == "linear" and (list(exps_a) != self._exps[0] or list(exps_b) != self._exps[1]):
                # the sums are kept over 2^(2 ex + 2 ey) (xy) and 2^(4 ex), 2^(4 ey): each representation at the
                # largest scale seen, so that no term overflows (the smaller ones underflow, negligible); the same
                # exponents as the sums' scale each batch leave them as they are (factors of exactly 1)
                ea = torch.tensor(exps_a, dtype=torch.float64, device=xy.device)
                eb = torch.tensor(exps_b, dtype=torch.float64, device=xy.device)
                ex, ey = torch.maximum(self.ex, ea), torch.maximum(self.ey, eb)
                self.xy = self.xy * torch.exp2(2 * (self.ex - ex)[:, None] + 2 * (self.ey - ey)[None, :])
                self.xx, self.yy = self.xx * torch.exp2(4 * (self.ex - ex)), self.yy * torch.exp2(4 * (self.ey - ey))
                xy = xy * torch.exp2(2 * (ea - ex)[:, None] + 2 * (eb - ey)[None, :])
                xx, yy = xx * torch.exp2(4 * (ea - ex)), yy * torch.exp2(4 * (eb - ey))
                self.ex, self.ey = ex, ey
                self._exps = ([max(u, v) for u, v in zip(self._exps[0], exps_a)],
                              [max(u, v) for u, v in zip(self._exps[1], exps_b)])
            self.xy, self.xx, self.yy = self.xy + xy, self.xx + xx, self.yy + yy
            varied = ([v or not c for v, c in zip(self._varied[0], constant_a)],
                      [v or not c for v, c in zip(self._varied[1], constant_b)])
            if varied[0] != self._varied[0]:
                self.varied_x = torch.tensor(varied[0], device=xy.device)
            if varied[1] != self._varied[1]:
                self.varied_y = torch.tensor(varied[1], device=xy.device)
            self._varied = varied
        self.batches += 1

    def value(self, names_x=None, names_y=None, undefined: str = "warn") -> torch.Tensor:
        """The (len(Xs), len(Ys)) CKA matrix, float64. Where a representation
        is constant (or its HSIC estimate is not positive) CKA is undefined:
        undefined="warn" puts NaN there and warns, naming them; "raise"
        raises ValueError instead."""
        if undefined not in ("warn", "raise"):
            raise ValueError(f"undefined must be 'warn' or 'raise', got {undefined!r}")
        if self.xy is None:
            raise ValueError("no batch was added: call update() first")
        # a representation constant in every batch has HSIC exactly 0: bad, and named constant
        cka, bad_x, bad_y = _cka_from_hsic(self.xy, self.xx, self.yy)
        if bool(bad_x.any()) or bool(bad_y.any()):
            why = _undefined(names_x, bad_x, ~self.varied_x) + _undefined(names_y, bad_y, ~self.varied_y)
            message = f"CKA is undefined for representations {', '.join(why)}"
            if undefined == "raise":
                raise ValueError(message + ": HSIC(K, K) is 0, there is nothing to align")
            warnings.warn(message + "; their entries are NaN", RuntimeWarning, stacklevel=2)
        return cka


def cka(X: torch.Tensor, Y: torch.Tensor, kernel: str = "linear", unbiased: bool = True,
        batch_size: int | None = None, bandwidth: float = 0.5, gamma: float | None = None,
        feature_axis: int | None = None) -> float:
    """Centred kernel alignment HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) (seed 004 equation 5.4).

    kernel="max" is G_ReLU-CKA (definition 5.3, appendix D.7.2), "laplace" the PSD G_ReLU-invariant
    kernel of equation 5.6, "linear" and "rbf" the orthogonally invariant CKA of Kornblith et al.,
    "ortho" the seed 004 authors' orthogonal CKA (linear CKA after each channel is centred and scaled to
    unit norm, their ortho_cka; the comparison of Fig. 2, 5, 11). The biased CKA of a PSD kernel lies in
    [0, 1]; the unbiased one in [-1, 1] (an inner product of U-centred Grams): near 0 for unrelated
    features, where the estimator's noise may take it slightly below 0.

    Linear kernels take the cheaper exact route (centred D x D' products when N is large, Gram matrices
    otherwise). The max kernel is not PSD (example E.44), so its CKA is the paper's "rule-bending"
    instance (remark 5.5). Constant features (or, for RBF/Laplace, mostly identical samples) make CKA
    undefined: ValueError. Every kernel's CKA is scale invariant, at any scale: features whose squares
    would overflow or underflow are divided by a power of two first.

    Args:
        X: (N, d), (N, C, H, W), or (N, tokens, features) with feature_axis saying which axis holds the
            features.
        Y: the same N samples, in one of X's layouts.
        kernel: "linear", "rbf", "max", "laplace" or "ortho" (default "linear"); see kernel_matrix.
        unbiased: the HSIC_1 of [NRK21] (default True) or the biased estimator (False).
        batch_size: minibatch CKA over consecutive rows of this many samples (see MinibatchCKA); None for
            all N at once (default None).
        bandwidth: the rbf kernel's multiple of the median distance (default 0.5).
        gamma: the laplace kernel's gamma; None for 1 / the median l1 distance (default None).
        feature_axis: the axis of X and Y that holds the features (default None: axis 1; a 3-D input must
            say).

    Returns:
        The CKA, a float.
    """
    X, Y = _pair(X, Y, feature_axis)
    if not isinstance(unbiased, bool):
        raise TypeError(f"unbiased must be True or False, got {unbiased!r}")
    N = X.shape[0]
    step = N if batch_size is None else _checks.positive_int("batch_size", batch_size)
    accumulator = MinibatchCKA(kernel, unbiased, bandwidth, gamma)  # checks the kernel and its options
    for start in range(0, N, step):
        if N - start < (4 if unbiased else 2) and start > 0:
            break  # a ragged last batch too small for the estimator adds nothing
        accumulator._add([X[start:start + step]], [Y[start:start + step]])
    return float(accumulator.value(undefined="raise")[0, 0])
