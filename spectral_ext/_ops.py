"""Typed wrappers over torch.ops.spectral_ext.*: validation, unbatched inputs,
backend choice, fake kernels (for torch.compile) and autograd formulas."""
from __future__ import annotations

import contextlib
import math
import contextvars

import torch

from . import _checks, reference

BACKENDS = ("native", "reference")
OPERATORS = ("conv_adjacency", "signal_projection", "sinkhorn", "max_kernel_gram")
_backend = contextvars.ContextVar("spectral_ext_backend", default="native")


@contextlib.contextmanager
def use_backend(name: str):
    """Run the operators on `name`: "native" (the compiled kernels, default) or
    "reference" (the plain-PyTorch twins in spectral_ext.reference)::

        with spectral_ext.use_backend("reference"):
            a = spectral_ext.conv_adjacency(U, V)
    """
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    token = _backend.set(name)
    try:
        yield
    finally:
        _backend.reset(token)


def current_backend() -> str:
    return _backend.get()


def _native() -> bool:
    return _backend.get() == "native"


# ---------------------------------------------------------------- geometry

def _as_pairs(stride, padding, dilation, kernel_size):
    """The schema's int[2] arguments, which may arrive with one entry, as pairs."""
    stride, padding, dilation = (tuple(v) * (2 // len(v)) for v in (stride, padding, dilation))
    if kernel_size is not None:
        kernel_size = tuple(kernel_size) * (2 // len(kernel_size))
    return stride, padding, dilation, kernel_size


_INDEX_LIMIT = 2 ** 62  # position counts and padded sizes stay exact in int64 below this


def _conv_geometry(x_shape, V_rows, stride, padding, dilation, kernel_size):
    """Kernel size (square unless given) and output size of signal_projection."""
    C, H, W = x_shape[-3:]
    if C == 0 or V_rows % C:
        raise ValueError(f"V.shape[0] = {V_rows} must be C*kh*kw for the C = {C} channels of x")
    area = V_rows // C
    if kernel_size is None:
        k = math.isqrt(int(area))  # int() specialises a symbolic size while tracing
        if k * k != area:
            raise ValueError(f"V.shape[0] / C = {area} is not a square kernel area; pass kernel_size")
        kernel_size = (k, k)
    kh, kw = kernel_size
    if kh <= 0 or kw <= 0 or kh * kw != area:
        raise ValueError(f"kernel_size {(kh, kw)} does not match V.shape[0] / C = {area}")
    extent_h = H + 2 * padding[0] - dilation[0] * (kh - 1) - 1
    extent_w = W + 2 * padding[1] - dilation[1] * (kw - 1) - 1
    if extent_h < 0 or extent_w < 0:
        raise ValueError(f"the {kh}x{kw} kernel (dilation {dilation}, padding {padding}) does not fit "
                         f"the {H}x{W} input x")
    return (kh, kw), (extent_h // stride[0] + 1, extent_w // stride[1] + 1)


# ---------------------------------------------------------------- fake kernels

@torch.library.register_fake("spectral_ext::conv_adjacency")
def _conv_adjacency_fake(U, V):
    return U.new_empty((U.shape[0], V.shape[3], U.shape[2]))


@torch.library.register_fake("spectral_ext::signal_projection")
def _signal_projection_fake(x, V, s, stride=(1, 1), padding=(0, 0), dilation=(1, 1), reduce=None,
                            kernel_size=None):
    stride, padding, dilation, kernel_size = _as_pairs(stride, padding, dilation, kernel_size)
    _, (Ho, Wo) = _conv_geometry(x.shape, V.shape[0], stride, padding, dilation, kernel_size)
    if reduce == "mean":
        return x.new_empty((x.shape[0], V.shape[1]))
    return x.new_empty((x.shape[0], V.shape[1], Ho, Wo))


@torch.library.register_fake("spectral_ext::sinkhorn")
def _sinkhorn_fake(P, iters=16):
    return torch.empty_like(P, memory_format=torch.contiguous_format)


@torch.library.register_fake("spectral_ext::max_kernel_gram")
def _max_kernel_gram_fake(X, Y=None):
    return X.new_empty((X.shape[0], (X if Y is None else Y).shape[0]))


# ---------------------------------------------------------------- autograd
# Each backward is written with plain tensor ops (no autograd inside), so
# torch.compile can trace it; it recomputes what the forward did not keep.

def _conv_adjacency_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _conv_adjacency_backward(ctx, grad):
    U, V = ctx.saved_tensors
    inner = torch.einsum("bkm,bkzn->bznm", U, V)
    weighted = 2 * grad.unsqueeze(1) * inner
    gU = torch.einsum("bznm,bkzn->bkm", weighted, V) if ctx.needs_input_grad[0] else None
    gV = torch.einsum("bznm,bkm->bkzn", weighted, U) if ctx.needs_input_grad[1] else None
    return gU, gV


def _signal_projection_setup(ctx, inputs, output):
    x, V, s, stride, padding, dilation, reduce, kernel_size = inputs
    ctx.save_for_backward(V, s)
    ctx.x_shape = x.shape
    ctx.args = (stride, padding, dilation, reduce, kernel_size)


def _signal_projection_backward(ctx, grad):
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        raise RuntimeError("signal_projection differentiates with respect to x only: detach V and s")
    V, s = ctx.saved_tensors
    stride, padding, dilation, reduce, kernel_size = ctx.args
    stride, padding, dilation, kernel_size = _as_pairs(stride, padding, dilation, kernel_size)
    (kh, kw), (Ho, Wo) = _conv_geometry(ctx.x_shape, V.shape[0], stride, padding, dilation, kernel_size)
    weight = (V * s).T.reshape(V.shape[1], ctx.x_shape[1], kh, kw)
    if reduce == "mean":
        grad = (grad / (Ho * Wo))[:, :, None, None].expand(-1, -1, Ho, Wo)
    gx = torch.nn.grad.conv2d_input(ctx.x_shape, weight, grad, stride, padding, dilation)
    return gx, None, None, None, None, None, None, None


def _sinkhorn_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])
    ctx.iters = inputs[1]


def _sinkhorn_backward(ctx, grad):
    # Replays the normalisations, then runs back through each: for Z = A / s
    # with s the sums of A along d, dA = (dZ - sum_d(dZ * Z)) / s.
    (P,) = ctx.saved_tensors
    steps = []
    X = P
    for _ in range(ctx.iters):
        for dim in (-2, -1):
            sums = X.sum(dim, keepdim=True)
            X = X / sums
            steps.append((dim, sums, X))
    for dim, sums, Z in reversed(steps):
        grad = (grad - (grad * Z).sum(dim, keepdim=True)) / sums
    return grad, None


def _max_kernel_gram_setup(ctx, inputs, output):
    X, Y = inputs
    ctx.self_gram = Y is None
    ctx.save_for_backward(X, X if Y is None else Y)


def _max_kernel_gram_backward(ctx, grad):
    # The max passes the gradient to the winning channel (the first on ties).
    X, Y = ctx.saved_tensors
    winner = torch.einsum("ics,jcs->ijc", X, Y).argmax(-1)
    routed = grad.unsqueeze(-1) * torch.nn.functional.one_hot(winner, X.shape[1]).to(grad.dtype)
    gX = torch.einsum("ijc,jcs->ics", routed, Y)
    gY = torch.einsum("ijc,ics->jcs", routed, X)
    if ctx.self_gram:
        return gX + gY, None
    return gX, gY


torch.library.register_autograd("spectral_ext::conv_adjacency", _conv_adjacency_backward,
                                setup_context=_conv_adjacency_setup)
torch.library.register_autograd("spectral_ext::signal_projection", _signal_projection_backward,
                                setup_context=_signal_projection_setup)
torch.library.register_autograd("spectral_ext::sinkhorn", _sinkhorn_backward,
                                setup_context=_sinkhorn_setup)
torch.library.register_autograd("spectral_ext::max_kernel_gram", _max_kernel_gram_backward,
                                setup_context=_max_kernel_gram_setup)


# ---------------------------------------------------------------- public wrappers

def conv_adjacency(U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """Squared-overlap adjacency of spectral neurons (seed 000 sections 2.3, 4.2).

    U: (B, c, M) or (c, M), V: (B, c, K2, N) or (c, K2, N). Returns (B, N, M)
    (or (N, M)) with a[n, m] = sum_z (sum_k U[k, m] V[k, z, n])^2. K2 = 1 is
    the fully connected case, K2 = kernel area the conv case, K2 = H*W the
    conv -> flatten -> Linear case.
    """
    _checks.tensor("U", U, ndims=(2, 3), shape="(B, c, M) or (c, M)", finite=False)
    _checks.tensor("V", V, ndims=(3, 4), shape="(B, c, K2, N) or (c, K2, N)", finite=False)
    _checks.same_device_dtype(U=U, V=V)
    if V.dim() != U.dim() + 1:
        raise ValueError(f"V must have one more dimension than U (U {tuple(U.shape)}, V {tuple(V.shape)})")
    unbatched = U.dim() == 2
    if unbatched:
        U, V = U.unsqueeze(0), V.unsqueeze(0)
    if V.shape[0] != U.shape[0] or V.shape[1] != U.shape[1]:
        raise ValueError(f"U (B, c, M) and V (B, c, K2, N) must agree on B and c, got U {tuple(U.shape)} "
                         f"and V {tuple(V.shape)}")
    op = torch.ops.spectral_ext.conv_adjacency if _native() else reference.conv_adjacency
    out = op(U, V)
    _checks.finite_inputs_behind(out, U=U, V=V)  # a NaN in U or V reaches the output
    return out.squeeze(0) if unbatched else out


def signal_projection(x: torch.Tensor, V: torch.Tensor, s: torch.Tensor, stride=1, padding=0,
                      dilation=1, reduce: str | None = None, kernel_size=None) -> torch.Tensor:
    """Receptive-field signals s_i <v_i, field> (seed 001 section 4.3).

    x: (B, C, H, W) or (C, H, W); V: (C*kh*kw, r) right singular vectors of
    the unfolded weight (columns, in `weight.reshape(out, -1)` order); s: (r,).
    Returns (B, r, H', W') per position, or (B, r) with reduce="mean"
    (unbatched x drops B). The kernel is square unless `kernel_size` says
    otherwise. Differentiable with respect to x.
    """
    _checks.tensor("x", x, ndims=(3, 4), shape="(B, C, H, W) or (C, H, W)")
    _checks.tensor("V", V, ndims=(2,), shape="(C*kh*kw, r)")
    _checks.tensor("s", s, ndims=(1,), shape="(r,)")
    _checks.same_device_dtype(x=x, V=V, s=s)
    if s.shape[0] != V.shape[1]:
        raise ValueError(f"s must have r = V.shape[1] = {V.shape[1]} entries, got {s.shape[0]}")
    if reduce not in (None, "mean"):
        raise ValueError(f"reduce must be None or 'mean', got {reduce!r}")
    stride, padding, dilation = (_checks.int_pair(n, v) for n, v in
                                 (("stride", stride), ("padding", padding), ("dilation", dilation)))
    if min(stride) <= 0 or min(dilation) <= 0 or min(padding) < 0:
        raise ValueError(f"stride and dilation must be positive and padding non-negative, got stride "
                         f"{stride}, padding {padding}, dilation {dilation}")
    if kernel_size is not None:
        kernel_size = _checks.int_pair("kernel_size", kernel_size)
    for name, value in (("stride", stride), ("padding", padding), ("dilation", dilation)):
        if max(value) >= _INDEX_LIMIT:  # the kernels index in int64: refuse rather than wrap around
            raise ValueError(f"{name} must be below 2**62, got {value}")
    kernel_size, (Ho, Wo) = _conv_geometry(x.shape, V.shape[0], stride, padding, dilation, kernel_size)
    if Ho * Wo >= _INDEX_LIMIT or max(x.shape[-2:]) + 2 * max(padding) >= _INDEX_LIMIT:
        raise ValueError(f"padding {padding} gives {Ho} x {Wo} output positions, beyond the 2**62 that the "
                         "kernels count exactly in int64; use a smaller padding")
    unbatched = x.dim() == 3
    if unbatched:
        x = x.unsqueeze(0)
    if _native():
        out = torch.ops.spectral_ext.signal_projection(x, V, s, stride, padding, dilation, reduce,
                                                       kernel_size)
    else:
        out = reference.signal_projection(x, V, s, stride, padding, dilation, reduce, kernel_size)
    return out.squeeze(0) if unbatched else out


def sinkhorn(P: torch.Tensor, iters: int = 16) -> torch.Tensor:
    """Sinkhorn normalisation (seed 004 appendix D.2.1): `iters` rounds of
    dividing each column by its sum, then each row by its sum.

    P: (B, n, m) or (n, m), non-negative, every row and column with a positive
    sum. Differentiable with respect to P.
    """
    _checks.tensor("P", P, ndims=(2, 3), shape="(B, n, m) or (n, m)")
    _checks.positive_int("iters", iters, allow_zero=True)
    if not torch.compiler.is_compiling() and P.numel():
        if (P < 0).any():
            raise ValueError("P must be non-negative")
        if (P.sum(-2) <= 0).any() or (P.sum(-1) <= 0).any():
            raise ValueError("every row and column of P needs a positive sum (a zero row or column "
                             "cannot be normalised)")
    unbatched = P.dim() == 2
    if unbatched:
        P = P.unsqueeze(0)
    op = torch.ops.spectral_ext.sinkhorn if _native() else reference.sinkhorn
    out = op(P, iters)
    return out.squeeze(0) if unbatched else out


def max_kernel_gram(X: torch.Tensor, Y: torch.Tensor | None = None) -> torch.Tensor:
    """Gram matrix of the max kernel behind G_ReLU-CKA (seed 004 definition 5.3):
    K[i, j] = max_c sum_s X[i, c, s] Y[j, c, s].

    X: (N, C, S), Y: (N', C, S) (Y=None: the self Gram of X, computed
    symmetric). C is the channel axis the max runs over, S the spatial axis
    summed over (S = 1 for fully connected features). Returns (N, N').
    """
    _checks.tensor("X", X, ndims=(3,), shape="(N, C, S)")
    if Y is not None:
        _checks.tensor("Y", Y, ndims=(3,), shape="(N', C, S)")
        _checks.same_device_dtype(X=X, Y=Y)
        if Y.shape[1:] != X.shape[1:]:
            raise ValueError(f"X (N, C, S) and Y (N', C, S) must agree on C and S, got X {tuple(X.shape)} "
                             f"and Y {tuple(Y.shape)}")
    if X.shape[1] == 0:
        raise ValueError("X must have at least one channel (C > 0): the max runs over channels")
    op = torch.ops.spectral_ext.max_kernel_gram if _native() else reference.max_kernel_gram
    return op(X, Y)
