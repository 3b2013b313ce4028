"""Private helpers shared by the rank-diminishing modules (seed 003): the
float32 tolerance of section 4.3, equation 4 on singular values, capturing
sub-network outputs, and the (features, labels) data of sections 3.3
and 5."""
from __future__ import annotations

import torch

from .. import _checks, _data
from .._hooks import first_tensor, forward

FLOAT32_EPS = float(torch.finfo(torch.float32).eps)
OUTPUT = "output"


def _check_eps(eps):
    if eps is not None:
        _checks.number("eps", eps, low=0)


def _rank_of_singular_values(sigma: torch.Tensor, eps: float | None, count: int | None = None) -> torch.Tensor:
    """Equation 4 on decreasing singular values; the default tolerance is the
    paper's float32 eps x N with N the number of singular values (section 4.3)."""
    k = sigma.shape[-1] if count is None else count
    tolerance = FLOAT32_EPS * k if eps is None else float(eps)
    top = sigma[..., :1] if sigma.shape[-1] else sigma.new_zeros(*sigma.shape[:-1], 1)
    return (sigma > tolerance * top).sum(-1)


def _outputs(model, x, captured, order, layers):
    captured.clear()
    order.clear()
    out = first_tensor(forward(model, _data.copy_inputs(x)))
    missing = [name for name in layers if name not in captured]
    if missing:
        raise ValueError(f"layers {missing} did not run in the model's forward pass")
    return [captured[name] for name in order] + [out]


def _forward_elements(model, run) -> int:
    """How many elements the leaf modules of model output during run(): the
    activations one forward pass materialises, whether captured or not."""
    count = [0]

    # Counting, not capturing: _hooks.capturing would keep every output alive, the memory this estimates.
    def hook(module, args, output):
        if isinstance(output, torch.Tensor):
            count[0] += output.numel()

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return count[0]


def _check_features_labels(features, labels, name="features"):
    _checks.tensor(name, features, ndims=(2,), shape="(N, d)")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.dtype.is_floating_point \
            or labels.dtype == torch.bool:
        raise TypeError("labels must be an integer tensor of shape (N,)")
    if labels.shape[0] != features.shape[0]:
        raise ValueError(f"labels has {labels.shape[0]} entries but {name} has {features.shape[0]} rows")
    if features.shape[0] < 2:
        raise ValueError(f"{name} needs at least two samples")
    if features.shape[1] == 0:
        raise ValueError(f"{name} has no feature column")


def _features_labels(data, name: str):
    """The (features (N, d), labels (N,)) of data (a pair of tensors or any
    form _data.batches takes, with labels), checked; `name` is how errors
    call the features ("data features", "data logits")."""
    features, labels = _data.gather(data, labels=True)
    _check_features_labels(features, labels, name)
    return features, labels
