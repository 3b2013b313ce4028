"""The CUDA kernels on what they have never run (issue 15): batches past the
65,535 grid caps (the grid-stride loops), sizes that are not multiples of the
64-wide tiles or the 16-deep K tile, float32 and float64, non-contiguous
inputs, empty inputs, a second device index, every backward and opcheck.
Each result is compared with spectral_ext.reference run on the CPU in float64
on the same values. All skipped without a GPU (`make gpu-check` runs them)."""
import os

import pytest
import torch

import spectral_ext as se
from spectral_ext import reference

# SPECTRAL_EXT_CUDA_TESTS_DEVICE=cpu runs these same cases on the CPU kernels: a dry run of the
# tests themselves (their expectations, shapes and cost) on a machine without a GPU.
DEVICE = os.environ.get("SPECTRAL_EXT_CUDA_TESTS_DEVICE", "cuda")
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DTYPES = [torch.float32, torch.float64]
GRID_CAP = 65535


def tol(dtype, scale=1.0):
    """Tolerances for a native CUDA result against the float64 CPU reference."""
    if dtype == torch.float64:
        return dict(rtol=1e-10, atol=1e-10 * scale)
    return dict(rtol=3e-4, atol=3e-4 * scale)


def rand(*shape, seed=0, positive=False):
    """float64 CPU values (the reference's input); tests move copies to the GPU."""
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(*shape, generator=g, dtype=torch.float64) + 0.05 if positive else \
        torch.randn(*shape, generator=g, dtype=torch.float64)
    return t


def gpu(t, dtype, device=DEVICE, contiguous=True):
    """t on the GPU in dtype; contiguous=False: the same values in a transposed layout."""
    out = t.to(device=device, dtype=dtype)
    if not contiguous and t.dim() >= 2:
        out = out.transpose(0, -1).contiguous().transpose(0, -1)
        assert not out.is_contiguous() or 1 in t.shape or 0 in t.shape
    return out


def assert_matches_reference(native, expected, dtype):
    assert native.device.type == torch.device(DEVICE).type and native.dtype == dtype
    scale = float(expected.abs().max()) if expected.numel() else 1.0
    torch.testing.assert_close(native.cpu().double(), expected, **tol(dtype, max(scale, 1.0)))


@pytest.mark.skipif(DEVICE != "cuda", reason="a dry run on the CPU")
def test_build_has_the_cuda_kernels():
    # A GPU is visible, so a build without the CUDA kernels is the failure to report.
    info = se.build_info()
    assert info["cuda_compiled"], f"GPU visible but the extension is CPU-only: {info['build_reason']}"
    assert all("CUDA" in devices for devices in info["operators"].values()), info["operators"]


# ---------------------------------------------------------------- conv_adjacency

ADJ = [  # B, c, M, K2, N
    (1, 1, 1, 1, 1),
    (3, 17, 65, 9, 63),      # M, N across the 64 tile, c across the 16-deep K tile
    (2, 33, 130, 1, 129),
    (1, 5, 3, 49, 2),        # conv -> flatten -> Linear, K2 = 49
    (GRID_CAP + 5, 2, 3, 1, 3),  # B past the grid's z cap
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,c,M,K2,N", ADJ)
def test_conv_adjacency(dtype, B, c, M, K2, N):
    U, V = rand(B, c, M), rand(B, c, K2, N, seed=1)
    expected = reference.conv_adjacency(U, V)
    for contiguous in (True, False):
        assert_matches_reference(se.conv_adjacency(gpu(U, dtype, contiguous=contiguous), gpu(V, dtype, contiguous=contiguous)),
                expected, dtype)


@pytest.mark.parametrize("B,c,M,K2,N", [(0, 3, 4, 2, 5), (2, 0, 4, 2, 5), (2, 3, 0, 2, 5), (2, 3, 4, 2, 0)])
def test_conv_adjacency_empty(B, c, M, K2, N):
    out = se.conv_adjacency(torch.zeros(B, c, M, device=DEVICE), torch.zeros(B, c, K2, N, device=DEVICE))
    assert out.shape == (B, N, M) and out.device.type == torch.device(DEVICE).type and not out.any()


# ---------------------------------------------------------------- signal_projection

SIGNAL = [  # B, C, H, W, kernel, r, stride, padding, dilation
    (1, 1, 1, 1, (1, 1), 1, 1, 0, 1),
    (2, 3, 9, 8, (3, 3), 5, 1, 0, 1),
    (3, 5, 17, 13, (3, 3), 65, 1, 1, 1),          # r and the 17x13 positions across the 64 tile
    (2, 3, 10, 9, (2, 3), 7, (2, 1), (1, 0), (1, 2)),
    (1, 7, 16, 16, (5, 5), 130, 3, 2, 1),
    (GRID_CAP + 3, 1, 2, 2, (1, 1), 2, 1, 0, 1),   # B past the grid's z cap
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduce", [None, "mean"])
@pytest.mark.parametrize("B,C,H,W,k,r,stride,padding,dilation", SIGNAL)
def test_signal_projection(dtype, reduce, B, C, H, W, k, r, stride, padding, dilation):
    x, V, s = rand(B, C, H, W), rand(C * k[0] * k[1], r, seed=1), rand(r, seed=2, positive=True)
    pair = lambda v: (v, v) if isinstance(v, int) else v  # noqa: E731
    expected = reference.signal_projection(x, V, s, pair(stride), pair(padding), pair(dilation), reduce, k)
    for contiguous in (True, False):
        out = se.signal_projection(gpu(x, dtype, contiguous=contiguous), gpu(V, dtype, contiguous=contiguous),
                                   gpu(s, dtype), stride=stride, padding=padding, dilation=dilation, reduce=reduce,
                                   kernel_size=k)
        assert_matches_reference(out, expected, dtype)


def test_signal_projection_mean_many_planes():
    # B * C past the mean kernel's 2^20-block grid: its plane loop strides.
    x, V, s = rand(1030, 1024, 1, 1), rand(1024, 3, seed=1), rand(3, seed=2, positive=True)
    expected = reference.signal_projection(x, V, s, (1, 1), (0, 0), (1, 1), "mean", (1, 1))
    assert_matches_reference(se.signal_projection(gpu(x, torch.float64), gpu(V, torch.float64), gpu(s, torch.float64),
                                 reduce="mean"), expected, torch.float64)


@pytest.mark.parametrize("reduce", [None, "mean"])
def test_signal_projection_empty_batch(reduce):
    x, V, s = torch.zeros(0, 2, 5, 5, device=DEVICE), torch.randn(18, 4, device=DEVICE), torch.rand(4, device=DEVICE)
    out = se.signal_projection(x, V, s, padding=1, reduce=reduce)
    assert out.shape == ((0, 4) if reduce else (0, 4, 5, 5)) and out.device.type == torch.device(DEVICE).type


# ---------------------------------------------------------------- sinkhorn

SINK = [  # B, n, m, iters
    (1, 1, 1, 3),
    (4, 5, 7, 16),           # rectangular
    (2, 65, 130, 8),
    (3, 6, 6, 0),            # no rounds: P itself
    (GRID_CAP + 7, 3, 3, 16),  # B past the grid cap: the block loop strides
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,n,m,iters", SINK)
def test_sinkhorn(dtype, B, n, m, iters):
    P = rand(B, n, m, positive=True)
    expected = reference.sinkhorn(P, iters)
    for contiguous in (True, False):
        assert_matches_reference(se.sinkhorn(gpu(P, dtype, contiguous=contiguous), iters), expected, dtype)


def test_sinkhorn_scales_in_global_memory():
    # (n + m) float64 scales past 48 KiB of shared memory: the global workspace path.
    P = rand(2, 3100, 3100, positive=True)
    assert_matches_reference(se.sinkhorn(gpu(P, torch.float64), 3), reference.sinkhorn(P, 3), torch.float64)


@pytest.mark.parametrize("shape", [(0, 4, 4), (2, 0, 3), (2, 3, 0)])
def test_sinkhorn_empty(shape):
    out = se.sinkhorn(torch.ones(shape, device=DEVICE), 4)
    assert out.shape == shape and out.device.type == torch.device(DEVICE).type


# ---------------------------------------------------------------- max_kernel_gram

GRAM = [  # N, N', C, S
    (1, 1, 1, 1),
    (63, 65, 3, 9),          # across the 64 tile
    (130, 7, 17, 16),        # S a whole K tile
    (65, 129, 5, 17),        # S one past it
    (20, 30, 300, 1),        # many channels, fully connected features
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,Np,C,S", GRAM)
def test_max_kernel_gram(dtype, N, Np, C, S):
    X, Y = rand(N, C, S), rand(Np, C, S, seed=1)
    for contiguous in (True, False):
        Xg, Yg = gpu(X, dtype, contiguous=contiguous), gpu(Y, dtype, contiguous=contiguous)
        assert_matches_reference(se.max_kernel_gram(Xg, Yg), reference.max_kernel_gram(X, Y), dtype)
        self_gram = se.max_kernel_gram(Xg)
        assert_matches_reference(self_gram, reference.max_kernel_gram(X), dtype)
        assert torch.equal(self_gram, self_gram.T)  # computed symmetric, as documented


@pytest.mark.parametrize("N,Np", [(0, 3), (3, 0), (0, 0)])
def test_max_kernel_gram_empty(N, Np):
    X, Y = torch.randn(N, 2, 3, device=DEVICE), torch.randn(Np, 2, 3, device=DEVICE)
    assert se.max_kernel_gram(X, Y).shape == (N, Np)
    assert se.max_kernel_gram(X).shape == (N, N)


# ---------------------------------------------------------------- every backward, opcheck

def _ops():
    """name -> (native call, reference call, float64 CPU inputs); each call takes the inputs."""
    g = torch.Generator().manual_seed(3)
    x, V, s = rand(2, 3, 9, 7), rand(27, 5, seed=1), rand(5, seed=2, positive=True)
    return {
        "conv_adjacency": (se.conv_adjacency, reference.conv_adjacency, (rand(2, 17, 65), rand(2, 17, 9, 63, seed=1))),
        "signal_projection": (lambda t: se.signal_projection(t, V.to(t), s.to(t), stride=2, padding=1),
                              lambda t: reference.signal_projection(t, V, s, (2, 2), (1, 1), (1, 1), None, (3, 3)),
                              (x,)),
        "signal_projection_mean": (lambda t: se.signal_projection(t, V.to(t), s.to(t), padding=1, reduce="mean"),
                                   lambda t: reference.signal_projection(t, V, s, (1, 1), (1, 1), (1, 1), "mean",
                                                                         (3, 3)), (x,)),
        "sinkhorn": (lambda p: se.sinkhorn(p, 6), lambda p: reference.sinkhorn(p, 6),
                     (torch.rand(3, 5, 7, generator=g, dtype=torch.float64) + 0.1,)),
        "max_kernel_gram": (se.max_kernel_gram, reference.max_kernel_gram, (rand(65, 3, 9), rand(33, 3, 9, seed=1))),
        "max_kernel_gram_self": (se.max_kernel_gram, reference.max_kernel_gram, (rand(65, 3, 9),)),
    }


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(_ops()))
def test_backward_matches_reference(dtype, name):
    native, ref, inputs = _ops()[name]
    ref_inputs = [t.clone().requires_grad_() for t in inputs]
    out = ref(*ref_inputs)
    weight = rand(*out.shape, seed=9)
    expected = torch.autograd.grad((out * weight).sum(), ref_inputs)
    gpu_inputs = [gpu(t, dtype).requires_grad_() for t in inputs]
    out = native(*gpu_inputs)
    got = torch.autograd.grad((out * gpu(weight, dtype)).sum(), gpu_inputs)
    for g, e in zip(got, expected):
        assert_matches_reference(g, e, dtype)


def test_opcheck_on_cuda():
    ops = torch.ops.spectral_ext
    x, V, s = rand(2, 3, 9, 7).to(DEVICE), rand(27, 5, seed=1).to(DEVICE), rand(5, seed=2, positive=True).to(DEVICE)
    cases = [
        (ops.conv_adjacency, (rand(2, 17, 65).to(DEVICE), rand(2, 17, 9, 63, seed=1).to(DEVICE))),
        (ops.signal_projection, (x, V, s, [2, 2], [1, 1], [1, 1], None, [3, 3])),
        (ops.signal_projection, (x, V, s, [1, 1], [1, 1], [1, 1], "mean", [3, 3])),
        (ops.sinkhorn, (rand(3, 5, 7, positive=True).to(DEVICE), 6)),
        (ops.max_kernel_gram, (rand(65, 3, 9).to(DEVICE), rand(33, 3, 9, seed=1).to(DEVICE))),
        (ops.max_kernel_gram, (rand(65, 3, 9).to(DEVICE), None)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)
        grad_args = tuple(a.clone().requires_grad_() if isinstance(a, torch.Tensor) and i == 0 else a
                          for i, a in enumerate(args))
        torch.library.opcheck(op, grad_args)


# ---------------------------------------------------------------- a second device

@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
@pytest.mark.parametrize("name", list(_ops()))
def test_second_device(name):
    # The kernels must launch on the inputs' device (CUDAGuard), not on the current one.
    native, ref, inputs = _ops()[name]
    out = native(*[gpu(t, torch.float64, device="cuda:1") for t in inputs])
    assert out.device == torch.device("cuda:1")
    assert_matches_reference(out, ref(*inputs), torch.float64)
