"""The one way every method reads data: a tensor of inputs, an (inputs,
labels) pair of tensors, or any iterable of batches (a DataLoader) yielding
inputs or (inputs, labels)."""
from __future__ import annotations

import torch


def batches(data, batch_size: int = 256, generator: torch.Generator | None = None):
    """Yield (x, y or None). Tensors are cut into batch_size rows, shuffled
    when a generator is given; an iterable's own batches pass through."""
    if isinstance(data, torch.Tensor):
        data = (data, None)
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        x, y = data
        if y is not None and (not isinstance(y, torch.Tensor) or y.shape[0] != x.shape[0]):
            raise ValueError(f"data holds {x.shape[0]} inputs but labels of shape "
                             f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}")
        order = torch.randperm(x.shape[0], generator=generator) if generator is not None else None
        for start in range(0, x.shape[0], batch_size):
            index = order[start:start + batch_size] if order is not None else slice(start, start + batch_size)
            yield x[index], (y[index] if y is not None else None)
        return
    for batch in data:
        if isinstance(batch, (tuple, list)):
            yield batch[0], (batch[1] if len(batch) > 1 else None)
        else:
            yield batch, None


@torch.no_grad()
def accuracy(model, data, batch_size: int = 1024) -> float:
    """Top-1 accuracy of model over labelled data (any form batches takes)."""
    from ._hooks import evaluating

    correct = total = 0
    with evaluating(model):
        for x, y in batches(data, batch_size):
            if y is None:
                raise ValueError("data must carry labels: (x, y) tensors or a loader of (x, y) batches")
            correct += int((model(x).argmax(-1) == y).sum())
            total += len(y)
    if total == 0:
        raise ValueError("the labelled data is empty")
    return correct / total


@torch.no_grad()
def recompute_batchnorm(norms_of, run, data, batch_size: int = 256) -> None:
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
    for x, _ in batches(data, batch_size):
        run(x)
    for m in norms:
        m.eval()
