"""pytorch-cka 1.1.3's public entry points (PyPI `pytorch-cka`, imported as
`cka`), computed by spectral_ext: change `from cka
import ...` (or `cka.cka`, `cka.hsic`, `cka.viz`) to
`from spectral_ext.compat.pytorch_cka import ...`.

Offered: `compute_cka`, `CKA` (a context manager: hooks registered and the
models put in eval mode on entering, hooks removed and modes given back on
leaving; `_compare` refuses to run outside it, `compare` enters by itself),
`cka_from_features`, `hsic`, `hsic_cross`, `plot_cka_heatmap`,
`plot_cka_comparison`, `plot_cka_trend`, `plot_cka_trend_with_range`,
`plot_cka_layer_trend` and `save_figure`, with pytorch-cka's arguments,
exception types and messages, warnings (a model of more than 150 layers
without a layer list), verbose lines, progress bar, layer resolution (names
or indices into named_modules; `CKA.model1_layer_to_module`), batch forms
(tensors, (inputs, ...) sequences, dicts keyed "input", "x", "pixel_values",
...) and plots (the same figure, annotation texts and colours, pixel for
pixel).

The numbers: estimator="pytorch-cka" (the default) is pytorch-cka's own
estimator in float64 on centred features: the unbiased HSIC of each
batch's linear Grams summed over batches, CKA = sum HSIC_xy / sqrt(sum
HSIC_xx * sum HSIC_yy) clamped to [0, 1], 0 where a layer is constant
(pytorch-cka divides by 1e-6 there; we also warn, naming it), each layer's
output as the hook saw it (a later in-place operation, ReLU(inplace=True),
changes it as it does in pytorch-cka), and, for one model compared with
itself on the same layers listed in another order, pytorch-cka's
normalisation by the diagonal of the cross matrix. pytorch-cka itself works
in float32 on uncentred Grams: on its README's ResNet-18 vs ResNet-34
(random weights, 3 loaders of 128 images) it reports 1.0 where its own
formula in float64 gives 0.024, and 32% of the entries are off by more
than 0.01. estimator="unbiased" is the correct form of the same estimator: the layers' outputs copied as they were
produced, no clamp (a slightly negative estimate of a near-zero CKA stays
negative), the self terms always HSIC(K, K), NaN with a warning where a
layer is constant. Results are float32 tensors (as pytorch-cka's) rounded
from float64; `hsic`, `hsic_cross` and `cka_from_features` return the
inputs' floating dtype. Other differences: inputs are copied before each
forward pass (pytorch-cka lets a model's in-place first operation change
the loader's data), each submodule's train/eval flag is given back (not
only the root's), batches may come from any iterable, and array-likes are
accepted wherever a matrix is."""
from __future__ import annotations

import numbers
import warnings
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from .._hooks import set_eval
from ..similarity import MinibatchCKA

_ESTIMATORS = ("pytorch-cka", "unbiased")
_INPUT_KEYS = ("input", "inputs", "x", "image", "images", "input_ids", "pixel_values")


def _check_estimator(estimator: str) -> str:
    if estimator not in _ESTIMATORS:
        raise ValueError(f"estimator must be one of {_ESTIMATORS}, got {estimator!r}")
    return estimator


# ---------------------------------------------------------------------------------------------
# HSIC of Gram stacks (cka.hsic)


def _as_tensor(value) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))


def _check_grams(grams_x, grams_y, who: str):
    grams_x, grams_y = _as_tensor(grams_x), _as_tensor(grams_y)
    if grams_x.dim() != 3 or grams_y.dim() != 3:
        raise ValueError(f"{who} requires 3D tensors, got shapes {grams_x.shape} and {grams_y.shape}")
    if grams_x.shape[1] != grams_x.shape[2] or grams_y.shape[1] != grams_y.shape[2]:
        raise ValueError(f"{who} requires square matrices")
    n, n_y = grams_x.shape[1], grams_y.shape[1]
    if n != n_y:
        raise ValueError(f"Gram matrices must have same sample dimension, got {n} and {n_y}")
    if n <= 3:
        raise ValueError(f"{who} requires n > 3, got n={n}")
    return grams_x, grams_y


def _result_dtype(*tensors) -> torch.dtype:
    dtype = tensors[0].dtype
    for tensor in tensors[1:]:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype if dtype.is_floating_point else torch.get_default_dtype()


def _parts(grams: torch.Tensor):
    """A stack's diagonals, off-diagonal totals and off-diagonal column sums, float64."""
    grams = grams.to(torch.float64)
    diagonal = torch.diagonal(grams, dim1=-2, dim2=-1)
    return grams, diagonal, grams.sum((-2, -1)) - diagonal.sum(-1), grams.sum(-2) - diagonal


def _cross(a, b, n) -> torch.Tensor:
    """Song et al.'s unbiased HSIC of every pair of two stacks (pytorch-cka's
    formula: K and L with their diagonals left out, read entrywise)."""
    (K, dK, sK, cK), (L, dL, sL, cL) = a, b
    trace = K.reshape(K.shape[0], -1) @ L.reshape(L.shape[0], -1).T - dK @ dL.T
    return (trace + torch.outer(sK, sL) / ((n - 1) * (n - 2)) - (2 / (n - 2)) * (cK @ cL.T)) / (n * (n - 3))


def _self(a, n) -> torch.Tensor:
    K, dK, sK, cK = a
    trace = K.square().sum((-2, -1)) - dK.square().sum(-1)
    return (trace + sK.square() / ((n - 1) * (n - 2)) - (2 / (n - 2)) * cK.square().sum(-1)) / (n * (n - 3))


def hsic(grams_x, grams_y):
    """(hsic_xy (k1, k2), hsic_xx (k1,), hsic_yy (k2,)): the unbiased HSICs of
    two (k, n, n) stacks of Gram matrices, computed in float64 and returned in
    the inputs' floating dtype (pytorch-cka's cka.hsic.hsic)."""
    grams_x, grams_y = _check_grams(grams_x, grams_y, "hsic_all")
    n, dtype = grams_x.shape[1], _result_dtype(grams_x, grams_y)
    a, b = _parts(grams_x), _parts(grams_y)
    return _cross(a, b, n).to(dtype), _self(a, n).to(dtype), _self(b, n).to(dtype)


def hsic_cross(grams_x, grams_y) -> torch.Tensor:
    """(k1, k2) unbiased HSICs of two stacks of Gram matrices, float64 inside,
    the inputs' floating dtype out (pytorch-cka's cka.hsic.hsic_cross)."""
    grams_x, grams_y = _check_grams(grams_x, grams_y, "hsic_cross")
    n = grams_x.shape[1]
    return _cross(_parts(grams_x), _parts(grams_y), n).to(_result_dtype(grams_x, grams_y))


# ---------------------------------------------------------------------------------------------
# CKA from the accumulated HSICs


def _sums(accumulator: MinibatchCKA):
    """The accumulator's sums of HSIC_xy, HSIC_xx, HSIC_yy at their true scale
    (MinibatchCKA keeps each representation's at a power of two; a scale that
    would overflow is divided out of all three alike, which leaves CKA as it is)."""
    ex, ey = accumulator.ex, accumulator.ey
    top = max(0.0, float(torch.cat([ex, ey]).max()))
    xy = accumulator.xy * torch.exp2(2 * ex[:, None] + 2 * ey[None, :] - 4 * top)
    return xy, accumulator.xx * torch.exp2(4 * ex - 4 * top), accumulator.yy * torch.exp2(4 * ey - 4 * top)


def _peer_matrix(xy: torch.Tensor, xx: torch.Tensor, yy: torch.Tensor) -> torch.Tensor:
    """pytorch-cka's CKA of HSIC sums: a zero denominator replaced by 1e-6,
    the ratio clamped to [0, 1]."""
    denominator = torch.sqrt(torch.clamp(xx.unsqueeze(1) * yy.unsqueeze(0), min=0.0))
    denominator = torch.where(denominator == 0, 1e-6, denominator)
    return torch.clamp(xy / denominator, min=0.0, max=1.0)


def _constant_warning(accumulator, names_x, names_y):
    bad = [names_x[i] for i in range(len(names_x)) if not accumulator.varied_x[i]]
    bad += [names_y[j] for j in range(len(names_y)) if not accumulator.varied_y[j] and names_y[j] not in bad]
    if bad:
        warnings.warn(f"CKA is undefined for constant representations {', '.join(bad)}: reported as 0, as "
                      "pytorch-cka does (estimator='unbiased' reports NaN)", RuntimeWarning, stacklevel=3)


def _matrix(accumulator: MinibatchCKA, estimator: str, names_x, names_y, diagonal_self: bool = False,
            quiet: bool = False) -> torch.Tensor:
    """The float64 CKA matrix of the accumulated sums under `estimator`.
    diagonal_self: pytorch-cka's self terms for one model compared with
    itself on the same layers in another order (the cross matrix's diagonal)."""
    if estimator == "unbiased":
        if quiet:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return accumulator.value(names_x, names_y)
        return accumulator.value(names_x, names_y)
    xy, xx, yy = _sums(accumulator)
    if diagonal_self:
        xx = yy = torch.diagonal(xy).clone()
    if not quiet:
        _constant_warning(accumulator, names_x, names_y)
    return _peer_matrix(xy, xx, yy)


# ---------------------------------------------------------------------------------------------
# CKA of two models (cka.cka)


def _layer_name(model_name: str, name: str) -> str:
    return f"{model_name} layer {name!r}"


class CKA:
    """pytorch-cka's CKA(model1, model2, layers=None, model2_layers=None,
    device=None), used as `with CKA(...) as c: c._compare(loader)`.

    Layers are names or indices into the model's named_modules (the model
    itself left out), all of them when None (a warning above 150);
    model2_layers defaults to layers. device=None picks CUDA, then MPS, then
    the CPU, and both models are moved there. `model1_layer_to_module` and
    `model2_layer_to_module` map the resolved names to the modules.
    estimator: "pytorch-cka" (pytorch-cka's numbers, in float64) or
    "unbiased" (the corrected estimator; see the module's docstring)."""

    @staticmethod
    def _resolve_layers(model: nn.Module, layers: Sequence[str | int] | None, model_name: str) -> dict:
        name_to_module = {name: module for name, module in model.named_modules() if name}
        names = list(name_to_module)
        if layers is None:
            if len(names) > 150:
                warnings.warn(f"{model_name} has {len(names)} layers. "
                              "Consider specifying layers explicitly for faster computation.")
            return name_to_module
        if isinstance(layers, str):  # pytorch-cka reads it letter by letter: a ValueError there too
            raise ValueError(f"{model_name}_layers must be a list of layer names or indices, got the string "
                             f"{layers!r}; wrap it in a list")
        if not isinstance(layers, Iterable):
            raise TypeError(f"{model_name}_layers must be a list of layer names or indices, got "
                            f"{type(layers).__name__}")
        result: dict[str, nn.Module] = {}
        for layer in layers:
            if isinstance(layer, str):
                if layer not in name_to_module:
                    raise ValueError(f"Layer '{layer}' not found in {model_name}. "
                                     "Use model.named_modules() to see available layers.")
                name = layer
            elif isinstance(layer, numbers.Integral) and not isinstance(layer, bool):
                index = int(layer) + (len(names) if layer < 0 else 0)
                if not 0 <= index < len(names):
                    raise IndexError(f"Layer index {layer} is out of range for {model_name} with {len(names)} "
                                     f"layers (valid range: {-len(names)} to {len(names) - 1}).")
                name = names[index]
            else:
                raise TypeError(f"Layer specification must be str or int, got {type(layer).__name__} in "
                                f"{model_name}_layers.")
            result.setdefault(name, name_to_module[name])
        return result

    def __init__(self, model1: nn.Module, model2: nn.Module, layers: Sequence[str | int] | None = None,
                 model2_layers: Sequence[str | int] | None = None, device=None, *,
                 estimator: str = "pytorch-cka"):
        def unwrap(model):
            return model.module if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) \
                else model

        self.model1, self.model2 = unwrap(model1), unwrap(model2)
        for name, model in (("model1", self.model1), ("model2", self.model2)):
            if not isinstance(model, nn.Module):
                raise TypeError(f"{name} must be a torch.nn.Module, got {type(model).__name__}")
        self.estimator = _check_estimator(estimator)
        self.model1_layer_to_module = self._resolve_layers(self.model1, layers, "model1")
        self.model2_layer_to_module = self._resolve_layers(
            self.model2, layers if model2_layers is None else model2_layers, "model2")
        self._is_same_model = self.model1 is self.model2
        self._hook_handles: list = []
        self._restore_modes = None
        self._model1_training, self._model2_training = self.model1.training, self.model2.training
        if not device:
            device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
        self.device = torch.device(device)
        self.model1 = self.model1.to(self.device)
        self.model2 = self.model2.to(self.device)
        if self._is_same_model:
            self._shared_layer_to_module = {**self.model1_layer_to_module, **self.model2_layer_to_module}
            self._shared_features: dict[str, torch.Tensor] = {}
        else:
            self._model1_layer_to_feature: dict[str, torch.Tensor] = {}
            self._model2_layer_to_feature: dict[str, torch.Tensor] = {}

    def _clear_features(self) -> None:
        if self._is_same_model:
            self._shared_features.clear()
        else:
            self._model1_layer_to_feature.clear()
            self._model2_layer_to_feature.clear()

    def _extract_input(self, batch) -> torch.Tensor:
        """A batch's inputs: the tensor itself, the first item of a list or
        tuple, or a dict's "input", "inputs", "x", "image", "images",
        "input_ids" or "pixel_values"."""
        if isinstance(batch, torch.Tensor):
            return batch
        if isinstance(batch, (list, tuple)):
            return batch[0]
        if isinstance(batch, dict):
            for key in _INPUT_KEYS:
                if key in batch:
                    return batch[key]
            raise ValueError(f"Cannot find input in dict batch. Keys: {list(batch.keys())}")
        raise TypeError(f"Unsupported batch type: {type(batch)}")

    def _make_hook(self, features: dict, layer_name: str):
        copy = self.estimator == "unbiased"

        def hook(module, args, output):
            if isinstance(output, tuple):
                output = output[0]
            elif hasattr(output, "last_hidden_state"):
                output = output.last_hidden_state
            if isinstance(output, torch.Tensor):
                feature = output.detach()
                feature = feature.flatten(1) if feature.dim() > 2 else feature
                features[layer_name] = feature.clone() if copy else feature
        return hook

    def _compute_cka_matrix(self, hsic_xy: torch.Tensor, hsic_xx: torch.Tensor, hsic_yy: torch.Tensor):
        """pytorch-cka's CKA of HSIC sums (a zero denominator read as 1e-6,
        the result clamped to [0, 1])."""
        return _peer_matrix(hsic_xy, hsic_xx, hsic_yy)

    def __enter__(self) -> "CKA":
        if self._hook_handles:
            return self
        if self._is_same_model:
            plan = [(self._shared_layer_to_module, self._shared_features)]
        else:
            plan = [(self.model1_layer_to_module, self._model1_layer_to_feature),
                    (self.model2_layer_to_module, self._model2_layer_to_feature)]
        for modules, features in plan:
            for name, module in modules.items():
                self._hook_handles.append(module.register_forward_hook(self._make_hook(features, name)))
        self._restore_modes = set_eval(self.model1, self.model2)
        return self

    def __exit__(self, exc_type, exc_value, traceback) -> bool:
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles.clear()
        if self._restore_modes is not None:
            self._restore_modes()  # every submodule's flag, as it was on entering
            self._restore_modes = None
        self._clear_features()
        return False

    def _features(self, store: dict, names, model_name: str):
        missing = [n for n in names if n not in store]
        if missing:
            raise ValueError(f"{model_name} layers {missing} produced no tensor in the forward pass (they did not "
                             "run, or returned something other than a tensor, a tuple or an output with "
                             "last_hidden_state)")
        return [store[n] if store[n].dim() > 1 else store[n][:, None] for n in names]

    def _compare(self, dataloader, progress: bool = True, verbose: bool = False) -> torch.Tensor:
        """The (len(layers), len(model2_layers)) CKA matrix over the batches
        of dataloader, float32; inside the `with` block only."""
        if not self._hook_handles:
            raise RuntimeError("Hooks not registered.")
        from tqdm import tqdm

        names1, names2 = list(self.model1_layer_to_module), list(self.model2_layer_to_module)
        same_lists = self._is_same_model and names1 == names2
        # pytorch-cka: one model, the same layers in another order -> its self terms are the cross diagonal
        diagonal_self = (self.estimator == "pytorch-cka" and self._is_same_model and not same_lists
                         and set(names1) == set(names2))
        labels1 = [_layer_name("model1", n) for n in names1]
        labels2 = [_layer_name("model2", n) for n in names2]
        store1 = self._shared_features if self._is_same_model else self._model1_layer_to_feature
        store2 = self._shared_features if self._is_same_model else self._model2_layer_to_feature
        total = len(dataloader) if hasattr(dataloader, "__len__") else None
        iterator = tqdm(dataloader, total=total, desc="Computing CKA") if progress else dataloader
        accumulator = MinibatchCKA("linear", unbiased=True)
        with torch.inference_mode():
            for index, batch in enumerate(iterator):
                self._clear_features()
                raw = self._extract_input(batch)
                if raw.shape[0] <= 3:
                    raise ValueError(f"HSIC requires batch size > 3, got {raw.shape[0]}. "
                                     "Increase batch size to at least 4.")
                x = raw.to(self.device)
                x = x.clone() if x is raw else x  # a model's in-place first operation leaves the caller's data
                self.model1(x)
                if not self._is_same_model:
                    self.model2(x)
                rows = self._features(store1, names1, "model1")
                accumulator.update(rows, None if same_lists else self._features(store2, names2, "model2"),
                                   feature_axis=1)
                if verbose:
                    current = _matrix(accumulator, self.estimator, labels1, labels2, diagonal_self, quiet=True)
                    print(f"Batch {index + 1}/{total if total is not None else '?'} - Mean CKA: "
                          f"{float(current.nanmean()):.4f}")
        if accumulator.xy is None:
            raise ValueError("dataloader yields no batch")
        return _matrix(accumulator, self.estimator, labels1, labels2, diagonal_self).to(torch.float32)

    def compare(self, dataloader, progress: bool = True, verbose: bool = False) -> torch.Tensor:
        """_compare, entering the context (hooks, eval mode) for the call
        when the caller has not."""
        if self._hook_handles:
            return self._compare(dataloader, progress=progress, verbose=verbose)
        with self:
            return self._compare(dataloader, progress=progress, verbose=verbose)


def compute_cka(model1: nn.Module, model2: nn.Module, *dataloaders, layers=None, model2_layers=None,
                device=None, progress: bool = True, verbose: bool = False,
                estimator: str = "pytorch-cka") -> list[torch.Tensor]:
    """One CKA matrix per dataloader (pytorch-cka's compute_cka; a single
    list or tuple of dataloaders is unpacked)."""
    if len(dataloaders) == 1 and isinstance(dataloaders[0], (list, tuple)):
        dataloaders = tuple(dataloaders[0])
    if not dataloaders:
        raise ValueError("compute_cka requires at least one dataloader.")
    comparer = CKA(model1=model1, model2=model2, layers=layers, model2_layers=model2_layers, device=device,
                   estimator=estimator)
    with comparer:
        return [comparer._compare(loader, progress=progress, verbose=verbose) for loader in dataloaders]


def _feature_list(features, name: str) -> list[torch.Tensor]:
    if isinstance(features, (torch.Tensor, np.ndarray)):
        features = _as_tensor(features)
        if features.dim() == 2:
            return [features]
        if features.dim() == 3:
            return list(features)
        raise ValueError(f"{name} must be (n, d), (L, n, d) or a sequence of (n, d), got shape "
                         f"{tuple(features.shape)}")
    features = [_as_tensor(f) for f in features]
    if not features:
        raise ValueError(f"{name} holds no feature matrix")
    for f in features:
        if f.dim() != 2:
            raise ValueError(f"{name} must hold (n, d) feature matrices, got shape {tuple(f.shape)}")
    return features


def cka_from_features(features_x, features_y, *, estimator: str = "pytorch-cka") -> torch.Tensor:
    """CKA of pre-extracted features: (n, d), (L, n, d) or a sequence of
    (n, d) each side (tensors or arrays), as an (Lx, Ly) matrix in the
    inputs' floating dtype; float64 inside on the cheaper exact route
    (centred d x d' products for n >> d, Grams otherwise)."""
    _check_estimator(estimator)
    xs = _feature_list(features_x, "features_x")
    ys = xs if features_y is features_x else _feature_list(features_y, "features_y")
    sizes = {f.shape[0] for f in xs} | {f.shape[0] for f in ys}
    n, n_y = xs[0].shape[0], ys[0].shape[0]
    if n != n_y or len(sizes) > 1:
        raise ValueError(f"Gram matrices must have same sample dimension, got {n} and "
                         f"{n_y if n != n_y else sorted(sizes)[-1]}")
    if n <= 3:
        raise ValueError(f"hsic_all requires n > 3, got n={n}")
    dtype = _result_dtype(*xs, *ys)
    accumulator = MinibatchCKA("linear", unbiased=True)
    accumulator.update([f[:, :, None] for f in xs], None if ys is xs else [f[:, :, None] for f in ys],
                       feature_axis=1)
    names_x = [f"features_x[{i}]" for i in range(len(xs))]
    names_y = [f"features_y[{j}]" for j in range(len(ys))]
    return _matrix(accumulator, estimator, names_x, names_y).to(dtype)


# ---------------------------------------------------------------------------------------------
# Figures (cka.viz): the same artists, texts and colours as pytorch-cka's


def _to_numpy(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


def _series(values) -> list[np.ndarray]:
    """1-D -> one line, 2-D -> one line per row, a list -> one line per item
    (a list of numbers is one line)."""
    if isinstance(values, (torch.Tensor, np.ndarray)):
        array = _to_numpy(values)
        if array.ndim == 1:
            return [array]
        if array.ndim == 2:
            return list(array)
        raise ValueError("values must be 1D or 2D.")
    if isinstance(values, (list, tuple)):
        if not values:
            raise ValueError("values must contain at least one series.")
        if all(np.isscalar(v) for v in values):
            return [np.asarray(values)]
        lines = [_to_numpy(v) for v in values]
        if any(line.ndim != 1 for line in lines):
            raise ValueError("Each series must be 1D.")
        return lines
    raise TypeError("Unsupported values type.")


def _x_series(x_values, n_lines: int, n_points: int) -> list[np.ndarray]:
    if x_values is None:
        return [np.arange(n_points)] * n_lines
    if isinstance(x_values, np.ndarray) and x_values.ndim == 2:
        if x_values.shape != (n_lines, n_points):
            raise ValueError("x_values shape must match (n_lines, n_points).")
        return list(x_values)
    if isinstance(x_values, (list, tuple)) and x_values and isinstance(x_values[0], (list, tuple, np.ndarray)) \
            and not np.isscalar(x_values[0]):
        if len(x_values) != n_lines:
            raise ValueError("x_values must match number of lines.")
        lines = [np.asarray(v) for v in x_values]
        if any(line.ndim != 1 or len(line) != n_points for line in lines):
            raise ValueError("Each x_values series must be 1D and match length.")
        return lines
    line = np.asarray(x_values)
    if line.ndim != 1 or len(line) != n_points:
        raise ValueError("x_values must be 1D and match series length.")
    return [line] * n_lines


def _per_line(values, n_lines: int, name: str) -> list:
    if values is None:
        return [None] * n_lines
    if isinstance(values, (list, tuple)):
        if len(values) == n_lines:
            return list(values)
        if len(values) == 1:
            return list(values) * n_lines
        raise ValueError(f"{name} length must match number of lines.")
    return [values] * n_lines


# tab10 beyond 10 lines ("variant"): each further round of 10 mixed towards white or black, more each time
_VARIANTS = (((1.0, 1.0, 1.0), 0.35), ((0.0, 0.0, 0.0), 0.35), ((1.0, 1.0, 1.0), 0.6), ((0.0, 0.0, 0.0), 0.6),
             ((1.0, 1.0, 1.0), 0.8), ((0.0, 0.0, 0.0), 0.8))


def _line_colors(n_lines: int, overflow: str) -> list:
    import matplotlib.pyplot as plt

    base = list(plt.get_cmap("tab10").colors)
    if n_lines <= len(base):
        return base[:n_lines]
    if overflow == "repeat":
        return [base[i % len(base)] for i in range(n_lines)]
    if overflow == "tab20":
        wide = list(plt.get_cmap("tab20").colors)
        return [wide[i % len(wide)] for i in range(n_lines)]
    colors = []
    for i in range(n_lines):
        color, round_ = base[i % len(base)], i // len(base)
        if round_:
            target, alpha = _VARIANTS[min(round_ - 1, len(_VARIANTS) - 1)]
            color = tuple((np.array(color[:3], dtype=float) * (1.0 - alpha)
                           + np.array(target, dtype=float) * alpha).tolist())
        colors.append(color)
    return colors


def _apply_text_color(fig, color) -> None:
    """Titles, axis labels, ticks, spines and legend texts in `color` (cell
    annotations keep theirs)."""
    if color is None:
        return
    for ax in fig.axes:
        for text in (ax.title, ax.xaxis.label, ax.yaxis.label):
            text.set_color(color)
        ax.tick_params(colors=color)
        for spine in ax.spines.values():
            spine.set_color(color)
        legend = ax.get_legend()
        if legend is not None:
            for text in legend.get_texts():
                text.set_color(color)


def _short(name: str, depth: int | None) -> str:
    return name if depth is None else ".".join(name.split(".")[-depth:])


def plot_cka_heatmap(cka_matrix, layers1=None, layers2=None, model1_name: str = "Model 1",
                     model2_name: str = "Model 2", title: str | None = None, cmap: str = "magma",
                     vmin: float | None = None, vmax: float | None = None, annot: bool = False,
                     annot_fmt: str = ".2f", figsize=None, ax=None, colorbar: bool = True, tick_fontsize: int = 8,
                     label_fontsize: int = 12, title_fontsize: int = 14, annot_fontsize: int = 6,
                     layer_name_depth: int | None = None, text_color: str | None = None, show: bool = False):
    """pytorch-cka's heatmap: model 1's layers as rows from the top, model 2's
    as columns, the colour range the finite values' unless given; annot=True
    writes each finite value (NaN cells stay blank), white below the middle of
    the range, black above; layer_name_depth keeps that many trailing parts
    of dotted names; text_color recolours titles, labels and ticks. Returns
    (fig, ax)."""
    import matplotlib.pyplot as plt

    matrix = _to_numpy(cka_matrix)
    if matrix.ndim != 2:
        raise ValueError(f"cka_matrix must be 2-D, got shape {matrix.shape}")
    rows, cols = matrix.shape
    if ax is None:
        fig, ax = plt.subplots(figsize=figsize or (max(6, cols * 0.4 + 2), max(5, rows * 0.4 + 1)))
    else:
        fig = ax.get_figure()
    vmin = float(np.nanmin(matrix)) if vmin is None else vmin
    vmax = float(np.nanmax(matrix)) if vmax is None else vmax
    image = ax.imshow(matrix, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    if annot:
        middle = (vmin + vmax) / 2
        for i in range(rows):
            for j in range(cols):
                value = matrix[i, j]
                if np.ma.is_masked(value) or np.isnan(value):
                    continue
                ax.text(j, i, format(value, annot_fmt), ha="center", va="center",
                        color="white" if value < middle else "black", fontsize=annot_fontsize)
    ax.set_xlabel(f"{model2_name} Layers", fontsize=label_fontsize)
    ax.set_ylabel(f"{model1_name} Layers", fontsize=label_fontsize)
    if layers1 is not None:
        ax.set_yticks(range(rows))
        ax.set_yticklabels([_short(n, layer_name_depth) for n in layers1], fontsize=tick_fontsize)
    if layers2 is not None:
        ax.set_xticks(range(cols))
        ax.set_xticklabels([_short(n, layer_name_depth) for n in layers2], fontsize=tick_fontsize, rotation=45,
                           ha="right")
    ax.set_title(f"CKA: {model1_name} vs {model2_name}" if title is None else title, fontsize=title_fontsize)
    if colorbar:
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04).set_label("CKA Similarity",
                                                                        fontsize=label_fontsize - 2)
    ax.invert_yaxis()
    _apply_text_color(fig, text_color)
    fig.tight_layout()
    if show:
        plt.show()
    return fig, ax


def plot_cka_comparison(matrices, titles, layers=None, ncols: int = 2, figsize=None, share_colorbar: bool = True,
                        cmap: str = "magma", text_color: str | None = None, show: bool = False, **heatmap_kwargs):
    """Heatmaps of several CKA matrices on a grid of ncols columns (unused
    cells hidden), one colour range and one colourbar for all when
    share_colorbar; further keywords go to plot_cka_heatmap. Returns (fig,
    2-D array of axes)."""
    import matplotlib.colors as mcolors
    import matplotlib.pyplot as plt

    count = len(matrices)
    nrows = (count + ncols - 1) // ncols
    heatmap_kwargs.pop("text_color", None)
    fig, axes = plt.subplots(nrows, ncols, figsize=figsize or (5 * ncols, 4 * nrows),
                             constrained_layout=share_colorbar)
    axes = np.asarray(axes).reshape(nrows, ncols)  # (pytorch-cka's atleast_2d fails for one column)
    if share_colorbar:
        values = np.concatenate([_to_numpy(m).flatten() for m in matrices])
        heatmap_kwargs["vmin"], heatmap_kwargs["vmax"] = float(np.nanmin(values)), float(np.nanmax(values))
    for index, (matrix, title) in enumerate(zip(matrices, titles)):
        plot_cka_heatmap(matrix, layers1=layers, layers2=layers, title=title, ax=axes[index // ncols, index % ncols],
                         cmap=cmap, colorbar=not share_colorbar, **heatmap_kwargs)
    for index in range(count, nrows * ncols):
        axes[index // ncols, index % ncols].set_visible(False)
    if share_colorbar:
        mappable = plt.cm.ScalarMappable(norm=mcolors.Normalize(vmin=heatmap_kwargs["vmin"],
                                                                vmax=heatmap_kwargs["vmax"]), cmap=cmap)
        mappable.set_array([])
        fig.colorbar(mappable, ax=axes, fraction=0.02, pad=0.02, label="CKA Similarity")
    else:
        fig.tight_layout()
    _apply_text_color(fig, text_color)
    if show:
        plt.show()
    return fig, axes


def plot_cka_trend(values, x_values=None, labels=None, colors=None, linestyles=None, markers=None,
                   xlabel: str = "Epoch", ylabel: str = "CKA Score", title: str | None = None, figsize=None, ax=None,
                   legend: bool = False, grid: bool = True, show: bool = False, ylim=(0.0, 1.05),
                   show_range: bool = False, range_values=None, range_alpha: float = 0.2,
                   color_overflow: str = "tab20", text_color: str | None = None):
    """CKA values as lines over epochs, steps or layers: values a 1-D series,
    a 2-D (lines, points) array or a list of 1-D series; x_values shared or
    per line; colours tab10 (beyond 10: color_overflow "tab20", "variant" or
    "repeat"); show_range shades range_values (a spread per line, or a
    (lower, upper) pair). A legend only for more than one line. Returns
    (fig, ax)."""
    import matplotlib.pyplot as plt

    lines = _series(values)
    n_lines, n_points = len(lines), len(lines[0])
    if any(len(line) != n_points for line in lines):
        raise ValueError("All series must have the same length.")
    xs = _x_series(x_values, n_lines, n_points)
    colors = _per_line(_line_colors(n_lines, color_overflow) if colors is None else colors, n_lines, "colors")
    linestyles = _per_line(linestyles, n_lines, "linestyles")
    markers = _per_line(markers, n_lines, "markers")
    labels = _per_line(labels, n_lines, "labels")
    if ax is None:
        fig, ax = plt.subplots(figsize=figsize)
    else:
        fig = ax.get_figure()
    if show_range:
        if range_values is None:
            raise ValueError("show_range=True requires range_values or use plot_cka_trend_with_range.")
        if isinstance(range_values, tuple) and len(range_values) == 2:
            lower, upper = _series(range_values[0]), _series(range_values[1])
            lower = lower * n_lines if len(lower) == 1 and n_lines > 1 else lower
            upper = upper * n_lines if len(upper) == 1 and n_lines > 1 else upper
        else:
            spread = _series(range_values)
            spread = spread * n_lines if len(spread) == 1 and n_lines > 1 else spread
            if len(spread) != n_lines:
                raise ValueError("range_values must match number of lines.")
            lower = [line - s for line, s in zip(lines, spread)]
            upper = [line + s for line, s in zip(lines, spread)]
        if len(lower) != n_lines or len(upper) != n_lines:
            raise ValueError("range_values must match number of lines.")
        if any(len(lo) != n_points or len(up) != n_points for lo, up in zip(lower, upper)):
            raise ValueError("range_values length must match series length.")
    for i, (line, x) in enumerate(zip(lines, xs)):
        ax.plot(x, line, color=colors[i], linestyle=linestyles[i], marker=markers[i], label=labels[i])
        if show_range:
            ax.fill_between(x, lower[i], upper[i], color=colors[i], alpha=range_alpha, linewidth=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title is not None:
        ax.set_title(title)
    if ylim is not None:
        ax.set_ylim(ylim)
    ax.grid(grid, linestyle="--", alpha=0.3)
    if legend and n_lines > 1:
        if all(label is None for label in labels):
            ax.legend([f"Series {i + 1}" for i in range(n_lines)])
        else:
            ax.legend()
    _apply_text_color(fig, text_color)
    fig.tight_layout()
    if show:
        plt.show()
    return fig, ax


def plot_cka_trend_with_range(values, x_values=None, labels=None, colors=None, linestyles=None, markers=None,
                              xlabel: str = "Epoch", ylabel: str = "CKA Score", title: str | None = None,
                              figsize=None, ax=None, legend: bool = False, grid: bool = True, show: bool = False,
                              ylim=(0.0, 1.05), range_alpha: float = 0.2, color_overflow: str = "variant",
                              text_color: str | None = None):
    """Mean +- standard deviation over repeated runs: values (runs, points)
    for one line, (lines, runs, points) or a list of (runs, points); NaN
    runs left out of each point's statistics."""
    if isinstance(values, (torch.Tensor, np.ndarray)):
        array = _to_numpy(values)
        if array.ndim not in (2, 3):
            raise ValueError("values must be 2D or 3D for range plotting.")
        groups = [array] if array.ndim == 2 else list(array)
    elif isinstance(values, (list, tuple)):
        if not values:
            raise ValueError("values must contain at least one group.")
        groups = [_to_numpy(v) for v in values]
        if any(g.ndim != 2 for g in groups):
            raise ValueError("Each group must be 2D (n_runs, n_points).")
    else:
        raise TypeError("Unsupported values type.")
    return plot_cka_trend([np.nanmean(g, axis=0) for g in groups], x_values=x_values, labels=labels, colors=colors,
                          linestyles=linestyles, markers=markers, xlabel=xlabel, ylabel=ylabel, title=title,
                          figsize=figsize, ax=ax, legend=legend, grid=grid, show=show, ylim=ylim, show_range=True,
                          range_values=[np.nanstd(g, axis=0) for g in groups], range_alpha=range_alpha,
                          color_overflow=color_overflow, text_color=text_color)


def plot_cka_layer_trend(cka_matrices, layers=None, layer_name_depth: int | None = None, labels=None, colors=None,
                         linestyles=None, markers=None, xlabel: str = "Layer", ylabel: str = "CKA Score",
                         title: str | None = None, figsize=None, ax=None, legend: bool = False, grid: bool = True,
                         show: bool = False, ylim=(0.0, 1.05), color_overflow: str = "tab20",
                         text_color: str | None = None):
    """The diagonals of one or more CKA matrices as lines over the layers
    (markers "o" unless given), the layer names as x ticks."""
    import matplotlib.pyplot as plt

    if isinstance(cka_matrices, (torch.Tensor, np.ndarray)):
        matrices = [_to_numpy(cka_matrices)]
    elif isinstance(cka_matrices, (list, tuple)):
        if not cka_matrices:
            raise ValueError("cka_matrices must contain at least one matrix.")
        matrices = [_to_numpy(m) for m in cka_matrices]
    else:
        raise TypeError("Unsupported cka_matrices type.")
    diagonals = [np.diag(m) for m in matrices]
    n_points = len(diagonals[0])
    if layers is not None and len(layers) != n_points:
        raise ValueError("layers length must match diagonal length.")
    fig, ax = plot_cka_trend(diagonals, labels=labels, colors=colors, linestyles=linestyles,
                             markers=["o"] if markers is None else markers, xlabel=xlabel, ylabel=ylabel, title=title,
                             figsize=figsize, ax=ax, legend=legend, grid=grid, show=False, ylim=ylim,
                             color_overflow=color_overflow)
    ax.set_xticks(list(range(n_points)))
    if layers is not None:
        ax.set_xticklabels([_short(n, layer_name_depth) for n in layers], rotation=45, ha="right")
    _apply_text_color(fig, text_color)
    if show:
        plt.show()
    return fig, ax


def save_figure(fig, path: str, dpi: int = 150, bbox_inches: str = "tight", transparent: bool = False) -> None:
    """fig saved at path (dpi 150, tight bounding box) and closed; with
    transparent=True the background and the legends' faces are clear."""
    import matplotlib.pyplot as plt

    if transparent:
        for ax in fig.axes:
            legend = ax.get_legend()
            if legend is not None:
                legend.get_frame().set_facecolor("none")
    fig.savefig(path, dpi=dpi, bbox_inches=bbox_inches, transparent=transparent)
    plt.close(fig)
