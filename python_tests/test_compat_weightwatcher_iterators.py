"""spectral_ext.compat.weightwatcher's other layer iterators against the
real WeightWatcher 0.7.7, column by column: intra=True (products of
consecutive layers: MLPs, a bottleneck where WeightWatcher takes a truncated
SVD, a CNN; sparsified with numpy's global generator or not), peft=True (LoRA
products BA, and W + BA with peft="with_base", of a module laid out as PEFT
lays it out and of an adapter folder, fp32 and bf16) and base_model (the
layers' differences from a base model), and the refusals of each."""
import contextlib
import io
import json
import os
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import weightwatcher as ww  # the peer: a test requirement, never skipped
from spectral_ext.compat import weightwatcher as se_ww


def real(model, method="analyze", **kwargs):
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(ww.WeightWatcher(model=model), method)(**kwargs)


def assert_same_frames(expected, got, atol=None):
    """Column by column, numbers to 1e-8 relative (atol: column -> an absolute tolerance besides)."""
    atol = atol or {}
    assert list(got.columns) == list(expected.columns)
    assert got["layer_id"].tolist() == expected["layer_id"].tolist()
    for column in expected.columns:
        a, b = expected[column].to_numpy(), got[column].to_numpy()
        if a.dtype.kind in "fiub" and b.dtype.kind in "fiub":
            np.testing.assert_allclose(b.astype(float), a.astype(float), rtol=1e-8, atol=atol.get(column, 1e-12),
                                       err_msg=column)
        else:
            assert [str(v) for v in b] == [str(v) for v in a], column


# -- intra=True --------------------------------------------------------------------------------------------------


def intra_models():
    torch.manual_seed(0)
    return {
        # 1 X 3 (50 x 300), 3 X 5, 5 X 6, 6 X 7 (square layers: no transpose), 7 x 8 do not chain (skipped),
        # 8 X 9 chains again
        "mlp": nn.Sequential(nn.Linear(50, 100), nn.ReLU(), nn.Linear(100, 300), nn.ReLU(), nn.Linear(300, 40),
                             nn.Linear(40, 40), nn.Linear(40, 40), nn.Linear(30, 20), nn.Linear(20, 60)),
        # 784 x 300 products of rank 100 < M: WeightWatcher's truncated (ARPACK) SVD of the 100 largest
        "bottleneck": nn.Sequential(nn.Linear(784, 100), nn.Linear(100, 300), nn.Linear(300, 10)),
        # first kh*kw slices of convolutions chain, conv -> Linear(8, ...) too; scaled by sqrt(1/2) after a conv
        "cnn": nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 32, 3), nn.Conv2d(32, 8, 3), nn.Flatten(),
                             nn.Linear(8, 40), nn.Linear(40, 16)),
    }


@pytest.mark.parametrize("name", ["mlp", "bottleneck", "cnn"])
@pytest.mark.parametrize("kwargs", [{"sparsify": False}, {}, {"mp_fit": True}, {"layers": ["-4"]},
                                    {"min_evals": 45, "sparsify": False}, {"pool": False},
                                    {"conv2d_norm": False, "sparsify": False}])
def test_intra_equals_weightwatcher(name, kwargs):
    """A row per chained pair, named "<id0> X <id1> ", with WeightWatcher's
    ESD (X's singular values), fits and norms; the sparsifying 0/1 matrices
    are drawn from numpy's global generator as there (the same seed gives the
    same rows and leaves the generator in the same state)."""
    model = intra_models()[name]
    np.random.seed(7)
    expected = real(model, intra=True, **kwargs)
    after_ww = np.random.rand()
    np.random.seed(7)
    got = se_ww.WeightWatcher(model=model).analyze(intra=True, **kwargs)
    assert np.random.rand() == after_ww
    assert len(got) and got["Xflag"].all() and got["name"].str.contains(" X ").all()
    # a sparsifying S can be singular: X's smallest singular value is then rounding noise (1e-17), which
    # WeightWatcher's ARPACK (a fresh random start per call) itself gives differently from run to run; sv_min
    # is its square root (1e-9)
    assert_same_frames(expected, got, atol={"sv_min": 1e-7})


def test_intra_pairs_follow_weightwatcher():
    """The pairs of the MLP: 7 x 8 (40 x 40 then 20 x 30) do not chain and
    give no row; the pair after starts from layer 8."""
    got = se_ww.WeightWatcher(model=intra_models()["mlp"]).analyze(intra=True, sparsify=False)
    assert got["name"].tolist() == ["1 X 3 ", "3 X 5 ", "5 X 6 ", "6 X 7 ", "8 X 9 "]
    assert got[["N", "M"]].values.tolist() == [[300, 50], [100, 40], [300, 40], [40, 40], [60, 30]]


@pytest.mark.parametrize("method,kwargs", [("analyze", dict(intra=True, randomize=True)),
                                           ("analyze", dict(intra=True, vectors=True)),
                                           ("describe", dict(intra=True))])
def test_intra_refusals_equal_weightwatcher(method, kwargs):
    """WeightWatcher refuses intra with randomize or vectors, and describe(intra=True)
    always (its describe keeps DEFAULT_PARAMS' randomize=True and vectors=True)."""
    model = intra_models()["mlp"]
    with pytest.raises(Exception, match="Error, params not valid"):
        real(model, method, **kwargs)
    with pytest.raises(se_ww.InvalidParamsError, match="intra=True with randomize=True or vectors=True"):
        getattr(se_ww.WeightWatcher(model=model), method)(**kwargs)


def test_intra_bad_sparsify_names_it():
    with pytest.raises(TypeError, match="sparsify must be a bool"):
        se_ww.WeightWatcher(model=intra_models()["mlp"]).analyze(intra=True, sparsify="yes")


# -- peft=True -----------------------------------------------------------------------------------------------------


class LoraLinear(nn.Module):
    """peft.tuners.lora.layer.Linear's layout: base_layer, lora_dropout,
    lora_A, lora_B (ModuleDicts by adapter name), lora_embedding_A/B
    (ParameterDicts), the base weight exposed as .weight."""

    def __init__(self, n_in, n_out, r):
        super().__init__()
        self.base_layer = nn.Linear(n_in, n_out)
        self.lora_dropout = nn.ModuleDict({"default": nn.Identity()})
        self.lora_A = nn.ModuleDict({"default": nn.Linear(n_in, r, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(r, n_out, bias=False)})
        self.lora_embedding_A, self.lora_embedding_B = nn.ParameterDict(), nn.ParameterDict()
        nn.init.normal_(self.lora_B["default"].weight)  # trained: PEFT initialises B to 0

    @property
    def weight(self):
        return self.base_layer.weight


def peft_model(transposed=False):
    """A PeftModel's names (base_model.model.<module>): LoRA ranks 8 (r < M:
    BA's 8 largest singular values), 12 (64 x 64), 4 (M = 4 < min_evals:
    left out as there) and, with transposed, r = 12 > in = out = 8 (A and B
    transposed by WeightWatcher)."""
    torch.manual_seed(0)
    inner = nn.Module()
    inner.q = LoraLinear(64, 48, 8)
    inner.act = nn.ReLU()
    inner.k = LoraLinear(48, 64, 4)
    inner.v = LoraLinear(64, 64, 12)
    if transposed:
        inner.o = LoraLinear(8, 8, 12)
    inner.head = nn.Linear(64, 10)
    outer, wrapper = nn.Module(), nn.Module()
    outer.model = inner
    wrapper.base_model = outer
    return wrapper


@pytest.mark.parametrize("peft", [True, "with_base"])
@pytest.mark.parametrize("method,kwargs", [("analyze", {}), ("analyze", {"mp_fit": True}),
                                           ("analyze", {"min_evals": 2}), ("analyze", {"pool": False}),
                                           ("analyze", {"layers": [3, 8, 10]}), ("describe", {})])
def test_peft_module_equals_weightwatcher(peft, method, kwargs):
    """LoRA rows lora_BA (the r largest squared singular values of the
    unscaled float32 B A) and, with "with_base", the base layers and
    lora_W_plus_AB (W + BA) first; a peft column."""
    model = peft_model()
    expected = real(model, method, peft=peft, **kwargs)
    got = getattr(se_ww.WeightWatcher(model=model), method)(peft=peft, **kwargs)
    assert got["peft"].any() and got["longname"].str.contains("lora_BA").any()
    assert_same_frames(expected, got)


def test_peft_transposed_lora_equals_weightwatcher():
    """r > in: A and B transposed as there; with_base's W + BA^T then fails
    there (8 x 8 + 12 x 12) and here, a ValueError."""
    model = peft_model(transposed=True)
    expected = real(model, peft=True)
    got = se_ww.WeightWatcher(model=model).analyze(peft=True)
    assert "base_model.model.o.lora_BA.default" in got["longname"].tolist()
    assert_same_frames(expected, got)
    with pytest.raises(ValueError):
        real(model, peft="with_base")
    with pytest.raises(ValueError, match="broadcast"):
        se_ww.WeightWatcher(model=model).analyze(peft="with_base")


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def adapter_folder(request, tmp_path_factory):
    """A PEFT adapter folder: adapter_config.json and adapter_model.safetensors
    (lora_alpha = 2 r: an update scaled by 2, which WeightWatcher ignores)."""
    from safetensors.torch import save_file

    torch.manual_seed(1)
    folder = tmp_path_factory.mktemp(f"adapter_{str(request.param)[6:]}")
    tensors = {}
    for i, (n_out, n_in, r) in enumerate([(48, 64, 8), (64, 64, 12), (32, 48, 8)]):
        for module in ("q_proj", "v_proj"):
            key = f"base_model.model.model.layers.{i}.self_attn.{module}"
            tensors[f"{key}.lora_A.weight"] = (torch.randn(r, n_in) / 8).to(request.param)
            tensors[f"{key}.lora_B.weight"] = torch.randn(n_out, r).to(request.param)
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"))
    with open(os.path.join(folder, "adapter_config.json"), "w") as handle:
        json.dump({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
                   "rank_pattern": {"layers.1.self_attn.q_proj": 12, "layers.1.self_attn.v_proj": 12}}, handle)
    return str(folder)


@pytest.mark.parametrize("peft", [True, "with_base"])
@pytest.mark.parametrize("method", ["analyze", "describe"])
def test_peft_adapter_folder_equals_weightwatcher(adapter_folder, peft, method):
    """An adapter folder: a lora_BA row per target module (its key less
    ".weight", lora_A -> lora_BA), ids as WeightWatcher's folder iterator
    gives them; no base layers to add with "with_base"."""
    expected = real(adapter_folder, method, peft=peft)
    got = getattr(se_ww.WeightWatcher(model=adapter_folder), method)(peft=peft)
    assert len(got) == 6 and got["name"].str.endswith("lora_BA").all()
    assert_same_frames(expected, got)


def test_peft_bad_input_names_the_argument():
    model = peft_model()
    watcher = se_ww.WeightWatcher(model=model)
    with pytest.raises(TypeError, match="peft must be True, False or 'with_base'"):
        watcher.analyze(peft=3)
    with pytest.raises(ValueError, match="randomize=True with peft is not reproduced"):
        watcher.analyze(peft=True, randomize=True)
    orphan = nn.Sequential()
    orphan.add_module("x", nn.Linear(16, 16))
    orphan.add_module("x_lora_B", nn.Linear(16, 16))  # a lora_B with no lora_A (WeightWatcher: UnboundLocalError)
    with pytest.raises(ValueError, match="peft: x_lora_B .* follows no lora_A"):
        se_ww.WeightWatcher(model=orphan).analyze(peft=True)


# -- base_model ------------------------------------------------------------------------------------------------


def base_pair(name):
    """A model and its base (the same layers, perturbed)."""
    torch.manual_seed(0)
    model = {"mlp": lambda: nn.Sequential(nn.Linear(30, 50), nn.ReLU(), nn.Linear(50, 25), nn.Linear(25, 12)),
             "cnn": lambda: nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 32, (3, 5)), nn.Flatten(),
                                          nn.Linear(32 * 4, 64), nn.Linear(64, 10))}[name]
    left, right = model(), model()
    with torch.no_grad():
        for p, q in zip(left.parameters(), right.parameters()):
            q.copy_(p + 0.1 * torch.randn_like(p))
    return left, right


@pytest.mark.parametrize("name", ["mlp", "cnn"])
@pytest.mark.parametrize("kwargs", [{}, {"mp_fit": True}, {"layers": [1, 2, 3]}, {"min_evals": 20}])
def test_base_model_equals_weightwatcher(name, kwargs):
    """WWDeltaLayerIterator: each layer's W - W_base (float32), given to the
    constructor or to analyze with the model; describe gives the model's rows."""
    model, base = base_pair(name)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = ww.WeightWatcher(model=model, base_model=base).analyze(**kwargs)
        given_later = ww.WeightWatcher().analyze(model=model, base_model=base, **kwargs)
        described = ww.WeightWatcher(model=model, base_model=base).describe()
    got = se_ww.WeightWatcher(model=model, base_model=base).analyze(**kwargs)
    assert_same_frames(expected, got)
    assert_same_frames(given_later, se_ww.WeightWatcher().analyze(model=model, base_model=base, **kwargs))
    assert_same_frames(described, se_ww.WeightWatcher(model=model, base_model=base).describe())
    plain = se_ww.WeightWatcher(model=model).analyze(**kwargs)
    assert not np.allclose(plain["lambda_max"], got["lambda_max"])


def test_base_model_pairs_by_name_as_weightwatcher():
    """A layer whose name no base layer holds (next in order) is analysed as it is."""
    from collections import OrderedDict

    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(enc=nn.Linear(30, 50), dec=nn.Linear(50, 25)))
    base = nn.Sequential(OrderedDict(dec=nn.Linear(50, 25)))
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = ww.WeightWatcher(model=model, base_model=base).analyze()
    got = se_ww.WeightWatcher(model=model, base_model=base).analyze()
    assert_same_frames(expected, got)
    assert got["lambda_max"].iloc[0] == se_ww.WeightWatcher(model=model).analyze()["lambda_max"].iloc[0]


def test_base_model_state_dicts_equal_weightwatcher():
    model, base = base_pair("mlp")
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = ww.WeightWatcher(model=model.state_dict(), base_model=base.state_dict()).analyze()
    assert_same_frames(expected, se_ww.WeightWatcher(model=model.state_dict(),
                                                     base_model=base.state_dict()).analyze())


@pytest.fixture(scope="module")
def base_folders(tmp_path_factory):
    """A fine-tuned model as two shards with an index (the layers in their natural order) and its base as one
    model.safetensors (read in sorted key order: layer 10 before layer 2), 12 layers of 32 x 24."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("base_folders")
    g = torch.Generator().manual_seed(0)
    keys = [f"model.layers.{i}.mlp.weight" for i in range(12)]
    base = {k: torch.randn(32, 24, generator=g) for k in keys}
    model = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    (root / "model").mkdir(), (root / "base").mkdir(), (root / "short").mkdir()
    weight_map = {}
    for shard, part in enumerate((keys[:6], keys[6:])):
        file = f"model-0000{shard + 1}-of-00002.safetensors"
        save_file({k: model[k] for k in part}, str(root / "model" / file))
        weight_map.update({k: file for k in part})
    (root / "model" / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    save_file(base, str(root / "base" / "model.safetensors"))
    save_file({k: base[k] for k in keys[:-1]}, str(root / "short" / "model.safetensors"))
    return {name: str(root / name) for name in ("model", "base", "short")}


@pytest.mark.parametrize("kwargs", [{}, dict(layers=[3, 4]), dict(layers=["model.layers.3.mlp"])])
def test_base_model_folders_pair_as_weightwatcher(base_folders, kwargs):
    """WWDeltaLayerIterator reads a base folder by the model's kept layer names, in the model's order, numbered
    afresh: every layer a difference whatever the base's file order; with ids as filters the renumbered base
    layers are filtered again and the model's layers stay unpaired (raw weights), as there."""
    model, base = base_folders["model"], base_folders["base"]
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = ww.WeightWatcher(model=model, base_model=base).analyze(**kwargs)
    got = se_ww.WeightWatcher(model=model, base_model=base).analyze(**kwargs)
    assert_same_frames(expected, got)
    differences = got["lambda_max"] < 5  # a 32 x 24 difference of 0.1 noise against a raw Gaussian weight's ~90
    assert differences.all() if "layers" not in kwargs or isinstance(kwargs["layers"][0], str) \
        else not differences.any()


def test_base_model_folder_missing_a_layer_names_it(base_folders):
    with pytest.raises(ValueError, match="base_model: the folder .* has no tensor model.layers.11.mlp.weight"):
        se_ww.WeightWatcher(model=base_folders["model"], base_model=base_folders["short"]).analyze()


def test_base_model_refusals_name_the_argument():
    model, base = base_pair("mlp")
    watcher = se_ww.WeightWatcher(model=model, base_model=base)
    for kwargs in (dict(pool=False), dict(intra=True), dict(peft=True)):
        with pytest.raises(ValueError, match=f"base_model with {next(iter(kwargs))}="):
            watcher.analyze(**kwargs)
    with pytest.raises(ValueError, match="base_model: a state_dict for a module model"):
        se_ww.WeightWatcher(model=model, base_model=base.state_dict()).analyze()
    other = nn.Sequential(nn.Linear(30, 50), nn.ReLU(), nn.Linear(50, 20), nn.Linear(20, 12))
    with pytest.raises(ValueError, match="base_model: layer 2 .* differ in shape"):
        se_ww.WeightWatcher(model=model, base_model=other).analyze()
    with pytest.raises(TypeError, match="model must be"):
        se_ww.WeightWatcher(model=model, base_model=42)
