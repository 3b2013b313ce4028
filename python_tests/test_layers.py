"""Layer discovery (spectral_ext.layers): the dataflow of real architectures
(issue 14 item 13), the chain graph of the SVR authors' convention, and the
FC -> FC grouping checked against a direct per-channel construction."""
import time

import pytest
import torch
from torch import nn

import spectral_ext as se
from spectral_ext.layers import chain_graph

from conftest import cheap_model

torchvision = pytest.importorskip("torchvision")

# Over 100M parameters, or dense/deep dataflows that take 10-40 s to trace on 2 loaded cores: -m slow.
HEAVY = {"vit_h_14", "vit_l_16", "vit_l_32", "vit_b_16", "vit_b_32", "swin_v2_b", "swin_b", "swin_s", "swin_v2_s",
         "maxvit_t", "convnext_tiny", "convnext_small", "convnext_base", "convnext_large", "inception_v3",
         "densenet121", "densenet161", "densenet169", "densenet201", "wide_resnet101_2", "resnet152", "resnet101",
         "resnext101_32x8d", "resnext101_64x4d", "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn",
         "vgg19", "vgg19_bn"}
HEAVY |= {f"efficientnet_b{i}" for i in range(2, 8)} | {"efficientnet_v2_s", "efficientnet_v2_m", "efficientnet_v2_l"}
HEAVY |= {f"regnet_{k}_{s}" for k in "xy" for s in ("3_2gf", "8gf", "16gf", "32gf", "128gf")}


def example(name):
    if name.startswith("vit"):
        size = 28 if name == "vit_h_14" else 32  # a multiple of the patch size
        return {"image_size": size}, torch.zeros(1, 3, size, size)
    if name == "maxvit_t":  # 7 x 7 partitions after a total stride of 32
        return {}, torch.zeros(1, 3, 224, 224)
    if name.startswith(("inception", "googlenet")):
        return {"init_weights": False, "aux_logits": False}, torch.zeros(1, 3, 96, 96)
    size = 64 if name == "alexnet" else 32  # AlexNet's pools need 64 x 64
    return {}, torch.zeros(1, 3, size, size)


def classification_models():
    names = torchvision.models.list_models(module=torchvision.models)
    return [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in names]


@pytest.mark.parametrize("name", classification_models())
def test_every_torchvision_classifier_connects_or_names_what_stopped_it(name):
    kwargs, x = example(name)
    model = cheap_model(name, **kwargs)
    g = se.discover(model, x)
    assert g.traced and g.connections, f"{name}: no connection found"
    reached = {c.next for c in g.connections}
    cut = [n for n in list(g.maps)[1:] if n not in reached]
    # A map nobody feeds is fine only when an operation that ended a flow is named.
    assert not cut or g.stopped_at, f"{name}: {cut[:3]} have no input edge and no stopping operation is named"
    for c in g.connections:
        nxt = g.maps[c.next]
        assert c.rows.max() < nxt.in_channels * (nxt.kernel_area if nxt.kind != "linear" else 1)
        assert c.channels.max() < g.maps[c.previous].out_channels


def test_shufflenet_channel_shuffle_is_traced_exactly():
    """cat -> view -> transpose -> contiguous -> view -> chunk (ShuffleNetV2):
    the second block's branch reads channels 12..23 of each first-block
    branch, interleaved."""
    kwargs, x = example("shufflenet_v2_x0_5")
    g = se.discover(cheap_model("shufflenet_v2_x0_5", **kwargs), x)
    a = g.connection("stage2.0.branch1.2", "stage2.1.branch2.0")
    b = g.connection("stage2.0.branch2.5", "stage2.1.branch2.0")
    torch.testing.assert_close(a.channels, torch.arange(12, 24))
    torch.testing.assert_close(b.channels, torch.arange(12, 24))
    torch.testing.assert_close(a.rows[:, 0], torch.arange(0, 24, 2))
    torch.testing.assert_close(b.rows[:, 0], torch.arange(1, 24, 2))
    assert a.null_dimension == 24 * 24 / 12


def test_vit_class_token_concatenated_on_the_token_axis():
    """The patches (conv_proj's channels) reach every block's inputs but the
    class token's row; the attention's packed in_proj_weight is a map, read
    by torch.fx too (the attention is an fx leaf with its rule): its value
    rows feed out_proj, its queries and keys end in the scores."""
    kwargs, x = example("vit_b_16")
    g = se.discover(cheap_model("vit_b_16", **kwargs), x)
    assert g.tracer == "fx"
    attention = "encoder.layers.encoder_layer_0.self_attention."
    for reader in ("encoder.layers.encoder_layer_0.mlp.0", attention + "in_proj_weight"):
        c = g.connection("conv_proj", reader)
        assert c.kind == "conv_linear" and c.kernel_area == 1
        torch.testing.assert_close(c.channels, torch.arange(768))
    torch.testing.assert_close(g.connection(attention + "in_proj_weight", attention + "out_proj").channels,
                               torch.arange(1536, 2304))
    assert f"multi_head_attention_forward (queries and keys end in the scores: {attention}in_proj_weight)" \
        in g.stopped_at


def test_fc_grouping_against_per_channel_masks_and_linear_time():
    """A permuted flatten into a wide Linear: the sorted grouping equals the
    direct construction (one mask per channel), and doubling the width does
    not quadruple the time."""
    class Net(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv = nn.Conv2d(1, c, 1)
            self.fc = nn.Linear(c * 4, 3)

        def forward(self, x):
            return self.fc(self.conv(x).permute(0, 2, 3, 1).flatten(1))  # position-major inputs

    g = se.discover(Net(6), torch.zeros(1, 1, 2, 2))
    c = g.connections[0]
    expected = torch.stack([torch.arange(4) * 6 + ch for ch in range(6)])  # feature = position * C + channel
    torch.testing.assert_close(c.rows, expected)
    times = {}
    for width in (2048, 8192):
        fc = nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 4))
        start = time.perf_counter()
        g = se.discover(fc, torch.zeros(1, 8))
        times[width] = time.perf_counter() - start
        assert len(g.connections) == 2
    assert times[8192] < 8 * times[2048] + 0.5  # the old per-channel loop was quadratic (16x)


def test_chain_graph_matches_the_traced_graph():
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.Flatten(), nn.Linear(5 * 2 * 2, 3),
                          nn.Linear(3, 2))
    traced, chained = se.discover(model, torch.zeros(1, 2, 6, 6)), chain_graph(model)
    assert not chained.traced
    for a, b in zip(traced.connections, chained.connections):
        assert (a.previous, a.next, a.kind, a.null_dimension) == (b.previous, b.next, b.kind, b.null_dimension)
        torch.testing.assert_close(a.rows, b.rows)
    with pytest.raises(ValueError, match="cannot pair"):
        chain_graph(nn.Sequential(nn.Linear(3, 4), nn.Linear(5, 2)))


def test_untraceable_conv_chain_keeps_its_null_dimension():
    """The forward-hook fallback once set a conv -> conv edge's n to in_channels // K^2 (0 here: infinite thresholds)."""
    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(2, 4, 3), nn.Conv2d(4, 3, 3)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow defeats fx
                x = -x
            return self.b(torch.relu(self.a(x)))

    model = Untraceable()
    x = torch.ones(1, 2, 7, 7)
    eager = se.svr(model, x, dtype=torch.float64)  # fx fails: the eager tracer follows the forward
    assert eager.graph.traced and eager.graph.tracer == "eager"
    chained = se.svr(model, x, dtype=torch.float64, graph=se.discover(model, x, tracer="order"))
    assert not chained.graph.traced and chained.graph.tracer == "order"
    traced = se.svr(nn.Sequential(model.a, nn.ReLU(), model.b), x, dtype=torch.float64)
    for s in (eager, chained):
        assert s.null_dimension(0) == traced.null_dimension(0) == 4
        assert s.threshold(0) == pytest.approx(traced.threshold(0))
        assert s.internal_dimensions(0) == traced.internal_dimensions(0)


def test_untraceable_model_order_comes_from_the_one_capture(monkeypatch):
    """The forward-hook fallback records the maps through _hooks.capturing, in
    the order they first ran (not registration order), starts afresh after a
    candidate input that fails, and leaves no hook behind."""
    import spectral_ext._hooks as hooks
    import spectral_ext.layers as layers

    class Reordered(nn.Module):
        def __init__(self):
            super().__init__()
            self.late, self.early = nn.Linear(4, 3), nn.Linear(5, 4)

        def forward(self, x):  # data-dependent control flow defeats fx
            return self.late(torch.relu(self.early(-x if x.sum() > 0 else x)))

    calls = []
    monkeypatch.setattr(layers, "capturing", lambda *a, **k: calls.append(list(a[1])) or hooks.capturing(*a, **k))
    model = Reordered()
    g = layers._discover_with_hooks(model, {n: layers._describe(n, m) for n, m in model.named_children()},
                                    [torch.ones(1, 7), torch.ones(1, 5)])  # the first candidate fails
    assert calls == [["late", "early"]] and list(g.maps) == ["early", "late"]
    assert [(c.previous, c.next) for c in g.connections] == [("early", "late")]
    assert not any(m._forward_hooks for m in model.modules())
