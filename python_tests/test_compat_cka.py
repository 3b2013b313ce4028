"""Drop-ins for torch-cka 0.21, pytorch-cka 1.1.3 and the seed 004 authors'
measures: the real packages on small inputs give the same numbers (within
their float32 rounding), and the float64 formulas they implement agree to
rounding."""
import io
import itertools
import warnings

import numpy as np
import pytest
import torch
from conftest import in_float64
from torch import nn

import spectral_ext as se
from spectral_ext.compat import modelsym, pytorch_cka, torch_cka


def cnn(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(6 * 4 * 4, 5))


def loader(n=64, batch=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g, dtype=dtype)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=batch)


def nrk21_minibatch_cka(model_a, model_b, layers_a, layers_b, data):
    """[NRK21] eq. 3 per batch, averaged, written with explicit ones vectors
    in float64 (the formula torch-cka and pytorch-cka implement)."""
    from conftest import minibatch_cka

    a, b = model_a.double().eval(), model_b.double().eval()
    result = minibatch_cka(([a[: int(n) + 1](x.double()).flatten(1) for n in layers_a],
                            [b[: int(n) + 1](x.double()).flatten(1) for n in layers_b]) for (x,) in data)
    a.float(), b.float()
    return result


def test_torch_cka_drop_in_matches_the_package_and_the_formula(tmp_path):
    import torch_cka as peer
    layers = ["1", "3", "5"]
    with torch.no_grad():
        exact = nrk21_minibatch_cka(cnn(0), cnn(1), layers, ["3", "1"], loader())
    ours = torch_cka.CKA(cnn(0), cnn(1), model1_name="a", model2_name="b", model1_layers=layers,
                         model2_layers=["3", "1"])
    data = loader()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours.compare(data)
        theirs = peer.CKA(cnn(0), cnn(1), model1_name="a", model2_name="b", model1_layers=layers,
                          model2_layers=["3", "1"])
        theirs.compare(data)
    mine, other = ours.export(), theirs.export()
    assert {k: v for k, v in mine.items() if k != "CKA"} == {k: v for k, v in other.items() if k != "CKA"}
    assert mine["model2_layers"] == ["1", "3"]  # the model's order, as torch-cka
    assert mine["CKA"].dtype == other["CKA"].dtype == torch.float32
    np.testing.assert_allclose(mine["CKA"].numpy(), other["CKA"].numpy(), atol=2e-4)
    np.testing.assert_allclose(mine["CKA"].numpy(), exact[:, ::-1], rtol=1e-6)  # columns in forward order
    # the hooks are gone; the models stay in eval mode from construction on, as torch-cka leaves them
    assert not any(m._forward_hooks for m in ours.model1.modules())
    assert not ours.model1.training and not theirs.model1.training


def test_torch_cka_refuses_what_is_undefined_and_says_so():
    model = cnn(0)
    with torch.no_grad():
        model[2].weight.zero_()
        model[2].bias.fill_(-1.0)
    comparer = torch_cka.CKA(model, cnn(1), model1_name="a", model2_name="b", model1_layers=["3"],
                             model2_layers=["3"])
    with pytest.raises(ValueError, match="NANs.*undefined.*a layer '3' \\(constant\\)") as info:
        comparer.compare(loader(), loader())
    assert isinstance(info.value, AssertionError)  # torch-cka's own type: its NaN assertion
    unbiased = torch_cka.CKA(model, cnn(1), model1_name="a", model2_name="b", model1_layers=["3", "5"],
                             model2_layers=["3"], estimator="unbiased")
    with pytest.warns(RuntimeWarning, match="undefined.*a layer '3' \\(constant\\)"):
        unbiased.compare(loader(), loader())
    assert torch.isnan(unbiased.export()["CKA"]).all()  # layer 5 follows the constant one
    with pytest.raises(ValueError, match="call compare"):
        torch_cka.CKA(cnn(0), cnn(1), model1_name="a", model2_name="b").export()




def torch_cka_in_float64(model1, model2, layers1, layers2, data1, data2=None):
    import torch_cka as peer

    def double(data):
        return None if data is None else torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(data.dataset.tensors[0].double()), batch_size=data.batch_size)

    with in_float64(model1, model2), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peer.CKA(model1, model2, model1_name="a", model2_name="b", model1_layers=layers1,
                          model2_layers=layers2)
        theirs.compare(double(data1), double(data2))
    for m in (model1, model2):  # torch-cka leaves its hooks on the models
        for module in m.modules():
            module._forward_hooks.clear()
    return theirs.export()["CKA"].numpy()


class Branchy(nn.Module):
    """Modules registered in another order than they run, an in-place ReLU
    after the first conv (torch-cka saw its output after the ReLU) and a
    residual sum written in place into a captured output."""

    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.head = nn.Linear(4 * 36, 5)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.conv1 = nn.Conv2d(3, 4, 3)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.act(self.conv1(x))
        y = self.conv2(x)
        y += x
        return self.head(y.flatten(1))


def outputs_as_produced(model, layers, x):
    saved = {}
    handles = [model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: saved.__setitem__(n, o.clone()))
               for n in layers]
    model.double()(x.double())
    model.float()
    for handle in handles:
        handle.remove()
    return [saved[n].flatten(1) for n in layers]


def nrk21_of_outputs(model1, model2, layers1, layers2, data1, data2):
    """[NRK21] eq. 3 per batch, averaged, on each layer's output as produced."""
    from conftest import minibatch_cka

    with torch.no_grad():
        return minibatch_cka((outputs_as_produced(model1, layers1, x1), outputs_as_produced(model2, layers2, x2))
                             for (x1,), (x2,) in zip(data1, data2))


def test_torch_cka_default_is_the_packages_estimator_in_float64_unbiased_the_corrected_one():
    a, b = Branchy(0).eval(), Branchy(1).eval()
    layers = ["head", "conv2", "conv1"]
    theirs = torch_cka_in_float64(a, b, layers, layers, loader())
    mine = torch_cka.CKA(a, b, model1_name="a", model2_name="b", model1_layers=layers, model2_layers=layers)
    with pytest.warns(UserWarning, match="Dataloader for Model 2 is not given"):
        mine.compare(loader())
    exported = mine.export()
    assert exported["model1_layers"] == ["head", "conv2", "conv1"]  # named_modules order, as torch-cka ...
    np.testing.assert_allclose(exported["CKA"].numpy(), theirs, rtol=1e-5, atol=1e-6)  # ... rows as they ran
    fixed = torch_cka.CKA(a, b, model1_name="a", model2_name="b", model1_layers=layers, model2_layers=layers,
                          estimator="unbiased")
    fixed.compare(loader(), loader())
    exact = nrk21_of_outputs(a, b, layers, layers, loader(), loader())  # as produced, in the listed order
    np.testing.assert_allclose(fixed.export()["CKA"].numpy(), exact, rtol=1e-5, atol=1e-7)
    ran = [2, 1, 0]  # conv1, conv2, head: the rows of torch-cka's matrix
    assert np.abs(exact[np.ix_(ran, ran)] - theirs).max() > 0.05  # conv1, conv2 seen after in-place changes
    np.testing.assert_allclose(exact[0, 0], theirs[2, 2], rtol=1e-6)  # head is the same


def test_torch_cka_one_model_on_two_dataloaders():
    """torch-cka runs the model on dataloader2 after dataloader1 and reads
    both sides' features afterwards: its matrix compares dataloader2 with
    itself. The default reproduces it; "unbiased" compares the two."""
    model = cnn(0).eval()
    layers = ["1", "3", "5"]
    theirs = torch_cka_in_float64(model, model, layers, layers, loader(seed=0), loader(seed=1))
    np.testing.assert_allclose(np.diag(theirs), 1.0, rtol=1e-9)
    mine = torch_cka.CKA(model, model, model1_name="a", model2_name="b", model1_layers=layers, model2_layers=layers)
    mine.compare(loader(seed=0), loader(seed=1))
    np.testing.assert_allclose(mine.export()["CKA"].numpy(), theirs, rtol=1e-5, atol=1e-6)
    fixed = torch_cka.CKA(model, model, model1_name="a", model2_name="b", model1_layers=layers,
                          model2_layers=layers, estimator="unbiased")
    fixed.compare(loader(seed=0), loader(seed=1))
    exact = nrk21_of_outputs(model, model, layers, layers, loader(seed=0), loader(seed=1))
    np.testing.assert_allclose(fixed.export()["CKA"].numpy(), exact, rtol=1e-5, atol=1e-7)
    assert np.diag(exact).max() < 0.9  # unrelated inputs


def test_torch_cka_warnings_errors_and_figure_are_the_packages():
    import torch_cka as peer
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    big = lambda: nn.Sequential(*[nn.Identity() for _ in range(150)])  # noqa: E731  151 modules with itself
    caught, figures = [], []
    for module in (peer, torch_cka):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            module.CKA(big(), big())
            module.CKA(big(), big(), model1_name="x", model1_layers=["0"], model2_layers=["1"])
            comparer = module.CKA(cnn(0).train(), cnn(1), model1_name="a", model2_name="b")
            assert not comparer.model1.training  # eval from construction on
            comparer.compare(loader())
        caught.append([(w.category, str(w.message)) for w in seen])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # numpy 2 about torch-cka's tensor in imshow
            comparer.plot_results(title="a against b")
        buffer = io.BytesIO()
        plt.gcf().savefig(buffer, format="png", dpi=40)
        plt.close("all")
        buffer.seek(0)
        figures.append(plt.imread(buffer))
    assert caught[0] == caught[1] and len(caught[0]) == 4
    assert figures[0].shape == figures[1].shape and np.array_equal(*figures)
    # errors of torch-cka's types: unequal paired batches (its assertion), batches of 3 (its division by zero)
    uneven = torch_cka.CKA(cnn(0), cnn(1), model1_name="a", model2_name="b", model1_layers=["1"],
                           model2_layers=["1"])
    with pytest.raises(AssertionError, match="Feature shape mistach"):
        uneven.compare(loader(n=40, batch=16), loader(n=40, batch=20))
    with pytest.raises(ZeroDivisionError, match="batch size > 3"):
        uneven.compare(loader(n=6, batch=3), loader(n=6, batch=3))
    theirs = peer.CKA(cnn(0), cnn(1), model1_name="a", model2_name="b", model1_layers=["1"], model2_layers=["1"])
    with pytest.raises(AssertionError), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.compare(loader(n=40, batch=16), loader(n=40, batch=20))
    with pytest.raises(ZeroDivisionError):
        theirs.compare(loader(n=6, batch=3), loader(n=6, batch=3))


def test_pytorch_cka_drop_in_matches_the_package():
    import cka as peer
    layers = ["1", 3, "5"]  # names and indices into named_modules, as pytorch-cka resolves them
    mine = pytorch_cka.compute_cka(cnn(0), cnn(1), loader(), loader(batch=32), layers=layers, progress=False)
    theirs = peer.compute_cka(cnn(0), cnn(1), loader(), loader(batch=32), layers=layers, progress=False,
                              device="cpu")
    assert len(mine) == len(theirs) == 2
    for a, b in zip(mine, theirs):
        assert a.shape == b.shape == (3, 3)
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=2e-4)
    with torch.no_grad():
        exact = nrk21_minibatch_cka(cnn(0), cnn(1), ["1", "3", "5"], ["1", "3", "5"], loader())
    np.testing.assert_allclose(mine[0].numpy(), np.clip(exact, 0, 1), rtol=1e-6)
    same = pytorch_cka.compute_cka(cnn(0), cnn(0), loader(), layers=["1", "3"], progress=False)[0]
    np.testing.assert_allclose(torch.diagonal(same).numpy(), 1.0, rtol=1e-6)


def test_pytorch_cka_feature_and_gram_entry_points_match_in_float64():
    import cka as peer
    g = torch.Generator().manual_seed(0)
    X = torch.randn(3, 50, 7, dtype=torch.float64, generator=g).relu()
    Y = torch.randn(2, 50, 9, dtype=torch.float64, generator=g) + X[:2, :, :1]
    np.testing.assert_allclose(pytorch_cka.cka_from_features(X, Y).numpy(),
                               peer.cka_from_features(X, Y).numpy(), rtol=1e-6)
    np.testing.assert_allclose(pytorch_cka.cka_from_features(list(X), Y[0]).numpy(),
                               peer.cka_from_features(list(X), Y[0]).numpy(), rtol=1e-6)
    Kx, Ky = X @ X.transpose(1, 2), Y @ Y.transpose(1, 2)
    for a, b in zip(pytorch_cka.hsic(Kx, Ky), peer.hsic(Kx, Ky)):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-9)
    np.testing.assert_allclose(pytorch_cka.hsic_cross(Kx, Ky).numpy(), peer.hsic_cross(Kx, Ky).numpy(), rtol=1e-9)
    with pytest.raises(ValueError, match="n > 3"):
        pytorch_cka.hsic(Kx[:, :3, :3], Ky[:, :3, :3])
    fig, ax = pytorch_cka.plot_cka_heatmap(pytorch_cka.cka_from_features(X, Y), ["a", "b", "c"], ["d", "e"])
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b", "c"]


# ---------------------------------------------------------------------------------------------
# The seed 004 authors' measures, checked against their formulas


def relu_features(n=40, c=4, hw=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, hw, hw, dtype=torch.float64, generator=g).relu() + 0.1, g


def test_wreath_procrustes_is_definition_5_2_with_their_padding_and_upsampling():
    X, g = relu_features()
    Y = (X + 0.7 * torch.randn(X.shape, dtype=torch.float64, generator=g)).relu()
    before = X.clone()

    def brute(A, B):  # no centring, channels over (N, H, W) to unit norm, zero channels stay zero
        def tilde(M):
            M = M.transpose(0, 1).reshape(M.shape[1], -1)
            n = M.norm(dim=1, keepdim=True)
            return M / torch.where(n > 0, n, torch.ones_like(n))
        A, B = tilde(A), tilde(B)
        c = A.shape[0]
        best = min(float((A - B[list(p)]).square().sum()) for p in itertools.permutations(range(c)))
        return 1 - np.sqrt(best / (4 * c))

    s = modelsym.wreath_procrustes([X, X], [Y, X], diagonly=False)
    assert float(s[0, 0]) == pytest.approx(brute(X, Y), rel=1e-6)
    assert float(s[1, 1]) == 1.0 and float(s[0, 1]) == 1.0  # exact at alignment (theirs: NaN)
    assert float(s[0, 0]) == pytest.approx(se.procrustes(X, Y, "grelu"), rel=1e-6)  # the same definition
    assert torch.isnan(modelsym.wreath_procrustes([X, X], [Y, X])[0, 1])  # diagonly: not computed
    padded = torch.cat([X[:, :3], torch.zeros_like(X[:, :1])], dim=1)
    assert float(modelsym.wreath_procrustes([X[:, :3]], [Y])[0, 0]) == pytest.approx(brute(padded, Y), rel=1e-6)
    small = X[:, :, :2, :2]
    up = small.repeat_interleave(2, -1).repeat_interleave(2, -2)
    big = torch.randn(40, 4, 4, 4, dtype=torch.float64, generator=g).relu()
    assert float(modelsym.wreath_procrustes([small], [big])[0, 0]) == pytest.approx(brute(up, big), rel=1e-6)
    assert torch.equal(X, before)


def test_ortho_procrustes_and_the_cka_pair_are_the_spectral_ext_measures():
    X, g = relu_features(n=30, c=5)
    Y = X + torch.randn(X.shape, dtype=torch.float64, generator=g)
    before = X.clone()
    s = modelsym.ortho_procrustes([X], [Y])
    A = X.transpose(0, 1).reshape(5, -1)
    B = Y.transpose(0, 1).reshape(5, -1)
    C = (A / A.norm()) @ (B / B.norm()).T
    assert float(s[0, 0]) == pytest.approx(1 - np.sqrt(2 - 2 * float(torch.linalg.matrix_norm(C, "nuc"))) / 2,
                                           rel=1e-6)  # float32 results, as theirs
    w = modelsym.wreath_cka([X, Y], [Y])
    assert w.shape == (2, 1)
    assert float(w[0, 0]) == pytest.approx(se.cka(X, Y, "max"), rel=1e-6)
    assert float(w[1, 0]) == pytest.approx(1.0, rel=1e-6)
    assert float(modelsym.ortho_cka([X], [Y])[0, 0]) == pytest.approx(se.cka(X, Y, "ortho"), rel=1e-6)
    # channels last: dims names each side's channel axis
    assert float(modelsym.ortho_cka([X.movedim(1, -1)], [Y], dims=(3, 1))[0, 0]) == \
        pytest.approx(se.cka(X, Y, "ortho"), rel=1e-6)
    median = modelsym.wreath_cka([X], [Y], estimator="median")
    Xn = se.similarity.channel_normalize(X.reshape(30, 5, -1))
    Yn = se.similarity.channel_normalize(Y.reshape(30, 5, -1))
    K = torch.einsum("ics,jcs->ijc", Xn, Xn).median(-1).values
    L = torch.einsum("ics,jcs->ijc", Yn, Yn).median(-1).values
    h = se.similarity.hsic
    expected = float(h(K[None], L[None]) / (h(K[None], K[None]) * h(L[None], L[None])).sqrt())
    assert float(median[0, 0]) == pytest.approx(expected, rel=1e-6)
    assert torch.equal(X, before)  # theirs centres the caller's tensors in place
    with pytest.raises(ValueError, match="undefined"):
        modelsym.wreath_cka([torch.ones_like(X)], [Y])
    with pytest.raises(ValueError, match="estimator must be"):
        modelsym.wreath_cka([X], [Y], estimator="mean")
