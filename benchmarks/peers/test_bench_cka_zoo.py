"""A zoo's K x K pairwise CKA (K = 32 models, one probe; seed 004 section 5)
against what a zoo user runs today: pytorch-cka 1.1.3's compute_cka and
torch-cka 0.21's CKA class in a loop over the 496 pairs (each pair runs both
models, as their APIs do), and spectral_ext's zoo.pair_metrics(models, None,
probe, layers) (and the zoo.analyze run of the same pairs, and pair_metrics
within a max_memory of 10 MiB: blocks of models, issue 13): one forward per model, one centred Gram (or centred feature
matrix) per model and layer, every pair from one batched product. One thread
per side, interleaved repeats (A, B, C, A, B, C, ...; timing.interleaved, after
one warm-up), medians and the
ratios; the values are asserted to agree with the float64 formula (ours to
1e-9 on the same activations, the peers to their float32 accuracy).

Run: OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python -m pytest -q -s benchmarks/peers/test_bench_cka_zoo.py
CKA_ZOO_K (default 32), CKA_ZOO_N (probe size, default 256) and CKA_ZOO_REPEATS (default 3) size it.
Figures go to benchmarks/RESULTS.md ("Representation space vs the CKA packages")."""
import itertools
import math
import os
import sys

import numpy as np
import pytest
import torch

import spectral_ext as se
from spectral_ext import datasets, zoo

sys.path.insert(0, os.path.dirname(__file__))
from timing import interleaved  # noqa: E402

pytorch_cka = pytest.importorskip("cka")
torch_cka = pytest.importorskip("torch_cka")

K = int(os.environ.get("CKA_ZOO_K", "32"))
N = int(os.environ.get("CKA_ZOO_N", "256"))
REPEATS = int(os.environ.get("CKA_ZOO_REPEATS", "3"))
LAYERS = ["6", "9"]  # the ReLUs after the last conv (32 x 4 x 4) and after the first Linear (64)


THREADS = torch.get_num_threads()


def setup_module():
    torch.set_num_threads(1)  # one thread per side


def teardown_module():
    torch.set_num_threads(THREADS)


def the_zoo():
    """K digits CNNs (the digits zoo's architecture, random weights from K
    seeds) and a probe of N digits images."""
    models = {}
    for i in range(K):
        torch.manual_seed(i)
        models[f"cnn_{i:02d}"] = datasets.digits_cnn().eval()
    x_train, _, x_test, _ = datasets.digits()
    return models, torch.cat([x_test, x_train])[:N]


def pytorch_cka_loop(models, loader):
    """pytorch-cka's compute_cka on every pair: the diagonal of its layer x layer matrix."""
    out = {}
    for a, b in itertools.combinations(models, 2):
        matrix = pytorch_cka.compute_cka(models[a], models[b], loader, layers=LAYERS, progress=False,
                                         device="cpu")[0]
        out[(a, b)] = matrix.diagonal().tolist()
    return out


def torch_cka_loop(models, loader):
    """torch-cka's CKA(...).compare(loader) on every pair. Its hooks are never
    removed, so each pair's are taken off afterwards (as a careful user
    would): otherwise every later forward would run all earlier pairs' hooks."""
    import warnings

    out = {}
    for a, b in itertools.combinations(models, 2):
        hooked = [models[n].get_submodule(layer) for n in (a, b) for layer in LAYERS]
        saved = [dict(m._forward_hooks) for m in hooked]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cka = torch_cka.CKA(models[a], models[b], model1_name=a, model2_name=b, model1_layers=LAYERS,
                                model2_layers=LAYERS, device="cpu")
            cka.compare(loader)
        out[(a, b)] = cka.export()["CKA"].diagonal().tolist()
        for module, hooks in zip(hooked, saved):
            module._forward_hooks.clear()
            module._forward_hooks.update(hooks)
    return out


def ours(models, probe):
    return by_pair(zoo.pair_metrics(models, None, probe, LAYERS, ("cka",), progress=False))


def ours_blocked(models, probe, max_memory=10 << 20):
    """pair_metrics within a max_memory holding a fifth of the Grams: blocks of models, Grams remade per block."""
    return by_pair(zoo.pair_metrics(models, None, probe, LAYERS, ("cka",), progress=False, max_memory=max_memory))


def ours_analyze(models, probe):
    """The zoo run a user starts (in memory, pairs only): its pair chunks batched, Grams cached."""
    return by_pair(zoo.analyze(models, metrics=(), pairs=("cka",), probe=probe, layers=LAYERS, progress=False,
                               report=False)["pairs"])


def by_pair(frame):
    out = {}
    for a, b, layer, value in frame[["model_a", "model_b", "layer", "value"]].itertuples(index=False):
        out.setdefault(tuple(sorted((a, b))), {})[layer] = value
    return {pair: [values[layer] for layer in LAYERS] for pair, values in out.items()}


def test_zoo_k_by_k_cka_vs_pytorch_cka_and_torch_cka():
    models, probe = the_zoo()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(probe), batch_size=N)
    values = {}
    runs = {"spectral_ext zoo.pair_metrics": lambda: ours(models, probe),
            "spectral_ext zoo.analyze": lambda: ours_analyze(models, probe),
            "spectral_ext zoo.pair_metrics max_memory=10 MiB": lambda: ours_blocked(models, probe),
            "pytorch-cka 1.1.3 compute_cka loop": lambda: pytorch_cka_loop(models, loader),
            "torch-cka 0.21 CKA loop": lambda: torch_cka_loop(models, loader)}
    sides = {name: (lambda name=name, fn=fn: values.__setitem__(name, fn())) for name, fn in runs.items()}
    medians = interleaved(sides, REPEATS)
    base = "spectral_ext zoo.pair_metrics"
    print(f"\nK x K linear CKA, K={K} digits CNNs, {K * (K - 1) // 2} pairs, probe N={N}, layers {LAYERS} "
          f"(load {os.getloadavg()[0]:.1f}): " +
          ", ".join(f"{name} {t:.3f} s" for name, t in medians.items()) + " | " +
          ", ".join(f"{name} / ours {t / medians[base]:.1f}x" for name, t in medians.items() if name != base))

    # the float64 formula (pytorch-cka's, run in float64) on the activations each model gives in float32
    with torch.no_grad():
        acts = {n: [m[: int(layer) + 1](probe).flatten(1).double() for layer in LAYERS] for n, m in models.items()}
    worst = {name: 0.0 for name in sides}
    for a, b in itertools.combinations(models, 2):
        exact = [float(pytorch_cka.cka_from_features(X, Y)) for X, Y in zip(acts[a], acts[b])]
        for name in sides:
            for got, want in zip(values[name][(a, b)], exact):
                worst[name] = max(worst[name], abs(got - want) / max(want, 1e-3))
    print("  largest relative error against float64: " + ", ".join(f"{n} {e:.1e}" for n, e in worst.items()))
    assert worst[base] < 1e-9 and worst["spectral_ext zoo.analyze"] < 1e-9
    assert worst["spectral_ext zoo.pair_metrics max_memory=10 MiB"] < 1e-9
    # the peers' float32 Grams of uncentred features: percent-level errors on ReLU features
    assert worst["pytorch-cka 1.1.3 compute_cka loop"] < 0.1
    assert worst["torch-cka 0.21 CKA loop"] < 0.1


def test_zoo_k_by_k_procrustes_vs_a_numpy_loop():
    """Orthogonal Procrustes (seed 004 D.7.1) of every pair: ours batched (one
    product of the stacked features, the nuclear norms in one batched call)
    against the numpy nuclear-norm form pair by pair on the same activations."""
    models, probe = the_zoo()
    layer = LAYERS[0]
    with torch.no_grad():
        acts = {n: m[: int(layer) + 1](probe).double() for n, m in models.items()}

    def numpy_loop():
        out = []
        for a, b in itertools.combinations(models, 2):
            A = acts[a].transpose(1, -1).reshape(-1, acts[a].shape[1]).numpy()
            B = acts[b].transpose(1, -1).reshape(-1, acts[b].shape[1]).numpy()
            A, B = A / np.linalg.norm(A), B / np.linalg.norm(B)
            out.append(1 - math.sqrt(max(0.0, 2 - 2 * np.linalg.norm(A.T @ B, ord="nuc"))) / 2)
        return out

    def batched():
        return se.pairwise_similarity(acts, measure="procrustes", progress=False).to_frame()["value"].tolist()

    values = {}
    medians = interleaved({"ours": lambda: values.__setitem__("ours", batched()),
                           "numpy": lambda: values.__setitem__("numpy", numpy_loop())}, REPEATS)
    print(f"\nK x K orthogonal Procrustes, K={K}, layer {layer} (N={N} x 16 positions x 32 channels) "
          f"(load {os.getloadavg()[0]:.1f}): pairwise_similarity {medians['ours']:.3f} s, numpy loop "
          f"{medians['numpy']:.3f} s ({medians['numpy'] / medians['ours']:.1f}x)")
    np.testing.assert_allclose(values["ours"], values["numpy"], rtol=0, atol=1e-10)
