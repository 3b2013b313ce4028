"""Receptive-field signals, hypergraphs, semantic hierarchy (seed 001
sections 4.3, 5, 6) and weight spectra (sections 3-4, equation 12)."""
import copy
import dataclasses
import itertools

import networkx as nx
import numpy as np
import pytest
import torch
from torch import nn

import spectral_ext as se
from spectral_ext import datasets, spectra as Sp

G = se.receptive_fields  # the module; se.signals is its function


@pytest.mark.parametrize("stride,padding,dilation", [(1, 0, 1), (2, 1, 1), (1, 2, 2), ((2, 1), (0, 1), (1, 2))])
def test_signals_are_u_transpose_of_the_conv_output(stride, padding, dilation):
    """Equation 13/16: S V^T Psi(X) = U^T (W Psi(X)); W Psi(X) through conv2d."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 5, 3, stride=stride, padding=padding, dilation=dilation, bias=False),
                          nn.ReLU(), nn.Flatten(), nn.LazyLinear(4)).double()
    x = torch.randn(6, 3, 9, 8, dtype=torch.float64)
    model(x)
    basis = G.layer_bases(model, ["0"], x[:1])["0"]
    Y = nn.functional.conv2d(x, model[0].weight, None, stride, padding, dilation)
    expected = torch.einsum("dr,ndhw->nrhw", basis.U, Y)
    per_position = se.signals(model, "0", x, reduce=None)
    torch.testing.assert_close(per_position, expected)
    torch.testing.assert_close(se.signals(model, "0", x), expected.mean((2, 3)))


def test_linear_signals_and_streaming_match():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(7, 4), nn.ReLU(), nn.Linear(4, 3)).double()
    x = torch.randn(50, 7, dtype=torch.float64)
    basis = G.layer_bases(model, ["0"], x[:1])["0"]
    torch.testing.assert_close(se.signals(model, "0", x), (model[0].weight @ x.T).T @ basis.U)
    loader = [(x[i:i + 7], torch.zeros(len(x[i:i + 7]), dtype=torch.long)) for i in range(0, 50, 7)]
    result = G.signal_vectors(model, ["0", "2"], loader, progress=False)
    vectors, labels = result.vectors, result.labels
    torch.testing.assert_close(vectors["0"], se.signals(model, "0", x))
    assert vectors["2"].shape == (50, 3) and labels.shape == (50,)
    frame = result.to_frame()
    assert list(frame.columns) == ["layer", "sample", "index", "signal", "label"] and len(frame) == 50 * (4 + 3)
    row = frame[(frame["layer"] == "2") & (frame["sample"] == 7) & (frame["index"] == 1)]
    assert float(row["signal"].iloc[0]) == pytest.approx(float(vectors["2"][7, 1]))
    # Keywords name the same call; x= (the name before issue 17) is refused since issue 29.
    torch.testing.assert_close(G.signal_vectors(model, layers=["0", "2"], data=loader, progress=False).vectors["2"],
                               vectors["2"])
    with pytest.raises(TypeError, match="unexpected keyword argument 'x'"):
        se.signals(model, "0", x=x, progress=False)
    with pytest.raises(TypeError, match="needs data"):
        G.signal_vectors(model, ["0"])


def random_hypergraph(seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(6).repeat_interleave(20)
    vectors = torch.randn(120, 12, generator=g, dtype=torch.float64)
    vectors += 1.5 * (torch.rand(6, 12, generator=g) < 0.4).double()[labels]  # class-specific nodes
    return G.hypergraph(vectors, labels, q=0.7, p=0.6), vectors, labels


@pytest.mark.parametrize("seed", range(5))
def test_equivalence_classes_and_partial_order_are_consistent(seed):
    h, vectors, labels = random_hypergraph(seed)
    # every kept node belongs to some hyperedge, every kept hyperedge has a node
    assert h.incidence.any(0).all() and h.incidence.any(1).all()
    groups = h.equivalence_classes()
    assert sorted(n for members in groups.values() for n in members) == sorted(h.nodes)  # a partition
    edges = h.hyperedges()
    for key, members in groups.items():  # equation 17: same hyperedge set
        for n in members:
            assert frozenset(c for c, ms in edges.items() if n in ms) == key
    H = h.semantic_hierarchy()
    classes = {n: frozenset(d["classes"]) for n, d in H.nodes(data=True)}
    assert nx.is_directed_acyclic_graph(H)
    for a, b in itertools.permutations(H.nodes, 2):  # equation 18: reachability is strict inclusion
        assert nx.has_path(H, a, b) == (classes[a] > classes[b])
    for a, b in H.edges:  # Hasse diagram: no edge implied by a longer path
        assert not any(classes[a] > classes[c] > classes[b] for c in H.nodes)
    # the significance rule by hand for one class and node
    significant = vectors > h.threshold
    c, node = h.classes[0], h.nodes[0]
    assert bool(h.incidence[0, 0]) == bool(significant[labels == c, node].double().mean() >= 0.6)


def test_hypergraph_family_and_thresholds():
    _, vectors, labels = random_hypergraph(0)
    family = G.hypergraph_family(vectors, labels, [0.5, 0.9], [0.5, 0.9])
    assert set(family) == {(0.5, 0.5), (0.5, 0.9), (0.9, 0.5), (0.9, 0.9)}
    # a higher threshold or a higher majority never adds memberships
    assert family[(0.9, 0.9)].incidence.sum() <= family[(0.5, 0.5)].incidence.sum()
    assert family[(0.9, 0.5)].threshold > family[(0.5, 0.5)].threshold
    with pytest.raises(ValueError, match="q must lie in"):
        G.hypergraph(vectors, labels, q=1.5)
    with pytest.raises(ValueError, match="labels must have shape"):
        G.hypergraph(vectors, labels[:3])


def test_trained_hypergraph_differs_from_initialisation_and_exemplars():
    x_train, y_train, x_test, y_test = datasets.digits()
    torch.manual_seed(0)
    init = datasets.digits_cnn()
    trained = datasets.train(copy.deepcopy(init), x_train, y_train, epochs=5)
    incidences = []
    for model in (init, trained):
        result = G.signal_vectors(model, ["8"], (x_test, y_test), progress=False)
        vectors, labels = result.vectors, result.labels
        h = G.hypergraph(vectors["8"], labels, q=0.95, p=0.75, layer="8")
        incidences.append(h.to_frame()[["class", "node"]].apply(tuple, axis=1).tolist())
    assert set(incidences[0]) != set(incidences[1])
    ex = G.exemplary_images(trained, "8", (x_test, y_test), [0, [1, 2]], k=4, progress=False)
    vectors = se.signals(trained, "8", x_test)
    assert ex[ex["target"] == 0]["index"].tolist() == vectors[:, 0].topk(4).indices.tolist()
    assert ex[ex["target"] == (1, 2)]["score"].tolist() == pytest.approx(vectors[:, [1, 2]].sum(1).topk(4).values.tolist())


def test_feature_visualization_is_deterministic_and_raises_the_signal():
    torch.manual_seed(0)
    model = datasets.digits_cnn()
    a = G.feature_visualization(model, "2", [0, 3], (1, 8, 8), steps=30, generator=5)
    b = G.feature_visualization(model, "2", [0, 3], (1, 8, 8), steps=30, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.shape == (1, 8, 8) and 0 <= float(a.min()) and float(a.max()) <= 1
    torch.manual_seed(3)  # generator=None draws from torch's global generator
    c = G.feature_visualization(model, "2", [0, 3], (1, 8, 8), steps=2, progress=False)
    torch.manual_seed(3)
    assert torch.equal(G.feature_visualization(model, "2", [0, 3], (1, 8, 8), steps=2, progress=False), c)
    assert not any(m._forward_hooks for m in model.modules())  # the capture is gone
    start = G.feature_visualization(model, "2", [0, 3], (1, 8, 8), steps=0, generator=5)
    gain = lambda img: float(se.signals(model, "2", img[None])[0, [0, 3]].sum())  # noqa: E731
    assert gain(a) > gain(start)
    pixel = G.feature_visualization(model, "2", 0, (1, 8, 8), steps=5, parameterization="pixel", generator=0)
    assert pixel.shape == (1, 8, 8)


def test_plots():
    """What each seed 001 figure draws, read back from the artists."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot
    from matplotlib.patches import FancyArrowPatch
    from spectral_ext import plot
    h, _, _ = random_hypergraph(1)
    ax = h.plot().axes[0]
    groups = h.equivalence_classes()
    keys = sorted(groups, key=lambda k: (-len(k), groups[k][0]))
    expected = np.array([[c in k for k in keys] for c in h.classes], dtype=float)
    np.testing.assert_array_equal(np.asarray(ax.images[0].get_array()), expected)
    assert [t.get_text() for t in ax.get_yticklabels()] == [str(c) for c in h.classes]
    assert [t.get_text() for t in ax.get_xticklabels()] == [f"v{groups[k][0]} ({len(groups[k])})" for k in keys]
    H = h.semantic_hierarchy()
    ax = plot.semantic_hierarchy(H).axes[0]
    assert sum(len(c.get_offsets()) for c in ax.collections) == H.number_of_nodes()
    assert sum(isinstance(p, FancyArrowPatch) for p in ax.patches) == H.number_of_edges()
    assert {t.get_text().split("\n")[0] for t in ax.texts} == {d["label"] for _, d in H.nodes(data=True)}
    maps = torch.randn(4, 5, 5, generator=torch.Generator().manual_seed(0))
    axes = [a for a in plot.signal_heatmaps(maps, nodes=[0, 2, 3]).axes if a.images]
    assert [a.get_title() for a in axes] == ["v0", "v2", "v3"]
    for a, i in zip(axes, [0, 2, 3]):
        np.testing.assert_allclose(np.asarray(a.images[0].get_array()), maps[i].double().numpy())
        assert a.images[0].get_clim() == pytest.approx((-float(maps[[0, 2, 3]].abs().max()),
                                                        float(maps[[0, 2, 3]].abs().max())))
    images = torch.rand(3, 1, 8, 8)
    axes = [a for a in plot.image_grid(images, titles=["a", "b", "c"]).axes if a.images]
    assert [a.get_title() for a in axes] == ["a", "b", "c"]
    np.testing.assert_allclose(np.asarray(axes[2].images[0].get_array()), images[2, 0].numpy())
    eig = Sp.sample_power_law(3.0, 1.0, 500)
    assert plot.esd(eig, fit=Sp.fit_power_law(eig)).axes
    matplotlib.pyplot.close("all")


def test_function_and_module_have_different_names_pickling_and_help():
    """spectral_ext.signals is the function; its module is spectral_ext.receptive_fields (issue 29)."""
    import inspect
    import pickle
    import pydoc

    assert inspect.isfunction(se.signals) and se.signals is G.signals and se.signals.__module__ == G.__name__
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    x = torch.randn(9, 5)
    assert list(inspect.signature(se.signals).parameters)[:4] == ["model", "layer", "data", "reduce"]
    result = G.signal_vectors(model, ["0"], (x, torch.arange(9) % 2), progress=False)
    back = pickle.loads(pickle.dumps(result))
    assert type(back) is G.SignalVectors and torch.equal(back.vectors["0"], result.vectors["0"])
    assert "Signals s_i" in pydoc.render_doc(se.signals, renderer=pydoc.plaintext)


def test_one_spectral_layer_record_for_svr_and_signals():
    from spectral_ext.layers import SpectralLayer

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4))
    x = torch.randn(1, 2, 6, 6)
    basis = G.layer_bases(model, ["0"], x)["0"]
    layer = se.svr(model, x, dtype=torch.float64).layers["0"]
    assert type(basis) is type(layer) is SpectralLayer is se.spectral_neurons.SpectralLayer
    assert basis.module is layer.module is model[0] and basis.kind == layer.kind == "conv2d"
    torch.testing.assert_close(basis.S, layer.S)
    with pytest.raises(dataclasses.FrozenInstanceError):
        basis.S = None


# --- spectra -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("alpha", [2.0, 2.5, 3.0])
def test_power_law_fit_recovers_a_known_exponent(alpha):
    """Within 0.1 on every one of 5 samples of size 5000. The MLE's spread is
    (alpha - 1) / sqrt(n_tail): measured over 20 seeds the worst error is
    0.04 at alpha = 2, 0.08 at 3 and 0.15 at 4.5 (where the KS-chosen xmin
    sometimes keeps only a third of the sample)."""
    for seed in range(5):
        x = Sp.sample_power_law(alpha, 1.0, 5000, torch.Generator().manual_seed(seed))
        fit = Sp.fit_power_law(x)
        assert abs(fit.alpha - alpha) < 0.1 and fit.ks < 0.05
    fixed = Sp.fit_power_law(x, xmin=1.0)  # the MLE by hand at the given xmin (every sample is >= 1)
    assert fixed.alpha == pytest.approx(1 + 5000 / float(torch.log(x / 1.0).sum()), rel=1e-9)


def test_toeplitz_singular_values_by_fft_equal_the_explicit_matrix():
    g = torch.Generator().manual_seed(0)
    for out, c, k, m in [(4, 3, 3, 6), (2, 5, 2, 5), (6, 1, 3, 4)]:
        w = torch.randn(out, c, k, k, dtype=torch.float64, generator=g)
        explicit = torch.linalg.svdvals(Sp.circular_conv_matrix(w, m))
        fft = Sp.toeplitz_singular_values(w, m)
        torch.testing.assert_close(fft[:len(explicit)], explicit)


def test_layer_spectra_and_alpha_hat():
    torch.manual_seed(0)
    model = datasets.digits_cnn()
    df = Sp.layer_spectra(model, toeplitz_m=8).to_frame()
    assert df["layer"].tolist() == ["0", "2", "5", "8", "10"]
    row = df.iloc[1]
    W1 = model[2].weight.detach().double().reshape(32, -1)
    assert row["lambda_max"] == pytest.approx(float(torch.linalg.matrix_norm(W1, 2)) ** 2)
    assert row["n_w2"] == 8 * 8 * 16  # m^2 x min(out, in) values for W2 against 16 for W1
    expected = float((df.dropna(subset=["alpha"])["alpha"] * np.log(df.dropna(subset=["alpha"])["lambda_max"])).sum())
    assert Sp.alpha_hat(model) == pytest.approx(expected)
    assert Sp.alpha_hat(df) == pytest.approx(expected)
    assert np.isnan(df.iloc[0]["alpha"])  # 9 eigenvalues: too few for a fit
    bad = copy.deepcopy(model)
    with torch.no_grad():
        bad[0].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        Sp.layer_spectra(bad)
