"""sinkhorn: Sinkhorn normalisation (wrapper, fake kernel, autograd). The
wrapper also routes the forms with marginals, a cost or a stop to
sinkhorn_scaling (sinkhorn_scaling_op)."""
from __future__ import annotations

import torch

from .. import _checks, reference
from ._common import _interruptible, _native
from .sinkhorn_scaling_op import _kernel_out_of_range, _marginal

MAX_ITERS = 10**12  # Sinkhorn rounds; beyond this a call would not end in a lifetime


def sinkhorn(P: torch.Tensor, iters: int = 16, a: torch.Tensor | None = None, b: torch.Tensor | None = None, *,
             reg: float | None = None, stop_threshold: float | None = None, check_every: int = 10,
             log_domain: bool = False, return_log: bool = False) -> torch.Tensor | tuple[torch.Tensor, dict]:
    """Sinkhorn normalisation (seed 004 appendix D.2.1), or Sinkhorn-Knopp scaling to given marginals.

    `iters` rounds of dividing each column by its sum, then each row by its sum; with marginals,
    Sinkhorn-Knopp scaling to row sums `a` and column sums `b` (Cuturi 2013, POT's
    ``ot.sinkhorn(a, b, M, reg)``): v = b / (K^T u), then u = a / (K v).

    Without `reg`, P is the non-negative kernel itself, every row and column with a positive sum; with
    `reg` > 0 it is a cost matrix M and the kernel is exp(-M / reg) (the entropic problem); where that
    kernel would underflow (or overflow) in P's dtype, -M / reg < ln(smallest normal), it runs in the log
    domain by itself (the same plan, which the plain kernel would have turned into NaN), and a reg so
    small that the costs' spread over reg exceeds 1 / eps of the dtype (or M / reg overflows) is refused:
    not even the log domain resolves the plan there.

    The paper's form (no a, b, reg, stop_threshold, log_domain) is differentiable and has CPU and CUDA
    kernels. The other forms run a CPU kernel; CUDA tensors, and inputs that need a gradient, go to the
    plain-PyTorch twin (reference.sinkhorn_scaling). Every positive finite input gives the explicit
    normalisation's answer (no overflow from tiny or huge entries); on CUDA the paper's form checks for
    such inputs and then runs the twin. Ctrl-C stops a long CPU run; iters above 1e12 are refused.

    Args:
        P: (B, n, m) or (n, m): the kernel, or the cost matrix M with `reg`.
        iters: the number of rounds; the maximum with stop_threshold (default 16).
        a: (n,) or (B, n) row sums, positive (default: ones, the paper's doubly stochastic target; POT's
            default is uniform 1/n).
        b: (m,) or (B, m) column sums, positive (default: ones; POT's default is uniform 1/m).
        reg: the entropic regularisation; None: P is the kernel (default None).
        stop_threshold: stop a problem after round 0, check_every, ... (POT's schedule) once
            ||plan^T 1 - b||_2 is below it (default None: run all `iters` rounds).
        check_every: the rounds between checks of stop_threshold (default 10).
        log_domain: keep the potentials in the log domain, for badly scaled problems (small reg), at about
            the plain cost (default False).
        return_log: also return the log dict (default False).

    Returns:
        The plan, a tensor shaped like P; with return_log=True, (plan, log), log a dict with log_u, log_v
        (the potentials, from u = 0), rounds (done per problem) and err (the errors checked,
        (B, checks), NaN after a stop).
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


def _sinkhorn_validate(P, a, b, *, cost: bool, cuda_paper: bool) -> bool:
    """Every check of sinkhorn's inputs in one host synchronisation.
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


# ---------------------------------------------------------------- fake kernel

@torch.library.register_fake("spectral_ext::sinkhorn")
def _sinkhorn_fake(P, iters=16):
    return torch.empty_like(P, memory_format=torch.contiguous_format)


# ---------------------------------------------------------------- autograd
# The backward is written with plain tensor ops (no autograd inside), so
# torch.compile can trace it; it recomputes what the forward did not keep.

def _sinkhorn_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])
    ctx.iters = inputs[1]


def _sinkhorn_backward(ctx, grad):
    # Replays the normalisations keeping only vectors: every iterate is
    # diag(r) X diag(c) with X = P over its column maxima (which changes nothing
    # after a round, so their gradient is zero), then runs back through each step,
    # rebuilding its iterate Z: for Z = A / s with s the sums of A along d,
    # dA = (dZ - sum_d(dZ * Z)) / s. Memory: a few matrices whatever `iters` is,
    # not two per round.
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


torch.library.register_autograd("spectral_ext::sinkhorn", _sinkhorn_backward,
                                setup_context=_sinkhorn_setup)
