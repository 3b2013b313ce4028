"""Small real data that ships with a package (no download): scikit-learn's
8x8 digits, and quick-to-train models on it for demos and tests."""
from __future__ import annotations

import torch
from torch import nn


def digits(seed: int = 0, test_fraction: float = 0.2):
    """scikit-learn's 1797 8x8 digits as tensors: (x_train, y_train, x_test,
    y_test), x of shape (N, 1, 8, 8) scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(len(y) * (1 - test_fraction))
    return x[perm[:cut]], y[perm[:cut]], x[perm[cut:]], y[perm[cut:]]


def digits_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))


def digits_mlp(width: int = 64, bias: bool = False) -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, width, bias=bias), nn.ReLU(),
                         nn.Linear(width, width, bias=bias), nn.ReLU(),
                         nn.Linear(width, width, bias=bias), nn.ReLU(), nn.Linear(width, 10, bias=bias))


def train(model: nn.Module, x, y, epochs: int = 30, lr: float = 3e-3, batch_size: int = 64, seed: int = 0,
          progress: bool = False) -> nn.Module:
    """Adam on cross-entropy; deterministic under `seed`."""
    from tqdm.auto import tqdm

    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in tqdm(range(epochs), desc="training", disable=not progress, leave=False):
        for batch in torch.randperm(len(y), generator=g).split(batch_size):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            opt.step()
    model.eval()
    return model


@torch.no_grad()
def accuracy(model: nn.Module, x, y) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).double().mean())
