"""Forward hooks that capture what named modules see or produce: the one
place every method module gets its activations from."""
from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

from ._data import call, check_keywords, copy_inputs, describe


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
    submodule is restored on exit, errors included. None
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
    """model(x) (model(**x) for a dict of keyword inputs), with a model that
    cannot take the inputs (a shape or dtype mismatch inside it) reported
    as a ValueError naming both arguments; keyword inputs the model has no
    parameter for, a TypeError naming `data` (_data.check_keywords)."""
    check_keywords(model, x, name, data)
    try:
        return call(model, x)
    except (RuntimeError, TypeError) as error:
        dtype = f" ({str(x.dtype).replace('torch.', '')})" if isinstance(x, torch.Tensor) else ""
        raise ValueError(f"{name} does not accept {data}'s inputs of shape {describe(x)}{dtype}: {error}") from error


def check_model(name: str, model) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module, got {type(model).__name__}")
    return model


def default_layers(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_children()]


def check_layers(model: nn.Module, layers, name: str = "model") -> list[str]:
    """layers (None: the model's children) as a list of distinct submodule
    names of model; errors name the model (`name`)."""
    check_model(name, model)
    if layers is None:
        layers = default_layers(model)
    elif isinstance(layers, str):
        layers = [layers]
    layers = list(layers)
    modules = dict(model.named_modules())
    unknown = [name for name in layers if name not in modules or name == ""]
    if unknown:
        raise ValueError(f"layers names no submodule of {'the model' if name == 'model' else name}: {unknown}; "
                         f"choose among {[n for n in modules if n][:20]}...")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers lists a module twice: {layers}")
    return layers


def _is_model_output(output) -> bool:
    """A Hugging Face ModelOutput (an ordered dict of named results with to_tuple), not a plain dict."""
    return callable(getattr(output, "to_tuple", None)) and hasattr(output, "keys")


def first_tensor(output):
    """The hidden states of what a layer returns: a tensor; the first element
    of a tuple or list (transformers layers return (hidden states, attention
    weights, ...), nn.MultiheadAttention (output, weights), an LSTM (output,
    (h, c))); a Hugging Face output's last_hidden_state, else its first
    result. TypeError for anything else (a plain dict: which entry is
    ambiguous)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], (torch.Tensor, tuple, list)):
        return first_tensor(output[0])
    if isinstance(getattr(output, "last_hidden_state", None), torch.Tensor):
        return output.last_hidden_state  # a Hugging Face model's output object
    if _is_model_output(output):
        values = output.to_tuple()
        if values and isinstance(values[0], torch.Tensor):
            return values[0]
    raise TypeError(f"a captured layer returned {type(output).__name__}, not a tensor")


def with_first_tensor(output, value):
    """`output` with the tensor first_tensor reads replaced by `value`, the
    rest kept (the attention weights of a transformers layer's tuple, a
    ModelOutput's other fields): what a layer must return when its hidden
    states are swapped (stitching)."""
    if isinstance(output, torch.Tensor):
        return value
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], (torch.Tensor, tuple, list)):
        return type(output)([with_first_tensor(output[0], value), *output[1:]])
    if isinstance(getattr(output, "last_hidden_state", None), torch.Tensor) or _is_model_output(output):
        key = "last_hidden_state" if isinstance(getattr(output, "last_hidden_state", None), torch.Tensor) \
            else next(iter(output.keys()))
        replaced = copy.copy(output)
        if hasattr(replaced, "__setitem__"):
            replaced[key] = value
        else:
            setattr(replaced, key, value)
        return replaced
    raise TypeError(f"a layer returned {type(output).__name__}, not a tensor")


def _layer_tensor(output, layer: str, model_name: str, what: str = "returned"):
    try:
        return first_tensor(output)
    except TypeError:
        raise ValueError(f"{model_name}'s layer {layer!r} {what} {type(output).__name__}, not a tensor (nor a "
                         "tuple or Hugging Face output holding one): choose a layer whose output holds the "
                         "hidden states") from None


def _first_input(args, kwargs):
    """A layer's input: its first positional argument, else (transformers
    layers called by keyword) the hidden_states keyword, else the first
    tensor among the keywords."""
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    return next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)


@contextlib.contextmanager
def capturing(model: nn.Module, layers: list[str], inputs: bool = False, name: str = "model"):
    """Forward hooks that record each chosen module's output (its input with
    inputs=True; the last call when a module runs twice) and the order in
    which the modules first ran. Yields (captured, order). Outputs are read
    by first_tensor (tuples, Hugging Face outputs); inputs are the first
    positional argument or the hidden_states keyword. A layer that gives
    no tensor raises ValueError naming it and the model (`name`)."""
    captured: dict[str, torch.Tensor] = {}
    order: list[str] = []
    modules = dict(model.named_modules())

    def hook_for(layer):
        def hook(module, args, kwargs, output):
            if layer not in captured:
                order.append(layer)
            if inputs:
                captured[layer] = _layer_tensor(_first_input(args, kwargs), layer, name, "received")
            else:
                captured[layer] = _layer_tensor(output, layer, name)
        return hook

    handles = [modules[layer].register_forward_hook(hook_for(layer), with_kwargs=True) for layer in layers]
    try:
        yield captured, order
    finally:
        for handle in handles:
            handle.remove()


def missing_layers(wanted: dict, captured: dict) -> str | None:
    """None when every layer ran, else one sentence naming each layer that
    did not once, with the models it did not run in: wanted {model name:
    layers}, captured {model name: what capturing recorded}."""
    where: dict[str, list[str]] = {}
    for name, layers in wanted.items():
        for layer in layers:
            if layer not in captured[name]:
                where.setdefault(layer, []).append(f"{name}'s")
    if not where:
        return None
    parts = [f"{' and '.join(names)} layer {layer!r}" for layer, names in where.items()]
    return ("; ".join(parts) + f" did not run in the forward pass (a submodule whose parent only reads its "
            "weights, such as nn.MultiheadAttention's out_proj or torchvision Swin's attn.qkv, is never "
            "called): choose modules that are called, e.g. their parent")


def activation_stream(model: nn.Module, other: nn.Module | None, layers: list[str], other_layers: list[str],
                      data, *, inputs: bool = False, device=None, batch_size: int | None = None,
                      desc: str = "activations", progress: bool = True):
    """The one loop that runs one or two models over the data (similarity,
    covariance and the compat adapters): both models in eval mode (given
    back as they came) and inference mode, each batch moved to `device`
    (None: left where it is) and run once through each model (once in all
    when other is model or None), every chosen layer's output (its input
    with inputs=True) captured by forward hooks. Yields (x, n, captured,
    other_captured) per batch: the batch, its sample count and {layer:
    tensor} of each model (the same dict when other is model or None).
    Layers were checked by the caller (check_layers); a layer that did not
    run raises ValueError naming it and its model."""
    from tqdm.auto import tqdm

    from ._data import batches, sample_count, to_device

    shared = other is None or other is model
    wanted = {"model": list(dict.fromkeys(list(layers) + (list(other_layers) if shared else [])))}
    if not shared:
        wanted["other"] = list(other_layers)
    with contextlib.ExitStack() as stack:
        stack.enter_context(evaluating(model, *(() if shared else (other,))))
        cap_a, _ = stack.enter_context(capturing(model, wanted["model"], inputs=inputs, name="model"))
        cap_b = cap_a if shared else stack.enter_context(capturing(other, wanted["other"], inputs=inputs,
                                                                   name="other"))[0]
        stack.enter_context(torch.inference_mode())  # no autograd bookkeeping at all: ~10% off the forwards
        source = batches(data, mappings=True) if batch_size is None else batches(data, batch_size, mappings=True)
        for x, _ in tqdm(source, desc=desc, disable=not progress, leave=False):
            x = to_device(x, device)
            cap_a.clear()
            cap_b.clear()
            forward(model, x, "model")
            if not shared:
                forward(other, x, "other")
            missing = missing_layers(wanted, {"model": cap_a, "other": cap_b})
            if missing:
                raise ValueError(missing)
            yield x, sample_count(x), cap_a, cap_b


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the wanted output exists."""


def layer_output(model: nn.Module, layer: str, x, name: str = "model"):
    """The output of `layer` (its first call) when `model` runs on x (a dict
    of keyword inputs runs as model(**x)); the forward pass stops there, so
    nothing after the layer runs (seed 004 section 4: a_{<=l} of a stitched
    model). Gradients flow as the caller's grad mode says. The output as the
    layer returned it (first_tensor reads its hidden states). A ValueError
    naming the layer and the model when the layer never ran."""
    captured = []

    def hook(module, args, output):
        captured.append(output)
        raise _Stop

    handle = model.get_submodule(layer).register_forward_hook(hook)
    try:
        call(model, copy_inputs(x))
    except _Stop:
        pass
    finally:
        handle.remove()
    if not captured:
        raise ValueError(f"{name}'s layer {layer!r} did not run in its forward pass (a submodule whose parent "
                         "only reads its weights, such as nn.MultiheadAttention's out_proj, is never called): "
                         "choose a module that is called")
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
            call(model, copy_inputs(x))
    finally:
        for handle in handles:
            handle.remove()
    return list(order)
