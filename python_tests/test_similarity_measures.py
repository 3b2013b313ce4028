"""The Measure protocol and its drivers (similarity/measure.py): compare,
measure_matrix, pairwise_similarity (blocks within max_memory),
similarity_matrix and the zoo's --pairs, each checked against the measure's
own pair() on the same representations."""
import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import spectral_ext as se
from spectral_ext import zoo
from spectral_ext.similarity import measure as M


class BiasedLinearCKA(M.Measure):
    """A measure defined here, not registered: the biased linear CKA of
    centred features, ||X'Y||^2 / (||X'X|| ||Y'Y||) (Kornblith et al. 2019)."""

    name = "test_cka"
    invariances = "orthogonal transforms, isotropic scaling, translation"
    min_samples = 2

    def __init__(self, squared: bool = True):
        self.squared = squared

    def reduce(self, X):
        X = X - X.mean(0)
        return X, torch.linalg.matrix_norm(X.T @ X)

    def pair(self, a, b):
        (X, nx), (Y, ny) = a, b
        value = float(torch.linalg.matrix_norm(X.T @ Y) ** 2 / (nx * ny))
        return value if self.squared else math.sqrt(value)


def reps(k=5, n=40, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, d, generator=g, dtype=torch.float64)
    return {f"m{i}": base @ torch.randn(d, d, generator=g, dtype=torch.float64) + 0.3 * i *
            torch.randn(n, d, generator=g, dtype=torch.float64) for i in range(k)}


def hand(X, Y):
    X, Y = X - X.mean(0), Y - Y.mean(0)
    return float(np.linalg.norm(X.T @ Y) ** 2 / (np.linalg.norm(X.T @ X) * np.linalg.norm(Y.T @ Y)))


def test_compare_and_the_matrix_agree_with_the_formula():
    R = reps()
    m = BiasedLinearCKA()
    X, Y = R["m0"], R["m3"]
    assert abs(M.compare(X, Y, m) - hand(X.numpy(), Y.numpy())) < 1e-12
    assert abs(m(X.numpy(), Y.numpy()) - hand(X.numpy(), Y.numpy())) < 1e-12  # arrays too
    frame = M.measure_matrix(R, m).matrix
    assert list(frame.index) == list(R) and list(frame.columns) == list(R)
    for a in R:
        for b in R:
            assert abs(frame.loc[a, b] - hand(R[a].numpy(), R[b].numpy())) < 1e-12
    listed = M.measure_matrix(list(R.values()), m).matrix
    assert list(listed.index) == list(range(5))
    np.testing.assert_allclose(listed.to_numpy(), frame.to_numpy(), rtol=0, atol=0)


def test_representations_are_flattened_per_input():
    g = torch.Generator().manual_seed(1)
    X, Y = torch.randn(30, 2, 3, 3, generator=g), torch.randn(30, 4, generator=g)
    assert abs(M.compare(X, Y, BiasedLinearCKA()) - hand(X.reshape(30, -1).double().numpy(),
                                                         Y.double().numpy())) < 1e-12


@pytest.mark.parametrize("X,error,words", [
    ([[1.0, 2.0]], TypeError, "X must be a tensor or array"),
    (torch.ones(5), ValueError, "shape (N, D)"),
    (torch.ones(1, 3), ValueError, "N >= 2"),
    (torch.ones(4, 0), ValueError, "no features"),
    (torch.tensor([[1.0, float("nan")], [0.0, 1.0], [2.0, 1.0]]), ValueError, "NaN"),
    (torch.ones(3, 2, dtype=torch.complex64), TypeError, "real"),
    (torch.empty(4, 3, device="meta"), ValueError, "meta"),
])
def test_bad_representations_are_refused_naming_the_argument(X, error, words):
    Y = torch.randn(3, 2)
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
        M.compare(X, Y, BiasedLinearCKA())


def test_different_sample_counts_are_refused():
    with pytest.raises(ValueError, match="same inputs"):
        M.compare(torch.randn(5, 2), torch.randn(6, 2), BiasedLinearCKA())
    with pytest.raises(ValueError, match="same N"):
        M.measure_matrix({"a": torch.randn(5, 2), "b": torch.randn(6, 2)}, BiasedLinearCKA())


def test_unknown_names_and_options_are_refused():
    with pytest.raises(ValueError, match="measure must be one of"):
        M.get_measure("no_such_measure")
    with pytest.raises(TypeError, match="options"):
        M.get_measure(BiasedLinearCKA(), squared=False)
    with pytest.raises(ValueError, match="option=value"):
        M.parse_spec("cka:kernel")


def test_a_label_reads_back_as_the_same_measure():
    assert BiasedLinearCKA().label == "test_cka"
    assert BiasedLinearCKA(squared=False).label == "test_cka:squared=False"
    for name in M.MEASURES if M._load_measures() is None else ():
        m = M.get_measure(name)
        assert M.parse_spec(m.label).options() == m.options(), name


@pytest.mark.parametrize("max_memory", [None, 2 * 40 * 6 * 8 + 1])
def test_pairwise_similarity_runs_any_measure_in_blocks_with_the_same_numbers(max_memory):
    """A budget for two models at a time: the model blocks of the CKA route,
    the same values as the pair loop, pairs in the order given."""
    R = reps(k=6)
    pairs = [("m5", "m0"), ("m1", "m1"), ("m2", "m4"), ("m3", "m5"), ("m0", "m1")]
    frame = se.pairwise_similarity(R, pairs, measure=BiasedLinearCKA(), progress=False, max_memory=max_memory).to_frame()
    assert list(zip(frame.model_a, frame.model_b)) == pairs
    for (a, b), value in zip(pairs, frame.value):
        assert abs(value - hand(R[a].numpy(), R[b].numpy())) < 1e-12


def test_pairwise_similarity_reduces_each_model_once_per_block():
    R = reps(k=4)
    m = BiasedLinearCKA()
    calls = []
    original = m.reduce
    m.reduce = lambda X: calls.append(1) or original(X)
    se.pairwise_similarity(R, measure=m, progress=False)
    assert len(calls) == 4


def test_pairwise_similarity_refuses_a_budget_below_one_model():
    with pytest.raises(ValueError, match="max_memory"):
        se.pairwise_similarity(reps(k=3), measure=BiasedLinearCKA(), progress=False, max_memory=100)


def mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))


def activations(model, x, layers):
    out = {}
    hooks = [model.get_submodule(n).register_forward_hook(lambda _m, _i, o, n=n: out.__setitem__(n, o.detach()))
             for n in layers]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return out


def test_similarity_matrix_runs_any_measure_over_batches():
    a, b = mlp(0), mlp(1)
    x = torch.randn(48, 5, generator=torch.Generator().manual_seed(3))
    layers = ["0", "2", "4"]
    batches = [x[:20], x[20:40], x[40:]]  # uneven batches: the activations are joined
    frame = se.similarity_matrix(a, b, layers, batches, measure=BiasedLinearCKA(), progress=False).to_frame()
    acts_a, acts_b = activations(a, x, layers), activations(b, x, layers)
    assert len(frame) == 9
    for row in frame.itertuples():
        assert abs(row.value - hand(acts_a[row.layer_a].double().numpy(), acts_b[row.layer_b].double().numpy())) \
            < 1e-10
    same = se.similarity_matrix(a, a, layers, x, measure=BiasedLinearCKA(), progress=False).to_frame()
    assert np.allclose(same.pivot(index="layer_a", columns="layer_b", values="value").to_numpy().diagonal(), 1)
    assert a.training and b.training  # given back as they came


def test_measure_table_lists_every_registered_measure():
    table = M.table()
    assert list(table.columns) == ["name", "kind", "invariances", "reference", "cost"]
    assert set(table.name) == set(M.MEASURES)
    assert table.kind.isin(["similarity", "distance"]).all()
    assert (table.invariances.str.len() > 0).all() and (table.reference.str.len() > 0).all()


def test_the_readme_table_lists_the_measures_as_they_are():
    """README.md's table is what scripts/readme_measures.py writes from table(), and every reference key
    it cites is a heading of docs/references.md."""
    import importlib.util
    import pathlib

    root = pathlib.Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("readme_measures", root / "scripts" / "readme_measures.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    readme = (root / "README.md").read_text()
    assert script.written(readme) == readme, "run scripts/readme_measures.py"
    headings = {line[4:].split()[0] for line in (root / "docs" / "references.md").read_text().splitlines()
                if line.startswith("### ")}
    missing = set(M.table().reference) - headings
    assert not missing, f"reference keys without a heading in docs/references.md: {missing}"


@pytest.mark.parametrize("spec", ["cka", "cka:kernel=rbf:bandwidth=0.3", "cka:kernel=rbf_mean",
                                  "cka:estimator=lange", "cka:unbiased=False", "procrustes:group=grelu"])
def test_cka_and_procrustes_specs_keep_every_option_on_every_route(spec):
    """pairwise_similarity hands a cka / procrustes spec to its batched engine only where that engine
    computes the measure as defined; repsim's options (rbf_mean, lange) go through the measure itself:
    either way the values are the measure's own."""
    R = {k: v.relu() for k, v in reps(k=4, n=30).items()}
    m = M.parse_spec(spec)
    frame = se.pairwise_similarity(R, measure=spec, progress=False).to_frame()
    for a, b, _, value in frame.itertuples(index=False):
        assert abs(value - M.compare(R[a], R[b], m)) < 1e-10, (spec, a, b)


def test_similarity_matrix_streams_cka_with_the_specs_bandwidth():
    a, b = mlp(0), mlp(1)
    x = torch.randn(40, 5, generator=torch.Generator().manual_seed(4))
    spec = "cka:kernel=rbf:bandwidth=0.3"
    frame = se.similarity_matrix(a, b, ["2"], x, measure=spec, progress=False).to_frame()
    X, Y = activations(a, x, ["2"])["2"], activations(b, x, ["2"])["2"]
    assert abs(frame.value.item() - M.compare(X, Y, spec.split(":")[0], kernel="rbf", bandwidth=0.3)) < 1e-6
    assert abs(frame.value.item() - M.compare(X, Y, "cka", kernel="rbf")) > 1e-4  # the bandwidth matters here
