"""Independence deficit of the final features (seed 003 section 5,
equations 11-12, Algorithm A4, appendix F): an exact Lasso per class."""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import pandas as pd
import torch

from .. import _checks
from ._common import _features_labels

@dataclass
class IndependenceDeficit:
    """Result of independence_deficit (seed 003 section 5). coefficients[:, i] are the Lasso
    coefficients A* of class i on the other classes (coefficients[i, i] = 0);
    frame has one row per class; converged and kkt_violation report the
    solver's optimality check."""
    coefficients: torch.Tensor
    frame: pd.DataFrame
    eta: float
    iterations: int
    converged: bool
    kkt_violation: float

    def to_frame(self) -> pd.DataFrame:
        """One row per class (the frame): support, coefficients, n_support,
        r2 and the accuracies of equation 12, as in seed 003 appendix F."""
        return self.frame.copy()

    def support(self, i: int) -> list[int]:
        """The classes that decide class i, by decreasing |coefficient|."""
        return list(self.frame.loc[self.frame["class"] == i, "support"].iloc[0])


def lasso_kkt_violation(G: torch.Tensor, A: torch.Tensor, eta: float) -> torch.Tensor:
    """Largest violation, per class, of the optimality conditions of the Lasso of seed 003 equation 11.

    The Lasso is min_a a^T G a - 2 b^T a + eta |a|_1 with b = G[:, i] and a_i = 0; with gradient g = 2 (G a - b) the
    conditions are |g_j + eta sign(a_j)| = 0 where a_j != 0 and |g_j| <= eta where a_j = 0.

    Args:
        G: the (C, C) second-moment matrix of the logits.
        A: the (C, C) coefficients, column i those of class i (A[i, i] ignored).
        eta: the L1 penalty.

    Returns:
        A tensor of shape (C,): the largest violation for each class (0 at the optimum).
    """
    C = G.shape[0]
    grad = 2 * (G @ A - G)
    off = ~torch.eye(C, dtype=torch.bool, device=G.device)
    active = (A != 0) & off
    violation = torch.where(active, (grad + eta * torch.sign(A)).abs(), (grad.abs() - eta).clamp_min(0))
    return torch.where(off, violation, torch.zeros_like(violation)).amax(0)


def _lasso_all_classes(G: torch.Tensor, eta: float, max_iter: int, tol: float):
    """FISTA with gradient restart (O'Donoghue and Candes 2015) for every class
    at once: one (C, C) matmul per step serves all C problems, on any device.
    Written here rather than calling scikit-learn because its Lasso would be
    C separate CPU fits; the KKT test below is the stopping rule."""
    C = G.shape[0]
    off = ~torch.eye(C, dtype=torch.bool, device=G.device)
    L = 2 * float(torch.linalg.eigvalsh(G)[-1]) or 1.0
    step = 1.0 / L
    A = torch.zeros_like(G)
    Y, t = A.clone(), 1.0
    threshold = tol * L
    violation = lasso_kkt_violation(G, A, eta)
    iteration = 0
    for iteration in range(1, max_iter + 1):
        grad = 2 * (G @ Y - G)
        Z = Y - step * grad
        new = torch.sign(Z) * (Z.abs() - step * eta).clamp_min(0) * off
        t_new = (1 + math.sqrt(1 + 4 * t * t)) / 2
        if float(((Y - new) * (new - A)).sum()) > 0:  # restart when momentum points uphill
            Y, t_new = new.clone(), 1.0
        else:
            Y = new + ((t - 1) / t_new) * (new - A)
        A, t = new, t_new
        if iteration % 10 == 0 or iteration == max_iter:
            violation = lasso_kkt_violation(G, A, eta)
            if float(violation.max()) <= threshold:
                break
    violation = lasso_kkt_violation(G, A, eta)
    return A, iteration, bool(violation.max() <= threshold), float(violation.max())


def independence_deficit(data, eta: float = 20.0, max_iter: int = 20000, tol: float = 1e-8,
                         class_names=None) -> IndependenceDeficit:
    """Independence deficit (seed 003 section 5, equations 11-12, Algorithm A4), for every class at once.

    For each class i, the Lasso A* = argmin_A E[(logit_i - sum_j A_j logit_j)^2] + eta |A|_1 with A_i = 0 (equation
    11, the expectation being the mean over the N samples; section 5 uses eta = 20 on ImageNet logits, so scale eta
    with your logits' variance). Solved exactly (proximal gradient with a KKT convergence test, tol relative to the
    gradient's Lipschitz constant), so coefficients are exact zeros off the support. A RuntimeWarning is given when the
    solver stops before converging.

    Args:
        data: the logits (N, C) with their labels (N,), as a pair of tensors or any form _data.batches takes.
        eta: the L1 penalty (default 20.0).
        max_iter: the solver's iteration limit (default 20000).
        tol: the solver's KKT tolerance, relative to the gradient's Lipschitz constant (default 1e-8).
        class_names: one name per class for the frame (default None: the class indices).

    Returns:
        An IndependenceDeficit (.to_frame()) whose frame has, per class: support and coefficients (decreasing |A|),
        n_support, r2 (of the reconstruction), accuracy and positive_accuracy of the model when logit_i is replaced by
        its reconstruction (equation 12), and the original accuracy and positive_accuracy (on samples of class i) as in
        Fig. 4 and appendix F.
    """
    logits, labels = _features_labels(data, "data logits")
    eta = _checks.number("eta", eta, low=0)
    max_iter = _checks.positive_int("max_iter", max_iter)
    tol = _checks.number("tol", tol, low=0, low_open=True)
    N, C = logits.shape
    if C < 2:
        raise ValueError(f"data logits needs at least two classes, got {C}")
    if int(labels.min()) < 0 or int(labels.max()) >= C:
        raise ValueError(f"labels must lie in [0, {C}), got values in [{int(labels.min())}, {int(labels.max())}]")
    if class_names is not None and len(class_names) != C:
        raise ValueError(f"class_names has {len(class_names)} names for {C} classes")
    Z = logits.double()
    G = Z.T @ Z / N
    if not _checks.all_finite(G):
        raise ValueError("data logits are finite but their second moments overflow float64 (values near 1e154 "
                         "or beyond): rescale them")
    A, iterations, converged, violation = _lasso_all_classes(G, float(eta), max_iter, tol)
    if not converged:
        warnings.warn(f"the Lasso stopped after {iterations} iterations with KKT violation {violation:.3g}; "
                      "raise max_iter or eta", RuntimeWarning, stacklevel=2)
    reconstruction = Z @ A  # (N, C): column i reconstructs logit i
    accuracy, positive = _replaced_accuracies(Z, reconstruction, labels)
    predicted = Z.argmax(-1)
    residual = (Z - reconstruction).square().mean(0)
    variance = Z.var(0, unbiased=False)
    rows = []
    for i in range(C):
        column = A[:, i]
        support = [int(j) for j in torch.argsort(column.abs(), descending=True) if column[j] != 0]
        mask = labels == i
        rows.append({
            "class": i,
            "name": class_names[i] if class_names is not None else str(i),
            "support": tuple(support),
            "coefficients": tuple(float(column[j]) for j in support),
            "n_support": len(support),
            "r2": float(1 - residual[i] / variance[i]) if variance[i] > 0 else float("nan"),
            "accuracy": float(accuracy[i]),
            "original_accuracy": float((predicted == labels).double().mean()),
            "positive_accuracy": float(positive[i]),
            "original_positive_accuracy": float((predicted[mask] == i).double().mean()) if mask.any() else float("nan"),
        })
    return IndependenceDeficit(A.to(logits.dtype), pd.DataFrame(rows), float(eta), iterations, converged, violation)


def _replaced_accuracies(Z, R, labels):
    """For every class i at once: the accuracy when column i of the logits Z is
    replaced by R[:, i], overall and on the samples labelled i. The best other
    class comes from the top two of each row, so this is O(N C)."""
    N, C = Z.shape
    top2 = Z.topk(2, dim=-1)
    first, second = top2.indices[:, 0], top2.indices[:, 1]
    classes = torch.arange(C, device=Z.device)
    other_index = torch.where(first[:, None] == classes[None, :], second[:, None], first[:, None])  # (N, C)
    other_value = Z.gather(1, other_index)
    prediction = torch.where(R > other_value, classes[None, :].expand(N, C), other_index)
    correct = (prediction == labels[:, None]).double()
    accuracy = correct.mean(0)
    counts = torch.bincount(labels, minlength=C).double()
    own = correct[torch.arange(N), labels]
    positive = torch.zeros(C, dtype=torch.float64, device=Z.device).index_add_(0, labels, own) / counts
    return accuracy, positive  # positive is NaN for classes with no sample
