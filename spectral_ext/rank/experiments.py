"""The experiments of seed 003 section 4 (4.1 and 4.3): the
structural-impetus probes of Fig. 3 and the MLP-50 rank decay of Fig. 1
d-f under Theorem 5."""
from __future__ import annotations

import copy
import math
import warnings

import pandas as pd
import torch
from torch import nn

from .. import _checks
from ._common import _check_eps, _rank_of_singular_values
from .matrix import numerical_rank
from .pca import pca_dimension, pca_eigenvalues

class _Attention(nn.Module):
    """Self-attention over the spatial positions of (N, C, H, W) features."""

    def __init__(self, channels: int, heads: int):
        super().__init__()
        self.attention = nn.MultiheadAttention(channels, heads, batch_first=True)

    def forward(self, x):
        N, C, H, W = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        return self.attention(tokens, tokens, tokens, need_weights=False)[0].transpose(1, 2).reshape(N, C, H, W)


def default_components(channels: int = 128, size: int = 8) -> dict[str, nn.Module]:
    """The components of seed 003 Fig. 3 (section 4.3) with random weights.

    They are: 3x3 convolution, FC layer, BatchNorm (batch statistics), LayerNorm, InstanceNorm, GroupNorm, attention,
    and ReLU.

    Args:
        channels: the number of channels of the (N, channels, size, size) features (default 128).
        size: the spatial height and width of the features (default 8).

    Returns:
        A dict from component name ("conv3x3", "fc", "batchnorm", "layernorm", "instancenorm", "groupnorm",
        "attention", "relu") to a freshly initialised nn.Module.
    """
    flat = channels * size * size
    heads = 4 if channels % 4 == 0 else 1
    return {
        "conv3x3": nn.Conv2d(channels, channels, 3, padding=1),
        "fc": nn.Sequential(nn.Flatten(), nn.Linear(flat, flat), nn.Unflatten(1, (channels, size, size))),
        "batchnorm": nn.BatchNorm2d(channels),
        "layernorm": nn.LayerNorm([channels, size, size]),
        "instancenorm": nn.InstanceNorm2d(channels, affine=True),
        "groupnorm": nn.GroupNorm(min(32, channels) if channels % min(32, channels) == 0 else 1, channels),
        "attention": _Attention(channels, heads),
        "relu": nn.ReLU(),
    }


def structural_impetus(components: dict[str, nn.Module] | None = None, channels: int = 128, size: int = 8,
                       n_samples: int = 5000, eps: float | None = None, dtype=torch.float64,
                       generator=0, progress: bool = True) -> pd.DataFrame:
    """The structural-impetus probe of seed 003 section 4.3 (Fig. 3).

    Standard Gaussian inputs of shape (channels, size, size) go through an FC layer of channels*size*size units, then
    the component; the PCA dimension of the features and the rank of the Jacobian are measured before and after the
    component (paper: 128 x 8 x 8, 8,192 units, 5,000 samples). Components are used in train mode (BatchNorm on batch
    statistics; copies, so the caller's modules are left alone), with their random initialisation. The Jacobian is the
    full one of input -> features at the first sample, batch statistics held fixed.

    Args:
        components: name -> nn.Module; None (default) for default_components(channels, size).
        channels: channels of the features (default 128).
        size: spatial height and width of the features (default 8).
        n_samples: the number of Gaussian inputs (default 5000).
        eps: the rank tolerance, as in equation 4 with the float32 default (None).
        dtype: the dtype of the weights, inputs and components (default torch.float64).
        generator: the FC weights and the inputs (an int seed, a torch.Generator, None for torch's global RNG); 0 by
            default so that the figure is the same on every run.
        progress: show a progress bar over the components (default True).

    Returns:
        A DataFrame with columns component, stage ("before"/"after"), pca_dimension, jacobian_rank, ambient
        (channels*size*size).
    """
    n_samples = _checks.positive_int("n_samples", n_samples)
    channels = _checks.positive_int("channels", channels)
    size = _checks.positive_int("size", size)
    if components is None:
        components = default_components(channels, size)
    if not components:
        raise ValueError("components is empty")
    flat = channels * size * size
    g = _checks.generator(generator)
    fc = nn.Linear(flat, flat).to(dtype)
    with torch.no_grad():
        fc.weight.copy_(torch.randn(flat, flat, generator=g, dtype=dtype) / math.sqrt(flat))
        fc.bias.zero_()
    inputs = torch.randn(n_samples, flat, generator=g, dtype=dtype)
    from tqdm.auto import tqdm

    rows = []
    with torch.no_grad():
        before = fc(inputs).reshape(n_samples, channels, size, size)
    rank_before = int(numerical_rank(fc.weight.detach(), eps))
    for name, component in tqdm(components.items(), desc="structural impetus", disable=not progress, leave=False):
        component = copy.deepcopy(component).to(dtype).train()
        for module in component.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.momentum = None  # the running statistics become this batch's statistics
        with torch.no_grad():
            after = component(before)
        if after.shape[0] != n_samples:
            raise ValueError(f"component {name!r} changed the batch size")
        component.eval()  # the Jacobian at one sample, batch statistics held fixed

        def features(v, component=component):
            return component(fc(v[None]).reshape(1, channels, size, size)).reshape(-1)

        with warnings.catch_warnings():  # attention's backward has no vmap rule: slower, not wrong
            warnings.filterwarnings("ignore", message="There is a performance drop")
            J = torch.func.jacrev(features)(inputs[0])
        rows.append({"component": name, "stage": "before", "pca_dimension": pca_dimension(before, eps),
                     "jacobian_rank": rank_before, "ambient": flat})
        rows.append({"component": name, "stage": "after", "pca_dimension": pca_dimension(after, eps),
                     "jacobian_rank": int(numerical_rank(J.detach(), eps)), "ambient": flat})
    return pd.DataFrame(rows)


def theorem5_slopes(n: int) -> torch.Tensor:
    """lim (1/L) log(sigma_k / sigma_1) = (psi((n-k+1)/2) - psi(n/2)) / 2 for k = 1..n (seed 003 Theorem 5).

    Equation 10, from the Lyapunov exponents of Ginibre products, equation A93.

    Args:
        n: the width of the square Gaussian layers (a positive int).

    Returns:
        A float64 tensor of shape (n,); entry k-1 is the slope of sigma_k.
    """
    n = _checks.positive_int("n", n)
    k = torch.arange(1, n + 1, dtype=torch.float64)
    half_n = torch.tensor(n / 2.0, dtype=torch.float64)
    return (torch.special.digamma((n - k + 1) / 2) - torch.special.digamma(half_n)) / 2


def mlp_rank_decay(depth: int = 50, width: int = 1000, n_samples: int | None = None, eps: float | None = None,
                   ks=(2,), dtype=torch.float32, generator=0,
                   device=None, progress: bool = True) -> pd.DataFrame:
    """The MLP-50 experiment of seed 003 section 4.3 (Fig. 1 d-f) under the conditions of Theorem 5.

    depth dense layers of width units with i.i.d. Gaussian weights (scaled by 1/sqrt(width), which leaves every
    sigma_k / sigma_1 unchanged and keeps float32 finite) on Gaussian inputs. Per layer l: jacobian_rank, the numerical
    rank of J_l = W_l ... W_1; feature_dimension, the numerical rank (equation 4 on PCA eigenvalues) of the covariance
    of the layer's features on n_samples inputs; and log_ratio_k = log(sigma_k / sigma_1) of J_l for each k in ks,
    which Theorem 5 predicts to fall linearly in l with slope theorem5_slopes(width)[k-1] (NaN once the ratio is below
    what dtype resolves). The paper stops where float32 entries underflow; here J is rescaled each layer (ratios
    unchanged), so the run goes on until the Jacobian's rank reaches 1 or depth is reached.

    Args:
        depth: the maximum number of layers (default 50).
        width: the units per layer (default 1000).
        n_samples: the number of Gaussian inputs for feature_dimension (default None: 2 x width).
        eps: the rank tolerance of equation 4 (None: the float32 default).
        ks: the k, each in [1, width], whose log_ratio_k is reported (default (2,)).
        dtype: the dtype of weights, inputs and Jacobian (default torch.float32).
        generator: the weights and inputs (an int seed, a torch.Generator, None for torch's global RNG); 0 by default
            so that the figure is the same on every run.
        device: where the products and SVDs run (default None: the CPU).
        progress: show a progress bar over the layers (default True).

    Returns:
        A DataFrame with columns layer (1-based depth), jacobian_rank, feature_dimension and log_ratio_k per k, one row
        per layer.
    """
    depth = _checks.positive_int("depth", depth)
    width = _checks.positive_int("width", width)
    n_samples = 2 * width if n_samples is None else _checks.positive_int("n_samples", n_samples)
    ks = _checks.integers("ks", ks, low=1, high=width)
    _check_eps(eps)
    g = _checks.generator(generator)
    floor = math.log(1e3 * torch.finfo(dtype).eps)
    from tqdm.auto import tqdm

    J = torch.eye(width, dtype=dtype, device=device)
    features = torch.randn(n_samples, width, generator=g, dtype=dtype).to(device)
    rows = []
    for layer in tqdm(range(1, depth + 1), desc="MLP rank decay", disable=not progress, leave=False):
        W = (torch.randn(width, width, generator=g, dtype=dtype) / math.sqrt(width)).to(device)
        J = W @ J
        J = J / J.abs().max()  # ratios of singular values are scale free; stay finite
        features = features @ W.T
        features = features / features.abs().max()
        sigma = torch.linalg.svdvals(J)  # one SVD for the rank and the ratios
        rank = _rank_of_singular_values(sigma, eps)
        ratios = (sigma / sigma[0]).double().log().cpu()
        row = {"layer": layer, "jacobian_rank": int(rank),
               "feature_dimension": int(_rank_of_singular_values(pca_eigenvalues(features), eps))}
        for k in ks:
            row[f"log_ratio_{k}"] = float(ratios[k - 1]) if ratios[k - 1] > floor else float("nan")
        rows.append(row)
        if int(rank) <= 1:
            break
    return pd.DataFrame(rows)
