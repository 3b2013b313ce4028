"""Weight space vs WeightWatcher 0.7.7 (issue 12): WeightWatcher(model=m).analyze()
against spectral_ext.compat.weightwatcher's drop-in on VGG11 adapted to CIFAR
(9.75M parameters) and torchvision's ResNet-18 (weights=None), and a zoo of
1,000 CNNs of 4,875 parameters in memory: WeightWatcher in a loop against
zoo.model_metrics(("alpha",), convention="weightwatcher"). One thread per side,
the two interleaved (A, B, A, B, ...), medians and the ratio in extra_info; the
numbers are asserted to agree (spectra to 1e-8, alpha to the fit's rounding)."""
import contextlib
import io
import os
import statistics
import time
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from spectral_ext import zoo
from spectral_ext.compat import weightwatcher as se_ww

ww = pytest.importorskip("weightwatcher")
torchvision = pytest.importorskip("torchvision")

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
N_MODELS = int(os.environ.get("BENCH_ZOO_MODELS", "1000"))


def vgg11_cifar():
    """torchvision's VGG11 features with a 512-512-10 classifier for 32 x 32 inputs: 9,750,922 parameters."""
    model = torchvision.models.vgg11(weights=None)
    model.avgpool = nn.Identity()
    model.classifier = nn.Sequential(nn.Linear(512, 512), nn.ReLU(True), nn.Linear(512, 512), nn.ReLU(True),
                                     nn.Linear(512, 10))
    return model


def tiny_cnn():
    """A zoo member: 4,875 parameters, conv maps of 8, 6 and 4 channels and one Linear."""
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 6, 3, padding=1),
                         nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 7 * 7, 21))


def quiet(fn):
    def run():
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn()
    return run


def interleaved(benchmark, ours, theirs, rounds=ROUNDS):
    """Both sides alternately, one thread each; returns (our result, their result, medians)."""
    torch.set_num_threads(1)
    times = {"spectral_ext": [], "weightwatcher": []}
    results = {}

    def pair():
        for side, fn in (("weightwatcher", theirs), ("spectral_ext", ours)):
            start = time.perf_counter()
            results[side] = fn()
            times[side].append(time.perf_counter() - start)

    benchmark.pedantic(pair, rounds=rounds, iterations=1, warmup_rounds=0)
    medians = {k: statistics.median(v) for k, v in times.items()}
    benchmark.extra_info.update({f"{k}_median_s": v for k, v in medians.items()})
    benchmark.extra_info["speedup"] = medians["weightwatcher"] / medians["spectral_ext"]
    benchmark.extra_info["weightwatcher_version"] = ww.__version__
    print(f"\nweightwatcher {medians['weightwatcher']:.3f} s, spectral_ext {medians['spectral_ext']:.3f} s, "
          f"{benchmark.extra_info['speedup']:.1f}x (medians of {rounds}, interleaved)")
    return results["spectral_ext"], results["weightwatcher"]


def assert_same_details(expected, got):
    assert list(got.columns) == list(expected.columns) and got["layer_id"].tolist() == expected["layer_id"].tolist()
    for column in ("lambda_max", "sv_max", "norm", "spectral_norm", "stable_rank", "log_norm", "num_evals", "N", "M"):
        np.testing.assert_allclose(got[column].astype(float), expected[column].astype(float), rtol=1e-8)
    # the fit: the same xmin, alpha to its rounding (sums of logs in another order)
    np.testing.assert_allclose(got["xmin"].astype(float), expected["xmin"].astype(float), rtol=1e-8)
    np.testing.assert_allclose(got["alpha"].astype(float), expected["alpha"].astype(float), rtol=1e-6)


@pytest.mark.parametrize("arch", ["vgg11_cifar", "resnet18"])
def test_analyze_vs_weightwatcher(benchmark, arch):
    torch.manual_seed(0)
    model = vgg11_cifar() if arch == "vgg11_cifar" else torchvision.models.resnet18(weights=None)
    benchmark.group = f"WeightWatcher.analyze() on {arch}"
    got, expected = interleaved(benchmark, lambda: se_ww.WeightWatcher(model=model).analyze(),
                                quiet(lambda: ww.WeightWatcher(model=model).analyze()))
    assert_same_details(expected, got)


def test_zoo_alpha_vs_weightwatcher_in_a_loop(benchmark):
    torch.manual_seed(0)
    models = {f"m{i:04d}": tiny_cnn() for i in range(N_MODELS)}
    x = torch.zeros(1, 1, 28, 28)

    def theirs():
        return {n: ww.WeightWatcher(model=m).analyze() for n, m in models.items()}

    benchmark.group = f"zoo of {N_MODELS} CNNs of 4,875 parameters, per-layer alpha and alpha-hat"
    got, expected = interleaved(benchmark, lambda: zoo.model_metrics(models, ("alpha",), x, convention="weightwatcher"),
                                quiet(theirs))
    layers = got["layers"]
    for name in list(models)[:: max(1, N_MODELS // 50)]:
        details = expected[name]
        mine = layers[layers["model"] == name]
        np.testing.assert_allclose(mine["lambda_max"], details["lambda_max"], rtol=1e-8)
        np.testing.assert_allclose(mine["alpha"], details["alpha"], rtol=1e-6)
        summary = got["models"].set_index("model").loc[name, "alpha_hat"]
        assert summary == pytest.approx(details["alpha_weighted"].mean(), rel=1e-6)


@pytest.mark.parametrize("arch", ["efficientnet_b4", "mobilenet_v3_large"])
def test_layer_spectra_of_grouped_convolutions_vs_weightwatcher(benchmark, arch):
    """Issue 24: depthwise convolutions per block (never expanded): EfficientNet-B4's layer_spectra took
    106 s before (a 1,152-channel depthwise conv expanded to 1152 x 28,800). The numbers: every lambda_max
    WeightWatcher reports is one of layer_spectra(convention="weightwatcher")'s, to 1e-8."""
    from spectral_ext import spectra

    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None)
    benchmark.group = f"layer_spectra vs WeightWatcher.analyze() on {arch}"
    got, expected = interleaved(benchmark, lambda: spectra.layer_spectra(model).to_frame(),
                                quiet(lambda: ww.WeightWatcher(model=model).analyze()))
    assert len(got) >= len(expected)
    frame = spectra.layer_spectra(model, convention="weightwatcher").to_frame()
    ours = np.sort(frame["lambda_max"].dropna().to_numpy())
    for value in expected["lambda_max"].astype(float):
        nearest = ours[np.clip(np.searchsorted(ours, value), 0, len(ours) - 1)]
        assert abs(nearest - value) <= 1e-8 * value or np.isclose(ours, value, rtol=1e-8).any()


@pytest.mark.parametrize("method", ["raw", "euclidean", "cka"])
def test_distances_vs_weightwatcher(benchmark, method):
    """distances(m1, m2, method) on two ResNet-18 initialisations (seeds 0 and 1): CPU-time medians
    (time.process_time, one thread, interleaved) in extra_info besides the wall medians; euclidean and
    cka run WeightWatcher's float32 numpy operations on its slices (the same numbers: 1e-6 asserted, 0
    measured on an AMD EPYC with numpy's OpenBLAS)."""
    torch.manual_seed(0)
    m1 = torchvision.models.resnet18(weights=None)
    torch.manual_seed(1)
    m2 = torchvision.models.resnet18(weights=None)
    cpu = {"spectral_ext": [], "weightwatcher": []}

    def timed(side, fn):
        def run():
            start = time.process_time()
            out = fn()
            cpu[side].append(time.process_time() - start)
            return out
        return run

    benchmark.group = f"WeightWatcher.distances(method={method!r}) on two ResNet-18"
    got, expected = interleaved(
        benchmark, timed("spectral_ext", lambda: se_ww.WeightWatcher().distances(m1, m2, method=method)),
        timed("weightwatcher", quiet(lambda: ww.WeightWatcher().distances(m1, m2, method=method))))
    medians = {k: statistics.median(v) for k, v in cpu.items()}
    benchmark.extra_info.update({f"{k}_cpu_median_s": v for k, v in medians.items()})
    benchmark.extra_info["cpu_speedup"] = medians["weightwatcher"] / medians["spectral_ext"]
    print(f"CPU: weightwatcher {medians['weightwatcher'] * 1e3:.1f} ms, spectral_ext "
          f"{medians['spectral_ext'] * 1e3:.1f} ms, {benchmark.extra_info['cpu_speedup']:.2f}x")
    assert got[0] == pytest.approx(expected[0], rel=1e-6)
    np.testing.assert_allclose(got[2]["delta_W"].astype(float), expected[2]["delta_W"].astype(float), rtol=1e-6)
