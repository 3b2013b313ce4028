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


def test_rotation_penalty_mechanics():
    x_train, y_train, x_test, y_test = datasets.digits()
    torch.manual_seed(0)
    model = datasets.train(datasets.digits_mlp(width=16), x_train, y_train, epochs=5)
    frozen = model[1].weight.clone()
    df = Y.rotation_penalties(model, ["3"], (x_train, y_train), (x_test, y_test), trials=1, epochs=1,
                              progress=False)
    assert list(df["transform"]) == ["grelu", "orthogonal"]
    assert ((df["penalty"] - (df["accuracy_before"] - df["accuracy_after"])).abs() < 1e-12).all()
    assert torch.equal(model[1].weight, frozen)  # the caller's model is untouched
    with pytest.raises(ValueError, match="layer must name a Linear or Conv"):
        Y.rotation_penalty(model, "2", (x_train, y_train), (x_test, y_test))
