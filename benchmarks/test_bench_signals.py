"""Signal vectors (seed 001 section 4.3) of two conv layers over a stream of
10,000 random CIFAR-size images through a small CNN: the native path
(signal_projection, mean over positions, no unfolded matrix) against the
unfold-based PyTorch a user would write. Reports images per second."""
import pytest
import torch
from torch import nn

import spectral_ext

from conftest import timed

signals_module = spectral_ext.receptive_fields
N, BATCH = 10000, 500


def small_cnn(device):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * 16 * 16, 10)).to(device).eval()


def unfold_signal_vectors(model, images, bases):
    """Hooks capture each layer input; Psi(X) by F.unfold; signals = s * V^T Psi, averaged."""
    out = {name: [] for name in bases}
    captured = {}
    handles = [model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: captured.__setitem__(n, a[0]))
               for n in bases]
    with torch.no_grad():
        for x in images.split(BATCH):
            model(x)
            for name, basis in bases.items():
                conv = basis.module
                psi = nn.functional.unfold(captured[name], conv.kernel_size, conv.dilation, conv.padding, conv.stride)
                V = basis.V.to(psi.dtype).to(psi.device)
                out[name].append((V.T @ psi).mean(-1) * basis.S.to(psi.dtype).to(psi.device))
    for h in handles:
        h.remove()
    return {n: torch.cat(v) for n, v in out.items()}


@pytest.mark.parametrize("impl", ["native", "unfold"])
def test_signal_vectors_10000_images(benchmark, device, impl):
    model = small_cnn(device)
    images = torch.rand(N, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)
    bases = signals_module.layer_bases(model, ["0", "2"], images[:1])
    if impl == "native":
        fn = lambda: signals_module.signal_vectors(model, ["0", "2"], images, batch_size=BATCH,
                                                  progress=False).vectors
    else:
        fn = lambda: unfold_signal_vectors(model, images, bases)
    benchmark.group = f"signal vectors of 2 conv layers, 10,000 images 3x32x32, small CNN [{device}]"
    benchmark.extra_info["impl"] = impl
    result = benchmark.pedantic(timed(fn, device), rounds=2, iterations=1, warmup_rounds=0)
    print(f"\n{impl}: {N / benchmark.stats.stats.median:.0f} images/s")
    assert result["2"].shape == (N, 64)
