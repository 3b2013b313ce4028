"""Small real data that ships with a package (no download): scikit-learn's
8x8 digits, and the small reference models on it for demos and tests. The
training loop is in training.py, the pretrained encoders in encoders.py;
train, accuracy, BertEncoder and minilm stay importable from here, where
the README and existing code call them."""
from __future__ import annotations

import torch
from torch import nn

from . import _checks
from ._data import accuracy  # noqa: F401  (the package's one accuracy, re-exported for datasets.accuracy)
from .encoders import BertEncoder, minilm  # noqa: F401
from .training import train  # noqa: F401

__all__ = ["BertEncoder", "accuracy", "digits", "digits_cnn", "digits_mlp", "minilm", "train"]


def digits(generator=0, test_fraction: float = 0.2):
    """scikit-learn's 1797 8x8 digits as train and test tensors.

    Small real data (no download) standing in for the image sets of seed 000 section 5 and seed 004
    appendix D.2; the inputs are scaled to [0, 1].

    Args:
        generator: the random split (an int seed, a torch.Generator, or None for torch's global RNG). It
            defaults to 0, not None, so that every call gives the same split and a model trained on one
            call's x_train is never tested on its own training images from another call.
        test_fraction: the share of the test split, in (0, 1) (default 0.2).

    Returns:
        A tuple (x_train, y_train, x_test, y_test): x of shape (N, 1, 8, 8), float32 in [0, 1]; y of
        shape (N,), int64 class labels 0-9.
    """
    from sklearn.datasets import load_digits

    test_fraction = _checks.number("test_fraction", test_fraction, low=0, high=1, low_open=True, high_open=True)
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=_checks.generator(generator))
    cut = int(len(y) * (1 - test_fraction))
    return x[perm[:cut]], y[perm[:cut]], x[perm[cut:]], y[perm[cut:]]


def digits_cnn() -> nn.Sequential:
    """A small CNN for the 8x8 digits.

    A stand-in for the conv networks of seed 000 section 4 (and seed 001's signals): convs "0", "2", "5",
    Linear "8", "10".

    Args:
        None.

    Returns:
        An untrained nn.Sequential from (N, 1, 8, 8) inputs to (N, 10) logits.
    """
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))


def digits_mlp(width: int = 64, bias: bool = False) -> nn.Sequential:
    """A four-layer MLP for the 8x8 digits.

    The fully connected case of seed 000 section 2 (and seed 004's stitching): Linear maps "1", "3", "5",
    "7".

    Args:
        width: the hidden units (default 64).
        bias: whether the maps have biases (default False).

    Returns:
        An untrained nn.Sequential from (N, 1, 8, 8) (or (N, 64)) inputs to (N, 10) logits.
    """
    return nn.Sequential(nn.Flatten(), nn.Linear(64, width, bias=bias), nn.ReLU(),
                         nn.Linear(width, width, bias=bias), nn.ReLU(),
                         nn.Linear(width, width, bias=bias), nn.ReLU(), nn.Linear(width, 10, bias=bias))
