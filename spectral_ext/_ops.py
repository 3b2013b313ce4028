"""Typed wrappers over torch.ops.spectral_ext.*: validation, unbatched inputs,
backend choice, fake kernels (for torch.compile) and autograd formulas."""
from __future__ import annotations

import contextlib
import math
import contextvars

import torch

from . import _checks, reference

BACKENDS = ("native", "reference")
OPERATORS = ("conv_adjacency", "signal_projection", "sinkhorn", "max_kernel_gram", "sinkhorn_scaling",
             "linear_sum_assignment", "network_simplex")
CPU_ONLY = ("sinkhorn_scaling", "linear_sum_assignment", "network_simplex")  # CUDA: the twin, or the CPU kernel
_backend = contextvars.ContextVar("spectral_ext_backend", default="native")
MAX_ITERS = 10**12  # Sinkhorn rounds; beyond this a call would not end in a lifetime
_CHUNK_ELEMENTS = 1 << 22  # the backward passes build temporaries of about this many elements


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


def _interruptible(op, *args):
    """Call a compiled operator whose CPU loop polls for Ctrl-C (csrc/interrupt.h)
    and turn its "interrupted" error back into KeyboardInterrupt."""
    try:
        return op(*args)
    except RuntimeError as error:
        if "spectral_ext: interrupted" in str(error):
            raise KeyboardInterrupt from None
        raise


# ---------------------------------------------------------------- geometry

def _as_pairs(stride, padding, dilation, kernel_size):
    """The schema's int[2] arguments, which may arrive with one entry, as pairs."""
    stride, padding, dilation = (tuple(v) * (2 // len(v)) for v in (stride, padding, dilation))
    if kernel_size is not None:
        kernel_size = tuple(kernel_size) * (2 // len(kernel_size))
    return stride, padding, dilation, kernel_size


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


@torch.library.register_fake("spectral_ext::sinkhorn_scaling")
def _sinkhorn_scaling_fake(K, a, b, iters, stop_threshold=0.0, check_every=10, log_domain=False):
    B, n, m = K.shape
    checks = 0 if iters == 0 else (iters - 1) // check_every + 1
    return (torch.empty_like(K, memory_format=torch.contiguous_format), K.new_empty((B, n)), K.new_empty((B, m)),
            K.new_empty((B,), dtype=torch.int64), K.new_empty((B, checks)))


@torch.library.register_fake("spectral_ext::max_kernel_gram")
def _max_kernel_gram_fake(X, Y=None):
    return X.new_empty((X.shape[0], (X if Y is None else Y).shape[0]))


@torch.library.register_fake("spectral_ext::network_simplex")
def _network_simplex_fake(M, a, b, max_iter=100000, u0=None, v0=None):
    B, n, m = M.shape
    counts = M.new_empty(B, dtype=torch.int64)
    return M.new_empty(B, n, m), M.new_empty(B, n), M.new_empty(B, m), M.new_empty(B), counts, counts.clone()


@torch.library.register_fake("spectral_ext::linear_sum_assignment")
def _linear_sum_assignment_fake(cost, maximize=False):
    k = min(cost.shape[1], cost.shape[2])
    return (cost.new_empty((cost.shape[0], k), dtype=torch.int64),
            cost.new_empty((cost.shape[0], k), dtype=torch.int64))


# ---------------------------------------------------------------- autograd
# Each backward is written with plain tensor ops (no autograd inside), so
# torch.compile can trace it; it recomputes what the forward did not keep.

def _conv_adjacency_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _conv_adjacency_backward(ctx, grad):
    # da/dU and da/dV through inner[b, z, n, m] = sum_k U V, built for a chunk of
    # taps at a time and weighted in place: (B, K2, N, M) never exists (issue 14.17).
    U, V = ctx.saved_tensors
    K2 = V.shape[2]
    step = max(1, _CHUNK_ELEMENTS // max(1, grad.numel()))
    gU = torch.zeros_like(U) if ctx.needs_input_grad[0] else None
    gV = torch.empty_like(V) if ctx.needs_input_grad[1] else None
    for z0 in range(0, K2, step):
        Vz = V[:, :, z0:z0 + step]
        weighted = torch.einsum("bkm,bkzn->bznm", U, Vz).mul_(grad.unsqueeze(1)).mul_(2)
        if gU is not None:
            gU += torch.einsum("bznm,bkzn->bkm", weighted, Vz)
        if gV is not None:
            gV[:, :, z0:z0 + step] = torch.einsum("bznm,bkm->bkzn", weighted, U)
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
    # Replays the normalisations keeping only vectors: every iterate is
    # diag(r) X diag(c) with X = P over its column maxima (which changes nothing
    # after a round, so their gradient is zero), then runs back through each step,
    # rebuilding its iterate Z: for Z = A / s with s the sums of A along d,
    # dA = (dZ - sum_d(dZ * Z)) / s. Memory: a few matrices whatever `iters` is,
    # not two per round (issue 14.17).
    (P,) = ctx.saved_tensors
    if ctx.iters == 0:
        return grad, None
    cmax = P.amax(-2, keepdim=True)
    X = P / cmax
    r, c = X.new_ones(X.shape[:-1] + (1,)), X.new_ones(X.shape[:-2] + (1, X.shape[-1]))
    steps = []
    for _ in range(ctx.iters):
        sums = c * (X * r).sum(-2, keepdim=True)
        c = c / sums
        steps.append((-2, sums, r, c))
        sums = r * (X * c).sum(-1, keepdim=True)
        r = r / sums
        steps.append((-1, sums, r, c))
    for dim, sums, r, c in reversed(steps):
        grad = (grad - (grad * (r * X * c)).sum(dim, keepdim=True)) / sums
    return grad / cmax, None


def _max_kernel_gram_setup(ctx, inputs, output):
    X, Y = inputs
    ctx.self_gram = Y is None
    ctx.save_for_backward(X, X if Y is None else Y)


def _max_kernel_gram_backward(ctx, grad):
    # The max passes the gradient to the winning channel (the first on ties). The
    # winners are recomputed for a chunk of rows at a time, so only a
    # (rows, N', C) slice of the products exists, never (N, N', C) (issue 14.17).
    X, Y = ctx.saved_tensors
    N, C = X.shape[:2]
    step = max(1, _CHUNK_ELEMENTS // max(1, Y.shape[0] * C))
    gX, gY = torch.empty_like(X), torch.zeros_like(Y)
    for i0 in range(0, N, step):
        Xc = X[i0:i0 + step]
        winner = torch.einsum("ics,jcs->ijc", Xc, Y).argmax(-1)
        routed = torch.nn.functional.one_hot(winner, C).to(grad.dtype).mul_(grad[i0:i0 + step].unsqueeze(-1))
        gX[i0:i0 + step] = torch.einsum("ijc,jcs->ics", routed, Y)
        gY += torch.einsum("ijc,ics->jcs", routed, Xc)
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


# ---------------------------------------------------------------- memory and finiteness

def _finite(output: torch.Tensor, **inputs: torch.Tensor) -> None:
    """_checks.finite's refusals (NaN or infinite inputs by name, an output
    that overflowed from finite ones) from each tensor's extremes: aminmax
    reads a tensor once and copies nothing (a float64 sum copies a float32
    tensor, and materialises an expanded one), one host synchronisation."""
    tensors = [t for t in (*inputs.values(), output) if t is not None and t.numel()]
    if not tensors or _checks.data_free(*tensors):
        return
    extremes = torch.stack([e.to(torch.float64) for t in tensors for e in torch.aminmax(t)])
    if bool(torch.isfinite(extremes).all()):
        return
    for name, value in inputs.items():
        if value.numel() and not bool(torch.isfinite(torch.stack(torch.aminmax(value))).all()):
            raise ValueError(f"{name} contains NaN or infinite values")
    raise ValueError(f"{' and '.join(inputs)} are finite but the result overflows "
                     f"{str(output.dtype).replace('torch.', '')}: rescale them or use float64")


def _refuse_unallocatable(needed: int, device, what: str, advice: str, *tensors: torch.Tensor) -> None:
    """Refuse, before any work, an operator whose result and the intermediates
    its route allocates (`needed` bytes) exceed the free memory of `device`
    (_checks.memory: MemAvailable on Linux, the free CUDA memory; with 25%
    slack) instead of failing in the allocator, or being killed, after the fact."""
    if _checks.data_free(*tensors):
        return
    _checks.memory(needed, device, what, advice)


def _gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:.3g} GiB"


# ---------------------------------------------------------------- public wrappers

def conv_adjacency(U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """Squared-overlap adjacency of spectral neurons (seed 000 sections 2.3, 4.2).

    U: (B, c, M) or (c, M), V: (B, c, K2, N) or (c, K2, N). Returns (B, N, M)
    (or (N, M)) with a[n, m] = sum_z (sum_k U[k, m] V[k, z, n])^2. K2 = 1 is
    the fully connected case, K2 = kernel area the conv case, K2 = H*W the
    conv -> flatten -> Linear case. Refused up front (ValueError naming U
    and V and the size) when the result and the intermediates of the route
    would not fit in the device's free memory (expanded inputs can ask for
    terabytes).
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
    B, c, M = U.shape
    K2, N = V.shape[2], V.shape[3]
    size = U.element_size()
    result = B * N * M * size
    if not _native():  # the twin's (B, K2, N, M) products and their squares
        needed = result + 2 * B * K2 * N * M * size
    else:  # the kernel's contiguous copies; on the CPU also a chunk of taps' products (csrc/cpu/conv_adjacency.cpp)
        needed = result + (0 if U.is_contiguous() else U.numel() * size) \
            + (0 if V.is_contiguous() else B * c * K2 * N * size)
        if U.device.type == "cpu" and B * N * M:
            chunk = max(1, min(K2, (1 << 23) // (B * N * M)))
            needed += chunk * B * N * M * size + (B * c * chunk * N * size if chunk < K2 else 0)
    _refuse_unallocatable(needed, U.device, f"conv_adjacency of U {tuple(U.shape)} and V {tuple(V.shape)} (a "
                          f"({B}, {N}, {M}) result of {_gib(result)})",
                          "pass fewer spectral neurons (U's M, V's N), taps (K2) or batches at a time", U, V)
    op = torch.ops.spectral_ext.conv_adjacency if _native() else reference.conv_adjacency
    out = op(U, V)
    _finite(out, U=U, V=V)
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
    _checks.tensor("x", x, ndims=(3, 4), shape="(B, C, H, W) or (C, H, W)", finite=False)
    _checks.tensor("V", V, ndims=(2,), shape="(C*kh*kw, r)", finite=False)
    _checks.tensor("s", s, ndims=(1,), shape="(r,)", finite=False)
    _checks.same_device_dtype(x=x, V=V, s=s)
    if torch.is_grad_enabled() and (V.requires_grad or s.requires_grad):  # refused now, not at backward
        raise ValueError("signal_projection differentiates with respect to x only: V and s must not require "
                         "grad (detach them)")
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
    kernel_size, (Ho, Wo) = _conv_geometry(x.shape, V.shape[0], stride, padding, dilation, kernel_size)
    if Ho * Wo >= 2**62:  # positions are counted in int64
        raise ValueError(f"stride {stride}, padding {padding} and dilation {dilation} give {Ho} x {Wo} output "
                         "positions, 2**62 or more: check padding")
    unbatched = x.dim() == 3
    if unbatched:
        x = x.unsqueeze(0)
    if _native():
        out = torch.ops.spectral_ext.signal_projection(x, V, s, stride, padding, dilation, reduce,
                                                       kernel_size)
    else:
        out = reference.signal_projection(x, V, s, stride, padding, dilation, reduce, kernel_size)
    _checks.finite(out, x=x, V=V, s=s)
    return out.squeeze(0) if unbatched else out


def _marginal(name: str, value, batch: int, size: int, like: torch.Tensor) -> torch.Tensor:
    """a or b as (B, size): ones when None (the paper's doubly stochastic target)."""
    if value is None:
        return like.new_ones((batch, size))
    _checks.tensor(name, value, ndims=(1, 2), shape=f"({size},) or ({batch}, {size})", finite=False)
    _checks.same_device_dtype(P=like, **{name: value})
    if value.shape[-1] != size or (value.dim() == 2 and value.shape[0] != batch):
        raise ValueError(f"{name} must have shape ({size},) or ({batch}, {size}) for P of shape "
                         f"{tuple(like.shape)}, got {tuple(value.shape)}")
    return value.expand(batch, size)


def sinkhorn(P: torch.Tensor, iters: int = 16, a: torch.Tensor | None = None, b: torch.Tensor | None = None, *,
             reg: float | None = None, stop_threshold: float | None = None, check_every: int = 10,
             log_domain: bool = False, return_log: bool = False):
    """Sinkhorn normalisation (seed 004 appendix D.2.1): `iters` rounds of
    dividing each column by its sum, then each row by its sum; with marginals,
    Sinkhorn-Knopp scaling to row sums `a` and column sums `b` (Cuturi 2013, POT's
    ``ot.sinkhorn(a, b, M, reg)``): v = b / (K^T u), then u = a / (K v).

    P: (B, n, m) or (n, m). Without `reg` it is the non-negative kernel itself,
    every row and column with a positive sum; with `reg` > 0 it is a cost matrix
    M and the kernel is exp(-M / reg) (the entropic problem); where that kernel
    would underflow (or overflow) in P's dtype, -M / reg < ln(smallest normal),
    it runs in the log domain by itself (the same plan, which the plain kernel
    would have turned into NaN), and a reg so small that the costs' spread over
    reg exceeds 1 / eps of the dtype (or M / reg overflows) is refused: not even
    the log domain resolves the plan there. a: (n,) or (B, n),
    b: (m,) or (B, m), positive (default: ones, the paper's doubly stochastic
    target; POT's default is uniform 1/n, 1/m). stop_threshold: stop a problem
    after round 0, check_every, ... (POT's schedule) once ||plan^T 1 - b||_2 is
    below it; `iters` is then the maximum. log_domain: keep the potentials in the
    log domain, for badly scaled problems (small reg), at about the plain cost.
    return_log: also return a dict with log_u, log_v (the potentials, from
    u = 0), rounds (done per problem) and err (the errors checked, (B, checks),
    NaN after a stop).

    The paper's form (no a, b, reg, stop_threshold, log_domain) is differentiable
    and has CPU and CUDA kernels. The other forms run a CPU kernel; CUDA tensors,
    and inputs that need a gradient, go to the plain-PyTorch twin
    (reference.sinkhorn_scaling). Every positive finite input gives the
    explicit normalisation's answer (no overflow from tiny or huge entries); on
    CUDA the paper's form checks for such inputs and then runs the twin. Ctrl-C
    stops a long CPU run; iters above 1e12 are refused.
    """
    return _sinkhorn(P, iters, a, b, reg=reg, stop_threshold=stop_threshold, check_every=check_every,
                     log_domain=log_domain, return_log=return_log)


def _sinkhorn(P, iters=16, a=None, b=None, *, reg=None, stop_threshold=None, check_every=10, log_domain=False,
              return_log=False, as_pot: bool = False):
    """sinkhorn; as_pot: the kernel exp(-M / reg) as POT forms it, whatever it underflows to (no switch to the
    log domain, no refusal of a tiny reg: compat.pot keeps POT's semantics)."""
    _checks.tensor("P", P, ndims=(2, 3), shape="(B, n, m) or (n, m)", finite=False)
    _checks.positive_int("iters", iters, allow_zero=True, maximum=MAX_ITERS,
                         why=" (use stop_threshold to stop at convergence)")
    check_every = _checks.positive_int("check_every", check_every)
    if reg is not None:
        reg = _checks.positive_float("reg", reg)
    if stop_threshold is not None:
        if isinstance(stop_threshold, bool) or not isinstance(stop_threshold, (int, float)) or \
                not stop_threshold >= 0:
            raise ValueError(f"stop_threshold must be a number >= 0, got {stop_threshold!r}")
    for name, flag in (("log_domain", log_domain), ("return_log", return_log)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    unbatched = P.dim() == 2
    Pb = P.unsqueeze(0) if unbatched else P
    B, n, m = Pb.shape
    paper = a is None and b is None and reg is None and stop_threshold is None and not log_domain \
        and not return_log
    av, bv = _marginal("a", a, B, n, Pb), _marginal("b", b, B, m, Pb)
    badly_scaled = _sinkhorn_validate(Pb, av if a is not None else None, bv if b is not None else None,
                                      cost=reg is not None, cuda_paper=paper and Pb.is_cuda and iters > 0)
    if paper:
        if _native() and not badly_scaled:
            # The column maxima keep the CUDA kernel's sums finite (the CPU kernel does the same).
            Pin = Pb / Pb.amax(-2, keepdim=True) if Pb.is_cuda and iters > 0 and Pb.numel() else Pb
            out = _interruptible(torch.ops.spectral_ext.sinkhorn, Pin, iters)
        else:
            out = reference.sinkhorn(Pb, iters)
        return out.squeeze(0) if unbatched else out
    if reg is not None:
        L = -Pb / reg
        if not as_pot and _kernel_out_of_range(L, reg, Pb):
            log_domain = True  # exp(-M / reg) would lose entries to underflow (or overflow): same plan, log domain
        K = L if log_domain else torch.exp(L)
    else:
        K = Pb.log() if log_domain else Pb
    wants_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (K, av, bv))
    args = (K, av, bv, iters, float(stop_threshold or 0.0), check_every, log_domain)
    if _native() and not wants_grad and K.device.type in ("cpu", "meta"):
        plan, log_u, log_v, rounds, err = _interruptible(torch.ops.spectral_ext.sinkhorn_scaling, *args)
    else:
        plan, log_u, log_v, rounds, err = reference.sinkhorn_scaling(*args)
    if unbatched:
        plan, log_u, log_v, rounds, err = plan[0], log_u[0], log_v[0], rounds[0], err[0]
    if return_log:
        return plan, {"log_u": log_u, "log_v": log_v, "rounds": rounds, "err": err}
    return plan


def _kernel_out_of_range(L: torch.Tensor, reg: float, M: torch.Tensor) -> bool:
    """Whether exp(L), L = -M / reg, leaves the normal range of L's dtype (one
    host synchronisation); refuses a reg for which M / reg overflows or the
    costs' spread over reg exceeds 1 / eps, where the log domain's potentials
    (of that size) keep no digit of the plan."""
    if not L.numel() or _checks.data_free(L):
        return False
    info = torch.finfo(L.dtype)
    flat = L.flatten(1)
    low, high = flat.amin(1), flat.amax(1)
    finite, low_all, high_all, spread = torch.stack([
        torch.isfinite(L).all().to(L.dtype), low.min(), high.max(), (high - low).max()]).tolist()
    dtype = str(L.dtype).replace("torch.", "")
    if not finite:
        raise ValueError(f"M / reg overflows {dtype} (max |M| = {float(M.abs().max()):.3g}, reg = {reg:.3g}): raise "
                         "reg, or subtract a constant from M (the plan does not change)")
    if spread * info.eps > 1:
        raise ValueError(f"reg = {reg:.3g} is too small for these costs: their spread over reg is {spread:.3g}, "
                         f"beyond the 1 / eps = {1 / info.eps:.3g} that {dtype} resolves even with log_domain=True "
                         "(the plan would be rounding noise); raise reg")
    return low_all < math.log(info.tiny) or high_all > math.log(info.max)


def _sinkhorn_validate(P, a, b, *, cost: bool, cuda_paper: bool) -> bool:
    """Every check of sinkhorn's inputs in one host synchronisation (issue 15).
    Returns whether a CUDA input is too badly scaled for the CUDA kernel."""
    if not P.numel() or _checks.data_free(P):
        return False
    flags = [~torch.isfinite(P).all()]
    if not cost:
        cmax, rmax = P.amax(-2), P.amax(-1)
        flags += [(P < 0).any(), (cmax <= 0).any() | (rmax <= 0).any()]
    for t in (a, b):
        if t is not None:
            flags.append(~torch.isfinite(t).all() | (t <= 0).any())
    if cuda_paper:  # a row far below its columns overflows the CUDA kernel's scalings
        X = P / P.amax(-2, keepdim=True)
        flags.append((X.sum(-1) < torch.finfo(P.dtype).tiny * 2**24).any())
    flags = torch.stack(flags).tolist()
    if flags[0]:
        raise ValueError("P contains NaN or infinite values")
    k = 1
    if not cost:
        if flags[1]:
            raise ValueError("P must be non-negative")
        if flags[2]:
            raise ValueError("every row and column of P needs a positive sum (a zero row or column "
                             "cannot be normalised)")
        k = 3
    for name, t in (("a", a), ("b", b)):
        if t is not None:
            if flags[k]:
                raise ValueError(f"{name} must be finite and positive")
            k += 1
    return bool(cuda_paper and flags[k])


def max_kernel_gram(X: torch.Tensor, Y: torch.Tensor | None = None) -> torch.Tensor:
    """Gram matrix of the max kernel behind G_ReLU-CKA (seed 004 definition 5.3):
    K[i, j] = max_c sum_s X[i, c, s] Y[j, c, s].

    X: (N, C, S), Y: (N', C, S) (Y=None: the self Gram of X, computed
    symmetric). C is the channel axis the max runs over, S the spatial axis
    summed over (S = 1 for fully connected features). Returns (N, N').

    Memory: the result and, on the CPU, a copy of X (and Y) packed into
    64-row tiles where both have 32 rows or more; a side with fewer is read
    in place (any strides: an expanded input is never copied), so the peak
    is about the inputs' size. Refused up front (ValueError naming X and the
    size) when that would not fit in the device's free memory.
    """
    _checks.tensor("X", X, ndims=(3,), shape="(N, C, S)", finite=False)
    if Y is not None:
        _checks.tensor("Y", Y, ndims=(3,), shape="(N', C, S)", finite=False)
        _checks.same_device_dtype(X=X, Y=Y)
        if Y.shape[1:] != X.shape[1:]:
            raise ValueError(f"X (N, C, S) and Y (N', C, S) must agree on C and S, got X {tuple(X.shape)} "
                             f"and Y {tuple(Y.shape)}")
    if X.shape[1] == 0:
        raise ValueError("X must have at least one channel (C > 0): the max runs over channels")
    N, C, S = X.shape
    Np = X.shape[0] if Y is None else Y.shape[0]
    size = X.element_size()
    result = N * Np * size
    sides = [N] + ([] if Y is None else [Np])
    if not _native():  # the twin's blocks of (rows, N', C, S) products, the blocks' results and their cat
        needed = 2 * result + 2 * min(N, max(1, (1 << 22) // max(1, Np * C * S))) * Np * C * S * size
    elif X.device.type == "cpu":  # the 64-row tiles (csrc/cpu/max_kernel_gram.cpp: none below 32 rows)
        needed = result + (0 if min(N, Np) < 32 else sum(-(-n // 64) * 64 for n in sides) * C * S * size)
    else:  # channel-major copies
        needed = result + sum(sides) * C * S * size
    _refuse_unallocatable(needed, X.device, f"max_kernel_gram of X {tuple(X.shape)}"
                          + ("" if Y is None else f" and Y {tuple(Y.shape)}")
                          + f" (a {N} x {Np} result of {_gib(result)})",
                          "pass fewer samples (rows of X or Y), or smaller C x S, at a time",
                          *([X] if Y is None else [X, Y]))
    op = torch.ops.spectral_ext.max_kernel_gram if _native() else reference.max_kernel_gram
    out = op(X, Y)
    _finite(out, X=X, **({} if Y is None else {"Y": Y}))
    return out


def _scipy_cost_matrix(cost):
    """A cost that is not a tensor, read as scipy reads it (PyArray_ContiguousFromAny
    to float64): an array (np.matrix included; any object with __array__) is cast
    under numpy's "safe" rule, so strings, objects, complex and float128 raise scipy's
    TypeError; anything else (nested lists, scalars) is np.array(cost, dtype=float64),
    which parses number strings and reads None as NaN, as scipy does."""
    import numpy as np

    if isinstance(cost, np.ndarray) or hasattr(cost, "__array__"):
        array = np.asarray(cost)
        if not np.can_cast(array.dtype, np.float64, casting="safe"):
            raise TypeError(f"Cannot cast array data from {array.dtype!r} to dtype('float64') according to the "
                            "rule 'safe'")
    array = np.asarray(cost, dtype=np.float64)
    if array.ndim not in (2, 3):
        raise ValueError(f"expected a matrix (2-D array), got a {array.ndim} array (spectral_ext also takes a "
                         "batch of them, (B, n, m))")
    return np.ascontiguousarray(array)


def linear_sum_assignment(cost, maximize: bool = False):
    """Optimal assignments of a batch of problems: scipy.optimize.linear_sum_assignment
    for each, solved in parallel across the batch on the CPU, with scipy's answer, ties
    included (its shortest augmenting path algorithm, Crouse 2016, with its order of
    scanning and tie rule; square problems with a unique optimum take a faster start
    from Jonker-Volgenant's initialisation, certified by the duals to give the same
    optimum; see csrc/cpu/linear_sum_assignment.cpp). Seed 004, appendix D.2.1 (the
    Hungarian rounding of a stitching layer's P) and definition 5.2 (G_ReLU-Procrustes
    via the linear sum assignment problem).

    cost: a tensor (B, n, m) or (n, m), float32 or float64; or, as in scipy, any
    array-like (numpy array of any real dtype, np.matrix, nested lists), read as
    scipy reads it (a string, object or complex array raises scipy's TypeError). As in
    scipy, +inf entries are forbidden pairs (-inf with maximize=True); NaN or the other
    infinity raises ValueError "... contains invalid numeric entries", a problem with
    no finite assignment ValueError "... cost matrix is infeasible". maximize: maximise
    the total instead (a bool; scipy takes any truthy object).
    Returns (rows, cols), int64 of shape (B, min(n, m)) with rows sorted in each
    problem, so cost[b, rows[b], cols[b]].sum() is the optimum; one (n, m) problem
    gives scipy's pair of 1-D arrays. A tensor in gives tensors out (on the input's
    device: CUDA tensors are solved by the CPU kernel, the algorithm being sequential),
    anything else numpy arrays. Ctrl-C stops a long batch.
    """
    import numpy as np

    as_numpy = not isinstance(cost, torch.Tensor)
    if as_numpy:
        cost = torch.from_numpy(_scipy_cost_matrix(cost))
    # Entries are checked by the kernel (or scipy), which allows +inf as scipy does,
    # while the problem is in cache: a separate pass over the batch cost more than
    # solving weight-matching problems.
    _checks.tensor("cost", cost, ndims=(2, 3), shape="(B, n, m) or (n, m)", finite=False)
    if not isinstance(maximize, (bool, np.bool_)):
        raise TypeError(f"maximize must be a bool, got {type(maximize).__name__}")
    unbatched = cost.dim() == 2
    batch = cost.unsqueeze(0) if unbatched else cost
    if batch.device.type == "meta" or not _native():
        op = torch.ops.spectral_ext.linear_sum_assignment if batch.device.type == "meta" else \
            reference.linear_sum_assignment
        rows, cols = op(batch, bool(maximize))
    else:
        rows, cols = _interruptible(torch.ops.spectral_ext.linear_sum_assignment, batch.detach().cpu(),
                                    bool(maximize))
        rows, cols = rows.to(cost.device), cols.to(cost.device)
    if unbatched:
        rows, cols = rows[0], cols[0]
    if as_numpy:
        return rows.numpy(), cols.numpy()
    return rows, cols
