"""Intertwiner groups and weight-space symmetries (seed 004 section 3, Table 1,
appendix E.2, E.9)."""
import pytest
import torch
from torch import nn

import spectral_ext as se
from spectral_ext import datasets
from spectral_ext import symmetry as Y

TABLE = [("identity", {}), ("sigmoid", {}), ("relu", {}), ("leaky_relu", {}), ("rbf", {}),
         ("polynomial", {"degree": 3}), ("gelu", {})]


@pytest.mark.parametrize("name,kwargs", TABLE)
def test_table_1_elements_intertwine(name, kwargs):
    """Lemma 3.1: sigma(A x) = phi(A) sigma(x) for sampled elements, and
    phi = sigma(A) sigma(I)^-1 is the closed form of Table 1."""
    G = se.intertwiner_group(name, **kwargs)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 200, dtype=torch.float64, generator=g)
    for _ in range(3):
        A = G.sample(5, g)
        assert G.contains(A)
        B = G.phi(A)
        torch.testing.assert_close(G.activation(A @ x), B @ G.activation(x), rtol=1e-9, atol=1e-12)
        closed = {"rbf": A.abs(), "polynomial": A ** 3}.get(name, A)
        torch.testing.assert_close(B, closed, rtol=1e-9, atol=1e-12)


def test_membership_follows_table_1():
    g = torch.Generator().manual_seed(1)
    Q = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64, generator=g))[0]
    P = Y.element_matrix(torch.tensor([2, 0, 3, 1]), torch.ones(4, dtype=torch.float64))
    negative = Y.element_matrix(torch.tensor([2, 0, 3, 1]), torch.tensor([1.0, -2.0, 3.0, 0.5], dtype=torch.float64))
    signs = Y.element_matrix(torch.tensor([1, 0, 3, 2]), torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64))
    relu, sigmoid = se.intertwiner_group("relu"), se.intertwiner_group(nn.Sigmoid())
    rbf, cubic = se.intertwiner_group("rbf"), se.intertwiner_group("polynomial", degree=3)
    assert relu.contains(P) and relu.contains(P * 3) and not relu.contains(negative) and not relu.contains(Q)
    assert sigmoid.contains(P) and not sigmoid.contains(2 * P)
    assert rbf.contains(signs) and not rbf.contains(negative)
    assert cubic.contains(negative) and not cubic.contains(Q)
    assert se.intertwiner_group("identity").contains(Q)
    assert se.intertwiner_group(nn.LeakyReLU(1.0)).kind == "general_linear"  # slope 1 is the identity
    # outside the group no B intertwines: the best B in least squares leaves a residual
    x = torch.randn(4, 300, dtype=torch.float64, generator=g)
    target, source = torch.relu(Q @ x), torch.relu(x)
    B = torch.linalg.lstsq(source.T, target.T).solution.T
    assert float((B @ source - target).norm() / target.norm()) > 0.1


@pytest.mark.parametrize("activation,scales", [
    (torch.relu, "positive"), (torch.sigmoid, "one"), (nn.functional.gelu, "one"), (torch.tanh, "sign"),
    (nn.functional.softplus, "one"), (lambda x: x.abs() ** 3, "any"), (lambda x: torch.relu(x) ** 2, "positive"),
    (Y._rbf, "sign"), (lambda x: 2 * x + 1, None)])
def test_numerical_group_of_arbitrary_activations(activation, scales):
    """Appendix E.2 run numerically agrees with Table 1 where Table 1 has the
    answer (ReLU, sigmoid, GELU, RBF) and with the n = 1 calculation otherwise."""
    G = Y._numerical_group(activation, 4, None)
    if scales is None:
        assert G.kind == "general_linear"
        return
    assert G.scales == scales
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 100, dtype=torch.float64, generator=g)
    A = G.sample(4, g)
    torch.testing.assert_close(activation(A @ x), G.phi(A) @ activation(x), rtol=1e-9, atol=1e-12)


def test_numerical_group_needs_lemma_e7():
    with pytest.raises(ValueError, match="Lemma E.7"):
        se.intertwiner_group(lambda x: torch.cos(2 * torch.pi * x))
    with pytest.raises(ValueError, match="activation must be one of"):
        se.intertwiner_group("swishy")


def hidden(model, x, upto):
    with torch.no_grad():
        return model[:upto](x)


def test_apply_symmetry_cnn_keeps_the_function_and_transforms_features():
    """Proposition 3.4, equation 3.5: f_<=m(x, W') = phi(A_m) f_<=m(x, W)."""
    torch.manual_seed(0)
    model = datasets.digits_cnn().double()
    x = torch.rand(16, 1, 8, 8, dtype=torch.float64)
    new, elements = se.apply_symmetry(model, example_input=x, generator=torch.Generator().manual_seed(1))
    assert set(elements) == {"0", "2", "5", "8"}  # every hidden map, not the logits
    torch.testing.assert_close(new(x), model(x))
    for producer, upto in (("2", 4), ("5", 7), ("8", 10)):
        A = Y.element_matrix(*elements[producer])
        torch.testing.assert_close(hidden(new, x, upto), torch.einsum("dc,nc...->nd...", A, hidden(model, x, upto)))
    assert not torch.allclose(new[0].weight, model[0].weight)  # something did change


def test_apply_symmetry_resnet_shares_elements_along_residual_streams():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).double().eval()
    for m in model.modules():  # non-trivial BatchNorm statistics and gains
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2), m.weight.data.uniform_(0.5, 2)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    new, elements = se.apply_symmetry(model, example_input=x, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(new(x), model(x))
    stream = ["conv1", "layer1.0.conv2", "layer1.1.conv2"]
    assert all(torch.equal(elements[s][0], elements["conv1"][0]) for s in stream)
    assert not torch.equal(elements["layer1.0.conv1"][0], elements["conv1"][0])
    # appendix E.9.1: with BatchNorm the conv rows and statistics are only permuted, the gain carries the scale
    perm, scale = elements["layer1.0.conv1"]
    torch.testing.assert_close(new.layer1[0].bn1.running_var, model.layer1[0].bn1.running_var[perm])
    torch.testing.assert_close(new.layer1[0].bn1.running_mean, model.layer1[0].bn1.running_mean[perm])
    torch.testing.assert_close(new.layer1[0].bn1.weight, model.layer1[0].bn1.weight[perm] * scale[perm])


def test_apply_symmetry_with_given_elements_and_no_example_input():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    perm, scale = torch.tensor([4, 2, 0, 1, 3]), torch.tensor([0.5, 2.0, 1.0, 3.0, 0.25], dtype=torch.float64)
    new, elements = se.apply_symmetry(model, {"0": (perm, scale)})
    torch.testing.assert_close(new[0].weight, model[0].weight[perm] * scale[perm][:, None])
    torch.testing.assert_close(new[2].weight, model[2].weight[:, perm] / scale[perm])
    x = torch.randn(7, 6, dtype=torch.float64)
    torch.testing.assert_close(new(x), model(x))


def test_apply_symmetry_errors():
    torch.manual_seed(0)
    x = torch.randn(4, 6, dtype=torch.float64)
    tanh_net = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    with pytest.raises(ValueError, match="does not compute the same function"):
        se.apply_symmetry(tanh_net, example_input=x, generator=torch.Generator().manual_seed(0))
    # permutations intertwine every activation
    new, _ = se.apply_symmetry(tanh_net, example_input=x, group="permutation")
    torch.testing.assert_close(new(x), tanh_net(x))
    relu_net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    with pytest.raises(ValueError, match="must be a permutation of 5 channels"):
        se.apply_symmetry(relu_net, {"0": (torch.tensor([0, 0, 1, 2, 3]), torch.ones(5))}, example_input=x)
    with pytest.raises(ValueError, match="elements names no linear map"):
        se.apply_symmetry(relu_net, example_input=x, elements={"9": (torch.arange(5), torch.ones(5))})
    grouped = nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 1, groups=2), nn.ReLU(),
                            nn.Conv2d(4, 2, 1)).double()
    with pytest.raises(ValueError, match="grouped convolution"):
        se.apply_symmetry(grouped, example_input=torch.randn(1, 4, 3, 3, dtype=torch.float64))


@pytest.fixture(scope="module")
def digits_mlp16():
    x_train, y_train, x_test, y_test = datasets.digits()
    torch.manual_seed(0)
    model = datasets.train(datasets.digits_mlp(width=16), x_train, y_train, epochs=5)
    return model, (x_train, y_train), (x_test, y_test)


def test_rotation_penalty_mechanics(digits_mlp16):
    """Section 3.3: the penalty is the accuracy before minus after; the
    caller's model is untouched; rotation_penalties is one row per run."""
    model, train, test = digits_mlp16
    frozen = model[1].weight.clone()
    df = Y.rotation_penalties(model, ["3"], train, test, trials=1, epochs=1, generator=0, progress=False)
    assert list(df.columns) == ["trial", "transform", "layer", "accuracy_before", "accuracy_after", "penalty"]
    assert list(df["transform"]) == ["grelu", "orthogonal"]
    assert ((df["penalty"] - (df["accuracy_before"] - df["accuracy_after"])).abs() < 1e-12).all()
    assert torch.equal(model[1].weight, frozen)  # the caller's model is untouched
    with pytest.raises(ValueError, match="layer must name a Linear or Conv"):
        Y.rotation_penalty(model, "2", train, test)


def test_rotation_penalty_is_a_dataclass_for_every_form_of_data(digits_mlp16):
    """Issue 17: a RotationPenalty with to_frame(); data and test_data in any
    form _data.batches takes (a list of batches gives what the tensors
    give)."""
    model, (x, y), test = digits_mlp16
    result = Y.rotation_penalty(model, "3", (x, y), test, epochs=1, generator=0, progress=False)
    assert isinstance(result, Y.RotationPenalty)
    assert result.penalty == result.accuracy_before - result.accuracy_after
    frame = result.to_frame()
    assert list(frame.columns) == ["transform", "layer", "accuracy_before", "accuracy_after", "penalty"]
    assert frame.iloc[0]["penalty"] == result.penalty and frame.iloc[0]["layer"] == "3"
    half = len(y) // 2
    loader = [(x[:half], y[:half]), (x[half:], y[half:])]
    assert Y.rotation_penalty(model, "3", loader, [test], epochs=1, generator=0, progress=False) == result
    with pytest.raises(TypeError, match="^data must yield"):
        Y.rotation_penalty(model, "3", [{"x": x}], test, progress=False)


def test_rotation_penalties_figure_draws_fig_4(digits_mlp16):
    """Seed 004 Fig. 4: per transform, the mean penalty per layer with a
    standard-deviation error bar."""
    import matplotlib

    matplotlib.use("Agg")
    import pandas as pd

    from spectral_ext import plot

    frame = pd.DataFrame({"trial": [0, 1, 0, 1, 0, 1, 0, 1], "layer": ["1", "1", "3", "3"] * 2,
                          "transform": ["grelu"] * 4 + ["orthogonal"] * 4,
                          "penalty": [0.0, 0.02, 0.01, 0.03, 0.2, 0.4, 0.1, 0.1]})
    fig = plot.rotation_penalties(frame)
    ax = fig.axes[0]
    lines = [line for line in ax.get_lines() if line.get_marker() == "o"]
    assert [list(line.get_ydata()) for line in lines] == [pytest.approx([0.01, 0.02]), pytest.approx([0.3, 0.1])]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["A in G_ReLU", "A orthogonal"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "3"]
    bars = ax.containers[1][2][0].get_segments()  # the orthogonal transform's error bars
    assert [pytest.approx(float(b[1][1] - b[0][1])) for b in bars] == [2 * 0.1414213562, 0.0]
    assert ax.get_ylabel().startswith("rotation penalty")
    matplotlib.pyplot.close(fig)


def test_symmetry_classes_join_producers_read_by_one_consumer():
    """Remark 3.6 / E.9.2: producers read by a common consumer share one
    element, transitively; classes and members in forward order."""
    from types import SimpleNamespace

    edges = [("a", "b"), ("b", "d"), ("c", "d"), ("c", "f"), ("e", "f"), ("d", "g")]
    graph = SimpleNamespace(maps=dict.fromkeys("abcdefg"),
                            connections=[SimpleNamespace(previous=p, next=n) for p, n in edges])
    assert Y.symmetry_classes(graph) == [["a"], ["b", "c", "e"], ["d"]]


def test_generator_forms_agree():
    """Issue 17: an int seed, a seeded torch.Generator and torch's global RNG
    after torch.manual_seed draw the same elements."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    x = torch.randn(4, 6, dtype=torch.float64)
    _, seeded = se.apply_symmetry(model, example_input=x, generator=7, progress=False)
    _, given = se.apply_symmetry(model, example_input=x, generator=torch.Generator().manual_seed(7), progress=False)
    torch.manual_seed(7)
    _, global_rng = se.apply_symmetry(model, example_input=x, progress=False)
    for elements in (given, global_rng):
        assert torch.equal(elements["0"][0], seeded["0"][0]) and torch.equal(elements["0"][1], seeded["0"][1])
    relu = se.intertwiner_group("relu", generator=3)
    torch.testing.assert_close(relu.sample(4, 5), relu.sample(4, torch.Generator().manual_seed(5)))
    with pytest.raises(TypeError, match="generator must be"):
        se.apply_symmetry(model, example_input=x, generator="seven")
