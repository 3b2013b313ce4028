"""A zoo's K x K similarity (seed 004 section 5): pairwise_similarity's
batched pairs equal cka / procrustes called pair by pair, the matrix is
symmetric with ones on the diagonal, zoo.pair_metrics runs each model once,
and bad input is refused naming the argument."""
import itertools
import warnings
import weakref

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import spectral_ext as se
from spectral_ext import similarity as S
from spectral_ext.similarity import _pairwise
from spectral_ext import zoo


def zoo_features(k=5, n=40, shape=(6,), seed=0):
    """k related float64 representations of one probe: ReLU maps of one base."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, *shape, dtype=torch.float64, generator=g)
    out = {}
    for i in range(k):
        mix = torch.randn(shape[0], shape[0], dtype=torch.float64, generator=g)
        Z = torch.einsum("nc...,cd->nd...", base, mix) + 0.5 * torch.randn(base.shape, dtype=torch.float64,
                                                                          generator=g)
        out[f"m{i}"] = Z.relu() + 0.1 * i
    return out


def matrix(frame, names):
    table = frame.pivot(index="model_a", columns="model_b", values="value")
    return table.loc[names, names].to_numpy()


def all_ordered(names):
    return list(itertools.product(names, names))


# (n, shape): the feature route (D small against N) and the Gram route (D large against N)
ROUTES = {"features": (60, (4,)), "grams": (10, (5, 3, 3))}


@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize("kernel,unbiased", [("linear", True), ("linear", False), ("ortho", True), ("max", True),
                                             ("rbf", True), ("laplace", False)])
def test_batched_cka_equals_pair_by_pair(route, kernel, unbiased):
    n, shape = ROUTES[route]
    feats = zoo_features(n=n, shape=shape)
    names = list(feats)
    frame = _pairwise.pairwise_similarity(feats, all_ordered(names), kernel=kernel, unbiased=unbiased, progress=False).to_frame()
    M = matrix(frame, names)
    for a, b in itertools.combinations(range(len(names)), 2):
        expected = se.cka(feats[names[a]], feats[names[b]], kernel, unbiased=unbiased)
        assert abs(M[a, b] - expected) <= 1e-10
    np.testing.assert_allclose(M, M.T, rtol=0, atol=1e-14)
    np.testing.assert_allclose(np.diag(M), 1.0, rtol=0, atol=1e-12)
    default = _pairwise.pairwise_similarity(feats, kernel=kernel, unbiased=unbiased, progress=False).to_frame()
    assert len(default) == len(names) * (len(names) - 1) // 2
    assert list(default["model_a"] + default["model_b"])[:2] == ["m0m1", "m0m2"]


def test_both_cka_routes_agree_and_are_chosen_by_cost(monkeypatch):
    calls = []
    original = _pairwise._pairwise_hsic_features
    monkeypatch.setattr(_pairwise, "_pairwise_hsic_features", lambda *a: calls.append(1) or original(*a))
    small = zoo_features(n=60, shape=(4,))
    wide = zoo_features(n=10, shape=(40,))
    _pairwise.pairwise_similarity(small, progress=False)
    assert calls == [1]
    _pairwise.pairwise_similarity(wide, progress=False)
    assert calls == [1]  # D = 40 against N = 10: the Gram route
    by_features = original([S.as_channels("X", R) for R in wide.values()], "linear", True,
                           type("Bar", (), {"update": lambda self, k: None})())
    frame = _pairwise.pairwise_similarity(wide, all_ordered(list(wide)), progress=False).to_frame()
    cka = by_features / torch.outer(by_features.diagonal(), by_features.diagonal()).sqrt()
    np.testing.assert_allclose(matrix(frame, list(wide)), cka.numpy(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("group", S.GROUPS)
@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("shape", [(6,), (6, 2, 2)])
def test_batched_procrustes_equals_pair_by_pair(group, centered, shape):
    feats = zoo_features(k=6, n=30, shape=shape)
    names = list(feats)
    frame = _pairwise.pairwise_similarity(feats, all_ordered(names), "procrustes", group=group, centered=centered,
                                  chunk=7, progress=False).to_frame()
    M = matrix(frame, names)
    for a, b in itertools.combinations(range(len(names)), 2):
        expected = se.procrustes(feats[names[a]], feats[names[b]], group, centered=centered)
        assert abs(M[a, b] - expected) <= 1e-10
    np.testing.assert_allclose(M, M.T, rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.diag(M), 1.0, rtol=0, atol=1e-6)  # sqrt of a rounding-level gap
    few = _pairwise.pairwise_similarity(feats, [("m3", "m1"), ("m0", "m2"), ("m5", "m4")], "procrustes", group=group,
                                centered=centered, progress=False).to_frame()  # 3 of 36 blocks: a product per pair instead
    np.testing.assert_allclose(few["value"], [M[3, 1], M[0, 2], M[5, 4]], rtol=0, atol=1e-10)


def test_orthogonal_procrustes_with_different_channel_counts():
    feats = zoo_features(k=3, n=30, shape=(6,))
    feats["wide"] = torch.cat([feats["m0"], feats["m1"][:, :3]], 1)
    frame = _pairwise.pairwise_similarity(feats, measure="procrustes", progress=False).to_frame()
    for a, b, _, value in frame.itertuples(index=False):
        assert abs(value - se.procrustes(feats[a], feats[b])) <= 1e-10
    with pytest.raises(ValueError, match="equal channel counts"):
        _pairwise.pairwise_similarity(feats, measure="procrustes", group="grelu", progress=False)


def test_a_constant_model_is_nan_with_a_warning_naming_it():
    feats = zoo_features(k=3)
    feats["flat"] = torch.ones(40, 6, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match=r"features\['flat'\] \(constant\)"):
        frame = _pairwise.pairwise_similarity(feats, progress=False).to_frame()
    flat = frame["model_a"].eq("flat") | frame["model_b"].eq("flat")
    assert frame.loc[flat, "value"].isna().all() and frame.loc[~flat, "value"].notna().all()


def cnn():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2), nn.ReLU(),
                         nn.Flatten(), nn.Linear(6 * 3 * 3, 5))


def test_pair_metrics_is_the_k_by_k_with_each_model_run_once(capsys):
    torch.manual_seed(0)
    models = {f"cnn{i}": cnn().double() for i in range(6)}
    forwards = {n: 0 for n in models}
    for n, m in models.items():
        m.register_forward_hook(lambda module, inputs, output, n=n: forwards.__setitem__(n, forwards[n] + 1))
    x = torch.randn(32, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    measures = ("cka", "cka:kernel=max", "procrustes", "procrustes:group=grelu")
    frame = zoo.pair_metrics(models, None, x, ["1", "3"], measures, progress=False)
    assert forwards == {n: 1 for n in models}
    assert len(frame) == 15 * 2 * len(measures) and list(frame.columns) == ["model_a", "model_b", "layer",
                                                                          "measure", "value"]
    assert capsys.readouterr().err == ""
    with torch.no_grad():
        acts = {n: {layer: m[: int(layer) + 1](x) for layer in ("1", "3")} for n, m in models.items()}
    row = frame[(frame.model_a == "cnn1") & (frame.model_b == "cnn4") & (frame.layer == "3")].set_index("measure")
    X, Y = acts["cnn1"]["3"], acts["cnn4"]["3"]
    assert abs(row.loc["cka", "value"] - se.cka(X, Y)) <= 1e-10
    assert abs(row.loc["cka:kernel=max", "value"] - se.cka(X, Y, "max")) <= 1e-10
    assert abs(row.loc["procrustes", "value"] - se.procrustes(X, Y)) <= 1e-10
    assert abs(row.loc["procrustes:group=grelu", "value"] - se.procrustes(X, Y, "grelu")) <= 1e-10
    others = ("svcca:variance=0.95", "rsa", "mutual_knn:k=5", "shape_metric:alpha=0.5")
    frame = zoo.pair_metrics(models, [("cnn1", "cnn4")], x, ["3"], others, progress=False).set_index("measure")
    for spec in others:  # any measure by its spec, on the activations flattened per input
        name, *options = spec.split(":")
        options = dict(o.split("=") for o in options)
        options = {k: (int(v) if v.isdigit() else float(v)) for k, v in options.items()}
        assert abs(frame.loc[spec, "value"] - se.similarity.compare(X, Y, name, **options)) <= 1e-10, spec
    zoo.pair_metrics(models, None, x, ["1"], ("cka",), progress=True)
    err = capsys.readouterr().err
    assert "pair metrics" in err and "7/7" in err  # 6 forwards and one batched (layer, measure) step


def test_pairwise_similarity_progress_bar(capsys):
    _pairwise.pairwise_similarity(zoo_features(k=4), progress=True)
    err = capsys.readouterr().err
    assert "pairwise cka" in err and "4/4" in err
    _pairwise.pairwise_similarity(zoo_features(k=4), progress=False)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("call,error,match", [
    (lambda f: _pairwise.pairwise_similarity({}).to_frame(), TypeError, "features must be a non-empty dict"),
    (lambda f: _pairwise.pairwise_similarity(f, [("m0", "zz")]).to_frame(), ValueError, "without features.*zz"),
    (lambda f: _pairwise.pairwise_similarity(f, [("m0", "m1", "m2")]).to_frame(), ValueError, "pairs must be"),
    (lambda f: _pairwise.pairwise_similarity(f, measure="l2").to_frame(), ValueError, "measure must be"),
    (lambda f: _pairwise.pairwise_similarity(f, kernel="cosine").to_frame(), ValueError, "kernel must be"),
    (lambda f: _pairwise.pairwise_similarity(f, measure="procrustes", group="affine").to_frame(), ValueError, "group must be"),
    (lambda f: _pairwise.pairwise_similarity(f, measure="procrustes", centered=1).to_frame(), TypeError, "centered"),
    (lambda f: _pairwise.pairwise_similarity(f, chunk=0).to_frame(), ValueError, "chunk"),
    (lambda f: _pairwise.pairwise_similarity(dict(f, short=f["m0"][:10])).to_frame(), ValueError, "same N probe samples"),
    (lambda f: _pairwise.pairwise_similarity({k: v[:3] for k, v in f.items()}).to_frame(), ValueError, "at least 4 samples"),
    (lambda f: _pairwise.pairwise_similarity(dict(f, bad=f["m0"].clone().fill_(float("nan")))).to_frame(), ValueError, "bad"),
    (lambda f: zoo.pair_metrics({"a": cnn()}, None, None, ["1"]), zoo.ZooError, "needs a probe"),
    (lambda f: zoo.pair_metrics({"a": cnn()}, None, torch.randn(8, 1, 8, 8), []), zoo.ZooError, "layers"),
    (lambda f: zoo.pair_metrics({"a": cnn()}, None, torch.randn(8, 1, 8, 8), ["1"], ("l2",)), zoo.ZooError,
     "measure must be one of"),
])
def test_bad_input_is_refused_naming_the_argument(call, error, match):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(error, match=match):
            call(zoo_features(k=3))


def test_inputs_are_left_as_they_were():
    feats = zoo_features(k=3, shape=(6, 2, 2))
    before = {n: t.clone() for n, t in feats.items()}
    for measure in ("cka", "procrustes"):
        _pairwise.pairwise_similarity(feats, measure=measure, progress=False)
    assert all(torch.equal(before[n], feats[n]) for n in feats)


def test_analyze_batches_the_pairs_of_each_chunk(monkeypatch):
    """zoo.analyze's pair phase: one batched pairwise_similarity per chunk,
    layer and measure (not one per pair), each model's centred Gram once per
    run (kept in the cache across chunks), the same values as pair_metrics."""
    torch.manual_seed(0)
    models = {f"cnn{i}": cnn() for i in range(5)}
    calls, original = [], _pairwise.pairwise_similarity
    monkeypatch.setattr(_pairwise, "pairwise_similarity", lambda *a, **k: calls.append(1) or original(*a, **k))
    grams, gram = [], _pairwise._gram
    monkeypatch.setattr(_pairwise, "_gram", lambda *a: grams.append(1) or gram(*a))
    x = torch.randn(24, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    tables = zoo.analyze(models, metrics=(), pairs=("cka", "procrustes"), probe=x, layers=["1", "3"],
                         chunk_size=3, progress=False)
    assert len(calls) == 4 * 2 * 2  # 4 chunks of the 10 pairs, each: layers x measures
    assert len(grams) == 5 * 2  # models x layers, not once per chunk
    pairs = tables["pairs"].sort_values(["model_a", "model_b", "layer", "measure"]).reset_index(drop=True)
    direct = zoo.pair_metrics(models, None, x, ["1", "3"], ("cka", "procrustes"), progress=False)
    direct = direct.sort_values(["model_a", "model_b", "layer", "measure"]).reset_index(drop=True)
    assert len(pairs) == 10 * 2 * 2
    np.testing.assert_allclose(pairs["value"], direct["value"], rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Within a memory budget (issue 13): blocks of models, the same numbers


def blocks_of(monkeypatch):
    """The model blocks each call plans (a spy on _model_blocks)."""
    planned, original = [], _pairwise._model_blocks
    monkeypatch.setattr(_pairwise, "_model_blocks", lambda *a, **k: planned.append(original(*a, **k)) or planned[-1])
    return planned


class Allocations(TorchDispatchMode):
    """The bytes of torch storages that the ops run while active allocate and
    keep alive at once (peak) and the largest one: each op's outputs whose
    storage is none of its inputs' (not a view, nor in place, nor out=) are
    counted when made and uncounted when their storage is freed (a weakref
    finalizer). Every torch allocation counts, temporaries included; memory
    that numpy allocates (scipy's BLAS) does not."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = self.largest = 0
        self.alive = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        given = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key, size = storage.data_ptr(), storage.nbytes()
                if size and key not in given and key not in self.alive:
                    self.alive.add(key)
                    self.live += size
                    self.peak, self.largest = max(self.peak, self.live), max(self.largest, size)
                    weakref.finalize(storage, self._freed, key, size)
        return out

    def _freed(self, key, size):
        self.alive.discard(key)
        self.live -= size


SOME_PAIRS = [("m5", "m0"), ("m1", "m1"), ("m2", "m4"), ("m6", "m3"), ("m0", "m6")]


@pytest.mark.parametrize("route,kernel,budget", [("features", "linear", 20_000), ("features", "ortho", 20_000),
                                                 ("grams", "linear", 9_000), ("grams", "max", 9_000),
                                                 ("grams", "rbf", 9_000)])
def test_a_small_max_memory_gives_the_unblocked_numbers(monkeypatch, route, kernel, budget):
    n, shape = ROUTES[route]
    feats = zoo_features(k=7, n=n, shape=shape)
    names = list(feats)
    planned = blocks_of(monkeypatch)
    for pairs in (all_ordered(names), SOME_PAIRS, None):
        whole = _pairwise.pairwise_similarity(feats, pairs, kernel=kernel, progress=False).to_frame()
        blocked = _pairwise.pairwise_similarity(feats, pairs, kernel=kernel, progress=False, max_memory=budget).to_frame()
        assert len(planned[-2]) == 1 and len(planned[-1]) >= 3  # unblocked, then several blocks
        assert list(blocked["model_a"]) == list(whole["model_a"]) and list(blocked["model_b"]) == list(whole["model_b"])
        np.testing.assert_allclose(blocked["value"], whole["value"], rtol=0, atol=1e-12)


@pytest.mark.parametrize("group", S.GROUPS)
@pytest.mark.parametrize("shape", [(6,), (6, 2, 2)])
def test_a_small_max_memory_gives_the_unblocked_procrustes(monkeypatch, group, shape):
    feats = zoo_features(k=7, n=30, shape=shape)
    names = list(feats)
    planned = blocks_of(monkeypatch)
    budget = 40_000 if shape == (6,) else 100_000
    for pairs in (all_ordered(names), SOME_PAIRS, None):
        whole = _pairwise.pairwise_similarity(feats, pairs, "procrustes", group=group, chunk=5, progress=False).to_frame()
        blocked = _pairwise.pairwise_similarity(feats, pairs, "procrustes", group=group, chunk=5, progress=False,
                                        max_memory=budget).to_frame()
        assert len(planned[-2]) == 1 and len(planned[-1]) >= 3
        np.testing.assert_allclose(blocked["value"], whole["value"], rtol=0, atol=1e-12)


@pytest.mark.parametrize("measure,route,budget", [("cka", "features", 29_000), ("cka", "grams", 11_900),
                                                  ("procrustes", "grams", 111_000)])
def test_a_blocked_run_keeps_its_tensors_within_max_memory(monkeypatch, measure, route, budget):
    n, shape = ROUTES[route]
    feats = zoo_features(k=8, n=n, shape=shape)
    planned = blocks_of(monkeypatch)
    with Allocations() as unblocked:
        _pairwise.pairwise_similarity(feats, measure=measure, progress=False)
    with Allocations() as blocked:
        _pairwise.pairwise_similarity(feats, measure=measure, progress=False, max_memory=budget)
    assert len(planned[-1]) >= 3
    assert 0 < blocked.peak <= budget and blocked.peak < unblocked.peak  # the blocks, not all models, at once


@pytest.mark.parametrize("measure,route", [("cka", "features"), ("cka", "grams"), ("procrustes", "grams")])
def test_max_memory_below_one_block_is_refused_before_any_work(measure, route):
    n, shape = ROUTES[route]
    feats = zoo_features(k=4, n=n, shape=shape)
    with Allocations() as allocated, \
            pytest.raises(ValueError, match=r"max_memory allows .*reduce the probe size \(N = \d+ samples\)"):
        _pairwise.pairwise_similarity(feats, measure=measure, progress=False, max_memory=1000)
    assert allocated.largest <= 8  # nothing but the input checks' scalars
    for bad in (0, -5, "1G", True):
        with pytest.raises(ValueError, match="max_memory must be a positive number of bytes"):
            _pairwise.pairwise_similarity(feats, measure=measure, progress=False, max_memory=bad)


@pytest.mark.parametrize("measure", ["cka", "procrustes"])
def test_a_blocked_run_counts_each_model_once_on_its_bar(capsys, measure):
    _pairwise.pairwise_similarity(zoo_features(k=7, n=10, shape=(5, 3, 3)), measure=measure, progress=True,
                          max_memory=40_000 if measure == "cka" else 150_000)
    err = capsys.readouterr().err
    assert f"pairwise {measure}" in err and "7/7" in err and "8/7" not in err


def test_the_cache_keeps_the_grams_only_when_they_all_fit():
    torch.manual_seed(0)
    models = {f"cnn{i}": cnn().double() for i in range(6)}
    x = torch.randn(24, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grams = lambda cache: [key for key in cache.entries if len(key) > 2]  # noqa: E731 (n, layers, layer, options)
    fits, tight = zoo.ActivationCache(), zoo.ActivationCache()
    whole = zoo.pair_metrics(models, None, x, ["3"], ("cka:kernel=max",), cache=fits, progress=False)
    blocked = zoo.pair_metrics(models, None, x, ["3"], ("cka:kernel=max",), cache=tight, progress=False,
                               max_memory=30_000)
    assert len(grams(fits)) == 6 and grams(tight) == []
    np.testing.assert_allclose(blocked["value"], whole["value"], rtol=0, atol=1e-12)


@pytest.mark.parametrize("measure", ["cka", "procrustes"])
def test_a_max_memory_above_the_free_memory_is_refused(monkeypatch, measure):
    from spectral_ext import _checks

    feats = zoo_features(k=4, n=10, shape=(5, 3, 3))
    monkeypatch.setattr(_checks, "free_memory", lambda device: 4096)
    with pytest.raises(ValueError, match=r"GiB are free on cpu: reduce the probe size \(N = 10"):
        _pairwise.pairwise_similarity(feats, measure=measure, progress=False, max_memory=2 ** 30)
    with pytest.raises(ValueError, match="max_memory allows 2.0 KiB"):  # the default: half the free memory
        _pairwise.pairwise_similarity(feats, measure=measure, progress=False)


@pytest.mark.parametrize("measure", ["cka", "procrustes"])
def test_no_pairs_is_an_empty_table(measure):
    frame = _pairwise.pairwise_similarity(zoo_features(k=3), [], measure=measure, progress=False).to_frame()
    assert len(frame) == 0 and list(frame.columns) == ["model_a", "model_b", "measure", "value"]


def test_a_rows_last_column_block_is_kept_as_the_next_row_block(monkeypatch):
    feats = zoo_features(k=7, n=10, shape=(5, 3, 3))
    planned = blocks_of(monkeypatch)
    grams, gram = [], _pairwise._gram
    monkeypatch.setattr(_pairwise, "_gram", lambda *a: grams.append(1) or gram(*a))
    _pairwise.pairwise_similarity(feats, progress=False, max_memory=9_000)
    blocks = planned[-1]
    naive = sum(len(block) * (1 + p) for p, block in enumerate(blocks))  # each row once, each later block per row
    assert len(blocks) >= 3 and len(grams) == naive - sum(len(block) for block in blocks[1:])
