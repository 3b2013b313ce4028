"""Streaming activation covariance (seed 002) at layers of 512 and 4096
features: spectral_ext.activation_covariance (float64 accumulation, one Gram
product per batch for one model) against the seed's loop (hooks, a
per-batch act.T @ act and a running average meter), samples per second."""
import pytest
import torch
from torch import nn

import spectral_ext as se

from conftest import timed

N, BATCH = 16384, 512


def seed_loop(model, x, layer):
    """compute_activation_covariances of the seed notebook, for one model."""
    saved = []
    handle = model.get_submodule(layer).register_forward_hook(lambda m, a, o: saved.append(a[0]))
    total, count = None, 0
    with torch.no_grad():
        for batch in x.split(BATCH):
            saved.clear()
            model(batch)
            act = saved[0]
            cov = act.T @ act
            total = cov if total is None else total + cov  # AverageMeter: sum, then divide by the count
            count += act.shape[0]
    handle.remove()
    return total / count


@pytest.mark.parametrize("features", [512, 4096])
@pytest.mark.parametrize("impl", ["native", "seed"])
def test_covariance_throughput(benchmark, device, impl, features):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, features), nn.ReLU(), nn.Linear(features, 10)).to(device).eval()
    x = torch.randn(N, 64, device=device)
    if impl == "native":
        fn = lambda: se.activation_covariance(model, None, ["2"], x, batch_size=BATCH, progress=False)["2"].cov_a()
    else:
        fn = lambda: seed_loop(model, x, "2")
    benchmark.group = f"activation covariance, {features} features, {N} samples [{device}]"
    benchmark.extra_info["impl"] = impl
    result = benchmark.pedantic(timed(fn, device), rounds=2, iterations=1, warmup_rounds=1)
    print(f"\n{impl} {features}: {N / benchmark.stats.stats.median:.0f} samples/s")
    assert result.shape == (features, features)
