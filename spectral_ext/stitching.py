"""Model stitching (seed 004 section 4 and appendix D.2): S = b_{>l} o phi o
a_{<=l} with phi a channel map (a 1x1 convolution on conv features) that is
full, reduced rank, in G_ReLU (P D over the Birkhoff polytope, D.2.1),
SoftSort-parameterised (D.2.2) or l1-regularised (D.6). Only phi trains.
The channel axis is axis 1 for conv features and the last axis for token
features (N, tokens, features) after a Linear (read from the
layer, or `feature_axis=`). Transformers models stitch too: keyword inputs
(a dict {"input_ids": ..., "attention_mask": ...}, both models see the same
batch, run as model(**inputs)), layers that return tuples or Hugging Face
outputs (the hidden states, their first tensor, are mapped; the rest is
kept), classifiers whose output holds .logits."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import nn

from . import _checks
from ._data import accuracy as _accuracy
from ._data import batches, call, check_keywords, check_labels, logits_of, recompute_batchnorm, sample_count
from ._hooks import first_tensor, layer_output, replacing, with_first_tensor
from ._ops import linear_sum_assignment, sinkhorn
from .similarity import grelu_assignment, layer_feature_axis
from .symmetry import ChannelMap

KINDS = ("affine", "lowrank", "grelu", "softsort", "l1")
INITS = ("procrustes", "uniform")


class FullStitch(ChannelMap):
    """phi(y) = W y (+ b): all linear maps of channels (affine with bias=True;
    the paper omits the bias, seed 004 appendix D.2). Starts at the identity."""

    def __init__(self, channels: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.eye(channels))
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None

    def matrix(self) -> torch.Tensor:
        return self.weight

    def forward(self, y):
        out = self.map_channels(self.weight, y)
        if self.bias is not None:
            out = out + self.bias.reshape([-1 if i == self.axis % y.dim() else 1 for i in range(y.dim())])
        return out


class LowRankStitch(ChannelMap):
    """phi = B A with A: C -> r, B: r -> C, as two 1x1 convolutions (seed 004 appendix D.2)."""

    def __init__(self, channels: int, rank: int, generator=None):
        super().__init__()
        q = torch.linalg.qr(torch.randn(channels, rank, generator=generator))[0]
        self.down = nn.Parameter(q.T.clone())
        self.up = nn.Parameter(q.clone())

    def matrix(self) -> torch.Tensor:
        return self.up @ self.down

    def forward(self, y):
        return self.map_channels(self.up, self.map_channels(self.down, y))


class GReLUStitch(ChannelMap):
    """phi = P D (seed 004 appendix D.2.1): P doubly stochastic while training (kept in
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


class SoftSortStitch(ChannelMap):
    """phi = P D with P = SoftSort(s, tau) = softmax(-|sort(s) 1^T - 1 s^T| /
    tau) over rows ([PE20] as in seed 004 appendix D.2.2; the |.| is PE20's distance)
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

    @torch.no_grad()
    def harden(self) -> None:
        self.hard = self.s.argsort(descending=True)


def sparsity(matrix: torch.Tensor, tau: float = 1e-3) -> float:
    """Seed 004 appendix D.1: the fraction of entries with |W_ij| <= tau.

    Args:
        matrix: the matrix W (any shape).
        tau: the magnitude threshold (default 1e-3).

    Returns:
        A float in [0, 1].
    """
    return float((matrix.abs() <= tau).double().mean())


class StitchedModel(nn.Module):
    """S(f, f~, l, phi) = f~_{>l} o phi o f_{<=l} (seed 004 section 4):
    model_a (f) runs up to its layer (and stops there), model_b (f~) runs
    with that layer's output replaced by phi of model_a's. Both models are
    frozen copies."""

    def __init__(self, model_a: nn.Module, model_b: nn.Module, layer_a: str, layer_b: str, phi: nn.Module):
        super().__init__()
        object.__setattr__(self, "_names", (type(model_a).__name__, type(model_b).__name__))
        self.model_a, self.model_b, self.phi = model_a, model_b, phi
        self.layer_a, self.layer_b = layer_a, layer_b
        for p in list(model_a.parameters()) + list(model_b.parameters()):
            p.requires_grad_(False)

    def features_a(self, x):
        """f_{<=l}(x): model_a's hidden states at layer_a (the first tensor of a tuple output)."""
        return _hidden_states(layer_output(self.model_a, self.layer_a, x, name="model"), self.layer_a, "model")

    def forward(self, x=None, **inputs):
        """model_b's output (its logits, or its Hugging Face output) on x, a
        tensor or a dict of keyword inputs (or the keywords themselves, as
        the models take them: stitched(input_ids=...)), with layer_b's
        hidden states replaced by phi of model_a's."""
        if inputs:
            if x is not None:
                raise TypeError("StitchedModel takes its inputs as one tensor or dict, or as keywords, not both")
            x = inputs
        mapped = self.phi(self.features_a(x))
        with replacing(self.model_b, self.layer_b, lambda module, args, output: with_first_tensor(output, mapped)):
            return call(self.model_b, x)

    def __repr__(self) -> str:
        # one line: the default repr prints both whole models
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
    """What stitch() found (seed 004 section 4, appendix D). model: the
    stitched model (phi hardened for G_ReLU and SoftSort); curve: epoch, loss, accuracy on the training batches; accuracies on the test
    data when given and the stitching penalty (equation 4.3):
    (Acc(a) + Acc(b)) / 2 - Acc(S); matrix: phi's channel matrix; sparsity:
    appendix D.1 at tau = 1e-3; permutation for G_ReLU and SoftSort (phi =
    P D with P[i, permutation[i]] = 1); recalibrated: whether model_b's
    BatchNorm statistics were recomputed after rounding (D.2.1). The repr is
    one line per field: the models appear by class name only. layer,
    other_layer, kind: where and how it stitched."""
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
    layer: str | None = None
    other_layer: str | None = None
    kind: str | None = None

    def to_frame(self) -> pd.DataFrame:
        """One row: layer, other_layer, kind, n_epochs, the final training
        loss and accuracy, sparsity, recalibrated, and (None without
        test_data) accuracy_a, accuracy_b, accuracy, penalty. The
        per-epoch curve is .curve."""
        last = self.curve.iloc[-1] if len(self.curve) else {}
        return pd.DataFrame([{
            "layer": self.layer, "other_layer": self.other_layer, "kind": self.kind, "n_epochs": len(self.curve),
            "train_loss": last.get("loss"), "train_accuracy": last.get("accuracy"), "sparsity": self.sparsity,
            "recalibrated": self.recalibrated, "accuracy_a": self.accuracy_a, "accuracy_b": self.accuracy_b,
            "accuracy": self.accuracy, "penalty": self.penalty}])


def _train_batches(data, batch_size, generator, classes=None):
    for x, y in batches(data, batch_size, generator, name="data", labels=True, mappings=True):
        if classes is not None:
            check_labels(y, classes, "data")
        yield x, y


def stitching_penalty(accuracy_a: float, accuracy_b: float, accuracy_stitched: float) -> float:
    """Seed 004 equation 4.3: (Acc(f) + Acc(f~)) / 2 - Acc(S(f, f~, l, phi)).

    Args:
        accuracy_a: Acc(f), the first model's accuracy, a fraction in [0, 1].
        accuracy_b: Acc(f~), the second model's accuracy, a fraction in [0, 1].
        accuracy_stitched: Acc(S(f, f~, l, phi)), the stitched model's accuracy, a fraction in [0, 1].

    Returns:
        The stitching penalty, a float.
    """
    accuracy_a, accuracy_b, accuracy_stitched = (
        _checks.number(name, value, low=0, high=1) for name, value in
        (("accuracy_a", accuracy_a), ("accuracy_b", accuracy_b), ("accuracy_stitched", accuracy_stitched)))
    return (accuracy_a + accuracy_b) / 2 - accuracy_stitched


def _check_finite_model(name: str, model: nn.Module) -> None:
    bad = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise ValueError(f"{name} has NaN or infinite weights in {bad[:5]}: it cannot be stitched")


def _hidden_states(output, layer, name):
    try:
        return first_tensor(output)
    except TypeError:
        raise ValueError(f"{name}'s layer {layer!r} returned {type(output).__name__}, not a tensor (nor a tuple or "
                         "Hugging Face output holding one): it cannot be stitched") from None


def _channels_at(model, layer, x, name):
    """The layer's features on x, checked to have a channel axis (section 4's a_{<=l}(x))."""
    with torch.no_grad():
        y = _hidden_states(layer_output(model, layer, x, name=name), layer, name)
    if y.dim() < 2 or y.shape[0] != sample_count(x):
        raise ValueError(f"{name}'s layer {layer!r} must output (N, C), (N, C, H, W) or (N, tokens, C) features "
                         f"for N = {sample_count(x)} samples, got {tuple(y.shape)}")
    return y


def _stitch_axis(model, layer, y, feature_axis) -> int:
    """The channel axis phi maps (seed 004 D.4 for tokens): given, or read from the layer."""
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


def stitch(model: nn.Module, other: nn.Module, layer: str, data=None, test_data=None, *, kind: str = "affine",
           other_layer: str | None = None, epochs: int = 20, lr: float = 1e-3, momentum: float = 0.9,
           batch_size: int = 32, rank: int | None = None, alpha: float = 0.1, head_start: int | None = None,
           l1: float = 0.01, tau: float | None = None, bias: bool = False, generator=None, progress: bool = True,
           init: str = "procrustes", feature_axis: int | None = None,
           recalibrate: bool | None = None) -> StitchResult:
    """Train a stitching layer phi from `model`'s `layer` to `other`'s (seed 004 section 4, appendix D.2).

    phi trains with SGD (lr, momentum; appendix D.2) on cross-entropy over the training data; the test data gives the
    accuracies and the stitching penalty (equation 4.3).

    Args:
        model: f, the network whose `layer` output feeds phi.
        other: f~, the network that continues from phi's output.
        layer: the qualified name of the layer of `model`.
        data: the labelled training data (required), (x, y) tensors or a loader of (x, y) batches, or keyword inputs
            for transformers models (a dict of tensors batched along dim 0, or a loader of such dicts, with the labels
            under the "labels" key or as the pair (inputs, labels); both models see the same dict batch, as
            model(**inputs), and must return logits (N, classes), a tensor or a Hugging Face output's .logits).
        test_data: the same forms, for the accuracies and the stitching penalty (default None: none measured).
        kind: "affine" (default; all channel maps, bias optional), "lowrank" (rank r), "grelu" (P D: projected
            gradient with ReLU + Sinkhorn T = 16 after every step, the -alpha |P|_2 regulariser, D fixed at its start
            for the first head_start epochs (default half), Hungarian rounding, then a no-gradient pass to recalibrate
            BatchNorm statistics, D.2.1), "softsort" (D.2.2, tau = 1/C by default) or "l1" (full with l1 * |W|_1,
            D.6).
        other_layer: the layer of `other` (default None: the same name).
        epochs: training epochs (default 20).
        lr: the SGD learning rate (default 1e-3).
        momentum: the SGD momentum, in [0, 1) (default 0.9).
        batch_size: training batch size (default 32).
        rank: the rank r of kind="lowrank", required there, in [1, channels] (default None).
        alpha: the weight of the -alpha |P|_2 regulariser of kind="grelu" (default 0.1).
        head_start: for kind="grelu", the epochs with D held fixed at its start (default None: half of epochs).
        l1: the weight of the l1 * |W|_1 penalty of kind="l1" (default 0.01).
        tau: the temperature of kind="softsort" (default None: 1/C).
        bias: whether an affine phi has a bias (default False).
        generator: phi's start and the order of the training batches (None: torch's global RNG, an int: a seed).
        progress: show a progress bar (default True).
        init: for kind="grelu": "procrustes" (default) starts P D at the G_ReLU-Procrustes alignment of the two
            layers' activations on the first 1,024 training inputs (definition 5.2: the matched permutation and
            least-squares scales), so an exact twin (Theorem 4.2) is found whatever its scales; "uniform" is the
            paper's start, P near 1/C and D = 1.
        feature_axis: the channel axis of the layer's output, by default (None) read from the layer (a Linear: the
            last axis, e.g. transformer tokens (N, T, F), seed 004 D.4; a conv: axis 1).
        recalibrate: for kind="grelu", recompute other's BatchNorm statistics after rounding; by default (None) only
            when the rounding changed phi's output on the first training inputs by more than 5% (relative norm), since
            otherwise the rounded phi is the trained one and the frozen statistics are as right as before, e.g. for an
            exact twin whose statistics do not describe the data.

    Returns:
        A StitchResult.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if data is None:
        raise ValueError("data is required: (x, y) tensors or a loader of (x, y) batches to train phi on")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    epochs = _checks.positive_int("epochs", epochs)
    batch_size = _checks.positive_int("batch_size", batch_size)
    lr = _checks.number("lr", lr, low=0, low_open=True)
    momentum = _checks.number("momentum", momentum, low=0, high=1, high_open=True)
    alpha = _checks.number("alpha", alpha, low=0)
    l1 = _checks.number("l1", l1, low=0)
    if tau is not None:
        tau = _checks.number("tau", tau, low=0, low_open=True)
    other_layer = layer if other_layer is None else other_layer
    for name, module, lay in (("model", model, layer), ("other", other, other_layer)):
        if not isinstance(module, nn.Module):
            raise TypeError(f"{name} must be a torch.nn.Module, got {type(module).__name__}")
        if lay not in dict(module.named_modules()) or lay == "":
            raise ValueError(f"layer {lay!r} names no submodule of {name}")
        _check_finite_model(name, module)
    # None is torch's global RNG; batches() shuffles only when handed a generator, so hand it that one
    generator = _checks.generator(generator) or torch.default_generator
    a, b = copy.deepcopy(model).eval(), copy.deepcopy(other).eval()
    first = next(iter(batches(data, 1024, name="data", mappings=True)), None)
    if first is None:
        raise ValueError("data is empty: no batch to train phi on")
    x0 = first[0]
    # keyword inputs the models cannot take are named before labels are asked for
    check_keywords(a, x0, "model")
    check_keywords(b, x0, "other")
    if first[1] is None:
        next(iter(_train_batches([first], 1024, None)))  # batches' error: data must carry labels
    ya, yb = _channels_at(a, layer, x0, "model"), _channels_at(b, other_layer, x0, "other")
    with torch.no_grad():
        out = logits_of(call(b, x0))
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise ValueError(f"other must map inputs to logits (N, classes) (a tensor or a Hugging Face output's "
                         f".logits), got {tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
    classes = out.shape[-1]
    if ya.shape[1:] != yb.shape[1:]:
        raise ValueError(f"model's {layer!r} gives features {tuple(ya.shape[1:])} but other's {other_layer!r} "
                         f"expects {tuple(yb.shape[1:])}: the models cannot be stitched there")
    axis = _stitch_axis(model, layer, ya, feature_axis)
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
    stitched = StitchedModel(a, b, layer, other_layer, phi)
    optimizer = torch.optim.SGD(phi.parameters(), lr=lr, momentum=momentum)
    head_start = epochs // 2 if head_start is None else head_start
    from tqdm.auto import tqdm

    rows = []
    stitched.train()
    for epoch in tqdm(range(epochs), desc=f"{kind} stitching", disable=not progress, leave=False):
        if kind == "grelu":
            phi.D.requires_grad_(epoch >= head_start)
        total = correct = count = 0
        for x, y in _train_batches(data, batch_size, generator, classes):
            optimizer.zero_grad()
            logits = logits_of(stitched(x))
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
    accuracies = None if test_data is None else (_accuracy(a, test_data, name="test_data"),
                                                 _accuracy(b, test_data, name="test_data"))
    if kind == "grelu":
        with torch.no_grad():
            moved = float((phi(ya) - soft).norm() / soft.norm().clamp_min(1e-30))
        if recalibrate is None:
            recalibrate = moved > 0.05
        if recalibrate:
            # D.2.1: other's BatchNorm statistics must describe the features the rounded phi produces; a
            # copy, so that accuracy_b stays other's own
            stitched.model_b = copy.deepcopy(b)
            recompute_batchnorm(stitched.model_b, stitched.forward, data, batch_size, mappings=True)
    with torch.no_grad():
        matrix = phi.matrix().detach().clone()
    result = StitchResult(stitched, pd.DataFrame(rows), matrix, sparsity(matrix),
                          permutation=phi.hard.clone() if kind in ("grelu", "softsort") else None,
                          recalibrated=bool(kind == "grelu" and recalibrate), layer=layer,
                          other_layer=other_layer, kind=kind)
    if test_data is not None:
        result.accuracy_a, result.accuracy_b = accuracies
        result.accuracy = _accuracy(stitched, test_data, name="test_data")
        result.penalty = stitching_penalty(result.accuracy_a, result.accuracy_b, result.accuracy)
    return result
