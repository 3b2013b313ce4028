"""Dissimilarity measures of hidden representations (seed 004 section 5 and
appendix D.7): CKA with the linear, RBF, max (G_ReLU-CKA, definition 5.3)
and Laplace l1 (equation 5.6) kernels, the orthogonal and G_ReLU Procrustes
measures (definition 5.2), and the layer-by-layer similarity matrix of two
models computed in one pass over the data.

Features are (N, d) or (N, C, H, W): channels are the feature axis, spatial
positions are summed over (appendix D.7), so the G_ReLU measures are
invariant to permuting and positively scaling channels, not positions."""
from __future__ import annotations

import math

import pandas as pd
import torch
from torch import nn

from . import _checks
from ._data import batches
from ._hooks import capturing, check_layers, evaluating
from ._ops import max_kernel_gram

KERNELS = ("linear", "rbf", "max", "laplace")
GROUPS = ("orthogonal", "grelu")


def _as_channels(name: str, X: torch.Tensor) -> torch.Tensor:
    """(N, d) -> (N, d, 1); (N, C, *spatial) -> (N, C, S)."""
    _checks.tensor(name, X, ndims=range(2, 6), shape="(N, d) or (N, C, H, W)")
    if X.shape[1] == 0:
        raise ValueError(f"{name} has no features (shape {tuple(X.shape)})")
    return X.reshape(X.shape[0], X.shape[1], -1)


def _pair(X, Y):
    X, Y = _as_channels("X", X), _as_channels("Y", Y)
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"X and Y must hold the same N samples, got {X.shape[0]} and {Y.shape[0]}")
    if X.device != Y.device:
        raise ValueError(f"Y is on {Y.device} but X is on {X.device}; move them to one device")
    return X, Y


def channel_normalize(X: torch.Tensor) -> torch.Tensor:
    """Appendix D.7.2 / definition 5.3: subtract each channel's mean over
    samples and positions, divide by its norm over samples and positions
    (X D_X^{-1}). X: (N, C, S). A constant channel stays zero."""
    X = X - X.mean(dim=(0, 2), keepdim=True)
    norm = X.square().sum(dim=(0, 2), keepdim=True).sqrt()
    return X / torch.where(norm > 0, norm, torch.ones_like(norm))


def _median_offdiagonal(D: torch.Tensor) -> torch.Tensor:
    n = D.shape[0]
    values = D[~torch.eye(n, dtype=torch.bool, device=D.device)]
    return values.median() if values.numel() else D.new_tensor(1.0)


def kernel_matrix(X: torch.Tensor, kernel: str = "linear", bandwidth: float = 0.5, gamma: float | None = None):
    """The (N, N) Gram matrix of features X (N, C, S) for a CKA kernel.

    linear: <x_i, x_j> of the flattened features. rbf: exp(-|x_i - x_j|^2 /
    (2 s^2)) with s = bandwidth x the median distance (Kornblith et al.).
    max: max_c sum_s x~[i, c, s] x~[j, c, s] on channel-normalised features
    (definition 5.3 with appendix D.7.2; the max_kernel_gram operator, never
    the (N, N, C) tensor). laplace: exp(-gamma |x~_i - x~_j|_1) on
    channel-normalised features (equation 5.6), gamma = 1 / the median l1
    distance by default."""
    if kernel == "linear":
        F = X.reshape(X.shape[0], -1)
        return F @ F.T
    if kernel == "rbf":
        F = X.reshape(X.shape[0], -1)
        sq = torch.cdist(F, F).square()
        scale = bandwidth ** 2 * _median_offdiagonal(sq)
        return torch.exp(-sq / (2 * scale.clamp_min(torch.finfo(sq.dtype).tiny)))
    Xn = channel_normalize(X)
    if kernel == "max":
        return max_kernel_gram(Xn.contiguous())
    if kernel == "laplace":
        F = Xn.reshape(Xn.shape[0], -1)
        l1 = torch.cdist(F, F, p=1)
        c = 1.0 / float(_median_offdiagonal(l1).clamp_min(torch.finfo(l1.dtype).tiny)) if gamma is None else gamma
        return torch.exp(-c * l1)
    raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")


def hsic(K: torch.Tensor, L: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """HSIC of every pair of Gram matrices: K (a, n, n), L (b, n, n) -> (a, b).

    unbiased=True: the estimator of Song et al. used by Nguyen et al. [NRK21,
    eq. 3], HSIC_1 = [tr(K~ L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2)
    1'K~L~1] / (n(n-3)) with K~, L~ the matrices with zeroed diagonals
    (needs n >= 4). unbiased=False: tr(K H L H) / (n-1)^2."""
    n = K.shape[-1]
    K, L = K.double(), L.double()
    if unbiased:
        if n < 4:
            raise ValueError(f"the unbiased HSIC needs at least 4 samples per batch, got {n}")
        K = K - torch.diag_embed(torch.diagonal(K, dim1=-2, dim2=-1))
        L = L - torch.diag_embed(torch.diagonal(L, dim1=-2, dim2=-1))
        trace = torch.einsum("aij,bij->ab", K, L)  # K, L symmetric
        k1, l1 = K.sum(-1), L.sum(-1)  # K~ 1, L~ 1
        middle = k1.sum(-1)[:, None] * l1.sum(-1)[None, :] / ((n - 1) * (n - 2))
        cross = k1 @ l1.T
        return (trace + middle - 2.0 / (n - 2) * cross) / (n * (n - 3))
    Kc = K - K.mean(-1, keepdim=True) - K.mean(-2, keepdim=True) + K.mean(dim=(-2, -1), keepdim=True)
    return torch.einsum("aij,bij->ab", Kc, L) / (n - 1) ** 2


def _check_kernel(kernel):
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")


class MinibatchCKA:
    """CKA accumulated over minibatches (Nguyen et al. [NRK21]): the mean of
    the per-batch unbiased HSICs, so the dataset never needs to fit in
    memory, only one (batch, batch) Gram matrix per representation. The
    channel normalisation of the max and Laplace kernels uses each batch's
    statistics (it keeps their G_ReLU invariance).

    update(Xs, Ys) takes lists of representations of the same batch (or single
    tensors); value() returns the (len(Xs), len(Ys)) CKA matrix (a float
    for single tensors)."""

    def __init__(self, kernel: str = "linear", unbiased: bool = True, bandwidth: float = 0.5,
                 gamma: float | None = None):
        _check_kernel(kernel)
        self.kernel, self.unbiased, self.bandwidth, self.gamma = kernel, unbiased, bandwidth, gamma
        self.xy = self.xx = self.yy = None
        self.batches = 0
        self.single = False

    def _grams(self, reps, name):
        return torch.stack([kernel_matrix(_as_channels(name, R), self.kernel, self.bandwidth, self.gamma).double()
                            for R in reps])

    def update(self, Xs, Ys) -> None:
        self.single = isinstance(Xs, torch.Tensor) and isinstance(Ys, torch.Tensor)
        Xs = [Xs] if isinstance(Xs, torch.Tensor) else list(Xs)
        Ys = [Ys] if isinstance(Ys, torch.Tensor) else list(Ys)
        n = {R.shape[0] for R in Xs + Ys}
        if len(n) != 1:
            raise ValueError(f"every representation of a batch must hold the same samples, got sizes {sorted(n)}")
        K, L = self._grams(Xs, "X"), self._grams(Ys, "Y")
        xy, xx = hsic(K, L, self.unbiased), torch.diagonal(hsic(K, K, self.unbiased))
        yy = torch.diagonal(hsic(L, L, self.unbiased))
        if self.xy is None:
            self.xy, self.xx, self.yy = xy, xx, yy
        else:
            self.xy, self.xx, self.yy = self.xy + xy, self.xx + xx, self.yy + yy
        self.batches += 1

    def value(self):
        if self.xy is None:
            raise ValueError("no batch was added: call update() first")
        denominator = (self.xx[:, None] * self.yy[None, :]).clamp_min(0).sqrt()
        cka = torch.where(denominator > 0, self.xy / denominator.clamp_min(1e-300),
                          torch.full_like(self.xy, float("nan")))
        return float(cka[0, 0]) if self.single else cka


def cka(X: torch.Tensor, Y: torch.Tensor, kernel: str = "linear", unbiased: bool = True,
        batch_size: int | None = None, bandwidth: float = 0.5, gamma: float | None = None) -> float:
    """Centered kernel alignment HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))
    (seed 004 equation 5.4). kernel="max" is G_ReLU-CKA (definition 5.3,
    appendix D.7.2), "laplace" the PSD G_ReLU-invariant kernel of equation
    5.6, "linear" and "rbf" the orthogonally invariant CKA of Kornblith et
    al. unbiased: the HSIC_1 of [NRK21] (default) or the biased estimator.

    X, Y: (N, d) or (N, C, H, W), the same N samples. batch_size: minibatch
    CKA over consecutive rows (see MinibatchCKA) instead of one N x N
    Gram matrix. The max kernel is not PSD (example E.44), so its CKA is the
    paper's "rule-bending" instance (remark 5.5)."""
    X, Y = _pair(X, Y)
    _check_kernel(kernel)
    N = X.shape[0]
    step = N if batch_size is None else _checks.positive_int("batch_size", batch_size)
    accumulator = MinibatchCKA(kernel, unbiased, bandwidth, gamma)
    for start in range(0, N, step):
        if N - start < (4 if unbiased else 2) and start > 0:
            break  # a ragged last batch too small for the estimator adds nothing
        accumulator.update(X[start:start + step], Y[start:start + step])
    return accumulator.value()


class CrossMoments:
    """Running sums that give the Procrustes measures of the whole dataset
    after one pass: per channel sums and sums of squares, and the channel
    cross products of (D.2), all in float64."""

    def __init__(self):
        self.count = 0
        self.sx = self.sy = self.sxx = self.syy = self.sxy = None

    def update(self, X: torch.Tensor, Y: torch.Tensor) -> None:
        X, Y = _pair(X, Y)
        if X.shape[2] != Y.shape[2]:
            raise ValueError(f"X and Y must have the same spatial size, got {X.shape[2]} and {Y.shape[2]} positions")
        X, Y = X.double(), Y.double()
        sums = (X.sum((0, 2)), Y.sum((0, 2)), X.square().sum((0, 2)), Y.square().sum((0, 2)),
                torch.einsum("ncs,nds->cd", X, Y))
        if self.sx is None:
            self.sx, self.sy, self.sxx, self.syy, self.sxy = sums
        else:
            self.sx, self.sy, self.sxx, self.syy, self.sxy = (a + b for a, b in zip(
                (self.sx, self.sy, self.sxx, self.syy, self.sxy), sums))
        self.count += X.shape[0] * X.shape[2]

    def centred(self):
        """Centred cross products (C, C') and centred channel norms^2."""
        m = self.count
        cross = self.sxy - torch.outer(self.sx, self.sy) / m
        nx = (self.sxx - self.sx.square() / m).clamp_min(0)
        ny = (self.syy - self.sy.square() / m).clamp_min(0)
        return cross, nx, ny

    def procrustes(self, group: str = "orthogonal") -> tuple[float, float]:
        """(similarity, distance) for the accumulated data."""
        if self.sx is None:
            raise ValueError("no batch was added: call update() first")
        cross, nx, ny = self.centred()
        if group == "orthogonal":
            # D.7.1 / [DDS21a]: centred, unit Frobenius norm; min_Q |X - Y Q|^2 = 2 - 2 |X'Y|_*
            scale = math.sqrt(float(nx.sum()) * float(ny.sum()))
            if scale == 0:
                raise ValueError("X or Y is constant: the Procrustes measure is undefined")
            nuclear = float(torch.linalg.matrix_norm(cross / scale, ord="nuc"))
            distance = math.sqrt(_rounded_gap(2.0 - 2.0 * nuclear, 2.0))
            return 1.0 - distance / 2.0, distance
        if group == "grelu":
            if cross.shape[0] != cross.shape[1]:
                raise ValueError(f"G_ReLU-Procrustes needs equal channel counts, got {cross.shape[0]} and "
                                 f"{cross.shape[1]}")
            if bool((nx == 0).any()) or bool((ny == 0).any()):
                raise ValueError("a channel of X or Y is constant: D_X^{-1} of definition 5.2 does not exist")
            normalised = cross / torch.outer(nx.sqrt(), ny.sqrt())
            from scipy.optimize import linear_sum_assignment

            rows, cols = linear_sum_assignment(normalised.cpu().numpy(), maximize=True)
            d = cross.shape[0]
            best = float(normalised[rows, cols].sum())
            distance = math.sqrt(_rounded_gap(2.0 * d - 2.0 * best, 2.0 * d))  # |X~|^2 = |Y~|^2 = d
            return 1.0 - distance / (2.0 * math.sqrt(d)), distance
        raise ValueError(f"group must be one of {GROUPS}, got {group!r}")


def _rounded_gap(gap: float, scale: float) -> float:
    """A squared distance computed as a difference of float64 sums: below
    1e-10 of its scale it is rounding (the square root would turn 1e-14
    into 1e-7), so it counts as zero; never negative."""
    return 0.0 if gap <= 1e-10 * scale else gap


def procrustes(X: torch.Tensor, Y: torch.Tensor, group: str = "orthogonal", return_distance: bool = False):
    """Procrustes similarity in [0, 1] (1 = aligned) of representations X, Y
    ((N, d) or (N, C, H, W), channels transformed, positions not).

    group="grelu": definition 5.2, 1 - delta / (2 sqrt(d)) with delta =
    min over permutations P of |X~ - Y~ P|, X~ the channel-centred,
    channel-normalised X, solved as a linear sum assignment on (D.2).
    group="orthogonal": the same with X, Y centred and scaled to unit
    Frobenius norm and delta = min over orthogonal Q = sqrt(2 - 2 |X'Y|_*)
    (appendix D.7.1, [DDS21a]), so 1 - delta / 2. Both are clamped so that
    perfect alignment gives exactly 1 (the seed code returns NaN there).
    return_distance=True returns (similarity, delta)."""
    if group not in GROUPS:
        raise ValueError(f"group must be one of {GROUPS}, got {group!r}")
    moments = CrossMoments()
    moments.update(X, Y)
    similarity, distance = moments.procrustes(group)
    return (similarity, distance) if return_distance else similarity


# ---------------------------------------------------------------------------------------------
# All layer pairs of two models


def _comparable(x, y, group) -> bool:
    x, y = x.reshape(x.shape[0], x.shape[1], -1), y.reshape(y.shape[0], y.shape[1], -1)
    return x.shape[2] == y.shape[2] and (group == "orthogonal" or x.shape[1] == y.shape[1])


def similarity_matrix(model_a: nn.Module, model_b: nn.Module, loader, layers, measure: str = "cka",
                      kernel: str = "linear", group: str = "orthogonal", unbiased: bool = True,
                      device=None, progress: bool = True) -> pd.DataFrame:
    """Similarity of every layer of model_a with every layer of model_b
    (seed 004 Fig. 2, 5, 9): activations are captured once per batch by
    forward hooks and every pair is accumulated in the same pass.

    loader: an iterable of input batches (or (input, label) tuples); layers:
    module names present in both models, or a pair (layers_a, layers_b);
    measure "cka" (minibatch CKA with `kernel`, unbiased by default) or
    "procrustes" (exact over the whole data, with `group`; NaN for pairs
    whose position counts, or channel counts for G_ReLU, differ). Returns a tidy
    DataFrame with columns layer_a, layer_b, value (plot it with
    spectral_ext.plot.similarity_heatmap)."""
    if measure not in ("cka", "procrustes"):
        raise ValueError(f"measure must be 'cka' or 'procrustes', got {measure!r}")
    if measure == "cka":
        _check_kernel(kernel)
    elif group not in GROUPS:
        raise ValueError(f"group must be one of {GROUPS}, got {group!r}")
    if isinstance(layers, tuple) and len(layers) == 2 and not isinstance(layers[0], str):
        layers_a, layers_b = list(layers[0]), list(layers[1])
    else:
        layers_a = layers_b = [layers] if isinstance(layers, str) else list(layers)
    layers_a, layers_b = check_layers(model_a, layers_a), check_layers(model_b, layers_b)
    from tqdm.auto import tqdm

    accumulator = MinibatchCKA(kernel, unbiased) if measure == "cka" else None
    moments = {(a, b): CrossMoments() for a in layers_a for b in layers_b} if measure == "procrustes" else None
    seen = 0
    with capturing(model_a, layers_a) as (cap_a, _), capturing(model_b, layers_b) as (cap_b, _), torch.no_grad(), \
            evaluating(model_a, model_b):
        for x, _ in tqdm(batches(loader, name="loader"), desc="similarity matrix", disable=not progress, leave=False):
            x = x.to(device) if device is not None else x
            cap_a.clear()
            cap_b.clear()
            model_a(x)
            model_b(x)
            missing = [n for n in layers_a if n not in cap_a] + [n for n in layers_b if n not in cap_b]
            if missing:
                raise ValueError(f"layers {missing} did not run in the forward pass")
            if measure == "cka":
                if x.shape[0] < 4:
                    continue  # the unbiased estimator needs 4 samples; a tiny last batch adds nothing
                accumulator.update([cap_a[n] for n in layers_a], [cap_b[n] for n in layers_b])
            else:
                for (a, b), m in moments.items():
                    if _comparable(cap_a[a], cap_b[b], group):
                        m.update(cap_a[a], cap_b[b])
            seen += x.shape[0]
    if seen == 0:
        raise ValueError("loader produced no usable batch")
    rows = []
    values = accumulator.value() if measure == "cka" else None
    for i, a in enumerate(layers_a):
        for j, b in enumerate(layers_b):
            if measure == "cka":
                value = float(values[i, j])
            else:  # NaN where the pair cannot be compared (channel or position counts differ)
                value = moments[(a, b)].procrustes(group)[0] if moments[(a, b)].count else float("nan")
            rows.append({"layer_a": a, "layer_b": b, "value": value})
    return pd.DataFrame(rows)
