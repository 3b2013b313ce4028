"""Writes python_tests/data/netrep_values.json: netrep's own numbers on fixed
seeded inputs, for python_tests/test_compat_netrep.py (netrep is not on the
package index, so the tests cannot run it).

Usage: python scripts/netrep_fixture.py NETREP_SRC [OUT]
NETREP_SRC: a folder holding netrep's source package (netrep/ with
metrics/, utils.py, multiset.py, validation.py), e.g. from
`git clone https://github.com/ahwillia/netrep` (the commit is recorded in
the JSON when NETREP_SRC is a git checkout or NETREP_COMMIT is set); netrep
needs numpy, scipy, scikit-learn and tqdm. The inputs are made by inputs()
and networks() below, which the test imports to rebuild them from the same
seeds.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "python_tests", "data", "netrep_values.json")

#: (seed, N, Dx, Dy): equal widths, zero padding, fewer inputs than features
PAIRS = [(0, 30, 5, 5), (1, 40, 6, 4), (2, 8, 12, 12), (3, 25, 3, 7)]
#: pairwise_distances: 4 networks of these widths (pairs padded to 4 and 6 columns), N_TRAIN train and N_TEST test
NET_SEED, NET_WIDTHS, N_TRAIN, N_TEST = 7, (6, 4, 3, 6), 50, 20
ALPHAS = (0.0, 0.5, 1.0)
METHODS = ("angular", "euclidean")


def inputs(seed: int, n: int, dx: int, dy: int, m: int = 10):
    """(X, Y, X_test, Y_test): correlated, offset features; Y a noisy linear
    map of X (distances well inside (0, pi/2)); m test inputs from the same model."""
    rs = np.random.RandomState(seed)
    A = rs.randn(dx, dx)
    B = rs.randn(dx, dy)
    off_x, off_y = rs.randn(dx), rs.randn(dy)
    Z = rs.randn(n + m, dx)
    X = Z @ A + off_x
    Y = X @ B + 0.5 * rs.randn(n + m, dy) + off_y
    return X[:n], Y[:n], X[n:], Y[n:]


def networks(seed: int = NET_SEED, widths=NET_WIDTHS, n: int = N_TRAIN, m: int = N_TEST):
    """(train, test): lists of (n, w) and (m, w) matrices, noisy linear maps of one latent."""
    rs = np.random.RandomState(seed)
    Z = rs.randn(n + m, 8)
    nets = [Z @ rs.randn(8, w) + rs.rand() * rs.randn(n + m, w) for w in widths]
    return [X[:n] for X in nets], [X[n:] for X in nets]


def kernels(X):
    Xc = X - X.mean(0)
    return Xc @ Xc.T / len(X)


def main(src: str, out: str = OUT) -> None:
    sys.path.insert(0, os.path.abspath(src))
    from netrep.metrics import LinearMetric, PermutationMetric
    from netrep.multiset import pairwise_distances
    from netrep.utils import sq_bures_metric

    commit = os.environ.get("NETREP_COMMIT")
    if commit is None:
        try:
            commit = subprocess.run(["git", "-C", src, "rev-parse", "HEAD"], capture_output=True, text=True,
                                    check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            commit = "unknown"
    data = {"netrep_commit": commit, "generator": "scripts/netrep_fixture.py inputs()/networks()",
            "pairs": [], "permutation": [], "pairwise": [], "bures": []}
    for seed, n, dx, dy in PAIRS:
        X, Y, Xt, Yt = inputs(seed, n, dx, dy)
        for alpha in ALPHAS:
            for method in METHODS:
                for center in (True, False):
                    m = LinearMetric(alpha=alpha, center_columns=center, score_method=method)
                    train = m.fit_score(X, Y)
                    row = {"seed": seed, "N": n, "Dx": dx, "Dy": dy, "alpha": alpha, "score_method": method,
                           "center_columns": center, "train": train, "test": m.score(Xt, Yt)}
                    if dx == dy and n > dx:  # a unique alignment: W_x W_y^T is defined
                        row["WxWyT"] = (m.Wx_ @ m.Wy_.T).tolist()
                    data["pairs"].append(row)
        for method in METHODS:
            m = PermutationMetric(score_method=method)
            data["permutation"].append({"seed": seed, "N": n, "Dx": dx, "Dy": dy, "score_method": method,
                                        "train": m.fit_score(X, Y), "test": m.score(Xt, Yt),
                                        "Px": m.Px_.tolist(), "Py": m.Py_.tolist()})
        data["bures"].append({"seed": seed, "N": n, "Dx": dx, "Dy": dy,
                              "sq_bures": float(sq_bures_metric(kernels(X), kernels(Y)))})
    train, test = networks()
    for alpha in ALPHAS:
        for method in METHODS:
            D_train, D_test = pairwise_distances(LinearMetric(alpha=alpha, score_method=method), train, test,
                                                 verbose=False)
            data["pairwise"].append({"metric": "LinearMetric", "alpha": alpha, "score_method": method,
                                     "train": D_train.tolist(), "test": D_test.tolist()})
    for method in METHODS:
        D_train, D_test = pairwise_distances(PermutationMetric(score_method=method), train, test, verbose=False)
        data["pairwise"].append({"metric": "PermutationMetric", "score_method": method,
                                 "train": D_train.tolist(), "test": D_test.tolist()})
    data["shapes"] = {"pairs": PAIRS, "networks": {"seed": NET_SEED, "widths": NET_WIDTHS, "train": N_TRAIN,
                                                   "test": N_TEST}}
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(data, f, indent=0)
        f.write("\n")
    print(f"wrote {out} ({os.path.getsize(out)} bytes), netrep {commit}")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(*sys.argv[1:3])
