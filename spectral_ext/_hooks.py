"""Forward hooks that capture what named modules see or produce: the one
place every method module gets its activations from."""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from ._data import copy_inputs


def set_eval(*models):
    """Put the models in eval mode and return a function that gives back the
    .training flag of every submodule as it was (for code that cannot be
    one `with` block; prefer evaluating)."""
    saved = [(m, m.training) for model in models if model is not None for m in model.modules()]
    for model in models:
        if model is not None:
            model.eval()

    def restore():
        for m, flag in saved:
            m.training = flag

    return restore


@contextlib.contextmanager
def evaluating(*models):
    """Run the models in eval mode (BatchNorm on its running statistics, no
    dropout) and give each back as it came: the .training flag of every
    submodule is restored on exit, errors included (issue 14.2). None
    entries are skipped. The one place every analysis sets a model's mode."""
    restore = set_eval(*models)
    try:
        yield
    finally:
        restore()


def models_in_eval_mode(function):
    """Run `function` with every nn.Module among its arguments in eval mode,
    each given back as it came: for the weight-space entry points, which read
    weights and never train. A parametrized weight (spectral_norm) read in
    train mode runs a power iteration and changes the model's buffers."""
    import functools

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        values = [v for a in (*args, *kwargs.values())
                  for v in (a if isinstance(a, (list, tuple)) else a.values() if isinstance(a, dict) else (a,))]
        with evaluating(*[v for v in values if isinstance(v, nn.Module)]):
            return function(*args, **kwargs)

    return wrapper


def forward(model: nn.Module, x, name: str = "model", data: str = "data"):
    """model(x), with a model that cannot take the inputs (a shape or dtype
    mismatch inside it) reported as a ValueError naming both arguments."""
    try:
        return model(x)
    except (RuntimeError, TypeError) as error:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        dtype = f" ({str(x.dtype).replace('torch.', '')})" if isinstance(x, torch.Tensor) else ""
        raise ValueError(f"{name} does not accept {data}'s inputs of shape {shape}{dtype}: {error}") from error


def check_model(name: str, model) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module, got {type(model).__name__}")
    return model


def default_layers(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_children()]


def check_layers(model: nn.Module, layers) -> list[str]:
    check_model("model", model)
    if layers is None:
        layers = default_layers(model)
    elif isinstance(layers, str):
        layers = [layers]
    layers = list(layers)
    modules = dict(model.named_modules())
    unknown = [name for name in layers if name not in modules or name == ""]
    if unknown:
        raise ValueError(f"layers names no submodule of the model: {unknown}; "
                         f"choose among {[n for n in modules if n][:20]}...")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers lists a module twice: {layers}")
    return layers


def first_tensor(output):
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]  # e.g. nn.MultiheadAttention returns (output, weights)
    if isinstance(getattr(output, "last_hidden_state", None), torch.Tensor):
        return output.last_hidden_state  # a Hugging Face model's output object
    raise TypeError(f"a captured layer returned {type(output).__name__}, not a tensor")


@contextlib.contextmanager
def capturing(model: nn.Module, layers: list[str], inputs: bool = False):
    """Forward hooks that record each chosen module's output (its input with
    inputs=True; the last call when a module runs twice) and the order in
    which the modules first ran. Yields (captured, order)."""
    captured: dict[str, torch.Tensor] = {}
    order: list[str] = []
    modules = dict(model.named_modules())

    def hook_for(name):
        def hook(module, args, output):
            if name not in captured:
                order.append(name)
            captured[name] = first_tensor(args[0] if inputs else output)
        return hook

    handles = [modules[name].register_forward_hook(hook_for(name)) for name in layers]
    try:
        yield captured, order
    finally:
        for handle in handles:
            handle.remove()


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the wanted output exists."""


def layer_output(model: nn.Module, layer: str, x, name: str = "model"):
    """The output of `layer` (its first call) when `model` runs on x; the
    forward pass stops there, so nothing after the layer runs (seed 004
    section 4: a_{<=l} of a stitched model). Gradients flow as the caller's
    grad mode says. A ValueError when the layer never ran."""
    captured = []

    def hook(module, args, output):
        captured.append(output)
        raise _Stop

    handle = model.get_submodule(layer).register_forward_hook(hook)
    try:
        model(copy_inputs(x))
    except _Stop:
        pass
    finally:
        handle.remove()
    if not captured:
        raise ValueError(f"layer {layer!r} did not run in {name}'s forward pass")
    return captured[0]


@contextlib.contextmanager
def replacing(model: nn.Module, layer: str, value, inputs: bool = False):
    """Within the block, `layer` of `model` returns `value` instead of what it
    computes (seed 004 section 4: b_{>l} run on phi's features): a tensor,
    or a function (module, args, output) -> new output. With inputs=True
    the layer's positional inputs are replaced before it runs: a tuple, or
    a function (module, args) -> new args."""
    module = model.get_submodule(layer)
    if inputs:
        handle = module.register_forward_pre_hook(value if callable(value) else (lambda m, args: value))
    else:
        handle = module.register_forward_hook(value if callable(value) else (lambda m, args, output: value))
    try:
        yield
    finally:
        handle.remove()


def _is_leaf(module: nn.Module) -> bool:
    """No submodule but its weights' parametrizations (a spectral_norm Linear is one layer)."""
    return all(name == "parametrizations" for name, _ in module.named_children())


def module_order(model: nn.Module, x) -> list[str]:
    """The qualified names of the model's leaf modules in the order they first
    run on x (no gradients): what comes before a layer in the dataflow."""
    order: dict[str, None] = {}
    handles = [module.register_forward_hook(lambda m, a, o, name=name: order.setdefault(name))
               for name, module in model.named_modules() if name and _is_leaf(module)]
    try:
        with torch.no_grad():
            model(copy_inputs(x))
    finally:
        for handle in handles:
            handle.remove()
    return list(order)
