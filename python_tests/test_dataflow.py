"""The eager dataflow tracer (spectral_ext.dataflow, issue 25): transformers
models that torch.fx cannot trace, followed through one recorded forward;
the same graph as fx on torchvision CNNs when forced; dict inputs; its rules
one by one on small models."""
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import spectral_ext as se
from spectral_ext.layers import TransposedLinearMap

from conftest import cheap_model

transformers = pytest.importorskip("transformers")

V = 64  # vocabulary
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=V)


VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=16,
              patch_size=4)


def build(family, attn=None, **changes):
    """A small model of `family` with random weights (seed 0); T5 as its
    encoder alone and CLIP as its vision tower, the classes a user would
    take for hidden states."""
    if family == "gpt2":
        kwargs = dict(n_embd=32, n_layer=2, n_head=4, vocab_size=V, bos_token_id=0, eos_token_id=0)
    elif family == "t5":
        kwargs = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, vocab_size=V)
    elif family in ("vit", "clip_vision_model"):
        kwargs = dict(VISION)
    elif family == "swin":  # two stages of two blocks: the second block of stage 0 shifts its windows
        kwargs = dict(image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=2)
    else:
        kwargs = dict(SMALL, num_key_value_heads=2) if family in ("llama", "qwen2", "mistral") else dict(SMALL)
    cfg = transformers.AutoConfig.for_model(family, **{**kwargs, **changes})
    if attn is not None:
        cfg._attn_implementation = attn
    torch.manual_seed(0)
    if family == "t5":
        return transformers.T5EncoderModel(cfg).eval()
    if family == "clip_vision_model":
        return transformers.CLIPVisionModel(cfg).eval()
    return transformers.AutoModel.from_config(cfg).eval()


def tokens(batch=1, length=8):
    return {"input_ids": torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(batch))}


def inputs(family, batch=1):
    """Token ids, or pixel values for the vision families."""
    if family not in ("vit", "swin", "clip_vision_model"):
        return tokens(batch)
    size = 32 if family == "swin" else 16
    return {"pixel_values": torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))}


def gated_edges(layers=2):
    """LLaMA and Qwen2: v -> o; gate -> down and up -> down (the product
    act(gate) * up is elementwise); and every o and down writes the residual
    stream, which every later q, k, v, gate and up reads through its RMSNorm:
    o -> the same layer's gate and up, o and down -> the next layers' q, k, v,
    gate and up. The embedding is no map: layer 0's q, k and v read the input."""
    edges, stream = set(), []
    for i in range(layers):
        a, m = f"layers.{i}.self_attn.", f"layers.{i}.mlp."
        edges |= {(s, a + r) for s in stream for r in ("q_proj", "k_proj", "v_proj")}
        edges.add((a + "v_proj", a + "o_proj"))
        stream.append(a + "o_proj")
        edges |= {(s, m + r) for s in stream for r in ("gate_proj", "up_proj")}
        edges |= {(m + "gate_proj", m + "down_proj"), (m + "up_proj", m + "down_proj")}
        stream.append(m + "down_proj")
    return edges


def gpt2_edges(layers=2):
    """GPT-2 (Conv1D maps): c_attn (q, k, v packed) -> attn.c_proj through its
    value third; attn.c_proj and mlp.c_proj write the residual stream that
    later c_attn and c_fc read; c_fc -> mlp.c_proj."""
    edges, stream = set(), []
    for i in range(layers):
        a, m = f"h.{i}.attn.", f"h.{i}.mlp."
        edges |= {(s, a + "c_attn") for s in stream}
        edges.add((a + "c_attn", a + "c_proj"))
        stream.append(a + "c_proj")
        edges |= {(s, m + "c_fc") for s in stream}
        edges.add((m + "c_fc", m + "c_proj"))
        stream.append(m + "c_proj")
    return edges


def neox_edges(layers=2):
    """GPT-NeoX, parallel residual x + attn(ln1(x)) + mlp(ln2(x)): both
    branches read the stream as it was before the layer, so a layer's
    attention.dense does not feed its own MLP; query_key_value -> dense
    through the value channels of each head."""
    edges, stream = set(), []
    for i in range(layers):
        a, m = f"layers.{i}.attention.", f"layers.{i}.mlp."
        edges |= {(s, r) for s in stream for r in (a + "query_key_value", m + "dense_h_to_4h")}
        edges |= {(a + "query_key_value", a + "dense"), (m + "dense_h_to_4h", m + "dense_4h_to_h")}
        stream += [a + "dense", m + "dense_4h_to_h"]
    return edges


def bert_edges(layers=2):
    """BERT (post-LayerNorm): value -> attention.output.dense; intermediate ->
    output.dense; both output denses join the stream (through LayerNorm) that
    later query, key, value and intermediate read, and the pooler's dense reads
    (its first token)."""
    edges, stream = set(), []
    for i in range(layers):
        p = f"encoder.layer.{i}."
        edges |= {(s, p + "attention.self." + r) for s in stream for r in ("query", "key", "value")}
        edges.add((p + "attention.self.value", p + "attention.output.dense"))
        stream.append(p + "attention.output.dense")
        edges |= {(s, p + "intermediate.dense") for s in stream}
        edges.add((p + "intermediate.dense", p + "output.dense"))
        stream.append(p + "output.dense")
    return edges | {(s, "pooler.dense") for s in stream}


def prenorm_edges(blocks, stream, qkv=("q_proj", "k_proj", "v_proj"), o="o_proj", mlp=("fc1", "fc2")):
    """Pre-norm blocks x + attn(norm(x)), then x + mlp(norm(x)), each block
    given as (attention prefix, MLP prefix): v -> o, mlp[0] -> mlp[1], and
    the residual stream (the maps in `stream`, then each block's o and
    mlp[1]) read by every later q, k, v and mlp[0]. Returns the edges and the
    stream after the blocks."""
    edges, stream = set(), list(stream)
    for a, m in blocks:
        edges |= {(s, a + r) for s in stream for r in qkv}
        edges.add((a + qkv[2], a + o))
        stream.append(a + o)
        edges |= {(s, m + mlp[0]) for s in stream}
        edges.add((m + mlp[0], m + mlp[1]))
        stream.append(m + mlp[1])
    return edges, stream


def t5_edges(layers=2):
    """T5's encoder: pre-norm (T5LayerNorm, an RMSNorm) blocks, a ReLU MLP
    wi -> wo. The relative position bias is added to the scores: it holds no
    channel of any map and changes no edge. The embedding is no map."""
    blocks = [(f"encoder.block.{i}.layer.0.SelfAttention.", f"encoder.block.{i}.layer.1.DenseReluDense.")
              for i in range(layers)]
    return prenorm_edges(blocks, [], ("q", "k", "v"), "o", ("wi", "wo"))[0]


def vit_edges(layers=2):
    """ViT: the patch embedding (a stride-4 conv, flattened into tokens, the
    class token and position embeddings no map's) starts the residual stream,
    which every block reads. The pooler's dense reads the class token, a
    parameter that no patch reaches but through the attention (v -> o): the
    stream less the patch embedding."""
    blocks = [(f"layers.{i}.attention.", f"layers.{i}.mlp.") for i in range(layers)]
    edges, stream = prenorm_edges(blocks, ["embeddings.patch_embeddings.projection"])
    return edges | {(s, "pooler.dense") for s in stream[1:]}


def clip_edges(layers=2):
    """CLIP's vision tower: as ViT (its pre-LayerNorm taken whole), without
    a pooler map (post_layernorm of the class token)."""
    blocks = [(f"encoder.layers.{i}.self_attn.", f"encoder.layers.{i}.mlp.") for i in range(layers)]
    return prenorm_edges(blocks, ["embeddings.patch_embedding"], o="out_proj")[0]


def swin_edges(depths=(2, 2)):
    """Swin: within a stage, pre-norm blocks on windows (the window
    partition, the shift by torch.roll and its reversal move tokens, never
    channels); at a stage's end the patch merging reads the 2 x 2
    neighbouring tokens' channels concatenated (a linear map with K2 = 4
    taps per channel of every map of the stage's stream), and its output
    starts the next stage's stream."""
    edges, stream = set(), ["embeddings.patch_embeddings.projection"]
    for s, depth in enumerate(depths):
        blocks = [(f"encoder.layers.{s}.blocks.{b}.attention.", f"encoder.layers.{s}.blocks.{b}.mlp.")
                  for b in range(depth)]
        new, stream = prenorm_edges(blocks, stream)
        edges |= new
        if s < len(depths) - 1:
            merge = f"encoder.layers.{s}.downsample.reduction"
            edges |= {(p, merge) for p in stream}
            stream = [merge]
    return edges


# family: (its edges, the maps that read the input, the outputs: maps with no outgoing edge other than the
# queries and keys, which end in the attention scores)
FAMILIES = {
    "llama": (gated_edges, {"layers.0.self_attn.q_proj", "layers.0.self_attn.k_proj", "layers.0.self_attn.v_proj"},
              {"layers.1.mlp.down_proj"}),
    "qwen2": (gated_edges, {"layers.0.self_attn.q_proj", "layers.0.self_attn.k_proj", "layers.0.self_attn.v_proj"},
              {"layers.1.mlp.down_proj"}),
    "mistral": (gated_edges, {"layers.0.self_attn.q_proj", "layers.0.self_attn.k_proj",
                              "layers.0.self_attn.v_proj"}, {"layers.1.mlp.down_proj"}),
    "gpt_neox": (neox_edges, {"layers.0.attention.query_key_value", "layers.0.mlp.dense_h_to_4h"},
                 {"layers.1.attention.dense", "layers.1.mlp.dense_4h_to_h"}),
    "gpt2": (gpt2_edges, {"h.0.attn.c_attn"}, {"h.1.mlp.c_proj"}),
    "bert": (bert_edges, {f"encoder.layer.0.attention.self.{r}" for r in ("query", "key", "value")},
             {"pooler.dense"}),
    "t5": (t5_edges, {f"encoder.block.0.layer.0.SelfAttention.{r}" for r in "qkv"},
           {"encoder.block.1.layer.1.DenseReluDense.wo"}),
    "vit": (vit_edges, {"embeddings.patch_embeddings.projection"}, {"pooler.dense"}),
    "clip_vision_model": (clip_edges, {"embeddings.patch_embedding"}, {"encoder.layers.1.mlp.fc2"}),
    "swin": (swin_edges, {"embeddings.patch_embeddings.projection"}, {"encoder.layers.1.blocks.1.mlp.fc2"}),
}


@pytest.fixture(scope="module")
def models():
    """The models, each built once on first use (the first also imports transformers' modelling code)."""
    class Cache(dict):
        def __missing__(self, family):
            self[family] = build(family)
            return self[family]
    return Cache()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_transformers_families_have_their_stated_edges(models, family):
    """The stated edges; every map the forward runs has an incoming edge but
    those reading the input, and an outgoing one but the outputs and the
    queries and keys (named in stopped_at as ending in the scores)."""
    expected, reading_the_input, outputs = FAMILIES[family]
    model = models[family]
    with pytest.raises(Exception):
        torch.fx.symbolic_trace(model)  # the reason for the eager tracer
    g = se.discover(model, inputs(family))
    assert g.traced and g.tracer == "eager"
    assert {(c.previous, c.next) for c in g.connections} == expected()
    run = {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))} | set(g.maps)
    assert set(g.maps) == run  # every linear map of the model is one the forward ran
    fed, feeding = {c.next for c in g.connections}, {c.previous for c in g.connections}
    assert {n for n in g.maps if n not in fed} == reading_the_input
    scores = {n for s in g.stopped_at for names in re.findall(r"end in the scores: (.*)\)$", s)
              for n in names.split(", ")}
    assert {n for n in g.maps if n not in feeding} - scores == outputs  # packed q, k, v feed on: no exception
    for c in g.connections:  # every edge reads real channels of its producer and real rows of its reader
        assert 0 <= int(c.channels.min()) and int(c.channels.max()) < g.maps[c.previous].out_channels
        assert int(c.rows.max()) < g.maps[c.next].in_channels and c.null_dimension > 0


@pytest.mark.parametrize("family", list(FAMILIES))
def test_svr_runs_on_transformers_with_thresholds_on_those_edges(models, family):
    s = se.svr(models[family], inputs(family), progress=False, dtype=torch.float64)
    assert set(s.edges) == FAMILIES[family][0]()
    for e in range(len(s.edges)):
        A = s.adjacency(e)
        assert torch.isfinite(A).all() and 0 < s.threshold(e) < 1
        # a random network's coefficients average 1 / n (seed 000 section 2.4): the null dimension fits
        assert float(A.mean()) * s.null_dimension(e) == pytest.approx(1, rel=0.35)
        assert s.significant(e).shape == A.shape


def test_swin_patch_merging_reads_four_neighbours_and_its_shifted_windows_move_tokens_only(models):
    """Swin's patch merging concatenates the channels of each 2 x 2
    neighbourhood (x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2]):
    producer channel c is read at inputs c, C + c, 2C + c and 3C + c of the
    reduction (K2 = 4, null dimension C). Block 1 shifts its windows by
    torch.roll, which moves tokens: its value channels reach its output
    projection one to one, as in block 0."""
    model = models["swin"]
    assert model.encoder.layers[0].blocks[1].shift_size == 1  # the shift runs
    g = se.discover(model, inputs("swin"))
    c = g.connection("encoder.layers.0.blocks.1.mlp.fc2", "encoder.layers.0.downsample.reduction")
    torch.testing.assert_close(c.channels, torch.arange(16))
    torch.testing.assert_close(c.rows, torch.arange(16)[:, None] + torch.tensor([0, 16, 32, 48]))
    assert c.kernel_area == 4 and c.null_dimension == 16
    for b in ("encoder.layers.0.blocks.0.attention.", "encoder.layers.0.blocks.1.attention."):
        c = g.connection(b + "v_proj", b + "o_proj")
        torch.testing.assert_close(c.rows[:, 0], torch.arange(16))


def test_grouped_query_attention_value_heads_reach_the_query_heads_that_share_them():
    """4 query heads, 2 key/value heads of 8 dims: value channel (kv head j,
    dim d) is read by o_proj's inputs of query heads 2j and 2j + 1 (two taps,
    null dimension the 16 value channels); q and k end in the scores. The
    eager attention (matmul, softmax, matmul, repeat_kv) and SDPA agree, with
    a batch of three and an attention mask too."""
    graphs = [se.discover(build("llama", attn), x) for attn in ("sdpa", "eager")
              for x in (tokens(), {**tokens(3), "attention_mask": torch.ones(3, 8, dtype=torch.long)})]
    c = graphs[0].connection("layers.0.self_attn.v_proj", "layers.0.self_attn.o_proj")
    torch.testing.assert_close(c.channels, torch.arange(16))
    head, dim = c.channels // 8, c.channels % 8
    torch.testing.assert_close(c.rows, torch.stack([(2 * head) * 8 + dim, (2 * head + 1) * 8 + dim], 1))
    assert c.kernel_area == 2 and c.null_dimension == 16
    assert any("q_proj" in s and "k_proj" in s for s in graphs[0].stopped_at)
    first = [(c.previous, c.next, c.rows.tolist()) for c in graphs[0].connections]
    for g in graphs[1:]:
        assert [(c.previous, c.next, c.rows.tolist()) for c in g.connections] == first


def test_grouped_query_co_svr_sums_the_heads_like_the_svr():
    """Between two Linears the co-SVR adjacency is the SVR's: the value ->
    output edge, read at two inputs per channel, included (svr.py sums the
    taps into a Linear in both)."""
    model, x = build("llama"), tokens()
    s, co = (f(model, x, progress=False, dtype=torch.float64) for f in (se.svr, se.co_svr))
    for e in range(len(s.edges)):
        torch.testing.assert_close(co.adjacency(e), s.adjacency(e))
        assert co.threshold(e) == pytest.approx(s.threshold(e))


def test_packed_qkv_connects_through_the_value_channels_only():
    """GPT-NeoX packs each head's q, k, v (8 dims each) in query_key_value and
    chunks them; GPT-2 splits c_attn's 96 outputs in thirds."""
    g = se.discover(build("gpt_neox"), tokens())
    c = g.connection("layers.0.attention.query_key_value", "layers.0.attention.dense")
    expected = torch.cat([torch.arange(24 * h + 16, 24 * h + 24) for h in range(4)])
    torch.testing.assert_close(c.channels, expected)
    torch.testing.assert_close(c.rows[:, 0], torch.arange(32))
    g = se.discover(build("gpt2"), tokens())
    c = g.connection("h.0.attn.c_attn", "h.0.attn.c_proj")
    torch.testing.assert_close(c.channels, torch.arange(64, 96))
    assert c.null_dimension == 96


def test_conv1d_is_a_linear_map_with_its_weight_transposed():
    """transformers' Conv1D (weight stored (in, out)) is a "linear" map whose
    matrix is the nn.Linear one: the SVR of a Conv1D chain equals that of the
    same chain built from nn.Linear."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = nn.Sequential(Conv1D(6, 4), nn.ReLU(), Conv1D(3, 6))
    linear = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    with torch.no_grad():
        for c, lin in ((conv[0], linear[0]), (conv[2], linear[2])):
            lin.weight.copy_(c.weight.t())
            lin.bias.copy_(c.bias)
    x = torch.randn(1, 4)
    a, b = se.svr(conv, x, dtype=torch.float64), se.svr(linear, x, dtype=torch.float64)
    m = a.graph.maps["0"]
    assert isinstance(m, TransposedLinearMap) and m.kind == "linear" and (m.in_channels, m.out_channels) == (4, 6)
    torch.testing.assert_close(m.matrix(), conv[0].weight.t())
    assert a.edges == b.edges == [("0", "2")]
    torch.testing.assert_close(a.adjacency(0), b.adjacency(0))


def small_maxvit():
    """MaxViT's smallest torchvision variant wants 224 x 224 inputs (a minute
    to trace on 2 cores): the same blocks, two stages, on 32 x 32."""
    from torchvision.models.maxvit import MaxVit

    return MaxVit(input_size=(32, 32), stem_channels=8, partition_size=2, block_channels=[16, 32],
                  block_layers=[1, 1], head_dim=8, stochastic_depth_prob=0.0, num_classes=10).eval()


# every torchvision classification family: its smallest variant (a builder, an input size)
TORCHVISION = {
    "alexnet": (lambda: cheap_model("alexnet"), 64),
    "convnext": (lambda: cheap_model("convnext_tiny"), 32),
    "densenet": (lambda: cheap_model("densenet121"), 32),
    "efficientnet": (lambda: cheap_model("efficientnet_b0"), 32),
    "efficientnet_v2": (lambda: cheap_model("efficientnet_v2_s"), 32),
    "googlenet": (lambda: cheap_model("googlenet", aux_logits=False, init_weights=False), 32),
    "inception_v3": (lambda: cheap_model("inception_v3", aux_logits=False, init_weights=False), 75),
    "maxvit": (small_maxvit, 32),
    "mnasnet": (lambda: cheap_model("mnasnet0_5"), 32),
    "mobilenet_v2": (lambda: cheap_model("mobilenet_v2"), 32),
    "mobilenet_v3": (lambda: cheap_model("mobilenet_v3_small"), 32),
    "regnet": (lambda: cheap_model("regnet_x_400mf"), 32),
    "resnet": (lambda: cheap_model("resnet18"), 32),
    "resnext": (lambda: cheap_model("resnext50_32x4d"), 32),
    "shufflenet_v2": (lambda: cheap_model("shufflenet_v2_x0_5"), 32),
    "squeezenet": (lambda: cheap_model("squeezenet1_1"), 32),
    "swin": (lambda: cheap_model("swin_t"), 32),
    "vgg": (lambda: cheap_model("vgg11"), 32),
    "vit": (lambda: cheap_model("vit_b_16", image_size=32), 32),
    "wide_resnet": (lambda: cheap_model("wide_resnet50_2"), 32),
}
# fx keeps a function whole that calls maps by their weights: Swin's shifted_window_attention (F.linear on
# attn.qkv and attn.proj); the eager tracer sees those calls. (ViT's nn.MultiheadAttention, a leaf for fx,
# has its rule in both tracers.)
FX_SEES_FEWER = {"swin"}
SLOW_TORCHVISION = {"densenet", "efficientnet_v2", "googlenet", "vit", "resnext", "wide_resnet", "convnext",
                    "shufflenet_v2", "efficientnet", "inception_v3", "alexnet"}


@pytest.mark.parametrize("family", [pytest.param(f, marks=pytest.mark.slow) if f in SLOW_TORCHVISION else f
                                    for f in TORCHVISION])
def test_forced_eager_tracer_gives_the_fx_graph_on_every_torchvision_family(family):
    """The eager tracer gives torch.fx's graph (edges, their channels and
    rows, the maps' order, their BatchNorms) on every family fx follows
    whole; where fx misses maps (FX_SEES_FEWER) "auto" takes the eager graph,
    which holds fx's edges and more. Either way every map the forward runs
    has an incoming edge but the stem (ViT's out_proj too: it reads the
    value rows of its attention's in_proj_weight, a map) and an outgoing one
    but the classifier."""
    pytest.importorskip("torchvision")
    build, size = TORCHVISION[family]
    model, x = build(), torch.zeros(1, 3, size, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fx's warnings on torchvision's wrapped functions
        fx, eager = (se.discover(model, x, tracer=t) for t in ("fx", "eager"))
        auto = se.discover(model, x) if family in FX_SEES_FEWER else fx  # else fx, it sees every map run
    assert (fx.tracer, eager.tracer) == ("fx", "eager")

    def edges(g):
        return [(c.previous, c.next, c.kind, c.channels.tolist(), c.rows.tolist(), c.null_dimension)
                for c in g.connections]

    if family in FX_SEES_FEWER:
        assert auto.tracer == "eager" and edges(auto) == edges(eager)
        assert {e[:2] for e in edges(fx)} < {e[:2] for e in edges(eager)}
    else:
        assert edges(eager) == edges(fx) and list(eager.maps) == list(fx.maps)
        assert [m.batchnorm_name for m in eager.maps.values()] == [m.batchnorm_name for m in fx.maps.values()]
    fed, feeding = {c.next for c in eager.connections}, {c.previous for c in eager.connections}
    stem, classifier = next(iter(eager.maps)), list(eager.maps)[-1]
    assert {n for n in eager.maps if n not in fed} == {stem}
    assert {n for n in eager.maps if n not in feeding} == {classifier}


def small_vit():
    """torchvision's VisionTransformer, two blocks 32 wide (its head, zero
    at initialisation, drawn at random: an SVD needs a spectrum)."""
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=16, patch_size=4, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64,
                              num_classes=10).eval()
    nn.init.normal_(model.heads.head.weight)
    return model


def torchvision_vit_edges(layers=2):
    """torchvision's ViT: pre-norm blocks whose attention is an
    nn.MultiheadAttention, its q, k, v packed in in_proj_weight (one map):
    conv_proj (the patches as tokens) and each block's out_proj and mlp.3
    write the stream that every later in_proj and mlp.0 reads through its
    LayerNorm; in_proj -> out_proj through its value rows. The head reads the
    class token, which no patch reaches but through an attention: the stream
    less conv_proj."""
    blocks = [(f"encoder.layers.encoder_layer_{i}.self_attention.", f"encoder.layers.encoder_layer_{i}.mlp.")
              for i in range(layers)]
    edges, stream = prenorm_edges(blocks, ["conv_proj"], ("in_proj_weight",) * 3, "out_proj", ("0", "3"))
    return edges | {(s, "heads.head") for s in stream[1:]}


def torch_encoder(norm_first=False, batch_first=True):
    """torch's own nn.TransformerEncoder (two layers, 16 wide, 2 heads)
    between a Linear that embeds the tokens and one that reads them."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=batch_first, norm_first=norm_first)
    return nn.Sequential(nn.Linear(8, 16), nn.TransformerEncoder(layer, 2, enable_nested_tensor=False),
                         nn.Linear(16, 3)).eval()


def torch_encoder_edges(layers=2):
    """nn.TransformerEncoder, post-norm (norm(x + block(x))) or pre-norm:
    either way every block reads the stream written by the embedding and the
    earlier out_proj and linear2 (through the LayerNorms), in_proj -> out_proj
    through its value rows, linear1 -> linear2, and the last Linear reads
    the stream."""
    blocks = [(f"1.layers.{i}.self_attn.", f"1.layers.{i}.") for i in range(layers)]
    edges, stream = prenorm_edges(blocks, ["0"], ("in_proj_weight",) * 3, "out_proj", ("linear1", "linear2"))
    return edges | {(s, "2") for s in stream}


ATTENTION_MODELS = {  # a builder, an input, the edges, the maps reading the input, the outputs
    "torchvision_vit": (small_vit, lambda: torch.randn(1, 3, 16, 16), torchvision_vit_edges, {"conv_proj"},
                        {"heads.head"}),
    "torch_encoder": (torch_encoder, lambda: torch.randn(2, 5, 8), torch_encoder_edges, {"0"}, {"2"}),
    "torch_encoder_norm_first": (lambda: torch_encoder(norm_first=True, batch_first=False),
                                 lambda: torch.randn(5, 2, 8), torch_encoder_edges, {"0"}, {"2"}),
}


@pytest.mark.parametrize("name", list(ATTENTION_MODELS))
def test_multihead_attention_in_proj_is_a_map_on_the_value_path(name):
    """nn.MultiheadAttention's in_proj_weight is the map
    "<attention>.in_proj_weight": the stated edges; every map has an incoming
    edge but those reading the input and an outgoing one but the outputs and
    the q and k rows (named in stopped_at); out_proj reads the value rows
    (2E + c -> input c, one to one: each head's values to the same head's
    inputs); the same graph from torch.fx where it traces the model
    (torchvision's ViT: the attention is an fx leaf), and "auto" takes the
    eager tracer on nn.TransformerEncoder, whose forward fx cannot follow."""
    pytest.importorskip("torchvision")
    build_model, example, expected, reading_the_input, outputs = ATTENTION_MODELS[name]
    model, x = build_model(), example()
    g = se.discover(model, x)
    assert g.tracer == ("fx" if name == "torchvision_vit" else "eager")
    assert {(c.previous, c.next) for c in g.connections} == expected()
    run = {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    projections = {n + ".in_proj_weight" for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
    assert set(g.maps) == run | projections and len(projections) == 2
    fed, feeding = {c.next for c in g.connections}, {c.previous for c in g.connections}
    assert {n for n in g.maps if n not in fed} == reading_the_input
    scores = {n for s in g.stopped_at for names in re.findall(r"end in the scores: (.*)\)$", s)
              for n in names.split(", ")}
    assert scores == projections
    assert {n for n in g.maps if n not in feeding} == outputs  # the packed projections feed on: no exception
    for p in projections:
        m = g.maps[p]
        assert (m.kind, m.in_channels, m.out_channels) == ("linear", m.out_channels // 3, m.out_channels)
        assert m.module.weight is m.module.attention.in_proj_weight
        torch.testing.assert_close(m.matrix(), m.module.attention.in_proj_weight.detach())
        e = m.in_channels
        c = g.connection(p, p.replace("in_proj_weight", "out_proj"))
        torch.testing.assert_close(c.channels, torch.arange(2 * e, 3 * e))
        torch.testing.assert_close(c.rows, torch.arange(e)[:, None])
        assert c.kind == "fc" and c.null_dimension == 3 * e
    eager = se.discover(model, x, tracer="eager")

    def edges(graph):
        return [(c.previous, c.next, c.kind, c.channels.tolist(), c.rows.tolist(), c.null_dimension)
                for c in graph.connections]

    assert edges(eager) == edges(g) and list(eager.maps) == list(g.maps)
    if name == "torchvision_vit":
        fx = se.discover(model, x, tracer="fx")
        assert edges(fx) == edges(eager) and list(fx.maps) == list(eager.maps)
    else:  # the encoder is an fx leaf whose maps fx never sees run: the flow ends there, named
        fx = se.discover(model, x, tracer="fx")
        assert not fx.connections and any("target=1]" in s for s in fx.stopped_at)


@pytest.mark.parametrize("name", list(ATTENTION_MODELS))
def test_svr_runs_on_multihead_attention_with_thresholds_on_those_edges(name):
    """The SVR and co-SVR read in_proj_weight as the map's matrix (3E, E): the
    thresholds of every edge, in_proj -> out_proj included; a zoo member's
    graph (for_model) binds its own attention's parameter; compress
    truncates in_proj_weight in the copy."""
    pytest.importorskip("torchvision")
    build_model, example, expected, _, _ = ATTENTION_MODELS[name]
    model, x = build_model(), example()
    s = se.svr(model, x, progress=False, dtype=torch.float64)
    assert set(s.edges) == expected()
    for e in range(len(s.edges)):
        A = s.adjacency(e)
        assert torch.isfinite(A).all() and 0 < s.threshold(e) < 1
        assert float(A.mean()) * s.null_dimension(e) == pytest.approx(1, rel=0.35)
    co = se.co_svr(model, x, progress=False, dtype=torch.float64)
    assert set(co.edges) == expected()
    p = next(n for n in s.graph.maps if n.endswith("in_proj_weight"))
    other = build_model()
    bound = s.graph.for_model(other).maps[p]
    assert bound.module.weight is se.layers._submodule(other, p.rpartition(".")[0]).in_proj_weight
    assert se.layers.weight_of(bound.module).shape == s.graph.maps[p].module.weight.shape
    small = s.compress({p: 2})
    assert int(torch.linalg.matrix_rank(se.layers._submodule(small, p.rpartition(".")[0]).in_proj_weight)) == 2
    assert se.layers._submodule(model, p.rpartition(".")[0]).in_proj_weight.detach().abs().sum() > 0  # untouched


def test_multihead_attention_with_its_own_q_k_v_weights_and_cross_attention():
    """An attention with kdim = vdim = 8 != E = 16 keeps q_proj_weight,
    k_proj_weight and v_proj_weight apart (one map each, named as
    weights.py's rows): q reads the queries' producer, k and v the memory's
    (cross-attention); v -> out_proj one to one; q and k end in the scores.
    The attention weights it returns (need_weights) carry no channel. fx and
    the eager tracer agree."""
    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.kv = nn.Linear(4, 16), nn.Linear(4, 8)
            self.attn = nn.MultiheadAttention(16, 2, kdim=8, vdim=8, batch_first=True)
            self.head = nn.Linear(16, 3)

        def forward(self, x, memory):
            q = self.q(x)
            h, weights = self.attn(q, self.kv(memory), self.kv(memory))
            return self.head(q + h), weights

    torch.manual_seed(0)
    model = Cross().eval()
    x = (torch.randn(1, 5, 4), torch.randn(1, 7, 4))
    graphs = [se.discover(model, x, tracer=t) for t in ("fx", "eager")]
    for g in graphs:
        assert list(g.maps) == ["q", "kv", "attn.q_proj_weight", "attn.k_proj_weight", "attn.v_proj_weight",
                                "attn.out_proj", "head"]
        assert {(c.previous, c.next) for c in g.connections} == {
            ("q", "attn.q_proj_weight"), ("kv", "attn.k_proj_weight"), ("kv", "attn.v_proj_weight"),
            ("attn.v_proj_weight", "attn.out_proj"), ("q", "head"), ("attn.out_proj", "head")}
        torch.testing.assert_close(g.connection("attn.v_proj_weight", "attn.out_proj").channels, torch.arange(16))
        assert any(s.endswith("end in the scores: attn.q_proj_weight, attn.k_proj_weight)") for s in g.stopped_at)
        m = g.maps["attn.v_proj_weight"]
        assert (m.in_channels, m.out_channels) == (8, 16) and m.module.weight is model.attn.v_proj_weight
        torch.testing.assert_close(m.module.bias, model.attn.in_proj_bias[32:])
    assert [(c.previous, c.next, c.rows.tolist()) for c in graphs[0].connections] == \
        [(c.previous, c.next, c.rows.tolist()) for c in graphs[1].connections]
    s = se.svr(model, x, progress=False, dtype=torch.float64)
    assert all(0 < s.threshold(e) < 1 for e in range(len(s.edges)))


def test_rules_on_a_small_model():
    """A functional call on a map's weight runs that map; constant padding
    reads no channel; x[idx] = y moves y's channels; softmax over channels
    ends the flow and is named; the model's hooks and mode are gone after."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c, self.d, self.e = (nn.Linear(4, 6), nn.Linear(8, 3), nn.Linear(6, 2),
                                                      nn.Linear(6, 2), nn.Linear(6, 2))

        def forward(self, x):
            h = torch.relu(F.linear(x, self.a.weight, self.a.bias))  # self.a used functionally
            z = h.new_zeros(h.shape)
            z[:, 3:] = h[:, :3]
            return self.b(F.pad(h, (1, 1))), self.c(z), self.d(h.softmax(-1)), self.e(h * 2 + 1)

    model = Net()
    g = se.discover(model, torch.randn(1, 4), tracer="eager")
    assert {(c.previous, c.next) for c in g.connections} == {("a", "b"), ("a", "c"), ("a", "e")}
    torch.testing.assert_close(g.connection("a", "b").rows[:, 0], torch.arange(1, 7))
    c = g.connection("a", "c")
    torch.testing.assert_close(c.channels, torch.arange(3))
    torch.testing.assert_close(c.rows[:, 0], torch.arange(3, 6))
    assert any(s.startswith("softmax") for s in g.stopped_at)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert not torch.overrides._get_current_function_mode_stack()


def test_dict_inputs_and_tracer_choices():
    model = build("gpt2")
    with pytest.raises(ValueError, match="tracer must be one of"):
        se.discover(model, tokens(), tracer="jit")
    with pytest.raises(ValueError, match="not a dict"):
        se.discover(model, tokens(), tracer="fx")
    with pytest.raises(ValueError, match="without a tensor"):
        se.discover(model, {"input_ids": None})
    with pytest.raises(ValueError, match="did not run"):
        se.discover(model, {"input_ids": torch.rand(1, 8)})  # an embedding needs integer ids
    with pytest.raises(ValueError, match="cannot pair 'h.0.attn.c_attn'"):
        se.discover(model, tokens(), tracer="order")  # the maps chained as they ran: q, k, v packed in 96 outputs
    order = se.discover(build("bert"), tokens(), tracer="order")  # chains, and connects key to value: no dataflow
    assert not order.traced and order.tracer == "order" and len(order.connections) == len(order.maps) - 1
    assert ("encoder.layer.0.attention.self.key", "encoder.layer.0.attention.self.value") in {
        (c.previous, c.next) for c in order.connections}


def test_discovery_on_the_meta_device():
    """Probes are computed on the CPU from shapes alone, so a model built on the
    meta device (no weights in memory) is traced too: the same graph."""
    with torch.device("meta"):
        meta = build("llama")
    x = {"input_ids": tokens()["input_ids"].to("meta")}
    g = se.discover(meta, x)
    assert {(c.previous, c.next) for c in g.connections} == gated_edges()
    real = se.discover(build("llama"), tokens())
    assert [c.rows.tolist() for c in g.connections] == [c.rows.tolist() for c in real.connections]


@pytest.mark.slow
def test_qwen2_half_billion_shape_on_the_meta_device():
    """Qwen2-0.5B's shape (24 layers, 896 wide, 14 query and 2 key/value heads,
    4864-wide gated MLP) built on the meta device: every layer's edges, the
    residual stream read by every later layer (2880 edges), in seconds."""
    import time

    cfg = transformers.AutoConfig.for_model("qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                            num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                                            tie_word_embeddings=True)
    with torch.device("meta"):
        model = transformers.AutoModel.from_config(cfg).eval()
    start = time.process_time()
    g = se.discover(model, {"input_ids": torch.zeros(1, 8, dtype=torch.long, device="meta")})
    seconds = time.process_time() - start
    assert {(c.previous, c.next) for c in g.connections} == gated_edges(24)
    c = g.connection("layers.23.self_attn.v_proj", "layers.23.self_attn.o_proj")
    assert c.kernel_area == 7 and c.null_dimension == 128  # 7 query heads per key/value head of 64 dims
    assert seconds < 60
