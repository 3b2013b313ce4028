"""The four operators, native versus the straightforward PyTorch a researcher
would write (spectral_ext.reference, plus peers where one exists), at the sizes
issue 2 names. Run: make bench (or pytest benchmarks)."""
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import spectral_ext as se
from spectral_ext import reference

from conftest import timed


def run(benchmark, group, impl, fn, device):
    benchmark.group = f"{group} [{device}]"
    benchmark.extra_info["impl"] = impl
    benchmark.extra_info["device"] = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    benchmark.pedantic(timed(fn, device), rounds=7, warmup_rounds=1, iterations=1)


@pytest.mark.parametrize("impl", ["native", "reference"])
def test_max_kernel_gram_self(benchmark, device, impl):
    X = torch.randn(1024, 128, 9, device=device)
    fn = {"native": lambda: se.max_kernel_gram(X), "reference": lambda: reference.max_kernel_gram(X)}[impl]
    run(benchmark, "max_kernel_gram self N=1024 C=128 S=9 f32", impl, fn, device)


@pytest.mark.parametrize("impl", ["native", "reference"])
def test_max_kernel_gram_cross(benchmark, device, impl):
    X, Y = torch.randn(1024, 128, 9, device=device), torch.randn(1024, 128, 9, device=device)
    fn = {"native": lambda: se.max_kernel_gram(X, Y), "reference": lambda: reference.max_kernel_gram(X, Y)}[impl]
    run(benchmark, "max_kernel_gram cross N=N'=1024 C=128 S=9 f32", impl, fn, device)


@pytest.mark.parametrize("impl", ["native", "reference"])
def test_sinkhorn(benchmark, device, impl):
    P = torch.rand(256, 128, 128, device=device) + 0.01
    fn = {"native": lambda: se.sinkhorn(P, 16), "reference": lambda: reference.sinkhorn(P, 16)}[impl]
    run(benchmark, "sinkhorn 256 x 128x128, 16 rounds f32", impl, fn, device)


def _signal_inputs(device):
    x = torch.randn(64, 64, 32, 32, device=device)
    V = torch.linalg.qr(torch.randn(576, 64, device=device))[0]
    s = torch.rand(64, device=device)
    return x, V, s


@pytest.mark.parametrize("impl", ["native", "reference", "conv2d"])
def test_signal_projection_mean(benchmark, device, impl):
    x, V, s = _signal_inputs(device)
    weight = (V * s).T.reshape(64, 64, 3, 3).contiguous()
    fn = {
        "native": lambda: se.signal_projection(x, V, s, padding=1, reduce="mean"),
        "reference": lambda: reference.signal_projection(x, V, s, (1, 1), (1, 1), (1, 1), "mean", (3, 3)),
        "conv2d": lambda: F.conv2d(x, weight, padding=1).mean((2, 3)),
    }[impl]
    run(benchmark, "signal_projection mean 64x64x32x32 3x3 r=64 f32", impl, fn, device)


@pytest.mark.parametrize("impl", ["native", "reference", "conv2d"])
def test_signal_projection_positions(benchmark, device, impl):
    x, V, s = _signal_inputs(device)
    weight = (V * s).T.reshape(64, 64, 3, 3).contiguous()
    fn = {
        "native": lambda: se.signal_projection(x, V, s, padding=1),
        "reference": lambda: reference.signal_projection(x, V, s, (1, 1), (1, 1), (1, 1), None, (3, 3)),
        "conv2d": lambda: F.conv2d(x, weight, padding=1),
    }[impl]
    run(benchmark, "signal_projection per position 64x64x32x32 3x3 r=64 f32", impl, fn, device)


@pytest.mark.parametrize("impl", ["native", "reference"])
def test_conv_adjacency(benchmark, device, impl):
    U = torch.randn(32, 128, 128, device=device)
    V = torch.randn(32, 128, 9, 128, device=device)
    fn = {"native": lambda: se.conv_adjacency(U, V), "reference": lambda: reference.conv_adjacency(U, V)}[impl]
    run(benchmark, "conv_adjacency 32 models c=128 3x3 128x128 f32", impl, fn, device)


_PEAK_SCRIPT = textwrap.dedent("""
    import sys, torch, spectral_ext as se
    from spectral_ext import reference

    def rss(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1])

    X = torch.randn(1024, 128, 9)
    fn = se.max_kernel_gram if sys.argv[1] == "native" else reference.max_kernel_gram
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
    before = rss("VmRSS:")
    fn(X)
    print(rss("VmHWM:") - before)
""")


def test_max_kernel_gram_peak_memory(device):
    """Extra peak memory of one call (N=1024, C=128, S=9, float32): the
    reference materialises (N, N, C); the native kernel only K."""
    peaks = {}
    for impl in ("native", "reference"):
        if device == "cuda":
            X = torch.randn(1024, 128, 9, device="cuda")
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            (se.max_kernel_gram if impl == "native" else reference.max_kernel_gram)(X)
            torch.cuda.synchronize()
            peaks[impl] = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            # A fresh process per path: ru_maxrss is a high-water mark.
            out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, impl], capture_output=True, text=True,
                                 check=True)
            peaks[impl] = int(out.stdout.strip().splitlines()[-1]) / 1024
    ratio = peaks["reference"] / max(peaks["native"], 1e-3)
    print(f"\nmax_kernel_gram peak extra memory [{device}]: native {peaks['native']:.1f} MiB, "
          f"reference {peaks['reference']:.1f} MiB, ratio {ratio:.1f}x")
    assert peaks["native"] < peaks["reference"]
