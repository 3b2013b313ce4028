"""Feature layouts of representations: which axis of a layer's output holds
its features (seed 004 appendix D.7), (N, C, S) channels, samples first,
and the exact power-of-two scaling that keeps squares in range.

Features are (N, d), (N, C, H, W) or any layout with a feature axis: the
feature (channel) axis is axis 1 for 2-D and 4-D/5-D inputs (conv), and a
3-D input (N, tokens, features) or (N, C, L) must say it (`feature_axis=`);
the other axes are positions, summed over (appendix D.7), so the G_ReLU
measures are invariant to permuting and positively scaling channels, not
positions. similarity_matrix decides the axis from the layer that produced
the features (a Linear, LayerNorm or attention: last axis, so transformers'
hidden states (B, T, C) and Swin's (B, H, W, C) give their C channels, the
tokens and spatial positions alike as positions; a conv: axis 1)."""
from __future__ import annotations

import math

import torch
from torch import nn

from .. import _checks

# Modules whose output keeps its features on the last axis (token layouts) or on axis 1 (conv layouts).
_LAST_AXIS = (nn.Linear, nn.Bilinear, nn.LayerNorm, nn.Embedding, nn.MultiheadAttention,
              nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.RMSNorm)
_AXIS_1 = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm,
           nn.GroupNorm, nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
           nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd, nn.Upsample)


def _module_axis(module: nn.Module):
    name = type(module).__name__
    if isinstance(module, nn.LayerNorm) and name.lower().endswith("2d"):
        return 1  # torchvision's / timm's LayerNorm2d: channels-first in and out
    if isinstance(module, _LAST_AXIS):
        return -1
    if isinstance(module, _AXIS_1):
        return 1
    if name == "Conv1D" and hasattr(module, "nf"):
        return -1  # transformers' Conv1D (GPT-2): a Linear with its weight transposed
    if name.endswith(("RMSNorm", "LayerNorm")) and not any(True for _ in module.children()):
        return -1  # the norms of transformers models (LlamaRMSNorm, T5LayerNorm, ...): the last axis
    return None


def _permutation(module: nn.Module):
    """The dims of a module that only permutes its input's axes
    (torchvision.ops.Permute: Swin's and ConvNeXt's (B, H, W, C) <-> (B, C,
    H, W)), else None."""
    dims = getattr(module, "dims", None)
    if type(module).__name__ == "Permute" and isinstance(dims, (list, tuple)) and \
            sorted(dims) == list(range(len(dims))):
        return list(dims)
    return None


def _permuted(axis, dims):
    """Where axis (1 or -1 of a len(dims)-D tensor) lands after permute(dims): -1 for the last axis."""
    if axis is None:
        return None
    moved = list(dims).index(axis % len(dims))
    return None if moved == 0 else (-1 if moved == len(dims) - 1 else moved)


def _follow(axis, modules):
    """axis after the modules (in order): a deciding module sets it, a Permute moves it."""
    for module in modules:
        dims = _permutation(module)
        if dims is not None:
            axis = _permuted(axis, dims)
            continue
        decided = _module_axis(module)
        if decided is not None:
            axis = decided
    return axis


def layer_feature_axis(model: nn.Module, layer: str) -> int | None:
    """The feature axis of `layer`'s output (the channels that seed 004 appendix D.7 transforms).

    Read from the layer: -1 after a Linear (or LayerNorm, RMSNorm, attention, embedding, transformers'
    Conv1D), 1 after a conv (or BatchNorm, pooling, LayerNorm2d). A container answers for its last
    deciding leaf; an elementwise module (ReLU, Dropout, ...) for the nearest deciding module defined
    before it. A Permute module between (torchvision's Swin and ConvNeXt: (B, H, W, C) <-> (B, C, H, W))
    moves the axis with it.

    Args:
        model: the network holding the layer.
        layer: the layer's qualified module name.

    Returns:
        -1 or 1, or None when nothing decides (the caller must say).
    """
    modules = list(model.named_modules())
    names = [n for n, _ in modules]
    index = names.index(layer)
    module = modules[index][1]
    if _module_axis(module) is not None:
        return _module_axis(module)
    own = list(module.modules())[1:]
    deciding = [i for i, m in enumerate(own) if _module_axis(m) is not None]
    if deciding:
        return _follow(None, own[deciding[-1]:])
    dims = _permutation(module)
    for j in range(index - 1, -1, -1):
        if _module_axis(modules[j][1]) is not None:
            between = [m for _, m in modules[j:index]] + own + ([module] if dims is not None else [])
            return _follow(None, between)
    return None


def _layer_sample_axis(model: nn.Module, layer: str) -> int:
    """The sample axis of `layer`'s output: 1 for a sequence-first module
    (batch_first=False: nn.MultiheadAttention, nn.TransformerEncoderLayer,
    nn.LSTM, ... give (T, B, C)), else 0."""
    module = model.get_submodule(layer)
    if isinstance(module, (nn.TransformerEncoder, nn.TransformerDecoder)) and len(module.layers):
        module = module.layers[0]
    return 1 if getattr(module, "batch_first", None) is False else 0


def _feature_axis_of(name: str, X: torch.Tensor, feature_axis) -> int:
    if feature_axis is None:
        if X.dim() == 3:
            raise ValueError(f"{name} is 3-D {tuple(X.shape)}: (N, tokens, features) or (N, C, L) is ambiguous; "
                             "say which axis holds the features with feature_axis=-1 (tokens, after a Linear) "
                             "or feature_axis=1 (channels, after a conv)")
        return 1
    if isinstance(feature_axis, bool) or not isinstance(feature_axis, int):
        raise TypeError(f"feature_axis must be an int, got {type(feature_axis).__name__}")
    axis = feature_axis % X.dim() if -X.dim() <= feature_axis < X.dim() else None
    if axis is None or axis == 0:
        raise ValueError(f"feature_axis must name an axis of {name} other than the sample axis 0, "
                         f"got {feature_axis} for shape {tuple(X.shape)}")
    return axis


def as_channels(name: str, X: torch.Tensor, feature_axis: int | None = None) -> torch.Tensor:
    """Features in the layout of seed 004 appendix D.7 (positions summed over): (N, channels, positions).

    (N, d) -> (N, d, 1); (N, C, *spatial) -> (N, C, S). Empty inputs raise ValueError.

    Args:
        name: the argument's name, for error messages.
        X: (N, d) or (N, C, *spatial) features, 2 to 6 dimensions.
        feature_axis: the axis holding C (default None: axis 1; a 3-D input must say).

    Returns:
        A tensor (N, C, S), a view of X where possible.
    """
    _checks.tensor(name, X, ndims=range(2, 7), shape="(N, d), (N, C, H, W) or (N, tokens, features)")
    axis = _feature_axis_of(name, X, feature_axis)
    X = X.movedim(axis, 1)
    if X.shape[1] == 0 or X.shape[0] == 0:
        raise ValueError(f"{name} has no samples or no features (shape {tuple(X.shape)})")
    return X.reshape(X.shape[0], X.shape[1], -1)


def _pair(X, Y, feature_axis=None):
    X, Y = as_channels("X", X, feature_axis), as_channels("Y", Y, feature_axis)
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"X and Y must hold the same N samples, got {X.shape[0]} and {Y.shape[0]}")
    if X.device != Y.device:
        raise ValueError(f"Y is on {Y.device} but X is on {X.device}; move them to one device")
    return X, Y


# Largest magnitudes 2^-e .. 2^e (e by dtype) are used as they are: their squares, Grams and the float64 fourth
# powers of the HSICs stay far from overflow and underflow. Outside, a representation is scaled by a power of two
# first (exact, and every measure here is scale invariant: CKA at 1e150 was 5.7e300 without it).
_SAFE_EXPONENT = {torch.float32: 16, torch.float64: 128}


def _exponent(R: torch.Tensor) -> int:
    """0 when R's largest magnitude lies within 2^+-_SAFE_EXPONENT, else the
    power of two e with max |R| / 2^e in [0.5, 1)."""
    if R.numel() == 0 or _checks.data_free(R):
        return 0
    low, high = torch.aminmax(R.detach())
    largest = max(-float(low), float(high))
    if not 0 < largest < math.inf:
        return 0
    e = math.frexp(largest)[1]
    return 0 if abs(e) <= _SAFE_EXPONENT.get(R.dtype, 16) else e


def _scaled(R: torch.Tensor, e: int) -> torch.Tensor:
    """R / 2^e, exactly (in two factors: 2^e alone may not be a float)."""
    if e == 0:
        return R
    half = -e // 2
    return R.mul(2.0 ** half).mul_(2.0 ** (-e - half))


def _rescaled(R: torch.Tensor) -> torch.Tensor:
    """R scaled by a power of two into a safe range, where it is outside it (_exponent)."""
    return _scaled(R, _exponent(R))


def channel_normalize(X: torch.Tensor, centered: bool = True) -> torch.Tensor:
    """Seed 004 appendix D.7.2 / definition 5.3: each channel centred and scaled to unit norm (X D_X^{-1}).

    Subtracts each channel's mean over samples and positions (centered=True), then divides by its norm
    over samples and positions. A constant channel stays zero. The sums run in X's dtype (torch's cascade
    sums: 1e-7 relative in float32, as float64 sums rounded back would give; 10x faster). X is scaled by
    a power of two first where its magnitude would overflow or underflow the squares (the result is scale
    invariant).

    Args:
        X: (N, C, S).
        centered: subtract each channel's mean first (default True).

    Returns:
        A tensor (N, C, S) of X's dtype.
    """
    X = _rescaled(X)
    zero = None
    if centered:
        zero = X.amax(dim=(0, 2), keepdim=True) == X.amin(dim=(0, 2), keepdim=True)  # exactly 0, not rounding
        X = X - X.sum(dim=(0, 2), keepdim=True) / (X.shape[0] * X.shape[2])
    norm = X.square().sum(dim=(0, 2), keepdim=True).sqrt_()
    zero = norm == 0 if zero is None else zero | (norm == 0)
    return X / norm.masked_fill_(zero, float("inf"))  # a zero channel divided by inf stays zero


def _samples_first(name, layer, R, samples: int | None, sample_axis: int = 0):
    """R with the batch's `samples` on axis 0: a sequence-first output (T, B,
    C) moved; an output whose first axis holds k x samples rows (Swin's
    window attention, (B windows, tokens, C), B outermost as its window
    partition lays them out) read as (B, k, ...): the windows are positions.
    ValueError naming the layer and the model for any other first axis (a
    position embedding the same for every sample, (1, T, C))."""
    if sample_axis and R.dim() > sample_axis:
        R = R.movedim(sample_axis, 0)
    if samples is None or R.dim() == 0 or R.shape[0] == samples:
        return R, False
    rows = R.shape[0]
    if samples and rows > samples and rows % samples == 0 and R.dim() >= 2:
        return R.reshape(samples, rows // samples, *R.shape[1:]), True
    why = " (it does not depend on the sample: a position embedding or a constant)" if rows == 1 else ""
    raise ValueError(f"{name}'s layer {layer!r} gives features {tuple(R.shape)} whose first axis holds {rows} "
                     f"row{'s' if rows != 1 else ''} for a batch of {samples} samples{why}: they cannot be "
                     "compared sample by sample; "
                     "choose a layer whose output is (samples, ...)")


def _channels_of(name, layer, R, axis, check: bool = True, samples: int | None = None, sample_axis: int = 0):
    """R laid out (N, C, S) by as_channels, its errors naming the layer and
    its model (similarity_matrix's only check: the measures take R as it
    is); check=False only moves the axes (the zoo's probe activations,
    checked by the measures). samples: the batch's sample count, R's first
    axis checked against it (_samples_first: windows folded into the
    samples are read as positions)."""
    R, folded = _samples_first(name, layer, R, samples, sample_axis)
    if folded:
        if axis is None and R.dim() == 3:
            axis = -1  # (B k, d) rows of features: the features stay last
        elif axis is not None and axis > 0:
            axis += 1  # the windows' axis sits before it now
    if axis is None and R.dim() >= 3 and (R.dim() != 4 or folded):
        raise ValueError(f"{name}'s layer {layer!r} gives {R.dim()}-D features {tuple(R.shape)} and nothing in "
                         "the model says which axis holds the features: pass feature_axis=")
    if axis is not None and R.dim() == 2:
        axis = 1
    label, axis = f"{name}'s layer {layer!r}", 1 if axis is None else axis
    if check or not 2 <= R.dim() <= 6:
        return as_channels(label, R, axis)
    X = R.movedim(_feature_axis_of(label, R, axis), 1)
    return X.reshape(X.shape[0], X.shape[1], -1)
