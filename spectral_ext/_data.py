"""The one way every method reads data: a tensor of inputs, an (inputs,
labels) tuple of tensors, or any iterable of batches (a DataLoader) yielding
inputs or (inputs, labels)."""
from __future__ import annotations

import torch


def batches(data, batch_size: int = 256, generator: torch.Generator | None = None, name: str = "data",
            labels: bool = False):
    """Yield (x, y or None). Tensors are cut into batch_size rows, shuffled
    when a generator is given; an iterable's own batches pass through.

    Every failure names the argument (`name`): data that is not a tensor, a
    pair or an iterable; batches that are dicts or hold no tensor; data that
    yields no sample at all (an empty tensor or loader: a ValueError, never a
    StopIteration); with labels=True, batches without labels; floating inputs
    with NaN or infinity (every statistic of them would be NaN)."""
    from . import _checks

    batch_size = _checks.positive_int("batch_size", batch_size)
    if isinstance(data, torch.Tensor):
        data = (data, None)
    # Only a tuple is an (inputs, labels) pair: a list is a list of batches (so [X1, X2] is two batches).
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        x, y = data
        if y is not None and (not isinstance(y, torch.Tensor) or y.shape[:1] != x.shape[:1]):
            raise ValueError(f"{name} holds {x.shape[0] if x.dim() else 0} inputs but labels of shape "
                             f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}")
        if x.dim() == 0 or x.shape[0] == 0:
            raise ValueError(f"{name} holds no sample (inputs of shape {tuple(x.shape)})")
        if labels and y is None:
            raise ValueError(f"{name} must carry labels: (x, y) tensors or a loader of (x, y) batches")
        _check_finite(x, name)
        order = torch.randperm(x.shape[0], generator=generator) if generator is not None else None
        for start in range(0, x.shape[0], batch_size):
            index = order[start:start + batch_size] if order is not None else slice(start, start + batch_size)
            # a slice is a view of the caller's tensor; a shuffled index has copied already
            yield (x[index] if order is not None else x[index].clone()), (y[index] if y is not None else None)
        return
    if isinstance(data, (dict, str, bytes)) or not hasattr(data, "__iter__"):
        raise TypeError(f"{name} must be a tensor of inputs, an (inputs, labels) pair of tensors or an iterable "
                        f"of batches (a DataLoader), got {type(data).__name__}")
    seen = 0
    for batch in data:
        if isinstance(batch, (tuple, list)) and batch:
            x, y = batch[0], (batch[1] if len(batch) > 1 else None)
        else:
            x, y = batch, None
        if not isinstance(x, torch.Tensor):
            keys = f" with keys {sorted(map(str, batch))}" if isinstance(batch, dict) else ""
            raise TypeError(f"{name} must yield tensors or (inputs, labels) tuples of tensors, got a batch of "
                            f"type {type(batch).__name__}{keys}; wrap the loader, e.g. "
                            "((b['x'], b['y']) for b in loader)")
        if y is not None and (not isinstance(y, torch.Tensor) or y.shape[:1] != x.shape[:1]):
            raise ValueError(f"{name} yields a batch of {x.shape[0] if x.dim() else 0} inputs with labels "
                             f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}")
        if labels and y is None:
            raise ValueError(f"{name} must carry labels: (x, y) tensors or a loader of (x, y) batches")
        if x.dim() == 0 or x.shape[0] == 0:
            continue  # an empty batch adds nothing
        _check_finite(x, name, first=seen)
        seen += x.shape[0]
        yield x.clone(), y
    if not seen:
        raise ValueError(f"{name} yields no sample (an empty loader or only empty batches)")


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


def _check_finite(x: torch.Tensor, name: str, first: int | None = None) -> None:
    from . import _checks

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
    """Top-1 accuracy of model over labelled data (any form batches takes):
    the one accuracy of the package (the metric of seed 003 section 3.3 and
    of every accuracy column). model: an nn.Module, run in eval mode and
    given back as it came, or any callable from inputs to logits (N, classes),
    such as a classifier on features. model_name names it in errors."""
    from torch import nn

    from ._hooks import evaluating

    if isinstance(batch_size, torch.Tensor):  # the former accuracy(model, x, y) of datasets
        raise TypeError(f"batch_size must be an int, got a tensor: pass the labelled data as one argument, "
                        f"accuracy({model_name}, (x, y))")
    if not callable(model):
        raise TypeError(f"{model_name} must be a callable (an nn.Module, say), got {type(model).__name__}")
    correct = total = 0
    with evaluating(model if isinstance(model, nn.Module) else None):
        for x, y in batches(data, batch_size, name=name, labels=True):
            try:
                logits = model(x)
            except RuntimeError as error:  # a shape mismatch inside the model
                raise ValueError(f"{model_name} does not accept inputs of shape {tuple(x.shape)} ({x.dtype}): "
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
def recompute_batchnorm(norms_of, run, data, batch_size: int = 256, name: str = "data") -> None:
    """Reset the running statistics of every BatchNorm in `norms_of` and
    recompute them as a cumulative average over one no-gradient pass of
    run(x) over the data (seed 004 D.2.1, seed 002's generated networks);
    the BatchNorms are left in eval mode."""
    from torch import nn

    norms = [m for m in norms_of.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the pass
        m.train()
    for x, _ in batches(data, batch_size, name=name):
        run(x)
    for m in norms:
        m.eval()
