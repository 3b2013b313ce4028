"""Partial Jacobian rank of ResNet18 (weights=None) on a central 16x16x3 patch
for all eight residual-block outputs and the logits (seed 003 section 4.3):
one forward-mode pass that serves every layer (native) against the
straightforward route of one torch.func.jacfwd per layer. The CPU runs at
64x64 input (224x224 costs minutes there); the GPU at 224x224."""
import pytest
import torch

import spectral_ext as se

from conftest import timed

BLOCKS = [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]


def separate_jacobians(model, x, patch, layers):
    """One forward-mode Jacobian (jacfwd) per layer, each with its own passes."""
    modules = dict(model.named_modules())
    rows, cols = patch
    ranks = []
    for name in layers + [None]:
        def f(p, name=name):
            captured = {}
            handle = modules[name].register_forward_hook(lambda m, a, o: captured.setdefault("o", o)) if name else None
            padded = x.clone()
            padded[..., rows, cols] = 0
            padded = padded + torch.nn.functional.pad(p, (cols.start, x.shape[-1] - cols.stop, rows.start,
                                                          x.shape[-2] - rows.stop))
            out = model(padded)
            if handle:
                handle.remove()
            return (captured["o"] if name else out).reshape(-1)
        J = torch.func.jacfwd(f)(x[..., rows, cols].clone())
        ranks.append(int(se.numerical_rank(J.reshape(J.shape[0], -1).double())))
    return ranks


@pytest.mark.parametrize("impl", ["native", "separate"])
def test_resnet18_partial_rank_per_image(benchmark, device, impl):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval().to(device)
    size = 224 if device == "cuda" else 64
    x = torch.randn(1, 3, size, size, device=device)
    c = size // 2
    patch = (slice(c - 8, c + 8), slice(c - 8, c + 8))
    if impl == "native":
        fn = lambda: se.jacobian_partial_rank(model, BLOCKS, x, patch, progress=False).to_frame()["rank"].tolist()
    else:
        fn = lambda: separate_jacobians(model, x, patch, BLOCKS)
    benchmark.group = f"resnet18 partial Jacobian rank, 16x16x3 patch, 8 blocks + logits, {size}x{size} [{device}]"
    benchmark.extra_info["impl"] = impl
    ranks = benchmark.pedantic(timed(fn, device), rounds=1, iterations=1, warmup_rounds=0)
    print(f"\n{impl} ranks: {ranks}")
