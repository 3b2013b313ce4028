"""Every compiled operator against its plain-PyTorch twin (spectral_ext.reference),
in float64 across many shapes, float32 within tolerance, autograd, opcheck and
the error cases. CUDA cases run only where a GPU is present."""
import subprocess
import sys

import pytest
import torch

import spectral_ext as se
from spectral_ext import reference

F64 = dict(rtol=1e-11, atol=1e-11)
F32 = dict(rtol=2e-4, atol=2e-4)


def rand(*shape, device="cpu", dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype).to(device)


def noncontiguous(t):
    """The same values in a transposed-then-transposed-back layout."""
    flipped = t.transpose(0, -1).contiguous().transpose(0, -1)
    assert t.dim() < 2 or not flipped.is_contiguous() or t.shape[0] == 1 or t.shape[-1] == 1
    return flipped


# ---------------------------------------------------------------- conv_adjacency

ADJ_SHAPES = [  # B, c, M, K2, N
    (1, 1, 1, 1, 1),
    (2, 3, 5, 1, 4),
    (3, 7, 9, 9, 11),
    (1, 16, 65, 4, 70),  # crosses the 64-wide CUDA tile
    (2, 5, 3, 49, 2),    # large K2 (conv -> flatten -> Linear)
    (1, 33, 17, 25, 13),
]


@pytest.mark.parametrize("B,c,M,K2,N", ADJ_SHAPES)
def test_conv_adjacency_matches_reference(device, B, c, M, K2, N):
    U, V = rand(B, c, M, device=device), rand(B, c, K2, N, device=device, seed=1)
    torch.testing.assert_close(se.conv_adjacency(U, V), reference.conv_adjacency(U, V), **F64)
    torch.testing.assert_close(se.conv_adjacency(noncontiguous(U), noncontiguous(V)),
                               reference.conv_adjacency(U, V), **F64)
    U32, V32 = U.float(), V.float()
    torch.testing.assert_close(se.conv_adjacency(U32, V32), reference.conv_adjacency(U, V).float(), **F32)


def test_conv_adjacency_by_hand_and_unbatched():
    # One tap, orthonormal U and V: a[n, m] = (v_n . u_m)^2, a doubly stochastic matrix.
    U = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    c, s = 0.6, 0.8
    V = torch.tensor([[c, -s], [s, c]], dtype=torch.float64).unsqueeze(1)  # (c=2, K2=1, N=2)
    expected = torch.tensor([[c * c, s * s], [s * s, c * c]], dtype=torch.float64)
    torch.testing.assert_close(se.conv_adjacency(U, V), expected, **F64)
    # Two taps sum their squared overlaps.
    V2 = torch.cat([V, V], dim=1)
    torch.testing.assert_close(se.conv_adjacency(U, V2), 2 * expected, **F64)


def test_conv_adjacency_empty_channels_gives_zeros():
    out = se.conv_adjacency(torch.zeros(2, 0, 3, dtype=torch.float64), torch.zeros(2, 0, 4, 5, dtype=torch.float64))
    assert out.shape == (2, 5, 3) and not out.any()


# ---------------------------------------------------------------- signal_projection

SIGNAL_CASES = [  # B, C, H, W, kernel, r, stride, padding, dilation
    (1, 1, 1, 1, (1, 1), 1, 1, 0, 1),
    (2, 3, 9, 8, (3, 3), 5, 1, 0, 1),
    (1, 4, 11, 7, (3, 3), 7, 2, 1, 1),
    (3, 2, 12, 13, (3, 3), 4, 1, 2, 2),
    (2, 3, 10, 9, (2, 3), 3, (2, 1), (1, 0), (1, 2)),  # non-square everything
    (1, 5, 16, 16, (5, 5), 70, 3, 2, 1),               # r crosses the 64-wide tile
    (2, 2, 7, 7, (7, 7), 6, 1, 3, 1),
]


@pytest.mark.parametrize("reduce", [None, "mean"])
@pytest.mark.parametrize("B,C,H,W,k,r,stride,padding,dilation", SIGNAL_CASES)
def test_signal_projection_matches_reference(device, B, C, H, W, k, r, stride, padding, dilation, reduce):
    x = rand(B, C, H, W, device=device)
    V = rand(C * k[0] * k[1], r, device=device, seed=1)
    s = rand(r, device=device, seed=2).abs()
    kwargs = dict(stride=stride, padding=padding, dilation=dilation, reduce=reduce, kernel_size=k)
    native = se.signal_projection(x, V, s, **kwargs)
    with se.use_backend("reference"):
        expected = se.signal_projection(x, V, s, **kwargs)
    torch.testing.assert_close(native, expected, **F64)
    torch.testing.assert_close(se.signal_projection(noncontiguous(x), noncontiguous(V), s, **kwargs), expected, **F64)
    torch.testing.assert_close(se.signal_projection(x.float(), V.float(), s.float(), **kwargs), expected.float(), **F32)


def test_signal_projection_is_a_convolution_with_scaled_filters():
    # Independent route: conv2d with the filters (V diag(s))^T.
    x, V, s = rand(2, 3, 8, 8), rand(27, 4, seed=1), rand(4, seed=2)
    weight = (V * s).T.reshape(4, 3, 3, 3)
    expected = torch.nn.functional.conv2d(x, weight, padding=1)
    torch.testing.assert_close(se.signal_projection(x, V, s, padding=1), expected, **F64)
    torch.testing.assert_close(se.signal_projection(x, V, s, padding=1, reduce="mean"), expected.mean((2, 3)), **F64)
    torch.testing.assert_close(se.signal_projection(x[0], V, s, padding=1), expected[0], **F64)


# ---------------------------------------------------------------- sinkhorn

@pytest.mark.parametrize("B,n,m", [(1, 1, 1), (3, 5, 5), (2, 7, 4), (1, 130, 130), (4, 3, 9)])
@pytest.mark.parametrize("iters", [0, 1, 16])
def test_sinkhorn_matches_reference(device, B, n, m, iters):
    P = rand(B, n, m, device=device).abs() + 0.01
    torch.testing.assert_close(se.sinkhorn(P, iters), reference.sinkhorn(P, iters), **F64)
    torch.testing.assert_close(se.sinkhorn(noncontiguous(P), iters), reference.sinkhorn(P, iters), **F64)
    torch.testing.assert_close(se.sinkhorn(P.float(), iters), reference.sinkhorn(P, iters).float(), **F32)


def test_sinkhorn_converges_to_doubly_stochastic():
    P = rand(6, 6).abs() + 0.1
    D = se.sinkhorn(P, iters=200)
    ones = torch.ones(6, dtype=torch.float64)
    torch.testing.assert_close(D.sum(0), ones, rtol=0, atol=1e-10)
    torch.testing.assert_close(D.sum(1), ones, rtol=0, atol=1e-10)
    # A permutation matrix is a fixed point.
    perm = torch.eye(5, dtype=torch.float64)[torch.tensor([3, 0, 4, 1, 2])]
    torch.testing.assert_close(se.sinkhorn(perm), perm, **F64)


# ---------------------------------------------------------------- max_kernel_gram

@pytest.mark.parametrize("N,Np,C,S", [(1, 1, 1, 1), (5, 3, 2, 9), (37, 150, 5, 3), (130, 70, 4, 1), (17, 17, 3, 20)])
def test_max_kernel_gram_matches_reference(device, N, Np, C, S):
    X, Y = rand(N, C, S, device=device), rand(Np, C, S, device=device, seed=1)
    torch.testing.assert_close(se.max_kernel_gram(X, Y), reference.max_kernel_gram(X, Y), **F64)
    torch.testing.assert_close(se.max_kernel_gram(X), reference.max_kernel_gram(X), **F64)
    torch.testing.assert_close(se.max_kernel_gram(noncontiguous(X), noncontiguous(Y)),
                               reference.max_kernel_gram(X, Y), **F64)
    torch.testing.assert_close(se.max_kernel_gram(X.float(), Y.float()), reference.max_kernel_gram(X, Y).float(), **F32)


def test_max_kernel_gram_self_is_symmetric_and_by_hand():
    K = se.max_kernel_gram(rand(70, 3, 4))
    torch.testing.assert_close(K, K.T, rtol=0, atol=0)
    X = torch.tensor([[[1.0, 2.0], [3.0, -1.0]]], dtype=torch.float64)  # N=1, C=2, S=2
    Y = torch.tensor([[[1.0, 1.0], [0.0, 1.0]], [[-1.0, 0.0], [-2.0, 0.0]]], dtype=torch.float64)
    # channel sums: Y0 -> (3, -1) -> 3; Y1 -> (-1, -6) -> -1
    torch.testing.assert_close(se.max_kernel_gram(X, Y), torch.tensor([[3.0, -1.0]], dtype=torch.float64))


# ---------------------------------------------------------------- autograd and opcheck

def test_gradcheck_all_operators():
    torch.manual_seed(0)
    req = dict(dtype=torch.float64, requires_grad=True)
    U, V = torch.randn(2, 3, 4, **req), torch.randn(2, 3, 2, 5, **req)
    assert torch.autograd.gradcheck(se.conv_adjacency, (U, V))
    x = torch.randn(2, 2, 6, 5, **req)
    Vs, s = torch.randn(18, 3, dtype=torch.float64), torch.rand(3, dtype=torch.float64)
    for reduce in (None, "mean"):
        assert torch.autograd.gradcheck(lambda t: se.signal_projection(t, Vs, s, stride=2, padding=1, reduce=reduce), (x,))
    P = (torch.rand(2, 4, 4, dtype=torch.float64) + 0.1).requires_grad_()
    assert torch.autograd.gradcheck(lambda p: se.sinkhorn(p, 5), (P,))
    X, Y = torch.randn(4, 3, 2, **req), torch.randn(5, 3, 2, **req)
    assert torch.autograd.gradcheck(se.max_kernel_gram, (X, Y))
    assert torch.autograd.gradcheck(lambda t: se.max_kernel_gram(t), (X,))


def test_signal_projection_refuses_grad_for_V():
    x = torch.randn(1, 1, 4, 4, dtype=torch.float64)
    V = torch.randn(9, 2, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="with respect to x only"):  # at the call, not at backward
        se.signal_projection(x, V, torch.ones(2, dtype=torch.float64))
    with torch.no_grad():  # nothing to differentiate: accepted
        se.signal_projection(x, V, torch.ones(2, dtype=torch.float64))


def _opcheck_cases(device):
    d = dict(device=device, dtype=torch.float64)
    return [
        (torch.ops.spectral_ext.conv_adjacency.default, (torch.randn(2, 3, 4, **d), torch.randn(2, 3, 5, 6, **d))),
        (torch.ops.spectral_ext.signal_projection.default,
         (torch.randn(2, 2, 6, 5, **d), torch.randn(18, 3, **d), torch.rand(3, **d), [2, 2], [1, 1], [1, 1], None, [3, 3])),
        (torch.ops.spectral_ext.signal_projection.default,
         (torch.randn(2, 2, 6, 5, **d), torch.randn(18, 3, **d), torch.rand(3, **d), [1, 1], [0, 0], [1, 1], "mean", None)),
        (torch.ops.spectral_ext.sinkhorn.default, (torch.rand(3, 4, 4, **d) + 0.1, 4)),
        (torch.ops.spectral_ext.max_kernel_gram.default, (torch.randn(5, 3, 2, **d), torch.randn(4, 3, 2, **d))),
        (torch.ops.spectral_ext.max_kernel_gram.default, (torch.randn(5, 3, 2, **d), None)),
    ]


@pytest.mark.parametrize("case", range(6))
def test_opcheck(device, case):
    op, args = _opcheck_cases(device)[case]
    torch.library.opcheck(op, args)
    grad_args = tuple(a.clone().requires_grad_() if isinstance(a, torch.Tensor) and i == 0 else a
                      for i, a in enumerate(args))
    torch.library.opcheck(op, grad_args)


# ---------------------------------------------------------------- errors and plumbing

def test_errors_name_the_argument():
    good_U, good_V = torch.randn(2, 3, 4), torch.randn(2, 3, 1, 5)
    with pytest.raises(ValueError, match="U must have shape"):
        se.conv_adjacency(torch.randn(3), good_V)
    with pytest.raises(TypeError, match="V must be float32 or float64"):
        se.conv_adjacency(good_U, good_V.int())
    with pytest.raises(TypeError, match="V is torch.float64 but U is torch.float32"):
        se.conv_adjacency(good_U, good_V.double())
    with pytest.raises(ValueError, match="agree on B and c"):
        se.conv_adjacency(good_U, torch.randn(2, 4, 1, 5))
    with pytest.raises(ValueError, match="U contains NaN"):
        se.conv_adjacency(torch.full((2, 3, 4), float("nan")), good_V)
    bad_V = good_V.clone()
    bad_V[1, 2, 0, 3] = float("inf")
    with pytest.raises(ValueError, match="V contains NaN or infinite"):
        se.conv_adjacency(good_U, bad_V)
    with pytest.raises(TypeError, match="U must be a torch.Tensor"):
        se.conv_adjacency([[1.0]], good_V)
    x, V, s = torch.randn(1, 2, 5, 5), torch.randn(18, 3), torch.ones(3)
    with pytest.raises(ValueError, match="s must have r"):
        se.signal_projection(x, V, torch.ones(4))
    with pytest.raises(ValueError, match="reduce must be"):
        se.signal_projection(x, V, s, reduce="sum")
    with pytest.raises(ValueError, match="kernel_size"):
        se.signal_projection(x, V, s, kernel_size=(2, 3))
    with pytest.raises(ValueError, match="not a square kernel area"):
        se.signal_projection(x, torch.randn(12, 3), s)
    with pytest.raises(ValueError, match="does not fit"):
        se.signal_projection(torch.randn(1, 2, 2, 2), V, s)
    with pytest.raises(TypeError, match="stride"):
        se.signal_projection(x, V, s, stride=1.5)
    with pytest.raises(ValueError, match="x contains NaN"):
        se.signal_projection(torch.full((1, 2, 5, 5), float("inf")), V, s)
    with pytest.raises(ValueError, match="non-negative"):
        se.sinkhorn(-torch.rand(3, 3))
    with pytest.raises(ValueError, match="positive sum"):
        se.sinkhorn(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="iters must be non-negative"):
        se.sinkhorn(torch.rand(3, 3), -1)
    with pytest.raises(ValueError, match="agree on C and S"):
        se.max_kernel_gram(torch.randn(3, 2, 2), torch.randn(3, 2, 3))
    with pytest.raises(ValueError, match="at least one channel"):
        se.max_kernel_gram(torch.randn(3, 0, 2))


def test_native_ops_check_shapes_when_called_directly():
    with pytest.raises(RuntimeError, match="disagree on B or c"):
        torch.ops.spectral_ext.conv_adjacency(torch.randn(2, 3, 4), torch.randn(2, 2, 1, 4))
    with pytest.raises(RuntimeError, match="must be float32 or float64"):
        torch.ops.spectral_ext.sinkhorn(torch.ones(1, 2, 2, dtype=torch.int64), 2)


def test_use_backend_switches_and_restores():
    U, V = rand(2, 3, 4), rand(2, 3, 2, 5, seed=1)
    assert se.current_backend() == "native"
    with se.use_backend("reference"):
        assert se.current_backend() == "reference"
        torch.testing.assert_close(se.conv_adjacency(U, V), reference.conv_adjacency(U, V), rtol=0, atol=0)
    assert se.current_backend() == "native"
    with pytest.raises(ValueError, match="backend must be one of"):
        with se.use_backend("fast"):
            pass


def test_build_info_reports_kernels():
    info = se.build_info()
    assert info["built_with_torch"] == torch.__version__.split("+")[0]
    assert set(info["operators"]) == {"conv_adjacency", "signal_projection", "sinkhorn", "max_kernel_gram",
                                      "sinkhorn_scaling", "linear_sum_assignment", "network_simplex"}
    for op in info["operators"]:
        assert "CPU" in info["operators"][op]
        cuda = info["cuda_compiled"] and op not in ("sinkhorn_scaling", "linear_sum_assignment", "network_simplex")
        assert ("CUDA" in info["operators"][op]) == cuda


def test_missing_extension_says_how_to_build():
    code = "import sys; sys.modules['spectral_ext._C'] = None; import spectral_ext"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "pip install --no-build-isolation -e ." in result.stderr


def test_finite_check_survives_an_overflowing_sum():
    # Finite entries whose float32 sum overflows are still valid input.
    X, Y = torch.full((2, 1, 2), 3e38), torch.full((3, 1, 2), 1e-38)
    assert torch.isinf(X.sum())
    torch.testing.assert_close(se.max_kernel_gram(X, Y), reference.max_kernel_gram(X, Y))


def test_finite_inputs_that_overflow_are_refused_by_name():
    X = torch.full((2, 1, 2), 3e38)
    with pytest.raises(ValueError, match="X are finite but the result overflows float32"):
        se.max_kernel_gram(X)
    with pytest.raises(ValueError, match="U and V are finite but the result overflows"):
        se.conv_adjacency(torch.full((1, 2, 3), 1e30), torch.full((1, 2, 1, 2), 1e30))
    # float64 holds the same numbers.
    assert torch.isfinite(se.max_kernel_gram(X.double())).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_large_shapes_take_the_other_paths():
    # Sinkhorn scales that overflow shared memory live in a global workspace; many planes and
    # batches exercise the grid-stride loops of the other kernels.
    P = rand(1, 3100, 3100, device="cuda").abs() + 0.01
    torch.testing.assert_close(se.sinkhorn(P, 4), reference.sinkhorn(P, 4), **F64)
    x, V, s = rand(3, 40, 30, 30, device="cuda"), rand(360, 130, device="cuda", seed=1), rand(130, device="cuda", seed=2)
    for reduce in (None, "mean"):
        expected = reference.signal_projection(x, V, s, (1, 1), (1, 1), (1, 1), reduce, (3, 3))
        torch.testing.assert_close(se.signal_projection(x, V, s, padding=1, reduce=reduce), expected, **F64)
    X = rand(300, 7, 5, device="cuda")
    torch.testing.assert_close(se.max_kernel_gram(X), reference.max_kernel_gram(X), **F64)


# ---------------------------------------------------------------- sinkhorn with marginals (issue 13)

def marginals(B, n, m, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(B, n, generator=g, dtype=torch.float64) + 0.1
    b = torch.rand(B, m, generator=g, dtype=torch.float64) + 0.1
    return a / a.sum(1, keepdim=True), b / b.sum(1, keepdim=True)


@pytest.mark.parametrize("B,n,m", [(1, 1, 1), (3, 5, 5), (2, 7, 4), (2, 70, 130), (4, 3, 17)])
@pytest.mark.parametrize("log_domain", [False, True])
@pytest.mark.parametrize("iters,thr", [(0, None), (1, None), (23, None), (500, 1e-8)])
def test_sinkhorn_marginals_match_reference(B, n, m, log_domain, iters, thr):
    M = rand(B, n, m, seed=3).abs()
    a, b = marginals(B, n, m, seed=4)
    kw = dict(reg=0.3, stop_threshold=thr, log_domain=log_domain, return_log=True)
    plan, log = se.sinkhorn(M, iters, a, b, **kw)
    with se.use_backend("reference"):
        want, wlog = se.sinkhorn(M, iters, a, b, **kw)
    torch.testing.assert_close(plan, want, **F64)
    torch.testing.assert_close(log["rounds"], wlog["rounds"], rtol=0, atol=0)
    torch.testing.assert_close(log["log_u"], wlog["log_u"], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(log["err"], wlog["err"], rtol=1e-8, atol=1e-14, equal_nan=True)
    if iters >= 1:  # rows always meet a after a round; columns meet b once converged
        torch.testing.assert_close(plan.sum(-1), a, **F64)
    if thr is not None:
        assert (log["rounds"] < iters).all()
        assert (torch.linalg.vector_norm(plan.sum(-2) - b, dim=-1) < thr).all()
    plan32 = se.sinkhorn(M.float(), iters, a.float(), b.float(), reg=0.3, log_domain=log_domain,
                         stop_threshold=thr)
    torch.testing.assert_close(plan32, want.float(), rtol=2e-3, atol=2e-5)


def test_sinkhorn_kernel_form_with_ones_is_the_papers_and_marginals_by_hand():
    P = rand(3, 6, 4).abs() + 0.05
    ones_n, ones_m = torch.ones(6, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    torch.testing.assert_close(se.sinkhorn(P, 9, ones_n, ones_m), reference.sinkhorn(P, 9), **F64)
    # The limit has row sums a and column sums b (checked independently of the iteration).
    a, b = marginals(1, 6, 4, seed=9)
    plan = se.sinkhorn(P[0], 3000, a[0], b[0], stop_threshold=1e-13)
    torch.testing.assert_close(plan.sum(1), a[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(plan.sum(0), b[0], rtol=0, atol=1e-12)
    # diag(x) P diag(y) has the same Sinkhorn limit as P.
    x, y = torch.rand(6, dtype=torch.float64) + 0.5, torch.rand(4, dtype=torch.float64) + 0.5
    torch.testing.assert_close(se.sinkhorn(x[:, None] * P[0] * y, 3000, a[0], b[0], stop_threshold=1e-13), plan,
                               rtol=1e-9, atol=1e-12)


def test_sinkhorn_log_domain_survives_a_tiny_reg():
    # exp(-M / reg) underflows to zero almost everywhere for reg = 1e-3; the log domain does not.
    M = rand(2, 30, 25, seed=5).abs() * 3
    a, b = marginals(2, 30, 25, seed=6)
    plan = se.sinkhorn(M, 400, a, b, reg=1e-3, log_domain=True)
    with se.use_backend("reference"):
        want = se.sinkhorn(M, 400, a, b, reg=1e-3, log_domain=True)
    assert torch.isfinite(plan).all()
    torch.testing.assert_close(plan, want, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(plan.sum(-1), a, rtol=0, atol=1e-12)


def test_sinkhorn_marginal_form_gradients_go_through_the_twin():
    M = (torch.rand(2, 4, 3, dtype=torch.float64) + 0.1).requires_grad_()
    a, b = marginals(2, 4, 3, seed=1)
    assert torch.autograd.gradcheck(lambda t: se.sinkhorn(t, 6, a, b, reg=0.5), (M,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sinkhorn_tiny_and_huge_entries_give_the_reference(dtype):
    info = torch.finfo(dtype)
    cases = [
        [[info.tiny / 16, 1.0], [info.tiny / 16, 1.0]],       # a column summing below 1/max
        [[1.0, 1.0], [info.tiny / 8, info.tiny / 8]],         # a row far below its columns
        [[info.max / 2, info.max / 3], [info.max / 4, info.max / 5]],  # sums overflow
        [[info.max, 1.0], [1.0, info.max]],
    ]
    for P in cases:
        P = torch.tensor(P, dtype=dtype)
        want = reference.sinkhorn(P.double(), 16)
        assert torch.isfinite(want).all()
        got = se.sinkhorn(P, 16)
        assert torch.isfinite(got).all(), P
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- issue 14: meta, interrupts, limits, memory

def test_meta_tensors_use_the_fake_kernels():
    meta = dict(device="meta", dtype=torch.float32)
    assert se.sinkhorn(torch.empty(2, 5, 4, **meta)).shape == (2, 5, 4)
    plan, log = se.sinkhorn(torch.empty(2, 5, 4, **meta), 25, torch.empty(5, **meta), torch.empty(4, **meta),
                            reg=0.1, return_log=True)
    assert plan.shape == (2, 5, 4) and log["err"].shape == (2, 3) and plan.device.type == "meta"
    assert se.conv_adjacency(torch.empty(2, 3, 4, **meta), torch.empty(2, 3, 5, 6, **meta)).shape == (2, 6, 4)
    assert se.max_kernel_gram(torch.empty(7, 3, 2, **meta)).shape == (7, 7)
    out = se.signal_projection(torch.empty(2, 3, 8, 8, **meta), torch.empty(27, 5, **meta), torch.empty(5, **meta),
                               padding=1)
    assert out.shape == (2, 5, 8, 8)


def test_huge_integers_are_clear_errors():
    x, V, s = torch.randn(1, 2, 5, 5), torch.randn(18, 3), torch.ones(3)
    with pytest.raises(ValueError, match="padding must be at most"):
        se.signal_projection(x, V, s, padding=2**40)
    with pytest.raises(ValueError, match="stride must be at most"):
        se.signal_projection(x, V, s, stride=10**30)
    with pytest.raises(ValueError, match="check padding"):
        se.signal_projection(x, V, s, padding=2**30, reduce="mean")
    with pytest.raises(ValueError, match="iters must be at most"):
        se.sinkhorn(torch.rand(3, 3), 10**13)
    with pytest.raises(ValueError, match="iters must be at most"):
        se.sinkhorn(torch.rand(3, 3), 2**70)
    with pytest.raises(ValueError, match="reg must be a finite number > 0"):
        se.sinkhorn(torch.rand(3, 3), 5, reg=0.0)
    with pytest.raises(ValueError, match="a must be finite and positive"):
        se.sinkhorn(torch.rand(3, 3), 5, torch.zeros(3), torch.ones(3))
    with pytest.raises(ValueError, match="b must have shape"):
        se.sinkhorn(torch.rand(3, 3), 5, torch.ones(3), torch.ones(4))


def test_max_kernel_gram_cpu_max_propagates_nan():
    X = rand(5, 4, 2)
    X[2, 1, 0] = float("nan")  # channel 1 of row 2 is NaN; later channels may be larger
    got = torch.ops.spectral_ext.max_kernel_gram(X, None)
    want = reference.max_kernel_gram(X)
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.isnan(got[2]).all()
    with pytest.raises(ValueError, match="X contains NaN"):
        se.max_kernel_gram(X)


def test_sinkhorn_stops_on_ctrl_c_within_a_second():
    from conftest import interrupted

    line, returncode, waited = interrupted("", "se.sinkhorn(torch.rand(8, 8, dtype=torch.float64), iters=10**11)")
    assert line == "interrupted" and returncode == 0
    assert waited < 1.0, f"took {waited:.2f} s"


_BACKWARD_PEAK = """
import torch, spectral_ext as se

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

def peak(fn, *inputs):
    inputs = [t.requires_grad_() for t in inputs]
    out = fn(*inputs)
    grad = torch.ones_like(out)
    open("/proc/self/clear_refs", "w").write("5")
    before = rss("VmRSS:")
    torch.autograd.grad(out, inputs, grad)
    return rss("VmHWM:") - before

torch.manual_seed(0)
P = torch.rand(4, 256, 256, dtype=torch.float64) + 0.1
print("sinkhorn", peak(lambda p: se.sinkhorn(p, 50), P))
X = torch.randn(1024, 64, 1)
print("max_kernel_gram", peak(se.max_kernel_gram, X))
U, V = torch.randn(1, 8, 256, dtype=torch.float64), torch.randn(1, 8, 256, 256, dtype=torch.float64)
print("conv_adjacency", peak(se.conv_adjacency, U, V))
"""


def test_backward_peak_memory_stays_bounded():
    import os

    # A fixed mmap threshold: glibc otherwise raises it as large blocks are freed and keeps later ones in its
    # heap, so the resident peak measured the allocator's history (44-208 MiB for one sinkhorn), not live memory.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", _BACKWARD_PEAK], capture_output=True, text=True, check=True, env=env,
                         timeout=300)
    peaks = {name: int(v) / 2**20 for name, v in (line.split() for line in out.stdout.strip().splitlines())}
    print(peaks)
    # Keeping every iterate would cost 100 matrices of 2 MiB (200 MiB); a few remain.
    assert peaks["sinkhorn"] < 100
    # (N, N', C) in float32 is 256 MiB, and the one-hot routing as much again.
    assert peaks["max_kernel_gram"] < 120
    # (B, K2, N, M) in float64 is 128 MiB, built twice before.
    assert peaks["conv_adjacency"] < 110


# ---------------------------------------------------------------- network_simplex (exact OT, CPU kernel)

def _transport_problems(B, n, m, seed):
    g = torch.Generator().manual_seed(seed)
    M = torch.rand(B, n, m, generator=g, dtype=torch.float64)
    a = torch.rand(B, n, generator=g, dtype=torch.float64) + 0.1
    b = torch.rand(B, m, generator=g, dtype=torch.float64) + 0.1
    a, b = a / a.sum(1, keepdim=True), b / b.sum(1, keepdim=True)
    return M, a, b


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 3, 5), (4, 7, 7), (2, 12, 5), (3, 20, 30)])
def test_network_simplex_matches_its_reference_linear_program(shape):
    """The kernel's optimum is the linear program's (scipy HiGHS) to 1e-12; its plan is feasible and its
    potentials are dual feasible with complementary slackness."""
    M, a, b = _transport_problems(*shape, seed=sum(shape))
    plan, u, v, cost, result, _ = torch.ops.spectral_ext.network_simplex(M, a, b)
    ref_plan, _, _, ref_cost, _, _ = reference.network_simplex(M, a, b)
    assert result.eq(1).all()
    torch.testing.assert_close(cost, ref_cost, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(cost, (plan * M).sum((1, 2)), rtol=1e-12, atol=1e-14)
    assert (plan >= 0).all()
    torch.testing.assert_close(plan.sum(2), a, rtol=0, atol=1e-13)
    torch.testing.assert_close(plan.sum(1), b, rtol=0, atol=1e-13)
    reduced = M - u[:, :, None] - v[:, None, :]
    assert (reduced >= -1e-12).all() and (reduced[plan > 1e-14].abs() <= 1e-12).all()
    torch.testing.assert_close((u * a).sum(1) + (v * b).sum(1), cost, rtol=1e-12, atol=1e-14)


def test_network_simplex_opcheck():
    M, a, b = _transport_problems(2, 4, 3, seed=0)
    torch.library.opcheck(torch.ops.spectral_ext.network_simplex.default, (M, a, b),
                          test_utils=("test_schema", "test_faketensor"))
    out = torch.ops.spectral_ext.network_simplex(M.to("meta"), a.to("meta"), b.to("meta"))
    assert [tuple(t.shape) for t in out] == [(2, 4, 3), (2, 4), (2, 3), (2,), (2,), (2,)]


# ---------------------------------------------------------------- layout of spectral_ext/_ops/

def test_one_module_per_operator_and_no_module_shadows_a_function():
    """Each schema of csrc/ops.cpp has its module _ops/<op>_op.py, which registers its fake kernel;
    importing every module leaves the package's names the functions (a module named like a function
    would replace it as the package attribute)."""
    import importlib
    import pathlib
    import re
    import types

    from spectral_ext import _ops

    schemas = re.findall(r'm\.def\(\s*"(\w+)\(', (pathlib.Path(__file__).parents[1] / "csrc" / "ops.cpp").read_text())
    assert sorted(schemas) == sorted(_ops.OPERATORS)
    for op in schemas:
        module = importlib.import_module(f"spectral_ext._ops.{op}_op")
        assert f'register_fake("spectral_ext::{op}")' in pathlib.Path(module.__file__).read_text()
    for name in _ops.__all__:
        assert not isinstance(getattr(_ops, name), types.ModuleType), name
    from spectral_ext._ops import sinkhorn
    assert sinkhorn is se.sinkhorn and callable(sinkhorn)
