"""Issue 14.2: every public function that takes a model runs it in eval mode
and gives it back exactly as it came (every submodule's mode, every buffer
and parameter bit for bit), and two calls give the same value."""
import dataclasses
import importlib
import inspect
import math

import pandas as pd
import pytest
import torch
from torch import nn

import spectral_ext

covariance, layers, rank, signals, similarity, spectra, stitching, svr, symmetry, zoo = (
    importlib.import_module(f"spectral_ext.{name}") for name in
    ("covariance", "layers", "rank", "receptive_fields", "similarity", "spectra", "stitching", "spectral_neurons",
     "symmetry", "zoo"))

MODEL_ARGUMENTS = {"model", "model_a", "model_b", "reference", "models", "classifier", "model_or_frame"}
MODULES = (covariance, layers, rank, signals, similarity, spectra, stitching, svr, symmetry, zoo)


def make_model(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.5),
        nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(), nn.Dropout(0.5),
        nn.Flatten(), nn.Linear(12 * 6 * 6, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():  # non-trivial running statistics: a train-mode pass would move them
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    model.train()
    model[7].eval()  # mixed modes must come back mixed, not all set to the top module's
    return model


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {name: m.training for name, m in model.named_modules()},
            {name: p.requires_grad for name, p in model.named_parameters()})


def assert_unchanged(model, before):
    state, modes, grads = snapshot(model)
    assert modes == before[1], "a submodule's .training flag changed"
    assert grads == before[2], "a parameter's requires_grad changed"
    assert state.keys() == before[0].keys()
    for key, value in state.items():
        assert torch.equal(value, before[0][key]), f"{key} changed"


def comparable(value):
    """A plain structure of tensors, numbers and frames from any result."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, nn.Module):
        return {k: v.detach().cpu() for k, v in value.state_dict().items()}
    if isinstance(value, pd.DataFrame):
        return value.reset_index(drop=True)
    if isinstance(value, dict):
        return {repr(k): comparable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [comparable(v) for v in value]
    if dataclasses.is_dataclass(value):
        return {f.name: comparable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, svr.SVR):
        return {"adjacencies": [comparable(value.adjacency(e)) for e in range(len(value.edges))],
                "edges": comparable(value.edges)}
    if isinstance(value, layers.ModelGraph):
        return {"maps": list(value.maps), "connections": [(c.previous, c.next) for c in value.connections]}
    return value


def assert_same(a, b, path="result"):
    if isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=path)
    elif isinstance(a, pd.DataFrame):
        pd.testing.assert_frame_equal(a, b, check_exact=True)
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_same(a[k], b[k], f"{path}[{k}]")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), path
    else:
        assert a == b, path


X = torch.randn(24, 3, 6, 6, generator=torch.Generator().manual_seed(1))
Y = torch.arange(24) % 4
EXAMPLE = X[:2]


def _svr_of(model):
    return svr.svr(model, EXAMPLE)


def _features_and_classifier(model):
    return torch.randn(40, 16, generator=torch.Generator().manual_seed(2)), torch.arange(40) % 4


# name -> call(model) for every public function taking a model; functions of two models get the
# same model twice (the harder case: both roles on one module)
CASES = {
    "activation_covariance": lambda m: covariance.activation_covariance(m, None, ["4", "9"], X, progress=False),
    "clip": lambda m: covariance.clip(m, "9", (X, Y), ks=[1, 4], progress=False),
    "rainbow": lambda m: covariance.rainbow(m, (X, Y), (X, Y), example_input=EXAMPLE, generator=0, progress=False),
    "weight_spectra": lambda m: covariance.weight_spectra(m, m, EXAMPLE),
    "discover": lambda m: layers.discover(m, EXAMPLE),
    "chain_graph": lambda m: layers.chain_graph(m),
    "layer_feature_axis": lambda m: similarity.layer_feature_axis(m, "4"),
    "jacobian_partial_rank": lambda m: rank.jacobian_partial_rank(m, ["4", "9"], X[:2], (slice(1, 4), slice(1, 4)),
                                                                   progress=False),
    "perturbed_pca_dimension": lambda m: rank.perturbed_pca_dimension(
        m, ["4"], X[:2], n_perturbations=30, generator=torch.Generator().manual_seed(0), progress=False),
    "classification_dimension": lambda m: rank.classification_dimension(
        nn.Sequential(m[10], nn.Dropout(0.5), m[11]), _features_and_classifier(m)),
    "projection_accuracy": lambda m: rank.projection_accuracy(
        nn.Sequential(m[10], nn.Dropout(0.5), m[11]), _features_and_classifier(m), ks=[1, 3]),
    "layer_bases": lambda m: signals.layer_bases(m, ["4"], EXAMPLE),
    "signals": lambda m: signals.signals(m, "4", X),
    "signal_vectors": lambda m: signals.signal_vectors(m, ["4", "9"], (X, Y), progress=False),
    "exemplary_images": lambda m: signals.exemplary_images(m, "4", X, [0, [1, 2]], k=3, progress=False),
    "feature_visualization": lambda m: signals.feature_visualization(m, "4", [0, 1], (3, 6, 6), steps=3,
                                                                            generator=0),
    "similarity_matrix": lambda m: similarity.similarity_matrix(m, m, ["4", "9"], [X[:12], X[12:]], progress=False),
    "layer_spectra": lambda m: spectra.layer_spectra(m, EXAMPLE),
    "alpha_hat": lambda m: spectra.alpha_hat(m, EXAMPLE),
    "stitch": lambda m: stitching.stitch(m, m, "4", (X, Y), (X, Y), epochs=1, generator=0,
                                         progress=False).matrix,
    "svr": lambda m: svr.svr(m, EXAMPLE),
    "svr_many": lambda m: svr.svr_many([m, m], EXAMPLE),
    "co_svr": lambda m: svr.co_svr(nn.Sequential(*list(m)[:8]), EXAMPLE),
    "kernel_connections": lambda m: svr.kernel_connections(nn.Sequential(*list(m)[:8]), EXAMPLE),
    "spectral_activations": lambda m: svr.spectral_activations(m, _svr_of(m), None, X[:4]),
    "apply_symmetry": lambda m: symmetry.apply_symmetry(m, example_input=EXAMPLE,
                                                        generator=0, progress=False)[0],
    "rotation_penalty": lambda m: symmetry.rotation_penalty(m, "9", (X, Y), (X, Y), epochs=1, generator=0,
                                                            progress=False),
    "rotation_penalties": lambda m: symmetry.rotation_penalties(m, ["9"], (X, Y), (X, Y), trials=1, epochs=1,
                                                                generator=0, progress=False),
    "model_metrics": lambda m: zoo.model_metrics({"a": m}, example_input=EXAMPLE),
    "pair_metrics": lambda m: zoo.pair_metrics({"a": m, "b": m}, [("a", "b")], X, ["4", "9"]),
}


def public_functions_taking_a_model():
    names = set()
    for module in MODULES:
        for name, function in vars(module).items():
            if name.startswith("_") or not inspect.isfunction(function) or function.__module__ != module.__name__:
                continue
            if MODEL_ARGUMENTS & set(inspect.signature(function).parameters):
                names.add(name)
    return names


def test_every_function_taking_a_model_has_a_case():
    missing = public_functions_taking_a_model() - set(CASES)
    assert not missing, f"add a case to CASES for {sorted(missing)}"
    exported = {name for name in spectral_ext.__all__ if callable(getattr(spectral_ext, name))}
    for name in exported & public_functions_taking_a_model():
        assert name in CASES


@pytest.mark.parametrize("name", sorted(CASES))
def test_model_given_back_unchanged(name):
    model = make_model()
    before = snapshot(model)
    first = comparable(CASES[name](model))
    assert_unchanged(model, before)
    second = comparable(CASES[name](model))
    assert_unchanged(model, before)
    assert_same(first, second)


def test_evaluating_restores_modes_on_error():
    from spectral_ext._hooks import evaluating

    model = make_model()
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        with evaluating(model):
            assert not any(m.training for m in model.modules())
            raise RuntimeError("boom")
    assert_unchanged(model, before)


def test_a_train_mode_pass_would_be_caught():
    """The check itself can fail: a plain train-mode forward moves the statistics."""
    model = make_model()
    before = snapshot(model)
    model(X)
    with pytest.raises(AssertionError):
        assert_unchanged(model, before)


def make_spectral_norm_model():
    """make_model with spectral_norm on a conv and a Linear, in train mode: reading such a weight
    in train mode runs a power iteration and moves the parametrization's buffers (issue 27)."""
    model = make_model()
    nn.utils.parametrizations.spectral_norm(model[4])
    nn.utils.parametrizations.spectral_norm(model[9])
    model.train()
    model[7].eval()
    return model


@pytest.mark.parametrize("name", sorted(CASES))
def test_spectral_norm_model_given_back_unchanged(name):
    model = make_spectral_norm_model()
    before = snapshot(model)
    try:
        CASES[name](model)
    except ValueError as error:  # a method that cannot take a parametrized weight says so
        assert "parametrized" in str(error), error
    assert_unchanged(model, before)


class InPlaceOnInput(nn.Sequential):
    """A model whose first operation changes its input in place."""

    def forward(self, x):
        return super().forward(torch.relu_(x))


@pytest.mark.parametrize("name", sorted(CASES))
def test_callers_data_unchanged_by_a_model_that_works_in_place(name):
    model = InPlaceOnInput(*make_model())
    data = X.clone()
    CASES[name](model)
    assert torch.equal(X, data), "the caller's data changed"
