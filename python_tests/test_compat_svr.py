"""spectral_ext.compat.svr.SVR (the SVR authors' call shape) against the
formulas of seed 000 / their code's conventions (PEERS.md) and against
spectral_ext.svr on the same weights."""
import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

import spectral_ext as se
from spectral_ext.compat.svr import SVR


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.Flatten(), nn.Linear(16 * 2 * 2, 10),
                         nn.ReLU(), nn.Linear(10, 5))


def weights(model):
    return [p.detach() for p in model.parameters()]


def test_attributes_shapes_and_the_authors_conventions():
    model = net()
    s = SVR(weights(model), max_dim_svd=6, verbose=False)
    assert s.arch == [3, 8, 16, 10, 5] and s.convolutional == [True, True, False, False]
    # min(shape) > max_dim_svd: the 6 leading neurons; else all of them.
    assert [len(x) for x in s.S] == [6, 6, 6, 5]
    assert tuple(s.U[0].shape) == (8, 6) and tuple(s.V[0].shape) == (3, 3, 3, 6)
    assert tuple(s.V[2].shape) == (16, 4, 1, 6)  # a Linear after a conv: (i, z, 1, m)
    for l, w in enumerate(weights(model)[::2]):
        np.testing.assert_allclose(s.S[l].numpy(), np.linalg.svd(w.reshape(w.shape[0], -1).numpy(),
                                                                 compute_uv=False)[:len(s.S[l])], rtol=1e-5)
    for l, a in enumerate(s.adjacency):
        n = s.arch[l + 1]
        # internal_dims: 0-based argmax of n B - i j (the authors' argmax2d: first row, then first column).
        B = np.cumsum(np.cumsum(a.double().numpy(), 0), 1)
        ij = np.arange(1, a.shape[0] + 1)[:, None] * np.arange(1, a.shape[1] + 1)[None, :]
        assert s.internal_dims(l) == np.unravel_index(np.argmax(n * B - ij), a.shape)
        res = np.maximum(np.cumsum(n * a.double().numpy() - 1, 0).max(0), 0)
        np.testing.assert_allclose(s.node_intensity(l).numpy(), res / res.max(), rtol=1e-5)
        f = s.adjacency_filters(l)
        torch.testing.assert_close(f.square().sum(tuple(range(1, f.dim() - 1))) if f.dim() > 2 else f.square(), a)
    assert torch.equal(s.node_intensity(3), torch.ones(5))
    ent = s.entropy()
    np.testing.assert_allclose(ent.numpy(), [float(-(a * a.log()).sum()) for a in s.adjacency], rtol=1e-5)
    x = torch.ones(6, dtype=torch.float64)
    for l in range(3):
        x = s.adjacency[l].double() @ (x * s.S[l].double())
    assert s.pathmetric() == pytest.approx(float((x * s.S[3]).sum()), rel=1e-5)


def test_same_numbers_as_spectral_ext_svr():
    model = net()
    x = torch.randn(1, 3, 6, 6)
    for method, build in (("svr", se.svr), ("cosvr", se.co_svr)):
        compat = SVR(weights(model), method=method, max_dim_svd=1000, verbose=False)
        ours = build(model, x, dtype=torch.float64)
        for l in range(len(compat.adjacency)):
            torch.testing.assert_close(compat.adjacency[l].double(), ours.adjacency(l), atol=1e-5, rtol=1e-4)
            d_out, d_in = ours.internal_dimensions(l)
            assert compat.internal_dims(l) == (d_out - 1, d_in - 1)
        assert compat.pathmetric() == pytest.approx(ours.path_metric(), rel=1e-4)
        # cosvr: U (o, K, K, m) for convolutions.
        if method == "cosvr":
            assert tuple(compat.U[0].shape) == (8, 3, 3, 3) and tuple(compat.V[1].shape) == (8, 8)


def test_threshold_matches_the_authors_emin_and_plot(tmp_path):
    model = net()
    s = SVR(weights(model), verbose=False)
    p = stats.norm.sf(3)
    # Emin = chi2.ppf(1 - p, z) / z / arch[k + 1], z = K^2 (conv -> conv), H * W (conv -> FC), 1 (FC).
    for k, z in enumerate([9, 4, 1]):
        assert s.svr.threshold(k) == pytest.approx(stats.chi2.ppf(1 - p, z) / z / s.arch[k + 1], rel=1e-9)
    import matplotlib.pyplot
    from matplotlib.collections import LineCollection, PathCollection

    for sigma in (3, 1):  # a random net has no 3-sigma edge; at 1 sigma about 16% of coefficients
        fig = s.plot(sigma_threshold=sigma)
        fig.savefig(tmp_path / "svr.png")
        ax = fig.axes[0]
        lines = [c for c in ax.collections if isinstance(c, LineCollection)]
        view = se.svr(s.svr.model, p=float(stats.norm.sf(sigma)), graph=s.svr.graph, top=s.max_dim_svd,
                      progress=False)
        expected = sum(min(int(view.significant(k).sum()), 100 * 3) for k in range(3))
        assert sum(len(c.get_segments()) for c in lines) == expected and (expected > 0) == (sigma == 1)
        points = [c for c in ax.collections if isinstance(c, PathCollection)]
        assert [len(c.get_offsets()) for c in points] == [len(S) for S in s.S]  # every spectral neuron
        assert f"p = {stats.norm.sf(sigma):g}" in ax.get_title()
        matplotlib.pyplot.close(fig)


def test_bad_input():
    with pytest.raises(ValueError, match="method must be"):
        SVR([torch.randn(3, 3)], method="nope")
    with pytest.raises(ValueError, match="max_dim_svd"):
        SVR([torch.randn(3, 3)], max_dim_svd=0)
    with pytest.raises(TypeError, match="list of tensors"):
        SVR([np.ones((3, 3))])
    with pytest.raises(ValueError, match="2-D .* or 4-D"):
        SVR([torch.randn(3, 3, 3)])
    with pytest.raises(ValueError, match="cannot pair"):
        SVR([torch.randn(4, 3), torch.randn(2, 5)])
