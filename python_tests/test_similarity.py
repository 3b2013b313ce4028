"""Dissimilarity measures (seed 004 section 5, appendix D.7, E.8)."""
import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

import spectral_ext as se
from spectral_ext import similarity as S
from spectral_ext.similarity import _hsic
from spectral_ext.symmetry import element_matrix


def features(n=120, c=8, hw=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, c, hw, hw, dtype=torch.float64, generator=g).relu()
    return X, g


def grelu_copy(X, g):
    """X P D + 1 v': a permuted, positively scaled, shifted copy of the channels."""
    c = X.shape[1]
    perm = torch.randperm(c, generator=g)
    scale = torch.exp(torch.randn(c, dtype=torch.float64, generator=g))
    shift = torch.randn(c, dtype=torch.float64, generator=g)
    A = element_matrix(perm, scale)
    return torch.einsum("dc,nc...->nd...", A, X) + shift.reshape(1, c, *([1] * (X.dim() - 2)))


def rotated(X, g):
    Q = torch.linalg.qr(torch.randn(X.shape[1], X.shape[1], dtype=torch.float64, generator=g))[0]
    return 2.5 * torch.einsum("dc,nc...->nd...", Q, X)


def u_statistic_hsic(K, L):
    """HSIC_1 written as the U-statistic it estimates (Song et al. 2012,
    Theorem 2): an independent route by explicit sums over distinct indices."""
    n = K.shape[0]
    t1 = sum(K[i, j] * L[i, j] for i, j in itertools.permutations(range(n), 2)) / (n * (n - 1))
    t2 = sum(K[i, j] * L[q, r] for i, j, q, r in itertools.permutations(range(n), 4)) / (n * (n - 1) * (n - 2) * (n - 3))
    t3 = sum(K[i, j] * L[i, q] for i, j, q in itertools.permutations(range(n), 3)) / (n * (n - 1) * (n - 2))
    return float(t1 + t2 - 2 * t3)


def test_unbiased_hsic_is_the_u_statistic_and_biased_is_the_trace_formula():
    g = torch.Generator().manual_seed(1)
    A, B = torch.randn(7, 3, dtype=torch.float64, generator=g), torch.randn(7, 2, dtype=torch.float64, generator=g)
    K, L = A @ A.T, (B @ B.T).square()
    assert float(S.hsic(K[None], L[None])[0, 0]) == pytest.approx(u_statistic_hsic(K, L), rel=1e-10)
    H = torch.eye(7, dtype=torch.float64) - 1.0 / 7
    biased = float(torch.trace(K @ H @ L @ H)) / 36
    assert float(S.hsic(K[None], L[None], unbiased=False)[0, 0]) == pytest.approx(biased, rel=1e-12)


def test_linear_cka_matches_the_feature_space_formula():
    X, g = features()
    Y = X + 0.5 * torch.randn(X.shape, dtype=torch.float64, generator=g)
    Xc = X.reshape(len(X), -1) - X.reshape(len(X), -1).mean(0)
    Yc = Y.reshape(len(Y), -1) - Y.reshape(len(Y), -1).mean(0)
    expected = float((Yc.T @ Xc).norm() ** 2 / ((Xc.T @ Xc).norm() * (Yc.T @ Yc).norm()))
    assert se.cka(X, Y, "linear", unbiased=False) == pytest.approx(expected, rel=1e-10)


def test_max_kernel_is_the_paper_formula_without_the_nnc_tensor():
    X, _ = features(n=30, c=5)
    Xn = S.channel_normalize(X.reshape(30, 5, -1))
    # appendix D.7.2 literally: the (N, N, C) tensor, then the max over channels
    U = torch.einsum("mcs,ncs->mnc", Xn, Xn)
    torch.testing.assert_close(S.kernel_matrix(X.reshape(30, 5, -1), "max"), U.amax(-1))
    flat = X.reshape(30, 5, 9)[:, :, 4]  # (N, d) features: definition 5.3's max(x~_i * x~_j)
    tilde = (flat - flat.mean(0)) / (flat - flat.mean(0)).norm(dim=0)
    K = S.kernel_matrix(flat[:, :, None], "max")
    assert float(K[2, 7]) == pytest.approx(float((tilde[2] * tilde[7]).max()))


@pytest.mark.parametrize("kernel", ["max", "laplace"])
def test_grelu_measures_are_one_on_a_grelu_copy_and_invariant(kernel):
    X, g = features()
    Y = grelu_copy(X, g)
    assert se.cka(X, Y, kernel) == pytest.approx(1.0, abs=1e-9)
    Z = torch.randn(X.shape, dtype=torch.float64, generator=g)
    value = se.cka(X, Z, kernel)
    assert se.cka(grelu_copy(X, g), grelu_copy(Z, g), kernel) == pytest.approx(value, abs=1e-9)
    assert abs(value) < 0.2


def test_orthogonal_measures_are_one_on_a_rotated_copy_and_the_max_kernel_is_not():
    X, g = features()
    R = rotated(X, g)
    for kernel in ("linear", "rbf"):
        assert se.cka(X, R, kernel) == pytest.approx(1.0, abs=1e-9)
    assert se.procrustes(X, R, "orthogonal") == pytest.approx(1.0, abs=1e-12)
    assert se.cka(X, R, "max") < 0.9  # not invariant to rotations
    assert se.procrustes(X, R, "grelu") < 0.9


@pytest.mark.parametrize("centered", [False, True])
def test_grelu_procrustes_matches_brute_force_over_permutations(centered):
    """Definition 5.2 (no centring, the default) and its centred option,
    against the minimum over all 4! permutations."""
    g = torch.Generator().manual_seed(2)
    X, Y = torch.randn(50, 4, dtype=torch.float64, generator=g), torch.randn(50, 4, dtype=torch.float64, generator=g)
    X, Y = X.relu(), (Y + 0.5).relu()
    similarity = se.procrustes(X, Y, "grelu", centered=centered)
    delta = se.procrustes_distance(X, Y, "grelu", centered=centered)

    def tilde(M):
        M = M - M.mean(0) if centered else M
        return M / M.norm(dim=0)

    Xt, Yt = tilde(X), tilde(Y)
    best = min(float((Xt - Yt[:, list(p)]).norm()) for p in itertools.permutations(range(4)))
    assert delta == pytest.approx(best, rel=1e-10)
    assert similarity == pytest.approx(1 - best / (2 * 2.0), rel=1e-12)
    if centered:  # shifts are invisible only to the centred form
        assert se.procrustes(X, grelu_copy(X, g), "grelu", centered=True) == 1.0  # clamped: exact at alignment
    Z = X[:, torch.randperm(4, generator=g)] * torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64)
    assert se.procrustes(X, Z, "grelu", centered=centered) == 1.0  # a G_ReLU copy (no shift) is aligned


@pytest.mark.parametrize("centered", [False, True])
def test_orthogonal_procrustes_matches_scipy(centered):
    from scipy.linalg import orthogonal_procrustes

    X, g = features(n=80, c=6)
    Y = X + torch.randn(X.shape, dtype=torch.float64, generator=g)
    similarity = se.procrustes(X, Y, "orthogonal", centered=centered)
    delta = se.procrustes_distance(X, Y, "orthogonal", centered=centered)
    assert similarity == pytest.approx(1 - delta / 2, rel=1e-12)

    def unit(M):  # channels as columns, positions as extra rows (D.2 sums over n, h, w)
        M = M.permute(0, 2, 3, 1).reshape(-1, M.shape[1])
        M = M - M.mean(0) if centered else M
        return (M / M.norm()).numpy()

    R, _ = orthogonal_procrustes(unit(Y), unit(X))
    assert delta == pytest.approx(float(np.linalg.norm(unit(X) - unit(Y) @ R)), rel=1e-9)
    assert 0 <= similarity <= 1


def test_the_shared_moments_match_numpy_in_every_layout():
    """The one float64 accumulator behind covariance and Procrustes: full and
    diagonal second moments, (N, C, S) and (n, C) inputs, streamed in two
    parts, against numpy on the flattened (N S, C) rows."""
    from spectral_ext import _moments

    g = torch.Generator().manual_seed(3)
    X = torch.randn(10, 4, 5, dtype=torch.float64, generator=g)
    Y = torch.randn(10, 3, 5, dtype=torch.float64, generator=g)
    fx, fy = (M.transpose(1, 2).reshape(-1, M.shape[1]).numpy() for M in (X, Y))
    full, diag = _moments.Moments(full=True), _moments.Moments(full=False)
    full.update(X)
    diag.update(X)
    np.testing.assert_allclose(full.second.numpy(), fx.T @ fx, rtol=1e-12)
    np.testing.assert_allclose(diag.norms2(True).numpy(), ((fx - fx.mean(0)) ** 2).sum(0), rtol=1e-12)
    np.testing.assert_allclose(full.norms2(True).numpy(), diag.norms2(True).numpy(), rtol=1e-12)
    cross = _moments.CrossMoments()
    cross.update(X[:6], Y[:6])
    cross.add_rows(torch.from_numpy(fx[30:]), torch.from_numpy(fy[30:]))  # the (n, C) rows of the rest
    assert cross.count == cross.a.count == 50
    np.testing.assert_allclose(cross.cross(True).numpy(), (fx - fx.mean(0)).T @ (fy - fy.mean(0)), rtol=1e-12)
    with pytest.raises(ValueError, match="a batch has 3 channels"):
        diag.update(Y)
    with pytest.raises(ValueError, match="same samples and positions"):
        cross.update(X, Y[:, :, :4])


def test_values_in_unit_interval_and_minibatches():
    X, g = features(n=200)
    Y = X + 2 * torch.randn(X.shape, dtype=torch.float64, generator=g)
    for kernel in S.KERNELS:
        for unbiased in (True, False):
            assert 0 <= se.cka(X, Y, kernel, unbiased=unbiased) <= 1
        full = se.cka(X, Y, kernel)
        assert se.cka(X, Y, kernel, batch_size=200) == pytest.approx(full, abs=1e-12)
        assert se.cka(X, Y, kernel, batch_size=50) == pytest.approx(full, abs=0.1)
    for group in S.GROUPS:
        assert 0 <= se.procrustes(X, Y, group) <= 1


def test_example_e44_the_max_kernel_is_not_psd():
    x = torch.tensor([[1.0, 1.0], [10.0, 1.0], [0.0, 5.0]], dtype=torch.float64)
    K = se.max_kernel_gram(x[:, :, None])
    c = torch.tensor([10.0, -1.0, -1.0], dtype=torch.float64)
    assert float(c @ K @ c) == -65.0
    assert float(torch.linalg.eigvalsh(K)[0]) < 0


def test_similarity_matrix_of_a_model_and_its_grelu_twin():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 36, 4)).double()
    x = torch.randn(64, 3, 6, 6, dtype=torch.float64)
    twin, _ = se.apply_symmetry(model, example_input=x[:4], generator=torch.Generator().manual_seed(1))
    loader = list(x.split(16))
    layers = ["1", "3"]
    df = se.similarity_matrix(model, twin, layers, loader, kernel="max", progress=False).to_frame()
    assert list(df.columns) == ["layer_a", "layer_b", "measure", "value"] and len(df) == 4
    assert set(df["measure"]) == {"cka:kernel=max"}
    diagonal = df[df["layer_a"] == df["layer_b"]]["value"]
    assert np.allclose(diagonal, 1.0, atol=1e-9)  # G_ReLU-CKA sees through the symmetry
    linear = se.similarity_matrix(model, twin, layers, loader, kernel="linear", progress=False).to_frame()
    assert (linear[linear["layer_a"] == linear["layer_b"]]["value"] < 0.999).any()  # the scaling is not orthogonal
    proc = se.similarity_matrix(model, twin, layers, loader, measure="procrustes", group="grelu", progress=False).to_frame()
    assert np.allclose(proc[proc["layer_a"] == proc["layer_b"]]["value"], 1.0)
    assert proc.query("layer_a == '3' and layer_b == '1'")["value"].isna().all()  # 8 vs 6 channels
    # one pass over the batches gives the whole-data Procrustes
    orth = se.similarity_matrix(model, twin, layers, loader, measure="procrustes", progress=False).to_frame()
    with torch.no_grad():
        whole = se.procrustes(model[:2](x), twin[:4](x), "orthogonal")
    assert float(orth.query("layer_a == '1' and layer_b == '3'")["value"].iloc[0]) == pytest.approx(whole, abs=1e-10)
    import matplotlib
    matplotlib.use("Agg")
    from spectral_ext import plot
    frame = df.assign(value=[0.1, 0.2, 0.3, 0.4])  # distinct values: the drawn array is the frame's pivot
    ax = plot.similarity_heatmap(frame, title="twins").axes[0]
    np.testing.assert_allclose(ax.images[0].get_array(), [[0.1, 0.2], [0.3, 0.4]])  # rows: model's layers
    assert [t.get_text() for t in ax.get_xticklabels()] == layers == [t.get_text() for t in ax.get_yticklabels()]
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("model b", "model a", "twins")


def test_similarity_matrix_takes_the_new_and_the_old_order():
    """Issue 17: (model, other, layers, data); the older (model_a, model_b,
    loader, layers) positions and keywords give the same frame."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU()).double()
    other = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU()).double()
    x = torch.randn(32, 4, dtype=torch.float64)
    new = se.similarity_matrix(model, other, ["1", "3"], x, progress=False).to_frame()
    assert new.equals(se.similarity_matrix(model=model, other=other, layers=["1", "3"], data=x, progress=False).to_frame())
    with pytest.raises(TypeError, match="unexpected keyword argument 'model_a'"):  # the names before issue 17
        se.similarity_matrix(model_a=model, model_b=other, loader=x, layers=["1", "3"], progress=False)
    pair = se.similarity_matrix(model, other, (["1"], ["1", "3"]), x, progress=False).to_frame()
    assert pair["layer_b"].tolist() == ["1", "3"] and pair["value"].iloc[0] == pytest.approx(new["value"].iloc[0])
    with pytest.raises(TypeError, match="needs data"):
        se.similarity_matrix(model, other, ["1"], progress=False)
    with pytest.raises(TypeError, match="layers must be a module name"):
        se.similarity_matrix(model, other, x, 1, progress=False)


def test_similarity_errors():
    X, _ = features(n=10)
    with pytest.raises(ValueError, match="kernel must be one of"):
        se.cka(X, X, "cosine")
    with pytest.raises(ValueError, match="same N samples"):
        se.cka(X, X[:5])
    with pytest.raises(ValueError, match="group must be one of"):
        se.procrustes(X, X, "affine")
    with pytest.raises(ValueError, match="X contains NaN"):
        se.cka(torch.full_like(X, float("nan")), X)
    with pytest.raises(ValueError, match="at least 4 samples"):
        se.cka(X[:3], X[:3])
    with pytest.raises(ValueError, match="equal channel counts"):
        se.procrustes(X, X[:, :4], "grelu")
    with pytest.raises(TypeError, match="procrustes_distance"):  # one return type: no (similarity, delta) tuple
        se.procrustes(X, X, "grelu", return_distance=True)
    with pytest.raises(TypeError, match="centered must be True or False"):
        se.procrustes_distance(X, X, centered=1)


def test_minibatch_cka_value_is_always_a_float64_matrix():
    """One return type (issue 17): a 1 x 1 tensor for single tensors, the
    (len(Xs), len(Ys)) matrix for lists; undefined entries warn as NaN or
    raise on request."""
    X, g = features(n=40)
    Y = X + torch.randn(X.shape, dtype=torch.float64, generator=g)
    single = S.MinibatchCKA()
    single.update(X, Y)
    value = single.value()
    assert isinstance(value, torch.Tensor) and value.shape == (1, 1) and value.dtype == torch.float64
    assert float(value[0, 0]) == pytest.approx(se.cka(X, Y), rel=1e-12)
    many = S.MinibatchCKA()
    many.update([X, Y], [Y, X, torch.full_like(X, 2.0)])
    with pytest.warns(RuntimeWarning, match="#2 \\(constant\\)"):
        matrix = many.value()
    assert matrix.shape == (2, 3) and torch.isnan(matrix[:, 2]).all()
    assert float(matrix[0, 0]) == pytest.approx(float(value[0, 0]), rel=1e-12)
    with pytest.raises(ValueError, match="undefined for representations c \\(constant\\)"):
        many.value(["a", "b"], ["a", "b", "c"], undefined="raise")
    with pytest.raises(ValueError, match="undefined must be"):
        many.value(undefined="ignore")


# ---------------------------------------------------------------------------------------------
# Routes, accuracy, feature axes, undefined cases, model state


def test_feature_and_gram_routes_agree_with_the_u_statistic_formula():
    """Both exact routes of the linear kernels give the HSIC_1 of hsic() on
    explicit Gram matrices (an independent implementation of [NRK21] eq. 3),
    unbiased and biased, for shapes on both sides of the route switch."""
    g = torch.Generator().manual_seed(5)
    for n, d, e in ((9, 3, 4), (40, 7, 5), (12, 30, 50)):
        X = torch.randn(n, d, dtype=torch.float64, generator=g).relu() + 2
        Y = torch.randn(n, e, dtype=torch.float64, generator=g) + X[:, :1]
        for unbiased in (True, False):
            K, L = (X @ X.T)[None], (Y @ Y.T)[None]
            expected = float(S.hsic(K, L, unbiased) / (S.hsic(K, K, unbiased) * S.hsic(L, L, unbiased)).sqrt())
            for route in ("features", "grams"):
                a = _hsic._Batch([X[:, :, None]], "linear", 0.5, None, unbiased, route)
                b = _hsic._Batch([Y[:, :, None]], "linear", 0.5, None, unbiased, route)
                if route == "features":
                    xy = _hsic._feature_hsic(_hsic._feature_traces(a, b, False), torch.stack(a.norms),
                                             torch.stack(b.norms), n, unbiased)
                    xx, yy = _hsic._self_feature_hsic(a, unbiased), _hsic._self_feature_hsic(b, unbiased)
                else:
                    xy, xx, yy = _hsic._gram_hsic(a, b, False, unbiased)
                assert float(xy[0, 0] / (xx[0] * yy[0]).sqrt()) == pytest.approx(expected, rel=1e-10)
            assert se.cka(X, Y, unbiased=unbiased) == pytest.approx(expected, rel=1e-10)


def test_minibatch_cka_triangle_route_matches_the_stacked_gram_route(monkeypatch):
    """MinibatchCKA's lower-triangle route (_triangle_hsic: the Grams' block
    lower triangle, all pairs in one batched product) gives the HSIC sums of
    the stacked-Gram route it replaced: both estimators, float32 and float64,
    two blocks (n divisible by 4) and one, same-shaped and mixed layers, a
    layer constant in one batch and one constant in all, and features too
    large for unscaled float32 squares (handed to the scaling route)."""
    g = torch.Generator().manual_seed(11)
    taken, triangle = [], _hsic._triangle_hsic

    def spy(*args):
        result = triangle(*args)
        taken.append(result is not None)
        return result

    monkeypatch.setattr(_hsic, "_triangle_hsic", spy)
    cases = [(64, [96] * 6, torch.float32), (30, [70, 50, 70, 50], torch.float32), (40, [90] * 4, torch.float64)]
    for n, dims, dtype in cases:
        for unbiased, same in itertools.product((True, False), (True, False)):
            batches = []
            for b in range(3):
                reps = [(torch.randn(n, d, generator=g, dtype=dtype) * 2).relu() + 1 for d in dims]
                if b == 1:
                    reps[1] = torch.full_like(reps[1], 3.0)
                reps[-1] = torch.full_like(reps[-1], 1.5)
                if b == 2:
                    reps[0] = reps[0] * 1e20  # float32 squares overflow: the scaling route, same CKA
                k = len(reps) // 2
                batches.append((reps, None) if same else (reps[:k], reps[k:]))
            fast, slow = S.MinibatchCKA(unbiased=unbiased), S.MinibatchCKA(unbiased=unbiased)
            taken.clear()
            for Xs, Ys in batches:
                fast.update(Xs, Ys)
            # the route ran on every batch; float32 squares of 1e20 features overflow: handed back
            assert taken == [True, True, dtype == torch.float64]
            with monkeypatch.context() as m:
                m.setattr(_hsic, "_triangle_hsic", lambda *args: None)
                for Xs, Ys in batches:
                    slow.update(Xs, Ys)
            assert fast.varied_x.tolist() == slow.varied_x.tolist()
            assert fast.varied_y.tolist() == slow.varied_y.tolist()
            with pytest.warns(RuntimeWarning, match="constant"):
                a, b = fast.value(), slow.value()
            assert torch.equal(a.isnan(), b.isnan())
            tol = 1e-5 if dtype == torch.float32 else 1e-12
            np.testing.assert_allclose(a.nan_to_num().numpy(), b.nan_to_num().numpy(), rtol=0, atol=tol)
            if same:
                assert torch.equal(a.nan_to_num(), a.nan_to_num().T)


@pytest.mark.parametrize("value", [math.inf, -math.inf])
def test_minibatch_cka_refuses_a_representation_infinite_everywhere(value):
    """An all-inf layer is "constant" to an exact comparison; the triangle route hands it to the Gram route,
    which refuses it by name (it gave NaN rows with a "constant" warning)."""
    g = torch.Generator().manual_seed(3)
    reps = [torch.randn(64, 200, generator=g), torch.full((64, 200), value), torch.randn(64, 200, generator=g)]
    with pytest.raises(ValueError, match="NaN or infinite"):
        S.MinibatchCKA().update(reps)


def test_float32_features_keep_float64_accuracy_where_the_peers_lose_it():
    """ReLU features with a large mean and a CKA of ~0.01: the uncentred
    float32 Gram formula the CKA packages use is off by percent, the float64
    centring keeps spectral_ext within 2e-5 of the float64 value (both
    routes; the float32 products round by CPU: 1.2e-5 measured on an AMD
    EPYC's AVX2 sgemm, under 1e-5 on AVX-512)."""
    g = torch.Generator().manual_seed(0)
    for n, d in ((1500, 256), (256, 2048)):
        X = torch.randn(n, d, generator=g).relu() * 3 + 1
        Y = (torch.randn(n, d, generator=g) + 0.05 * X).relu() + 1
        exact = se.cka(X.double(), Y.double())
        assert 0.001 < exact < 0.2
        assert se.cka(X, Y) == pytest.approx(exact, rel=2e-5)
        K, L = (X @ X.T)[None], (Y @ Y.T)[None]  # float32 and uncentred, then the same estimator in float32
        Kz, Lz = K - torch.diag_embed(K.diagonal(dim1=1, dim2=2)), L - torch.diag_embed(L.diagonal(dim1=1, dim2=2))
        def h(A, B):
            return (A * B).sum() + A.sum() * B.sum() / ((n - 1) * (n - 2)) - 2 / (n - 2) * (A.sum(1) * B.sum(1)).sum()
        naive = float(h(Kz, Lz) / (h(Kz, Kz) * h(Lz, Lz)).sqrt())
        assert abs(naive / exact - 1) > 1e-3  # the float32 route these features defeat


def test_ortho_kernel_is_linear_cka_of_channel_normalised_features():
    X, g = features(n=60, c=5)
    Y = X + torch.randn(X.shape, dtype=torch.float64, generator=g)
    Xn = S.channel_normalize(X.reshape(60, 5, -1)).reshape(60, -1)
    Yn = S.channel_normalize(Y.reshape(60, 5, -1)).reshape(60, -1)
    assert se.cka(X, Y, "ortho") == pytest.approx(se.cka(Xn, Yn, "linear"), rel=1e-10)
    scaled = X * torch.arange(1.0, 6.0, dtype=torch.float64)[None, :, None, None] + 3.0
    assert se.cka(scaled, Y, "ortho") == pytest.approx(se.cka(X, Y, "ortho"), rel=1e-10)  # per-channel affine
    assert se.cka(scaled, Y, "linear") != pytest.approx(se.cka(X, Y, "linear"), rel=1e-3)


def tokens(n=40, t=6, f=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, t, f, dtype=torch.float64, generator=g).relu(), g


def test_token_features_use_the_feature_axis_and_3d_without_it_is_refused():
    """Issue 14.1: a G_ReLU copy acting on the last (feature) axis of
    (N, tokens, features) scores 1 with feature_axis=-1, less when the token
    axis is read as channels; without feature_axis a 3-D input is refused."""
    X, g = tokens()
    perm = torch.randperm(5, generator=g)
    scale = torch.exp(torch.randn(5, dtype=torch.float64, generator=g))
    Y = X[:, :, perm] * scale[perm]
    assert se.cka(X, Y, "max", feature_axis=-1) == pytest.approx(1.0, abs=1e-9)
    assert se.cka(X, Y, "laplace", feature_axis=-1) == pytest.approx(1.0, abs=1e-9)
    assert se.procrustes(X, Y, "grelu", feature_axis=-1) == 1.0
    assert se.procrustes(X, Y, "grelu", feature_axis=1) < 0.95
    assert se.cka(X, Y, "max", feature_axis=1) < 0.95
    for call in (lambda: se.cka(X, Y), lambda: se.procrustes(X, Y, "grelu"), lambda: se.cka(X, Y, "max")):
        with pytest.raises(ValueError, match="feature_axis"):
            call()
    with pytest.raises(ValueError, match="feature_axis must name an axis"):
        se.cka(X, Y, feature_axis=0)
    with pytest.raises(TypeError, match="feature_axis must be an int"):
        se.cka(X, Y, feature_axis="last")


def test_layer_feature_axis_follows_the_layer_that_produced_the_features():
    model = nn.Sequential(nn.Conv1d(3, 4, 1), nn.ReLU(), nn.Flatten(0, 0), nn.Linear(5, 5), nn.GELU(),
                          nn.Sequential(nn.Linear(5, 5), nn.ReLU()), nn.Sequential(nn.Conv1d(4, 4, 1), nn.ReLU()))
    assert [S.layer_feature_axis(model, n) for n in ("0", "1", "3", "4", "5", "6")] == [1, 1, -1, -1, -1, 1]
    assert S.layer_feature_axis(nn.Sequential(nn.ReLU()), "0") is None


def token_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 7), nn.ReLU(), nn.Linear(7, 3)).double()


def test_similarity_matrix_reads_token_features_on_the_last_axis():
    model = token_mlp()
    twin = token_mlp()
    g = torch.Generator().manual_seed(1)
    perm = torch.randperm(7, generator=g)
    scale = torch.exp(torch.randn(7, dtype=torch.float64, generator=g))
    with torch.no_grad():  # Proposition 3.4 at layer 0: W0 <- P D W0, W2 <- W2 D^-1 P^T
        twin[0].weight.copy_(model[0].weight[perm] * scale[:, None])
        twin[0].bias.copy_(model[0].bias[perm] * scale)
        twin[2].weight.copy_(model[2].weight[:, perm] / scale[None, :])
        twin[2].bias.copy_(model[2].bias)
        twin[4].load_state_dict(model[4].state_dict())
    x = torch.randn(64, 6, 5, dtype=torch.float64, generator=g)
    torch.testing.assert_close(twin(x), model(x))
    df = se.similarity_matrix(model, twin, ["1"], list(x.split(16)), kernel="max", progress=False).to_frame()
    assert float(df["value"].iloc[0]) == pytest.approx(1.0, abs=1e-9)
    proc = se.similarity_matrix(model, twin, ["1"], list(x.split(16)), measure="procrustes", group="grelu",
                                progress=False).to_frame()
    assert float(proc["value"].iloc[0]) == 1.0
    wrong = se.similarity_matrix(model, twin, ["1"], list(x.split(16)), kernel="max", feature_axis=1, progress=False).to_frame()
    assert float(wrong["value"].iloc[0]) < 0.95


@pytest.mark.parametrize("kernel", S.KERNELS)
def test_cka_of_constant_features_is_undefined(kernel):
    X, _ = features(n=20)
    constant = torch.full_like(X, 0.1)
    for A, B in ((constant, X), (X, constant)):
        with pytest.raises(ValueError, match="undefined"):
            se.cka(A, B, kernel)
    with pytest.raises(ValueError, match="undefined"):
        se.cka(constant[:, :, 0, 0], X[:, :, 0, 0], kernel, batch_size=10)


def test_rbf_and_laplace_with_mostly_identical_points_are_undefined():
    X, g = features(n=20)
    repeated = X[:1].repeat(20, 1, 1, 1)
    repeated[:3] = torch.randn(3, *X.shape[1:], dtype=torch.float64, generator=g)
    for kernel in ("rbf", "laplace"):
        with pytest.raises(ValueError, match="undefined"):
            se.cka(repeated, X, kernel)


def test_similarity_matrix_names_an_undefined_layer_and_restores_the_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Dropout(0.5), nn.Linear(6, 3), nn.ReLU(),
                          nn.Linear(3, 2)).double()
    with torch.no_grad():
        model[3].weight.zero_()
        model[3].bias.fill_(-1.0)  # layer 4 is dead: ReLU(-1) = 0 for every input
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(48, 4, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="undefined.*model layer '4' \\(constant\\)"):
        first = se.similarity_matrix(model, model, ["1", "4"], list(x.split(16)), progress=False).to_frame()
    assert first.query("layer_a == '4' or layer_b == '4'")["value"].isna().all()
    assert first.query("layer_a == '1' and layer_b == '1'")["value"].iloc[0] == pytest.approx(1.0)
    assert model.training and model[2].training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BatchNorm untouched
    with pytest.warns(RuntimeWarning):
        second = se.similarity_matrix(model, model, ["1", "4"], list(x.split(16)), progress=False).to_frame()
    assert first["value"].equals(second["value"])  # eval mode: no dropout, the same numbers twice


def test_a_shared_model_runs_once_and_matches_two_copies():
    import copy

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.ReLU()).double()
    x = torch.randn(40, 3, 7, 7, dtype=torch.float64)
    calls = []
    model.register_forward_pre_hook(lambda m, a: calls.append(1))
    for measure in ("cka", "procrustes"):
        calls.clear()
        one = se.similarity_matrix(model, model, ["1", "3"], list(x.split(10)), measure=measure, progress=False).to_frame()
        shared_calls = len(calls)
        calls.clear()
        two = se.similarity_matrix(model, copy.deepcopy(model), ["1", "3"], list(x.split(10)), measure=measure,
                                   progress=False).to_frame()
        assert 2 * shared_calls == len(calls) >= 2  # the copy carries the hook: two models, twice the forwards
        np.testing.assert_allclose(one["value"], two["value"], rtol=1e-12, equal_nan=True)


def test_pairwise_similarity_matches_the_pair_functions():
    """A zoo's pairs computed with each model's share once agree with cka
    and procrustes called pair by pair."""
    X, g = features(n=50, c=6)
    feats = {"a": X, "b": grelu_copy(X, g).relu(), "c": torch.randn(X.shape, dtype=torch.float64, generator=g).relu()}
    for kernel in ("linear", "max"):
        frame = S.pairwise_similarity(feats, kernel=kernel).to_frame()
        assert list(frame["model_a"] + frame["model_b"]) == ["ab", "ac", "bc"]
        for a, b, _, value in frame.itertuples(index=False):
            assert value == pytest.approx(se.cka(feats[a], feats[b], kernel), rel=1e-9)
    for group in S.GROUPS:
        for centered in (False, True):
            frame = S.pairwise_similarity(feats, [("c", "a"), ("b", "a")], "procrustes", group=group,
                                          centered=centered).to_frame()
            for a, b, _, value in frame.itertuples(index=False):
                assert value == pytest.approx(se.procrustes(feats[a], feats[b], group, centered=centered), abs=1e-12)
    with pytest.raises(ValueError, match="without features"):
        S.pairwise_similarity(feats, [("a", "z")])


def test_similarity_matrix_names_the_layer_whose_activations_are_not_finite():
    """CKA checks each activation once (inside MinibatchCKA.update); a NaN
    still gets the message naming the model and the layer."""
    torch.manual_seed(0)
    model, other = (nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)) for _ in range(2))
    with torch.no_grad():
        other[2].weight[0, 0] = float("nan")
    x = torch.randn(16, 4)
    for measure in ("cka", "procrustes"):
        with pytest.raises(ValueError, match="other's layer '2'.*(NaN|finite)"):
            se.similarity_matrix(model, other, ["1", "2"], x, measure=measure, progress=False)
    assert se.similarity_matrix(model, other, ["1"], x, progress=False).to_frame()["value"].notna().all()


def test_similarity_matrix_runs_the_models_without_autograd_bookkeeping():
    """The forwards, two thirds of the time on a ResNet, run under
    torch.inference_mode (measured ~10% faster than no_grad on CPU)."""
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    modes = []
    handle = model.register_forward_hook(lambda *_: modes.append(torch.is_inference_mode_enabled()))
    try:
        frame = se.similarity_matrix(model, model, ["1", "2"], torch.randn(16, 4), progress=False).to_frame()
    finally:
        handle.remove()
    assert modes == [True] and frame["value"].notna().all()
