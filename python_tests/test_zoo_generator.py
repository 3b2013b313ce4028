"""The digits model zoo generator: hyperparameter draws as the Small CNN Zoo,
stacked training equal to per-model PyTorch, checkpoints that reload to the
recorded accuracies, resumable by group of models, and the manifest that
makes `spectral-ext zoo OUT` need no other argument."""
import json
import math

import pandas as pd
import pytest
import torch

import spectral_ext
from spectral_ext import datasets, zoo
from spectral_ext.zoo import generator as zg


@pytest.fixture(scope="module")
def small_zoo(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits_zoo")
    result = zg.make_digits_zoo(out, n=10, epochs=2, checkpoints=(0, 2), group_size=5, progress=False)
    assert isinstance(result, zoo.DigitsZoo) and result.folder == out
    assert result.manifest == json.loads((out / "zoo.json").read_text())
    assert result.to_frame() is result.table
    return out, result.to_frame()


def test_the_generator_is_reached_from_the_package():
    assert spectral_ext.make_digits_zoo is zoo.make_digits_zoo is zg.make_digits_zoo


def test_hyperparameter_draws_follow_the_zoo():
    draws = pd.DataFrame([zg.draw_hyperparameters(i, seed=3) for i in range(400)])
    assert draws.equals(pd.DataFrame([zg.draw_hyperparameters(i, seed=3) for i in range(400)]))  # a function of (seed, i)
    assert not draws.equals(pd.DataFrame([zg.draw_hyperparameters(i, seed=4) for i in range(400)]))
    for name, (low, high) in zg.RANGES.items():
        assert draws[name].between(low, high).all(), name
    for name, choices in (("optimizer", zg.OPTIMIZERS), ("w_init", zg.INITS), ("activation", zg.ACTIVATIONS)):
        counts = draws[name].value_counts()
        assert set(counts.index) == set(choices)
        assert counts.min() > 400 / len(choices) / 2  # roughly uniform
    # Log-uniform: half the draws below the geometric mean of the range (not the arithmetic one).
    for name in ("learning_rate", "l2reg", "init_std"):
        low, high = zg.RANGES[name]
        below = (draws[name] < math.sqrt(low * high)).mean()
        assert 0.4 < below < 0.6, name
    assert draws["seed"].is_unique


def test_small_cnn_has_the_zoo_shape():
    model = zg.small_cnn()
    assert sum(p.numel() for p in model.parameters()) == 4970  # the Small CNN Zoo's count for 1-channel input
    convs = [m for m in model if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size, c.stride) for c in convs] == [(16, (3, 3), (2, 2))] * 3
    state = zg.small_cnn("tanh").state_dict()
    reloaded = zg.small_cnn()  # the factory's default is relu: the buffer switches it
    reloaded.load_state_dict(state)
    assert reloaded.activation == "tanh" and isinstance(reloaded[1], torch.nn.Tanh)
    with pytest.raises(ValueError, match="activation"):
        zg.small_cnn("gelu")


@pytest.mark.parametrize("kind", ["adam", "rmsprop", "sgd"])
def test_stacked_optimizer_equals_torch_optim(kind):
    torch.manual_seed(0)
    lr = torch.tensor([1e-2, 3e-3, 5e-2])
    start = torch.randn(3, 4, 5)
    stacked = {"w": start.clone()}
    opt = zg._StackedOptimizer(stacked, lr, [kind] * 3)
    singles = [start[i].clone().requires_grad_(True) for i in range(3)]
    make = {"adam": lambda p, r: torch.optim.Adam([p], lr=r, eps=1e-7),
            "rmsprop": lambda p, r: torch.optim.RMSprop([p], lr=r, alpha=0.9, eps=1e-7),
            "sgd": lambda p, r: torch.optim.SGD([p], lr=r)}[kind]
    torch_opts = [make(p, float(r)) for p, r in zip(singles, lr)]
    for step in range(6):
        grads = torch.randn(3, 4, 5)
        active = torch.tensor([True, step % 2 == 0, step < 3])  # models whose epoch is over skip steps
        opt.step({"w": grads}, active)
        for i in range(3):
            if active[i]:
                singles[i].grad = grads[i].clone()
                torch_opts[i].step()
    for i in range(3):
        torch.testing.assert_close(stacked["w"][i], singles[i].detach(), rtol=1e-5, atol=1e-6)


def test_stacked_forward_equals_each_model():
    hyper = [zg.draw_hyperparameters(i) for i in range(6)]
    hyper = [h for h in hyper if h["activation"] == hyper[0]["activation"]]
    states = [zg._init_model(h) for h in hyper]
    params = {k: torch.stack([s[k] for s in states]) for k in zg.KEYS}
    x = datasets.digits()[2][:20]
    with torch.no_grad():
        logits = zg._forward(params, x, hyper[0]["activation"])
        for j, state in enumerate(states):
            model = zg.small_cnn()
            model.load_state_dict(state)
            torch.testing.assert_close(logits[:, j], model(x), rtol=1e-4, atol=1e-5)


def test_checkpoints_and_metadata_agree(small_zoo):
    out, table = small_zoo
    assert len(table) == 10 * 2 and set(table["epoch"]) == {0, 2}
    pd.testing.assert_frame_equal(pd.read_parquet(out / "metadata.parquet"), table)
    csv = pd.read_csv(out / "metadata.csv")
    assert list(csv.columns) == list(table.columns) and len(csv) == len(table)
    for column in zg.HYPERPARAMETERS + ("epoch", "train_accuracy", "test_accuracy", "train_loss", "test_loss"):
        assert column in table
    _, _, x_test, y_test = datasets.digits()
    for row in table.itertuples():
        assert row.model == f"{row.run}_e{row.epoch:03d}"
        assert {k: getattr(row, k) for k in zg.HYPERPARAMETERS} == zg.draw_hyperparameters(row.index)
        model = zoo.load_member(out / row.checkpoint, zg.small_cnn)  # the analysis' own loader
        assert model.activation == row.activation
        with torch.no_grad():
            logits = model(x_test)
        assert abs(datasets.accuracy(model, (x_test, y_test)) - row.test_accuracy) <= 1 / len(y_test)
        assert float(torch.nn.functional.cross_entropy(logits, y_test)) == pytest.approx(row.test_loss, rel=1e-4)
        if row.epoch == 0:  # the initialisation, exactly as drawn
            initial = zg._init_model(zg.draw_hyperparameters(row.index))
            for key in zg.KEYS:
                torch.testing.assert_close(model.state_dict()[key], initial[key])
    trained = table[table["epoch"] == 2].set_index("run")["test_loss"]
    initial = table[table["epoch"] == 0].set_index("run")["test_loss"]
    assert (trained < initial).mean() > 0.5  # most models learn something in two epochs


def test_manifest_makes_the_zoo_self_describing(small_zoo, tmp_path):
    out, table = small_zoo
    manifest = json.loads((out / "zoo.json").read_text())
    assert manifest["arch"] == "spectral_ext.zoo.generator:small_cnn" and manifest["complete"]
    assert (out / manifest["metadata"]).exists() and (out / manifest["checkpoints"]).is_dir()
    tables = zoo.analyze(out, metrics=("rank", "alpha"), progress=False)  # no arch, no metadata
    assert sorted(tables["models"]["model"].map(lambda n: n.rsplit("/", 1)[-1].split(".")[0])) == sorted(table["model"])
    assert (tables["models"]["error"].fillna("") == "").all()
    # a zoo made before 0.2.0 names the factory by its former module: read as the same function
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "zoo.json").write_text(json.dumps(dict(manifest, arch="spectral_ext.zoo_generator:small_cnn")))
    assert zoo.read_manifest(tmp_path / "old")["arch"] == "spectral_ext.zoo.generator:small_cnn"
    assert zoo.manifest_defaults(tmp_path / "old")[1] is zg.small_cnn
    (tmp_path / "zoo.json").write_text("{not json")
    with pytest.raises(zoo.ZooError, match="not valid JSON"):
        zoo.analyze(tmp_path, progress=False)


def test_learning_and_failure_are_both_realistic():
    """A well-set model learns digits in a few epochs; SGD with a tiny
    learning rate and a tiny init stays near chance, as in the zoo's tail."""
    x_train, y_train, x_test, y_test = datasets.digits()
    good = dict(zg.draw_hyperparameters(0), learning_rate=5e-3, optimizer="adam", w_init="he_normal", dropout=0.0,
                l2reg=1e-6, train_fraction=1.0, activation="relu")
    bad = dict(good, seed=good["seed"] + 1, learning_rate=5e-4, optimizer="sgd", w_init="normal", init_std=1e-3)
    *_, (epoch, _, rows) = zg.train_population([good, bad], x_train, y_train, x_test, y_test, epochs=6,
                                               checkpoints=(6,))
    assert rows[0]["test_accuracy"] > 0.75
    assert rows[1]["test_accuracy"] < 0.3


def test_an_interrupted_run_resumes_to_the_same_zoo(tmp_path, monkeypatch):
    settings = dict(n=6, epochs=1, checkpoints=(0, 1), group_size=2, progress=False)
    reference = zg.make_digits_zoo(tmp_path / "whole", **settings)
    original = zg.train_population
    second_group = {zg.draw_hyperparameters(i)["seed"] for i in (2, 3)}

    def killed_in_the_second_group(hyper, *args, **kwargs):
        if any(h["seed"] in second_group for h in hyper):
            raise KeyboardInterrupt  # killed while training models 2 and 3
        yield from original(hyper, *args, **kwargs)

    monkeypatch.setattr(zg, "train_population", killed_in_the_second_group)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        zg.make_digits_zoo(out, **settings)
    assert sorted(p.name for p in (out / ".groups").iterdir()) == ["00000.parquet"]
    assert not (out / "metadata.parquet").exists()
    trained = []

    def counting(hyper, *args, **kwargs):
        trained.extend(h["seed"] for h in hyper)
        yield from original(hyper, *args, **kwargs)

    monkeypatch.setattr(zg, "train_population", counting)
    resumed = zg.make_digits_zoo(out, **settings)
    assert sorted(trained) == sorted(zg.draw_hyperparameters(i)["seed"] for i in range(2, 6))  # group 0 not redone
    pd.testing.assert_frame_equal(resumed.to_frame(), reference.to_frame())  # the same draws, the same training
    from safetensors.torch import load_file

    for name in ("m00003_e001", "m00005_e000"):
        a, b = (load_file(str(p / "checkpoints" / f"{name}.safetensors")) for p in (tmp_path / "whole", out))
        assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="other settings"):
        zg.make_digits_zoo(out, **dict(settings, epochs=2))


def test_bad_arguments_are_named(tmp_path):
    for kwargs, word in (({"n": 0}, "n must"), ({"epochs": -1}, "epochs must"), ({"checkpoints": (0, 5)}, "checkpoints"),
                         ({"group_size": 1.5}, "group_size"), ({"threads": 0}, "threads must be an integer >= 1")):
        with pytest.raises(ValueError, match=word):
            zg.make_digits_zoo(tmp_path / "z", **{"n": 2, "epochs": 1, "checkpoints": (0, 1), **kwargs},
                               progress=False)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="folder"):
        zg.make_digits_zoo(tmp_path / "file", n=2, epochs=1, checkpoints=(1,), progress=False)
