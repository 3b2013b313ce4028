"""The one streaming-moment accumulator: running sums over samples, kept in
float64, of one representation (count, per-feature sums, second moments)
and of a pair (their cross products). covariance.activation_covariance
(seed 002 compute_activation_covariances) and the Procrustes measures of
similarity (seed 004 D.2, D.7.1) both read their statistics from it.

A representation is (n, C) (rows are samples) or (N, C, S) (channels with
S positions each; every position counts as a sample, as in seed 004 D.7)."""
from __future__ import annotations

import torch


def rows(x: torch.Tensor) -> torch.Tensor:
    """(n, C) as is; (N, C, S) -> (N S, C), a view when S = 1."""
    if x.dim() == 2:
        return x
    return x[:, :, 0] if x.shape[2] == 1 else x.transpose(1, 2).reshape(-1, x.shape[1])


class Moments:
    """count, sum (C,) and second (the (C, C) sum of x x^T with full=True,
    its diagonal, the squared norms, otherwise), in float64. Products run in
    `dtype` (None: the input's own; the sums stay float64 either way)."""

    def __init__(self, full: bool = True, dtype: torch.dtype | None = None):
        self.full, self.dtype = full, dtype
        self.count = 0
        self.sum = self.second = None

    def cast(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.dtype is None else x.to(self.dtype)

    def update(self, x: torch.Tensor) -> None:
        x = self.cast(x)
        if x.dim() == 3 and not self.full:  # per-channel sums need no (N S, C) copy
            self._add(x.sum((0, 2)), x.square().sum((0, 2)), x.shape[0] * x.shape[2], x.shape[1], x.device)
        else:
            self.add_rows(rows(x))

    def add_rows(self, x: torch.Tensor) -> None:
        """x (n, C), already in the product dtype."""
        self._add(x.sum(0), x.T @ x if self.full else x.square().sum(0), x.shape[0], x.shape[1], x.device)

    def _add(self, sums, second, n, C, device) -> None:
        if self.sum is None:
            self.sum = torch.zeros(C, dtype=torch.float64, device=device)
            self.second = torch.zeros((C, C) if self.full else (C,), dtype=torch.float64, device=device)
        elif C != self.sum.shape[0]:
            raise ValueError(f"a batch has {C} channels (features), earlier ones {self.sum.shape[0]}")
        # torch sums float32 pairwise: accurate, and 20x faster than dtype=float64; in place, promoted to
        # float64: no float64 temporary of the Gram
        self.sum.add_(sums)
        self.second.add_(second)
        self.count += n

    def norms2(self, centered: bool = False) -> torch.Tensor:
        """Squared feature norms over the samples, of the centred features when centered."""
        squares = self.second.diagonal() if self.full else self.second
        if not centered:
            return squares
        return (squares - self.sum.square() / self.count).clamp_min(0)


class CrossMoments:
    """The cross products sum x y^T of two representations of the same
    samples, with each side's Moments: its own, or shared ones that the
    caller updates once per batch for many pairs (a, b given)."""

    def __init__(self, a: Moments | None = None, b: Moments | None = None, full: bool = False,
                 dtype: torch.dtype | None = None):
        self.own = a is None
        self.a = Moments(full, dtype) if a is None else a
        self.b = Moments(full, dtype) if b is None else b
        self.dtype = dtype
        self.ab = None
        self.count = 0

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if x.dim() == 3 and y.dim() == 3 and (x.shape[0] != y.shape[0] or x.shape[2] != y.shape[2]):
            raise ValueError(f"X and Y must have the same samples and positions, got {tuple(x.shape)} and "
                             f"{tuple(y.shape)} (N, C, positions)")
        x = rows(x if self.dtype is None else x.to(self.dtype))
        y = rows(y if self.dtype is None else y.to(self.dtype))
        self.add_rows(x, y)

    def add_rows(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """x (n, C_x), y (n, C_y), already in the product dtype."""
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"the two representations hold {x.shape[0]} and {y.shape[0]} samples: "
                             "they must come from the same inputs with the same spatial layout")
        if self.own:
            self.a.add_rows(x)
            self.b.add_rows(y)
        cross = x.T @ y
        if self.ab is None:
            self.ab = torch.zeros(cross.shape, dtype=torch.float64, device=cross.device)
        self.ab.add_(cross)
        self.count += x.shape[0]

    def cross(self, centered: bool = False) -> torch.Tensor:
        """sum x y^T, or of the centred features."""
        if not centered:
            return self.ab
        return self.ab - torch.outer(self.a.sum, self.b.sum) / self.a.count
