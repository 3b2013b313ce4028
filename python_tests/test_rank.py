"""Numerical and stable rank (seed 003 section 3.1, equation 4, Theorem 1)."""
import math

import numpy as np
import pytest
import torch
from torch import nn

import spectral_ext as se
from spectral_ext import rank as R
from spectral_ext.rank import pca as pca_module


def low_rank(m, n, r, seed=0, dtype=torch.float64, batch=()):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*batch, m, r, generator=g, dtype=dtype) @ torch.randn(*batch, r, n, generator=g, dtype=dtype)


@pytest.mark.parametrize("m,n,r", [(1, 1, 1), (20, 30, 7), (64, 17, 16), (50, 50, 1)])
def test_products_of_low_rank_factors_have_the_construction_rank(m, n, r):
    W = low_rank(m, n, r)
    assert int(se.numerical_rank(W)) == r
    assert int(se.numerical_rank(W.float())) == r
    # Theorem 1: a perturbation far below the tolerance leaves the rank alone; the exact rank
    # of the perturbed matrix is full.
    noisy = W + 1e-12 * torch.randn(m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert int(se.numerical_rank(noisy)) == r
    assert int(torch.linalg.matrix_rank(noisy, rtol=1e-15)) == min(m, n)


def test_batched_explicit_tolerance_and_singular_values():
    W = torch.stack([low_rank(12, 9, r, seed=r) for r in (1, 3, 9)]).reshape(3, 1, 12, 9)
    rank = se.numerical_rank(W)
    assert rank.shape == (3, 1) and rank.dtype == torch.int64 and rank.reshape(-1).tolist() == [1, 3, 9]
    # one return type: the singular values come from svdvals, and equation 4 on them gives the same count
    sigma = torch.linalg.svdvals(W)
    assert torch.equal(R.rank_of_singular_values(sigma), rank)
    assert torch.equal(R.rank_of_singular_values(sigma, eps=0.5), se.numerical_rank(W, eps=0.5))
    with pytest.raises(TypeError, match="return_singular_values"):
        se.numerical_rank(W, return_singular_values=True)
    D = torch.diag(torch.tensor([1.0, 0.5, 0.1, 0.01], dtype=torch.float64))
    assert int(se.numerical_rank(D, eps=0.2)) == 2  # sigma_i > 0.2 * 1
    assert int(se.numerical_rank(D, eps=0.05)) == 3
    assert int(se.numerical_rank(7.0 * D, eps=0.05)) == 3  # relative to ||W||_2: scale invariant
    assert int(se.numerical_rank(torch.zeros(4, 5))) == 0


def test_stable_rank():
    torch.testing.assert_close(se.stable_rank(torch.eye(5, dtype=torch.float64)), torch.tensor(5.0, dtype=torch.float64))
    D = torch.diag(torch.tensor([2.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(se.stable_rank(D), torch.tensor(1.25, dtype=torch.float64))
    assert float(se.stable_rank(torch.zeros(3, 3))) == 0.0
    W = low_rank(30, 20, 5)
    assert 1.0 <= float(se.stable_rank(W)) <= int(se.numerical_rank(W))


def test_rank_of_singular_values_checks_its_input():
    assert int(R.rank_of_singular_values(torch.tensor([2.0, 1.0, 1e-9]))) == 2
    assert int(R.rank_of_singular_values(torch.tensor([2.0, 1.0, 0.4]), eps=0.25)) == 2  # 0.4 is below 0.25 x sigma_1
    with pytest.raises(ValueError, match="sigma must be in decreasing order"):
        R.rank_of_singular_values(torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="sigma must be non-negative"):
        R.rank_of_singular_values(torch.tensor([1.0, -2.0]))
    with pytest.raises(ValueError, match="sigma must have shape"):
        R.rank_of_singular_values(torch.tensor(1.0))


def test_errors():
    with pytest.raises(ValueError, match="W must have shape"):
        se.numerical_rank(torch.ones(3))
    with pytest.raises(ValueError, match="W contains NaN"):
        se.numerical_rank(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="eps must lie in"):
        se.numerical_rank(torch.eye(2), eps=-1.0)
    with pytest.raises(TypeError, match="W must be float32 or float64"):
        se.numerical_rank(torch.eye(2, dtype=torch.int64))


# --- partial rank of the Jacobian (section 3.2, Lemma 2) ---------------------------------------



def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 2, 3), nn.Flatten(),
                         nn.Linear(2 * 6 * 6, 5)).double().eval()


def explicit_ranks(model, x1, patch, names, at="image", rank_of="jacobian"):
    """Ranks by brute force: the full Jacobian of each named module's output
    (the model output for "") by torch.autograd.functional.jacobian, at x1
    (at="image") or at x1 with everything outside the patch zeroed (at="patch",
    Algorithm A1), then the patch's columns; their numerical rank (equation
    4) or, as A1's matrix_rank, the rank of J^T J by torch.linalg.matrix_rank
    (eigenvalues above float32 eps x K of the largest)."""
    modules = dict(model.named_modules())
    if at == "patch":
        inside = torch.zeros_like(x1)
        inside[(Ellipsis,) + patch] = x1[(Ellipsis,) + patch]
        x1 = inside
    ranks = []
    for name in names:
        def f(inp, name=name):
            out = {}
            handle = modules[name].register_forward_hook(lambda m, a, o: out.__setitem__("o", o)) if name else None
            y = model(inp)
            if handle:
                handle.remove()
            return (out["o"] if name else y).reshape(-1)
        J = torch.autograd.functional.jacobian(f, x1, vectorize=True).reshape(-1, *x1.shape[1:])
        columns = J[(slice(None), Ellipsis) + patch].reshape(J.shape[0], -1)
        if rank_of == "gram":
            K = columns.shape[1]
            ranks.append(int(torch.linalg.matrix_rank(columns.T @ columns, hermitian=True,
                                                      rtol=R.FLOAT32_EPS * K)))
        else:
            ranks.append(int(se.numerical_rank(columns)))
    return ranks


@pytest.mark.parametrize("mode,at,rank_of", [("auto", "patch", "gram"), ("forward", "patch", "gram"),
                                             ("reverse", "patch", "gram"), ("auto", "image", "jacobian"),
                                             ("reverse", "image", "gram")])
def test_partial_rank_equals_the_rank_of_the_explicit_jacobian(mode, at, rank_of):
    model = small_cnn()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    patches = [(slice(2, 6), slice(2, 6)), (slice(0, 3), slice(1, 8))]
    options = {} if at == "patch" and rank_of == "gram" else {"at": at, "rank_of": rank_of}  # A1 by default
    df = se.jacobian_partial_rank(model, ["0", "1", "2", "4"], x, patches, mode=mode, progress=False,
                                  chunk_size=7 if mode == "forward" else 256, **options).to_frame()
    assert list(df.columns[:6]) == ["sample", "patch", "layer", "rank", "n_features", "n_patch_entries"]
    assert list(df["layer"][:5]) == ["0", "1", "2", "4", "output"] and len(df) == 2 * 2 * 5
    for n in range(2):
        for patch in patches:
            label = "[" + ", ".join(f"{s.start}:{s.stop}" for s in patch) + "]"
            got = df[(df["sample"] == n) & (df["patch"] == label)]
            expected = explicit_ranks(model, x[n:n + 1], patch, ["0", "1", "2", "4", ""], at, rank_of)
            assert got["rank"].tolist() == expected
            assert int(got["n_patch_entries"].iloc[0]) == 3 * (patch[0].stop - patch[0].start) * (patch[1].stop - patch[1].start)


def test_algorithm_a1_evaluates_at_the_zero_padded_patch():
    """relu(A x) with A reading the patch (entries 0, 1) and, with weight -10,
    the rest: at the real image (all ones) every unit is off and the rank is 0;
    at the zero-padded patch (A1) both units are on and the rank is 2."""
    model = nn.Sequential(nn.Linear(4, 2, bias=False), nn.ReLU()).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0, -10, 0], [0, 1.0, 0, -10]]))
    x = torch.ones(1, 4, dtype=torch.float64)
    a1 = se.jacobian_partial_rank(model, None, x, slice(0, 2), progress=False).to_frame()
    image = se.jacobian_partial_rank(model, None, x, slice(0, 2), at="image", progress=False).to_frame()
    assert a1["rank"].tolist()[-1] == 2 and image["rank"].tolist()[-1] == 0


def test_algorithm_a1_thresholds_the_eigenvalues_of_jtj():
    """J = diag(1, 1e-4): sigma_2 = 1e-4 is above float32 eps x 2 (equation 4
    on J) but sigma_2^2 = 1e-8 is below it (A1's matrix_rank on J^T J)."""
    model = nn.Sequential(nn.Linear(2, 2, bias=False)).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.diag(torch.tensor([1.0, 1e-4])))
    x = torch.randn(1, 2, dtype=torch.float64)
    assert se.jacobian_partial_rank(model, None, x, progress=False).to_frame()["rank"].tolist() == [1, 1]
    assert se.jacobian_partial_rank(model, None, x, rank_of="jacobian", progress=False).to_frame()["rank"].tolist() == [2, 2]
    J = model[0].weight.detach()
    assert int(torch.linalg.matrix_rank(J.T @ J, hermitian=True, rtol=R.FLOAT32_EPS * 2)) == 1


def test_heavy_paths_refuse_before_running_out_of_memory():
    """Issue 18: at 224 x 224 the whole-image Jacobian of even one small conv
    holds 150,528 x 394,272 entries (over 200 GiB): refused at once, naming
    what to reduce, before any Jacobian column is computed."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
    x = torch.randn(1, 3, 224, 224)
    with pytest.raises(ValueError, match="needs about .* GiB .* free .* smaller patch"):
        se.jacobian_partial_rank(model, None, x, None, progress=False)
    with pytest.raises(ValueError, match="needs about .* GiB .* free .*n_perturbations"):
        se.perturbed_pca_dimension(model, None, x, n_perturbations=50000, progress=False)
    # the estimate is an upper bound of what a small run really needs
    small = pca_module._pca_peak_bytes(100, [3 * 8 * 8, 8 * 6 * 6], 4, 250, 2 * 8 * 6 * 6)
    assert small >= 100 * (3 * 8 * 8 + 8 * 6 * 6) * 4


def test_memory_check_compares_with_the_free_memory(monkeypatch):
    from spectral_ext import _checks

    monkeypatch.setattr(_checks, "free_memory", lambda device: 10_000)
    with pytest.raises(ValueError, match="smaller patch"):
        se.jacobian_partial_rank(small_cnn(), None, torch.randn(1, 3, 8, 8, dtype=torch.float64), None, progress=False)
    monkeypatch.setattr(_checks, "free_memory", lambda device: None)  # unknown: no refusal
    assert len(se.jacobian_partial_rank(small_cnn(), None, torch.randn(1, 3, 8, 8, dtype=torch.float64),
                                        (slice(0, 2), slice(0, 2)), progress=False).to_frame()) == 6


def test_partial_rank_does_not_increase_along_a_chain_and_sees_bottlenecks():
    """Lemma 2 / Theorem 2 on a random MLP whose widths go up and down; a
    width-3 bottleneck caps every later rank at 3."""
    torch.manual_seed(2)
    widths = [12, 10, 14, 3, 9, 11, 5]
    layers = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    model = nn.Sequential(*layers).double()
    x = torch.randn(3, 12, dtype=torch.float64)
    for patch in (None, slice(0, 5), slice(4, 12)):
        df = se.jacobian_partial_rank(model, None, x, patch, progress=False).to_frame()
        for _, part in df.groupby("sample"):
            ranks = part["rank"].to_numpy()
            assert (np.diff(ranks) <= 0).all(), ranks
            assert ranks[0] == min(10, 12 if patch is None else patch.indices(12)[1] - patch.indices(12)[0])
            assert (ranks[part["layer"].tolist().index("6"):] <= 3).all()


def test_partial_rank_with_a_low_rank_map_and_a_tolerance():
    U = torch.randn(20, 2, dtype=torch.float64) @ torch.randn(2, 16, dtype=torch.float64)
    model = nn.Sequential(nn.Linear(16, 20, bias=False)).double()
    with torch.no_grad():
        model[0].weight.copy_(U)
    df = se.jacobian_partial_rank(model, None, torch.randn(1, 16, dtype=torch.float64), None, progress=False).to_frame()
    assert df["rank"].tolist() == [2, 2]
    assert se.jacobian_partial_rank(model, None, torch.randn(1, 16, dtype=torch.float64), None, eps=2.0,
                                    progress=False).to_frame()["rank"].tolist() == [0, 0]


def test_partial_rank_accepts_an_unbatched_image():
    model = small_cnn()
    x = torch.randn(3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    patch = (slice(2, 6), slice(2, 6))
    unbatched = se.jacobian_partial_rank(model, None, x, patch, progress=False).to_frame()
    batched = se.jacobian_partial_rank(model, None, x[None], patch, progress=False).to_frame()
    assert unbatched.equals(batched) and unbatched["layer"].iloc[-1] == "output"


def test_partial_rank_errors():
    model = small_cnn()
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="layers names no submodule"):
        se.jacobian_partial_rank(model, ["nope"], x, None)
    with pytest.raises(TypeError, match=r"patch must be \(row_slice, col_slice\)"):
        se.jacobian_partial_rank(model, None, x, slice(0, 2))
    with pytest.raises(ValueError, match="non-empty contiguous"):
        se.jacobian_partial_rank(model, None, x, (slice(4, 2), slice(0, 2)))
    with pytest.raises(ValueError, match="mode must be"):
        se.jacobian_partial_rank(model, None, x, None, mode="sideways")
    with pytest.raises(ValueError, match="data contains NaN"):
        se.jacobian_partial_rank(model, None, torch.full_like(x, float("nan")), None)


# --- perturbed PCA dimension (appendix E) ---------------------------------------------------------

def test_perturbed_pca_dimension_of_a_linear_map_is_its_rank():
    g = torch.Generator().manual_seed(3)
    W = torch.randn(12, 4, dtype=torch.float64, generator=g) @ torch.randn(4, 9, dtype=torch.float64, generator=g)
    model = nn.Sequential(nn.Linear(9, 12), nn.Tanh(), nn.Linear(12, 6)).double()
    with torch.no_grad():
        model[0].weight.copy_(0.05 * W)  # tanh stays near its linear range: no saturation
        model[0].bias.zero_()
    x = 0.1 * torch.randn(2, 9, dtype=torch.float64, generator=g)
    df = se.perturbed_pca_dimension(model, None, x, n_perturbations=100, batch_size=30, generator=g,
                                    progress=False).to_frame()
    assert list(df.columns) == ["sample", "layer", "pca_dimension", "delta_dimension"]
    for _, part in df.groupby("sample"):
        assert part["layer"].tolist() == ["input", "0", "1", "2", "output"]
        # a small neighbourhood is mapped linearly: rank 4 survives tanh and the last layer
        assert part["pca_dimension"].tolist() == [9, 4, 4, 4, 4]
        assert part["delta_dimension"].tolist() == [0, -5, -5, -5, -5]
    fewer = se.perturbed_pca_dimension(model, None, x[:1], n_perturbations=5, generator=g, progress=False).to_frame()
    assert fewer["pca_dimension"].iloc[0] == 4  # 5 centred samples span at most 4 dimensions


def test_pca_dimension_counts_eigenvalues_above_the_tolerance():
    g = torch.Generator().manual_seed(4)
    Z = torch.randn(500, 6, dtype=torch.float64, generator=g) * torch.tensor([1, 1, 1, 1e-2, 1e-5, 0], dtype=torch.float64)
    # eigenvalues are variances: about 1, 1, 1, 1e-4, 1e-10, 0; default tolerance 6 x 1.19e-7
    assert R.pca_dimension(Z) == 4
    assert R.pca_dimension(Z, eps=1e-12) == 5 and R.pca_dimension(Z, eps=1e-3) == 3
    eig = R.pca_eigenvalues(Z)
    torch.testing.assert_close(eig, torch.linalg.eigvalsh(torch.cov(Z.T)).flip(0).clamp_min(0), atol=1e-12, rtol=1e-9)


# --- classification dimension (section 3.3) ----------------------------------------------------------

def classification_problem(d=24, N=600, classes=5, seed=5):
    g = torch.Generator().manual_seed(seed)
    F = torch.randn(N, d, dtype=torch.float64, generator=g) * torch.logspace(0, -2, d, dtype=torch.float64)
    head = nn.Linear(d, classes).double()
    with torch.no_grad():
        head.weight.copy_(torch.randn(classes, d, dtype=torch.float64, generator=g))
        head.bias.zero_()
    labels = head(F).argmax(-1)
    flip = torch.rand(N, generator=g) < 0.1  # some errors, so the full accuracy is below 1
    labels = torch.where(flip, (labels + 1) % classes, labels)
    return F, labels, head


@pytest.mark.parametrize("center", [False, True])
def test_classification_dimension_matches_a_full_scan(center):
    F, labels, head = classification_problem()
    result = se.classification_dimension(head, (F, labels), ratio=0.95, center=center)
    curve = R.projection_accuracy(head, (F, labels), range(1, F.shape[1] + 1), center=center)
    full = float((head(F).argmax(-1) == labels).double().mean())
    assert result.full_accuracy == pytest.approx(full) and 0.8 < full < 1
    passing = curve[curve["accuracy"] >= 0.95 * full]["k"]
    assert result.dimension == int(passing.min())
    assert result.accuracy >= result.target == pytest.approx(0.95 * full)
    assert len(result.evaluations) <= 2 * math.ceil(math.log2(F.shape[1])) + 2  # bisection, not a scan


def test_classification_dimension_projects_onto_the_top_eigenvectors():
    """Features living in a 3-dimensional subspace: 3 eigenvectors keep all of
    the accuracy, and the projection is by hand Q Q^T f."""
    g = torch.Generator().manual_seed(6)
    basis = torch.linalg.qr(torch.randn(10, 3, dtype=torch.float64, generator=g))[0]
    F = torch.randn(400, 3, dtype=torch.float64, generator=g) * torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64) @ basis.T
    head = nn.Linear(10, 4).double()
    labels = head(F).argmax(-1)
    result = se.classification_dimension(head, (F, labels), ratio=1.0)
    assert result.dimension <= 3 and result.accuracy == 1.0


def test_classification_dimension_verifies_monotonicity():
    F, labels, _ = classification_problem(d=16)

    def picky(features):  # right only at rank 1 or full rank: not monotone in k
        good = int(torch.linalg.matrix_rank(features)) in (1, 16)
        return nn.functional.one_hot(labels if good else (labels + 1) % 5, 5).double()

    with pytest.warns(RuntimeWarning, match="not monotone"):
        result = se.classification_dimension(picky, (F, labels))
    assert result.dimension == 1


def test_classification_dimension_errors():
    F, labels, head = classification_problem()
    with pytest.raises(ValueError, match="data holds 600 inputs but labels of shape"):
        se.classification_dimension(head, (F, labels[:3]))
    with pytest.raises(ValueError, match="ratio must lie in"):
        se.classification_dimension(head, (F, labels), ratio=1.5)
    with pytest.raises(ValueError, match="classifier must map"):
        se.classification_dimension(lambda f: f.sum(-1), (F, labels))


# --- independence deficit (section 5) -----------------------------------------------------------------

def deficit_logits(N=2000, C=10, seed=7):
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(N, C, dtype=torch.float64, generator=g)
    Z[:, 0] = 0.7 * Z[:, 3] - 0.4 * Z[:, 7]
    return Z, Z.argmax(-1)


def test_independence_deficit_finds_the_exact_combination_and_satisfies_kkt():
    Z, labels = deficit_logits()
    eta = 0.01
    result = se.independence_deficit((Z, labels), eta=eta)
    assert result.converged and result.support(0) == [3, 7]
    a = result.coefficients[:, 0]
    # KKT by hand for class 0: gradient of mean (z0 - Z a)^2 is -2 Z^T (z0 - Z a) / N
    grad = -2 * Z.T @ (Z[:, 0] - Z @ a) / Z.shape[0]
    on = a != 0
    assert torch.allclose(grad[on], -eta * torch.sign(a[on]), atol=1e-6)
    assert (grad[~on][1:].abs() <= eta + 1e-6).all()  # off the support (class 0 itself excluded)
    assert a[3] == pytest.approx(0.7, abs=0.02) and a[7] == pytest.approx(-0.4, abs=0.02)
    assert float(R.lasso_kkt_violation(Z.T @ Z / Z.shape[0], result.coefficients, eta).max()) <= 1e-6
    assert (torch.diagonal(result.coefficients) == 0).all()
    row = result.frame.iloc[0]
    assert row["n_support"] == 2 and row["r2"] > 0.999


def test_independence_deficit_without_penalty_is_least_squares():
    g = torch.Generator().manual_seed(8)
    Z = torch.randn(300, 5, dtype=torch.float64, generator=g)
    result = se.independence_deficit((Z, Z.argmax(-1)), eta=0.0, tol=1e-12)
    for i in range(5):
        others = [j for j in range(5) if j != i]
        solution = torch.linalg.lstsq(Z[:, others], Z[:, i:i + 1]).solution[:, 0]
        torch.testing.assert_close(result.coefficients[others, i], solution, atol=1e-7, rtol=1e-6)


def test_independence_deficit_accuracies_match_a_loop():
    Z, labels = deficit_logits(N=500, C=8, seed=9)
    labels = torch.where(torch.arange(500) % 7 == 0, (labels + 1) % 8, labels)
    result = se.independence_deficit((Z, labels), eta=0.05)
    for i in range(8):
        replaced = Z.clone()
        replaced[:, i] = Z @ result.coefficients[:, i]
        prediction = replaced.argmax(-1)
        row = result.frame.iloc[i]
        assert row["accuracy"] == pytest.approx(float((prediction == labels).double().mean()))
        mask = labels == i
        assert row["positive_accuracy"] == pytest.approx(float((prediction[mask] == i).double().mean()))
        assert row["original_accuracy"] == pytest.approx(float((Z.argmax(-1) == labels).double().mean()))


def test_independence_deficit_errors():
    Z, labels = deficit_logits(N=50, C=8)
    with pytest.raises(ValueError, match="labels must lie in"):
        se.independence_deficit((Z, labels + 8))
    with pytest.raises(ValueError, match="eta must lie in"):
        se.independence_deficit((Z, labels), eta=-1)
    with pytest.warns(RuntimeWarning, match="the Lasso stopped"):
        se.independence_deficit((Z, labels), eta=1e-3, max_iter=1, tol=1e-15)


# --- structural impetus and Theorem 5 ----------------------------------------------------------------

def test_structural_impetus_probe():
    df = R.structural_impetus(channels=4, size=4, n_samples=300, progress=False)
    assert set(df["component"]) == {"conv3x3", "fc", "batchnorm", "layernorm", "instancenorm", "groupnorm",
                                    "attention", "relu"}
    before = df[df["stage"] == "before"].set_index("component")
    after = df[df["stage"] == "after"].set_index("component")
    # the Jacobian of component o fc has rank at most that of fc (rank of a product)
    assert (after["jacobian_rank"] <= before["jacobian_rank"]).all()
    assert (df["pca_dimension"] <= 64).all() and (df["jacobian_rank"] <= 64).all()
    # normalisations remove the mean (and scale) of each group: at least one dimension per group lost
    assert after.loc["instancenorm", "jacobian_rank"] <= 64 - 4
    assert after.loc["layernorm", "jacobian_rank"] <= 64 - 1


def test_mlp_slopes_agree_with_theorem_5():
    """Measured: the mean slope of log(sigma_k/sigma_1) over 10 Gaussian
    products of depth 120 is within 0.006 of Theorem 5 (n = 6, k = 2, 3:
    -0.113 vs -0.110, -0.244 vs -0.250); the per-run spread is about 0.04."""
    n, theory = 6, R.theorem5_slopes(6)
    assert theory[0] == 0 and bool((theory[1:] < theory[:-1]).all())
    for k in (2, 3):
        slopes = []
        for seed in range(10):
            df = R.mlp_rank_decay(depth=120, width=n, eps=0.0, ks=(k,), dtype=torch.float64,
                                  generator=torch.Generator().manual_seed(seed), progress=False)
            y, ok = df[f"log_ratio_{k}"].to_numpy(), df[f"log_ratio_{k}"].notna().to_numpy()
            slopes.append(np.polyfit(df["layer"].to_numpy()[ok], y[ok], 1)[0])
        assert abs(np.mean(slopes) - float(theory[k - 1])) < 0.03


def test_mlp_rank_decay_is_monotone():
    df = R.mlp_rank_decay(depth=25, width=32, dtype=torch.float32, progress=False)
    assert list(df.columns) == ["layer", "jacobian_rank", "feature_dimension", "log_ratio_2"]
    assert (np.diff(df["jacobian_rank"]) <= 0).all() and df["jacobian_rank"].iloc[-1] < 32
    assert df["feature_dimension"].iloc[-1] < df["feature_dimension"].iloc[0] <= 32
    # float32 rounding can move the feature dimension by one at the threshold; float64 cannot
    exact = R.mlp_rank_decay(depth=25, width=32, dtype=torch.float64, progress=False)
    assert (np.diff(exact["feature_dimension"]) <= 0).all() and (np.diff(exact["jacobian_rank"]) <= 0).all()
    # the default generator is 0: the same run twice; an int, a Generator and None are all accepted
    assert df.equals(R.mlp_rank_decay(depth=25, width=32, dtype=torch.float32, generator=0, progress=False))
    seeded = R.mlp_rank_decay(depth=3, width=8, generator=torch.Generator().manual_seed(5), progress=False)
    assert seeded.equals(R.mlp_rank_decay(depth=3, width=8, generator=5, progress=False))
    torch.manual_seed(1)
    first = R.mlp_rank_decay(depth=3, width=8, generator=None, progress=False)
    torch.manual_seed(1)
    assert first.equals(R.mlp_rank_decay(depth=3, width=8, generator=None, progress=False))


# --- figures: what is drawn -----------------------------------------------------------------------

@pytest.fixture
def agg():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from spectral_ext import plot
    yield plot
    plt.close("all")


def test_rank_decay_figure_draws_both_curves_on_a_log_axis(agg):
    df = R.mlp_rank_decay(depth=6, width=8, dtype=torch.float64, progress=False)
    ax = agg.rank_decay(df).axes[0]
    jacobian, features = ax.get_lines()
    np.testing.assert_array_equal(jacobian.get_xydata(), df[["layer", "jacobian_rank"]].to_numpy(float))
    np.testing.assert_array_equal(features.get_xydata(), df[["layer", "feature_dimension"]].to_numpy(float))
    assert [jacobian.get_label(), features.get_label()] == ["rank of the Jacobian", "feature dimension"]
    assert ax.get_yscale() == "log" and ax.get_xlabel() == "layer" and ax.get_ylabel() == "numerical rank"


def test_partial_rank_figure_draws_the_mean_rank_per_patch(agg):
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    patches = [(slice(0, 4), slice(0, 4)), (slice(4, 8), slice(4, 8))]
    result = se.jacobian_partial_rank(small_cnn(), None, x, patches, progress=False)
    frame = result.to_frame()
    ax = agg.partial_rank(result).axes[0]
    lines = ax.get_lines()
    assert [line.get_label() for line in lines] == ["patch [0:4, 0:4]", "patch [4:8, 4:8]"]
    for line, label in zip(lines, ["[0:4, 0:4]", "[4:8, 4:8]"]):
        mean = frame[frame["patch"] == label].groupby("layer", sort=False)["rank"].mean()
        np.testing.assert_allclose(line.get_xydata(), np.column_stack([np.arange(len(mean)), mean.to_numpy()]))
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1", "2", "3", "4", "output"]
    assert ax.get_ylabel() == "numerical rank of the partial Jacobian"
    assert ax.get_xlabel() == "layer (forward order, model output last)"


def test_classification_dimension_figure_marks_target_and_dimension(agg):
    F, labels, head = classification_problem()
    result = se.classification_dimension(head, (F, labels))
    ax = result.plot().axes[0]
    curve, target, dimension = ax.get_lines()
    np.testing.assert_allclose(curve.get_xydata(), result.evaluations[["fraction", "accuracy"]].to_numpy())
    assert target.get_ydata()[0] == pytest.approx(result.target)
    assert dimension.get_xdata()[0] == pytest.approx(result.dimension / F.shape[1])
    assert dimension.get_label() == f"ClsDim = {result.dimension}"
    assert ax.get_xlabel() == "fraction of eigenvectors kept (k / d)" and ax.get_ylabel() == "accuracy"
    assert ax.get_xscale() == "log"


# --- results as tables, data in any form, renamed keywords --------------------------------------------

def test_results_convert_to_tidy_frames():
    F, labels, head = classification_problem()
    result = se.classification_dimension(head, (F, labels))
    frame = result.to_frame()
    assert list(frame.columns) == ["k", "fraction", "accuracy", "is_dimension"]
    assert frame.loc[frame["is_dimension"], "k"].tolist() == [result.dimension]
    assert frame.loc[frame["is_dimension"], "accuracy"].iloc[0] == pytest.approx(result.accuracy)
    Z, z_labels = deficit_logits(N=300, C=8)
    deficit = se.independence_deficit((Z, z_labels), eta=0.01)
    table = deficit.to_frame()
    assert table["class"].tolist() == list(range(8)) and table["n_support"].iloc[0] == 2
    table.loc[0, "n_support"] = -1  # a copy: the result is not changed through it
    assert deficit.frame["n_support"].iloc[0] == 2


def test_classification_uses_the_one_accuracy_and_restores_the_classifier():
    """The accuracy inside classification_dimension is _data.accuracy: the
    classifier runs in eval mode (dropout off) and comes back in train mode."""
    from spectral_ext import _data

    F, labels, head = classification_problem()
    classifier = nn.Sequential(head, nn.Dropout(0.9)).train()
    result = se.classification_dimension(classifier, (F, labels))
    assert classifier.training and classifier[1].training
    assert result.full_accuracy == _data.accuracy(classifier, (F, labels))
    assert result.full_accuracy == pytest.approx(float((head(F).argmax(-1) == labels).double().mean()))


def test_data_in_any_form_and_the_former_keywords():
    model = small_cnn()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    patch = (slice(2, 6), slice(2, 6))
    expected = se.jacobian_partial_rank(model, None, x, patch, progress=False).to_frame()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(3)), batch_size=2)
    assert se.jacobian_partial_rank(model, None, loader, patch, progress=False).to_frame().equals(expected)
    assert se.jacobian_partial_rank(model, data=x, patch=patch, progress=False).to_frame().equals(expected)
    with pytest.raises(TypeError, match="unexpected keyword argument 'x'"):  # the name before issue 17
        se.jacobian_partial_rank(model, x=x, patch=patch, progress=False)
    with pytest.raises(TypeError, match="needs data"):  # the order before issue 29: (model, data, ...)
        se.jacobian_partial_rank(model, x)
    with pytest.raises(TypeError, match="needs data"):
        se.perturbed_pca_dimension(model, x)
    result = se.jacobian_partial_rank(model, None, x, patch, progress=False)
    assert result.layers[-1] == "output" and result.at == "patch" and result.rank_of == "gram"
    assert result.to_frame() is not result.table and result.to_frame().equals(result.table)
    pca = se.perturbed_pca_dimension(model, None, (x[:1], torch.zeros(1)), n_perturbations=20, generator=3,
                                     progress=False)
    old = se.perturbed_pca_dimension(model, data=x[:1], n_perturbations=20,
                                     generator=torch.Generator().manual_seed(3), progress=False)
    assert pca.to_frame().equals(old.to_frame())
    with pytest.raises(TypeError, match="data must be a tensor"):
        se.jacobian_partial_rank(model, None, "images", patch, progress=False)


def test_the_feature_methods_take_the_classifier_then_the_data():
    """(classifier, data) and (data): a loader of (features, labels) batches
    gives what the pair gives; the former (features, labels, classifier)
    shape is refused since issue 29."""
    F, labels, head = classification_problem(d=12, N=200)
    new = se.classification_dimension(head, (F, labels), ratio=0.9)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(F, labels), batch_size=64)
    assert se.classification_dimension(head, loader, ratio=0.9).evaluations.equals(new.evaluations)
    with pytest.raises(TypeError):
        se.classification_dimension(F, labels, head, ratio=0.9)
    Z, z_labels = deficit_logits(N=200, C=8)
    with pytest.raises(ValueError, match="data must carry labels"):
        se.independence_deficit(Z)
