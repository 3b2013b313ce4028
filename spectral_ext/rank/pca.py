"""PCA dimensions (seed 003 section 4.3 and appendix E, equation A103,
Algorithm A2): the PCA dimension of features and the perturbed PCA
dimension of every layer around a sample."""
from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import nn

from .. import _checks, _data
from .._hooks import capturing, check_layers, evaluating
from ._common import FLOAT32_EPS, OUTPUT, _check_eps, _forward_elements, _outputs, _rank_of_singular_values
from .matrix import singular_values_of_rows

def pca_eigenvalues(features: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of the sample covariance of features, decreasing, in float64.

    Computed through the smaller Gram matrix of the centred features (the PCA spectrum of seed 003 section 4.3 and
    appendix E).

    Args:
        features: (n, d) samples; further axes are flattened into d.

    Returns:
        A float64 tensor of the covariance eigenvalues, in decreasing order.
    """
    X = features.reshape(features.shape[0], -1).double()
    X = X - X.mean(0, keepdim=True)
    return singular_values_of_rows(X).square() / max(X.shape[0] - 1, 1)


def pca_dimension(features: torch.Tensor, eps: float | None = None) -> int:
    """#{PCA eigenvalues > eps * largest} (seed 003 section 4.3, equation 4 on the PCA spectrum).

    Args:
        features: (n, ...) samples.
        eps: the relative tolerance; by default (None) eps = float32 eps x N with N the number of PCA eigenvalues.

    Returns:
        An int.
    """
    _checks.tensor("features", features, ndims=range(2, 8), shape="(n, ...)")
    _check_eps(eps)
    return int(_rank_of_singular_values(pca_eigenvalues(features), eps))


@dataclass(frozen=True, eq=False)  # DataFrames have no single truth value
class PerturbedPCADimension:
    """Result of perturbed_pca_dimension (seed 003 appendix E): the PCA
    dimension of each sample's perturbations at the input and every chosen
    layer.

    layers: the rows' layers, "input" first, then the layers in forward
    order, the model output (OUTPUT) last; n_perturbations, scale, eps: the
    options it was computed with (eps None: float32 eps x n_perturbations);
    table: one row per (sample, layer), columns sample, layer,
    pca_dimension, delta_dimension."""

    layers: tuple[str, ...]
    n_perturbations: int
    scale: float
    eps: float | None
    table: pd.DataFrame = field(repr=False)

    def to_frame(self) -> pd.DataFrame:
        """The table: columns sample, layer, pca_dimension, delta_dimension;
        average over samples with .groupby("layer", sort=False).mean()."""
        return self.table.copy()


def perturbed_pca_dimension(model: nn.Module, layers=None, data=None, n_perturbations: int = 1000,
                            scale: float = 1e-3, eps: float | None = None, batch_size: int = 250,
                            generator: torch.Generator | None = None,
                            progress: bool = True) -> PerturbedPCADimension:
    """Perturbed PCA dimension (seed 003 appendix E, equation A103, Algorithm A2).

    For each sample x_i, the PCA dimension of {F_k(x_i + scale * e)} over n_perturbations Gaussian e, for the input
    and every chosen layer. The model runs in eval mode and is given back unchanged. The features of all
    n_perturbations are kept for the PCA: the peak memory is estimated from one forward pass first, and a ValueError
    asks for fewer n_perturbations or layers when it exceeds the free memory.

    Args:
        model: the network.
        layers: qualified module names (None: the model's top-level
            children); the model output is always the last row.
        data: (N, ...) samples, a tensor or any form _data.batches takes
            (labels unused), each perturbed separately and sent through the
            model in batches of batch_size.
        n_perturbations: the number of Gaussian perturbations per sample (default 1000).
        scale: the size of the perturbations, positive (default 1e-3).
        eps: eigenvalues count when above eps x the largest; default the
            appendix's float32 eps x n_perturbations (1.19e-7 x 50,000
            there, with scale = 1e-3).
        batch_size: perturbed inputs per forward pass (default 250).
        generator: the Gaussian perturbations (an int seed, a
            torch.Generator, None for torch's global RNG).
        progress: show a progress bar (default True).

    Returns:
        A PerturbedPCADimension; .to_frame() has columns sample, layer
        ("input" first, then the layers in forward order, the model output
        last), pca_dimension and delta_dimension (the layer's dimension
        minus the input's: the Delta Dimension of Fig. A6, negative where
        dimensions are lost).
    """
    if data is None:
        raise TypeError("perturbed_pca_dimension() needs data: a tensor, a DataLoader or an iterable of batches")
    x = _data.gather(data)[0]
    _checks.tensor("data", x, ndims=range(2, 6), shape="(N, ...)")
    n_perturbations = _checks.positive_int("n_perturbations", n_perturbations)
    batch_size = _checks.positive_int("batch_size", batch_size)
    scale = _checks.number("scale", scale, low=0, low_open=True)
    _check_eps(eps)
    generator = _checks.generator(generator)
    tolerance = FLOAT32_EPS * n_perturbations if eps is None else float(eps)
    layers = check_layers(model, layers)
    from tqdm.auto import tqdm

    if x.shape[0] == 0:
        raise ValueError("data holds no sample")
    rows = []
    steps = -(-n_perturbations // batch_size)
    with capturing(model, layers) as (captured, order), torch.no_grad(), evaluating(model):
        result = []
        activations = _forward_elements(model, lambda: result.append(_outputs(model, x[:1], captured, order, layers)))
        sizes = [x[0].numel()] + [o[0].numel() for o in result[0]]
        _checks.memory(_pca_peak_bytes(n_perturbations, sizes, x.element_size(), batch_size, activations), x.device,
                       f"the perturbed PCA dimension of {n_perturbations} perturbations of {sum(sizes)} features",
                       "use fewer n_perturbations or fewer (or smaller) layers")
        with tqdm(total=x.shape[0] * steps, desc="perturbed PCA dimension", disable=not progress, leave=False) as bar:
            for n in range(x.shape[0]):
                chunks: dict[str, list[torch.Tensor]] = {}
                names = []
                for start in range(0, n_perturbations, batch_size):
                    count = min(batch_size, n_perturbations - start)
                    noise = torch.randn((count, *x.shape[1:]), generator=generator, dtype=x.dtype,
                                        device=x.device if generator is None else generator.device)
                    inputs = x[n:n + 1] + scale * noise.to(x.device)
                    outs = _outputs(model, inputs, captured, order, layers)
                    names = ["input"] + list(order) + [OUTPUT]
                    for name, out in zip(names, [inputs] + outs):
                        chunks.setdefault(name, []).append(out.reshape(count, -1))
                    bar.update(1)
                dims = {name: int(_rank_of_singular_values(pca_eigenvalues(torch.cat(chunks[name])), tolerance,
                                                            count=1))
                        for name in names}
                for name in names:
                    rows.append({"sample": n, "layer": name, "pca_dimension": dims[name],
                                 "delta_dimension": dims[name] - dims["input"]})
    return PerturbedPCADimension(tuple(names), n_perturbations, scale, eps, pd.DataFrame(rows))


def _pca_peak_bytes(n: int, sizes: list[int], itemsize: int, batch_size: int, activations: int) -> int:
    """Peak memory of perturbed_pca_dimension for one sample: the stored
    features of every layer (n x size), one batch's forward pass
    (`activations` elements per input), and the largest float64 PCA (the
    concatenated features, two float64 copies and the smaller Gram matrix)."""
    stored = n * sum(sizes) * itemsize
    forward = 2 * min(batch_size, n) * (activations + sum(sizes)) * itemsize
    factor = max(n * F * itemsize + 16 * n * F + 8 * min(n, F) ** 2 for F in sizes)
    return stored + forward + factor
