"""POT's (Python Optimal Transport 0.9.7) solvers with their call shapes: change
``import ot`` to ``from spectral_ext.compat import pot as ot`` for

- ``sinkhorn(a, b, M, reg, method="sinkhorn" | "sinkhorn_log" | "sinkhorn_stabilized", ...)``
- ``sinkhorn_knopp``, ``sinkhorn_log``, ``sinkhorn2`` (the transport cost <M, plan>),
  computed by spectral_ext's Sinkhorn kernel (spectral_ext.sinkhorn)
- ``solve_batch(M, reg, a, b, max_iter, tol, method)`` (POT's ``ot.batch.solve_batch``)
- ``emd(a, b, M, numItermax, log, center_dual, numThreads, check_marginals, potentials_init)``
  and ``emd2`` (also ``ot.lp.emd``/``emd2``): exact OT by a network simplex in C++
  (csrc/cpu/network_simplex.cpp), POT's optimum; beyond POT, M of shape (B, n, m)
  solves a batch of problems in one call, in parallel
- ``barycenter`` (``ot.bregman.barycenter``): the entropic barycenter, POT's iterations

Same arguments, the same numbers (the same iteration, from the same start, with
POT's stopping rule; for emd the same optimal cost, the plan possibly another optimal
one where there are several), the same return types: numpy in, numpy out; torch in,
torch out; ``log=True`` gives the same dict; POT's warnings and AssertionErrors; at
reg = 0 POT's warning and non-finite plan. Differences: several histograms in `b`
(``b`` of shape (m, k)) are not supported by the Sinkhorn functions (emd2 takes
them); ``verbose`` prints nothing; "sinkhorn_stabilized" runs the log domain (the same
limit, POT's absorption schedule aside); ``solve_batch`` stops each problem on its own
when its error is below `tol` (POT waits for the worst one) and is not differentiable
(grad="detach"). Not offered (NotImplementedError naming them): POT's other Sinkhorn
methods (greenkhorn, epsilon scaling, screenkhorn), Sinkhorn warm starts, sparse cost
matrices; nor POT's other modules (debiased and convolutional barycenters, empirical
Sinkhorn, free-support and LP barycenters, ot.solve, unbalanced, Gromov-Wasserstein).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import _checks
from .._ops import _sinkhorn

__all__ = ["sinkhorn", "sinkhorn2", "sinkhorn_knopp", "sinkhorn_log", "solve_batch", "OTResult", "emd", "emd2",
           "barycenter", "bregman", "lp", "batch"]


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
        raise NotImplementedError(f"b of shape {tuple(bt.shape)} holds several histograms, which "
                                  "spectral_ext.compat.pot does not support: solve them one by one or as a batch "
                                  "(solve_batch)")
    back = (lambda t: t.detach().cpu().numpy()) if as_numpy else (lambda t: t)
    return Mt, at, bt, back


def _zero_reg(Mt, reg, numItermax, log, warn, method, back):
    """POT at reg = 0, which it does not refuse: exp(M / -reg) is 0, inf or NaN (M / -0
    follows reg's own sign of zero, as numpy and torch divide), its first round fails,
    and POT warns and returns that kernel scaled by its start (Sinkhorn-Knopp, and the
    stabilised method at iteration 0), or runs its rounds to a NaN plan and warns that
    it did not converge (the log domain)."""
    n, m = Mt.shape
    nan_u, nan_v = Mt.new_full((n,), float("nan")), Mt.new_full((m,), float("nan"))
    if method == "sinkhorn_log":
        if warn:
            warnings.warn("Sinkhorn did not converge. You might want to increase the number of iterations "
                          "`numItermax` or the regularization parameter `reg`.")
        plan = Mt.new_full((n, m), float("nan"))
        checks = (numItermax - 1) // 10 + 1 if numItermax > 0 else 0
        out = {"err": [back(Mt.new_tensor(float("nan"))) for _ in range(checks)], "niter": numItermax - 1,
               "log_u": back(nan_u), "log_v": back(nan_v), "u": back(nan_u), "v": back(nan_v)}
        return back(plan), (out if log else None)
    if method == "sinkhorn":
        warnings.warn("Warning: numerical errors at iteration 0")
        plan = torch.exp(Mt / -reg) / (n * m)
    else:
        warnings.warn("Numerical errors at iteration 0")
        plan = torch.exp(-Mt / reg) / (n * m)
    out = {"err": [], "niter": 0, "u": back(Mt.new_full((n,), 1.0 / n)), "v": back(Mt.new_full((m,), 1.0 / m))}
    return back(plan), (out if log else None)


def _solve(a, b, M, reg, numItermax, stopThr, log, warn, log_domain, warmstart, method=None):
    if warmstart is not None:
        raise NotImplementedError("warmstart is not supported by spectral_ext.compat.pot")
    Mt, at, bt, back = _to_torch(M, a, b)
    if isinstance(reg, (int, float, np.number)) and not isinstance(reg, bool) and reg == 0:
        return _zero_reg(Mt, reg, numItermax, log, warn,
                         method or ("sinkhorn_log" if log_domain else "sinkhorn"), back)
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


def _sinkhorn_stabilized(a, b, M, reg, numItermax=1000, stopThr=1e-9, verbose=False, log=False, warn=True,
                         warmstart=None, **kwargs):
    """"sinkhorn_stabilized": the log domain (the same limit; POT's absorption schedule aside)."""
    plan, info = _solve(a, b, M, reg, numItermax, stopThr, log, warn, True, warmstart, method="sinkhorn_stabilized")
    return (plan, info) if log else plan


_METHODS = {"sinkhorn": sinkhorn_knopp, "sinkhorn_log": sinkhorn_log, "sinkhorn_stabilized": _sinkhorn_stabilized}
# POT's other methods of ot.sinkhorn: refused by name rather than called unknown
_POT_ONLY_METHODS = ("greenkhorn", "sinkhorn_epsilon_scaling", "screenkhorn")


def sinkhorn(a, b, M, reg, method="sinkhorn", numItermax=1000, stopThr=1e-9, verbose=False, log=False, warn=True,
             warmstart=None, **kwargs):
    """POT's ``ot.sinkhorn``: the entropic transport plan."""
    if method.lower() in _POT_ONLY_METHODS:
        raise NotImplementedError(f"method {method!r} of POT is not offered by spectral_ext.compat.pot: use "
                                  "'sinkhorn', 'sinkhorn_log' or 'sinkhorn_stabilized'")
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
    if isinstance(plan, torch.Tensor):
        cost = (torch.as_tensor(M, dtype=plan.dtype, device=plan.device) * plan).sum()
    else:
        cost = np.sum(np.asarray(M) * plan)
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


# ---------------------------------------------------------------- exact OT: ot.emd, ot.emd2

_RESULT_MESSAGES = {0: "Problem infeasible. Check that a and b are in the simplex", 2: "Problem unbounded",
                    3: "numItermax reached before optimality. Try to increase numItermax."}


def _check_result(code):
    """POT's check_result: None for an optimal solve, else the message it warns with."""
    if code == 1:
        return None
    warnings.warn(_RESULT_MESSAGES[int(code)])
    return _RESULT_MESSAGES[int(code)]


def _is_sparse(M):
    if isinstance(M, torch.Tensor):
        return M.layout != torch.strided
    return type(M).__module__.startswith("scipy.sparse")


def _numpy64(x):
    return (x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)).astype(np.float64)


def _tensor(x):
    """A C-contiguous, writable float64 tensor of x (broadcast views are copied)."""
    return torch.from_numpy(np.require(x, dtype=np.float64, requirements=["C", "W"]))


def _center(u, v, a, b):
    """POT's center_ot_dual over the last axis: u + c, v - c with <a, u + c> = <b, v - c>."""
    c = ((b * v).sum(-1) - (a * u).sum(-1)) / (a.sum(-1) + b.sum(-1))
    return u + c[..., None], v - c[..., None]


def _null_weights(u, v, a, b, M):
    """POT's estimate_dual_null_weights: potentials of zero-mass rows and columns lowered
    until no constraint u_i + v_j <= M_ij is violated, then centred."""
    violation = u[..., :, None] + v[..., None, :] - M
    u = u - (a == 0) * np.maximum(violation.max(-1), 0)
    v = v - (b == 0) * np.maximum(violation.max(-2), 0)
    return _center(u, v, a, b)


def _emd(a, b, M, numItermax, center_dual, numThreads, check_marginals, potentials_init, several_b=False):
    """The shared part of emd and emd2: POT's checks, warnings and conversions around one
    call of the batched network simplex (csrc/cpu/network_simplex.cpp)."""
    from .. import _ops  # noqa: F401  (loads the compiled operators)

    if _is_sparse(M):
        raise NotImplementedError("a sparse cost matrix M is not offered by spectral_ext.compat.pot: pass a dense "
                                  "one (M.toarray(), M.to_dense())")
    a = [] if a is None else a
    b = [] if b is None else b
    tensors = [x for x in (a, b, M) if isinstance(x, torch.Tensor)]
    M_in = M if isinstance(M, torch.Tensor) else np.asarray(M)
    if M_in.ndim not in (2, 3):
        raise ValueError(f"M must be a (n, m) cost matrix or a batch of them (B, n, m), got shape "
                         f"{tuple(M_in.shape)}")
    n, m = M_in.shape[-2:]
    batched = M_in.ndim == 3
    B = M_in.shape[0] if batched else 1
    empty_a, empty_b = len(a) == 0, len(b) == 0
    type_as = a if not empty_a else b if not empty_b else M_in
    if not isinstance(type_as, torch.Tensor):
        type_as = np.asarray(type_as)
    if tensors:
        device = tensors[0].device
        dtype = type_as.dtype if isinstance(type_as, torch.Tensor) else torch.from_numpy(
            np.empty(0, dtype=type_as.dtype)).dtype
        back = lambda x: torch.as_tensor(np.asarray(x), device=device).to(dtype)  # noqa: E731
    else:
        back = lambda x: np.asarray(x).astype(type_as.dtype)  # noqa: E731
    Mn = _numpy64(M_in)
    an = np.full(n, 1.0 / n) if empty_a else _numpy64(a)
    bn = np.full(m, 1.0 / m) if empty_b else _numpy64(b)
    assert an.shape[-1] == n and bn.shape[0 if several_b else -1] == m and an.ndim <= (2 if batched else 1) \
        and bn.ndim <= 2, "Dimension mismatch, check dimensions of M with a and b"
    if several_b:  # emd2's b (m, k): k problems on one M
        bn = np.ascontiguousarray(bn.T)
    if check_marginals:
        np.testing.assert_almost_equal(an.sum(-1), bn.sum(-1), err_msg="a and b vector must have the same sum",
                                       decimal=6)
    bn = bn * (an.sum(-1, keepdims=True) / bn.sum(-1, keepdims=True))
    if not np.isfinite(Mn).all():
        raise ValueError("M contains NaN or infinite values: spectral_ext.compat.pot's exact solver takes finite "
                         "costs (a large finite cost forbids a pair)")
    if (an < 0).any() or (bn < 0).any() or not (np.isfinite(an).all() and np.isfinite(bn).all()):
        raise ValueError("a and b must be finite and non-negative")
    if numThreads == "max" or numThreads != 1:
        warnings.warn("The 'numThreads' parameter is deprecated and will be removed in a future version. The "
                      "network simplex solver no longer uses OpenMP, so this parameter is ignored.",
                      DeprecationWarning, stacklevel=3)
    if several_b:
        B = bn.shape[0]
    Mb = np.broadcast_to(Mn, (B, n, m))
    ab, bb = np.broadcast_to(an, (B, n)), np.broadcast_to(bn, (B, m))
    warm = ()
    if potentials_init is not None:
        u0, v0 = potentials_init
        warm = (_tensor(np.broadcast_to(_numpy64(u0), (B, n))), _tensor(np.broadcast_to(_numpy64(v0), (B, m))))
    from .._ops import _interruptible

    G, u, v, cost, code, _ = _interruptible(torch.ops.spectral_ext.network_simplex, _tensor(Mb), _tensor(ab),
                                            _tensor(bb), int(numItermax), *warm)
    G, u, v, cost, code = G.numpy(), u.numpy(), v.numpy(), cost.numpy(), code.numpy()
    if center_dual:
        u, v = _center(u, v, ab, bb)
    zeros = (ab == 0).any(-1) | (bb == 0).any(-1)
    if zeros.any():
        uz, vz = _null_weights(u, v, ab, bb, Mb)
        u, v = np.where(zeros[:, None], uz, u), np.where(zeros[:, None], vz, v)
    messages = [_check_result(c) for c in code]
    floating = type_as.is_floating_point() if isinstance(type_as, torch.Tensor) else \
        np.issubdtype(type_as.dtype, np.floating)
    if not floating:
        warnings.warn("Input histogram consists of integer. The transport plan will be casted accordingly, possibly "
                      "resulting in a loss of precision. If this behaviour is unwanted, please make sure your input "
                      "histogram consists of floating point elements.", stacklevel=3)
    return dict(G=G, u=u, v=v, cost=cost, code=code, messages=messages, back=back, batched=batched,
                inputs=(a if not empty_a else None, b if not empty_b else None, M), tensors=bool(tensors))


def _log(r, k, cost=None):
    """POT's log dict of problem k, or of the whole batch when k is None (then cost and
    result_code are arrays and warning a list, one entry per problem)."""
    if k is None:
        return {"cost": r["cost"].copy() if cost is None else cost, "u": r["back"](r["u"]), "v": r["back"](r["v"]),
                "warning": r["messages"], "result_code": r["code"].astype(np.int64)}
    return {"cost": float(r["cost"][k]) if cost is None else cost, "u": r["back"](r["u"][k]),
            "v": r["back"](r["v"][k]), "warning": r["messages"][k], "result_code": int(r["code"][k])}


def emd(a, b, M, numItermax=100000, log=False, center_dual=True, numThreads=1, check_marginals=True,
        potentials_init=None):
    """POT's ``ot.emd``: the optimal transport plan of the exact problem
    min <M, G> s.t. G 1 = a, G^T 1 = b, G >= 0, by a network simplex in C++.

    Same arguments and returns as POT 0.9.7 (numpy in, numpy out; torch in, torch out,
    in the dtype of `a`; ``log=True`` adds POT's dict: cost, the dual potentials u and v,
    centred when `center_dual`, warning, result_code), the same checks (AssertionError on a
    dimension or mass mismatch), the same warnings (numItermax reached, integer
    histograms, the deprecated numThreads). ``potentials_init=(u, v)`` warm-starts the
    solver from dual potentials (e.g. those of an earlier, nearby problem).

    Beyond POT: M of shape (B, n, m) solves B problems in one call, in parallel over
    torch's threads (a (n,) or (B, n), b (m,) or (B, m)); the plan is then (B, n, m) and
    log's cost, result_code and warning hold one entry per problem.

    Differences: the cost is POT's optimum (to rounding) where POT's solver reaches it;
    where several plans are optimal the plan returned may be another one, and so may the
    potentials. On costs spanning many decades (M = 10**uniform(-8, 8), random marginals,
    n = 40..300) POT 0.9.7's network simplex stops early at a suboptimal basis (1.02-40x
    the optimum over 21 problems, its duals infeasible), while this one returns the
    optimum (scipy's HiGHS's to 1.2e-16 on 22 such problems, its duals feasible and tight:
    the solver recomputes its potentials from the tree before it declares a basis
    optimal). This is a correctness difference,
    not an estimator choice; POT's faster time there comes from stopping early. The start
    is a feasible basis (not POT's artificial one), so a run stopped by numItermax returns
    another, feasible, plan. NaN or infinite costs and negative masses raise ValueError
    (POT returns whatever its solver reaches); sparse M is not offered.
    """
    r = _emd(a, b, M, numItermax, center_dual, numThreads, check_marginals, potentials_init)
    G = r["back"](r["G"] if r["batched"] else r["G"][0])
    if not log:
        return G
    return G, _log(r, None if r["batched"] else 0)


def _cost_with_gradients(r, k, value, a_in, b_in, M_in, b_column=None):
    """emd2's value for torch inputs with POT's gradients: d/dM = G, d/da = u - mean(u),
    d/db = v - mean(v). Built as value + terms that are exactly 0 in the forward pass."""
    pick = (lambda x: x) if k is None else (lambda x: x[k])
    total = value
    if isinstance(M_in, torch.Tensor) and M_in.requires_grad:
        G = torch.as_tensor(pick(r["G"]), device=M_in.device, dtype=M_in.dtype)
        term = (G * M_in).sum((-2, -1))
        total = total + (term - term.detach())
    for x, pot in ((a_in, r["u"]), (b_in, r["v"])):
        if isinstance(x, torch.Tensor) and x.requires_grad:
            if x is b_in and b_column is not None:
                x = x[:, b_column]
            g = pick(pot)
            g = torch.as_tensor(g - g.mean(-1, keepdims=True), device=x.device, dtype=x.dtype)
            term = (x * g).sum(-1)
            total = total + (term - term.detach())
    return total


def emd2(a, b, M, processes=1, numItermax=100000, log=False, return_matrix=False, center_dual=True, numThreads=1,
         check_marginals=True, potentials_init=None):
    """POT's ``ot.emd2``: the optimal transport cost <M, G> of the exact problem (see
    ``emd``), with POT's gradients for torch inputs (d/dM = G, d/da = u - mean(u),
    d/db = v - mean(v)) and ``log``/``return_matrix`` giving [cost, dict]. b of shape
    (m, k) gives a list of k costs, as in POT (solved as one batch here).

    Beyond POT: M (B, n, m) gives the B costs as one array (numpy) or tensor (torch)."""
    several = np.ndim(b) == 2 and np.ndim(M) == 2 and len(b) != 0
    if several and processes > 1:
        warnings.warn("The 'processes' parameter has been deprecated. Multiprocessing should be done outside of POT.")
    r = _emd(a, b, M, numItermax, center_dual, numThreads, check_marginals, potentials_init, several_b=several)
    a_in, b_in, M_in = r["inputs"]

    def value(k):
        cost = r["cost"] if k is None else r["cost"][k]
        if not r["tensors"]:
            return float(cost) if k is not None else np.asarray(cost).astype(r["back"](np.zeros(0)).dtype)
        return _cost_with_gradients(r, k, r["back"](cost), a_in, b_in, M_in, b_column=k if several else None)

    def result(k):
        cost = value(k)
        if not (log or return_matrix):
            return cost
        out = _log(r, k, cost=cost)
        if return_matrix:
            out["G"] = r["back"](r["G"] if k is None else r["G"][k])
        return [cost, out]

    if several:
        return [result(k) for k in range(len(r["cost"]))]
    return result(None if r["batched"] else 0)


# ---------------------------------------------------------------- ot.bregman.barycenter
# POT's three iterations, written once over two small backends: numpy for numpy inputs
# (numpy's BLAS ran these thin products 5x faster than torch's on one thread here),
# torch for tensors (any device). "sinkhorn" and "sinkhorn_stabilized" run numpy arrays, and
# float64 CPU tensors that record no gradient, through _sinkhorn_np and _stabilized_np:
# preallocated iterates in the faster of two layouts, K @ v once an iteration.

class _NumpyOps:
    exp, log, abs, isnan, isinf = np.exp, np.log, np.abs, np.isnan, np.isinf

    @staticmethod
    def logsumexp(x, axis):
        top = np.max(x, axis=axis, keepdims=True)
        top = np.where(np.isfinite(top), top, 0)
        return np.log(np.sum(np.exp(x - top), axis=axis)) + np.squeeze(top, axis=axis)

    @staticmethod
    def std(x, axis):
        return np.std(x, axis=axis)

    @staticmethod
    def maxval(x, axis=None):
        return np.max(x, axis=axis)

    @staticmethod
    def any(x):
        return bool(np.any(x))


class _TorchOps:
    exp, log, abs, isnan, isinf = torch.exp, torch.log, torch.abs, torch.isnan, torch.isinf

    @staticmethod
    def logsumexp(x, axis):
        return torch.logsumexp(x, dim=axis)

    @staticmethod
    def std(x, axis):
        return torch.std(x, dim=axis, unbiased=False)

    @staticmethod
    def maxval(x, axis=None):
        return torch.max(x) if axis is None else torch.max(x, axis).values

    @staticmethod
    def any(x):
        return bool(x.any())


def _barycenter_inputs(A, M, weights):
    """A (dim, n_hists), M (dim, dim) and the weights as arrays of one backend (POT's
    uniform weights by default), and that backend's ops."""
    if isinstance(A, torch.Tensor) or isinstance(M, torch.Tensor):
        ref = A if isinstance(A, torch.Tensor) else M
        dtype = ref.dtype if ref.is_floating_point() else torch.float64
        A, M = (torch.as_tensor(x, dtype=dtype, device=ref.device) for x in (A, M))
        ops, new = _TorchOps, (lambda x: torch.as_tensor(x, dtype=dtype, device=ref.device))
    else:
        A, M = np.asarray(A, dtype=np.float64), np.asarray(M, dtype=np.float64)
        ops, new = _NumpyOps, (lambda x: np.asarray(x, dtype=np.float64))
    return A, M, _weights(weights, A.shape[1], new), ops, new


def _weights(weights, n_hists, new):
    """The barycenter's weights in the backend of `new`: POT's uniform ones by default (its assert on the length)."""
    if weights is None:
        return new(np.ones(n_hists) / n_hists)
    assert len(weights) == n_hists
    return new(weights)


def _geometric_bar(ops, weights, alldistribT):
    return ops.exp(ops.log(alldistribT) @ weights)


def _not_converged(warn, message="Sinkhorn did not converge. You might want to increase the number of iterations "
                                 "`numItermax` or the regularization parameter `reg`."):
    if warn:
        warnings.warn(message)


class _Layout:
    """The iterates of a numpy barycenter as (n_hists, dim) rows or (dim, n_hists) columns,
    with K and a contiguous copy of K.T, and the products of both layouts."""

    def __init__(self, K, n_hists, rows):
        self.K, self.KT, self.rows = K, np.ascontiguousarray(K.T), rows
        dim = K.shape[0]
        self.shape = (n_hists, dim) if rows else (dim, n_hists)
        self.hist_axis = 0 if rows else 1

    def state(self, X):  # a (dim, n_hists) array in this layout (X itself when it is already; never written)
        return np.ascontiguousarray(X.T if self.rows else X)

    def back(self, S):  # (dim, n_hists), C-contiguous
        return np.ascontiguousarray(S.T) if self.rows else S

    def K_dot(self, S, out):  # K @ s
        return np.matmul(S, self.KT, out=out) if self.rows else np.matmul(self.K, S, out=out)

    def KT_dot(self, S, out):  # K.T @ s
        return np.matmul(S, self.K, out=out) if self.rows else np.matmul(self.KT, S, out=out)

    def per_bin(self, x):  # a (dim,) vector broadcast against a state
        return x[None, :] if self.rows else x[:, None]

    def weighted(self, S, w, out=None):  # S @ w, over the histograms
        return np.matmul(w, S, out=out) if self.rows else np.matmul(S, w, out=out)


def _rows_layout(dim, n_hists):
    # 1 OpenBLAS thread: rows @ K ran 1.2-2x faster than K @ columns from 3 histograms or dim 800;
    # columns 5% faster below
    return n_hists > 2 or dim >= 800


def _sinkhorn_np(A, M, reg, w, numItermax, stopThr, log, warn, rows=None):
    """POT's barycenter_sinkhorn in numpy, on preallocated arrays in the faster layout."""
    dim, n_hists = A.shape
    K = np.divide(M, -reg)  # = -M / reg, bit for bit
    np.exp(K, out=K)
    L = _Layout(K, n_hists, _rows_layout(dim, n_hists) if rows is None else rows)
    At = L.state(A)
    UKv = L.K_dot(At / L.per_bin(K.sum(0)), np.empty(L.shape))
    logs = np.log(UKv)
    u = L.per_bin(np.exp(np.mean(logs, axis=L.hist_axis))) / UKv
    Ku, bar = np.empty(L.shape), np.empty(dim)
    errors = []
    ii = -1
    for ii in range(numItermax):
        L.K_dot(u, Ku)
        np.divide(At, Ku, out=Ku)
        L.KT_dot(Ku, UKv)
        np.multiply(u, UKv, out=UKv)
        np.log(UKv, out=logs)
        np.exp(L.weighted(logs, w, out=bar), out=bar)
        np.multiply(u, L.per_bin(bar), out=u)
        np.divide(u, UKv, out=u)
        if ii % 10 == 1:
            err = np.std(UKv, axis=L.hist_axis).sum()
            errors.append(err)
            if err < stopThr:
                break
    else:
        _not_converged(warn)
    bar = np.exp(L.weighted(np.log(UKv), w))
    return (bar, {"err": errors, "niter": ii}) if log else bar


def _nonfinite(x):
    """Whether x holds a NaN or an infinity (one reduction; the full check where it overflows)."""
    s = np.add.reduce(x, axis=None)
    return not np.isfinite(s) and bool(np.any(np.isnan(x)) or np.any(np.isinf(x)))


def _any_above(x, tau):
    """np.any(x > tau) by one max (the full check where the max is not <= tau: NaN)."""
    return not np.max(x) <= tau and bool(np.any(x > tau))


def _any_zero(x):
    """np.any(x == 0) by one min (the full check where the min is not > 0)."""
    return not np.min(x) > 0 and bool(np.any(x == 0.0))


_STABILIZED_NOT_CONVERGED = ("Stabilized Sinkhorn did not converge.Try a larger entropy `reg`Or a larger absorption "
                             "threshold `tau`.")  # POT's words, run together as there


def _stabilized_end(ii, broken, absorbing, error, errors, stopThr, q, qprev):
    """The end of one iteration of POT's barycenter_stabilized (both backends): (qprev, "numerical errors")
    (warned) when `broken`, (q, "converged") when the error (computed on the first iteration and every 10th
    one that did not absorb, appended to `errors`) is below stopThr, else (q, None)."""
    if broken:
        warnings.warn("Numerical errors at iteration %s" % ii)
        return qprev, "numerical errors"
    if (ii % 10 == 0 and not absorbing) or ii == 0:
        err = error()
        errors.append(err)
        if err < stopThr:
            return q, "converged"
    return q, None


def _stabilized_np(A, M, reg, w, numItermax, stopThr, log, warn, tau=1e10, rows=None):
    """POT's barycenter_stabilized in numpy, on preallocated arrays in the faster layout; K @ v once an
    iteration (POT computes it twice on the same K and v: at the end of one iteration and the start of the next)."""
    dim, n_hists = A.shape
    K = np.divide(M, -reg)
    np.exp(K, out=K)
    L = _Layout(K, n_hists, _rows_layout(dim, n_hists) if rows is None else rows)
    At = L.state(A)
    u = np.full(L.shape, 1.0 / dim)
    v = np.full(L.shape, 1.0 / dim)
    alpha, beta = np.zeros(dim), np.zeros(dim)
    q = np.full(dim, 1.0 / dim)
    Kv = L.K_dot(v, np.empty(L.shape))
    Ktu, logs = np.empty(L.shape), np.empty(L.shape)
    errors = []
    ii = -1
    for ii in range(numItermax):
        qprev = q
        np.divide(At, Kv, out=u)
        L.KT_dot(u, Ktu)
        np.log(Ktu, out=logs)
        q = np.exp(L.weighted(logs, w))
        np.divide(L.per_bin(q), Ktu, out=v)
        absorbing = False
        if _any_above(u, tau) or _any_above(v, tau):
            absorbing = True
            alpha = alpha + reg * np.log(np.max(u, L.hist_axis))
            beta = beta + reg * np.log(np.max(v, L.hist_axis))
            K = np.exp((alpha[:, None] + beta[None, :] - M) / reg)
            L = _Layout(K, n_hists, L.rows)
            v.fill(1.0)
        L.K_dot(v, Kv)
        broken = _any_zero(Ktu) or _nonfinite(u) or _nonfinite(v)
        q, end = _stabilized_end(ii, broken, absorbing, lambda: np.max(np.abs(u * Kv - At)), errors, stopThr, q, qprev)
        if end:
            break
    else:
        _not_converged(warn, _STABILIZED_NOT_CONVERGED)
    return (q, {"err": errors, "niter": ii, "logu": L.back(np.log(u + 1e-16)), "logv": L.back(np.log(v + 1e-16))}) \
        if log else q


def _numpy_route(X, A, M, w, *scalars):
    """Whether the numpy iteration runs these inputs: numpy ones, and float64 tensors on the CPU with no
    gradient to record and plain numbers for reg (and tau) (numpy's BLAS ran these products 2-5x faster than
    torch's on one thread here)."""
    return X is _NumpyOps or (A.device.type == "cpu" and A.dtype == torch.float64
                              and not (A.requires_grad or M.requires_grad or w.requires_grad)
                              and not any(isinstance(x, torch.Tensor) for x in scalars))


def _run_numpy(fn, X, A, M, w, log, **kwargs):
    """fn on numpy views of A, M, w; its results back as tensors where the inputs were tensors (POT's torch
    log: 0-d tensors in "err", tensors "logu", "logv")."""
    if X is _NumpyOps:
        return fn(A, M, w=w, log=log, **kwargs)
    out = fn(A.numpy(), M.numpy(), w=w.numpy(), log=log, **kwargs)
    if not log:
        return torch.from_numpy(out)
    bar, info = out
    info = dict(info, err=[torch.tensor(e) for e in info["err"]])
    for key in ("logu", "logv"):
        if key in info:
            info[key] = torch.from_numpy(info[key])
    return torch.from_numpy(bar), info


def _barycenter_sinkhorn(A, M, reg, weights, numItermax, stopThr, log, warn):
    A, M, w, X, new = _barycenter_inputs(A, M, weights)
    if _numpy_route(X, A, M, w, reg):
        return _run_numpy(_sinkhorn_np, X, A, M, w, log, reg=reg, numItermax=numItermax, stopThr=stopThr,
                          warn=warn)
    errors = []
    K = X.exp(-M / reg)
    UKv = K @ (A.T / K.sum(0)).T
    u = (X.exp(X.log(UKv).mean(1)) / UKv.T).T
    ii = -1
    for ii in range(numItermax):
        UKv = u * (K.T @ (A / (K @ u)))
        u = (u.T * _geometric_bar(X, w, UKv)).T / UKv
        if ii % 10 == 1:
            err = X.std(UKv, 1).sum()
            errors.append(err)
            if err < stopThr:
                break
    else:
        _not_converged(warn)
    bar = _geometric_bar(X, w, UKv)
    return (bar, {"err": errors, "niter": ii}) if log else bar


def _barycenter_sinkhorn_log(A, M, reg, weights, numItermax, stopThr, log, warn):
    """POT's _barycenter_sinkhorn_log."""
    A, M, w, X, new = _barycenter_inputs(A, M, weights)
    dim, n_hists = A.shape
    errors = []
    M = -M / reg
    logA = X.log(A + 1e-16)
    G = new(np.zeros((dim, n_hists)))
    log_KU = new(np.zeros((dim, n_hists)))
    log_bar = new(np.zeros(dim))
    ii = -1
    for ii in range(numItermax):
        log_bar = new(np.zeros(dim))
        for k in range(n_hists):  # one (dim, dim) log-sum-exp at a time: contiguous, as POT
            f = logA[:, k] - X.logsumexp(M + G[None, :, k], 1)
            log_KU[:, k] = X.logsumexp(M + f[:, None], 0)
            log_bar = log_bar + w[k] * log_KU[:, k]
        if ii % 10 == 1:
            err = X.std(X.exp(G + log_KU), 1).sum()
            errors.append(err)
            if err < stopThr:
                break
        G = log_bar[:, None] - log_KU
    else:
        _not_converged(warn)
    bar = X.exp(log_bar)
    return (bar, {"err": errors, "niter": ii}) if log else bar


def _barycenter_stabilized(A, M, reg, weights, numItermax, stopThr, log, warn, tau=1e10):
    A, M, w, X, new = _barycenter_inputs(A, M, weights)
    if _numpy_route(X, A, M, w, reg, tau):
        return _run_numpy(_stabilized_np, X, A, M, w, log, reg=reg, numItermax=numItermax, stopThr=stopThr,
                          warn=warn, tau=tau)
    dim, n_hists = A.shape
    errors = []
    u = new(np.ones((dim, n_hists)) / dim)
    v = new(np.ones((dim, n_hists)) / dim)
    K = X.exp(-M / reg)
    alpha, beta = new(np.zeros(dim)), new(np.zeros(dim))
    q = new(np.ones(dim) / dim)
    Kv = K @ v  # once an iteration: POT's second product (end of one iteration) is its first of the next
    ii = -1
    for ii in range(numItermax):
        qprev = q
        u = A / Kv
        Ktu = K.T @ u
        q = _geometric_bar(X, w, Ktu)
        v = q[:, None] / Ktu
        absorbing = False
        if X.any(u > tau) or X.any(v > tau):
            absorbing = True
            alpha = alpha + reg * X.log(X.maxval(u, 1))
            beta = beta + reg * X.log(X.maxval(v, 1))
            K = X.exp((alpha[:, None] + beta[None, :] - M) / reg)
            v = new(np.ones(tuple(v.shape)))
        Kv = K @ v
        broken = X.any(Ktu == 0.0) or X.any(X.isnan(u)) or X.any(X.isnan(v)) or X.any(X.isinf(u)) or X.any(X.isinf(v))
        q, end = _stabilized_end(ii, broken, absorbing, lambda: X.maxval(X.abs(u * Kv - A)), errors, stopThr, q, qprev)
        if end:
            break
    else:
        _not_converged(warn, _STABILIZED_NOT_CONVERGED)
    return (q, {"err": errors, "niter": ii, "logu": X.log(u + 1e-16), "logv": X.log(v + 1e-16)}) if log else q


_BARYCENTER_METHODS = {"sinkhorn": _barycenter_sinkhorn, "sinkhorn_log": _barycenter_sinkhorn_log,
                       "sinkhorn_stabilized": _barycenter_stabilized}


def barycenter(A, M, reg, weights=None, method="sinkhorn", numItermax=10000, stopThr=1e-4, verbose=False, log=False,
               warn=True, **kwargs):
    """POT's ``ot.bregman.barycenter`` (also ``ot.barycenter``): the entropic Wasserstein
    barycenter of the columns of A (dim, n_hists) for the cost M (dim, dim), by POT's
    iterations ("sinkhorn", "sinkhorn_log", "sinkhorn_stabilized"): the same numbers (to
    rounding), stopping rule, warnings and log ("err", "niter"; "logu", "logv" for the
    stabilised one). numpy in, numpy out (computed in numpy); torch in, torch out (in
    torch, on the inputs' device, with POT's gradients; float64 CPU tensors that record no
    gradient are computed in numpy, whose BLAS was faster here). ``verbose`` prints nothing."""
    name = method.lower()
    if name not in _BARYCENTER_METHODS:
        raise ValueError("Unknown method '%s'." % method)
    extra = {"tau": kwargs["tau"]} if name == "sinkhorn_stabilized" and "tau" in kwargs else {}
    return _BARYCENTER_METHODS[name](A, M, reg, weights, numItermax, stopThr, log, warn, **extra)


# ---------------------------------------------------------------- ot.bregman.convolutional_barycenter2d

_CONVOLUTIONAL_NOT_CONVERGED = ("Convolutional Sinkhorn did not converge. Try a larger number of iterations "
                                "`numItermax` or a larger entropy `reg`.")


def _convolutional_inputs(A, weights):
    """A (n_hists, width, height) as an array of its backend (its float dtype kept, as POT's backends keep
    it), the weights (POT's uniform ones by default), that backend's ops and a constructor."""
    if isinstance(A, torch.Tensor):
        A = A if A.is_floating_point() else A.double()
        ops, new = _TorchOps, (lambda x: torch.as_tensor(x, dtype=A.dtype, device=A.device))
    else:
        A = np.asarray(A)
        A = A if A.dtype.kind == "f" else A.astype(np.float64)
        ops, new = _NumpyOps, (lambda x: np.asarray(x, dtype=A.dtype))
    return A, _weights(weights, A.shape[0], new), ops, new


def _blur_exponent(n, reg, new):
    """-(t_i - t_j)^2 / reg on n points of [0, 1] (POT's _get_convol_img_fn, in A's dtype)."""
    t = new(np.linspace(0, 1, n))
    return -((t[:, None] - t[None, :]) ** 2) / reg


def _convolutional_sinkhorn(A, reg, weights, numItermax, stopThr, stabThr, log, warn):
    """POT's _convolutional_barycenter2d. Its blur K1 X K2^T is written as two batched matrix products
    (POT's einsum runs numpy's unoptimised loops)."""
    A, w, X, new = _convolutional_inputs(A, weights)
    n_hists, width, height = A.shape
    K1, K2 = X.exp(_blur_exponent(width, reg, new)), X.exp(_blur_exponent(height, reg, new))
    K2t = K2.T

    def blur(imgs):
        return (K1 @ imgs) @ K2t

    bar = new(np.ones((width, height)))
    bar = bar / bar.sum()
    U = new(np.ones(A.shape))
    V = U
    KU = blur(U)
    errors = []
    ii = -1
    for ii in range(numItermax):
        V = bar[None] / KU
        U = A / blur(V)
        KU = blur(U)
        bar = X.exp((w[:, None, None] * X.log(KU + stabThr)).sum(0))
        if ii % 10 == 9:
            err = X.std(V * KU, 0).sum()
            errors.append(err)
            if err < stopThr:
                break
    else:
        _not_converged(warn, _CONVOLUTIONAL_NOT_CONVERGED)
    return (bar, {"err": errors, "niter": ii, "U": U, "V": V}) if log else bar


def _convolutional_sinkhorn_log(A, reg, weights, numItermax, stopThr, stabThr, log, warn):
    """POT's _convolutional_barycenter2d_log: the blur as two log-sum-exps, every histogram at once."""
    A, w, X, new = _convolutional_inputs(A, weights)
    n_hists, width, height = A.shape
    M1, M2 = _blur_exponent(width, reg, new), _blur_exponent(height, reg, new)

    def blur(L):  # (k, width, height) log images
        L = X.logsumexp(M1[None, :, :, None] + L[:, None], 2)
        return X.logsumexp(M2[None, None] + L[:, :, None, :], 3)

    logA = X.log(A + stabThr)
    G = new(np.zeros(A.shape))
    log_bar = new(np.zeros((width, height)))
    errors = []
    ii = -1
    for ii in range(numItermax):
        log_KU = blur(logA - blur(G))
        log_bar = (w[:, None, None] * log_KU).sum(0)
        if ii % 10 == 9:
            err = X.std(X.exp(G + log_KU), 0).sum()
            errors.append(err)
            if err < stopThr:
                break
        G = log_bar[None] - log_KU
    else:
        _not_converged(warn, _CONVOLUTIONAL_NOT_CONVERGED)
    return (X.exp(log_bar), {"err": errors, "niter": ii}) if log else X.exp(log_bar)


def convolutional_barycenter2d(A, reg, weights=None, method="sinkhorn", numItermax=10000, stopThr=1e-4,
                               verbose=False, log=False, warn=True, **kwargs):
    """POT's ``ot.bregman.convolutional_barycenter2d``: the entropic Wasserstein barycenter of
    the images A (n_hists, width, height) on a grid of [0, 1]^2 with squared Euclidean cost,
    the Gibbs kernel applied as one Gaussian blur per axis (Solomon et al. 2015), by POT's
    iterations ("sinkhorn"; "sinkhorn_log" in the log domain): the same numbers (to
    rounding), stopping rule, warning and log ("err", "niter"; "U", "V" for "sinkhorn").
    numpy in, numpy out; torch in, torch out (its dtype and device, with gradients). The
    blur is two batched matrix products where POT runs einsum; ``verbose`` prints nothing."""
    name = method.lower()
    stabThr = kwargs.get("stabThr", 1e-30)
    if name == "sinkhorn":
        return _convolutional_sinkhorn(A, reg, weights, numItermax, stopThr, stabThr, log, warn)
    if name == "sinkhorn_log":
        return _convolutional_sinkhorn_log(A, reg, weights, numItermax, stopThr, stabThr, log, warn)
    raise ValueError("Unknown method '%s'." % method)


class _Namespace:
    """POT's submodules by name (``ot.bregman.sinkhorn_log``, ``ot.batch.solve_batch``)."""

    def __init__(self, **functions):
        self.__dict__.update(functions)


bregman = _Namespace(sinkhorn=sinkhorn, sinkhorn2=sinkhorn2, sinkhorn_knopp=sinkhorn_knopp, sinkhorn_log=sinkhorn_log,
                     barycenter=barycenter, convolutional_barycenter2d=convolutional_barycenter2d)
lp = _Namespace(emd=emd, emd2=emd2)
batch = _Namespace(solve_batch=solve_batch)
