"""torch-cka 0.21's `CKA` call shape (PyPI `torch-cka`, ../shared/PEERS.md),
computed by spectral_ext: change `from torch_cka import CKA` to
`from spectral_ext.compat.torch_cka import CKA`.

Same arguments, layer order and export; the numbers are the minibatch
linear CKA of [NRK21] that torch-cka computes (per-batch unbiased HSIC of
the flattened features, averaged over batches), here accumulated in float64
on centred features (spectral_ext.similarity.MinibatchCKA): torch-cka's
float32 Grams of uncentred features are off by up to 293% on ReLU
activations. Differences, all deliberate: the hooks live only while
compare() runs (torch-cka leaves them on the models for good), the models
run in eval mode and get their mode back, and an undefined entry (a
constant layer) raises ValueError naming it (torch-cka fails an assert)."""
from __future__ import annotations

import contextlib
from warnings import warn

import torch
from torch import nn

from .._data import batches
from .._hooks import capturing, evaluating
from ..similarity import MinibatchCKA


def _model_name(model: nn.Module) -> str:
    return model.__repr__().split("(")[0]


def loader_cka(model1: nn.Module, model2: nn.Module, layers1: list[str], layers2: list[str], loader1,
               loader2=None, progress: bool = True, order: str = "forward", names=("model1", "model2")):
    """The (len(layers1), len(layers2)) minibatch linear CKA of two models'
    flattened layer outputs over paired batches of loader1 and loader2
    (loader1 for both when None), float64 (MinibatchCKA). order="forward":
    rows and columns in the order the layers first ran in the first batch
    (torch-cka's), "given": as listed. Returns (matrix, rows, columns)."""
    from tqdm.auto import tqdm

    shared = model1 is model2 and loader2 is None
    accumulator = MinibatchCKA("linear", unbiased=True)
    rows = cols = None
    pairs = ((b, b) for b in batches(loader1)) if loader2 is None else zip(batches(loader1), batches(loader2))
    with contextlib.ExitStack() as stack, torch.no_grad():
        stack.enter_context(evaluating(model1, model2))
        store1, _ = stack.enter_context(capturing(model1, sorted(set(layers1) | (set(layers2) if shared else set()))))
        store2 = store1 if shared else stack.enter_context(capturing(model2, layers2))[0]
        device = next(iter(model1.parameters()), torch.empty(0)).device
        for (x1, _), (x2, _) in tqdm(pairs, desc="| Comparing features |", disable=not progress, leave=False):
            store1.clear()
            store2.clear()
            if x1.shape[0] <= 3:
                raise ValueError(f"HSIC requires batch size > 3, got {x1.shape[0]}: use batches of 4 or more")
            model1(x1.to(device))
            if not shared:
                model2(x2.to(next(iter(model2.parameters()), torch.empty(0)).device))
            missing = [n for n in layers1 if n not in store1] + [n for n in layers2 if n not in store2]
            if missing:
                raise ValueError(f"layers {missing} did not run in the forward pass")
            if rows is None:
                if order == "forward":
                    rows = [n for n in store1 if n in layers1]
                    cols = [n for n in store2 if n in layers2] if not shared else [n for n in store1 if n in layers2]
                else:
                    rows, cols = list(layers1), list(layers2)
            flat1 = [store1[n].detach().flatten(1)[:, :, None] for n in rows]
            flat2 = [store2[n].detach().flatten(1)[:, :, None] for n in cols]
            accumulator.update(flat1, None if shared and rows == cols else flat2, feature_axis=1)
    if rows is None:
        raise ValueError("dataloader1 produced no batch")
    matrix = accumulator.value([f"{names[0]} layer {n!r}" for n in rows], [f"{names[1]} layer {n!r}" for n in cols],
                               undefined="raise")
    return matrix, rows, cols


class CKA:
    """torch-cka's CKA(model1, model2, model1_name=None, model2_name=None,
    model1_layers=None, model2_layers=None, device='cpu'): .compare(
    dataloader1, dataloader2=None), .export() and .plot_results(save_path=None,
    title=None). Layers default to every module, the model itself included
    (named_modules order), as in torch-cka."""

    def __init__(self, model1: nn.Module, model2: nn.Module, model1_name: str | None = None,
                 model2_name: str | None = None, model1_layers: list[str] | None = None,
                 model2_layers: list[str] | None = None, device: str = "cpu"):
        for name, model in (("model1", model1), ("model2", model2)):
            if not isinstance(model, nn.Module):
                raise TypeError(f"{name} must be a torch.nn.Module, got {type(model).__name__}")
        self.model1, self.model2, self.device = model1.to(device), model2.to(device), device
        self.model1_info = {"Name": _model_name(model1) if model1_name is None else model1_name}
        self.model2_info = {"Name": _model_name(model2) if model2_name is None else model2_name}
        if self.model1_info["Name"] == self.model2_info["Name"]:
            warn(f"Both model have identical names - {self.model2_info['Name']}. It may cause confusion when "
                 "interpreting the results. Consider giving unique names to the models :)")
        self.model1_layers, self.model2_layers = model1_layers, model2_layers
        self.model1_info["Layers"] = self._layers(model1, model1_layers, "model1_layers")
        self.model2_info["Layers"] = self._layers(model2, model2_layers, "model2_layers")
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
        dataloader2 when given); the result goes to self.hsic_matrix."""
        if dataloader2 is None:
            warn("Dataloader for Model 2 is not given. Using the same dataloader for both models.")
        self.model1_info["Dataset"] = _dataset_name(dataloader1)
        self.model2_info["Dataset"] = _dataset_name(dataloader1 if dataloader2 is None else dataloader2)
        matrix, _, _ = loader_cka(self.model1, self.model2, self.model1_info["Layers"], self.model2_info["Layers"],
                                  dataloader1, dataloader2, order="forward",
                                  names=(self.model1_info["Name"], self.model2_info["Name"]))
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
        """torch-cka's heatmap (magma, origin lower, layer indices on the
        axes, a colourbar), saved at 300 dpi when save_path is given."""
        import matplotlib.pyplot as plt

        if self.hsic_matrix is None:
            raise ValueError("nothing to plot: call compare() first")
        fig, ax = plt.subplots()
        image = ax.imshow(self.hsic_matrix.numpy(), origin="lower", cmap="magma", vmin=0, vmax=1)
        for axis, names in ((ax.xaxis, self.model2_info["Layers"]), (ax.yaxis, self.model1_info["Layers"])):
            if len(names) <= 30:  # named ticks where they fit (torch-cka shows fractional indices)
                axis.set_ticks(range(len(names)), [n if n else "(model)" for n in names], fontsize=8)
            else:
                from matplotlib.ticker import MaxNLocator
                axis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(axis="x", labelrotation=60)
        ax.set_xlabel(f"Layers {self.model2_info['Name']}", fontsize=15)
        ax.set_ylabel(f"Layers {self.model1_info['Name']}", fontsize=15)
        ax.set_title(title if title is not None else f"{self.model1_info['Name']} vs {self.model2_info['Name']}",
                     fontsize=18)
        fig.colorbar(image, ax=ax, label="CKA")
        fig.tight_layout()
        if save_path is not None:
            fig.savefig(save_path, dpi=300)
        plt.show()


def _dataset_name(loader) -> str:
    dataset = getattr(loader, "dataset", None)
    return (dataset.__repr__() if dataset is not None else type(loader).__name__).split("\n")[0]
