"""The one way every method reads data: a tensor of inputs, an (inputs,
labels) tuple of tensors, or any iterable of batches (a DataLoader) yielding
inputs or (inputs, labels). The methods that run a model over data
(similarity_matrix, stitch, activation_covariance, accuracy) also take
keyword inputs (mappings=True): a dict of tensors such as {"input_ids": ...,
"attention_mask": ...} or {"pixel_values": ...}, batched along dim 0 of
every tensor and passed as model(**inputs), or an iterable of such dicts (a
DataLoader over a Hugging Face dataset). Labels of keyword inputs are the
tensor under the "labels" key (taken out: the model never sees it), or come
as the second element of an (inputs, labels) pair; not both."""
from __future__ import annotations

from collections.abc import Mapping

import torch

LABELS = "labels"


def batches(data, batch_size: int = 256, generator: torch.Generator | None = None, name: str = "data",
            labels: bool = False, mappings: bool = False):
    """Yield (x, y or None). Tensors are cut into batch_size rows, shuffled
    when a generator is given; an iterable's own batches pass through.
    Every x is a copy of the caller's inputs (copy_inputs' semantics).

    mappings=True also takes keyword inputs (see the module's docstring): x
    is then a dict {keyword: tensor} (run it with `call`), cut and shuffled
    along dim 0 of every tensor like a tensor of inputs; labels are the
    "labels" tensor (removed from x) or the pair's second element.

    Every failure names the argument (`name`): data that is not a tensor, a
    pair or an iterable; batches that are dicts (without mappings=True) or
    hold no tensor; dicts whose tensors disagree on the sample count or hold
    values that are not tensors; data that yields no sample at all (an
    empty tensor or loader: a ValueError, never a StopIteration); with
    labels=True, batches without labels; floating inputs with NaN or
    infinity (every statistic of them would be NaN)."""
    from . import _checks

    batch_size = _checks.positive_int("batch_size", batch_size)
    if isinstance(data, torch.Tensor) or (mappings and isinstance(data, Mapping)):
        data = (data, None)
    # Only a tuple is an (inputs, labels) pair: a list is a list of batches (so [X1, X2] is two batches).
    if isinstance(data, tuple) and len(data) == 2 and (
            isinstance(data[0], torch.Tensor) or (mappings and isinstance(data[0], Mapping))):
        x, y = data
        if isinstance(x, Mapping):
            x, y = _keyword_inputs(x, y, name)
        n = sample_count(x)
        if y is not None and (not isinstance(y, torch.Tensor) or y.shape[:1] != _leading(x)):
            raise ValueError(f"{name} holds {n} inputs but labels of shape "
                             f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}")
        if n == 0:
            raise ValueError(f"{name} holds no sample (inputs of shape {describe(x)})")
        if labels and y is None:
            raise ValueError(f"{name} must carry labels: (x, y) tensors or a loader of (x, y) batches"
                             + (f', or a "{LABELS}" tensor among the keyword inputs' if mappings else ""))
        _check_finite(x, name)
        order = torch.randperm(n, generator=generator) if generator is not None else None
        for start in range(0, n, batch_size):
            index = order[start:start + batch_size] if order is not None else slice(start, start + batch_size)
            # a slice is a view of the caller's tensor; a shuffled index has copied already
            yield _rows(x, index, copy=order is None), (y[index] if y is not None else None)
        return
    if isinstance(data, (dict, str, bytes)) or not hasattr(data, "__iter__"):
        raise TypeError(f"{name} must be a tensor of inputs, an (inputs, labels) pair of tensors"
                        f"{', a dict of keyword input tensors' if mappings else ''} or an iterable "
                        f"of batches (a DataLoader), got {type(data).__name__}")
    seen = 0
    for batch in data:
        if isinstance(batch, (tuple, list)) and batch:
            x, y = batch[0], (batch[1] if len(batch) > 1 else None)
        else:
            x, y = batch, None
        if mappings and isinstance(x, Mapping):
            x, y = _keyword_inputs(x, y, name)
        elif not isinstance(x, torch.Tensor):
            keys = f" with keys {sorted(map(str, batch))}" if isinstance(batch, dict) else ""
            hint = ("wrap the loader, e.g. ((b['x'], b['y']) for b in loader)" if not mappings else
                    "a batch may also be a dict of keyword input tensors")
            raise TypeError(f"{name} must yield tensors or (inputs, labels) tuples of tensors, got a batch of "
                            f"type {type(batch).__name__}{keys}; {hint}")
        n = sample_count(x)
        if y is not None and (not isinstance(y, torch.Tensor) or y.shape[:1] != _leading(x)):
            raise ValueError(f"{name} yields a batch of {n} inputs with labels "
                             f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}")
        if labels and y is None:
            raise ValueError(f"{name} must carry labels: (x, y) tensors or a loader of (x, y) batches"
                             + (f', or a "{LABELS}" tensor among the keyword inputs' if mappings else ""))
        if n == 0:
            continue  # an empty batch adds nothing
        _check_finite(x, name, first=seen)
        seen += n
        yield copy_inputs(x), y
    if not seen:
        raise ValueError(f"{name} yields no sample (an empty loader or only empty batches)")


def _keyword_inputs(x: Mapping, y, name: str):
    """(inputs, labels) of a dict of keyword inputs: every value a tensor of
    at least one axis, all of one length along dim 0; the "labels" tensor
    taken out as the labels (refused beside a pair's own labels)."""
    x = dict(x)
    if LABELS in x:
        if y is not None:
            raise ValueError(f'{name} gives labels twice: as the pair\'s second element and under the "{LABELS}" '
                             "key of its inputs; keep one")
        y = x.pop(LABELS)
    if not x:
        raise ValueError(f"{name} holds a dict of keyword inputs without any input")
    odd = [k for k, v in x.items() if not isinstance(v, torch.Tensor) or v.dim() == 0]
    if odd:
        raise TypeError(f"{name}'s keyword inputs must all be tensors with a sample axis (dim 0), got "
                        + ", ".join(f"{k!r}: {type(x[k]).__name__}" + (" (0-d)" if isinstance(x[k], torch.Tensor)
                                                                        else "") for k in odd)
                        + "; drop such entries (a Hugging Face dataset: remove the text columns, or "
                        "set_format('torch', columns=[...]))")
    sizes = {k: v.shape[0] for k, v in x.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"{name}'s keyword inputs must hold the same samples along dim 0, got {sizes}")
    return x, y


def sample_count(x) -> int:
    """The number of samples in inputs x: a tensor's dim 0 (0 for a 0-d
    tensor), or that of every tensor of a dict of keyword inputs."""
    if isinstance(x, Mapping):
        return next(iter(x.values())).shape[0]
    return x.shape[0] if x.dim() else 0


def _leading(x) -> tuple:
    """x.shape[:1] of a tensor; (samples,) of a dict of keyword inputs."""
    return (sample_count(x),) if isinstance(x, Mapping) else tuple(x.shape[:1])


def _rows(x, index, copy: bool):
    if isinstance(x, Mapping):
        return {k: (v[index].clone() if copy else v[index]) for k, v in x.items()}
    return x[index].clone() if copy else x[index]


def describe(x) -> str:
    """Inputs for an error message: a tensor's shape, a dict's keys with theirs and their dtypes."""
    if isinstance(x, torch.Tensor):
        return str(tuple(x.shape))
    if isinstance(x, Mapping):
        return "{" + ", ".join(f"{k}: {tuple(v.shape)} {str(v.dtype).replace('torch.', '')}"
                               if isinstance(v, torch.Tensor) else f"{k}: {type(v).__name__}"
                               for k, v in x.items()) + "}"
    return type(x).__name__


def call(model, x):
    """model(x), or model(**x) for a dict of keyword inputs."""
    return model(**x) if isinstance(x, Mapping) else model(x)


def check_keywords(model, x, name: str = "model", data: str = "data") -> None:
    """TypeError naming `data` when x is a dict of keyword inputs that
    model's forward cannot take (a keyword it has no parameter for, and no
    **kwargs): a dict batch of (inputs, labels) under other names, say."""
    if not isinstance(x, Mapping):
        return
    import inspect

    forward = getattr(model, "forward", model)
    try:
        parameters = inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return  # no signature to read: the call itself will say
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    accepted = {k for k, p in parameters.items()
                if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
    unknown = [k for k in x if k not in accepted]
    if unknown:
        raise TypeError(f"{data} gives keyword inputs {sorted(map(str, x))} (a dict batch runs as {name}(**batch), "
                        f'its labels under "{LABELS}"), but {name}.forward{inspect.signature(forward)} takes no '
                        f"{', '.join(map(repr, unknown))}; for (inputs, labels) batches under other keys wrap the "
                        "loader, e.g. ((b['x'], b['y']) for b in loader)")


def to_device(x, device):
    """Inputs (a tensor or a dict of them) moved to `device` (None: left where they are)."""
    if device is None:
        return x
    if isinstance(x, Mapping):
        return {k: v.to(device) for k, v in x.items()}
    return x.to(device)


def logits_of(output):
    """The logits of a classifier's output: the tensor itself, a Hugging
    Face output's .logits, or the first element of a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(getattr(output, "logits", None), torch.Tensor):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return output


def copy_inputs(value):
    """The caller's inputs, copied (tensors inside tuples, lists and dicts too),
    for every forward pass the package runs: a model whose first operation is
    in place (nn.ReLU(inplace=True) on its input) would otherwise change the
    caller's data through a view of it."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (tuple, list)):
        return type(value)(copy_inputs(v) for v in value)
    if isinstance(value, dict):
        return {k: copy_inputs(v) for k, v in value.items()}
    return value


def _check_finite(x, name: str, first: int | None = None) -> None:
    from . import _checks

    if isinstance(x, Mapping):
        for value in x.values():
            _check_finite(value, name, first)
        return
    if (x.is_floating_point() or x.is_complex()) and not _checks.data_free(x) and not _checks.all_finite(x):
        where = "" if first is None else f" (in the batch from sample {first})"
        raise ValueError(f"{name} contains NaN or infinite inputs{where}")


def check_labels(y: torch.Tensor, classes: int | None = None, name: str = "data") -> None:
    """Labels of a batch: integers in [0, classes) (>= 0 when classes is None), one per input."""
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool or y.dim() != 1:
        raise ValueError(f"{name} labels must be a 1-d integer tensor, got {y.dtype} of shape {tuple(y.shape)}")
    if classes is None:
        if y.numel() and int(y.min()) < 0:
            raise ValueError(f"{name} labels must be class indices >= 0, got {int(y.min())}")
        return
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= classes):
        raise ValueError(f"{name} labels must lie in [0, {classes}) (the model's outputs), got values in "
                         f"[{int(y.min())}, {int(y.max())}]")


def first_batch(data, batch_size: int = 2, name: str = "data", labels: bool = False):
    """The first (x, y) of batches(data): a clear error for empty data."""
    for batch in batches(data, batch_size, name=name, labels=labels):
        return batch
    raise ValueError(f"{name} yields no sample")  # unreachable: batches raises first


@torch.no_grad()
def accuracy(model, data, batch_size: int = 1024, name: str = "data", model_name: str = "model") -> float:
    """Top-1 accuracy of model over labelled data.

    The one accuracy of the package (the metric of seed 003 section 3.3 and of every accuracy column).
    Raises TypeError for a model that is not callable or a tensor passed as batch_size (pass the labelled
    data as one argument, accuracy(model, (x, y))), and ValueError for inputs the model does not accept or
    outputs that are not logits (N, classes).

    Args:
        model: an nn.Module, run in eval mode and given back as it came, or any callable from inputs to
            logits (N, classes), such as a classifier on features; a Hugging Face output's .logits are read.
        data: labelled data in any form batches takes, keyword inputs included (a dict runs as
            model(**inputs)).
        batch_size: the rows per forward pass when data is tensors (default 1024).
        name: what data is called in errors (default "data").
        model_name: what model is called in errors (default "model").

    Returns:
        The fraction of samples whose argmax logit equals the label, a float in [0, 1].
    """
    from torch import nn

    from ._hooks import evaluating

    if isinstance(batch_size, torch.Tensor):  # the former accuracy(model, x, y) of datasets
        raise TypeError(f"batch_size must be an int, got a tensor: pass the labelled data as one argument, "
                        f"accuracy({model_name}, (x, y))")
    if not callable(model):
        raise TypeError(f"{model_name} must be a callable (an nn.Module, say), got {type(model).__name__}")
    correct = total = 0
    with evaluating(model if isinstance(model, nn.Module) else None):
        for x, y in batches(data, batch_size, name=name, labels=True, mappings=True):
            check_keywords(model, x, model_name, name)
            try:
                logits = logits_of(call(model, x))
            except RuntimeError as error:  # a shape mismatch inside the model
                dtype = f" ({x.dtype})" if isinstance(x, torch.Tensor) else ""
                raise ValueError(f"{model_name} does not accept inputs of shape {describe(x)}{dtype}: "
                                 f"{error}") from error
            if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != y.shape[0]:
                raise ValueError(f"{model_name} must map inputs (N, ...) to logits (N, classes), got "
                                 f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}")
            check_labels(y, logits.shape[-1], name)
            correct += int((logits.argmax(-1) == y).sum())
            total += len(y)
    return correct / total  # batches raised already if the data held no sample


def gather(data, name: str = "data", labels: bool = False):
    """All of data (any form batches takes) as one (x, y or None) pair of
    tensors, for the methods that need every sample at once: a tensor or an
    (inputs, labels) pair comes back as given (no copy), an iterable's
    batches are concatenated. labels=True requires labels."""
    if isinstance(data, torch.Tensor):
        data = (data, None)
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], torch.Tensor) and (
            data[1] is not None or not labels):
        first_batch(data, name=name, labels=labels)  # the checks of batches: labels' length, no sample
        return data
    xs, ys = zip(*batches(data, name=name, labels=labels))
    return torch.cat(xs), (None if any(y is None for y in ys) else torch.cat(ys))


@torch.no_grad()
def recompute_batchnorm(norms_of, run, data, batch_size: int = 256, name: str = "data",
                        mappings: bool = False) -> None:
    """Reset the running statistics of every BatchNorm in `norms_of` and
    recompute them as a cumulative average over one no-gradient pass of
    run(x) over the data (seed 004 D.2.1, seed 002's generated networks);
    the BatchNorms are left in eval mode. mappings: as batches (run then
    receives dicts of keyword inputs)."""
    from torch import nn

    norms = [m for m in norms_of.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the pass
        m.train()
    for x, _ in batches(data, batch_size, name=name, mappings=mappings):
        run(x)
    for m in norms:
        m.eval()
