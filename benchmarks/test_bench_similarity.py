"""Seed 004 at scale: G_ReLU-CKA of conv features (the seed's route
materialises an (N, N, C) tensor), a 512-channel G_ReLU stitching epoch, and
a batch of 1000 Sinkhorn projections, each native against the
straightforward PyTorch on the same input."""
import resource

import pytest
import torch
from torch import nn

import spectral_ext as se
from spectral_ext import reference, similarity

from conftest import timed


def grelu_cka_as_in_the_seed(X, Y):
    """Appendix D.7.2 written directly: the (N, N, C) tensor, then the max."""
    def gram(F):
        F = similarity.channel_normalize(F)
        return torch.einsum("mcs,ncs->mnc", F, F).amax(-1)
    K, L = gram(X), gram(Y)
    return float(similarity.hsic(K[None], L[None])[0, 0]
                 / (similarity.hsic(K[None], K[None])[0, 0] * similarity.hsic(L[None], L[None])[0, 0]).sqrt())


def conv_features(n, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 256, 64, generator=g).relu().to(device)
    Y = (X + torch.randn(n, 256, 64, generator=g).to(device)).relu()
    return X, Y


@pytest.mark.parametrize("impl", ["native", "seed"])
def test_grelu_cka_n1000(benchmark, device, impl):
    X, Y = conv_features(1000, device)
    fn = (lambda: se.cka(X, Y, "max")) if impl == "native" else (lambda: grelu_cka_as_in_the_seed(X, Y))
    benchmark.group = f"G_ReLU-CKA N=1000 C=256 8x8 f32 (seed route: 1 GB (N,N,C) tensor per Gram) [{device}]"
    benchmark.extra_info["impl"] = impl
    value = benchmark.pedantic(timed(fn, device), rounds=2, iterations=1, warmup_rounds=0)
    assert value == pytest.approx(se.cka(X, Y, "max"), rel=1e-3)


def test_grelu_cka_n10000(benchmark, device):
    """N = 10,000: the seed's (N, N, C) tensor would be 100 GB in float32;
    ours holds two (N, N) Gram matrices."""
    X, Y = conv_features(10000, device)
    benchmark.group = f"G_ReLU-CKA N=10000 C=256 8x8 f32 (O(N^2) memory) [{device}]"
    benchmark.extra_info["impl"] = "native"
    value = benchmark.pedantic(timed(lambda: se.cka(X, Y, "max"), device), rounds=1, iterations=1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    print(f"\nG_ReLU-CKA N=10000: {value:.4f}; process peak RSS {peak:.1f} GiB "
          f"(the (N, N, C) tensor alone: {10000 ** 2 * 256 * 4 / 2 ** 30:.0f} GiB)")


@pytest.mark.parametrize("impl", ["native", "reference"])
def test_grelu_stitching_epoch_512_channels(benchmark, device, impl):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 512, 3, padding=1), nn.ReLU(), nn.Conv2d(512, 10, 1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten()).to(device)
    x = torch.randn(1024, 3, 8, 8, device=device)
    y = torch.randint(0, 10, (1024,), device=device)

    def epoch():
        with se.use_backend("native" if impl == "native" else "reference"):
            return se.stitch(model, model, "1", (x, y), kind="grelu", epochs=1, batch_size=32, progress=False,
                             generator=0)

    benchmark.group = f"G_ReLU stitching epoch, 512 channels, 1024 images, batch 32 (32 Sinkhorn projections) [{device}]"
    benchmark.extra_info["impl"] = impl
    benchmark.pedantic(timed(epoch, device), rounds=3, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("impl", ["native", "reference"])
def test_sinkhorn_1000_projections(benchmark, device, impl):
    P = torch.rand(1000, 64, 64, generator=torch.Generator().manual_seed(0)).to(device)
    fn = {"native": lambda: se.sinkhorn(P, 16), "reference": lambda: reference.sinkhorn(P, 16)}[impl]
    benchmark.group = f"sinkhorn 1000 x 64x64, 16 rounds f32 [{device}]"
    benchmark.extra_info["impl"] = impl
    benchmark.pedantic(timed(fn, device), rounds=5, iterations=1, warmup_rounds=1)
