"""spectral_ext.compat.weightwatcher against the real WeightWatcher 0.7.7 on
small models, state_dicts and Hugging Face folders (single file, shards with
an index, bf16, shards without an index, pytorch_model.bin), column by column:
the same rows, spectra to 1e-8, fits to the fit's own rounding, the same
summary, describe and get_ESD; the layers it leaves out for their size named
in a warning and analysed with large_layers=True; transformers' Conv1D."""
import contextlib
import io
import json
import os
import warnings
import weakref

import numpy as np
import pytest
import torch
from torch import nn

import weightwatcher as ww  # the peer: a test requirement, never skipped
from spectral_ext.compat import weightwatcher as se_ww


def models():
    torch.manual_seed(0)
    return {
        "cnn": nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 32, (3, 5)), nn.BatchNorm2d(32),
                             nn.Flatten(), nn.Linear(32 * 4, 64), nn.Linear(64, 10)),
        # kernel sizes 1 (too few eigenvalues), 2 (an even kernel with out < in: N < M there), 3, 1x4, 5
        "kernels": nn.Sequential(nn.Conv2d(8, 4, 1), nn.Conv2d(4, 12, 2), nn.Conv2d(12, 6, 3), nn.Conv2d(6, 5, (1, 4)),
                                 nn.Conv2d(5, 20, 5), nn.Conv2d(20, 10, 2)),
        "mlp": nn.Sequential(nn.Linear(30, 50), nn.ReLU(), nn.Linear(50, 25), nn.Linear(25, 3), nn.Embedding(40, 7)),
    }


def real(model, method="analyze", **kwargs):
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        watcher = ww.WeightWatcher(model=model)
        return watcher, getattr(watcher, method)(**kwargs)


def assert_same_frames(expected, got):
    assert list(got.columns) == list(expected.columns)
    assert len(got) == len(expected) and got["layer_id"].tolist() == expected["layer_id"].tolist()
    for column in expected.columns:
        a, b = expected[column].to_numpy(), got[column].to_numpy()
        if a.dtype.kind in "fiub" and b.dtype.kind in "fiub":
            np.testing.assert_allclose(b.astype(float), a.astype(float), rtol=1e-8, atol=1e-12, err_msg=column)
        else:  # None (a failed fit's xmax) beside numbers: the numbers to the same tolerance
            assert [str(v) if isinstance(v, (str, type(None))) else pytest.approx(v, rel=1e-8, abs=1e-12)
                    for v in b] == [str(v) if isinstance(v, (str, type(None))) else v for v in a], column


@pytest.mark.parametrize("name", ["cnn", "kernels", "mlp"])
@pytest.mark.parametrize("kwargs", [{}, {"min_evals": 30}, {"layers": [1, 2]}, {"layers": ["-2"]},
                                    {"conv2d_norm": False}])
def test_analyze_equals_weightwatcher_column_by_column(name, kwargs):
    model = models()[name]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    watcher, expected = real(model, **kwargs)
    mine = se_ww.WeightWatcher(model=model)
    assert_same_frames(expected, mine.analyze(**kwargs))
    summary = mine.get_summary()
    assert summary.keys() == watcher.get_summary().keys()
    assert list(summary.values()) == pytest.approx(list(watcher.get_summary().values()), rel=1e-8)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_mp_fit_and_randomize_equal_weightwatcher_with_one_seed():
    model = models()["kernels"]
    np.random.seed(3)
    _, expected = real(model, mp_fit=True, randomize=True)
    np.random.seed(3)
    got = se_ww.WeightWatcher(model=model).analyze(mp_fit=True, randomize=True)
    assert {"mp_softrank", "sigma_mp", "rand_distance", "num_traps"} <= set(got.columns)
    assert_same_frames(expected, got)


@pytest.mark.parametrize("name", ["cnn", "kernels", "mlp"])
def test_describe_and_get_esd_equal_weightwatcher(name):
    model = models()[name]
    watcher, expected = real(model, "describe")
    mine = se_ww.WeightWatcher(model=model)
    assert_same_frames(expected, mine.describe())
    for layer in expected["layer_id"].tolist() + [expected["name"].iloc[-1]]:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            esd = watcher.get_ESD(layer=layer)
        np.testing.assert_allclose(mine.get_ESD(layer=layer), esd, rtol=1e-8, atol=1e-12)


def test_unreproduced_options_and_bad_input_say_so():
    model = models()["mlp"]
    watcher = se_ww.WeightWatcher(model=model)
    with pytest.raises(ValueError, match="stacked"):
        watcher.analyze(stacked=True)
    with pytest.raises(ValueError, match="glorot_fix"):
        watcher.analyze(glorot_fix=True)
    with pytest.raises(TypeError, match="unexpected argument 'nope'"):
        watcher.analyze(nope=1)
    with pytest.raises(ValueError, match="min_evals"):
        watcher.analyze(min_evals=20, max_evals=10)
    with pytest.raises(ValueError, match="max_N"):
        watcher.describe(max_N=100)  # below max_evals, refused by WeightWatcher too
    with pytest.raises(ValueError, match="all >= 0"):
        watcher.analyze(layers=[1, -2])
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, a state_dict or a model folder"):
        se_ww.WeightWatcher(model=42)
    with pytest.raises(ValueError, match="'resnet' is not a folder"):
        se_ww.WeightWatcher(model="resnet")
    with pytest.warns(UserWarning, match=r"\['0 \(conv1d, 3-d\)'\] are left out"):
        got = se_ww.WeightWatcher(model=nn.Sequential(nn.Conv1d(4, 8, 3), nn.Linear(8, 12))).analyze()
    assert got["name"].tolist() == ["1"]


def test_plot_draws_one_esd_per_layer(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    model = models()["cnn"]
    watcher = se_ww.WeightWatcher(model=model)
    details = watcher.analyze(plot=True, savefig=str(tmp_path)).set_index("layer_id")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"ww.layer{i}.esd.png" for i in details.index]
    for layer_id, fig in watcher.figures.items():
        ax = fig.axes[0]
        assert ax.get_xscale() == "log" and ax.get_xlabel() == "eigenvalue of W W^T"
        assert len(ax.containers[0]) == 39  # the histogram: 39 log-spaced bins over the ESD
        line = ax.get_lines()[0]
        assert line.get_label() == f"alpha = {details.loc[layer_id, 'alpha']:.2f}"
        assert line.get_xdata()[0] == pytest.approx(details.loc[layer_id, "xmin"])


# -- state_dicts, folders and transformers models ---------------------------------------------------------------


def tiny_llama(dtype=torch.float32):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model("llama", hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2, vocab_size=500)
    return transformers.AutoModelForCausalLM.from_config(config).to(dtype)


def tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(1)
    config = transformers.AutoConfig.for_model("gpt2", n_embd=64, n_layer=2, n_head=4, vocab_size=500,
                                               n_positions=128, bos_token_id=0, eos_token_id=0)
    return transformers.AutoModelForCausalLM.from_config(config)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Hugging Face folders as save_pretrained writes them, and the layouts WeightWatcher reads otherwise."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("folders")
    llama = tiny_llama()
    out = {}
    with contextlib.redirect_stderr(io.StringIO()):
        for name, model, kwargs in (("llama", llama, {}), ("llama_shards", llama, {"max_shard_size": "40KB"}),
                                    ("llama_bf16", tiny_llama(torch.bfloat16), {"max_shard_size": "100KB"}),
                                    ("gpt2", tiny_gpt2(), {})):
            model.save_pretrained(root / name, **kwargs)
            out[name] = str(root / name)
    state = {k: v.contiguous() for k, v in llama.state_dict().items()}
    keys = list(state)
    # two files and no index: WeightWatcher reads file by file (its ids restart oddly on the third file)
    (root / "no_index").mkdir()
    for i, part in enumerate((keys[:7], keys[7:15], keys[15:])):
        save_file({k: state[k] for k in part}, str(root / "no_index" / f"model-{i}.safetensors"))
    out["no_index"] = str(root / "no_index")
    (root / "bin").mkdir()
    torch.save(state, root / "bin" / "pytorch_model.bin")
    out["bin"] = str(root / "bin")
    # a CNN's state_dict as one file: 4-d tensors are WeightWatcher's Conv2d slices
    cnn = models()["kernels"]
    (root / "cnn").mkdir()
    save_file({k: v.contiguous() for k, v in cnn.state_dict().items()}, str(root / "cnn" / "model.safetensors"))
    out["cnn"] = str(root / "cnn")
    return out


@pytest.mark.parametrize("name", ["llama", "llama_shards", "llama_bf16", "gpt2", "no_index", "bin", "cnn"])
def test_folders_equal_weightwatcher(folders, name):
    folder = folders[name]
    watcher, expected = real(folder)
    mine = se_ww.WeightWatcher(model=folder)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is left out silently or otherwise here
        got = mine.analyze()
    assert len(got) >= 5
    assert_same_frames(expected, got)
    assert mine.get_summary() == pytest.approx(watcher.get_summary(), rel=1e-8)
    assert_same_frames(real(folder, "describe")[1], mine.describe())
    assert_same_frames(expected, se_ww.WeightWatcher().analyze(model=folder))  # the folder given to analyze
    layer = expected["layer_id"].iloc[-1]
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        esd = watcher.get_ESD(layer=layer)
    np.testing.assert_allclose(mine.get_ESD(layer=layer), esd, rtol=1e-8, atol=1e-12)


def test_layer_order_and_ids_follow_weightwatcher_in_folders(folders):
    shards = se_ww.WeightWatcher(model=folders["llama_shards"]).describe()
    index = json.load(open(os.path.join(folders["llama_shards"], "model.safetensors.index.json")))["weight_map"]
    # shard by shard, in the index's order within each, every ".weight" key (norms too) taking an id
    order = [k[:-len(".weight")] for f in sorted(set(index.values())) for k in index if index[k] == f
             and k.endswith(".weight")]
    assert shards["name"].tolist() == [k for k in order if "norm" not in k]
    assert shards["layer_id"].tolist() == [order.index(k) for k in shards["name"]]
    single = se_ww.WeightWatcher(model=folders["llama"]).describe()
    assert single["name"].tolist() == sorted(single["name"])  # one file: its keys by name
    assert (single["layer_type"] == "dense").all()  # a folder's 2-d weights, embeddings included


def test_state_dict_equals_weightwatcher():
    model = tiny_llama()
    for state in (model.state_dict(), {"state_dict": model.state_dict()}):
        _, expected = real(state)
        assert expected["layer_id"].iloc[0] == 1  # a state_dict's ids start at 1 there
        assert_same_frames(expected, se_ww.WeightWatcher(model=state).analyze())
    _, expected = real(model.state_dict(), start_ids=5)
    assert_same_frames(expected, se_ww.WeightWatcher(model=model.state_dict()).analyze(start_ids=5))


def test_transformers_conv1d_layers_equal_weightwatcher():
    model = tiny_gpt2()
    watcher, expected = real(model)
    assert (expected["layer_type"] == "conv1d").sum() == 8  # c_attn, c_proj, c_fc, c_proj of two blocks
    got = se_ww.WeightWatcher(model=model).analyze()
    assert_same_frames(expected, got)
    assert_same_frames(real(model, "describe")[1], se_ww.WeightWatcher(model=model).describe())


@pytest.mark.parametrize("caps", [{"max_N": 400, "max_evals": 100}, {"max_evals": 40}])
def test_layers_left_out_for_size_are_named_and_analysed_on_request(folders, caps):
    folder = folders["llama"]
    _, expected = real(folder, **caps)
    mine = se_ww.WeightWatcher(model=folder)
    with pytest.warns(se_ww.LayersLeftOutWarning) as record:
        got = mine.analyze(**caps)
    assert_same_frames(expected, got)  # WeightWatcher's rows, no more
    _, everything = real(folder)
    left_out = everything[~everything["layer_id"].isin(expected["layer_id"])]
    assert len(left_out) >= 2
    message = str(record[0].message)
    assert all(f"{i} {n} (" in message for i, n in zip(left_out["layer_id"], left_out["longname"]))
    assert "large_layers=True" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_same_frames(everything, mine.analyze(large_layers=True, **caps))
        assert_same_frames(real(folder, "describe")[1], mine.describe(large_layers=True, **caps))
    with pytest.warns(se_ww.LayersLeftOutWarning):
        assert_same_frames(real(folder, "describe", **caps)[1], mine.describe(**caps))


def test_folder_tensors_are_read_one_at_a_time(folders, monkeypatch):
    """describe reads headers only; analyze reads each tensor once, and no two
    tensors of more than 4,096 entries are alive together."""
    loads, alive, peak = [], set(), [0]
    loader = se_ww._entry_loader

    def counting(entry):
        load = loader(entry)

        def wrapped():
            w = load()
            loads.append(entry.source)
            if w.numel() > 4096:
                alive.add(id(w))
                peak[0] = max(peak[0], len(alive))
                weakref.finalize(w, alive.discard, id(w))
            return w
        return wrapped

    monkeypatch.setattr(se_ww, "_entry_loader", counting)
    watcher = se_ww.WeightWatcher(model=folders["llama_shards"])
    rows = watcher.describe()
    assert loads == []
    watcher.analyze()
    assert len(loads) == len(rows) == len(set(loads)) and peak[0] == 1


def test_large_matrices_in_blocks_equal_weightwatcher(folders, monkeypatch):
    """The Gram of a matrix summed over blocks of its longer side (as for a 151,936 x 896 embedding): the same
    numbers at any block size."""
    monkeypatch.setattr(se_ww, "_BLOCK", 1000)  # a few rows per block, the last block short
    for name in ("llama_bf16", "gpt2"):
        _, expected = real(folders[name])
        assert_same_frames(expected, se_ww.WeightWatcher(model=folders[name]).analyze())


@pytest.mark.parametrize("kwargs", [dict(min_evals=100, max_evals=10), dict(max_evals=-5), dict(max_N=100),
                                    dict(savefig=-1), dict(savefig=None), dict(pool=False, conv2d_fft=True),
                                    dict(intra=True, conv2d_fft=True), dict(ww2x=True, conv2d_fft=True),
                                    dict(start_ids=-1)])
def test_invalid_params_raise_as_weightwatcher(kwargs):
    """What WeightWatcher.valid_params refuses (a bare Exception, "Error,
    params not valid") is refused here for the same reason, before any "not
    reproduced" refusal: an InvalidParamsError, a ValueError (an Exception)
    with the same opening words."""
    model = models()["mlp"]
    with pytest.raises(Exception, match="Error, params not valid"):
        real(model, "describe", **kwargs)
    with pytest.raises(se_ww.InvalidParamsError, match="Error, params not valid"):
        se_ww.WeightWatcher(model=model).describe(**kwargs)
    if "conv2d_fft" not in kwargs:
        with pytest.raises(Exception, match="Error, params not valid"):
            real(model, **kwargs)
        with pytest.raises(se_ww.InvalidParamsError, match="Error, params not valid"):
            se_ww.WeightWatcher(model=model).analyze(**kwargs)


def test_describe_takes_savefig_as_weightwatcher(tmp_path):
    model = models()["cnn"]
    for savefig in (True, False, str(tmp_path / "figs")):
        _, expected = real(model, "describe", savefig=savefig)
        got = se_ww.WeightWatcher(model=model).describe(savefig=savefig)
        assert list(got["layer_id"]) == list(expected["layer_id"])
        assert list(got["num_evals"]) == list(expected["num_evals"])


# -- pool=False (WeightWatcher's 0.2x slice iterator) ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["cnn", "kernels", "mlp"])
@pytest.mark.parametrize("kwargs", [{"pool": False}, {"ww2x": True, "min_evals": 1},
                                    {"pool": False, "conv2d_norm": False, "min_evals": 2, "layers": [-1]}])
def test_pool_false_equals_weightwatcher_slice_by_slice(name, kwargs):
    """A row per kh*kw slice (slice_id), each slice scaled by sqrt(rf / 2), sizes checked on M alone."""
    model = models()[name]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _, expected = real(model, **kwargs)
    got = se_ww.WeightWatcher(model=model).analyze(**kwargs)
    assert "slice_id" in got.columns and len(got) >= 2
    assert_same_frames(expected, got)
    assert_same_frames(real(model, "describe", **kwargs)[1], se_ww.WeightWatcher(model=model).describe(**kwargs))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_pool_false_with_mp_fit_and_randomize_equals_weightwatcher():
    model = models()["kernels"]
    np.random.seed(5)
    _, expected = real(model, pool=False, min_evals=4, mp_fit=True, randomize=True)
    np.random.seed(5)
    got = se_ww.WeightWatcher(model=model).analyze(pool=False, min_evals=4, mp_fit=True, randomize=True)
    assert got["slice_id"].max() == 24  # the 5 x 5 kernel's last slice
    assert_same_frames(expected, got)


# -- fit="TPL" / "E_TPL" and pl_package="powerlaw" ---------------------------------------------------------------


@pytest.fixture
def ww_powerlaw_1x(monkeypatch):
    """WeightWatcher 0.7.7 passes powerlaw.Fit a distribution= keyword that powerlaw 1.x took unused and
    powerlaw 2.0 refuses (every TPL fit of the real package then fails): drop it, as the adapter does."""
    import powerlaw
    from weightwatcher import WW_powerlaw

    class Fit(powerlaw.Fit):
        def __init__(self, *args, distribution=None, **kwargs):
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(WW_powerlaw, "powerlaw", type("powerlaw", (), {"Fit": Fit}))


def tpl_model():
    torch.manual_seed(1)  # fits away from the TPL's alpha = 0 bound, where powerlaw's optimiser magnifies 1e-15
    return nn.Sequential(nn.Linear(24, 40), nn.Linear(40, 16), nn.Conv2d(12, 10, 2))


def test_truncated_power_law_analysis_equals_weightwatcher(ww_powerlaw_1x):
    model = tpl_model()
    for kwargs in ({"fit": "TPL", "pl_package": "powerlaw", "xmax": "force"}, {"pl_package": "powerlaw"}):
        _, expected = real(model, **kwargs)
        got = se_ww.WeightWatcher(model=model).analyze(**kwargs)
        assert ("Lambda" in got.columns) == (kwargs.get("fit") == "TPL")
        assert (got["status"] == "success").all()
        assert_same_frames(expected, got)


@pytest.mark.parametrize("kwargs", [{"fit_type": "truncated_power_law", "xmax": "force"},
                                    {"fit_type": "truncated_power_law", "fix_fingers": "xmin_peak"}])
def test_truncated_power_law_fit_equals_weightwatchers_on_the_same_eigenvalues(ww_powerlaw_1x, kwargs):
    """TPL (xmax='force') and E_TPL (fix_fingers='xmin_peak') fits of one ESD, given the same eigenvalues, to the
    last bit, on ESDs whose alpha sits at the fit's bound (where a 1e-15 change of the spectrum moves Lambda)."""
    watcher, _ = real(models()["mlp"], "describe")
    for layer in (1, 3):
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            evals = watcher.get_ESD(layer=layer)
            alpha, Lambda, xmin, xmax, D, sigma, spikes, _, _, status, _ = watcher.fit_powerlaw(
                evals, plot=False, pl_package="powerlaw", xmax=kwargs.get("xmax"),
                fix_fingers=kwargs.get("fix_fingers", False), fit_type=kwargs["fit_type"])
        got = se_ww._powerlaw_package_fit(evals, kwargs["fit_type"], kwargs.get("xmax"),
                                          kwargs.get("fix_fingers", False), None)
        assert status == got["status"] == "success"
        assert (got["alpha"], got["Lambda"], got["xmin"], got["xmax"], got["ks"]) == (alpha, Lambda, xmin, xmax, D)
        assert np.isnan(got["sigma"]) and np.isnan(sigma) or got["sigma"] == sigma


def fingers_model():
    """Linear layers whose top 1-4 singular values are scaled up 2-5x: tails with fingers."""
    torch.manual_seed(0)
    layers = [nn.Linear(200, 300), nn.Linear(300, 150), nn.Linear(150, 120), nn.Linear(120, 400)]
    with torch.no_grad():
        for i, layer in enumerate(layers):
            U, S, Vh = torch.linalg.svd(layer.weight, full_matrices=False)
            S[:i + 1] *= 2.0 + i
            layer.weight.copy_((U * S) @ Vh)
    return nn.Sequential(*layers)


@pytest.mark.parametrize("kwargs, fingers", [
    (dict(), [0, 0, 0, 0]), (dict(finger_thresh=0.5), [4, 0, 0, 0]),
    (dict(max_fingers=300), [31, None, None, None]),  # the ESD clipped below 2 eigenvalues: the fit fails there
    (dict(pl_package="powerlaw", finger_thresh=0.5), None), (dict(pl_package="powerlaw", xmax="force"), None)])
def test_fix_fingers_clip_xmax_equals_weightwatcher(ww_powerlaw_1x, kwargs, fingers):
    model = fingers_model()
    expected = real(model, fix_fingers="clip_xmax", **kwargs)[1]
    got = se_ww.WeightWatcher(model=model).analyze(fix_fingers="clip_xmax", **kwargs)
    assert {"num_fingers", "raw_alpha"} <= set(got.columns)
    assert_same_frames(expected, got)
    if fingers is not None:
        assert got["num_fingers"].tolist() == [f or 0 for f in fingers]
        assert (got["status"] == "failed").tolist() == [f is None for f in fingers]
    # independently: the alpha kept is the fit of the ESD less its num_fingers + 1 largest eigenvalues
    plain = se_ww.WeightWatcher(model=model).analyze(**{k: v for k, v in kwargs.items() if k in ("pl_package", "xmax")})
    for row, whole in zip(got.itertuples(), plain.itertuples()):
        if row.status == "success":
            assert row.raw_alpha == whole.alpha
        if row.num_fingers and kwargs.get("pl_package") != "powerlaw":
            evals = np.sort(se_ww.WeightWatcher(model=model).get_ESD(layer=row.layer_id))
            clipped = se_ww.spectra.fit_power_laws(evals[:-(row.num_fingers + 1)][None],
                                                   convention=se_ww.WEIGHTWATCHER).to_frame().iloc[0]
            assert row.alpha == clipped["alpha"]
            assert row.alpha + kwargs.get("finger_thresh", 1.0) < row.raw_alpha


@pytest.mark.parametrize("kwargs", [dict(min_evals=2), dict(min_evals=2, pl_package="powerlaw"),
                                    dict(min_evals=2, max_fingers=2)])
def test_fix_fingers_clip_xmax_fails_small_esds_as_weightwatcher(ww_powerlaw_1x, kwargs):
    """ESDs of 3-11 eigenvalues: weightwatcher's 3 checking refits (or an unset loop variable when
    max_fingers <= 2 is kept) fail the layer's fit there; so here."""
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(11, 33), nn.Linear(33, 11), nn.Linear(3, 9))
    expected = real(model, fix_fingers="clip_xmax", **kwargs)[1]
    got = se_ww.WeightWatcher(model=model).analyze(fix_fingers="clip_xmax", **kwargs)
    assert_same_frames(expected, got)
    assert (got["status"] == "failed").any()


@pytest.mark.parametrize("name", ["cnn", "kernels", "mlp", "fingers"])
def test_detX_columns_equal_weightwatcher(name):
    model = fingers_model() if name == "fingers" else models()[name]
    expected = real(model, detX=True)[1]
    got = se_ww.WeightWatcher(model=model).analyze(detX=True)
    assert_same_frames(expected, got)
    for row in got.itertuples():  # independently: the tail's product reaches 1 at its size, not one eigenvalue less
        evals = np.sort(se_ww.WeightWatcher(model=model).get_ESD(layer=row.layer_id))
        evals = evals * (row.lambda_max / evals[-1])  # analyze's Conv2d ESDs are scaled by conv2d_norm's 1/2
        rescaled = evals * len(evals) / evals.sum()
        assert np.prod(rescaled[-row.detX_num:]) < 1.0 <= np.prod(rescaled[len(evals) - row.detX_num + 1:])
        assert row.ERG_gap == row.detX_num - row.num_pl_spikes
        np.testing.assert_allclose(row.detX_val, evals[-row.detX_num], rtol=1e-12)


@pytest.mark.parametrize("kwargs", [dict(fit="TPL"), dict(fit="E_TPL"), dict(xmax="force"), dict(pl_package="nope"),
                                    dict(fit="E_TPL", pl_package="powerlaw", fix_fingers="clip_xmax"),
                                    dict(fix_fingers="nope"), dict(xmax="big")])
def test_fit_params_weightwatcher_refuses_are_refused(kwargs):
    """pl_package='ww' fits power laws only, without xmax='force'; unknown packages, finger fixes and xmax."""
    model = models()["mlp"]
    with pytest.raises(Exception, match="Error, params not valid"):
        real(model, **kwargs)
    with pytest.raises(se_ww.InvalidParamsError, match="Error, params not valid"):
        se_ww.WeightWatcher(model=model).analyze(**kwargs)


# -- SVDSmoothing, SVDSharpness, distances -----------------------------------------------------------------------


def real_transform(model, transform, **kwargs):
    """WeightWatcher changes the model (a module or a state_dict) it is given in place: hand it a copy."""
    import copy
    model = copy.deepcopy(model)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        getattr(ww.WeightWatcher(model=model), transform)(model=model, **kwargs)
    return model.state_dict() if isinstance(model, nn.Module) else model


@pytest.mark.parametrize("name", ["cnn", "kernels"])
@pytest.mark.parametrize("transform, kwargs, atol", [
    ("SVDSmoothing", {"method": "svd", "percent": -0.3}, 1e-5),  # top singular values dropped: exact SVDs both
    ("SVDSmoothing", {"method": "rmt"}, 1e-5),
    ("SVDSharpness", {}, 1e-5),
    # kept top k: WeightWatcher's randomized TruncatedSVD, float32 there, float64 here
    ("SVDSmoothing", {}, 1e-5), ("SVDSmoothing", {"method": "svd", "percent": 0.3}, 1e-5),
    ("SVDSmoothing", {"method": "alpha_min"}, 1e-5)])
@pytest.mark.parametrize("source", ["module", "state_dict"])
def test_svd_smoothing_and_sharpness_equal_weightwatcher_on_a_copy(name, transform, kwargs, atol, source):
    model = models()[name]
    model = model if source == "module" else model.state_dict()
    before = {k: v.clone() for k, v in (model.state_dict() if source == "module" else model).items()}
    np.random.seed(0)
    expected = real_transform(model, transform, **kwargs)
    np.random.seed(0)
    watcher = se_ww.WeightWatcher(model=model)
    got = getattr(watcher, transform)(**kwargs)
    assert got is not model and watcher.model is got  # the watcher follows the changed copy, as WeightWatcher's
    assert all(torch.equal(before[k], v) for k, v in (model.state_dict() if source == "module" else model).items())
    state = got.state_dict() if source == "module" else got
    assert list(state) == list(expected)
    for key in expected:
        assert state[key].dtype == before[key].dtype  # WeightWatcher's float64 for some Linear layers: kept float32
        np.testing.assert_allclose(state[key].numpy(), expected[key].numpy(), rtol=0, atol=atol, err_msg=key)
    changed = [k for k in expected if (before[k] - expected[k]).abs().max() > 1e-3]
    assert changed == [k for k in expected if (before[k] - state[k]).abs().max() > 1e-3]
    if transform == "SVDSmoothing" and "rmt" not in str(kwargs):
        assert len(changed) >= 2


def test_svd_smoothing_on_checkpoints_and_folders(tmp_path):
    """A {"state_dict": ...} checkpoint: SVDSmoothing returns (and watches) the inner state_dict as
    WeightWatcher's set_model_ unwraps it, SVDSharpness the whole copy; bf16 weights and the biases
    of changed Linear layers come back float32 (WeightWatcher's replace_layer_weights); a folder is refused."""
    state = {k: v.to(torch.bfloat16) for k, v in models()["mlp"].state_dict().items()}
    checkpoint = {"state_dict": state, "epoch": 3}
    watcher = se_ww.WeightWatcher()
    smoothed = watcher.SVDSmoothing(model=checkpoint, method="svd", percent=0.2, layers=[1])
    assert watcher.model is smoothed and smoothed is not state and list(smoothed) == list(state)
    assert smoothed["0.weight"].dtype == smoothed["0.bias"].dtype == torch.float32
    assert smoothed["2.weight"].dtype == torch.bfloat16  # layers left alone keep theirs
    assert torch.linalg.matrix_rank(smoothed["0.weight"].double(), atol=1e-4) == 6  # int(0.2 * 30)
    assert all(v.dtype == torch.bfloat16 for v in state.values())  # the checkpoint given is untouched
    sharp = se_ww.WeightWatcher().SVDSharpness(model=checkpoint)
    assert set(sharp) == {"state_dict", "epoch"} and sharp["state_dict"] is not state
    torch.save(models()["mlp"].state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(TypeError, match="state_dict"):
        se_ww.WeightWatcher().SVDSmoothing(model=str(tmp_path))


def test_svd_smoothing_truncation_exact_and_weightwatchers_estimator():
    """truncation="exact" is the rank-k truncation (Eckart-Young: the error is the dropped singular values);
    the default reproduces WeightWatcher's randomized estimate, which on a flat random spectrum is not it."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(300, 200), nn.Linear(200, 120))
    np.random.seed(0)
    expected = real_transform(model, "SVDSmoothing", method="svd", percent=0.25)
    exact = se_ww.WeightWatcher().SVDSmoothing(model=model, method="svd", percent=0.25, truncation="exact")
    default = se_ww.WeightWatcher().SVDSmoothing(model=model, method="svd", percent=0.25)
    for i, k in ((0, 50), (1, 30)):  # int(0.25 * M)
        W = model[i].weight.detach().double()
        S = torch.linalg.svdvals(W)
        got = exact[i].weight.detach().double()
        assert torch.linalg.matrix_rank(got, atol=1e-4) == k
        torch.testing.assert_close((W - got).norm(), S[k:].norm(), rtol=1e-5, atol=0)
        np.testing.assert_allclose(default[i].weight.detach().numpy(), expected[f"{i}.weight"].numpy(), rtol=0,
                                   atol=1e-5)
        assert (default[i].weight.detach().double() - got).norm() > 1e-2 * got.norm()  # the estimate is not it
    with pytest.raises(ValueError, match="truncation"):
        se_ww.WeightWatcher().SVDSmoothing(model=model, truncation="lanczos")


def test_svd_smoothing_of_zero_weights_equals_weightwatcher():
    """A zeroed Linear and a Conv2d with a zeroed tap (pruned weights) smooth to what WeightWatcher gives."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(96, 96, 3), nn.Flatten(), nn.Linear(100, 200), nn.Linear(200, 100))
    with torch.no_grad():
        model[0].weight[:, :, 0, 0] = 0
        model[3].weight.zero_()
    for kwargs in (dict(method="svd", percent=0.2), {}):
        expected = real_transform(model.state_dict(), "SVDSmoothing", **kwargs)
        got = se_ww.WeightWatcher().SVDSmoothing(model=model.state_dict(), **kwargs)
        for key in expected:
            np.testing.assert_allclose(got[key].numpy(), expected[key].numpy(), rtol=0, atol=1e-5, err_msg=key)
        assert (got["3.weight"] == 0).all() and (got["0.weight"][:, :, 0, 0] == 0).all()


def test_randomized_truncation_is_sklearns_on_tall_wide_low_rank_and_small_matrices():
    """The G = X^T X route against sklearn's TruncatedSVD(n_iter=7, random_state=42) itself, in float64
    (WeightWatcher's _smooth_W_accurate), where its subspace is used (k + 10 < n) and where it spans all."""
    from sklearn.decomposition import TruncatedSVD

    def sklearn_smooth(W, k):
        svd = TruncatedSVD(n_components=k, n_iter=7, random_state=42)
        X = W.T if W.shape[0] < W.shape[1] else W
        out = svd.fit_transform(X) @ svd.components_
        return out.T if W.shape[0] < W.shape[1] else out

    g = torch.Generator().manual_seed(2)
    low_rank = torch.randn(300, 40, generator=g, dtype=torch.float64) @ torch.randn(40, 150, generator=g,
                                                                                   dtype=torch.float64)
    decaying = torch.randn(260, 120, generator=g, dtype=torch.float64) * torch.logspace(0, -6, 120,
                                                                                         dtype=torch.float64)
    for W, k in ((torch.randn(400, 90, generator=g, dtype=torch.float64), 20),
                 (torch.randn(300, 300, generator=g, dtype=torch.float64), 5),  # sklearn's route (fewer flops)
                 (torch.zeros(200, 120, dtype=torch.float64), 10), (low_rank[:, :120] * (torch.arange(120) < 9), 20),
                 (torch.randn(70, 250, generator=g, dtype=torch.float64), 35), (low_rank, 25), (low_rank, 60),
                 (decaying, 30), (torch.randn(12, 30, generator=g, dtype=torch.float64), 5)):
        # sklearn draws Omega in float64 for float64 input, ours rounded to float32 as for WeightWatcher's
        # float32 weights: the same estimator to 1e-6
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # zero pivots of a rank-deficient W: silent, as sklearn's lu
            got = se_ww._truncate(W, k).numpy()
        want = sklearn_smooth(W.numpy(), k)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.abs(want).max(), err_msg=f"{tuple(W.shape)} {k}")
    with pytest.raises(ValueError, match="n_components"):
        se_ww._truncate(torch.randn(20, 10, dtype=torch.float64), 11)
    import scipy.linalg
    for shape in ((90, 20), (33, 33), (200, 75)):  # its normaliser: scipy's P L, to the bit
        Y = np.random.default_rng(3).standard_normal(shape)
        np.testing.assert_array_equal(se_ww._permuted_unit_lower(*scipy.linalg.lu_factor(Y)),
                                      scipy.linalg.lu(Y, permute_l=True)[0])


def test_svd_smoothing_keeps_and_drops_the_rank_weightwatcher_keeps():
    model = models()["mlp"]
    smoothed = se_ww.WeightWatcher().SVDSmoothing(model=model, method="svd", percent=0.2, layers=[1])
    assert torch.linalg.matrix_rank(smoothed[0].weight.detach().double(), atol=1e-5) == 6  # int(0.2 * 30)
    sharp = se_ww.WeightWatcher().SVDSmoothing(model=model, method="svd", percent=-0.2, layers=[1])
    assert torch.linalg.matrix_rank(sharp[0].weight.detach().double(), atol=1e-5) == 24
    with pytest.raises(ValueError, match="only pooling"):
        se_ww.WeightWatcher(model=model).SVDSmoothing(pool=False)
    with pytest.raises(ValueError, match="pool=True"):
        se_ww.WeightWatcher(model=model).SVDSharpness(pool=False)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
@pytest.mark.parametrize("kwargs", [{}, {"method": "euclidean"}, {"method": "CKA"}, {"method": "cka", "pool": False},
                                    {"pool": False, "layers": [-1]}])
def test_distances_equal_weightwatcher(name, kwargs):
    a, b = models()[name], models()[name]
    with torch.no_grad():
        for p in b.parameters():
            p.add_(0.01 * torch.randn_like(p))
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dW, db, expected = ww.WeightWatcher().distances(a, b, **kwargs)
    got_dW, got_db, got = se_ww.WeightWatcher().distances(a, b, **kwargs)
    assert (got_dW, got_db) == pytest.approx((dW, db), rel=1e-6) and dW > 0
    assert list(got.columns) == list(expected.columns) and list(got.index) == list(expected.index)
    assert got.dtypes.tolist() == expected.dtypes.tolist()
    for column in expected.columns:
        a_, b_ = expected[column].to_numpy(), got[column].to_numpy()
        if a_.dtype.kind in "fi":
            np.testing.assert_allclose(b_, a_, rtol=1e-6, err_msg=column)
        else:
            assert [str(v) for v in b_] == [str(v) for v in a_], column
    with pytest.raises(Exception, match="method not valid"):
        se_ww.WeightWatcher().distances(a, b, method="nope")
