"""Plain-PyTorch twins of the compiled operators: the specification each native
kernel must reproduce (tests compare the two in float64), and the backend that
`spectral_ext.use_backend("reference")` selects. Written the way a researcher
would write them, intermediates and all."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def conv_adjacency(U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """U (B, c, M), V (B, c, K2, N) -> a (B, N, M) with
    a[n, m] = sum_z (sum_k U[k, m] V[k, z, n])^2."""
    return torch.einsum("bkm,bkzn->bznm", U, V).square().sum(1)


def signal_projection(x: torch.Tensor, V: torch.Tensor, s: torch.Tensor, stride=(1, 1),
                      padding=(0, 0), dilation=(1, 1), reduce: str | None = None,
                      kernel_size=None) -> torch.Tensor:
    """x (B, C, H, W), V (C*kh*kw, r), s (r,) -> s_i <v_i, receptive field> at
    every output position (B, r, H', W'), or its mean over positions (B, r)."""
    B, C = x.shape[:2]
    if kernel_size is None:
        k = round((V.shape[0] // C) ** 0.5)
        kernel_size = (k, k)
    cols = F.unfold(x, kernel_size, dilation=dilation, padding=padding, stride=stride)  # (B, CK, L)
    out = (V * s).T @ cols  # (B, r, L)
    if reduce == "mean":
        return out.mean(-1)
    Ho = (x.shape[2] + 2 * padding[0] - dilation[0] * (kernel_size[0] - 1) - 1) // stride[0] + 1
    Wo = (x.shape[3] + 2 * padding[1] - dilation[1] * (kernel_size[1] - 1) - 1) // stride[1] + 1
    return out.reshape(B, V.shape[1], Ho, Wo)


def sinkhorn(P: torch.Tensor, iters: int = 16) -> torch.Tensor:
    """`iters` rounds of: divide each column by its sum, then each row by its sum
    (seed 004 appendix D.2.1 order: columns first). Dividing the columns by their
    maxima first changes nothing after the first round and keeps sums of entries
    near the dtype's maximum finite."""
    if iters > 0:
        P = P / P.amax(-2, keepdim=True)
    for _ in range(iters):
        P = P / P.sum(-2, keepdim=True)
        P = P / P.sum(-1, keepdim=True)
    return P


def max_kernel_gram(X: torch.Tensor, Y: torch.Tensor | None = None) -> torch.Tensor:
    """X (N, C, S), Y (N', C, S) -> K (N, N') with K[i, j] = max_c sum_s X[i, c, s] Y[j, c, s]: each product
    rounded, then summed (an overflowing product is +-inf, inf - inf is NaN), the max propagating NaN as amax
    does. Not einsum: a BLAS's fused multiply-adds skip the products' rounding, so its overflow depends on the
    build. In blocks of rows of X, to bound the (rows, N', C, S) products."""
    Y = X if Y is None else Y
    step = max(1, (1 << 22) // max(1, Y.shape[0] * X.shape[1] * X.shape[2]))
    parts = [(X[i:i + step, None] * Y[None]).sum(-1).amax(-1) for i in range(0, X.shape[0], step)]
    return torch.cat(parts) if parts else X.new_empty(0, Y.shape[0])


def network_simplex(M: torch.Tensor, a: torch.Tensor, b: torch.Tensor, max_iter: int = 100000, u0=None, v0=None):
    """M (B, n, m), a (B, n), b (B, m) -> plan (B, n, m), u (B, n), v (B, m), cost
    (B,), result (B,) (1: optimal), pivots (B,) (0 here): the exact optimal
    transport plan of each problem, min <plan, M> over plan >= 0 with row sums a
    and column sums b, and its dual potentials (u_i + v_j <= M_ij, equal where
    the plan is positive). The specification is the linear program itself,
    solved by scipy's HiGHS; where several plans are optimal the plan may
    differ from the kernel's, the cost may not. max_iter and the warm start
    (u0, v0) only steer the kernel's simplex."""
    import numpy as np
    from scipy.optimize import linprog
    from scipy.sparse import kron, eye, csr_matrix

    B, n, m = M.shape
    rows = kron(eye(n), csr_matrix(np.ones((1, m))))  # sum over j of plan[i, j]
    columns = kron(csr_matrix(np.ones((1, n))), eye(m))  # sum over i of plan[i, j]
    equality = csr_matrix(np.vstack([rows.toarray(), columns.toarray()]))
    plans, us, vs, costs = [], [], [], []
    for k in range(B):
        c = M[k].detach().cpu().double().numpy().reshape(-1)
        target = np.concatenate([a[k].detach().cpu().double().numpy(), b[k].detach().cpu().double().numpy()])
        solved = linprog(c, A_eq=equality, b_eq=target, bounds=(0, None), method="highs")
        if solved.status != 0:
            raise ValueError(f"problem {k}: {solved.message}")
        duals = solved.eqlin.marginals
        plans.append(solved.x.reshape(n, m))
        us.append(duals[:n])
        vs.append(duals[n:])
        costs.append(solved.fun)
    as_tensor = lambda x: torch.as_tensor(np.array(x), dtype=torch.float64)
    done = torch.ones(B, dtype=torch.int64)
    return as_tensor(plans), as_tensor(us), as_tensor(vs), as_tensor(costs), done, torch.zeros(B, dtype=torch.int64)


def linear_sum_assignment(cost: torch.Tensor, maximize: bool = False):
    """cost (B, n, m) -> rows, cols (B, min(n, m)) int64: scipy's optimum for each
    problem (seed 004, appendix D.2.1: the Hungarian rounding via scipy). The
    specification is scipy itself, its +inf (forbidden) entries and its errors
    included (a plain-PyTorch Hungarian solver would only be a slower copy of it)."""
    from scipy.optimize import linear_sum_assignment as scipy_lsa

    import numpy as np

    k = min(cost.shape[1], cost.shape[2])
    pairs = np.zeros((2, cost.shape[0], k), dtype=np.int64)
    for b, c in enumerate(cost.detach().cpu().double().numpy()):
        pairs[:, b] = scipy_lsa(c, maximize=maximize)
    rows, cols = torch.from_numpy(pairs).to(cost.device)
    return rows, cols


def sinkhorn_scaling(K: torch.Tensor, a: torch.Tensor, b: torch.Tensor, iters: int, stop_threshold: float = 0.0,
                     check_every: int = 10, log_domain: bool = False):
    """Sinkhorn-Knopp with marginals, in the log domain whatever the input (POT's
    sinkhorn_log; the plain iteration is the same map): K (B, n, m) is the kernel,
    or log K when log_domain. Each round v = log b - logsumexp_i(log K + u), then
    u = log a - logsumexp_j(log K + v), from u = 0. After rounds 0, check_every, ...
    the error ||plan^T 1 - b||_2 is recorded and a problem stops once it is below
    stop_threshold (> 0). Returns plan, log u, log v, rounds done, errors."""
    L = K if log_domain else K.log()
    B, n, m = K.shape
    u, v = K.new_zeros(B, n), K.new_zeros(B, m)
    la, lb = a.log(), b.log()
    checks = 0 if iters == 0 else (iters - 1) // check_every + 1
    err = K.new_full((B, checks), float("nan"))
    rounds = torch.zeros(B, dtype=torch.int64, device=K.device)
    active = torch.ones(B, dtype=torch.bool, device=K.device)
    if iters == 0:
        return L.exp(), u, v, rounds, err
    for it in range(iters):
        v_new = lb - torch.logsumexp(L + u[:, :, None], 1)
        u_new = la - torch.logsumexp(L + v_new[:, None, :], 2)
        v = torch.where(active[:, None], v_new, v)
        u = torch.where(active[:, None], u_new, u)
        rounds = rounds + active
        if it % check_every == 0:
            e = torch.linalg.vector_norm((L + u[:, :, None] + v[:, None, :]).exp().sum(1) - b, dim=1)
            err[:, it // check_every] = torch.where(active, e, err[:, it // check_every])
            if stop_threshold > 0:
                active = active & ~(e < stop_threshold)
                if not bool(active.any()):
                    break
    return (L + u[:, :, None] + v[:, None, :]).exp(), u, v, rounds, err
