"""POT's (Python Optimal Transport 0.9.7) entropic solvers with their call shapes,
computed by spectral_ext's Sinkhorn kernel (spectral_ext.sinkhorn): change
``import ot`` to ``from spectral_ext.compat import pot as ot`` for

- ``sinkhorn(a, b, M, reg, method="sinkhorn" | "sinkhorn_log" | "sinkhorn_stabilized", ...)``
- ``sinkhorn_knopp``, ``sinkhorn_log``, ``sinkhorn2`` (the transport cost <M, plan>)
- ``solve_batch(M, reg, a, b, max_iter, tol, method)`` (POT's ``ot.batch.solve_batch``)

Same arguments, the same numbers (the same iteration, from the same start, with
POT's stopping rule), the same return types: numpy in, numpy out; torch in, torch
out; ``log=True`` gives the same dict. Differences: several histograms in `b`
(``b`` of shape (m, k)) are not supported; ``verbose`` prints nothing;
"sinkhorn_stabilized" runs the log domain (the same limit, POT's absorption
schedule aside); ``solve_batch`` stops each problem on its own when its error is
below `tol` (POT waits for the worst one) and is not differentiable (grad="detach").
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import _checks
from .._ops import _sinkhorn

__all__ = ["sinkhorn", "sinkhorn2", "sinkhorn_knopp", "sinkhorn_log", "solve_batch", "OTResult", "bregman", "batch"]


def _to_torch(M, a, b):
    """POT's inputs as float tensors on M's device, with POT's uniform defaults
    for empty marginals, and a function giving results back in M's type."""
    as_numpy = not isinstance(M, torch.Tensor)
    Mt = torch.as_tensor(np.asarray(M, dtype=np.float64) if as_numpy else M)
    if Mt.dtype not in (torch.float32, torch.float64):
        Mt = Mt.double()
    n, m = Mt.shape[-2:]

    def marginal(x, size):
        if x is None or len(x) == 0:
            shape = Mt.shape[:-2] + (size,)
            return Mt.new_full(shape, 1.0 / size)
        return torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x, dtype=Mt.dtype,
                               device=Mt.device)

    at, bt = marginal(a, n), marginal(b, m)
    if bt.dim() > Mt.dim() - 1:
        raise ValueError(f"b of shape {tuple(bt.shape)} holds several histograms, which spectral_ext.compat.pot "
                         "does not support: solve them one by one or as a batch (solve_batch)")
    back = (lambda t: t.detach().cpu().numpy()) if as_numpy else (lambda t: t)
    return Mt, at, bt, back


def _solve(a, b, M, reg, numItermax, stopThr, log, warn, log_domain, warmstart):
    if warmstart is not None:
        raise ValueError("warmstart is not supported by spectral_ext.compat.pot")
    Mt, at, bt, back = _to_torch(M, a, b)
    if not log_domain and Mt.numel() and Mt.device.type != "meta":
        K = torch.exp(Mt / -_checks.positive_float("reg", reg))
        if bool((K.amax(-1) == 0).any() | (K.amax(-2) == 0).any()):
            # a row or column of POT's kernel underflowed to zeros: its first round divides by zero, and POT
            # warns and returns its starting point diag(1/n) K diag(1/m) (spectral_ext.sinkhorn would switch to
            # the log domain instead)
            warnings.warn("Warning: numerical errors at iteration 0")
            n, m = K.shape
            plan = K / (n * m)
            out = {"err": [], "niter": 0, "u": back(K.new_full((n,), 1.0 / n)), "v": back(K.new_full((m,), 1.0 / m))}
            return back(plan), (out if log else None)
    plan, info = _sinkhorn(Mt, numItermax, at, bt, reg=reg, stop_threshold=float(stopThr), log_domain=log_domain,
                           return_log=True, as_pot=True)
    rounds = int(info["rounds"])
    errors = info["err"][: (rounds - 1) // 10 + 1] if rounds else info["err"][:0]
    converged = bool(errors.numel()) and float(errors[-1]) < stopThr
    if warn and not converged:
        warnings.warn("Sinkhorn did not converge. You might want to increase the number of iterations "
                      "`numItermax` or the regularization parameter `reg`.")
    if not log:
        return back(plan), None
    n = Mt.shape[0]
    out = {"err": [back(e) for e in errors], "niter": rounds - 1}
    if log_domain:
        out.update(log_u=back(info["log_u"]), log_v=back(info["log_v"]), u=back(info["log_u"].exp()),
                   v=back(info["log_v"].exp()))
    else:  # POT starts sinkhorn_knopp from u = 1/n: u scales by 1/n, v by n
        out.update(u=back(info["log_u"].exp() / n), v=back(info["log_v"].exp() * n))
    return back(plan), out


def sinkhorn_knopp(a, b, M, reg, numItermax=1000, stopThr=1e-9, verbose=False, log=False, warn=True,
                   warmstart=None, **kwargs):
    """POT's ``ot.bregman.sinkhorn_knopp``: the entropic plan by Sinkhorn-Knopp scaling."""
    plan, info = _solve(a, b, M, reg, numItermax, stopThr, log, warn, False, warmstart)
    return (plan, info) if log else plan


def sinkhorn_log(a, b, M, reg, numItermax=1000, stopThr=1e-9, verbose=False, log=False, warn=True,
                 warmstart=None, **kwargs):
    """POT's ``ot.bregman.sinkhorn_log``: the same plan, potentials in the log domain."""
    plan, info = _solve(a, b, M, reg, numItermax, stopThr, log, warn, True, warmstart)
    return (plan, info) if log else plan


_METHODS = {"sinkhorn": sinkhorn_knopp, "sinkhorn_log": sinkhorn_log, "sinkhorn_stabilized": sinkhorn_log}


def sinkhorn(a, b, M, reg, method="sinkhorn", numItermax=1000, stopThr=1e-9, verbose=False, log=False, warn=True,
             warmstart=None, **kwargs):
    """POT's ``ot.sinkhorn``: the entropic transport plan."""
    if method.lower() not in _METHODS:
        raise ValueError("Unknown method '%s'." % method)
    return _METHODS[method.lower()](a, b, M, reg, numItermax=numItermax, stopThr=stopThr, verbose=verbose,
                                    log=log, warn=warn, warmstart=warmstart)


def sinkhorn2(a, b, M, reg, method="sinkhorn", numItermax=1000, stopThr=1e-9, verbose=False, log=False,
              warn=False, warmstart=None, **kwargs):
    """POT's ``ot.sinkhorn2``: the transport cost <M, plan> of the entropic plan."""
    res = sinkhorn(a, b, M, reg, method=method, numItermax=numItermax, stopThr=stopThr, log=log, warn=warn,
                   warmstart=warmstart)
    plan = res[0] if log else res
    cost = (M * plan).sum() if isinstance(plan, torch.Tensor) else np.sum(np.asarray(M) * plan)
    return (cost, res[1]) if log else cost


@dataclass
class OTResult:
    """The fields of POT's ``ot.utils.OTResult`` that ``solve_batch`` fills."""
    value: object = None
    value_linear: object = None
    plan: object = None
    potentials: tuple | None = None
    log: dict = field(default_factory=dict)

    @property
    def potential_a(self):
        return self.potentials[0]

    @property
    def potential_b(self):
        return self.potentials[1]


def solve_batch(M, reg=None, a=None, b=None, max_iter=1000, tol=1e-5, method="auto", inner_iter=1,
                inner_reg=1e-3, reg_type="entropy", grad="envelope"):
    """POT's ``ot.batch.solve_batch`` for entropic problems (method "sinkhorn",
    "log_sinkhorn" or "auto" with reg > 0): M (B, n, m), a (B, n), b (B, m).
    POT's batch solver updates u (rows) first, so the problems are solved
    transposed by the column-first kernel."""
    if method not in ("auto", "sinkhorn", "log_sinkhorn"):
        raise ValueError(f"method {method!r} is not supported by spectral_ext.compat.pot: use 'sinkhorn' or "
                         "'log_sinkhorn'")
    if reg is None or reg <= 0:
        raise ValueError("Sinkhorn methods require a strictly positive reg parameter. Please provide a valid reg "
                         "value.")
    if reg_type not in ("entropy", "kl"):
        raise ValueError(f"reg_type must be 'entropy' or 'kl', got {reg_type!r}")
    Mt, at, bt, back = _to_torch(M, a if a is not None else [], b if b is not None else [])
    at, bt = at.expand(Mt.shape[:-1]), bt.expand(Mt.shape[:-2] + Mt.shape[-1:])
    planT, info = _sinkhorn(Mt.transpose(1, 2), max_iter, bt, at, reg=reg, stop_threshold=float(tol),
                            log_domain=method != "sinkhorn", return_log=True, as_pot=True)
    T = planT.transpose(1, 2)
    value_linear = (Mt * T).sum((1, 2))
    if reg_type == "entropy":
        value = value_linear + reg * (T * torch.log(T + 1e-16)).sum((1, 2))
    else:
        ref = at[:, :, None] * bt[:, None, :]
        value = value_linear + reg * (T * torch.log(T / ref + 1e-16)).sum((1, 2))
    return OTResult(value=back(value), value_linear=back(value_linear), plan=back(T),
                    potentials=(back(info["log_v"]), back(info["log_u"])),
                    log={"n_iter": int(info["rounds"].max()) - 1})


class _Namespace:
    """POT's submodules by name (``ot.bregman.sinkhorn_log``, ``ot.batch.solve_batch``)."""

    def __init__(self, **functions):
        self.__dict__.update(functions)


bregman = _Namespace(sinkhorn=sinkhorn, sinkhorn2=sinkhorn2, sinkhorn_knopp=sinkhorn_knopp, sinkhorn_log=sinkhorn_log)
batch = _Namespace(solve_batch=solve_batch)
