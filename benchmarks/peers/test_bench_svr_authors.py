"""spectral_ext.compat.svr.SVR against the SVR authors' own code (github
danmlr/svr, not on PyPI: set SVR_AUTHORS_CODE to the folder holding their
svr.py, else these skip). One thread per side, interleaved repeats, medians,
the ratio, and the adjacencies asserted equal. Their svr.py needs
np.ascontiguousarray around the arrays scipy's svds returns today; plotly, used only by their plots, is stubbed when absent.

BENCH_SVR_VGG11=1 adds torchvision's VGG11 (minutes per side on 2 cores)."""
import importlib.util
import os
import sys
import time
import types

import numpy as np
import pytest
import torch
from torch import nn

from spectral_ext.compat.svr import SVR

torchvision = pytest.importorskip("torchvision")


def authors_module():
    folder = os.environ.get("SVR_AUTHORS_CODE")
    if not folder or not os.path.isfile(os.path.join(folder, "svr.py")):
        pytest.skip("set SVR_AUTHORS_CODE to a folder holding the authors' svr.py (github danmlr/svr)")
    try:
        import plotly.express, plotly.graph_objects  # noqa: F401
    except ImportError:
        for name in ("plotly", "plotly.express", "plotly.graph_objects"):
            sys.modules.setdefault(name, types.ModuleType(name))
    spec = importlib.util.spec_from_file_location("danmlr_svr", os.path.join(folder, "svr.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def vgg11_cifar():
    """torchvision's VGG11 features with a 512-512-10 classifier for 32 x 32 inputs (9.75M parameters)."""
    model = torchvision.models.vgg11(weights=None)
    model.classifier = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    return model


def small_vgg():
    """Every map <= 128 wide: both sides take full SVDs."""
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3, padding=1),
                         nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(128 * 4 * 4, 128), nn.ReLU(), nn.Linear(128, 10))


CASES = {"small_vgg": (small_vgg, 7), "vgg11_cifar": (vgg11_cifar, 5)}
if os.environ.get("BENCH_SVR_VGG11"):
    CASES["vgg11"] = (lambda: torchvision.models.vgg11(weights=None), 1)


@pytest.mark.parametrize("arch", list(CASES))
def test_svr_vs_authors_code(benchmark, arch):
    authors = authors_module()
    build, repeats = CASES[arch]
    torch.manual_seed(0)
    weights = [p.detach() for p in build().parameters()]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times = {"native": [], "authors": []}
        for _ in range(repeats):  # interleaved: A, B, A, B, ...
            for impl, fn in (("native", lambda: SVR(weights, verbose=False)),
                             ("authors", lambda: authors.SVR(weights, verbose=False))):
                start = time.perf_counter()
                out = fn()
                times[impl].append(time.perf_counter() - start)
                if impl == "native":
                    ours = out
                else:
                    theirs = out
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(ours.adjacency, theirs.adjacency):
        # Theirs come from ARPACK (to its tolerance) and LAPACK in float32; ours from exact eigenpairs.
        np.testing.assert_allclose(a.double().numpy(), b.double().numpy(), atol=2e-4)
    for layer in range(len(ours.adjacency)):
        assert ours.internal_dims(layer) == theirs.internal_dims(layer)
    native, peer = np.median(times["native"]), np.median(times["authors"])
    print(f"\nSVR(weights) of {arch}: spectral_ext {native:.3f} s, authors' code {peer:.3f} s "
          f"({peer / native:.1f}x), medians of {repeats} interleaved repeats, one thread")
    benchmark.group = f"SVR(weights) of {arch} vs the authors' code (max_dim_svd=128, 1 thread)"
    benchmark.extra_info.update({"native_s": native, "authors_s": peer, "ratio": peer / native})
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
