"""pytorch-cka 1.1.3's public entry points (PyPI `pytorch-cka`, imported as
`cka`; ../shared/PEERS.md), computed by spectral_ext: change `from cka
import ...` to `from spectral_ext.compat.pytorch_cka import ...`.

`compute_cka`, `CKA` (a context manager with `.compare`), `cka_from_features`,
`hsic`, `hsic_cross` and `plot_cka_heatmap` keep pytorch-cka's arguments,
layer resolution (names or indices into named_modules, all modules by
default), flattening and its clamp of CKA to [0, 1]. The numbers are the
same estimator (Song et al.'s unbiased HSIC, summed over batches) in
float64 on centred features: pytorch-cka's float32 Grams of uncentred
features are off by up to 161% on ReLU activations. Deliberate
differences: an undefined entry (a constant layer, where pytorch-cka
divides by 1e-6 and reports 0) is NaN with a warning naming it, and the
results are float32 tensors rounded from float64. The trend and comparison
plots of pytorch-cka are not provided."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .. import similarity as _similarity
from .torch_cka import loader_cka


def _resolve(model: nn.Module, layers, argument: str) -> list[str]:
    names = [n for n, _ in model.named_modules() if n]
    if layers is None:
        return names
    resolved = []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, (str, int)):
            raise TypeError(f"Layer specification must be str or int, got {type(layer).__name__} in {argument}.")
        if isinstance(layer, int):
            if not -len(names) <= layer < len(names):
                raise IndexError(f"Layer index {layer} is out of range for {argument} with {len(names)} layers "
                                 f"(valid range: {-len(names)} to {len(names) - 1}).")
            layer = names[layer]
        elif layer not in names:
            raise ValueError(f"Layer '{layer}' not found in {argument}. Use model.named_modules() to see "
                             "available layers.")
        if layer not in resolved:
            resolved.append(layer)
    return resolved


def _clamped(matrix: torch.Tensor) -> torch.Tensor:
    return matrix.clamp(0.0, 1.0).to(torch.float32)  # NaN (undefined) stays NaN


class CKA:
    """pytorch-cka's CKA(model1, model2, layers=None, model2_layers=None,
    device=None), used as `with CKA(...) as c: c.compare(loader)` (also
    `_compare`, pytorch-cka's name)."""

    def __init__(self, model1: nn.Module, model2: nn.Module, layers: Sequence[str | int] | None = None,
                 model2_layers: Sequence[str | int] | None = None, device=None):
        unwrap = (lambda m: m.module if isinstance(m, (nn.DataParallel, nn.parallel.DistributedDataParallel))
                  else m)
        self.model1, self.model2 = unwrap(model1), unwrap(model2)
        for name, model in (("model1", self.model1), ("model2", self.model2)):
            if not isinstance(model, nn.Module):
                raise TypeError(f"{name} must be a torch.nn.Module, got {type(model).__name__}")
        self.layers1 = _resolve(self.model1, layers, "model1")
        self.layers2 = _resolve(self.model2, layers if model2_layers is None else model2_layers, "model2")
        self.device = torch.device(device) if device else torch.device("cpu")
        self.model1.to(self.device)
        self.model2.to(self.device)

    def __enter__(self) -> "CKA":
        return self

    def __exit__(self, *exc) -> bool:
        return False

    def compare(self, dataloader, progress: bool = True, verbose: bool = False) -> torch.Tensor:
        """The (len(layers), len(model2_layers)) CKA matrix over dataloader."""
        matrix, _, _ = loader_cka(self.model1, self.model2, self.layers1, self.layers2, dataloader,
                                  progress=progress, order="given")
        return _clamped(matrix)

    _compare = compare


def compute_cka(model1: nn.Module, model2: nn.Module, *dataloaders, layers=None, model2_layers=None,
                device=None, progress: bool = True, verbose: bool = False) -> list[torch.Tensor]:
    """One CKA matrix per dataloader (pytorch-cka's compute_cka)."""
    if len(dataloaders) == 1 and isinstance(dataloaders[0], (list, tuple)):
        dataloaders = tuple(dataloaders[0])
    if not dataloaders:
        raise ValueError("compute_cka requires at least one dataloader.")
    with CKA(model1, model2, layers=layers, model2_layers=model2_layers, device=device) as comparer:
        return [comparer.compare(loader, progress=progress) for loader in dataloaders]


def _as_list(features, name):
    if isinstance(features, torch.Tensor):
        if features.dim() == 2:
            return [features]
        if features.dim() == 3:
            return list(features)
        raise ValueError(f"{name} must be (n, d), (L, n, d) or a sequence of (n, d), got {tuple(features.shape)}")
    return list(features)


def cka_from_features(features_x, features_y) -> torch.Tensor:
    """CKA of pre-extracted features: (n, d), (L, n, d) or a sequence of
    (n, d) each side, as an (Lx, Ly) matrix clamped to [0, 1]; the cheaper
    exact route (centred d x d' products for n >> d)."""
    xs, ys = _as_list(features_x, "features_x"), _as_list(features_y, "features_y")
    for name, group in (("features_x", xs), ("features_y", ys)):
        for f in group:
            if not isinstance(f, torch.Tensor) or f.dim() != 2:
                raise ValueError(f"{name} must hold (n, d) feature matrices")
    accumulator = _similarity.MinibatchCKA("linear", unbiased=True)
    accumulator.update([f[:, :, None] for f in xs], [f[:, :, None] for f in ys], feature_axis=1)
    return _clamped(accumulator.value())


def _grams(name, grams):
    if not isinstance(grams, torch.Tensor) or grams.dim() != 3 or grams.shape[1] != grams.shape[2]:
        raise ValueError(f"{name} must be a (k, n, n) stack of Gram matrices, got "
                         f"{tuple(grams.shape) if isinstance(grams, torch.Tensor) else type(grams).__name__}")
    if grams.shape[1] <= 3:
        raise ValueError(f"hsic requires n > 3, got n={grams.shape[1]}")
    return grams


def hsic_cross(grams_x: torch.Tensor, grams_y: torch.Tensor) -> torch.Tensor:
    """(k1, k2) unbiased HSICs of two stacks of Gram matrices, float64."""
    grams_x, grams_y = _grams("grams_x", grams_x), _grams("grams_y", grams_y)
    if grams_x.shape[1] != grams_y.shape[1]:
        raise ValueError(f"Gram matrices must have same sample dimension, got {grams_x.shape[1]} and "
                         f"{grams_y.shape[1]}")
    return _similarity.hsic(grams_x, grams_y, unbiased=True)


def hsic(grams_x: torch.Tensor, grams_y: torch.Tensor):
    """(hsic_xy (k1, k2), hsic_xx (k1,), hsic_yy (k2,)), float64."""
    xy = hsic_cross(grams_x, grams_y)
    xx = torch.diagonal(_similarity.hsic(grams_x, grams_x))
    yy = torch.diagonal(_similarity.hsic(grams_y, grams_y))
    return xy, xx, yy


def plot_cka_heatmap(cka_matrix, layers1=None, layers2=None, model1_name: str = "Model 1",
                     model2_name: str = "Model 2", title: str | None = None, cmap: str = "magma",
                     vmin: float | None = None, vmax: float | None = None, annot: bool = False,
                     annot_fmt: str = ".2f", figsize=None, ax=None, colorbar: bool = True, show: bool = False,
                     **_unused):
    """pytorch-cka's heatmap: model 1's layers as rows (origin lower), model
    2's as columns; returns (fig, ax)."""
    import matplotlib.pyplot as plt
    import numpy as np

    values = np.asarray(cka_matrix.detach().cpu() if isinstance(cka_matrix, torch.Tensor) else cka_matrix,
                        dtype=float)
    if values.ndim != 2:
        raise ValueError(f"cka_matrix must be 2-D, got shape {values.shape}")
    if ax is None:
        size = (max(4, 0.4 * values.shape[1] + 2), max(3, 0.4 * values.shape[0] + 1.5))
        fig, ax = plt.subplots(figsize=figsize or size)
    else:
        fig = ax.figure
    image = ax.imshow(values, origin="lower", cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(values.shape[1]))
    ax.set_xticklabels(layers2 if layers2 is not None else range(values.shape[1]), rotation=60, ha="right",
                       fontsize=8)
    ax.set_yticks(range(values.shape[0]))
    ax.set_yticklabels(layers1 if layers1 is not None else range(values.shape[0]), fontsize=8)
    ax.set_xlabel(f"{model2_name} layers")
    ax.set_ylabel(f"{model1_name} layers")
    ax.set_title(title if title is not None else f"CKA: {model1_name} vs {model2_name}")
    if annot:
        for i in range(values.shape[0]):
            for j in range(values.shape[1]):
                bright = image.norm(values[i, j]) > 0.6  # dark text on the light end of the colour map
                ax.text(j, i, format(values[i, j], annot_fmt), ha="center", va="center", fontsize=6,
                        color="k" if bright else "w")
    if colorbar:
        fig.colorbar(image, ax=ax, label="CKA")
    fig.tight_layout()
    if show:
        plt.show()
    return fig, ax
