"""Model stitching (seed 004 section 4 and appendix D.2): S = b_{>l} o phi o
a_{<=l} with phi a channel map (a 1x1 convolution on conv features) that is
full, reduced rank, in G_ReLU (P D over the Birkhoff polytope, D.2.1),
SoftSort-parameterised (D.2.2) or l1-regularised (D.6). Only phi trains.
The channel axis is axis 1 for conv features and the last axis for token
features (N, tokens, features) after a Linear (issue 14.1: read from the
layer, or `feature_axis=`)."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import nn

from . import _checks
from ._data import accuracy as _accuracy
from ._data import batches, check_labels, recompute_batchnorm
from ._ops import linear_sum_assignment, sinkhorn
from .similarity import grelu_assignment, layer_feature_axis

KINDS = ("affine", "lowrank", "grelu", "softsort", "l1")
INITS = ("procrustes", "uniform")


class _ChannelMap(nn.Module):
    """A map of the channels on `axis` (1: a 1x1 convolution for (N, C, H,
    W), a Linear for (N, C); -1: a Linear on the features of (N, tokens,
    features))."""

    axis = 1

    def apply(self, matrix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tensordot(x, matrix, dims=([self.axis], [1])).movedim(-1, self.axis)


class FullStitch(_ChannelMap):
    """phi(y) = W y (+ b): all linear maps of channels (affine with bias=True;
    the paper omits the bias, appendix D.2). Starts at the identity."""

    def __init__(self, channels: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.eye(channels))
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None

    def matrix(self) -> torch.Tensor:
        return self.weight

    def forward(self, y):
        out = self.apply(self.weight, y)
        if self.bias is not None:
            out = out + self.bias.reshape([-1 if i == self.axis % y.dim() else 1 for i in range(y.dim())])
        return out


class LowRankStitch(_ChannelMap):
    """phi = B A with A: C -> r, B: r -> C, as two 1x1 convolutions (D.2)."""

    def __init__(self, channels: int, rank: int, generator=None):
        super().__init__()
        q = torch.linalg.qr(torch.randn(channels, rank, generator=generator))[0]
        self.down = nn.Parameter(q.T.clone())
        self.up = nn.Parameter(q.clone())

    def matrix(self) -> torch.Tensor:
        return self.up @ self.down

    def forward(self, y):
        return self.apply(self.up, self.apply(self.down, y))


class GReLUStitch(_ChannelMap):
    """phi = P D (appendix D.2.1): P doubly stochastic while training (kept in
    the Birkhoff polytope by project()), D = diag(lambda) >= 0. After
    harden(), P is the permutation closest to it (Hungarian algorithm,
    argmax_Q tr(P Q^T), spectral_ext.linear_sum_assignment)."""

    def __init__(self, channels: int, generator=None):
        super().__init__()
        start = 1.0 / channels + 0.01 / channels * torch.rand(channels, channels, generator=generator)
        self.P = nn.Parameter(sinkhorn(start, 16))
        self.D = nn.Parameter(torch.ones(channels))
        self.register_buffer("hard", torch.zeros(0, dtype=torch.long))

    def permutation_matrix(self) -> torch.Tensor:
        if self.hard.numel():
            return torch.zeros_like(self.P).scatter_(1, self.hard[:, None], 1.0)
        return self.P

    def matrix(self) -> torch.Tensor:
        return self.permutation_matrix() * self.D[None, :]

    def forward(self, y):
        return self.apply(self.matrix(), y)

    @torch.no_grad()
    def start_at(self, perm: torch.Tensor, scale: torch.Tensor) -> None:
        """P[i, perm[i]] = 1 and D[perm[i]] = scale[i]: phi(y)_i = scale[i]
        y[perm[i]], the G_ReLU-Procrustes alignment of the two layers."""
        self.P.copy_(torch.zeros_like(self.P).scatter_(1, perm[:, None].to(self.P.device), 1.0))
        self.D.zero_().index_copy_(0, perm.to(self.D.device), scale.to(self.D))

    @torch.no_grad()
    def project(self, iters: int = 16) -> None:
        """P <- sink(ReLU(P)) and D <- ReLU(D) after each step. ReLU is a clamp
        at 1e-12 so that no row or column of P can vanish entirely (Sinkhorn
        cannot normalise an all-zero row)."""
        self.P.copy_(sinkhorn(self.P.clamp_min(1e-12), iters))
        self.D.clamp_(min=0)

    @torch.no_grad()
    def harden(self) -> None:
        rows, cols = linear_sum_assignment(self.P.detach().double(), maximize=True)
        self.hard = cols[rows.argsort()].to(device=self.P.device, dtype=torch.long)


class SoftSortStitch(_ChannelMap):
    """phi = P D with P = SoftSort(s, tau) = softmax(-|sort(s) 1^T - 1 s^T| /
    tau) over rows ([PE20] as in appendix D.2.2; the |.| is PE20's distance)
    and D = diag(exp(lambda)). tau ~ 1 / C. harden(): the permutation that
    sorts s (the rows' argmax as tau -> 0)."""

    def __init__(self, channels: int, tau: float | None = None, generator=None):
        super().__init__()
        self.s = nn.Parameter(torch.randn(channels, generator=generator) * 0.1)
        self.log_d = nn.Parameter(torch.zeros(channels))
        self.tau = 1.0 / channels if tau is None else float(tau)
        self.register_buffer("hard", torch.zeros(0, dtype=torch.long))

    def permutation_matrix(self) -> torch.Tensor:
        if self.hard.numel():
            return torch.zeros(len(self.s), len(self.s), device=self.s.device).scatter_(1, self.hard[:, None], 1.0)
        sorted_s = self.s.sort(descending=True).values
        return torch.softmax(-(sorted_s[:, None] - self.s[None, :]).abs() / self.tau, dim=1)

    def matrix(self) -> torch.Tensor:
        return self.permutation_matrix() * self.log_d.exp()[None, :]

    def forward(self, y):
        return self.apply(self.matrix(), y)

    @torch.no_grad()
    def harden(self) -> None:
        self.hard = self.s.argsort(descending=True)


def sparsity(matrix: torch.Tensor, tau: float = 1e-3) -> float:
    """Appendix D.1: the fraction of entries with |W_ij| <= tau."""
    return float((matrix.abs() <= tau).double().mean())


class _Stop(Exception):
    pass


class StitchedModel(nn.Module):
    """S(f, f~, l, phi) = f~_{>l} o phi o f_{<=l}: model_a runs up to its layer
    (and stops there), model_b runs with that layer's output replaced by
    phi of model_a's. Both models are frozen copies."""

    def __init__(self, model_a: nn.Module, model_b: nn.Module, layer_a: str, layer_b: str, phi: nn.Module):
        super().__init__()
        object.__setattr__(self, "_names", (type(model_a).__name__, type(model_b).__name__))
        self.model_a, self.model_b, self.phi = model_a, model_b, phi
        self.layer_a, self.layer_b = layer_a, layer_b
        for p in list(model_a.parameters()) + list(model_b.parameters()):
            p.requires_grad_(False)

    def features_a(self, x):
        captured = {}

        def hook(module, args, output):
            captured["y"] = output
            raise _Stop

        handle = self.model_a.get_submodule(self.layer_a).register_forward_hook(hook)
        try:
            self.model_a(x)
        except _Stop:
            pass
        finally:
            handle.remove()
        if "y" not in captured:
            raise ValueError(f"layer {self.layer_a!r} did not run in model_a's forward pass")
        return captured["y"]

    def forward(self, x):
        y = self.phi(self.features_a(x))
        handle = self.model_b.get_submodule(self.layer_b).register_forward_hook(lambda m, a, o: y)
        try:
            return self.model_b(x)
        finally:
            handle.remove()

    def __repr__(self) -> str:
        # one line: the default repr prints both whole models (issue 18)
        a, b = self._names
        return f"StitchedModel({a}[..{self.layer_a!r}] -> {self.phi!r} -> {b}[{self.layer_b!r}..])"

    def train(self, mode: bool = True):
        # the frozen models stay in eval mode (BatchNorm statistics untouched) while phi trains
        super().train(mode)
        self.model_a.eval()
        self.model_b.eval()
        return self


@dataclass
class StitchResult:
    """model: the stitched model (phi hardened for G_ReLU and SoftSort); curve:
    epoch, loss, accuracy on the training batches; accuracies on the test
    data when given and the stitching penalty (equation 4.3):
    (Acc(a) + Acc(b)) / 2 - Acc(S); matrix: phi's channel matrix; sparsity:
    appendix D.1 at tau = 1e-3; permutation for G_ReLU and SoftSort (phi =
    P D with P[i, permutation[i]] = 1); recalibrated: whether model_b's
    BatchNorm statistics were recomputed after rounding (D.2.1). The repr is
    one line per field: the models appear by class name only."""
    model: StitchedModel
    curve: pd.DataFrame = field(repr=False)
    matrix: torch.Tensor = field(repr=False)
    sparsity: float
    accuracy_a: float | None = None
    accuracy_b: float | None = None
    accuracy: float | None = None
    penalty: float | None = None
    permutation: torch.Tensor | None = field(default=None, repr=False)
    recalibrated: bool = False


def _train_batches(data, batch_size, generator, classes=None):
    for x, y in batches(data, batch_size, generator, name="train_data", labels=True):
        if classes is not None:
            check_labels(y, classes, "train_data")
        yield x, y


def stitching_penalty(accuracy_a: float, accuracy_b: float, accuracy_stitched: float) -> float:
    """Equation 4.3: (Acc(f) + Acc(f~)) / 2 - Acc(S(f, f~, l, phi))."""
    return (accuracy_a + accuracy_b) / 2 - accuracy_stitched


def _check_finite_model(name: str, model: nn.Module) -> None:
    bad = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise ValueError(f"{name} has NaN or infinite weights in {bad[:5]}: it cannot be stitched")


def _channels_at(model, layer, x):
    captured = {}
    handle = model.get_submodule(layer).register_forward_hook(lambda m, a, o: captured.setdefault("y", o))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    if "y" not in captured:
        raise ValueError(f"layer {layer!r} did not run in the forward pass")
    y = captured["y"]
    if not isinstance(y, torch.Tensor) or y.dim() < 2:
        raise ValueError(f"layer {layer!r} must output (N, C) or (N, C, H, W) features, got {type(y).__name__}")
    return y


def _stitch_axis(model, layer, y, feature_axis) -> int:
    if feature_axis is not None:
        if isinstance(feature_axis, bool) or not isinstance(feature_axis, int) or \
                not -y.dim() <= feature_axis < y.dim() or feature_axis % y.dim() == 0:
            raise ValueError(f"feature_axis must name a non-sample axis of the layer's {y.dim()}-D output, "
                             f"got {feature_axis!r}")
        return feature_axis % y.dim()
    if y.dim() == 2:
        return 1
    axis = layer_feature_axis(model, layer)
    if axis is None:
        if y.dim() == 3:
            raise ValueError(f"layer {layer!r} gives 3-D features {tuple(y.shape)} and nothing in the model says "
                             "which axis holds the channels: pass feature_axis=1 (conv) or -1 (tokens)")
        axis = 1
    return axis % y.dim()


def stitch(model_a: nn.Module, model_b: nn.Module, layer: str, kind: str = "affine", train_data=None,
           test_data=None, layer_b: str | None = None, epochs: int = 20, lr: float = 1e-3,
           momentum: float = 0.9, batch_size: int = 32, rank: int | None = None, alpha: float = 0.1,
           head_start: int | None = None, l1: float = 0.01, tau: float | None = None, bias: bool = False,
           seed: int = 0, progress: bool = True, init: str = "procrustes",
           feature_axis: int | None = None, recalibrate: bool | None = None) -> StitchResult:
    """Train a stitching layer phi from model_a's `layer` to model_b's
    (`layer_b`, default the same name) on train_data, (x, y) tensors or a
    loader of (x, y) batches, with SGD (lr, momentum; appendix D.2) on cross-entropy.

    kind: "affine" (all channel maps, bias optional), "lowrank" (rank r),
    "grelu" (P D: projected gradient with ReLU + Sinkhorn T = 16 after every
    step, the -alpha |P|_2 regulariser, D fixed at its start for the first
    head_start epochs (default half), Hungarian rounding, then a
    no-gradient pass to recalibrate BatchNorm statistics, D.2.1; init=
    "procrustes" (default) starts P D at the G_ReLU-Procrustes alignment of
    the two layers' activations on the first 1,024 training inputs
    (definition 5.2: the matched permutation and least-squares scales), so
    an exact twin (Theorem 4.2) is found whatever its scales; "uniform" is
    the paper's start, P near 1/C and D = 1; recalibrate: recompute
    model_b's BatchNorm statistics after rounding, by default only when the
    rounding changed phi's output on the first training inputs by more than
    5% (relative norm), since otherwise the
    rounded phi is the trained one and the frozen statistics are as right as
    before, e.g. for an exact twin whose statistics do not describe the
    data), "softsort"
    (D.2.2, tau = 1/C by default) or "l1" (full with l1 * |W|_1, D.6).
    feature_axis: the channel axis of the layer's output, by default read
    from the layer (a Linear: the last axis, e.g. transformer tokens
    (N, T, F), seed 004 D.4; a conv: axis 1).
    Returns a StitchResult; with test_data the accuracies and the stitching
    penalty (equation 4.3)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if train_data is None:
        raise ValueError("train_data is required: (x, y) tensors or a loader of (x, y) batches to train phi on")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    epochs = _checks.positive_int("epochs", epochs)
    batch_size = _checks.positive_int("batch_size", batch_size)
    layer_b = layer if layer_b is None else layer_b
    for name, model, lay in (("model_a", model_a, layer), ("model_b", model_b, layer_b)):
        if not isinstance(model, nn.Module):
            raise TypeError(f"{name} must be a torch.nn.Module, got {type(model).__name__}")
        if lay not in dict(model.named_modules()) or lay == "":
            raise ValueError(f"layer {lay!r} names no submodule of {name}")
        _check_finite_model(name, model)
    generator = torch.Generator().manual_seed(seed)
    a, b = copy.deepcopy(model_a).eval(), copy.deepcopy(model_b).eval()
    first = next(iter(_train_batches(train_data, 1024, None)), None)
    if first is None:
        raise ValueError("train_data is empty: no batch to train phi on")
    x0 = first[0]
    ya, yb = _channels_at(a, layer, x0), _channels_at(b, layer_b, x0)
    with torch.no_grad():
        classes = b(x0).shape[-1]
    if ya.shape[1:] != yb.shape[1:]:
        raise ValueError(f"model_a's {layer!r} gives features {tuple(ya.shape[1:])} but model_b's {layer_b!r} "
                         f"expects {tuple(yb.shape[1:])}: the models cannot be stitched there")
    axis = _stitch_axis(model_a, layer, ya, feature_axis)
    channels = ya.shape[axis]
    if kind == "lowrank":
        if rank is None or not 1 <= int(rank) <= channels:
            raise ValueError(f"kind='lowrank' needs rank in [1, {channels}], got {rank!r}")
        phi = LowRankStitch(channels, int(rank), generator)
    elif kind == "grelu":
        phi = GReLUStitch(channels, generator)
    elif kind == "softsort":
        phi = SoftSortStitch(channels, tau, generator)
    else:
        phi = FullStitch(channels, bias=bias and kind == "affine")
    phi = phi.to(device=ya.device, dtype=ya.dtype)
    phi.axis = axis
    if kind == "grelu" and init == "procrustes":
        phi.start_at(*grelu_assignment(ya, yb, feature_axis=axis))
    stitched = StitchedModel(a, b, layer, layer_b, phi)
    optimizer = torch.optim.SGD(phi.parameters(), lr=lr, momentum=momentum)
    head_start = epochs // 2 if head_start is None else head_start
    from tqdm.auto import tqdm

    rows = []
    stitched.train()
    for epoch in tqdm(range(epochs), desc=f"{kind} stitching", disable=not progress, leave=False):
        if kind == "grelu":
            phi.D.requires_grad_(epoch >= head_start)
        total = correct = count = 0
        for x, y in _train_batches(train_data, batch_size, generator, classes):
            optimizer.zero_grad()
            logits = stitched(x)
            loss = nn.functional.cross_entropy(logits, y)
            objective = loss
            if kind == "grelu" and alpha:
                objective = objective - alpha * phi.P.norm()
            if kind == "l1":
                objective = objective + l1 * phi.weight.abs().sum()
            objective.backward()
            optimizer.step()
            if kind == "grelu":
                phi.project()
            total += float(loss.detach()) * len(y)
            correct += int((logits.argmax(1) == y).sum())
            count += len(y)
        if count == 0:
            raise ValueError("train data is empty")
        rows.append({"epoch": epoch + 1, "loss": total / count, "accuracy": correct / count})
    with torch.no_grad():
        soft = phi(ya) if kind == "grelu" else None
    if kind in ("grelu", "softsort"):
        phi.harden()
    stitched.eval()
    accuracies = (_accuracy(a, test_data, name="test_data"), _accuracy(b, test_data, name="test_data")) if test_data is not None else None
    if kind == "grelu":
        with torch.no_grad():
            moved = float((phi(ya) - soft).norm() / soft.norm().clamp_min(1e-30))
        if recalibrate is None:
            recalibrate = moved > 0.05
        if recalibrate:
            # D.2.1: model_b's BatchNorm statistics must describe the features the rounded phi produces; a
            # copy, so that accuracy_b stays model_b's own
            stitched.model_b = copy.deepcopy(b)
            recompute_batchnorm(stitched.model_b, stitched.forward, train_data, batch_size)
    with torch.no_grad():
        matrix = phi.matrix().detach().clone()
    result = StitchResult(stitched, pd.DataFrame(rows), matrix, sparsity(matrix),
                          permutation=phi.hard.clone() if kind in ("grelu", "softsort") else None,
                          recalibrated=bool(kind == "grelu" and recalibrate))
    if test_data is not None:
        result.accuracy_a, result.accuracy_b = accuracies
        result.accuracy = _accuracy(stitched, test_data, name="test_data")
        result.penalty = stitching_penalty(result.accuracy_a, result.accuracy_b, result.accuracy)
    return result
