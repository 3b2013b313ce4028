"""A zoo of 1000 small CNNs (digits CNN, random weights): the per-model rank
metrics (numerical rank, stable rank, spectral norm per layer) batched across
the zoo against one model at a time. Reports models per second."""
import pytest
import torch

import spectral_ext as se
from spectral_ext import datasets, zoo

from conftest import timed

N_MODELS = 1000


def one_by_one(models):
    rows = []
    for name, model in models.items():
        for layer, module in model.named_modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                W = module.weight.detach().double().reshape(module.weight.shape[0], -1)
                rank, sigma = se.numerical_rank(W, return_singular_values=True)
                rows.append((name, layer, int(rank), float(sigma.square().sum() / sigma[0] ** 2), float(sigma[0])))
    return rows


@pytest.mark.parametrize("impl", ["native", "one_by_one"])
def test_zoo_1000_cnns_rank_metrics(benchmark, device, impl):
    torch.manual_seed(0)
    models = {f"m{i:04d}": datasets.digits_cnn().to(device) for i in range(N_MODELS)}
    x = torch.zeros(1, 1, 8, 8, device=device)
    fn = (lambda: zoo.model_metrics(models, ("rank",), x)) if impl == "native" else (lambda: one_by_one(models))
    benchmark.group = f"zoo of {N_MODELS} digits CNNs, rank metrics of 5 layers [{device}]"
    benchmark.extra_info["impl"] = impl
    benchmark.pedantic(timed(fn, device), rounds=2, iterations=1, warmup_rounds=0)
    print(f"\n{impl}: {N_MODELS / benchmark.stats.stats.median:.0f} models/s")
