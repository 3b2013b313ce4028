"""torch-cka 0.21's `CKA` (PyPI `torch-cka`), computed by
spectral_ext: change `from torch_cka import CKA` to
`from spectral_ext.compat.torch_cka import CKA`.

Same arguments, warnings (identical model names, more than 150 modules
without a layer list, no second dataloader), layer lists, eval mode from
construction on, export and figure (plot_results: the same heatmap,
colourbar and texts, pixel for pixel).

The numbers: estimator="torch-cka" (the default) is torch-cka's own
estimator in float64 on centred features: the minibatch linear CKA of
[NRK21] (per-batch unbiased HSIC of the flattened outputs, averaged over the
batches zip(dataloader1, dataloader2 or dataloader1) pairs), with torch-cka's
rows and columns in the order the layers first ran (its exported layer
lists are in named_modules order: they label the matrix only where the two
agree), each layer's output as the hook saw it (a later in-place operation,
ReLU(inplace=True) or `out += identity`, changes it as it does in
torch-cka), and, for one model compared with itself on two dataloaders,
torch-cka's features of dataloader2 on both sides. torch-cka itself works
in float32 on uncentred Grams: 0.38 off on ResNet-50 vs WideResNet-50, with
values down to -0.33. An undefined entry (a constant layer) raises an error
that is both a ValueError and torch-cka's AssertionError.
estimator="unbiased" is the correct form of the same estimator: rows and
columns in the order of the exported layer lists, each layer's output
copied as it was produced, dataloader1's features for model 1 when one model
is compared with itself on two dataloaders, one pass over dataloader1 when
dataloader2 is None, and NaN with a warning for an undefined entry.

Other differences: the hooks live only while compare() runs (torch-cka
leaves them on the models for good), inputs are copied before each forward
pass, a layer list naming no module is refused (torch-cka fails later on
NaN), and batches may be tensors or (inputs, ...) sequences."""
from __future__ import annotations

import contextlib
from warnings import warn

import torch
from torch import nn

from .._data import batches
from .._hooks import evaluating, first_tensor
from ..similarity import MinibatchCKA

_ESTIMATORS = ("torch-cka", "unbiased")


class UndefinedCKA(ValueError, AssertionError):
    """An entry without a value (a constant layer): torch-cka's assertion
    "HSIC computation resulted in NANs", also a ValueError."""


class BatchMismatch(ValueError, AssertionError):
    """Paired batches of different sizes: torch-cka's "Feature shape
    mistach!" assertion, also a ValueError."""


class SmallBatch(ValueError, ZeroDivisionError):
    """A batch of 3 samples or fewer, where the unbiased HSIC divides by zero
    (torch-cka's ZeroDivisionError), also a ValueError."""


def _model_name(model: nn.Module) -> str:
    return model.__repr__().split("(")[0]


@contextlib.contextmanager
def _capturing(model: nn.Module, layers: list[str], copy: bool):
    """Forward hooks saving each named module's output (the last call of a
    module run twice; a copy when `copy`, else the tensor the module returned,
    which later in-place operations may change). Yields the dict, ordered by
    the first call of each module since the last clear()."""
    store: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())

    def hook_for(name):
        def hook(module, args, output):
            tensor = first_tensor(output).detach()
            store[name] = tensor.clone() if copy else tensor
        return hook

    handles = [modules[name].register_forward_hook(hook_for(name)) for name in layers]
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


def _device_of(model: nn.Module, fallback):
    return next(iter(model.parameters()), torch.empty(0, device=fallback)).device


def loader_cka(model1: nn.Module, model2: nn.Module, layers1: list[str], layers2: list[str], loader1,
               loader2=None, progress: bool = True, estimator: str = "torch-cka", names=("model1", "model2"),
               device="cpu"):
    """The minibatch linear CKA of two models' flattened layer outputs over
    paired batches of loader1 and loader2, float64 (MinibatchCKA), as
    estimator says (see the module's docstring). Returns (matrix, rows,
    columns): the layer names in the matrix's order."""
    from tqdm import tqdm

    faithful = estimator == "torch-cka"
    shared = model1 is model2
    one_pass = shared and (loader2 is None or faithful)  # torch-cka: both sides from model2's forward pass
    if faithful:  # torch-cka pairs two iterations of the loaders, dataloader1 twice when there is no second
        pairs = zip(batches(loader1, name="dataloader1"), batches(loader1 if loader2 is None else loader2,
                                                                  name="dataloader1" if loader2 is None
                                                                  else "dataloader2"))
    elif loader2 is None:
        pairs = ((b, b) for b in batches(loader1, name="dataloader1"))
    else:
        pairs = zip(batches(loader1, name="dataloader1"), batches(loader2, name="dataloader2"))
    total = len(loader1) if hasattr(loader1, "__len__") else None
    accumulator = MinibatchCKA("linear", unbiased=True)
    rows = cols = None
    with contextlib.ExitStack() as stack, torch.no_grad():
        stack.enter_context(evaluating(model1, model2))
        union = list(dict.fromkeys(layers1 + layers2))
        store1 = stack.enter_context(_capturing(model1, union if shared else layers1, copy=not faithful))
        store2 = store1 if shared else stack.enter_context(_capturing(model2, layers2, copy=not faithful))
        for (x1, _), (x2, _) in tqdm(pairs, desc="| Comparing features |", total=total, disable=not progress):
            if x1.shape[0] != x2.shape[0]:
                raise BatchMismatch(f"Feature shape mistach! dataloader1 gave a batch of {x1.shape[0]} and "
                                    f"dataloader2 one of {x2.shape[0]} (drop_last=True evens them out)")
            if x1.shape[0] <= 3:
                raise SmallBatch(f"HSIC requires batch size > 3, got {x1.shape[0]}: use batches of 4 or more")
            store1.clear()
            if one_pass:
                model2(x2.to(_device_of(model2, device)))
                first = second = dict(store1)
            else:
                model1(x1.to(_device_of(model1, device)))
                first = dict(store1)
                store2.clear()
                model2(x2.to(_device_of(model2, device)))
                second = dict(store2)
            missing = [f"{names[0]} layer {n!r}" for n in layers1 if n not in first]
            missing += [f"{names[1]} layer {n!r}" for n in layers2 if n not in second]
            if missing:  # torch-cka: rows of zeros, then its NaN assertion
                raise UndefinedCKA(f"{', '.join(missing)} did not run in the forward pass")
            if rows is None:
                rows = [n for n in first if n in set(layers1)] if faithful else list(layers1)
                cols = [n for n in second if n in set(layers2)] if faithful else list(layers2)
            flat1 = [first[n].flatten(1)[:, :, None] for n in rows]
            same = first is second and rows == cols
            accumulator.update(flat1, None if same else [second[n].flatten(1)[:, :, None] for n in cols],
                               feature_axis=1)
    if rows is None:
        raise ValueError("dataloader1 produced no batch")
    labels = ([f"{names[0]} layer {n!r}" for n in rows], [f"{names[1]} layer {n!r}" for n in cols])
    if faithful:
        try:
            matrix = accumulator.value(*labels, undefined="raise")
        except ValueError as error:
            raise UndefinedCKA(f"HSIC computation resulted in NANs: {error}") from None
    else:
        matrix = accumulator.value(*labels)
    return matrix, rows, cols


class CKA:
    """torch-cka's CKA(model1, model2, model1_name=None, model2_name=None,
    model1_layers=None, model2_layers=None, device='cpu'): .compare(
    dataloader1, dataloader2=None), .export() and .plot_results(save_path=None,
    title=None). Layers default to every module, the model itself included
    (named_modules order), as in torch-cka; both models are moved to device
    and put in eval mode (compare() runs them in eval mode even if set back
    to training since, and gives each submodule's flag back). estimator: "torch-cka" (torch-cka's numbers, in
    float64) or "unbiased" (the corrected estimator; the module's docstring
    says how they differ)."""

    def __init__(self, model1: nn.Module, model2: nn.Module, model1_name: str | None = None,
                 model2_name: str | None = None, model1_layers: list[str] | None = None,
                 model2_layers: list[str] | None = None, device: str = "cpu", *, estimator: str = "torch-cka"):
        for name, model in (("model1", model1), ("model2", model2)):
            if not isinstance(model, nn.Module):
                raise TypeError(f"{name} must be a torch.nn.Module, got {type(model).__name__}")
        if estimator not in _ESTIMATORS:
            raise ValueError(f"estimator must be one of {_ESTIMATORS}, got {estimator!r}")
        self.estimator, self.device = estimator, device
        self.model1_info = {"Name": _model_name(model1) if model1_name is None else model1_name}
        self.model2_info = {"Name": _model_name(model2) if model2_name is None else model2_name}
        if self.model1_info["Name"] == self.model2_info["Name"]:
            warn(f"Both model have identical names - {self.model2_info['Name']}. It may cause confusion when "
                 "interpreting the results. Consider giving unique names to the models :)")
        for number, model, layers in ((1, model1, model1_layers), (2, model2, model2_layers)):
            if len(list(model.modules())) > 150 and layers is None:
                warn(f"Model {number} seems to have a lot of layers. Consider giving a list of layers whose "
                     f"features you are concerned with through the 'model{number}_layers' parameter. Your "
                     "CPU/GPU will thank you :)")
        self.model1_layers, self.model2_layers = model1_layers, model2_layers
        self.model1_info["Layers"] = self._layers(model1, model1_layers, "model1_layers")
        self.model2_info["Layers"] = self._layers(model2, model2_layers, "model2_layers")
        self.model1, self.model2 = model1.to(device), model2.to(device)
        self.model1.eval()
        self.model2.eval()
        self.hsic_matrix = None

    @staticmethod
    def _layers(model, layers, argument):
        names = [n for n, _ in model.named_modules()]
        if layers is None:
            return names
        if isinstance(layers, str):
            raise TypeError(f"{argument} must be a list of module names, got the string {layers!r}")
        unknown = [n for n in layers if n not in names]
        if unknown:
            raise ValueError(f"{argument} names no module of the model: {unknown}")
        return [n for n in names if n in set(layers)]  # torch-cka keeps the model's order

    def compare(self, dataloader1, dataloader2=None) -> None:
        """The CKA of every layer pair over the paired batches (model 2 on
        dataloader2 when given); the result goes to self.hsic_matrix, float32."""
        if dataloader2 is None:
            warn("Dataloader for Model 2 is not given. Using the same dataloader for both models.")
        self.model1_info["Dataset"] = _dataset_name(dataloader1)
        self.model2_info["Dataset"] = _dataset_name(dataloader1 if dataloader2 is None else dataloader2)
        matrix, _, _ = loader_cka(self.model1, self.model2, self.model1_info["Layers"], self.model2_info["Layers"],
                                  dataloader1, dataloader2, estimator=self.estimator,
                                  names=(self.model1_info["Name"], self.model2_info["Name"]), device=self.device)
        self.hsic_matrix = matrix.to(torch.float32)

    def export(self) -> dict:
        """The CKA matrix with the model names, layer lists and dataset names."""
        if self.hsic_matrix is None:
            raise ValueError("nothing to export: call compare() first")
        return {"model1_name": self.model1_info["Name"], "model2_name": self.model2_info["Name"],
                "CKA": self.hsic_matrix, "model1_layers": self.model1_info["Layers"],
                "model2_layers": self.model2_info["Layers"], "dataset1_name": self.model1_info["Dataset"],
                "dataset2_name": self.model2_info["Dataset"]}

    def plot_results(self, save_path: str | None = None, title: str | None = None):
        """torch-cka's heatmap: magma over the matrix's own range, origin
        lower, layer indices on the axes, a colourbar as tall as the plot;
        saved at 300 dpi when save_path is given, then plt.show()."""
        import matplotlib.pyplot as plt

        if self.hsic_matrix is None:
            raise ValueError("nothing to plot: call compare() first")
        fig, ax = plt.subplots()
        image = ax.imshow(self.hsic_matrix.cpu().numpy(), origin="lower", cmap="magma")
        ax.set_xlabel(f"Layers {self.model2_info['Name']}", fontsize=15)
        ax.set_ylabel(f"Layers {self.model1_info['Name']}", fontsize=15)
        ax.set_title(f"{title}" if title is not None else f"{self.model1_info['Name']} vs {self.model2_info['Name']}",
                     fontsize=18)
        _colorbar(image)
        plt.tight_layout()
        if save_path is not None:
            plt.savefig(save_path, dpi=300)
        plt.show()


def _colorbar(image, aspect: float = 10, pad_fraction: float = 0.5):
    """A colourbar beside the image's axes, as tall as they are, 1/aspect of
    their height wide, half its width away (torch-cka's add_colorbar)."""
    import matplotlib.pyplot as plt
    from mpl_toolkits import axes_grid1

    divider = axes_grid1.make_axes_locatable(image.axes)
    width = axes_grid1.axes_size.AxesY(image.axes, aspect=1.0 / aspect)
    current = plt.gca()
    cax = divider.append_axes("right", size=width, pad=axes_grid1.axes_size.Fraction(pad_fraction, width))
    plt.sca(current)
    return image.axes.figure.colorbar(image, cax=cax)


def _dataset_name(loader) -> str:
    dataset = getattr(loader, "dataset", None)
    return (dataset.__repr__() if dataset is not None else type(loader).__name__).split("\n")[0]
