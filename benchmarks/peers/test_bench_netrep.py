"""netrep (github.com/ahwillia/netrep, Williams et al. 2021) against
spectral_ext's shape metrics on the same inputs in the same run: the K x K of
32 representations of 1000 x 64 by netrep.multiset.pairwise_distances (its
M x M: every pair fitted anew), by a user's loop of netrep's LinearMetric
(or PermutationMetric) fit_score over the pairs, by
measure_matrix(reps, "shape_metric" / "permutation_metric") and by the
compat adapter's pairwise_distances; and one pair at N = 2000, D = 512.
One thread on every side (torch and every BLAS: threadpoolctl), interleaved
repeats, medians, the ratio, and an assertion that the numbers agree.

netrep is not on the package index: point NETREP_SRC at a folder holding its
source package (`git clone https://github.com/ahwillia/netrep`; it needs
numpy, scipy, scikit-learn and tqdm, which the test environment has); the
file is skipped without it. Run:
NETREP_SRC=/path/to/netrep python -m pytest -q -p no:cacheprovider -s --timeout=0 benchmarks/peers/test_bench_netrep.py
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

SRC = os.environ.get("NETREP_SRC")
if not SRC:
    pytest.skip("NETREP_SRC is not set (netrep's source folder; see the docstring)", allow_module_level=True)
sys.path.insert(0, os.path.abspath(SRC))
from netrep.metrics import LinearMetric, PermutationMetric  # noqa: E402
from netrep.multiset import pairwise_distances  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from timing import interleaved, report  # noqa: E402

from spectral_ext.compat import netrep as cn  # noqa: E402
from spectral_ext.similarity import compare, measure_matrix  # noqa: E402


def netrep_version() -> str:
    try:
        commit = subprocess.run(["git", "-C", SRC, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = os.environ.get("NETREP_COMMIT", "source")
    return f"netrep {commit}"


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(threads)


def networks(k=32, n=1000, d=64, seed=0):
    rs = np.random.RandomState(seed)
    Z = rs.randn(n, 16)
    return [Z @ rs.randn(16, d) + rs.rand() * rs.randn(n, d) for _ in range(k)]


def loop(metric, reps):
    """A user's loop: fit_score of every pair."""
    k = len(reps)
    D = np.zeros((k, k))
    for i in range(k):
        for j in range(i + 1, k):
            D[i, j] = D[j, i] = metric.fit_score(reps[i], reps[j])
    return D


@pytest.mark.parametrize("kind,alpha", [("linear", 1.0), ("linear", 0.5), ("permutation", None)])
def test_kxk_32_networks(kind, alpha):
    reps = networks()
    if kind == "linear":
        peer, ours, name, opts = LinearMetric(alpha=alpha), cn.LinearMetric(alpha=alpha), "shape_metric", {
            "alpha": alpha}
    else:
        peer, ours, name, opts = PermutationMetric(), cn.PermutationMetric(), "permutation_metric", {}
    values = {
        "netrep pairwise_distances": lambda: pairwise_distances(peer, reps, verbose=False),
        "netrep fit_score loop": lambda: loop(peer, reps),
        "spectral_ext measure_matrix": lambda: measure_matrix(reps, name, **opts).matrix.values,
        "spectral_ext compat pairwise_distances": lambda: cn.pairwise_distances(ours, reps, verbose=False),
    }
    ref = values["netrep pairwise_distances"]()
    for label, fn in values.items():
        np.testing.assert_allclose(fn(), ref, rtol=0, atol=1e-8, err_msg=label)
    med = interleaved(values, repeats=3)
    report(f"{kind} metric (alpha={alpha}) K x K of 32 x (1000 x 64), 1 thread ({netrep_version()}, torch "
           f"{torch.__version__}, load {os.getloadavg()[0]:.1f})", med, "netrep pairwise_distances")
    assert med["netrep pairwise_distances"] > med["spectral_ext measure_matrix"]


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_one_pair_2000_x_512(alpha):
    rs = np.random.RandomState(1)
    X = rs.randn(2000, 512)
    Y = X @ rs.randn(512, 512) / 20 + rs.randn(2000, 512)
    values = {
        "netrep LinearMetric.fit_score": lambda: LinearMetric(alpha=alpha).fit_score(X, Y),
        "spectral_ext compare": lambda: compare(X, Y, "shape_metric", alpha=alpha),
        "spectral_ext compat LinearMetric.fit_score": lambda: cn.LinearMetric(alpha=alpha).fit_score(X, Y),
    }
    ref = values["netrep LinearMetric.fit_score"]()
    for label, fn in values.items():
        assert fn() == pytest.approx(ref, abs=1e-8), label
    med = interleaved(values, repeats=3)
    report(f"shape metric (alpha={alpha}) one pair 2000 x 512, 1 thread ({netrep_version()}, load "
           f"{os.getloadavg()[0]:.1f})", med, "netrep LinearMetric.fit_score")
    assert med["netrep LinearMetric.fit_score"] > 0.8 * med["spectral_ext compare"]
