"""A short training loop for the reference models of datasets.py (demos,
tests, the zoo generator): Adam on cross-entropy."""
from __future__ import annotations

import torch
from torch import nn

from . import _checks
from ._data import batches


def train(model: nn.Module, data, y: torch.Tensor | None = None, epochs: int = 30, lr: float = 3e-3,
          batch_size: int = 64, generator=0, progress: bool = True, parameters=None) -> nn.Module:
    """Train model in place with Adam on cross-entropy.

    The trained networks of seed 000 section 5 and seed 004 appendix D.2, here the small reference models.
    The model is left in eval mode.

    Args:
        model: the nn.Module to train, in place.
        data: labelled data in any form _data.batches takes ((x, y) tensors are reshuffled every epoch), or
            a tensor of inputs with its labels as y.
        y: the labels when data is a tensor of inputs (the call train(model, x, y)); None otherwise.
        epochs: the passes over the data, a non-negative int (default 30).
        lr: Adam's learning rate, positive (default 3e-3).
        batch_size: the rows per step when data is tensors (default 64).
        generator: the shuffling (an int seed, a torch.Generator, or None for torch's global RNG); 0 by
            default so that a demo trains the same way every run.
        progress: a bar over the epochs (tqdm) (default True).
        parameters: what to train (default all of the model's).

    Returns:
        The same model, trained and in eval mode.
    """
    from tqdm.auto import tqdm

    if y is not None:
        data = (data, y)
    epochs = _checks.positive_int("epochs", epochs, allow_zero=True)
    lr = _checks.number("lr", lr, low=0, low_open=True)
    g = _checks.generator(generator)
    g = torch.default_generator if g is None else g  # None: shuffled from torch's global RNG
    opt = torch.optim.Adam(model.parameters() if parameters is None else parameters, lr=lr)
    model.train()
    for _ in tqdm(range(epochs), desc="training", disable=not progress, leave=False):
        for x, labels in batches(data, batch_size, generator=g, name="data", labels=True):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), labels).backward()
            opt.step()
    model.eval()
    return model
