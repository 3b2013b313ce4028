"""Model stitching (seed 004 section 4, Theorem 4.2, appendix D.1, D.2, D.6)."""
import copy

import pytest
import torch
from torch import nn

import spectral_ext as se
from spectral_ext import datasets
from spectral_ext import stitching as St
from spectral_ext.symmetry import element_matrix


@pytest.fixture(scope="module")
def digits_pair():
    x_train, y_train, x_test, y_test = datasets.digits()
    torch.manual_seed(0)
    model = datasets.train(datasets.digits_mlp(width=32), x_train, y_train, epochs=15)
    g = torch.Generator().manual_seed(3)
    perm = torch.randperm(32, generator=g)
    scale = torch.exp(0.3 * torch.randn(32, generator=g, dtype=torch.float64))
    twin, _ = se.apply_symmetry(model, {"3": (perm, scale)}, example_input=x_train[:8], generator=g)
    return model, twin, perm, scale, (x_train, y_train), (x_test, y_test)


@pytest.mark.parametrize("init, epochs, lr", [("procrustes", 2, 1e-3), ("uniform", 10, 0.01)])
def test_theorem_4_2_grelu_stitching_finds_the_true_permutation(digits_pair, init, epochs, lr):
    """A model and its G_ReLU twin (Proposition 3.4 at hidden layer 3, scales
    exp(0.3 N(0, 1))): G_ReLU stitching at the ReLU after it recovers the
    permutation on every live channel (two units are dead on the digits,
    interchangeable) and the accuracy to within 2%: from the
    G_ReLU-Procrustes start in 2 epochs of the paper's SGD, from the paper's
    uniform start with lr 1e-3 x 10 for a small dataset, momentum 0.9,
    batch 32, in 10. Measured (uniform): penalty 0.008. With scales
    exp(N(0, 1)) (0.1 to 20) the uniform start does not find P in 20 epochs:
    D has to travel too far from its head start at the identity."""
    model, twin, perm, scale, train, test = digits_pair
    result = se.stitch(model, twin, "4", kind="grelu", train_data=train, test_data=test, epochs=epochs, lr=lr,
                       progress=False, init=init)
    with torch.no_grad():
        live = model[:5](train[0]).abs().sum(0) > 0
    assert live.sum() >= 28
    assert torch.equal(result.permutation[live[perm]], perm[live[perm]])
    assert result.accuracy_a == result.accuracy_b  # the twin computes the same function
    assert result.penalty == pytest.approx(St.stitching_penalty(result.accuracy_a, result.accuracy_b, result.accuracy))
    assert result.penalty <= 0.02
    hard = result.matrix
    assert ((hard != 0).sum(1) == 1).all() and (hard >= 0).all()  # an element of G_ReLU
    assert list(result.curve.columns) == ["epoch", "loss", "accuracy"] and len(result.curve) == epochs
    assert result.sparsity == pytest.approx(1 - 1 / 32)  # appendix D.6: G_ReLU sparsity is 1 - 1/n
    text = repr(result)
    assert "Linear(" not in text and len(text) < 400 and "Sequential[..'4']" in text  # not both whole models


def test_grelu_stitching_of_an_exact_resnet18_twin_has_no_penalty():
    """Issue 18 / Theorem 4.2: an untrained ResNet-18 and its G_ReLU twin on
    random inputs: from the G_ReLU-Procrustes start the stitched model is the
    twin (penalty 0). The uniform start ends at 0.84 here (0.33 on the issue's
    run): it is not found, and recalibrating BatchNorm statistics that never
    described the data moves the model further."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    x = torch.randn(48, 3, 8, 8)
    twin, _ = se.apply_symmetry(model, example_input=x[:4], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(1)
    result = se.stitch(model, twin, "layer1", kind="grelu", train_data=(x[:32], y[:32]), test_data=(x[32:], y[32:]),
                       epochs=1, batch_size=32, lr=0.01, progress=False)
    assert result.accuracy_a == result.accuracy_b == 1.0
    assert result.penalty == 0.0 and not result.recalibrated
    assert "ResNet[..'layer1']" in repr(result) and "BasicBlock" not in repr(result)


def test_token_features_are_stitched_on_the_feature_axis():
    """Issue 14.1 / seed 004 D.4: a Linear layer's (N, tokens, features)
    output is stitched on its last axis; the twin's permutation is found."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Flatten(), nn.Linear(32, 3))
    twin = copy.deepcopy(model)
    g = torch.Generator().manual_seed(2)
    perm = torch.randperm(8, generator=g)
    scale = torch.exp(0.3 * torch.randn(8, generator=g))
    with torch.no_grad():
        twin[0].weight.copy_(model[0].weight[perm] * scale[:, None])
        twin[0].bias.copy_(model[0].bias[perm] * scale)
        twin[2].weight.copy_(model[2].weight[:, perm] / scale[None, :])
    x = torch.randn(256, 4, 5, generator=g)
    torch.testing.assert_close(twin(x), model(x), rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        y = model(x).argmax(1)
    result = se.stitch(model, twin, "1", kind="grelu", train_data=(x[:192], y[:192]), test_data=(x[192:], y[192:]),
                       epochs=1, progress=False)
    assert torch.equal(result.permutation, perm)
    assert result.penalty == 0.0
    with pytest.raises(ValueError, match="feature_axis must name"):
        se.stitch(model, twin, "1", kind="grelu", train_data=(x, y), feature_axis=0, progress=False)


def test_affine_lowrank_l1_and_softsort_stitching(digits_pair):
    model, twin, _, _, train, test = digits_pair
    affine = se.stitch(model, twin, "4", kind="affine", train_data=train, test_data=test, epochs=3, lr=0.05,
                       progress=False)
    assert affine.penalty < 0.05  # the affine class contains phi(G_ReLU) (Theorem 4.2)
    low = se.stitch(model, twin, "4", train_data=train, kind="lowrank", rank=3, test_data=test, epochs=2, lr=0.05,
                    progress=False)
    assert int(torch.linalg.matrix_rank(low.matrix)) <= 3
    sparse = se.stitch(model, twin, "4", train_data=train, kind="l1", l1=0.01, test_data=test, epochs=3, lr=0.05,
                       progress=False)
    assert sparse.sparsity > affine.sparsity
    soft = se.stitch(model, twin, "4", train_data=train, kind="softsort", test_data=test, epochs=2, lr=0.05, progress=False)
    assert sorted(soft.permutation.tolist()) == list(range(32))
    for result in (affine, low, sparse, soft):
        assert 0 <= result.accuracy <= 1
    # the frozen models are copies: training phi never touched them
    assert all(not p.requires_grad for p in affine.model.model_a.parameters())
    assert all(p.requires_grad for p in model.parameters())


def test_softsort_matrix_is_row_stochastic_and_hardens_to_the_sorting_permutation():
    phi = St.SoftSortStitch(5, tau=0.2, generator=torch.Generator().manual_seed(0))
    P = phi.permutation_matrix()
    torch.testing.assert_close(P.sum(1), torch.ones(5))
    phi.harden()
    assert torch.equal(phi.permutation_matrix().argmax(1), phi.s.argsort(descending=True))


def test_sparsity_d1_by_hand():
    W = torch.tensor([[1.0, 0.0005], [-0.002, 0.0]])
    assert St.sparsity(W) == 0.5 and St.sparsity(W, tau=0.01) == 0.75


def test_grelu_projection_is_doubly_stochastic_and_hungarian_recovers_a_planted_permutation():
    g = torch.Generator().manual_seed(4)
    phi = St.GReLUStitch(12, generator=g).double()
    perm = torch.randperm(12, generator=g)
    with torch.no_grad():
        phi.P.copy_(0.6 * element_matrix(perm, torch.ones(12, dtype=torch.float64))
                    + 0.4 * torch.rand(12, 12, generator=g, dtype=torch.float64) - 0.05)
    phi.project(iters=200)
    torch.testing.assert_close(phi.P.sum(0), torch.ones(12, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(phi.P.sum(1), torch.ones(12, dtype=torch.float64), atol=1e-6, rtol=0)
    assert (phi.P >= 0).all()
    phi.harden()
    assert torch.equal(phi.hard, perm)


def test_batchnorm_statistics_are_recalibrated_after_rounding():
    """D.2.1: the no-gradient pass leaves model_b's BatchNorm after the stitch
    with the statistics of the features the hardened phi produces."""
    torch.manual_seed(0)
    x = torch.randn(96, 6)
    y = torch.randint(0, 3, (96,))
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    datasets.train(model, x, y, epochs=3)
    result = se.stitch(model, model, "1", train_data=(x, y), kind="grelu", epochs=2, lr=0.01, progress=False,
                       recalibrate=True)
    assert result.recalibrated
    stitched = result.model
    with torch.no_grad():
        features = stitched.model_b[2](stitched.phi(stitched.model_a[:2](x)))
    torch.testing.assert_close(stitched.model_b[3].running_mean, features.mean(0), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(stitched.model_b[3].running_mean, model[3].running_mean)


def test_stitch_errors(digits_pair):
    model, _, _, _, train, _ = digits_pair
    other = datasets.digits_mlp(width=16)
    with pytest.raises(ValueError, match="cannot be stitched"):
        se.stitch(model, other, "4", train_data=train, progress=False)
    with pytest.raises(ValueError, match="names no submodule"):
        se.stitch(model, model, "nope", train_data=train, progress=False)
    with pytest.raises(ValueError, match="needs rank"):
        se.stitch(model, model, "4", train_data=train, kind="lowrank", progress=False)
    with pytest.raises(ValueError, match="kind must be one of"):
        se.stitch(model, model, "4", train_data=train, kind="magic", progress=False)
    with pytest.raises(ValueError, match="train_data is required"):
        se.stitch(model, model, "4", "grelu")
    with pytest.raises(ValueError, match="train_data yields no sample"):
        se.stitch(model, model, "4", train_data=[], progress=False)
    with pytest.raises(ValueError, match="init must be one of"):
        se.stitch(model, model, "4", train_data=train, init="random", progress=False)
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken[3].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="model_b has NaN or infinite weights in \\['3.weight'\\]"):
        se.stitch(model, broken, "4", train_data=train, progress=False)
