"""The full SVR: VGG16 (weights=None) with where the time goes, its
adjacency phase native versus reference, and a zoo of 64 small CNNs in one
batched call versus 64 separate calls; with BENCH_SVR_VGG11=1, the exact SVR of
torchvision VGG11 against the old main's SVDs (minutes)."""
import os
import time

import pytest
import torch

import spectral_ext as se
from spectral_ext import datasets, reference
from spectral_ext._linalg import batched_signed_svd
from spectral_ext.spectral_neurons import _stack_by_shape

from conftest import timed


@pytest.fixture(scope="module")
def vgg16_phases():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.vgg16(weights=None)
    x = torch.randn(1, 3, 32, 32)
    t0 = time.perf_counter()
    graph = se.discover(model, x)
    t1 = time.perf_counter()
    svds = batched_signed_svd({n: m.matrix() for n, m in graph.maps.items()})
    t2 = time.perf_counter()
    operands = {k: (svds[c.previous][0][c.channels], svds[c.next][2][c.rows]) for k, c in enumerate(graph.connections)}
    t3 = time.perf_counter()
    _stack_by_shape(operands, se.conv_adjacency)
    t4 = time.perf_counter()
    phases = {"discovery": t1 - t0, "svd": t2 - t1, "gather": t3 - t2, "adjacency": t4 - t3}
    return model, graph, operands, phases


def test_svr_vgg16_where_the_time_goes(vgg16_phases, benchmark):
    model, graph, _, phases = vgg16_phases
    total = sum(phases.values())
    print("\nVGG16 SVR on the CPU: " + ", ".join(f"{k} {v:.1f} s ({100 * v / total:.0f}%)" for k, v in phases.items()))
    benchmark.extra_info.update(phases)
    benchmark.extra_info["impl"] = "native"
    benchmark.group = "svr vgg16 full (discovery + SVDs + adjacencies) [cpu]"
    benchmark.pedantic(lambda: se.svr(model, graph=graph), rounds=1, iterations=1)


@pytest.mark.parametrize("impl", ["native", "reference"])
def test_svr_vgg16_adjacency_phase(vgg16_phases, benchmark, impl):
    _, _, operands, _ = vgg16_phases
    op = se.conv_adjacency if impl == "native" else reference.conv_adjacency
    benchmark.group = "svr vgg16 adjacency phase (15 edges) [cpu]"
    benchmark.extra_info["impl"] = impl
    benchmark.pedantic(lambda: _stack_by_shape(operands, op), rounds=3, iterations=1)


@pytest.mark.parametrize("impl", ["native", "separate"])
def test_svr_zoo_of_64_cnns(benchmark, device, impl):
    torch.manual_seed(0)
    models = [datasets.digits_cnn().to(device) for _ in range(64)]
    x = torch.randn(1, 1, 8, 8, device=device)
    fn = (lambda: se.svr_many(models, x)) if impl == "native" else (lambda: [se.svr(m, x) for m in models])
    benchmark.group = f"svr zoo of 64 digits CNNs: one batched call vs 64 calls [{device}]"
    benchmark.extra_info["impl"] = impl
    benchmark.pedantic(timed(fn, device), rounds=3, warmup_rounds=1, iterations=1)


@pytest.mark.parametrize("name", ["alexnet", "vgg16"])
def test_discover_at_224(benchmark, name):
    """Issue 12's target: discover linear in the features (AlexNet and VGG16 at 224 x 224 in under 2 s);
    the FC -> FC grouping was one boolean mask per channel (13 s of an AlexNet trace)."""
    torchvision = pytest.importorskip("torchvision")
    model = getattr(torchvision.models, name)(weights=None)
    x = torch.randn(1, 3, 224, 224)
    benchmark.group = f"discover {name} at 224 x 224 [cpu]"
    benchmark.extra_info["impl"] = "native"
    benchmark.pedantic(lambda: se.discover(model, x), rounds=3, iterations=1)


def _old_main_signed_svd(W):
    """The SVD of every map before issue 12 (spectral_ext/_linalg.py at 9bd0d9c): LAPACK on W as it is."""
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    V = Vh.mT
    sign = torch.sign(torch.gather(V, -2, V.abs().argmax(dim=-2, keepdim=True)))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return U * sign, S, V * sign


@pytest.mark.skipif(not os.environ.get("BENCH_SVR_VGG11"), reason="minutes per side: set BENCH_SVR_VGG11=1")
def test_exact_svr_of_vgg11_vs_old_main(benchmark):
    """Issue 12's target: the exact svr(m, x) of torchvision VGG11 (weights=None, 32 x 32 input, graph
    given) at least 4x faster than the old main, whose time was its SVDs (LAPACK on each map as it is;
    its adjacencies are the same code as today's), one thread, both in this run; the singular values agree."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.vgg11(weights=None)
    graph = se.discover(model, torch.randn(1, 3, 32, 32))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        new = se.svr(model, graph=graph, progress=False)
        t_new = time.perf_counter() - start
        t_old, old = {}, {}
        for name, m in graph.maps.items():
            start = time.perf_counter()
            old[name] = _old_main_signed_svd(m.matrix())
            t_old[name] = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    for layer in new.layers:
        torch.testing.assert_close(layer.S, old[layer.name][1], rtol=1e-4, atol=1e-6 * float(layer.S[0]))
    total = sum(t_old.values())
    print(f"\nexact SVR of VGG11: spectral_ext {t_new:.1f} s, old main's SVDs alone {total:.1f} s "
          f"({total / t_new:.1f}x; " + ", ".join(f"{k} {v:.1f} s" for k, v in t_old.items() if v > 1) + ")")
    benchmark.group = "exact svr of torchvision VGG11 vs the old main's SVDs (1 thread)"
    benchmark.extra_info.update({"native_s": t_new, "old_main_svds_s": total, "ratio": total / t_new})
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
