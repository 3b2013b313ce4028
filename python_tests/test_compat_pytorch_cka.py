"""spectral_ext.compat.pytorch_cka against the installed pytorch-cka 1.1.3
(imported as `cka`) on our own cases: the same exception types and messages,
warnings, verbose lines, context-manager semantics (hooks, eval mode), batch
forms and figures (pixel for pixel), and the same numbers as pytorch-cka's
estimator run in float64 (estimator="pytorch-cka", the default), the
corrected estimator by name (estimator="unbiased")."""
import contextlib
import io
import re
import warnings

import numpy as np
import pytest
import torch
from conftest import in_float64
from torch import nn

from conftest import minibatch_cka

from spectral_ext.compat import pytorch_cka as ours

import cka as peer  # noqa: E402  (the peer: a test requirement, never skipped)
import cka.viz  # noqa: E402,F401


class Net(nn.Module):
    """A conv layer followed by an in-place ReLU (its captured output is
    changed afterwards), a BatchNorm submodule, a layer returning a tuple."""

    def __init__(self, seed, width=6):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(2, width, 3)
        self.act = nn.ReLU(inplace=True)
        self.norm = nn.BatchNorm2d(width)
        self.head = nn.Linear(width * 16, 4)

    def forward(self, x):
        x = self.norm(self.act(self.conv(x)))
        return self.head(x.flatten(1))


def loader(n=48, batch=12, seed=0, dtype=torch.float32, form="tuple"):
    x = torch.randn(n, 2, 6, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float32).to(dtype)
    if form == "tuple":
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=batch)
    return torch.utils.data.DataLoader([{"pixel_values": row} for row in x], batch_size=batch)  # dict batches




def peer64(model1, model2, layers, model2_layers=None, seed=0):
    with in_float64(model1, model2):
        return peer.compute_cka(model1, model2, loader(seed=seed, dtype=torch.float64), layers=layers,
                                model2_layers=model2_layers, device="cpu", progress=False)[0].numpy()


def outputs(model, layers, x):
    """Each layer's output as produced (copied at once), float64."""
    saved = {}
    handles = [model.get_submodule(n).register_forward_hook(
        lambda m, a, o, n=n: saved.__setitem__(n, (o[0] if isinstance(o, tuple) else o).detach().clone()))
        for n in layers]
    with torch.no_grad():
        model.double().eval()(x.double())
    model.float()
    for h in handles:
        h.remove()
    return [saved[n].flatten(1) for n in layers]


def reference(model1, model2, layers1, layers2):
    return minibatch_cka((outputs(model1, layers1, x), outputs(model2, layers2, x)) for (x,) in loader())


# ---------------------------------------------------------------------------------------------
# Numbers


def test_default_is_the_packages_estimator_in_float64_and_unbiased_is_the_corrected_one():
    a, b = Net(0), Net(1, width=5)
    layers = ["conv", 2, "head"]  # names and indices into named_modules
    mine = ours.compute_cka(a, b, loader(), layers=layers, device="cpu", progress=False)[0]
    assert mine.dtype == torch.float32 and mine.shape == (3, 3)
    np.testing.assert_allclose(mine.numpy(), peer64(a, b, layers), rtol=1e-5, atol=1e-6)
    theirs = peer.compute_cka(a, b, loader(), layers=layers, device="cpu", progress=False)[0]
    np.testing.assert_allclose(mine.numpy(), theirs.numpy(), atol=1e-3)  # their float32 is close here
    # the corrected estimator: "conv" as the layer produced it (theirs sees it after the in-place ReLU)
    fixed = ours.compute_cka(a, b, loader(), layers=layers, device="cpu", progress=False, estimator="unbiased")[0]
    names = ["conv", "norm", "head"]
    np.testing.assert_allclose(fixed.numpy(), reference(a, b, names, names), rtol=1e-5, atol=1e-7)
    assert abs(float(fixed[0, 0]) - float(mine[0, 0])) > 0.05
    np.testing.assert_allclose(fixed[1:, 1:].numpy(), mine[1:, 1:].numpy(), rtol=1e-5, atol=1e-6)


def test_one_model_with_its_layers_reordered_keeps_the_packages_normalisation():
    model = Net(0)
    layers, reordered = ["conv", "norm", "head"], ["head", "conv", "norm"]
    mine = ours.compute_cka(model, model, loader(), layers=layers, model2_layers=reordered, device="cpu",
                            progress=False)[0]
    np.testing.assert_allclose(mine.numpy(), peer64(model, model, layers, reordered), rtol=1e-5, atol=1e-6)
    fixed = ours.compute_cka(model, model, loader(), layers=layers, model2_layers=reordered, device="cpu",
                             progress=False, estimator="unbiased")[0]
    np.testing.assert_allclose(fixed.numpy(), reference(model, model, layers, reordered), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(fixed[[0, 1, 2], [1, 2, 0]].numpy(), 1.0, rtol=1e-6)  # each layer with itself
    assert not np.allclose(mine.numpy(), fixed.clamp(0, 1).numpy(), atol=1e-2)


def test_a_constant_layer_is_0_with_a_warning_by_default_nan_when_unbiased():
    a, b = Net(0), Net(1)
    with torch.no_grad():
        a.conv.weight.zero_()
        a.conv.bias.fill_(-1.0)  # ReLU of a constant: every sample the same
    layers = dict(layers=["act"], model2_layers=["conv", "head"], device="cpu", progress=False)
    theirs = peer.compute_cka(a, b, loader(), **layers)[0]
    with pytest.warns(RuntimeWarning, match="undefined for constant representations model1 layer 'act'.*as 0"):
        mine = ours.compute_cka(a, b, loader(), **layers)[0]
    np.testing.assert_array_equal(mine.numpy(), theirs.numpy())
    assert not mine.any()  # 0 both
    with pytest.warns(RuntimeWarning, match="undefined.*model1 layer 'act' \\(constant\\)"):
        fixed = ours.compute_cka(a, b, loader(), estimator="unbiased", **layers)[0]
    assert torch.isnan(fixed).all()
    fine = ours.compute_cka(b, b, loader(), estimator="unbiased", **layers)[0]
    assert not torch.isnan(fine).any()


def test_features_and_grams_entry_points_give_the_packages_numbers_in_its_dtypes():
    g = torch.Generator().manual_seed(3)
    X = torch.randn(3, 40, 7, generator=g).relu() + 2.0  # a large mean: the uncentred Grams cancel
    Y = torch.randn(2, 40, 9, generator=g) + X[:2, :, :1]
    exact = peer.cka_from_features(X.double(), Y.double())
    mine = ours.cka_from_features(X, Y)
    assert mine.dtype == torch.float32 and mine.shape == (3, 2)
    np.testing.assert_allclose(mine.numpy(), exact.numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(ours.cka_from_features(X.double().numpy(), list(Y.double())).numpy(),
                               exact.numpy(), rtol=1e-9)  # arrays and lists
    assert ours.cka_from_features(X.double(), Y.double()).dtype == torch.float64
    np.testing.assert_allclose(torch.diagonal(ours.cka_from_features(X, X)).numpy(), 1.0, rtol=1e-6)
    raw = ours.cka_from_features(torch.randn(30, 4, generator=g), torch.randn(30, 4, generator=g),
                                 estimator="unbiased")
    clamped = ours.cka_from_features(torch.randn(30, 4, generator=g.manual_seed(3)),
                                     torch.randn(30, 4, generator=g), estimator="pytorch-cka")
    assert raw.shape == clamped.shape == (1, 1) and float(clamped) >= 0
    # Grams (not symmetric: the package reads K entrywise), float64 inside, the inputs' dtype out
    Kx, Ky = torch.randn(4, 9, 9, generator=g), torch.randn(3, 9, 9, generator=g)
    for a, b in zip(ours.hsic(Kx, Ky), peer.hsic(Kx.double(), Ky.double())):
        assert a.dtype == torch.float32
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours.hsic_cross(Kx.double(), Ky.double()).numpy(),
                               peer.hsic_cross(Kx.double(), Ky.double()).numpy(), rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# Errors, warnings, output


def assert_same_error(call):
    """The exception type and message of call(module) for both modules."""
    caught = []
    for module in (peer, ours):
        with pytest.raises(Exception) as info:
            call(module)
        caught.append((type(info.value), str(info.value)))
    assert caught[0] == caught[1], caught


G = torch.Generator().manual_seed(0)
SQUARE, WIDE = torch.randn(2, 6, 6, generator=G), torch.randn(2, 6, 5, generator=G)


@pytest.mark.parametrize("call", [
    lambda m: m.hsic(SQUARE[0], SQUARE),
    lambda m: m.hsic(SQUARE, WIDE),
    lambda m: m.hsic(SQUARE, torch.randn(1, 7, 7)),
    lambda m: m.hsic(SQUARE[:, :3, :3], SQUARE[:, :3, :3]),
    lambda m: m.hsic_cross(SQUARE, SQUARE[None]),
    lambda m: m.hsic_cross(WIDE, SQUARE),
    lambda m: m.hsic_cross(SQUARE[:, :2, :2], SQUARE[:, :2, :2]),
    lambda m: m.cka_from_features(torch.randn(3, 5), torch.randn(3, 2)),
    lambda m: m.cka_from_features(torch.randn(8, 5), torch.randn(9, 2)),
    lambda m: m.compute_cka(Net(0), Net(1), device="cpu"),
    lambda m: m.compute_cka(Net(0), Net(1), loader(), layers=["conv", "missing"], device="cpu", progress=False),
    lambda m: m.compute_cka(Net(0), Net(1), loader(), layers=[4], device="cpu", progress=False),
    lambda m: m.compute_cka(Net(0), Net(1), loader(), layers=[-5], device="cpu", progress=False),
    lambda m: m.compute_cka(Net(0), Net(1), loader(), layers=["conv"], model2_layers=[None], device="cpu"),
    lambda m: m.compute_cka(Net(0), Net(1), loader(batch=3), device="cpu", progress=False),
    lambda m: m.CKA(Net(0), Net(1), device="cpu")._compare(loader()),
    lambda m: m.CKA(Net(0), Net(1), device="cpu")._extract_input({"label": torch.zeros(4)}),
    lambda m: m.CKA(Net(0), Net(1), device="cpu")._extract_input(3.0),
], ids=lambda c: "")
def test_the_same_exception_types_and_messages(call):
    assert_same_error(call)


def test_the_same_warning_for_a_model_of_more_than_150_layers():
    big = nn.Sequential(*[nn.Identity() for _ in range(151)])
    messages = []
    for module in (peer, ours):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            module.CKA(big, Net(0), device="cpu")
            module.CKA(big, Net(0), layers=["0"], model2_layers=["conv"], device="cpu")  # listed: no warning
        messages.append([(w.category, str(w.message)) for w in caught])
    assert messages[0] == messages[1] and len(messages[0]) == 1 and "151 layers" in messages[0][0][1]


def test_verbose_lines_and_progress_bar_as_the_package():
    model1, model2 = nn.Sequential(nn.Linear(5, 8), nn.Linear(8, 3)), nn.Sequential(nn.Linear(5, 4))
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(40, 5, generator=G)),
                                       batch_size=10)
    printed, bars = [], []
    for module in (peer, ours):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            module.compute_cka(model1, model2, data, device="cpu", verbose=True, progress=True)
        printed.append(out.getvalue().splitlines())
        bars.append(re.sub(r"\[.*?\]", "", err.getvalue().split("\r")[-1]).strip())
    pattern = re.compile(r"Batch (\d)/4 - Mean CKA: (\d\.\d{4})")
    theirs, mine = ([pattern.fullmatch(line).groups() for line in lines] for lines in printed)
    assert [b for b, _ in mine] == [b for b, _ in theirs] == ["1", "2", "3", "4"]
    np.testing.assert_allclose([float(v) for _, v in mine], [float(v) for _, v in theirs], atol=2e-4)
    assert bars[0] == bars[1] and bars[1].startswith("Computing CKA: 100%")


# ---------------------------------------------------------------------------------------------
# The context manager, layers, devices, batches


def test_hooks_and_eval_mode_live_inside_the_with_block_only():
    a, b = Net(0), Net(1)
    a.train()
    a.norm.eval()  # a frozen BatchNorm inside a training model: kept frozen afterwards (theirs: trained)
    comparer = ours.CKA(a, b, layers=["conv", "head"], device="cpu")
    assert (comparer._model1_training, comparer._model2_training) == (True, True)
    assert list(comparer.model1_layer_to_module) == list(peer.CKA(a, b, layers=["conv", "head"],
                                                                  device="cpu").model1_layer_to_module)
    assert comparer.model1_layer_to_module["conv"] is a.conv
    with pytest.raises(RuntimeError, match="Hooks not registered"):
        comparer._compare(loader())
    with comparer as entered:
        assert entered is comparer and len(comparer._hook_handles) == 4
        assert not any(m.training for m in a.modules()) and not b.training
        comparer.__enter__()  # idempotent
        assert len(comparer._hook_handles) == 4 and len(a.conv._forward_hooks) == 1
        result = comparer._compare(loader(), progress=False)
        assert not comparer._model1_layer_to_feature or set(comparer._model1_layer_to_feature) == {"conv", "head"}
    assert not a.conv._forward_hooks and not comparer._hook_handles
    assert a.training and b.training and not a.norm.training
    assert not comparer._model1_layer_to_feature and not comparer._model2_layer_to_feature
    # compare() enters by itself
    np.testing.assert_array_equal(comparer.compare(loader(), progress=False).numpy(), result.numpy())
    assert not a.conv._forward_hooks and a.training


def test_one_model_shares_its_features_and_wrappers_are_unwrapped():
    model = Net(0)
    comparer = ours.CKA(nn.DataParallel(model), model, layers=["conv"], model2_layers=["head"], device="cpu")
    assert comparer.model1 is model and comparer._is_same_model
    assert list(comparer._shared_layer_to_module) == ["conv", "head"]
    with comparer:
        model(torch.randn(4, 2, 6, 6))
        assert set(comparer._shared_features) == {"conv", "head"}
        assert comparer._shared_features["conv"].shape == (4, 6 * 16)  # flattened as the package does
        comparer._clear_features()
        assert not comparer._shared_features


def test_the_default_device_is_chosen_as_the_package_chooses(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert ours.CKA(Net(0), Net(1)).device == peer.CKA(Net(0), Net(1)).device == torch.device("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_a_gpu_the_default_device_is_cuda_and_the_numbers_stay():
    a, b = Net(0), Net(1)
    on_cpu = ours.compute_cka(a, b, loader(), layers=["conv", "head"], device="cpu", progress=False)[0]
    comparer = ours.CKA(a, b, layers=["conv", "head"])
    assert comparer.device == peer.CKA(a, b).device == torch.device("cuda")
    with comparer:
        on_gpu = comparer._compare(loader(), progress=False)
    assert on_gpu.device.type == "cuda"
    np.testing.assert_allclose(on_gpu.cpu().numpy(), on_cpu.numpy(), atol=1e-4)


def test_batch_forms_and_the_callers_inputs():
    a, b = Net(0), Net(1)
    tuples = ours.compute_cka(a, b, loader(), layers=["conv"], device="cpu", progress=False)[0]
    dicts = ours.compute_cka(a, b, loader(form="dict"), layers=["conv"], device="cpu", progress=False)[0]
    theirs = peer.compute_cka(a, b, loader(form="dict"), layers=["conv"], device="cpu", progress=False)[0]
    np.testing.assert_array_equal(tuples.numpy(), dicts.numpy())
    np.testing.assert_allclose(dicts.numpy(), theirs.numpy(), atol=1e-4)
    for key in ("input", "inputs", "x", "image", "images", "input_ids", "pixel_values"):
        x = torch.randn(5, 3)
        assert ours.CKA(a, b, device="cpu")._extract_input({key: x}) is x
    # a model whose first operation is in place: the loader's data stays as it was (theirs changes it)
    first_in_place = nn.Sequential(nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(72, 3))
    data = loader()
    before = data.dataset.tensors[0].clone()
    ours.compute_cka(first_in_place, b, data, layers=["2"], model2_layers=["head"], device="cpu", progress=False)
    assert torch.equal(data.dataset.tensors[0], before)


# ---------------------------------------------------------------------------------------------
# Figures: the package's, pixel for pixel


def pixels(fig):
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=40)
    plt.close(fig)
    buffer.seek(0)
    return plt.imread(buffer)


def assert_same_figure(draw):
    """The same pixels and the same warnings (matplotlib's, about the layout)."""
    images, messages = [], []
    for module in (peer, ours):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            images.append(pixels(draw(module)[0]))
        messages.append([(w.category, str(w.message)) for w in caught])
    assert images[0].shape == images[1].shape and np.array_equal(*images)
    assert messages[0] == messages[1]


MATRIX = torch.rand(4, 3, generator=torch.Generator().manual_seed(1))
MATRIX[2, 1] = float("nan")


@pytest.mark.parametrize("draw", [
    lambda m: m.plot_cka_heatmap(MATRIX, layers1=[f"enc.b.l{i}" for i in range(4)], layers2=["x", "y", "z"],
                                 annot=True, layer_name_depth=2, model1_name="A", model2_name="B"),
    lambda m: m.plot_cka_heatmap(MATRIX.nan_to_num(0.5).tolist(), annot=True, vmin=0.2, vmax=0.9, cmap="viridis",
                                 text_color="white", colorbar=False, title="T", figsize=(4, 3)),
    lambda m: m.plot_cka_comparison([MATRIX, MATRIX.numpy()[:3], np.eye(3)], ["a", "b", "c"], annot=True),
    lambda m: m.plot_cka_comparison([MATRIX, MATRIX, MATRIX], ["a", "b", "c"], share_colorbar=False),
], ids=["heatmap", "heatmap-list", "comparison", "comparison-own-bars"])
def test_heatmaps_are_the_packages(draw):
    import matplotlib
    matplotlib.use("Agg")
    assert_same_figure(draw)


@pytest.mark.parametrize("draw", [
    lambda m: m.plot_cka_trend(torch.rand(12, 5, generator=torch.Generator().manual_seed(2)), legend=True,
                               color_overflow="variant", x_values=[1, 2, 4, 8, 16], title="t"),
    lambda m: m.plot_cka_trend([np.linspace(0, 1, 6), [0.2] * 6], labels=["a", "b"], markers=["s"], legend=True,
                               show_range=True, range_values=(np.zeros(6), np.ones(6) * 0.5), text_color="red"),
    lambda m: m.plot_cka_trend_with_range(torch.rand(2, 3, 5, generator=torch.Generator().manual_seed(3)),
                                          legend=True),
    lambda m: m.plot_cka_layer_trend([torch.eye(3) * 0.7, np.eye(3) * 0.4], layers=["a.x", "a.y", "a.z"],
                                     layer_name_depth=1, labels=["p", "q"], legend=True),
], ids=["trend", "trend-range", "trend-with-range", "layer-trend"])
def test_trend_figures_are_the_packages(draw):
    import matplotlib
    matplotlib.use("Agg")
    assert_same_figure(draw)


def test_save_figure_clears_the_legend_and_closes(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = []
    for module in (peer, ours):
        fig, ax = module.plot_cka_trend([[0.1, 0.5, 0.9], [0.3, 0.3, 0.2]], legend=True)
        path = tmp_path / f"{module.__name__}.png"
        module.save_figure(fig, str(path), dpi=50, transparent=True)
        assert not plt.fignum_exists(fig.number) and ax.get_legend().get_frame().get_facecolor()[3] == 0
        images.append(plt.imread(path))
    assert np.array_equal(*images) and images[0][..., 3].min() == 0


def test_one_column_of_heatmaps_where_the_package_fails():
    import matplotlib
    matplotlib.use("Agg")
    with pytest.raises(IndexError), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peer.plot_cka_comparison([MATRIX, MATRIX], ["a", "b"], ncols=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # matplotlib's, about tight_layout in a constrained layout (theirs too)
        fig, axes = ours.plot_cka_comparison([MATRIX, MATRIX], ["a", "b"], ncols=1)
    assert axes.shape == (2, 1) and [ax.get_title() for ax in axes[:, 0]] == ["a", "b"]
    pixels(fig)
