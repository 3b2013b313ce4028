"""Dissimilarity measures of hidden representations (seed 004 section 5 and
appendix D.7): CKA with the linear, RBF, max (G_ReLU-CKA, definition 5.3)
and Laplace l1 (equation 5.6) kernels, the seed 004 authors' "orthogonal CKA"
(linear CKA on channel-normalised features), the orthogonal and G_ReLU
Procrustes measures (definition 5.2, D.7.1), and the layer-by-layer
similarity matrix of two models computed in one pass over the data.

Features are (N, d), (N, C, H, W) or any layout with a feature axis: the
feature (channel) axis is axis 1 for 2-D and 4-D/5-D inputs (conv), and a
3-D input (N, tokens, features) or (N, C, L) must say it (`feature_axis=`);
the other axes are positions, summed over (appendix D.7), so the G_ReLU
measures are invariant to permuting and positively scaling channels, not
positions. similarity_matrix decides the axis from the layer that produced
the features (a Linear, LayerNorm or attention: last axis, so transformers'
hidden states (B, T, C) and Swin's (B, H, W, C) give their C channels, the
tokens and spatial positions alike as positions; a conv: axis 1), runs
transformers models on keyword inputs ({"input_ids": ...}) and reads
layers' tuples and Hugging Face outputs as their hidden states.

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

import pandas as pd
import torch
from torch import nn

from .. import _checks, _moments, _ops
from .._hooks import activation_stream, check_layers, first_tensor
from .._ops import linear_sum_assignment, max_kernel_gram

KERNELS = ("linear", "rbf", "max", "laplace", "ortho")
GROUPS = ("orthogonal", "grelu")

# Modules whose output keeps its features on the last axis (token layouts) or on axis 1 (conv layouts).
_LAST_AXIS = (nn.Linear, nn.Bilinear, nn.LayerNorm, nn.Embedding, nn.MultiheadAttention,
              nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.RMSNorm)
_AXIS_1 = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm,
           nn.GroupNorm, nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
           nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd, nn.Upsample)


def _module_axis(module: nn.Module):
    name = type(module).__name__
    if isinstance(module, nn.LayerNorm) and name.lower().endswith("2d"):
        return 1  # torchvision's / timm's LayerNorm2d: channels-first in and out
    if isinstance(module, _LAST_AXIS):
        return -1
    if isinstance(module, _AXIS_1):
        return 1
    if name == "Conv1D" and hasattr(module, "nf"):
        return -1  # transformers' Conv1D (GPT-2): a Linear with its weight transposed
    if name.endswith(("RMSNorm", "LayerNorm")) and not any(True for _ in module.children()):
        return -1  # the norms of transformers models (LlamaRMSNorm, T5LayerNorm, ...): the last axis
    return None


def _permutation(module: nn.Module):
    """The dims of a module that only permutes its input's axes
    (torchvision.ops.Permute: Swin's and ConvNeXt's (B, H, W, C) <-> (B, C,
    H, W)), else None."""
    dims = getattr(module, "dims", None)
    if type(module).__name__ == "Permute" and isinstance(dims, (list, tuple)) and \
            sorted(dims) == list(range(len(dims))):
        return list(dims)
    return None


def _permuted(axis, dims):
    """Where axis (1 or -1 of a len(dims)-D tensor) lands after permute(dims): -1 for the last axis."""
    if axis is None:
        return None
    moved = list(dims).index(axis % len(dims))
    return None if moved == 0 else (-1 if moved == len(dims) - 1 else moved)


def _follow(axis, modules):
    """axis after the modules (in order): a deciding module sets it, a Permute moves it."""
    for module in modules:
        dims = _permutation(module)
        if dims is not None:
            axis = _permuted(axis, dims)
            continue
        decided = _module_axis(module)
        if decided is not None:
            axis = decided
    return axis


def layer_feature_axis(model: nn.Module, layer: str) -> int | None:
    """The feature axis of `layer`'s output (the channels that seed 004
    appendix D.7 transforms), read from the layer: -1 after a Linear (or
    LayerNorm, RMSNorm, attention, embedding, transformers' Conv1D), 1 after
    a conv (or BatchNorm, pooling, LayerNorm2d). A container answers for its
    last deciding leaf; an elementwise module (ReLU, Dropout, ...) for the
    nearest deciding module defined before it. A Permute module between
    (torchvision's Swin and ConvNeXt: (B, H, W, C) <-> (B, C, H, W)) moves
    the axis with it. None when nothing decides (the caller must say)."""
    modules = list(model.named_modules())
    names = [n for n, _ in modules]
    index = names.index(layer)
    module = modules[index][1]
    if _module_axis(module) is not None:
        return _module_axis(module)
    own = list(module.modules())[1:]
    deciding = [i for i, m in enumerate(own) if _module_axis(m) is not None]
    if deciding:
        return _follow(None, own[deciding[-1]:])
    dims = _permutation(module)
    for j in range(index - 1, -1, -1):
        if _module_axis(modules[j][1]) is not None:
            between = [m for _, m in modules[j:index]] + own + ([module] if dims is not None else [])
            return _follow(None, between)
    return None


def _layer_sample_axis(model: nn.Module, layer: str) -> int:
    """The sample axis of `layer`'s output: 1 for a sequence-first module
    (batch_first=False: nn.MultiheadAttention, nn.TransformerEncoderLayer,
    nn.LSTM, ... give (T, B, C)), else 0."""
    module = model.get_submodule(layer)
    if isinstance(module, (nn.TransformerEncoder, nn.TransformerDecoder)) and len(module.layers):
        module = module.layers[0]
    return 1 if getattr(module, "batch_first", None) is False else 0


def _feature_axis_of(name: str, X: torch.Tensor, feature_axis) -> int:
    if feature_axis is None:
        if X.dim() == 3:
            raise ValueError(f"{name} is 3-D {tuple(X.shape)}: (N, tokens, features) or (N, C, L) is ambiguous; "
                             "say which axis holds the features with feature_axis=-1 (tokens, after a Linear) "
                             "or feature_axis=1 (channels, after a conv)")
        return 1
    if isinstance(feature_axis, bool) or not isinstance(feature_axis, int):
        raise TypeError(f"feature_axis must be an int, got {type(feature_axis).__name__}")
    axis = feature_axis % X.dim() if -X.dim() <= feature_axis < X.dim() else None
    if axis is None or axis == 0:
        raise ValueError(f"feature_axis must name an axis of {name} other than the sample axis 0, "
                         f"got {feature_axis} for shape {tuple(X.shape)}")
    return axis


def as_channels(name: str, X: torch.Tensor, feature_axis: int | None = None) -> torch.Tensor:
    """(N, d) -> (N, d, 1); (N, C, *spatial) -> (N, C, S) with C on
    `feature_axis` (default: axis 1; a 3-D input must say): the layout of
    seed 004 appendix D.7 (positions summed over)."""
    _checks.tensor(name, X, ndims=range(2, 7), shape="(N, d), (N, C, H, W) or (N, tokens, features)")
    axis = _feature_axis_of(name, X, feature_axis)
    X = X.movedim(axis, 1)
    if X.shape[1] == 0 or X.shape[0] == 0:
        raise ValueError(f"{name} has no samples or no features (shape {tuple(X.shape)})")
    return X.reshape(X.shape[0], X.shape[1], -1)


def _pair(X, Y, feature_axis=None):
    X, Y = as_channels("X", X, feature_axis), as_channels("Y", Y, feature_axis)
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"X and Y must hold the same N samples, got {X.shape[0]} and {Y.shape[0]}")
    if X.device != Y.device:
        raise ValueError(f"Y is on {Y.device} but X is on {X.device}; move them to one device")
    return X, Y


# Largest magnitudes 2^-e .. 2^e (e by dtype) are used as they are: their squares, Grams and the float64 fourth
# powers of the HSICs stay far from overflow and underflow. Outside, a representation is scaled by a power of two
# first (exact, and every measure here is scale invariant; issue 27: CKA at 1e150 was 5.7e300).
_SAFE_EXPONENT = {torch.float32: 16, torch.float64: 128}


def _exponent(R: torch.Tensor) -> int:
    """0 when R's largest magnitude lies within 2^+-_SAFE_EXPONENT, else the
    power of two e with max |R| / 2^e in [0.5, 1)."""
    if R.numel() == 0 or _checks.data_free(R):
        return 0
    low, high = torch.aminmax(R.detach())
    largest = max(-float(low), float(high))
    if not 0 < largest < math.inf:
        return 0
    e = math.frexp(largest)[1]
    return 0 if abs(e) <= _SAFE_EXPONENT.get(R.dtype, 16) else e


def _scaled(R: torch.Tensor, e: int) -> torch.Tensor:
    """R / 2^e, exactly (in two factors: 2^e alone may not be a float)."""
    if e == 0:
        return R
    half = -e // 2
    return R.mul(2.0 ** half).mul_(2.0 ** (-e - half))


def _rescaled(R: torch.Tensor) -> torch.Tensor:
    """R scaled by a power of two into a safe range, where it is outside it (_exponent)."""
    return _scaled(R, _exponent(R))


def channel_normalize(X: torch.Tensor, centered: bool = True) -> torch.Tensor:
    """Seed 004 appendix D.7.2 / definition 5.3: subtract each channel's mean over
    samples and positions (centered=True), divide by its norm over samples
    and positions (X D_X^{-1}). X: (N, C, S). A constant channel stays zero.
    The sums run in X's dtype (torch's cascade sums: 1e-7 relative in
    float32, as the float64 sums were once rounded back; 10x faster). X is
    scaled by a power of two first where its magnitude would overflow or
    underflow the squares (the result is scale invariant)."""
    X = _rescaled(X)
    zero = None
    if centered:
        zero = X.amax(dim=(0, 2), keepdim=True) == X.amin(dim=(0, 2), keepdim=True)  # exactly 0, not rounding
        X = X - X.sum(dim=(0, 2), keepdim=True) / (X.shape[0] * X.shape[2])
    norm = X.square().sum(dim=(0, 2), keepdim=True).sqrt_()
    zero = norm == 0 if zero is None else zero | (norm == 0)
    return X / norm.masked_fill_(zero, float("inf"))  # a zero channel divided by inf stays zero


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


def kernel_matrix(X: torch.Tensor, kernel: str = "linear", bandwidth: float = 0.5, gamma: float | None = None):
    """The (N, N) Gram matrix of features X (N, C, S) for a CKA kernel.

    linear: <x_i, x_j> of the flattened features. rbf: exp(-|x_i - x_j|^2 /
    (2 s^2)) with s = bandwidth x the median distance (Kornblith et al.).
    max: max_c sum_s x~[i, c, s] x~[j, c, s] on channel-normalised features
    (definition 5.3 with appendix D.7.2; the max_kernel_gram operator, never
    the (N, N, C) tensor). laplace: exp(-gamma |x~_i - x~_j|_1) on
    channel-normalised features (equation 5.6), gamma = 1 / the median l1
    distance by default. ortho: linear on channel-normalised features (the
    seed 004 authors' orthogonal CKA).

    Every kernel but linear is scale invariant (the median bandwidth, the
    channel normalisation): X is scaled by a power of two first where its
    magnitude would overflow or underflow. A linear Gram that overflows
    X's dtype is refused (ValueError): it has no finite value."""
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
        return _max_gram(Xn.contiguous())
    F = Xn.reshape(Xn.shape[0], -1)
    if kernel == "ortho":
        return F @ F.T
    l1 = torch.cdist(F, F, p=1)
    c = 1.0 / float(_median_offdiagonal(l1, "l1 distance")) if gamma is None else gamma
    return torch.exp(-c * l1)


def _max_gram(Xn: torch.Tensor) -> torch.Tensor:
    """max_kernel_gram of channel-normalised features without its output
    check (a float64 pass over N x N): finite inputs of unit channel norm
    give |K| <= 1 (Cauchy-Schwarz), nothing can overflow."""
    return torch.ops.spectral_ext.max_kernel_gram(Xn) if _ops._native() else max_kernel_gram(Xn)


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


def _hsic_scale(n: int, unbiased: bool) -> float:
    return 1.0 / (n * (n - 3)) if unbiased else 1.0 / (n - 1) ** 2


def hsic(K: torch.Tensor, L: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """HSIC of every pair of Gram matrices: K (a, n, n), L (b, n, n) -> (a, b),
    the HSIC_1 of seed 004 equation 5.4 (definition 5.3).

    unbiased=True: the estimator of Song et al. used by Nguyen et al. [NRK21,
    eq. 3], HSIC_1 = [tr(K~ L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2)
    1'K~L~1] / (n(n-3)) with K~, L~ the matrices with zeroed diagonals
    (needs n >= 4), computed as the inner product of U-centred matrices.
    unbiased=False: tr(K H L H) / (n-1)^2. Computed in float64."""
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
    return torch.equal(flat, flat[:1].expand_as(flat))  # stops at the first difference


def _gram(R, kernel, bandwidth, gamma):
    if kernel == "linear":
        # centring first removes the cancellation of a float32 Gram; HSIC is shift invariant, so the shift need
        # not be the exact mean and a float32 mean does
        F = R.reshape(R.shape[0], -1)
        return _centred_gram(F)
    return kernel_matrix(R, kernel, bandwidth, gamma)


def _centred_gram(F: torch.Tensor) -> torch.Tensor:
    F = F - F.mean(0, keepdim=True)
    return F @ F.T


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


class _Batch:
    """One batch's representations reduced to what HSIC needs: centred
    features (feature route, linear kernels) or U-centred Grams (Gram
    route), each computed once and shared by every pair."""

    def __init__(self, reps, kernel, bandwidth, gamma, unbiased, route):
        self.n = reps[0].shape[0]
        self.constant = [_constant(R) for R in reps]
        self.route = route
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
                self.terms = [_lower_terms(K) for K in lower]
            else:
                self.grams = [_gram(R, kernel, bandwidth, gamma) for R in reps]
                self.terms = [_gram_terms(K) for K in self.grams]
        else:
            grams = [_gram(R, kernel, bandwidth, gamma) for R in reps]
            stacked = torch.empty((len(grams), self.n, self.n), dtype=torch.float64, device=grams[0].device)
            for i, K in enumerate(grams):
                stacked[i].copy_(K)  # one float64 copy per Gram, no intermediate
                grams[i] = None
            self.grams = _centre_gram_(stacked, unbiased).reshape(len(reps), -1)


def _gram_terms(K: torch.Tensor):
    """What HSIC needs from one Gram matrix without a float64 copy: its
    diagonal, row sums and total (each row summed in K's dtype, torch's
    pairwise sum, the rows in float64: 9x faster than a float64 sum)."""
    diag = K.diagonal().to(torch.float64)
    rows = K.sum(1).to(torch.float64)
    return diag, rows, rows.sum()


def _lower_terms(K: torch.Tensor):
    """_gram_terms of the symmetric Gram whose strict lower triangle K holds,
    with unit diagonal (RBF)."""
    diag = torch.ones(K.shape[0], dtype=torch.float64, device=K.device)
    rows = (K.sum(1) + K.sum(0)).to(torch.float64) + diag
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


def _inner(K: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """sum K * L (see _inners)."""
    return _inners([(K, L)])[0]


def _hsic_direct(K, L, tk, tl, unbiased: bool, lower: bool = False, inner=None) -> torch.Tensor:
    """HSIC of one pair of (N, N) Gram matrices from eq. 3 of [NRK21]
    (unbiased) or tr(KHLH) / (n-1)^2, the sums over rows in float64 (no
    centred copies). lower: K and L hold strict lower triangles (_rbf_lower).
    inner: sum K * L when the caller has it (_inners)."""
    n = K.shape[0]
    (dk, rk, sk), (dl, rl, sl) = tk, tl
    inner = _inner(K, L) if inner is None else inner
    full = 2.0 * inner + dk @ dl if lower else inner
    if not unbiased:
        return (full - 2.0 / n * (rk @ rl) + sk * sl / n ** 2) / (n - 1) ** 2
    rk, rl = rk - dk, rl - dl  # K~ 1, L~ 1
    trace = full - dk @ dl
    return (trace + (sk - dk.sum()) * (sl - dl.sum()) / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (rk @ rl)) \
        / (n * (n - 3))


def _hsic_features(a: _Batch, b: _Batch, unbiased: bool, same: bool) -> torch.Tensor:
    """(len(a), len(b)) HSICs from centred features (N D D' per pair, no
    N x N matrix): tr(K~L~) = |X'Y|^2 - kx.ky, 1'K~1 = -sum kx and
    K~1 = -kx because X'1 = 0 (kx the squared row norms)."""
    n = a.n
    out = torch.empty(len(a.features), len(b.features), dtype=torch.float64, device=a.features[0].device)
    for i, X in enumerate(a.features):
        for j, Y in enumerate(b.features):
            if same and j < i:
                out[i, j] = out[j, i]
                continue
            trace = _frobenius2_of_gram(X) if same and i == j else _squared_norm64(X.T @ Y)
            if unbiased:
                kx, ky = a.norms[i], b.norms[j]
                dot = kx @ ky
                out[i, j] = (trace - dot * (1 + 2.0 / (n - 2)) + kx.sum() * ky.sum() / ((n - 1) * (n - 2))) \
                    / (n * (n - 3))
            else:
                out[i, j] = trace / (n - 1) ** 2
    return out


def _self_hsic_features(a: _Batch, unbiased: bool) -> torch.Tensor:
    n = a.n
    values = []
    for X, k in zip(a.features, a.norms):
        trace = _frobenius2_of_gram(X)
        if unbiased:
            values.append((trace - k @ k * (1 + 2.0 / (n - 2)) + k.sum() ** 2 / ((n - 1) * (n - 2))) / (n * (n - 3)))
        else:
            values.append(trace / (n - 1) ** 2)
    return torch.stack(values)


def _route(kernel, n, dims_a, dims_b) -> str:
    """The cheaper exact route for linear kernels: Gram matrices cost
    n^2 (sum of dims) plus n^2 per pair, centred features n D D' per pair
    and n D min(n, D) per self term."""
    if kernel not in ("linear", "ortho"):
        return "grams"
    grams = n * n * (sum(dims_a) + sum(dims_b) + len(dims_a) * len(dims_b))
    features = n * sum(dims_a) * sum(dims_b) + sum(n * d * min(n, d) for d in list(dims_a) + list(dims_b))
    return "features" if features < grams else "grams"


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

    def _reps(self, reps, name, feature_axis):
        reps = [reps] if isinstance(reps, torch.Tensor) else list(reps)
        if not reps:
            raise ValueError(f"{name} lists no representation")
        return [as_channels(name, R, feature_axis) for R in reps]

    def update(self, Xs, Ys=None, feature_axis: int | None = None) -> None:
        same = Ys is None
        Xs = self._reps(Xs, "X", feature_axis)
        Ys = Xs if same else self._reps(Ys, "Y", feature_axis)
        n = {R.shape[0] for R in Xs + Ys}
        if len(n) != 1:
            raise ValueError(f"every representation of a batch must hold the same samples, got sizes {sorted(n)}")
        n = n.pop()
        if self.unbiased and n < 4:
            raise ValueError(f"the unbiased HSIC needs at least 4 samples per batch, got {n}")
        # the other kernels' Grams are scale invariant and rescale inside (kernel_matrix, channel_normalize)
        exps_a = [_exponent(R) if self.kernel == "linear" else 0 for R in Xs]
        exps_b = exps_a if same else [_exponent(R) if self.kernel == "linear" else 0 for R in Ys]
        Xs = [_scaled(R, e) for R, e in zip(Xs, exps_a)]
        Ys = Xs if same else [_scaled(R, e) for R, e in zip(Ys, exps_b)]
        dims_a = [R.shape[1] * R.shape[2] for R in Xs]
        dims_b = [] if same else [R.shape[1] * R.shape[2] for R in Ys]
        route = _route(self.kernel, n, dims_a, dims_b)
        if route == "grams" and len(Xs) == 1 and len(Ys) == 1:
            route = "direct"
        a = _Batch(Xs, self.kernel, self.bandwidth, self.gamma, self.unbiased, route)
        b = a if same else _Batch(Ys, self.kernel, self.bandwidth, self.gamma, self.unbiased, route)
        if route == "features":
            xy = _hsic_features(a, b, self.unbiased, same)
            xx = torch.diagonal(xy).clone() if same else _self_hsic_features(a, self.unbiased)
            yy = xx if same else _self_hsic_features(b, self.unbiased)
        elif route == "direct":
            K, L, lower, ta, tb = a.grams[0], b.grams[0], a.lower, a.terms[0], b.terms[0]
            kk, kl, ll = _inners([(K, K)]) * 3 if same else _inners([(K, K), (K, L), (L, L)])  # one pass
            xx = _hsic_direct(K, K, ta, ta, self.unbiased, lower, kk).reshape(1)
            yy = xx if same else _hsic_direct(L, L, tb, tb, self.unbiased, lower, ll).reshape(1)
            xy = xx.reshape(1, 1) if same else _hsic_direct(K, L, ta, tb, self.unbiased, lower, kl).reshape(1, 1)
        else:
            scale = _hsic_scale(n, self.unbiased)
            xy = (a.grams @ b.grams.T) * scale
            xx = a.grams.square().sum(-1) * scale
            yy = xx if same else b.grams.square().sum(-1) * scale
        # a constant representation has HSIC exactly 0 (not rounding noise) in this batch
        ca = torch.tensor(a.constant, device=xy.device)
        cb = torch.tensor(b.constant, device=xy.device)
        xy = xy.masked_fill(ca[:, None] | cb[None, :], 0.0)
        xx, yy = xx.masked_fill(ca, 0.0), yy.masked_fill(cb, 0.0)
        ea = torch.tensor(exps_a, dtype=torch.float64, device=xy.device)
        eb = torch.tensor(exps_b, dtype=torch.float64, device=xy.device)
        if self.xy is None:
            self.xy, self.xx, self.yy = xy, xx, yy
            self.varied_x, self.varied_y = ~ca, ~cb
            self.ex, self.ey = ea, eb
        else:
            if self.xy.shape != xy.shape:
                raise ValueError(f"this batch has {tuple(xy.shape)} representation pairs, earlier ones "
                                 f"{tuple(self.xy.shape)}")
            if self.kernel == "linear":
                # the sums are kept over 2^(2 ex + 2 ey) (xy) and 2^(4 ex), 2^(4 ey): each representation at the
                # largest scale seen, so that no term overflows (the smaller ones underflow, negligible)
                ex, ey = torch.maximum(self.ex, ea), torch.maximum(self.ey, eb)
                self.xy = self.xy * torch.exp2(2 * (self.ex - ex)[:, None] + 2 * (self.ey - ey)[None, :])
                self.xx, self.yy = self.xx * torch.exp2(4 * (self.ex - ex)), self.yy * torch.exp2(4 * (self.ey - ey))
                xy = xy * torch.exp2(2 * (ea - ex)[:, None] + 2 * (eb - ey)[None, :])
                xx, yy = xx * torch.exp2(4 * (ea - ex)), yy * torch.exp2(4 * (eb - ey))
                self.ex, self.ey = ex, ey
            self.xy, self.xx, self.yy = self.xy + xy, self.xx + xx, self.yy + yy
            self.varied_x, self.varied_y = self.varied_x | ~ca, self.varied_y | ~cb
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
        bad_x = ~self.varied_x | (self.xx <= 0)
        bad_y = ~self.varied_y | (self.yy <= 0)
        denominator = (self.xx.clamp_min(0)[:, None] * self.yy.clamp_min(0)[None, :]).sqrt()
        cka = self.xy / torch.where(denominator > 0, denominator, torch.ones_like(denominator))
        cka = cka.masked_fill(bad_x[:, None] | bad_y[None, :], float("nan"))
        if bool(bad_x.any()) or bool(bad_y.any()):
            def why(bad, varied, names):
                names = names if names is not None else [f"#{i}" for i in range(len(bad))]
                return [f"{names[i]} ({'constant' if not varied[i] else 'HSIC estimate <= 0: too few samples'})"
                        for i in range(len(bad)) if bad[i]]
            message = ("CKA is undefined for representations "
                       f"{', '.join(why(bad_x, self.varied_x, names_x) + why(bad_y, self.varied_y, names_y))}")
            if undefined == "raise":
                raise ValueError(message + ": HSIC(K, K) is 0, there is nothing to align")
            warnings.warn(message + "; their entries are NaN", RuntimeWarning, stacklevel=2)
        return cka


def cka(X: torch.Tensor, Y: torch.Tensor, kernel: str = "linear", unbiased: bool = True,
        batch_size: int | None = None, bandwidth: float = 0.5, gamma: float | None = None,
        feature_axis: int | None = None) -> float:
    """Centered kernel alignment HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))
    (seed 004 equation 5.4). kernel="max" is G_ReLU-CKA (definition 5.3,
    appendix D.7.2), "laplace" the PSD G_ReLU-invariant kernel of equation
    5.6, "linear" and "rbf" the orthogonally invariant CKA of Kornblith et
    al., "ortho" the seed 004 authors' orthogonal CKA (linear CKA after
    each channel is centred and scaled to unit norm, their ortho_cka; the
    comparison of Fig. 2, 5, 11). unbiased: the HSIC_1 of [NRK21] (default)
    or the biased estimator. The biased CKA of a PSD kernel lies in [0, 1];
    the unbiased one in [-1, 1] (an inner product of U-centred Grams): near
    0 for unrelated features, where the estimator's noise may take it
    slightly below 0.

    X, Y: (N, d), (N, C, H, W), or (N, tokens, features) with feature_axis
    saying which axis holds the features; the same N samples. batch_size:
    minibatch CKA over consecutive rows (see MinibatchCKA). Linear kernels
    take the cheaper exact route (centred D x D' products when N is large,
    Gram matrices otherwise). The max kernel is not PSD (example E.44), so
    its CKA is the paper's "rule-bending" instance (remark 5.5). Constant
    features (or, for RBF/Laplace, mostly identical samples) make CKA
    undefined: ValueError. Every kernel's CKA is scale invariant, at any
    scale: features whose squares would overflow or underflow are divided
    by a power of two first."""
    X, Y = _pair(X, Y, feature_axis)
    _check_kernel(kernel)
    if not isinstance(unbiased, bool):
        raise TypeError(f"unbiased must be True or False, got {unbiased!r}")
    N = X.shape[0]
    step = N if batch_size is None else _checks.positive_int("batch_size", batch_size)
    accumulator = MinibatchCKA(kernel, unbiased, bandwidth, gamma)
    for start in range(0, N, step):
        if N - start < (4 if unbiased else 2) and start > 0:
            break  # a ragged last batch too small for the estimator adds nothing
        accumulator.update(X[start:start + step], Y[start:start + step], feature_axis=1)
    return float(accumulator.value(undefined="raise")[0, 0])


def _channel_sums() -> _moments.Moments:
    """Per-channel sums and squared norms over samples and positions of one
    representation (N, C, S), in float64."""
    return _moments.Moments(full=False, dtype=torch.float64)


class CrossMoments(_moments.CrossMoments):
    """Running float64 sums that give the Procrustes measures of the whole
    dataset after one pass (seed 004 D.2, D.7.1): each side's channel sums
    and squared norms and the channel cross products, from the shared
    _moments accumulator. a / b may be shared channel sums
    (similarity_matrix updates each layer's once per batch)."""

    def __init__(self, a: _moments.Moments | None = None, b: _moments.Moments | None = None):
        super().__init__(a, b, full=False, dtype=torch.float64)

    def procrustes(self, group: str = "orthogonal", centered: bool = False) -> tuple[float, float]:
        """(similarity, distance) for the accumulated data."""
        if self.ab is None:
            raise ValueError("no batch was added: call update() first")
        return _procrustes_from(self.cross(centered), self.a.norms2(centered), self.b.norms2(centered), group)


def _procrustes_measure(score: float, size: float) -> tuple[float, float]:
    """(similarity, distance) of representations of squared norm `size` each
    (1: unit Frobenius norm; d: d unit channels) whose best alignment
    <X, Y Q> is `score`: min |X - Y Q|^2 = 2 size - 2 score (D.7.1,
    definition 5.2), the similarity 1 - distance / (2 sqrt(size)) in [0, 1]."""
    distance = math.sqrt(_rounded_gap(2.0 * size - 2.0 * score, 2.0 * size))
    return 1.0 - distance / (2.0 * math.sqrt(size)), distance


def _procrustes_from(cross, nx, ny, group):
    if group == "orthogonal":
        # D.7.1 / [DDS21a]: unit Frobenius norm; min_Q |X - Y Q|^2 = 2 - 2 |X'Y|_*
        scale = math.sqrt(float(nx.sum()) * float(ny.sum()))
        if scale == 0:
            raise ValueError("X or Y is zero (constant, when centred): the Procrustes measure is undefined")
        return _procrustes_measure(float(torch.linalg.svdvals(cross / scale).sum()), 1.0)
    if group == "grelu":
        if cross.shape[0] != cross.shape[1]:
            raise ValueError(f"G_ReLU-Procrustes needs equal channel counts, got {cross.shape[0]} and "
                             f"{cross.shape[1]}")
        if bool((nx == 0).any()) or bool((ny == 0).any()):
            raise ValueError("a channel of X or Y is zero (constant, when centred): D_X^{-1} of definition 5.2 "
                             "does not exist and the measure is undefined")
        normalised = cross / torch.outer(nx.sqrt(), ny.sqrt())
        rows, cols = _assignment(normalised)
        return _procrustes_measure(float(normalised[rows, cols].sum()), cross.shape[0])  # |X~|^2 = |Y~|^2 = d
    raise ValueError(f"group must be one of {GROUPS}, got {group!r}")


def _assignment(score: torch.Tensor):
    """The permutation maximising the sum of score[i, perm[i]] (Hungarian
    algorithm): (rows, cols) index tensors."""
    return linear_sum_assignment(score.detach().to(torch.float64), maximize=True)


def grelu_assignment(X: torch.Tensor, Y: torch.Tensor, centered: bool = False, feature_axis: int | None = None):
    """The G_ReLU-Procrustes alignment of definition 5.2: the permutation
    `perm` and scales `scale` >= 0 with Y[:, i] ~ scale[i] X[:, perm[i]]
    (the least-squares scale of the matched channels). Used to start G_ReLU
    stitching (seed 004 D.2.1) where Theorem 4.2 says an exact twin exists."""
    X, Y = _pair(X, Y, feature_axis)
    ex, ey = _exponent(X), _exponent(Y)  # the sums of squares in a safe range; the scales corrected below
    moments = CrossMoments()
    moments.update(_scaled(X, ex), _scaled(Y, ey))
    nx, ny = moments.a.norms2(centered), moments.b.norms2(centered)
    if nx.shape != ny.shape:
        raise ValueError(f"X and Y must have equal channel counts, got {nx.shape[0]} and {ny.shape[0]}")
    cross = moments.cross(centered)  # (C_x, C_y)
    normalised = cross.T / torch.outer(ny.sqrt(), nx.sqrt()).clamp_min(1e-300)
    rows, cols = _assignment(normalised)  # rows: Y's channels, cols: X's
    perm = torch.empty_like(cols)
    perm[rows] = cols
    matched = cross[perm, torch.arange(len(perm), device=perm.device)]
    scale = torch.where(nx[perm] > 0, matched / nx[perm].clamp_min(1e-300), torch.ones_like(matched)).clamp_min(0)
    if ey != ex:
        scale = torch.where(nx[perm] > 0, _scaled(scale, ex - ey), scale)  # times 2^(ey - ex)
    return perm, scale  # a zero channel of X keeps scale 1: nothing to fit


def _rounded_gap(gap: float, scale: float) -> float:
    """A squared distance computed as a difference of float64 sums: below
    1e-10 of its scale it is rounding (the square root would turn 1e-14
    into 1e-7), so it counts as zero; never negative."""
    return 0.0 if gap <= 1e-10 * scale else gap


def _check_group(group):
    if group not in GROUPS:
        raise ValueError(f"group must be one of {GROUPS}, got {group!r}")


def _procrustes_pair(X, Y, group, centered, feature_axis) -> tuple[float, float]:
    _check_group(group)
    if not isinstance(centered, bool):
        raise TypeError(f"centered must be True or False, got {centered!r}")
    X, Y = _pair(X, Y, feature_axis)
    X, Y = _rescaled(X), _rescaled(Y)  # both measures are scale invariant; the float64 squares are not
    if group == "orthogonal" and not centered:
        return _orthogonal_procrustes(X, Y)
    moments = CrossMoments()
    moments.update(X, Y)
    return moments.procrustes(group, centered)


def _orthogonal_procrustes(X, Y) -> tuple[float, float]:
    """The uncentred orthogonal measure of one pair (D.7.1) from what it
    needs: X'Y and the two total squared norms (one dot product each, no
    per-channel squares), in float64 as CrossMoments would give them."""
    x, y = (_moments.rows(R).to(torch.float64) for R in (X, Y))
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"X and Y must have the same samples and positions, got {tuple(X.shape)} and "
                         f"{tuple(Y.shape)} (N, C, positions)")
    flat_x, flat_y = x.reshape(-1), y.reshape(-1)
    return _procrustes_from(x.T @ y, torch.dot(flat_x, flat_x), torch.dot(flat_y, flat_y), "orthogonal")


def procrustes(X: torch.Tensor, Y: torch.Tensor, group: str = "orthogonal", return_distance: bool = False,
               centered: bool = False, feature_axis: int | None = None) -> float:
    """Procrustes similarity in [0, 1] (1 = aligned) of representations X, Y
    (seed 004 definition 5.2 and appendix D.7.1): (N, d), (N, C, H, W), or
    (N, tokens, features) with feature_axis; channels transformed, positions
    not.

    group="grelu": definition 5.2, 1 - delta / (2 sqrt(d)) with delta =
    min over permutations P of |X~ - Y~ P|, X~ = X D_X^{-1} the
    channel-normalised X (norms over samples and positions), solved as a
    linear sum assignment on (D.2). group="orthogonal": X, Y scaled to unit
    Frobenius norm and delta = min over orthogonal Q = sqrt(2 - 2 |X'Y|_*)
    (appendix D.7.1, [DDS21a]), so 1 - delta / 2. Neither centres (the
    definitions and the authors' code); centered=True subtracts each
    channel's mean first. Both are clamped so that perfect alignment gives
    exactly 1 (the seed code returns NaN there). Returns a float; delta
    itself is procrustes_distance (return_distance=True, which returned a
    tuple, is refused: one return type per function). Both measures are
    scale invariant, at any scale: X or Y whose squares would overflow or
    underflow is divided by a power of two first."""
    if return_distance is not False:
        raise TypeError("procrustes(return_distance=True) is gone: procrustes returns the similarity (a float); "
                        "call procrustes_distance(X, Y, ...) for delta")
    return _procrustes_pair(X, Y, group, centered, feature_axis)[0]


def procrustes_distance(X: torch.Tensor, Y: torch.Tensor, group: str = "orthogonal", centered: bool = False,
                        feature_axis: int | None = None) -> float:
    """The Procrustes distance delta of seed 004 definition 5.2 (group="grelu",
    in [0, 2 sqrt(d)]) or appendix D.7.1 (group="orthogonal", in [0, 2]),
    the quantity procrustes turns into a similarity; same arguments.
    Returns a float."""
    return _procrustes_pair(X, Y, group, centered, feature_axis)[1]


# ---------------------------------------------------------------------------------------------
# All layer pairs of two models


def _layer_axes(model, layers, feature_axis, which):
    if isinstance(feature_axis, tuple):
        feature_axis = feature_axis[0 if which == "model_a" else 1]
    return {n: (feature_axis if feature_axis is not None else layer_feature_axis(model, n)) for n in layers}


def _samples_first(name, layer, R, samples: int | None, sample_axis: int = 0):
    """R with the batch's `samples` on axis 0: a sequence-first output (T, B,
    C) moved; an output whose first axis holds k x samples rows (Swin's
    window attention, (B windows, tokens, C), B outermost as its window
    partition lays them out) read as (B, k, ...): the windows are positions.
    ValueError naming the layer and the model for any other first axis (a
    position embedding the same for every sample, (1, T, C))."""
    if sample_axis and R.dim() > sample_axis:
        R = R.movedim(sample_axis, 0)
    if samples is None or R.dim() == 0 or R.shape[0] == samples:
        return R, False
    rows = R.shape[0]
    if samples and rows > samples and rows % samples == 0 and R.dim() >= 2:
        return R.reshape(samples, rows // samples, *R.shape[1:]), True
    why = " (it does not depend on the sample: a position embedding or a constant)" if rows == 1 else ""
    raise ValueError(f"{name}'s layer {layer!r} gives features {tuple(R.shape)} whose first axis holds {rows} "
                     f"row{'s' if rows != 1 else ''} for a batch of {samples} samples{why}: they cannot be "
                     "compared sample by sample; "
                     "choose a layer whose output is (samples, ...)")


def _channels_of(name, layer, R, axis, check: bool = True, samples: int | None = None, sample_axis: int = 0):
    """R laid out (N, C, S) as as_channels does; check=False only moves the
    axes (for MinibatchCKA.update, which checks the values itself: each
    activation is read once for NaN, not twice). samples: the batch's
    sample count, R's first axis checked against it (_samples_first:
    windows folded into the samples are read as positions)."""
    R, folded = _samples_first(name, layer, R, samples, sample_axis)
    if folded:
        if axis is None and R.dim() == 3:
            axis = -1  # (B k, d) rows of features: the features stay last
        elif axis is not None and axis > 0:
            axis += 1  # the windows' axis sits before it now
    if axis is None and R.dim() >= 3 and (R.dim() != 4 or folded):
        raise ValueError(f"{name}'s layer {layer!r} gives {R.dim()}-D features {tuple(R.shape)} and nothing in "
                         "the model says which axis holds the features: pass feature_axis=")
    if axis is not None and R.dim() == 2:
        axis = 1
    label, axis = f"{name}'s layer {layer!r}", 1 if axis is None else axis
    if check or not 2 <= R.dim() <= 6:
        return as_channels(label, R, axis)
    X = R.movedim(_feature_axis_of(label, R, axis), 1)
    return X.reshape(X.shape[0], X.shape[1], -1)


@_checks.renamed(model_a="model", model_b="other", loader="data")
def similarity_matrix(model: nn.Module, other: nn.Module, layers=None, data=None, measure: str = "cka",
                      kernel: str = "linear", group: str = "orthogonal", unbiased: bool = True,
                      device=None, progress: bool = True, centered: bool = False,
                      feature_axis: int | tuple | None = None) -> pd.DataFrame:
    """Similarity of every layer of `model` with every layer of `other`
    (seed 004 section 5, Fig. 2, 5, 9): the models run in eval mode (and are
    given back as they came), each activation is captured once per batch by
    forward hooks (one forward when other is model), reduced once (a
    U-centred Gram or centred features) and every pair is accumulated from
    those in the same pass.

    layers: module names present in both models, or a pair (layers_a,
    layers_b); data: an iterable of input batches (or (input, label)
    tuples), a tensor or a DataLoader; or keyword inputs for a transformers
    model, run as model(**inputs): a dict of tensors batched along dim 0
    ({"input_ids": ..., "attention_mask": ...}, {"pixel_values": ...}), or
    an iterable of such dicts (a DataLoader over a Hugging Face dataset); a
    "labels" entry is not passed to the models (spectral_ext._data). The
    older order (model_a, model_b, loader, layers) and keywords still work
    (read from the types, _checks.layers_and_data). measure "cka" (minibatch
    CKA with `kernel`, unbiased by default: its estimate may dip slightly
    below 0 for unrelated layers) or "procrustes" (exact over the whole
    data, with `group` and `centered`; NaN for pairs whose position counts,
    or channel counts for G_ReLU, differ), both streamed over the batches;
    or any other measure of similarity.MEASURES by name, spec string
    ("svcca:variance=0.95") or Measure: each layer's activations over all
    the data kept flattened (N, D) in float64, reduced once, and the pairs
    from the measure's batched matrix.

    A layer's output is read as its hidden states: a tensor, the first
    element of a tuple (transformers layers return (hidden states,
    attention weights)) or a Hugging Face output's last_hidden_state.
    Samples are its first axis (the second for a batch_first=False module);
    an output with k x B rows for a batch of B samples (Swin's window
    attention, (B windows, tokens, C)) is read as B samples whose windows
    are positions. feature_axis: by default read from each layer (a Linear,
    LayerNorm or attention: the last axis, so (B, T, C) tokens and (B, H,
    W, C) hidden states give C; a conv: axis 1; a Permute module moves it);
    an int, or a pair for the two models, overrides. Tokens and spatial
    positions are positions alike (appendix D.7). Errors name the layer and
    its model (`model` or `other`). Returns a tidy DataFrame with columns
    layer_a (model's layer), layer_b (other's), value (plot it with
    spectral_ext.plot.similarity_heatmap)."""
    layers, data, _ = _checks.layers_and_data(layers, data)
    if data is None:
        raise TypeError("similarity_matrix() needs data: an iterable of batches, a tensor or a DataLoader")
    model_a, model_b = model, other
    from .measure import Measure, parse_spec

    generic = None  # a Measure other than the streamed CKA and Procrustes
    if not (isinstance(measure, str) and measure in ("cka", "procrustes")):
        generic = parse_spec(measure)
        if generic.name in ("cka", "procrustes"):
            options = generic.options()
            kernel, unbiased = options.get("kernel", kernel), options.get("unbiased", unbiased)
            group, centered = options.get("group", group), options.get("centered", centered)
            measure, generic = generic.name, None
    if generic is not None:
        pass
    elif measure == "cka":
        _check_kernel(kernel)
    else:
        _check_group(group)
    if layers is None or not isinstance(layers, (str, list, tuple)):
        raise TypeError(f"layers must be a module name or a list of them, got {type(layers).__name__}")
    if isinstance(layers, tuple) and len(layers) == 2 and not isinstance(layers[0], str):
        layers_a, layers_b = list(layers[0]), list(layers[1])
    else:
        layers_a = layers_b = [layers] if isinstance(layers, str) else list(layers)
    layers_a, layers_b = check_layers(model_a, layers_a), check_layers(model_b, layers_b, "other")
    axes_a = _layer_axes(model_a, layers_a, feature_axis, "model_a")
    axes_b = _layer_axes(model_b, layers_b, feature_axis, "model_b")
    shared = model_a is model_b
    same = shared and layers_a == layers_b and axes_a == axes_b
    from tqdm.auto import tqdm

    accumulator = MinibatchCKA(kernel, unbiased) if measure == "cka" and generic is None else None
    if generic is not None:  # each layer's flattened activations over all the data, then reduced once
        kept_a = {n: [] for n in layers_a}
        kept_b = kept_a if same else {n: [] for n in layers_b}
    if measure == "procrustes":  # float64 running sums: each layer's once, each pair's cross products
        sums_a = {n: _channel_sums() for n in layers_a}
        sums_b = sums_a if same else {n: _channel_sums() for n in layers_b}
        moments = {(a, b): CrossMoments(sums_a[a], sums_b[b]) for a in layers_a for b in layers_b}
        scales_a = {}
        scales_b = scales_a if same else {}
    seen = 0
    sample_axes_a = {n: _layer_sample_axis(model_a, n) for n in layers_a}
    sample_axes_b = {n: _layer_sample_axis(model_b, n) for n in layers_b}
    for x, n, cap_a, cap_b in activation_stream(model_a, model_b, layers_a, layers_b, data, device=device,
                                                desc="similarity matrix", progress=progress):
        if generic is not None:
            for kept, cap, names, axes, name in ((kept_a, cap_a, layers_a, sample_axes_a, "model"),
                                                 (None if same else kept_b, cap_b, layers_b, sample_axes_b,
                                                  "other")):
                for m in names if kept is not None else ():
                    R = _samples_first(name, m, first_tensor(cap[m]), n, axes[m])[0]
                    kept[m].append(R.reshape(n, -1).to("cpu", torch.float64))
            seen += n
            continue
        check = measure != "cka"
        reps_a = [_channels_of("model", m, cap_a[m], axes_a[m], check, n, sample_axes_a[m]) for m in layers_a]
        reps_b = None if same else [_channels_of("other", m, cap_b[m], axes_b[m], check, n, sample_axes_b[m])
                                    for m in layers_b]
        if measure == "cka":
            if n < 4:
                continue  # the unbiased estimator needs 4 samples; a tiny last batch adds nothing
            try:
                accumulator.update(reps_a, reps_b, feature_axis=1)
            except ValueError:  # say which layer: the checks that name it
                for m in layers_a:
                    _channels_of("model", m, cap_a[m], axes_a[m], True, n, sample_axes_a[m])
                for m in ([] if same else layers_b):
                    _channels_of("other", m, cap_b[m], axes_b[m], True, n, sample_axes_b[m])
                raise
        else:
            reps_a = _at_common_scale(reps_a, layers_a, sums_a, scales_a, moments, (0, 1) if same else (0,))
            reps_b = reps_a if same else _at_common_scale(reps_b, layers_b, sums_b, scales_b, moments, (1,))
            for m, R in zip(layers_a, reps_a):
                sums_a[m].update(R)
            if not same:
                for m, R in zip(layers_b, reps_b):
                    sums_b[m].update(R)
            for i, a in enumerate(layers_a):
                for j, b in enumerate(layers_b):
                    X, Y = reps_a[i], reps_b[j]
                    if X.shape[2] == Y.shape[2] and (group == "orthogonal" or X.shape[1] == Y.shape[1]):
                        moments[(a, b)].update(X, Y)
        seen += n
    if seen == 0:
        raise ValueError("data produced no usable batch")
    if generic is not None:
        return _generic_matrix(generic, kept_a, kept_b, same)
    rows = []
    values = accumulator.value([f"model layer {n!r}" for n in layers_a],
                               [f"other layer {n!r}" for n in layers_b]) if measure == "cka" else None
    for i, a in enumerate(layers_a):
        for j, b in enumerate(layers_b):
            if measure == "cka":
                value = float(values[i, j])
            else:  # NaN where the pair cannot be compared (channel or position counts differ)
                value = moments[(a, b)].procrustes(group, centered)[0] if moments[(a, b)].count else float("nan")
            rows.append({"layer_a": a, "layer_b": b, "value": value})
    return pd.DataFrame(rows)


def _generic_matrix(m, kept_a, kept_b, same) -> pd.DataFrame:
    """similarity_matrix's rows for a Measure: every layer's activations
    (N, D) reduced once, the model x other block of one batched matrix."""
    from .measure import representation

    def reduced(kept, name):
        return {layer: m.reduce(representation(f"{name}'s layer {layer!r}", torch.cat(parts), m.min_samples))
                for layer, parts in kept.items()}

    red_a = reduced(kept_a, "model")
    red_b = red_a if same else reduced(kept_b, "other")
    names_a, names_b = list(red_a), list(red_b)
    values = m.matrix([red_a[n] for n in names_a] + ([] if same else [red_b[n] for n in names_b]))
    offset = 0 if same else len(names_a)
    rows = [{"layer_a": a, "layer_b": b, "value": float(values[i, offset + j])}
            for i, a in enumerate(names_a) for j, b in enumerate(names_b)]
    return pd.DataFrame(rows)


def _at_common_scale(reps, layers, sums, scales, moments, sides) -> list:
    """One batch's representations of `layers`, each divided by its layer's
    power of two (scales: {layer: the largest _exponent seen}; the Procrustes
    measures are scale invariant, their float64 sums of squares are not).
    Where a batch raises a layer's exponent by d, its running sums are
    divided by 2^d (squares by 2^2d) and so is every cross product with it
    on one of `sides` (0: the pair's first layer, 1: its second)."""
    out = []
    for n, R in zip(layers, reps):
        e, old = _exponent(R), scales.get(n)
        if old is not None and e > old:
            d = e - old
            if sums[n].sum is not None:
                sums[n].sum.copy_(_scaled(sums[n].sum, d))
                sums[n].second.copy_(_scaled(sums[n].second, 2 * d))
            for pair, cross in moments.items():
                for side in sides:
                    if pair[side] == n and cross.ab is not None:
                        cross.ab.copy_(_scaled(cross.ab, d))
        scales[n] = e if old is None else max(e, old)
        out.append(_scaled(R, scales[n]))
    return out


# ---------------------------------------------------------------------------------------------
# Many models on one probe (zoos)


def pairwise_similarity(features: dict, pairs=None, measure="cka", kernel: str = "linear",
                        group: str = "orthogonal", unbiased: bool = True, centered: bool = False,
                        feature_axis: int | None = None, chunk: int = 64, bandwidth: float = 0.5,
                        gamma: float | None = None, progress: bool = True, share=None,
                        max_memory: int | None = None) -> pd.DataFrame:
    """The similarity of many models' representations of one probe (seed 004
    section 5: the CKA of equation 5.4 with the kernels of cka, the
    Procrustes measures of definition 5.2 / appendix D.7.1), each model's
    share computed once and the pairs as batched products.

    features: {model name: (N, ...) features of the same N probe inputs}
    (a layer's or model's output as it came does too: a tuple's first
    element, a Hugging Face output's last_hidden_state; hidden states (N,
    T, C) need feature_axis=-1);
    pairs: (a, b) names (default: every unordered pair; (a, a) is allowed).
    measure: "cka", "procrustes", any other measure of similarity.MEASURES
    as a name or spec string ("svcca:variance=0.95", "cka:kernel=max") or a
    Measure object; the other measures take each representation flattened
    to (N, D), reduce it once and batch the pairs with the measure's matrix
    (their reductions planned within max_memory by Measure.footprint, in
    blocks of models as below). measure "cka" (`kernel`, `unbiased`, `bandwidth`, `gamma`): one centred
    Gram per model and the HSIC of every pair from one GEMM of the stacked
    vectorised U-centred Grams, or, for linear kernels when it is cheaper,
    one centred feature matrix per model and every |X_i'X_j|^2 from one
    product per model with the stacked features. measure "procrustes"
    (`group`, `centered`): each model's normalised features once, every
    pair's X_i'X_j a block of one product of the stacked features, the
    nuclear norms (orthogonal) or the assignments (G_ReLU) batched, `chunk`
    pairs at a time.

    max_memory: bytes the Grams, stacked features and Gram blocks may take
    at once (default: half of _checks.free_memory of the features' device;
    issue 13). When every model's share fits, each is made once, as above; else
    the models go in blocks, each block pair (I, J >= I) that holds a pair
    has its blocks' Grams / features made for it (block J remade once per
    row block I), with the same numbers; where even one block cannot fit, a
    ValueError naming the probe size comes before any work.
    share: None, or share(name, options, compute) -> dict that keeps a
    model's U-centred Gram across calls (compute() makes it; zoo.pair_metrics
    passes its ActivationCache, so a zoo run reduces each model once, whatever
    its pair chunks); used only when every Gram fits twice (the cache's copy
    and the stacked one), otherwise the Grams are recomputed per block and
    share is not called. Features whose squares would overflow or underflow
    are divided by a power of two first (every measure is scale invariant). Returns a DataFrame with columns model_a, model_b,
    value (one row per pair, in the order of pairs)."""
    if not isinstance(features, dict) or not features:
        raise TypeError("features must be a non-empty dict {model name: (N, ...) tensor}")
    from .measure import Measure, parse_spec

    if isinstance(measure, str) and measure not in ("cka", "procrustes"):
        measure = parse_spec(measure)
    if isinstance(measure, Measure) and measure.name in ("cka", "procrustes"):
        options = measure.options()  # the batched engines below take them as arguments
        kernel, unbiased = options.get("kernel", kernel), options.get("unbiased", unbiased)
        bandwidth, gamma = options.get("bandwidth", bandwidth), options.get("gamma", gamma)
        group, centered = options.get("group", group), options.get("centered", centered)
        measure = measure.name
    names = list(features)
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]] if pairs is None else \
        [tuple(p) for p in pairs]
    if any(len(p) != 2 for p in pairs):
        raise ValueError("pairs must be (model_a, model_b) name pairs")
    unknown = sorted({str(n) for p in pairs for n in p if n not in features})
    if unknown:
        raise ValueError(f"pairs name models without features: {unknown}")
    chunk = _checks.positive_int("chunk", chunk)
    named = {n for p in pairs for n in p}  # a set: K x pairs membership tests would dominate a large zoo
    involved = [n for n in names if n in named]
    if isinstance(measure, Measure):
        values = _pairwise_measure(measure, features, involved, pairs, progress, share, max_memory)
        return pd.DataFrame({"model_a": [a for a, _ in pairs], "model_b": [b for _, b in pairs], "value": values})
    # every measure is scale invariant: representations too large or small for their squares scaled first
    meta = [n for n in involved if isinstance(features[n], torch.Tensor) and _checks.data_free(features[n])]
    if meta:
        raise ValueError(f"features of {meta[:3]} are meta tensors (shapes only): the measures need values")
    reps = {n: _rescaled(as_channels(f"features[{n!r}]", _hidden_states(n, features[n]), feature_axis))
            for n in involved}
    if len({R.shape[0] for R in reps.values()}) > 1:
        raise ValueError("every model's features must hold the same N probe samples")
    budget = _budget(max_memory, reps[involved[0]].device) if involved else math.inf
    from tqdm.auto import tqdm

    with tqdm(total=len(involved), desc=f"pairwise {measure}", unit="model", disable=not progress,
              leave=False, mininterval=0, miniters=1) as bar:
        if measure == "cka":
            _check_kernel(kernel, bandwidth, gamma)
            index = {n: i for i, n in enumerate(involved)}
            wanted = [(index[a], index[b]) for a, b in pairs]
            matrix = _pairwise_cka([reps[n] for n in involved], involved, kernel, unbiased, bandwidth, gamma, bar,
                                   share, wanted, budget) if wanted else None
            values = matrix[[i for i, _ in wanted], [j for _, j in wanted]].tolist() if wanted else []
        elif measure == "procrustes":
            _check_group(group)
            if not isinstance(centered, bool):
                raise TypeError(f"centered must be True or False, got {centered!r}")
            values = _pairwise_procrustes(reps, pairs, group, centered, chunk, bar, budget)
        else:
            raise ValueError(f"measure must be 'cka' or 'procrustes', got {measure!r}")
    return pd.DataFrame({"model_a": [a for a, _ in pairs], "model_b": [b for _, b in pairs], "value": values})


def _pairwise_measure(m, features, involved, pairs, progress, share, max_memory) -> list[float]:
    """pairwise_similarity for a Measure: each involved representation
    reduced once per block (the measure's reduce), the pairs of a block pair
    from one m.matrix of both blocks' reductions; blocks of models within
    max_memory by the measures' footprint, as the CKA route."""
    from tqdm.auto import tqdm

    from .measure import representation

    reps = {n: _hidden_states(n, features[n]) for n in involved}
    shapes = {n: tuple(R.shape) for n, R in reps.items()}
    if len({s[0] for s in shapes.values()}) > 1:
        raise ValueError("every model's features must hold the same N probe samples")
    if not involved:
        return []
    n = shapes[involved[0]][0]
    sizes = [m.footprint(n, math.prod(shapes[k][1:])) for k in involved]
    device = reps[involved[0]].device
    blocks = _model_blocks(sizes, [0] * len(sizes), 0, _budget(max_memory, device), device, what=m.name, n=n)
    index = {k: i for i, k in enumerate(involved)}
    wanted = [(index[a], index[b]) for a, b in pairs]

    def reduced(name):
        def compute():
            return m.reduce(representation(f"features[{name!r}]", reps[name], m.min_samples))
        return share(name, ("measure", m.label), compute) if share is not None else compute()

    values = [math.nan] * len(pairs)
    with tqdm(total=len(involved), desc=f"pairwise {m.label}", unit="model", disable=not progress,
              leave=False, mininterval=0, miniters=1) as bar:
        def make(block):
            return {i: reduced(involved[i]) for i in block}

        def visit(p, q, positions, rows, columns):
            order = list(rows) + [i for i in columns if i not in rows]
            matrix = m.matrix([rows.get(i, columns.get(i)) for i in order])
            where = {i: t for t, i in enumerate(order)}
            for position in positions:
                i, j = wanted[position]
                values[position] = float(matrix[where[i], where[j]])

        _sweep(blocks, _block_pairs(blocks, wanted, diagonal=False), make, visit, bar)
    bad = [pairs[t] for t, v in enumerate(values) if not math.isfinite(v)]
    if bad:
        raise FloatingPointError(f"{m.label} gave a non-finite value for pairs {bad[:3]}")
    return values


def _hidden_states(name, value):
    """A model's features as given, or the hidden states of a layer's or
    model's output (a tuple's first element, a Hugging Face output's
    last_hidden_state: first_tensor)."""
    if isinstance(value, torch.Tensor):
        return value
    try:
        return first_tensor(value)
    except TypeError:
        raise TypeError(f"features[{name!r}] must be a tensor (or a model output holding one), got "
                        f"{type(value).__name__}") from None


def _budget(max_memory, device) -> float:
    """max_memory in bytes, by default half the free memory of `device` (none known: no limit)."""
    if max_memory is None:
        free = _checks.free_memory(device)
        return math.inf if free is None else free // 2
    if isinstance(max_memory, bool) or not isinstance(max_memory, (int, float)) or not max_memory > 0:
        raise ValueError(f"max_memory must be a positive number of bytes, got {max_memory!r}")
    return max_memory


def _held(tensor: torch.Tensor) -> torch.Tensor:
    """Every large tensor the pairwise routes allocate passes here (the tests count them against max_memory)."""
    return tensor


def _model_blocks(linear, square, fixed, budget, device, single=None, what="", n=0) -> list[list[int]]:
    """Consecutive blocks of model indices whose cost, sum(linear) +
    sum(square)^2 bytes over the block, lets `fixed` plus two blocks fit in
    `budget`; one block of all (costed with `single` instead of `linear`
    where given) when that fits whole. Raises, before any work, where one
    model alone does not fit, or the plan does not fit the device's free
    memory (a max_memory above it)."""
    single = linear if single is None else single
    advice = f"reduce the probe size (N = {n} samples) or the layers' feature sizes, compare fewer models per call"
    whole = fixed + sum(single) + sum(square) ** 2
    if whole <= budget:
        _checks.memory(whole, device, f"pairwise {what}", advice)
        return [list(range(len(linear)))]
    room = (budget - fixed) / 2
    least = fixed + 2 * max(a + b * b for a, b in zip(linear, square))
    if least > budget:
        raise ValueError(f"pairwise {what} needs at least {_size(least)} for one block of models but max_memory "
                         f"allows {_size(budget)}: {advice}, or raise max_memory")
    blocks, cost, side = [[]], 0, 0
    for i, (a, b) in enumerate(zip(linear, square)):
        if blocks[-1] and cost + a + (side + b) ** 2 > room:
            blocks.append([])
            cost, side = 0, 0
        blocks[-1].append(i)
        cost, side = cost + a, side + b
    _checks.memory(fixed + 2 * room, device, f"pairwise {what}", advice)
    return blocks


def _size(nbytes) -> str:
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{int(nbytes)} bytes"


def _block_pairs(blocks, wanted, diagonal: bool) -> dict:
    """{(p, q) with p <= q: the positions in `wanted` of the index pairs between blocks p and q};
    every (p, p) too when `diagonal` (the CKA's self terms)."""
    owner = {i: p for p, block in enumerate(blocks) for i in block}
    out = {(p, p): [] for p in range(len(blocks))} if diagonal else {}
    for position, (i, j) in enumerate(wanted):
        out.setdefault(tuple(sorted((owner[i], owner[j]))), []).append(position)
    return dict(sorted(out.items()))


def _sweep(blocks, block_pairs: dict, make, visit, bar=None) -> None:
    """visit(p, q, positions, rows, columns) for every block pair, rows =
    make(blocks[p]) once per row block, columns = make(blocks[q]) per pair
    (rows itself when q == p); the columns of a row go from the last block
    down, so its last column is often the next row block and is kept as it:
    at most two blocks alive at once. The bar counts each model once."""
    keys = sorted(block_pairs, key=lambda pq: (pq[0], pq[1] != pq[0], -pq[1]))
    seen, row, kept = set(), None, None

    def made(index):
        if bar is not None:
            bar.update(0 if index in seen else len(blocks[index]))
        seen.add(index)
        return make(blocks[index])

    for t, (p, q) in enumerate(keys):
        if row is None or row[0] != p:
            row = None  # the previous row block goes before the next is made
            row, kept = (p, kept if kept is not None else made(p)), None
        columns = row[1] if q == p else made(q)
        visit(p, q, block_pairs[(p, q)], row[1], columns)
        if q != p and t + 1 < len(keys) and keys[t + 1][0] == q:
            kept = columns
        del columns


def _pairwise_cka(reps, names, kernel, unbiased, bandwidth, gamma, bar, share=None, wanted=None,
                  budget=math.inf) -> torch.Tensor:
    """The (K, K) CKA matrix of K representations (N, C, S) of one probe:
    the HSICs of all pairs from batched products (see pairwise_similarity),
    in blocks of models within `budget` bytes (entries outside `wanted`, when
    blocked, are not computed); NaN, with a warning naming them, for
    constant representations."""
    n, k = reps[0].shape[0], len(reps)
    if unbiased and n < 4:
        raise ValueError(f"the unbiased HSIC needs at least 4 samples, got {n}")
    wanted = [(i, j) for i in range(k) for j in range(k)] if wanted is None else wanted
    dims = [R.shape[1] * R.shape[2] for R in reps]
    # flops: N D_i D_j per pair (one triangle) against N^2 D_i per Gram plus N^2 per entry of the K x K
    cost_features = n * (sum(dims) ** 2 + sum(d * d for d in dims)) / 2
    cost_grams = n * n * (sum(dims) + k * k)  # the pair GEMM computes both triangles
    fixed = 6 * 8 * k * k  # the K x K matrices of the normalisation
    device = reps[0].device
    if kernel in ("linear", "ortho") and cost_features < cost_grams:
        size, wide = reps[0].element_size(), max(dims)
        # per model: its centred columns and their share of one row's product (and its float64 norms)
        linear = [d * (n * size + wide * (size + 8)) for d in dims]
        blocks = _model_blocks(linear, [0] * k, fixed + 16 * k * n + 2 * n * wide * max(size, 8), budget, device,
                               what="cka (centred features)", n=n)
        hsic_matrix = _pairwise_hsic_features(reps, kernel, unbiased, bar, blocks, _block_pairs(blocks, wanted, True))
    else:
        gram = 8 * n * n
        blocks = _model_blocks([gram] * k, [0] * k, fixed + 4 * gram, budget, device,
                               single=[gram * (1 if share is None else 2)] * k, what="cka (Gram matrices)", n=n)
        share = share if len(blocks) == 1 else None  # blocked: the cache would hold every Gram again
        options = (kernel, unbiased, bandwidth, gamma)

        def grams(block):  # (len(block), N N): one float64 copy of each model's U-centred Gram
            stacked = _held(torch.empty((len(block), n * n), dtype=torch.float64, device=device))
            for row, i in enumerate(block):
                def centred(R=reps[i]):  # centred in place in its float64 copy
                    K = _held(torch.empty((n, n), dtype=torch.float64, device=R.device))
                    K.copy_(_gram(R, kernel, bandwidth, gamma))
                    _centre_gram_(K[None], unbiased)
                    return {"gram": K}
                gram_i = (centred() if share is None else share(names[i], options, centred))["gram"]
                stacked[row].view(n, n).copy_(gram_i)
                del gram_i
            return stacked

        hsic_matrix = torch.zeros((k, k), dtype=torch.float64, device=device)

        def visit(p, q, _, rows, columns):  # <vec U(K_i), vec U(K_j)>: one GEMM per block pair
            block = (rows @ columns.T) * _hsic_scale(n, unbiased)
            hsic_matrix[blocks[p][0]:blocks[p][-1] + 1, blocks[q][0]:blocks[q][-1] + 1] = block
            hsic_matrix[blocks[q][0]:blocks[q][-1] + 1, blocks[p][0]:blocks[p][-1] + 1] = block.T

        _sweep(blocks, _block_pairs(blocks, wanted, True), grams, visit, bar)
    constant = torch.tensor([_constant(R) for R in reps], device=hsic_matrix.device)
    hsic_matrix = hsic_matrix.masked_fill(constant[:, None] | constant[None, :], 0.0)
    self_terms = hsic_matrix.diagonal().clone()
    bad = self_terms <= 0
    scale = self_terms.clamp_min(0).sqrt()
    denominator = torch.outer(scale, scale)
    matrix = hsic_matrix / torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    matrix = matrix.masked_fill(bad[:, None] | bad[None, :], float("nan"))
    if bool(bad.any()):
        which = [f"features[{names[i]!r}] ({'constant' if constant[i] else 'HSIC estimate <= 0'})"
                 for i in range(k) if bad[i]]
        warnings.warn(f"CKA is undefined for {', '.join(which)}; their entries are NaN", RuntimeWarning,
                      stacklevel=3)
    return matrix


class _Centred:
    """One block of models' centred features side by side (N, sum D), which
    model owns each column, and each model's float64 squared row norms."""

    def __init__(self, reps, block, kernel):
        n = reps[block[0]].shape[0]
        self.starts = [0]
        for i in block:
            self.starts.append(self.starts[-1] + reps[i].shape[1] * reps[i].shape[2])
        self.stacked = _held(torch.empty((n, self.starts[-1]), dtype=reps[block[0]].dtype,
                                         device=reps[block[0]].device))
        self.norms = []
        for row, i in enumerate(block):
            part = self.stacked[:, self.starts[row]:self.starts[row + 1]]
            self.norms.append(_centred_features(reps[i], kernel, part)[1])
        self.owner = torch.repeat_interleave(torch.arange(len(block), device=self.stacked.device),
                                             torch.diff(torch.tensor(self.starts, device=self.stacked.device)))

    def traces(self, other: "_Centred", same: bool) -> torch.Tensor:
        """(len(self), len(other)) |X_i'X_j|^2: row i from one product X_i' [X_j ...] (the upper
        triangle only when same)."""
        out = torch.zeros((len(self.norms), len(other.norms)), dtype=torch.float64, device=self.stacked.device)
        for i in range(len(self.norms)):
            low = self.starts[i] if same else 0
            F = self.stacked[:, self.starts[i]:self.starts[i + 1]]
            columns = torch.linalg.vector_norm(F.T @ other.stacked[:, low:], dim=0, dtype=torch.float64).square()
            out[i].index_add_(0, other.owner[low:], columns)
        return out.triu() + out.triu(1).T if same else out


def _pairwise_hsic_features(reps, kernel, unbiased, bar, blocks=None, block_pairs=None) -> torch.Tensor:
    """(K, K) linear HSICs from centred features (N, D_i): tr(K~_i K~_j) =
    |X_i'X_j|^2 - k_i.k_j (k the squared row norms, X'1 = 0), the
    |X_i'X_j|^2 of row i from one product X_i' [X_i ... X_K], per block
    pair of `blocks` (default one block; entries of block pairs absent from
    block_pairs are not computed)."""
    n, k = reps[0].shape[0], len(reps)
    blocks = [list(range(k))] if blocks is None else blocks
    block_pairs = {(0, 0): []} if block_pairs is None else block_pairs
    trace = torch.zeros((k, k), dtype=torch.float64, device=reps[0].device)
    rows = torch.empty((k, n), dtype=torch.float64, device=reps[0].device)

    def visit(p, q, _, left, right):
        I, J = blocks[p], blocks[q]
        if p == q:
            rows[I[0]:I[-1] + 1] = torch.stack(left.norms)
        block = left.traces(right, p == q)
        trace[I[0]:I[-1] + 1, J[0]:J[-1] + 1] = block
        trace[J[0]:J[-1] + 1, I[0]:I[-1] + 1] = block.T

    _sweep(blocks, block_pairs, lambda block: _Centred(reps, block, kernel), visit, bar)
    if not unbiased:
        return trace / (n - 1) ** 2
    sums = rows.sum(1)
    return (trace - (rows @ rows.T) * (1 + 2.0 / (n - 2)) + torch.outer(sums, sums) / ((n - 1) * (n - 2))) \
        / (n * (n - 3))


def _normalised_positions(name, R, group, centered) -> torch.Tensor:
    """(N S, C) float64 rows = samples x positions, scaled as the Procrustes
    measure needs: unit Frobenius norm (orthogonal) or unit channels (D_X^-1)."""
    F = R.to(torch.float64).transpose(1, 2).reshape(-1, R.shape[1])
    if centered:
        F = F - F.mean(0)
    norms = F.norm(dim=0)
    if group == "orthogonal":
        total = norms.square().sum().sqrt()
        if total == 0:
            raise ValueError(f"{name} is zero (constant, when centred): Procrustes is undefined")
        return _held(F / total)
    if bool((norms == 0).any()):
        raise ValueError(f"a channel of {name} is zero (constant, when centred): D_X^-1 of "
                         "definition 5.2 does not exist and the measure is undefined")
    return _held(F / norms)


def _pairwise_procrustes(reps, pairs, group, centered, chunk, bar=None, budget=math.inf):
    """Every pair's Procrustes measure (see pairwise_similarity): the models in
    blocks within `budget` bytes, each block pair's X_a'X_b as blocks of one
    Gram of its stacked normalised features where its pairs cover much of it,
    else one product per pair."""
    names = list(reps)
    for a, b in pairs:  # before any work
        if reps[a].shape[2] != reps[b].shape[2]:
            raise ValueError(f"features[{a!r}] and features[{b!r}] differ in positions per sample")
        if group == "grelu" and reps[a].shape[1] != reps[b].shape[1]:
            raise ValueError(f"G_ReLU-Procrustes needs equal channel counts, got {reps[a].shape[1]} for "
                             f"{a!r} and {reps[b].shape[1]} for {b!r}")
    if not names:
        return []
    channels = [reps[m].shape[1] for m in names]
    rows = [reps[m].shape[0] * reps[m].shape[2] for m in names]
    widest, longest = max(channels), max(rows)
    # per model its normalised features (twice: the stacked copy); the chunk's crosses and their SVD / assignment
    blocks = _model_blocks([16 * r * c for r, c in zip(rows, channels)], [4 * c for c in channels],
                           3 * 8 * chunk * widest ** 2 + 2 * 8 * longest * widest, budget, reps[names[0]].device,
                           what=f"procrustes ({group})", n=reps[names[0]].shape[0])
    index = {m: i for i, m in enumerate(names)}
    wanted = [(index[a], index[b]) for a, b in pairs]
    values = [None] * len(pairs)

    def visit(p, q, positions, rows, columns):
        part = [wanted[t] for t in positions]
        for t, value in zip(positions, _procrustes_block(rows, columns, part, group, chunk)):
            values[t] = value

    _sweep(blocks, _block_pairs(blocks, wanted, False),
           lambda block: {i: _normalised_positions(f"features[{names[i]!r}]", reps[names[i]], group, centered)
                          for i in block}, visit, bar)
    return values


def _procrustes_block(rows: dict, columns: dict, part, group, chunk) -> list[float]:
    """The measures of the index pairs `part` between two blocks of models
    (rows, columns: each model's normalised features; the same dict for a
    block with itself), their crosses from one product of the blocks'
    stacked features when the pairs cover much of it (half the pairs or more)."""
    same = rows is columns
    offsets = [{}, {}]
    for side, block in enumerate((rows, columns)):
        total = 0
        for i, F in block.items():
            offsets[side][i] = (total, total + F.shape[1])
            total += F.shape[1]
    gram = None
    if len(rows) * len(columns) <= (4 if same else 2) * len(part):
        left = _held(torch.cat(list(rows.values()), 1))
        right = left if same else _held(torch.cat(list(columns.values()), 1))
        gram = _held(torch.empty((left.shape[1], right.shape[1]), dtype=left.dtype, device=left.device))
        if same:  # its upper half computed, the lower half its transpose
            for start, stop in offsets[0].values():
                gram[start:stop, start:] = left[:, start:stop].T @ left[:, start:]
                gram[stop:, start:stop] = gram[start:stop, stop:].T
        else:
            torch.matmul(left.T, right, out=gram)
        del left, right

    def cross(a, b):
        if gram is None:
            return flat[a].T @ flat[b]
        if a in offsets[0] and b in offsets[1]:
            (i0, i1), (j0, j1) = offsets[0][a], offsets[1][b]
            return gram[i0:i1, j0:j1]
        (i0, i1), (j0, j1) = offsets[0][b], offsets[1][a]
        return gram[i0:i1, j0:j1].T

    flat = {**columns, **rows}
    values = []
    for start in range(0, len(part), chunk):
        piece = part[start:start + chunk]
        shapes = {(flat[a].shape[1], flat[b].shape[1]) for a, b in piece}
        groups = [torch.stack([cross(a, b) for a, b in piece])] if len(shapes) == 1 else \
            [cross(a, b)[None] for a, b in piece]  # mixed channel counts: one problem at a time
        for crosses in groups:
            if group == "orthogonal":
                values.extend(_procrustes_measure(v, 1.0)[0] for v in torch.linalg.svdvals(crosses).sum(-1).tolist())
            else:
                picked, cols = _assignment(crosses)
                best = crosses[torch.arange(crosses.shape[0], device=crosses.device)[:, None], picked, cols].sum(-1)
                values.extend(_procrustes_measure(v, crosses.shape[-1])[0] for v in best.tolist())
    return values
