"""The seed 004 authors' dissimilarity measures (pnnl/modelsym, not on PyPI;
their conventions read in the authors' code): `wreath_cka`, `wreath_procrustes`,
`ortho_cka`, `ortho_procrustes`, with their call shapes (lists of
whole-dataset features per layer, `dims` naming each side's channel axis)
and normalisations, computed by spectral_ext in float64.

- wreath_cka / ortho_cka: each channel centred over samples and positions
  (centered=True) and divided by its L2 norm; the max over channels of the
  per-channel inner products (estimator="max", or "median") / the linear
  kernel of the flattened features; Song et al.'s unbiased HSIC on the
  whole data; every layer pair.
- wreath_procrustes: no centring, each channel divided by its L2 norm, the
  Hungarian assignment on the channel cross-Gram, 1 - sqrt((|X~|^2 + |Y~|^2
  - 2 sum C[I, J]) / (4 C)) (definition 5.2's 1 - delta / (2 sqrt(d)));
  ortho_procrustes: unit Frobenius norms, 1 - sqrt(2 - 2 |C|_*) / 2 (D.7.1).
  Mismatched spatial sizes are upsampled (nearest, integer factor),
  mismatched channel counts zero-padded, zero channels stay zero, as theirs.

Deliberate differences: perfect alignment gives 1 (their square root of a
rounding-negative number gives NaN); with diagonly=True the pairs not
computed are NaN (theirs hold 1 - 0 = 1, indistinguishable from perfect
alignment); nothing is printed, the inputs are never modified (their CKA
centres the caller's tensors in place)."""
from __future__ import annotations

import math

import torch

from .._ops import max_kernel_gram
from ..similarity._hsic import _cka_from_hsic, hsic
from ..similarity._layout import as_channels, channel_normalize
from ..similarity._procrustes import CrossMoments, _assignment, _rounded_gap, procrustes


def _features(name: str, H, axis: int) -> torch.Tensor:
    if isinstance(H, (list, tuple)):  # batched=True: a layer's batches
        H = torch.cat(list(H), dim=0)
    if not isinstance(H, torch.Tensor) or H.dim() < 2:
        raise TypeError(f"{name} must hold feature tensors (N, C, ...), got {type(H).__name__}")
    return as_channels(name, H.detach().to(torch.float64).movedim(axis, 1), 1)


def _check_lists(features1, features2):
    for name, f in (("features1", features1), ("features2", features2)):
        if isinstance(f, torch.Tensor) or not len(f):
            raise TypeError(f"{name} must be a non-empty list of per-layer feature tensors")


def _kernel(H: torch.Tensor, centered: bool, estimator: str) -> torch.Tensor:
    Hn = channel_normalize(H, centered=centered)
    if estimator == "max":
        return max_kernel_gram(Hn.contiguous())
    if estimator == "median":
        # torch.median takes the lower of the two middle values, as their code does
        per_channel = torch.einsum("ics,jcs->ijc", Hn, Hn)
        return per_channel.median(dim=-1).values
    if estimator == "linear":
        flat = Hn.reshape(Hn.shape[0], -1)
        return flat @ flat.T
    raise ValueError(f"estimator must be 'max' or 'median', got {estimator!r}")


def _cka_all(features1, features2, centered, estimator, dims):
    _check_lists(features1, features2)
    Ks = torch.stack([_kernel(_features(f"features1[{i}]", H, dims[0]), centered, estimator)
                      for i, H in enumerate(features1)])
    Ls = torch.stack([_kernel(_features(f"features2[{i}]", H, dims[1]), centered, estimator)
                      for i, H in enumerate(features2)])
    if Ks.shape[-1] != Ls.shape[-1]:
        raise ValueError(f"features1 and features2 must hold the same samples, got {Ks.shape[-1]} and "
                         f"{Ls.shape[-1]}")
    cka, bad_x, bad_y = _cka_from_hsic(hsic(Ks, Ls), torch.diagonal(hsic(Ks, Ks)), torch.diagonal(hsic(Ls, Ls)))
    bad = [f"features1[{i}]" for i in range(len(bad_x)) if bad_x[i]] + \
        [f"features2[{j}]" for j in range(len(bad_y)) if bad_y[j]]
    if bad:
        raise ValueError(f"CKA is undefined for {bad}: constant features (HSIC(K, K) is not positive)")
    return cka.to(torch.float32)


def wreath_cka(features1, features2, centered: bool = True, estimator: str = "max", dims=(1, 1),
               device=torch.device("cpu"), progress: bool = True, batched: bool = False) -> torch.Tensor:
    """G_ReLU-CKA (definition 5.3, D.7.2) of every layer pair: (L1, L2)."""
    return _cka_all(features1, features2, centered, estimator, dims)


def ortho_cka(features1, features2, centered: bool = True, dims=(1, 1), device=torch.device("cpu"),
              progress: bool = True, batched: bool = False) -> torch.Tensor:
    """The authors' orthogonal CKA: linear CKA of channel-normalised
    features, every layer pair: (L1, L2)."""
    return _cka_all(features1, features2, centered, "linear", dims)


def _matched(H1: torch.Tensor, H2: torch.Tensor):
    """Their alignment of two layers: the smaller spatial map upsampled by
    nearest neighbours (integer factor of the last axis), the smaller channel
    count zero-padded. H: (N, C, H, W) or (N, C, S)."""
    if H1.shape[-1] != H2.shape[-1]:
        small, large = sorted([H1, H2], key=lambda x: x.shape[-1])
        factor = large.shape[-1] // small.shape[-1]
        up = small.repeat_interleave(factor, dim=-1)
        if small.dim() == 4:
            up = up.repeat_interleave(factor, dim=-2)
        up = up[..., :large.shape[-2], :large.shape[-1]] if small.dim() == 4 else up[..., :large.shape[-1]]
        H1, H2 = (up, large) if small is H1 else (large, up)
    if H1.shape[1] != H2.shape[1]:
        small, large = sorted([H1, H2], key=lambda x: x.shape[1])
        pad = small.new_zeros((small.shape[0], large.shape[1] - small.shape[1]) + small.shape[2:])
        padded = torch.cat([small, pad], dim=1)
        H1, H2 = (padded, large) if small is H1 else (large, padded)
    return H1.reshape(H1.shape[0], H1.shape[1], -1), H2.reshape(H2.shape[0], H2.shape[1], -1)


def _raw(name, H, axis):
    if isinstance(H, (list, tuple)):
        H = torch.cat(list(H), dim=0)
    if not isinstance(H, torch.Tensor) or H.dim() < 2:
        raise TypeError(f"{name} must hold feature tensors (N, C, ...), got {type(H).__name__}")
    as_channels(name, H.movedim(axis, 1), 1)  # validation only
    return H.detach().to(torch.float64).movedim(axis, 1)


def _procrustes_all(features1, features2, diagonly, dims, pair):
    _check_lists(features1, features2)
    out = torch.full((len(features1), len(features2)), float("nan"))
    for i, H1 in enumerate(features1):
        for j, H2 in enumerate(features2):
            if diagonly and i != j:
                continue
            X, Y = _matched(_raw(f"features1[{i}]", H1, dims[0]), _raw(f"features2[{j}]", H2, dims[1]))
            if X.shape[0] != Y.shape[0]:
                raise ValueError(f"features1[{i}] and features2[{j}] must hold the same samples")
            out[i, j] = pair(X, Y)
    return out


def _wreath_pair(X, Y):
    moments = CrossMoments()
    moments.update(X, Y)
    nx, ny = moments.a.norms2(False), moments.b.norms2(False)
    safe = lambda n: torch.where(n > 0, n.sqrt(), torch.ones_like(n))  # a zero channel stays zero
    normalised = moments.cross(False) / torch.outer(safe(nx), safe(ny))
    rows, cols = _assignment(normalised)
    sq_x, sq_y = float((nx > 0).sum()), float((ny > 0).sum())  # |X~|^2: one per non-zero channel
    gap = sq_x + sq_y - 2.0 * float(normalised[rows, cols].sum())
    return 1.0 - math.sqrt(_rounded_gap(gap, sq_x + sq_y) / (4 * X.shape[1]))


def _ortho_pair(X, Y):
    return procrustes(X, Y, "orthogonal", centered=False, feature_axis=1)


def wreath_procrustes(features1, features2, diagonly: bool = True, dims=(1, 1), device=torch.device("cpu"),
                      progress: bool = True, batched: bool = False) -> torch.Tensor:
    """G_ReLU-Procrustes (definition 5.2): (L1, L2), NaN where not computed."""
    return _procrustes_all(features1, features2, diagonly, dims, _wreath_pair)


def ortho_procrustes(features1, features2, diagonly: bool = True, dims=(1, 1), device=torch.device("cpu"),
                     progress: bool = True, batched: bool = False) -> torch.Tensor:
    """Orthogonal Procrustes (D.7.1), channels rotated: (L1, L2), NaN where
    not computed."""
    return _procrustes_all(features1, features2, diagonly, dims, _ortho_pair)
