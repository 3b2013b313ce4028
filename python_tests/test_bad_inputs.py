"""Issue 14 (items 4 and 18 and its closing paragraph): every public function
on its bad inputs raises a TypeError or ValueError whose message names the
argument, before any silent wrong number, crash or StopIteration."""
import importlib
import re

import pytest
import torch
from torch import nn

import spectral_ext as se

rank = importlib.import_module("spectral_ext.rank")
signals_module = importlib.import_module("spectral_ext.receptive_fields")
covariance = importlib.import_module("spectral_ext.covariance")
symmetry = importlib.import_module("spectral_ext.symmetry")

NAN = float("nan")


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


def mlp(width=5, out=3):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, width), nn.ReLU(), nn.Linear(width, out))


X = torch.randn(12, 3, 6, 6, generator=torch.Generator().manual_seed(1))
Y = torch.arange(12) % 3
F = torch.randn(20, 5, generator=torch.Generator().manual_seed(2))
L = torch.arange(20) % 3
EMPTY = torch.empty(0, 3, 6, 6)
DICTS = [{"x": X, "y": Y}]
C = torch.eye(4, dtype=torch.float64)
V1, S1 = torch.ones(1, 1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
IMAGE = torch.ones(1, 1, 2, 2, dtype=torch.float64)

# (id, call, exception type, the argument the message must name)
CASES = [
    # --- 14.4: numeric arguments (range, integrality, shape agreement) ---
    ("signal_projection padding overflowing int64",
     lambda: se.signal_projection(IMAGE, V1, S1, padding=2 ** 31, reduce="mean"), ValueError, "padding"),
    ("signal_projection padding beyond int64", lambda: se.signal_projection(IMAGE, V1, S1, padding=2 ** 70),
     ValueError, "padding"),
    ("signal_projection stride beyond int64", lambda: se.signal_projection(IMAGE, V1, S1, stride=2 ** 64),
     ValueError, "stride"),
    ("align cov_a of the wrong shape", lambda: se.align(torch.ones(4, 3, dtype=torch.float64), C[:3, :3], C[:3, :3]),
     ValueError, "cov_a"),
    ("align cov_b of the wrong shape", lambda: se.align(torch.ones(4, 3, dtype=torch.float64), C, C),
     ValueError, "cov_b"),
    ("align only cov_a", lambda: se.align(C, C), ValueError, "cov_b"),
    ("clip ks not integral", lambda: se.clip(cnn(), "3", (X, Y), ks=[2.7], progress=False), TypeError, "ks"),
    ("clip ks negative", lambda: se.clip(cnn(), "3", (X, Y), ks=[-1], progress=False), ValueError, "ks"),
    ("clip ks empty", lambda: se.clip(cnn(), "3", (X, Y), ks=[], progress=False), ValueError, "ks"),
    ("clip ks beyond the features", lambda: se.clip(cnn(), "3", (X, Y), ks=[65], progress=False), ValueError, "ks"),
    ("clip covariance of the wrong size", lambda: se.clip(cnn(), "3", (X, Y), ks=[1], covariance=C, progress=False),
     ValueError, "covariance"),
    ("clip max_copies zero", lambda: se.clip(cnn(), "3", (X, Y), ks=[1], max_copies=0, progress=False),
     ValueError, "max_copies"),
    ("hypergraph threshold nan", lambda: se.hypergraph(F.abs(), L, threshold=NAN), ValueError, "threshold"),
    ("hypergraph threshold string", lambda: se.hypergraph(F.abs(), L, threshold="0.5"), TypeError, "threshold"),
    ("hypergraph q nan", lambda: se.hypergraph(F.abs(), L, q=NAN), ValueError, "q"),
    ("hypergraph q one", lambda: se.hypergraph(F.abs(), L, q=1.0), ValueError, "q"),
    ("hypergraph p zero", lambda: se.hypergraph(F.abs(), L, p=0), ValueError, "p"),
    ("hypergraph float labels", lambda: se.hypergraph(F.abs(), L.double()), TypeError, "labels"),
    ("hypergraph labels of another length", lambda: se.hypergraph(F.abs(), L[:5]), ValueError, "labels"),
    ("hypergraph empty vectors", lambda: se.hypergraph(F[:0], L[:0]), ValueError, "vectors"),
    ("hypergraph class_names too short", lambda: se.hypergraph(F.abs(), L, class_names=["a"]), ValueError,
     "class_names"),
    ("numerical_rank eps nan", lambda: se.numerical_rank(C, eps=NAN), ValueError, "eps"),
    ("numerical_rank eps string", lambda: se.numerical_rank(C, eps="1e-3"), TypeError, "eps"),
    ("perturbed scale zero", lambda: se.perturbed_pca_dimension(mlp(), None, F[:1], scale=0, progress=False),
     ValueError, "scale"),
    ("perturbed n_perturbations float", lambda: se.perturbed_pca_dimension(mlp(), None, F[:1], n_perturbations=10.5,
                                                                           progress=False), TypeError,
     "n_perturbations"),
    ("perturbed empty data", lambda: se.perturbed_pca_dimension(mlp(), None, F[:0], progress=False), ValueError, "data"),
    ("jacobian chunk_size zero", lambda: se.jacobian_partial_rank(mlp(), None, F[:1], chunk_size=0, progress=False),
     ValueError, "chunk_size"),
    ("jacobian at unknown", lambda: se.jacobian_partial_rank(mlp(), None, F[:1], at="edge", progress=False),
     ValueError, "at"),
    ("jacobian rank_of unknown", lambda: se.jacobian_partial_rank(mlp(), None, F[:1], rank_of="trace", progress=False),
     ValueError, "rank_of"),
    ("jacobian empty data", lambda: se.jacobian_partial_rank(mlp(), None, F[:0], progress=False), ValueError, "data"),
    ("classification ratio nan", lambda: se.classification_dimension(nn.Linear(5, 3), (F, L), ratio=NAN),
     ValueError, "ratio"),
    ("independence eta negative", lambda: se.independence_deficit((F, L), eta=-1), ValueError, "eta"),
    ("independence tol zero", lambda: se.independence_deficit((F, L), tol=0), ValueError, "tol"),
    ("mlp_rank_decay ks float", lambda: rank.mlp_rank_decay(depth=2, width=4, ks=[1.5], progress=False),
     TypeError, "ks"),
    ("projection_accuracy ks beyond d", lambda: rank.projection_accuracy(nn.Linear(5, 3), (F, L), ks=[6]),
     ValueError, "ks"),
    ("exemplary_images target float", lambda: signals_module.exemplary_images(cnn(), "3", X, [1.5], progress=False),
     TypeError, "targets"),
    ("exemplary_images k zero", lambda: signals_module.exemplary_images(cnn(), "3", X, [1], k=0, progress=False),
     ValueError, "k"),
    ("feature_visualization steps negative", lambda: signals_module.feature_visualization(cnn(), "0", 0, (3, 6, 6),
                                                                                          steps=-1, progress=False),
     ValueError, "steps"),
    ("feature_visualization lr nan", lambda: signals_module.feature_visualization(cnn(), "0", 0, (3, 6, 6), lr=NAN,
                                                                                  progress=False), ValueError, "lr"),
    ("feature_visualization shape of two", lambda: signals_module.feature_visualization(cnn(), "0", 0, (6, 6),
                                                                                        progress=False),
     ValueError, "shape"),
    ("feature_visualization node float", lambda: signals_module.feature_visualization(cnn(), "0", [0.5], (3, 6, 6),
                                                                                      progress=False),
     TypeError, "nodes"),
    ("marchenko_pastur variance zero", lambda: covariance.marchenko_pastur_edges(10, 5, 0.0), ValueError,
     "variance"),
    ("weight_spectra variance unknown", lambda: covariance.weight_spectra(mlp(), variance="mp"), ValueError,
     "variance"),
    ("stability shapes disagree", lambda: covariance.stability(C, C[:, :3]), ValueError, "E2"),
    ("activation_covariance dtype", lambda: se.activation_covariance(cnn(), None, ["3"], X, dtype=torch.int64,
                                                                     progress=False), TypeError, "dtype"),
    ("activation_covariance batch_size", lambda: se.activation_covariance(cnn(), None, ["3"], X, batch_size=0,
                                                                          progress=False), ValueError, "batch_size"),
    ("rainbow generator float", lambda: se.rainbow(mlp(), (F, L), generator=0.5, progress=False), TypeError,
     "generator"),
    ("intertwiner negative_slope nan", lambda: se.intertwiner_group("leaky_relu", negative_slope=NAN), ValueError,
     "negative_slope"),
    ("apply_symmetry rtol negative", lambda: se.apply_symmetry(mlp(), rtol=-1), ValueError, "rtol"),
    ("rotation_penalty dict data", lambda: symmetry.rotation_penalty(mlp(), "0", [{"x": F}], (F, L),
                                                                     progress=False), TypeError, "data"),
    ("rotation_penalty lr zero", lambda: symmetry.rotation_penalty(mlp(), "0", (F, L), (F, L), lr=0,
                                                                   progress=False), ValueError, "lr"),
    # --- 14.18: unclear errors made clear ---
    ("svr p string", lambda: se.svr(mlp(), p="0.1"), TypeError, "p"),
    ("svr p one", lambda: se.svr(mlp(), p=1.0), ValueError, "p"),
    ("svr dtype float16", lambda: se.svr(mlp(), dtype=torch.float16), ValueError, "dtype"),
    ("svr Linear(5, 0)", lambda: se.svr(mlp(width=0)), ValueError, "zero-size"),
    ("signals empty tensor", lambda: se.signals(cnn(), "3", EMPTY, progress=False), ValueError, "data"),
    ("signals empty loader", lambda: se.signals(cnn(), "3", [], progress=False), ValueError, "data"),
    ("signals dict loader", lambda: se.signals(cnn(), "3", DICTS, progress=False), TypeError, "data"),
    ("signals not data", lambda: se.signals(cnn(), "3", 3, progress=False), TypeError, "data"),
    ("hypergraph from an empty loader", lambda: se.hypergraph(*signals_module.signal_vectors(cnn(), ["3"], [],
                                                                                            progress=False)),
     ValueError, "data"),
    ("signal_vectors dict loader", lambda: signals_module.signal_vectors(cnn(), ["3"], DICTS, progress=False),
     TypeError, "data"),
    ("activation_covariance empty loader", lambda: se.activation_covariance(cnn(), None, ["3"], [], progress=False),
     ValueError, "data"),
    ("activation_covariance empty tensor", lambda: se.activation_covariance(cnn(), None, ["3"], EMPTY, progress=False),
     ValueError, "data"),
    ("activation_covariance dict loader", lambda: se.activation_covariance(cnn(), None, ["3"], DICTS, progress=False),
     TypeError, "data"),
    ("similarity_matrix empty data", lambda: se.similarity_matrix(cnn(), cnn(), ["3"], [], progress=False),
     ValueError, "data"),
    ("similarity_matrix dict data", lambda: se.similarity_matrix(cnn(), cnn(), ["3"], DICTS, progress=False),
     TypeError, "data"),
    ("rainbow empty data", lambda: se.rainbow(mlp(), [], progress=False), ValueError, "data"),
    ("rainbow dict data", lambda: se.rainbow(mlp(), [{"x": F}], progress=False), TypeError, "data"),
    ("rainbow test labels out of range", lambda: se.rainbow(mlp(), (F, L), (F, L + 3), progress=False),
     ValueError, "test_data"),
    ("stitch empty data", lambda: se.stitch(cnn(), cnn(), "1", [], progress=False), ValueError, "data"),
    ("stitch dict data", lambda: se.stitch(cnn(), cnn(), "1", DICTS, progress=False), TypeError, "data"),
    ("stitch data without labels", lambda: se.stitch(cnn(), cnn(), "1", X, progress=False), ValueError, "data"),
    ("stitch labels out of range", lambda: se.stitch(cnn(), cnn(), "1", (X, Y + 3), epochs=1, progress=False),
     ValueError, "data"),
    ("stitch negative labels", lambda: se.stitch(cnn(), cnn(), "1", (X, Y - 1), epochs=1, progress=False),
     ValueError, "data"),
    ("stitch test labels out of range", lambda: se.stitch(cnn(), cnn(), "1", (X, Y), (X, Y + 3), epochs=1,
                                                          progress=False), ValueError, "test_data"),
    ("clip labels out of range", lambda: se.clip(cnn(), "3", (X, Y + 3), ks=[1], progress=False), ValueError, "data"),
    ("clip data without labels", lambda: se.clip(cnn(), "3", X, ks=[1], progress=False), ValueError, "data"),
    ("classification_dimension mismatched classifier", lambda: se.classification_dimension(nn.Linear(4, 3), (F, L)),
     ValueError, "classifier"),
    ("classification_dimension classifier not callable", lambda: se.classification_dimension("head", (F, L)),
     TypeError, "classifier"),
    ("classification_dimension labels beyond the classifier", lambda: se.classification_dimension(
        nn.Linear(5, 3), (F, L + 3)), ValueError, "labels"),
    ("independence_deficit names logits", lambda: se.independence_deficit((F[:, :1].squeeze(1), L)), ValueError,
     "logits"),
    ("independence_deficit data rows", lambda: se.independence_deficit((F, L[:5])), ValueError, "data"),
    # --- issue 27: silent answers refused ---
    ("activation_covariance NaN data", lambda: se.activation_covariance(
        cnn(), None, ["3"], X.index_fill(0, torch.tensor([5]), NAN), progress=False), ValueError, "data"),
    ("activation_covariance inf in a loader", lambda: se.activation_covariance(
        cnn(), None, ["3"], [X[:4], X[4:].clone().fill_(float("inf"))], progress=False), ValueError, "data"),
    ("activation_covariance overflow in the model", lambda: se.activation_covariance(
        _scaled(cnn(), 1e30), None, ["3"], X * 1e30, progress=False), ValueError, "layer 3"),
    ("apply_symmetry ConvTranspose", lambda: se.apply_symmetry(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.ConvTranspose2d(4, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1)),
        example_input=X[:2], progress=False), ValueError, "ConvTranspose2d"),
    ("apply_symmetry LSTM", lambda: se.apply_symmetry(_LSTMHead(), example_input=F[:4, None], progress=False),
     ValueError, "LSTM"),
    ("apply_symmetry spectral_norm", lambda: se.apply_symmetry(
        nn.Sequential(nn.utils.parametrizations.spectral_norm(nn.Linear(5, 4)), nn.ReLU(), nn.Linear(4, 2)),
        progress=False), ValueError, "parametrized"),
    ("stitching_penalty above one", lambda: se.stitching_penalty(0.9, 1.5, 0.8), ValueError, "accuracy_b"),
    ("stitching_penalty NaN", lambda: se.stitching_penalty(0.9, 0.9, NAN), ValueError, "accuracy_stitched"),
    ("stitching_penalty negative", lambda: se.stitching_penalty(-0.1, 0.9, 0.5), ValueError, "accuracy_a"),
    ("stitch lr NaN", lambda: se.stitch(cnn(), cnn(), "1", (X, Y), lr=NAN, progress=False), ValueError, "lr"),
    ("stitch lr negative", lambda: se.stitch(cnn(), cnn(), "1", (X, Y), lr=-1, progress=False), ValueError, "lr"),
    ("stitch momentum one", lambda: se.stitch(cnn(), cnn(), "1", (X, Y), momentum=1, progress=False), ValueError,
     "momentum"),
    ("stitch tau zero", lambda: se.stitch(cnn(), cnn(), "1", (X, Y), kind="softsort", tau=0, progress=False),
     ValueError, "tau"),
    ("hypergraph negative labels", lambda: se.hypergraph(F, L - 1), ValueError, "labels"),
    ("rainbow float labels", lambda: se.rainbow(mlp(), (F, L.double()), progress=False), ValueError, "labels"),
    ("rainbow negative labels", lambda: se.rainbow(mlp(), (F, L - 1), progress=False), ValueError, "labels"),
    ("classification_dimension center string", lambda: se.classification_dimension(nn.Linear(5, 3), (F, L),
                                                                                  center="no"),
     TypeError, "center"),
    # --- issue 27: the probe's findings (scripts/probe.py) ---
    ("weight_singular_values complex", lambda: se.weight_singular_values(torch.complex(W5, W5)), TypeError,
     "weights"),
    ("weight_singular_values list", lambda: se.weight_singular_values(W5.tolist()), TypeError, "weights"),
    ("weight_singular_values 1-d", lambda: se.weight_singular_values(torch.randn(5)), ValueError, "weights"),
    ("weight_singular_values empty", lambda: se.weight_singular_values(torch.randn(0, 4, 3)), ValueError, "weights"),
    ("weight_singular_values meta", lambda: se.weight_singular_values(W5.to("meta")), ValueError, "weights"),
    ("fit_power_law string", lambda: se.fit_power_law("abc"), TypeError, "eigenvalues"),
    ("fit_power_law None", lambda: se.fit_power_law(None), TypeError, "eigenvalues"),
    ("cka rbf bandwidth negative", lambda: se.cka(F, F[:, :3], kernel="rbf", bandwidth=-1.0), ValueError,
     "bandwidth"),
    ("cka rbf bandwidth zero", lambda: se.cka(F, F[:, :3], kernel="rbf", bandwidth=0.0), ValueError, "bandwidth"),
    ("cka rbf bandwidth NaN", lambda: se.cka(F, F[:, :3], kernel="rbf", bandwidth=NAN), ValueError, "bandwidth"),
    ("cka laplace gamma negative", lambda: se.cka(F, F[:, :3], kernel="laplace", gamma=-1.0), ValueError, "gamma"),
    ("cka laplace gamma NaN", lambda: se.cka(F, F[:, :3], kernel="laplace", gamma=NAN), ValueError, "gamma"),
    ("cka rbf given gamma", lambda: se.cka(F, F[:, :3], kernel="rbf", gamma=1.0), ValueError, "gamma"),
    ("discover empty example_input", lambda: se.discover(mlp(), torch.randn(0, 5)), ValueError, "example_input"),
    ("discover two inputs for one", lambda: se.discover(mlp(), (F, F)), ValueError, "example_input"),
    ("svr empty example_input", lambda: se.svr(mlp(), torch.randn(0, 5)), ValueError, "example_input"),
    ("apply_symmetry None", lambda: se.apply_symmetry(None, example_input=F), TypeError, "model"),
    ("semantic_hierarchy string", lambda: se.semantic_hierarchy("abc"), TypeError, "h"),
    ("svr_many None", lambda: se.svr_many(None, F), TypeError, "models"),
    ("spectral_activations svr None", lambda: se.spectral_activations(mlp(), None, None, F), TypeError, "svr"),
    ("sobel_similarity string", lambda: se.sobel_similarity("abc", IMAGE), TypeError, "spectral_images"),
    ("activation_covariance data too wide", lambda: se.activation_covariance(mlp(), None, ["0"], torch.randn(8, 7),
                                                                             progress=False), ValueError, "data"),
    ("activation_covariance integer data", lambda: se.activation_covariance(mlp(), None, ["0"], F.long(),
                                                                            progress=False), ValueError, "data"),
    ("numerical_rank meta", lambda: se.numerical_rank(torch.randn(6, 5, device="meta")), ValueError, "W"),
    ("hypergraph meta labels", lambda: se.hypergraph(F, L.to("meta")), ValueError, "labels"),
    ("intertwiner_group of a Linear", lambda: se.intertwiner_group(nn.Linear(3, 3)), ValueError, "activation"),
    ("independence_deficit overflowing logits", lambda: se.independence_deficit((F.double() * 1e300, L)),
     ValueError, "logits"),
    ("pairwise_similarity meta features", lambda: se.pairwise_similarity({"a": F.to("meta"), "b": F}), ValueError,
     "features"),
    ("zoo.analyze None", lambda: se.zoo.analyze(None), ValueError, "source"),
    ("signal_projection V requiring grad", lambda: se.signal_projection(
        IMAGE, torch.ones(4, 1, dtype=torch.float64, requires_grad=True), S1, padding=0), ValueError, "V"),
]

W5 = torch.randn(2, 4, 3, 2, 2, generator=torch.Generator().manual_seed(3))


def test_a_list_of_eigenvalues_is_read_in_float64():
    """torch.as_tensor reads a list of floats in float32: the fit of the list must be the tensor's."""
    x = se.spectra.sample_power_law(2.5, 1.0, 500, torch.Generator().manual_seed(0))
    assert se.fit_power_law(x.tolist()) == se.fit_power_law(x)
    assert se.fit_power_laws(torch.stack([x, x]).tolist()).to_frame().equals(
        se.fit_power_laws(torch.stack([x, x])).to_frame())


def test_every_weight_of_a_module_has_a_row():
    """layer_spectra of an LSTM classifier: the LSTM's matrices have rows saying why they have no numbers."""
    class LSTMNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm, self.fc = nn.LSTM(6, 8, batch_first=True), nn.Linear(8, 3)

    frame = se.layer_spectra(LSTMNet()).to_frame()
    assert frame["layer"].tolist() == ["lstm.weight_ih_l0", "lstm.weight_hh_l0", "fc"]
    assert frame.loc[:1, "note"].str.contains("LSTM parameter").all()
    assert len(se.layer_spectra(nn.LSTM(6, 8), vectors=True).to_frame()) == 4


def _scaled(model, factor):
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(factor)
    return model


class _LSTMHead(nn.Module):
    """A Linear, an LSTM and a Linear: weights apply_symmetry cannot transform."""

    def __init__(self):
        super().__init__()
        self.inp, self.lstm, self.out = nn.Linear(5, 6), nn.LSTM(6, 6, batch_first=True), nn.Linear(6, 3)

    def forward(self, x):
        return self.out(self.lstm(torch.relu(self.inp(x)))[0][:, -1])


@pytest.mark.parametrize("call,error,argument", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input_is_refused_naming_the_argument(call, error, argument):
    with pytest.raises(error) as raised:
        call()
    assert re.search(rf"(?<![A-Za-z_]){re.escape(argument)}(?![A-Za-z_])", str(raised.value)), str(raised.value)


def test_every_case_id_is_unique():
    ids = [case[0] for case in CASES]
    assert len(ids) == len(set(ids))


def test_half_precision_models_are_computed_in_float32_with_a_warning():
    """svr on float16/bfloat16 weights: a warning, then the float32 SVR of the
    rounded weights (the same numbers as converting the model first)."""
    for dtype in (torch.float16, torch.bfloat16):
        model = mlp().to(dtype)
        with pytest.warns(RuntimeWarning, match="float32"):
            result = se.svr(model)
        expected = se.svr(mlp().to(dtype).float())
        torch.testing.assert_close(result.adjacency(0), expected.adjacency(0))
        assert result.adjacency(0).dtype == torch.float32


def test_a_padding_below_the_limit_is_exact():
    """A large padding that stays in range: the mean over (2 + 2p)^2 positions
    of the one non-zero tap sum (4 ones) is exact."""
    p = 10 ** 6
    out = se.signal_projection(IMAGE, V1, S1, padding=p, reduce="mean")
    assert float(out) == pytest.approx(4 / (2 + 2 * p) ** 2, rel=1e-12)


def test_a_list_of_two_tensors_is_two_batches_not_inputs_and_labels():
    """[X1, X2] is a list of batches (every sample read); only a tuple is (inputs, labels)."""
    from spectral_ext._data import batches

    X = torch.randn(24, 3)
    read = list(batches([X[:12], X[12:]]))
    assert [tuple(x.shape) for x, _ in read] == [(12, 3), (12, 3)] and all(y is None for _, y in read)
    torch.testing.assert_close(torch.cat([x for x, _ in read]), X)
    (x, y), = list(batches((X[:12], torch.arange(12))))
    assert x.shape == (12, 3) and y.shape == (12,)
