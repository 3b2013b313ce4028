"""The orthogonal and G_ReLU Procrustes measures (seed 004 definition 5.2,
appendix D.7.1) and the G_ReLU alignment that starts stitching (D.2.1)."""
from __future__ import annotations

import math

import torch

from .. import _moments
from .._ops import linear_sum_assignment
from ._layout import _exponent, _pair, _rescaled, _scaled

GROUPS = ("orthogonal", "grelu")


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


def _aligned(crosses: torch.Tensor, group: str) -> list[tuple[float, float]]:
    """(similarity, distance) of each cross product X~'Y~ in crosses (B,
    C_x, C_y) of normalised representations (unit Frobenius norm for
    "orthogonal", unit channels for "grelu"): the best alignment <X~, Y~ Q>
    is the nuclear norm (D.7.1, [DDS21a]) or the optimal assignment's sum
    (definition 5.2, solved as on D.2), every problem of the batch at once."""
    if group == "orthogonal":
        return [_procrustes_measure(v, 1.0) for v in torch.linalg.svdvals(crosses).sum(-1).tolist()]
    picked, cols = _assignment(crosses)
    best = crosses[torch.arange(crosses.shape[0], device=crosses.device)[:, None], picked, cols].sum(-1)
    return [_procrustes_measure(v, crosses.shape[-1]) for v in best.tolist()]  # |X~|^2 = |Y~|^2 = d


def _procrustes_from(cross, nx, ny, group):
    """(similarity, distance) from X'Y and the channels' squared norms."""
    if group == "orthogonal":
        # D.7.1 / [DDS21a]: unit Frobenius norm; min_Q |X - Y Q|^2 = 2 - 2 |X'Y|_*
        scale = math.sqrt(float(nx.sum()) * float(ny.sum()))
        if scale == 0:
            raise ValueError("X or Y is zero (constant, when centred): the Procrustes measure is undefined")
        return _aligned((cross / scale)[None], group)[0]
    if group == "grelu":
        if cross.shape[0] != cross.shape[1]:
            raise ValueError(f"G_ReLU-Procrustes needs equal channel counts, got {cross.shape[0]} and "
                             f"{cross.shape[1]}")
        if bool((nx == 0).any()) or bool((ny == 0).any()):
            raise ValueError("a channel of X or Y is zero (constant, when centred): D_X^{-1} of definition 5.2 "
                             "does not exist and the measure is undefined")
        return _aligned((cross / torch.outer(nx.sqrt(), ny.sqrt()))[None], group)[0]
    raise ValueError(f"group must be one of {GROUPS}, got {group!r}")


def _assignment(score: torch.Tensor):
    """The permutation maximising the sum of score[i, perm[i]] (Hungarian
    algorithm): (rows, cols) index tensors."""
    return linear_sum_assignment(score.detach().to(torch.float64), maximize=True)


def grelu_assignment(X: torch.Tensor, Y: torch.Tensor, centered: bool = False,
                     feature_axis: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The G_ReLU-Procrustes alignment of definition 5.2: a channel permutation and non-negative scales.

    Y[:, i] ~ scale[i] X[:, perm[i]], with the least-squares scale of the matched channels (a zero
    channel of X keeps scale 1). Used to start G_ReLU stitching (seed 004 D.2.1) where Theorem 4.2 says
    an exact twin exists.

    Args:
        X: (N, d), (N, C, H, W), or (N, tokens, features) with feature_axis.
        Y: the same N samples with as many channels as X.
        centered: subtract each channel's mean first (default False).
        feature_axis: the axis that holds the channels (default None: axis 1; a 3-D input must say).

    Returns:
        (perm, scale): perm an int64 tensor (C,) of X's channel for each of Y's, scale a tensor (C,) >= 0.
    """
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
    """Procrustes similarity in [0, 1] (1 = aligned) of representations X, Y.

    Seed 004 definition 5.2 and appendix D.7.1; channels transformed, positions not. group="grelu":
    definition 5.2, 1 - delta / (2 sqrt(d)) with delta = min over permutations P of |X~ - Y~ P|,
    X~ = X D_X^{-1} the channel-normalised X (norms over samples and positions), solved as a linear sum
    assignment on (D.2). group="orthogonal": X, Y scaled to unit Frobenius norm and
    delta = min over orthogonal Q = sqrt(2 - 2 |X'Y|_*) (appendix D.7.1, [DDS21a]), so 1 - delta / 2.
    Neither centres (the definitions and the authors' code); centered=True subtracts each channel's mean
    first. Both are clamped so that perfect alignment gives exactly 1 (the seed code returns NaN there).
    Both measures are scale invariant, at any scale: X or Y whose squares would overflow or underflow is
    divided by a power of two first.

    Args:
        X: (N, d), (N, C, H, W), or (N, tokens, features) with feature_axis.
        Y: the same N samples, in one of X's layouts.
        group: "orthogonal" or "grelu" (default "orthogonal").
        return_distance: must stay False: True (a tuple) is refused, one return type per function; delta
            itself is procrustes_distance.
        centered: subtract each channel's mean first (default False).
        feature_axis: the axis that holds the channels (default None: axis 1; a 3-D input must say).

    Returns:
        The similarity, a float in [0, 1].
    """
    if return_distance is not False:
        raise TypeError("procrustes(return_distance=True) is gone: procrustes returns the similarity (a float); "
                        "call procrustes_distance(X, Y, ...) for delta")
    return _procrustes_pair(X, Y, group, centered, feature_axis)[0]


def procrustes_distance(X: torch.Tensor, Y: torch.Tensor, group: str = "orthogonal", centered: bool = False,
                        feature_axis: int | None = None) -> float:
    """The Procrustes distance delta that procrustes turns into a similarity.

    Seed 004 definition 5.2 (group="grelu", in [0, 2 sqrt(d)]) or appendix D.7.1 (group="orthogonal",
    in [0, 2]).

    Args:
        X: (N, d), (N, C, H, W), or (N, tokens, features) with feature_axis.
        Y: the same N samples, in one of X's layouts.
        group: "orthogonal" or "grelu" (default "orthogonal").
        centered: subtract each channel's mean first (default False).
        feature_axis: the axis that holds the channels (default None: axis 1; a 3-D input must say).

    Returns:
        delta, a float.
    """
    return _procrustes_pair(X, Y, group, centered, feature_axis)[1]


# ---------------------------------------------------------------------------------------------
