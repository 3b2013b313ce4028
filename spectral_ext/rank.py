"""Rank diminishing (seed 003): numerical rank (section 3.1), the partial rank
of the Jacobian (section 3.2, Algorithm A1), the perturbed PCA dimension
(appendix E, Algorithm A2), the classification dimension (section 3.3,
Algorithm A3), the independence deficit (section 5, Algorithm A4), the
structural-impetus probes (section 4.3, Fig. 3) and the MLP-50 experiment of
Theorem 5."""
from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import nn

from . import _checks
from ._hooks import capturing, check_layers, evaluating, first_tensor
from ._linalg import gram_singular_values

FLOAT32_EPS = float(torch.finfo(torch.float32).eps)
OUTPUT = "output"


def _check_eps(eps):
    if eps is not None:
        _checks.number("eps", eps, low=0)


def _rank_of_singular_values(sigma: torch.Tensor, eps: float | None, count: int | None = None) -> torch.Tensor:
    """Equation 4 on decreasing singular values; the default tolerance is the
    paper's float32 eps x N with N the number of singular values (section 4.3)."""
    k = sigma.shape[-1] if count is None else count
    tolerance = FLOAT32_EPS * k if eps is None else float(eps)
    top = sigma[..., :1] if sigma.shape[-1] else sigma.new_zeros(*sigma.shape[:-1], 1)
    return (sigma > tolerance * top).sum(-1)


def numerical_rank(W: torch.Tensor, eps: float | None = None, return_singular_values: bool = False):
    """Rank_eps(W) = #{i : sigma_i > eps * ||W||_2} (seed 003 equation 4).

    W: a matrix (m, n) or a batch (..., m, n). eps: the relative tolerance;
    by default the paper's choice (section 4.3) eps = float32 machine epsilon
    x the number of singular values, whatever W's dtype. Returns a 0-d int64
    tensor, or one per matrix for batched input; with
    return_singular_values=True also the singular values (..., min(m, n)),
    in decreasing order. Theorem 1: the result is stable under perturbations
    smaller than the gap between eps * ||W||_2 and the nearest sigma_i."""
    _checks.tensor("W", W, ndims=range(2, 64), shape="(m, n) or (..., m, n)")
    _check_eps(eps)
    sigma = torch.linalg.svdvals(W)
    rank = _rank_of_singular_values(sigma, eps)
    return (rank, sigma) if return_singular_values else rank


def stable_rank(W: torch.Tensor) -> torch.Tensor:
    """||W||_F^2 / ||W||_2^2, a smooth lower bound of the rank (0 for a zero
    matrix); batched like numerical_rank."""
    _checks.tensor("W", W, ndims=range(2, 64), shape="(m, n) or (..., m, n)")
    sigma = torch.linalg.svdvals(W)
    top = sigma[..., 0] if sigma.shape[-1] else sigma.new_zeros(sigma.shape[:-1])
    frob = sigma.square().sum(-1)
    return torch.where(top > 0, frob / top.clamp_min(torch.finfo(sigma.dtype).tiny).square(), torch.zeros_like(frob))


def singular_values_of_rows(M: torch.Tensor) -> torch.Tensor:
    """Singular values of M (r, c) in float64: a direct SVD when M is nearly
    square, the smaller Gram matrix (_linalg.gram_singular_values) when one
    side is much longer."""
    if max(M.shape) <= 2 * min(M.shape) and min(M.shape) > 0:
        return torch.linalg.svdvals(M.double())
    return gram_singular_values(M)


# ---------------------------------------------------------------------------------------------
# Capturing the outputs of chosen sub-networks in one forward pass


def _outputs(model, x, captured, order, layers):
    captured.clear()
    order.clear()
    out = first_tensor(model(x))
    missing = [name for name in layers if name not in captured]
    if missing:
        raise ValueError(f"layers {missing} did not run in the model's forward pass")
    return [captured[name] for name in order] + [out]


# ---------------------------------------------------------------------------------------------
# Partial rank of the Jacobian (section 3.2, Algorithm A1)


def _check_patch(patch, x: torch.Tensor):
    """(row_slice, col_slice) over the last two axes of an image input, or a
    slice over the features of a flat input; None takes the whole input."""
    if x.dim() <= 2:
        if patch is None:
            return (slice(0, x.shape[-1]),)
        if isinstance(patch, slice):
            patch = (patch,)
        if not (isinstance(patch, tuple) and len(patch) == 1 and isinstance(patch[0], slice)):
            raise TypeError(f"patch must be a slice over the features of a flat input, got {patch!r}")
        sizes = (x.shape[-1],)
    else:
        if patch is None:
            return (slice(0, x.shape[-2]), slice(0, x.shape[-1]))
        if not (isinstance(patch, tuple) and len(patch) == 2 and all(isinstance(s, slice) for s in patch)):
            raise TypeError(f"patch must be (row_slice, col_slice), got {patch!r}")
        sizes = (x.shape[-2], x.shape[-1])
    normal = []
    for s, size in zip(patch, sizes):
        start, stop, step = s.indices(size)
        if step != 1 or stop <= start:
            raise ValueError(f"patch {patch!r} must select a non-empty contiguous range of an axis of size {size}")
        normal.append(slice(start, stop))
    return tuple(normal)


def _patch_function(model, x1, patch, captured, order, layers, at):
    """f(p) = captured outputs of model(base + psi(p)), psi the zero padding of
    section 3.2 (the patch's entries at their own positions, zeros around).
    at="patch": base = 0, so f is evaluated at the zero-padded patch
    psi(Sub(x)) as in Algorithm A1; at="image": base is x with the patch
    zeroed, so f is evaluated at x itself. Written without in-place writes
    so that vmap and jvp can trace it."""
    region = (Ellipsis,) + patch
    base = torch.zeros_like(x1) if at == "patch" else x1.clone()
    base[region] = 0
    p0 = x1[region].clone()
    if len(patch) == 2:
        H, W = x1.shape[-2:]
        pad = (patch[1].start, W - patch[1].stop, patch[0].start, H - patch[0].stop)
    else:
        pad = (patch[0].start, x1.shape[-1] - patch[0].stop)

    def f(p):
        outs = _outputs(model, base + nn.functional.pad(p, pad), captured, order, layers)
        return tuple(o.reshape(-1) for o in outs)

    return f, p0


def _forward_elements(model, run) -> int:
    """How many elements the leaf modules of model output during run(): the
    activations one forward pass materialises, whether captured or not."""
    count = [0]

    def hook(module, args, output):
        if isinstance(output, torch.Tensor):
            count[0] += output.numel()

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return count[0]


def _jacobian_peak_bytes(K: int, sizes: list[int], itemsize: int, chunk: int, activations: int) -> int:
    """Peak memory of one partial Jacobian: the columns of every output (K x
    features, in the input dtype), the primal and tangent activations of one
    chunk's forward pass (`activations` elements per pass), and the largest
    float64 factorisation (a copy of J and its smaller Gram matrix)."""
    total = sum(sizes)
    factor = max(8 * K * F + 8 * min(K, F) ** 2 for F in sizes)
    return K * total * itemsize + 2 * min(chunk, K) * (activations + total) * itemsize + factor


def jacobian_partial_rank(model: nn.Module, x: torch.Tensor, patch=None, layers=None, eps: float | None = None,
                          mode: str = "auto", chunk_size: int | None = 64, progress: bool = True,
                          at: str = "patch", rank_of: str = "gram") -> pd.DataFrame:
    """Numerical rank of the Jacobian of each chosen sub-network with respect
    to a patch of the input (seed 003 section 3.2, equation 5, Algorithm A1).

    By default as Algorithm A1 (appendix C): the Jacobian of f o psi, psi
    the zero padding of the patch, taken at the zero-padded patch psi(Sub(x))
    (at="patch"; A1 pads a central patch symmetrically, here the patch keeps
    its own position, which is the same for the central patch of section
    4.3), and the rank is that of J^T J (rank_of="gram"): its K eigenvalues
    count when above eps x the largest, eps defaulting to float32 eps x K
    (A1's matrix_rank, section 4.3). at="image" evaluates the Jacobian at x
    itself (the columns of the full Jacobian at the real image); rank_of=
    "jacobian" thresholds the singular values of J instead (equation 4,
    eps x the number of singular values).

    model: run in eval mode and given back unchanged. x: one input, (C, H,
    W) or (d,) or with a batch axis of 1, or several (N, ...) measured one
    at a time. patch: (row_slice, col_slice) over the spatial axes, all
    channels (a slice for flat inputs, None for the whole input; the paper
    uses the central 16 x 16 x 3 patch), or a list of them (appendix D).
    layers: qualified module names (default: the model's top-level
    children); the model output is always the last row.

    One pass gives every layer: the Jacobian columns for the K patch entries
    come from K forward-mode products (torch.func.jvp under vmap, chunk_size
    at a time, one progress step per chunk) or, when the outputs together
    are narrower than the patch, from reverse mode (vjp, chunk_size output
    rows at a time). The peak memory (K x the total output size, plus the
    factorisation) is estimated first; when it exceeds the free memory a
    ValueError asks for a smaller patch or fewer layers.

    Returns a DataFrame with columns sample, patch, layer, rank, features
    (output size), patch_size; rows in forward order, model output last.
    Lemma 2: along a chain of layers the partial rank does not increase."""
    _checks.tensor("x", x, ndims=range(1, 6), shape="(N, C, H, W), (C, H, W), (N, d) or (d,)")
    first_patch = patch[0] if isinstance(patch, list) and patch else patch
    if x.dim() == 1 or (x.dim() == 3 and isinstance(first_patch, tuple) and len(first_patch) == 2):
        x = x[None]  # one unbatched input
    if x.shape[0] == 0:
        raise ValueError("x holds no sample")
    if mode not in ("auto", "forward", "reverse"):
        raise ValueError(f"mode must be 'auto', 'forward' or 'reverse', got {mode!r}")
    if at not in ("patch", "image"):
        raise ValueError(f"at must be 'patch' (Algorithm A1: the zero-padded patch) or 'image', got {at!r}")
    if rank_of not in ("gram", "jacobian"):
        raise ValueError(f"rank_of must be 'gram' (Algorithm A1: rank of J^T J) or 'jacobian', got {rank_of!r}")
    if chunk_size is not None:
        chunk_size = _checks.positive_int("chunk_size", chunk_size)
    _check_eps(eps)
    layers = check_layers(model, layers)
    patches = list(patch) if isinstance(patch, list) else [patch]
    if not patches:
        raise ValueError("patch is an empty list")
    patches = [_check_patch(p, x) for p in patches]
    from tqdm.auto import tqdm

    rows = []
    jobs = [(n, j) for n in range(x.shape[0]) for j in range(len(patches))]
    with capturing(model, layers) as (captured, order), torch.no_grad(), evaluating(model), \
            tqdm(total=0, desc="partial Jacobian rank", disable=not progress, leave=False) as bar:
        for n, j in jobs:
            f, p0 = _patch_function(model, x[n:n + 1], patches[j], captured, order, layers, at)
            result = []
            activations = _forward_elements(model, lambda: result.append(f(p0)))
            outs = result[0]
            names = list(order) + [OUTPUT]
            sizes = [o.numel() for o in outs]
            K = p0.numel()
            use_forward = mode == "forward" or (mode == "auto" and sum(sizes) >= K)
            chunk = chunk_size or (K if use_forward else max(sizes))
            _checks.memory(_jacobian_peak_bytes(K, sizes, x.element_size(), chunk, activations), x.device,
                           f"the partial Jacobian of {K} patch entries into {sum(sizes)} output features",
                           "use a smaller patch (seed 003 uses the central 16 x 16) or fewer layers")
            steps = -(-(K if use_forward else sum(sizes)) // chunk)
            bar.total += steps
            bar.refresh()
            with torch.enable_grad():
                columns = _jacobian_columns(f, p0, use_forward, chunk, sizes, bar.update)
            for name, size, J in zip(names, sizes, columns):
                sigma = singular_values_of_rows(J)  # J is (K, features): J^T
                if rank_of == "gram":  # eigenvalues of J^T J (K of them, zeros beyond the rank)
                    rank = _rank_of_singular_values(sigma.square(), eps, count=K)
                else:
                    rank = _rank_of_singular_values(sigma, eps)
                rows.append({"sample": n, "patch": _patch_label(patches[j]), "layer": name,
                             "rank": int(rank), "features": size, "patch_size": K})
    return pd.DataFrame(rows)


def _patch_label(patch) -> str:
    return "[" + ", ".join(f"{s.start}:{s.stop}" for s in patch) + "]"


def _jacobian_columns(f, p0, use_forward: bool, chunk: int, sizes: list[int], step):
    """The transposed Jacobians (K, features) of every output of f at p0,
    chunk tangents (forward) or chunk output rows (reverse) at a time;
    step(1) after each chunk."""
    from torch.func import jvp, vjp, vmap

    K = p0.numel()
    if use_forward:
        parts = []
        for start in range(0, K, chunk):
            count = min(chunk, K - start)
            basis = torch.zeros(count, K, dtype=p0.dtype, device=p0.device)
            basis[torch.arange(count), torch.arange(start, start + count)] = 1
            parts.append([c.detach() for c in vmap(lambda t: jvp(f, (p0,), (t,))[1])(basis.reshape(count, *p0.shape))])
            step(1)
        return [torch.cat([part[i] for part in parts]) for i in range(len(sizes))]
    outputs, pullback = vjp(f, p0)
    total = sum(sizes)
    offsets = [0]
    for F in sizes:
        offsets.append(offsets[-1] + F)
    rows = []
    for start in range(0, total, chunk):  # one-hot cotangents over all outputs, chunk rows at a time
        count = min(chunk, total - start)
        eye = torch.zeros(count, total, dtype=outputs[0].dtype, device=outputs[0].device)
        eye[torch.arange(count), torch.arange(start, start + count)] = 1
        cotangents = tuple(eye[:, offsets[k]:offsets[k + 1]] for k in range(len(sizes)))
        rows.append(vmap(pullback)(cotangents)[0].detach().reshape(count, K))
        step(1)
    J = torch.cat(rows)
    return [J[offsets[k]:offsets[k + 1]].T for k in range(len(sizes))]


# ---------------------------------------------------------------------------------------------
# Perturbed PCA dimension (appendix E, Algorithm A2)


def pca_eigenvalues(features: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of the sample covariance of features (n, d), decreasing, in
    float64 through the smaller Gram matrix of the centred features."""
    X = features.reshape(features.shape[0], -1).double()
    X = X - X.mean(0, keepdim=True)
    return singular_values_of_rows(X).square() / max(X.shape[0] - 1, 1)


def pca_dimension(features: torch.Tensor, eps: float | None = None) -> int:
    """#{PCA eigenvalues > eps * largest} (section 4.3); by default eps =
    float32 eps x N with N the number of PCA eigenvalues."""
    _checks.tensor("features", features, ndims=range(2, 8), shape="(n, ...)")
    _check_eps(eps)
    return int(_rank_of_singular_values(pca_eigenvalues(features), eps))


def perturbed_pca_dimension(model: nn.Module, x: torch.Tensor, layers=None, n_perturbations: int = 1000,
                            scale: float = 1e-3, eps: float | None = None, batch_size: int = 250,
                            generator: torch.Generator | None = None, progress: bool = True) -> pd.DataFrame:
    """Perturbed PCA dimension (seed 003 appendix E, equation A103, Algorithm
    A2): for each sample x_i, the PCA dimension of {F_k(x_i + scale * e)} over
    n_perturbations Gaussian e, for the input and every chosen layer.

    x: (N, ...) samples, each perturbed separately and sent through the model
    in batches of batch_size. eps: eigenvalues count when above
    eps x the largest; default the appendix's float32 eps x n_perturbations
    (1.19e-7 x 50,000 there, with scale = 1e-3). Returns a DataFrame with
    columns sample, layer ("input" first, then the layers in forward order,
    the model output last), pca_dimension and delta_dimension (the layer's
    dimension minus the input's: the Delta Dimension of Fig. A6, negative
    where dimensions are lost); average over samples with
    df.groupby("layer", sort=False).mean(). The model runs in eval mode and
    is given back unchanged. The features of all n_perturbations are kept
    for the PCA: the peak memory is estimated from one forward pass first,
    and a ValueError asks for fewer n_perturbations or layers when it
    exceeds the free memory."""
    _checks.tensor("x", x, ndims=range(2, 6), shape="(N, ...)")
    n_perturbations = _checks.positive_int("n_perturbations", n_perturbations)
    batch_size = _checks.positive_int("batch_size", batch_size)
    scale = _checks.number("scale", scale, low=0, low_open=True)
    _check_eps(eps)
    tolerance = FLOAT32_EPS * n_perturbations if eps is None else float(eps)
    layers = check_layers(model, layers)
    from tqdm.auto import tqdm

    if x.shape[0] == 0:
        raise ValueError("x holds no sample")
    rows = []
    steps = -(-n_perturbations // batch_size)
    with capturing(model, layers) as (captured, order), torch.no_grad(), evaluating(model):
        result = []
        activations = _forward_elements(model, lambda: result.append(_outputs(model, x[:1], captured, order, layers)))
        sizes = [x[0].numel()] + [o[0].numel() for o in result[0]]
        _checks.memory(_pca_peak_bytes(n_perturbations, sizes, x.element_size(), batch_size, activations), x.device,
                       f"the perturbed PCA dimension of {n_perturbations} perturbations of {sum(sizes)} features",
                       "use fewer n_perturbations or fewer (or smaller) layers")
        with tqdm(total=x.shape[0] * steps, desc="perturbed PCA dimension", disable=not progress, leave=False) as bar:
            for n in range(x.shape[0]):
                chunks: dict[str, list[torch.Tensor]] = {}
                names = []
                for start in range(0, n_perturbations, batch_size):
                    count = min(batch_size, n_perturbations - start)
                    noise = torch.randn((count, *x.shape[1:]), generator=generator, dtype=x.dtype,
                                        device=x.device if generator is None else generator.device)
                    inputs = x[n:n + 1] + scale * noise.to(x.device)
                    outs = _outputs(model, inputs, captured, order, layers)
                    names = ["input"] + list(order) + [OUTPUT]
                    for name, out in zip(names, [inputs] + outs):
                        chunks.setdefault(name, []).append(out.reshape(count, -1))
                    bar.update(1)
                dims = {name: int(_rank_of_singular_values(pca_eigenvalues(torch.cat(chunks[name])), tolerance,
                                                            count=1))
                        for name in names}
                for name in names:
                    rows.append({"sample": n, "layer": name, "pca_dimension": dims[name],
                                 "delta_dimension": dims[name] - dims["input"]})
    return pd.DataFrame(rows)


def _pca_peak_bytes(n: int, sizes: list[int], itemsize: int, batch_size: int, activations: int) -> int:
    """Peak memory of perturbed_pca_dimension for one sample: the stored
    features of every layer (n x size), one batch's forward pass
    (`activations` elements per input), and the largest float64 PCA (the
    concatenated features, two float64 copies and the smaller Gram matrix)."""
    stored = n * sum(sizes) * itemsize
    forward = 2 * min(batch_size, n) * (activations + sum(sizes)) * itemsize
    factor = max(n * F * itemsize + 16 * n * F + 8 * min(n, F) ** 2 for F in sizes)
    return stored + forward + factor


# ---------------------------------------------------------------------------------------------
# Classification dimension (section 3.3, Algorithm A3)


@dataclass
class ClassificationDimension:
    """Result of classification_dimension: the dimension k, its accuracy, the
    full-feature accuracy, the target (ratio x full accuracy) and every
    accuracy evaluated (columns k, fraction, accuracy)."""
    dimension: int
    accuracy: float
    full_accuracy: float
    target: float
    evaluations: pd.DataFrame = field(repr=False)

    def plot(self, ax=None):
        from .plot import classification_dimension as figure

        return figure(self, ax=ax)


class _Projector:
    """Accuracy of the classifier on features projected onto the top-k
    eigenvectors of their covariance (equation 6)."""

    def __init__(self, features, labels, classifier, center):
        X = features.double()
        self.mean = X.mean(0, keepdim=True)
        covariance = torch.cov(X.T).reshape(X.shape[1], X.shape[1])
        _, vectors = torch.linalg.eigh(covariance)
        self.Q = vectors.flip(-1)  # decreasing eigenvalues
        self.X, self.labels, self.classifier, self.center = X, labels, classifier, center
        self.dtype = features.dtype
        self.cache: dict[int, float] = {}

    def accuracy(self, k: int) -> float:
        if k not in self.cache:
            Q = self.Q[:, :k]
            if self.center:
                projected = self.mean + (self.X - self.mean) @ Q @ Q.T
            else:
                projected = self.X @ Q @ Q.T
            self.cache[k] = _accuracy(self.classifier, projected.to(self.dtype), self.labels)
        return self.cache[k]


def _accuracy(classifier, features, labels) -> float:
    if not callable(classifier):
        raise TypeError(f"classifier must be a callable (an nn.Linear, say), got {type(classifier).__name__}")
    try:
        with torch.no_grad(), evaluating(classifier if isinstance(classifier, nn.Module) else None):
            logits = classifier(features)
    except RuntimeError as error:  # a shape mismatch inside the classifier
        raise ValueError(f"classifier does not accept features of shape {tuple(features.shape)} "
                         f"({features.dtype}): {error}") from error
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"classifier must map features (N, d) to logits (N, classes), got "
                         f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= logits.shape[1]):
        raise ValueError(f"labels must lie in [0, {logits.shape[1]}) (the classifier's outputs), got values in "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    return float((logits.argmax(-1) == labels).double().mean())


def _check_features_labels(features, labels, name="features"):
    _checks.tensor(name, features, ndims=(2,), shape="(N, d)")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.dtype.is_floating_point \
            or labels.dtype == torch.bool:
        raise TypeError("labels must be an integer tensor of shape (N,)")
    if labels.shape[0] != features.shape[0]:
        raise ValueError(f"labels has {labels.shape[0]} entries but {name} has {features.shape[0]} rows")
    if features.shape[0] < 2:
        raise ValueError(f"{name} needs at least two samples")
    if features.shape[1] == 0:
        raise ValueError(f"{name} has no feature column")


def classification_dimension(features: torch.Tensor, labels: torch.Tensor, classifier, ratio: float = 0.95,
                             center: bool = False) -> ClassificationDimension:
    """ClsDim (seed 003 section 3.3, equation 6, Algorithm A3): the smallest k
    such that projecting the final features onto the top-k eigenvectors of
    their covariance keeps ratio x the full accuracy (95% in section 4.3).

    features: (N, d) final features; labels: (N,); classifier: a callable
    (the final nn.Linear, say) from (N, d) features to logits. center=False
    projects onto the linear span of the eigenvectors as equation 6 says;
    center=True projects the centred features and adds the mean back.

    k is found by bisection (O(log d) evaluations, accuracy being monotone in
    k in practice), then verified: a coarse geometric sweep below k looks for
    a smaller k that also reaches the target, and if one does (accuracy not
    monotone) the search goes on below it, with a warning."""
    _check_features_labels(features, labels)
    ratio = _checks.number("ratio", ratio, low=0, high=1, low_open=True)
    projector = _Projector(features, labels, classifier, center)
    d = features.shape[1]
    full = _accuracy(classifier, features, labels)
    target = ratio * full
    hi = d  # the full projection is the identity (up to rounding): it keeps the accuracy
    while True:
        lo = 0  # k = 0 projects everything away
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if projector.accuracy(mid) >= target:
                hi = mid
            else:
                lo = mid
        smaller = [k for k in _geometric(hi - 1) if projector.accuracy(k) >= target]
        if not smaller:
            break
        warnings.warn(f"classification accuracy is not monotone in k: k={smaller[0]} reaches the target "
                      f"below the bisection's k={hi}; searching below it", RuntimeWarning, stacklevel=2)
        hi = smaller[0]
    evaluations = pd.DataFrame(sorted(projector.cache.items()), columns=["k", "accuracy"])
    evaluations.insert(1, "fraction", evaluations["k"] / d)
    return ClassificationDimension(hi, projector.accuracy(hi) if hi < d else full, full, target, evaluations)


def _geometric(limit: int) -> list[int]:
    out, k = [], 1
    while k <= limit:
        out.append(k)
        k *= 2
    return out


def projection_accuracy(features: torch.Tensor, labels: torch.Tensor, classifier, ks, center: bool = False):
    """Accuracy after projecting onto the top-k eigenvectors, for each k in ks
    (the curves of Fig. 2). Returns a DataFrame with columns k, fraction,
    accuracy."""
    _check_features_labels(features, labels)
    projector = _Projector(features, labels, classifier, center)
    d = features.shape[1]
    ks = _checks.integers("ks", ks, low=1, high=d)
    return pd.DataFrame({"k": ks, "fraction": [k / d for k in ks], "accuracy": [projector.accuracy(k) for k in ks]})


# ---------------------------------------------------------------------------------------------
# Independence deficit (section 5, Algorithm A4)


@dataclass
class IndependenceDeficit:
    """Result of independence_deficit. coefficients[:, i] are the Lasso
    coefficients A* of class i on the other classes (coefficients[i, i] = 0);
    frame has one row per class; converged and kkt_violation report the
    solver's optimality check."""
    coefficients: torch.Tensor
    frame: pd.DataFrame
    eta: float
    iterations: int
    converged: bool
    kkt_violation: float

    def support(self, i: int) -> list[int]:
        """The classes that decide class i, by decreasing |coefficient|."""
        return list(self.frame.loc[self.frame["class"] == i, "support"].iloc[0])


def lasso_kkt_violation(G: torch.Tensor, A: torch.Tensor, eta: float) -> torch.Tensor:
    """Largest violation, per class, of the optimality conditions of
    min_a a^T G a - 2 b^T a + eta |a|_1 with b = G[:, i] and a_i = 0:
    gradient g = 2 (G a - b); |g_j + eta sign(a_j)| = 0 where a_j != 0 and
    |g_j| <= eta where a_j = 0."""
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


def independence_deficit(logits: torch.Tensor, labels: torch.Tensor, eta: float = 20.0, max_iter: int = 20000,
                         tol: float = 1e-8, class_names=None) -> IndependenceDeficit:
    """Independence deficit (seed 003 section 5, equations 11-12, Algorithm
    A4), for every class at once.

    For each class i, the Lasso A* = argmin_A E[(logit_i - sum_j A_j
    logit_j)^2] + eta |A|_1 with A_i = 0 (equation 11, the expectation being
    the mean over the N samples; section 5 uses eta = 20 on ImageNet logits,
    so scale eta with your logits' variance). Solved exactly (proximal
    gradient with a KKT convergence test, tol relative to the gradient's
    Lipschitz constant), so coefficients are exact zeros off the support.

    logits: (N, C); labels: (N,). Returns an IndependenceDeficit whose frame
    has, per class: support and coefficients (decreasing |A|), n_support,
    r2 (of the reconstruction), accuracy and positive_accuracy of the model
    when logit_i is replaced by its reconstruction (equation 12), and the
    original accuracy and positive_accuracy (on samples of class i) as in
    Fig. 4 and appendix F."""
    _check_features_labels(logits, labels, "logits")
    eta = _checks.number("eta", eta, low=0)
    max_iter = _checks.positive_int("max_iter", max_iter)
    tol = _checks.number("tol", tol, low=0, low_open=True)
    N, C = logits.shape
    if C < 2:
        raise ValueError(f"logits needs at least two classes, got {C}")
    if int(labels.min()) < 0 or int(labels.max()) >= C:
        raise ValueError(f"labels must lie in [0, {C}), got values in [{int(labels.min())}, {int(labels.max())}]")
    if class_names is not None and len(class_names) != C:
        raise ValueError(f"class_names has {len(class_names)} names for {C} classes")
    Z = logits.double()
    G = Z.T @ Z / N
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


# ---------------------------------------------------------------------------------------------
# Structural impetus (section 4.3, Fig. 3) and Theorem 5 (MLP-50)


class _Attention(nn.Module):
    """Self-attention over the spatial positions of (N, C, H, W) features."""

    def __init__(self, channels: int, heads: int):
        super().__init__()
        self.attention = nn.MultiheadAttention(channels, heads, batch_first=True)

    def forward(self, x):
        N, C, H, W = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        return self.attention(tokens, tokens, tokens, need_weights=False)[0].transpose(1, 2).reshape(N, C, H, W)


def default_components(channels: int = 128, size: int = 8) -> dict[str, nn.Module]:
    """The components of Fig. 3 with random weights: 3x3 convolution, FC
    layer, BatchNorm (batch statistics), LayerNorm, InstanceNorm, GroupNorm,
    attention, and ReLU."""
    flat = channels * size * size
    heads = 4 if channels % 4 == 0 else 1
    return {
        "conv3x3": nn.Conv2d(channels, channels, 3, padding=1),
        "fc": nn.Sequential(nn.Flatten(), nn.Linear(flat, flat), nn.Unflatten(1, (channels, size, size))),
        "batchnorm": nn.BatchNorm2d(channels),
        "layernorm": nn.LayerNorm([channels, size, size]),
        "instancenorm": nn.InstanceNorm2d(channels, affine=True),
        "groupnorm": nn.GroupNorm(min(32, channels) if channels % min(32, channels) == 0 else 1, channels),
        "attention": _Attention(channels, heads),
        "relu": nn.ReLU(),
    }


def structural_impetus(components: dict[str, nn.Module] | None = None, channels: int = 128, size: int = 8,
                       n_samples: int = 5000, eps: float | None = None, dtype=torch.float64,
                       generator: torch.Generator | None = None, progress: bool = True) -> pd.DataFrame:
    """The structural-impetus probe of seed 003 section 4.3 (Fig. 3): standard
    Gaussian inputs of shape (channels, size, size) go through an FC layer of
    channels*size*size units, then the component; the PCA dimension of the
    features and the rank of the Jacobian are measured before and after the
    component (paper: 128 x 8 x 8, 8,192 units, 5,000 samples; eps as in
    equation 4 with the float32 default). Components default to
    default_components(); they are used in train mode (BatchNorm on batch
    statistics; copies, so the caller's modules are left alone), with their
    random initialisation.

    Returns a DataFrame with columns component, stage ("before"/"after"),
    pca_dimension, jacobian_rank, ambient (channels*size*size). The Jacobian
    is the full one of input -> features at the first sample, batch
    statistics held fixed."""
    n_samples = _checks.positive_int("n_samples", n_samples)
    channels = _checks.positive_int("channels", channels)
    size = _checks.positive_int("size", size)
    if components is None:
        components = default_components(channels, size)
    if not components:
        raise ValueError("components is empty")
    flat = channels * size * size
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    fc = nn.Linear(flat, flat).to(dtype)
    with torch.no_grad():
        fc.weight.copy_(torch.randn(flat, flat, generator=g, dtype=dtype) / math.sqrt(flat))
        fc.bias.zero_()
    inputs = torch.randn(n_samples, flat, generator=g, dtype=dtype)
    from tqdm.auto import tqdm

    rows = []
    with torch.no_grad():
        before = fc(inputs).reshape(n_samples, channels, size, size)
    rank_before = int(numerical_rank(fc.weight.detach(), eps))
    for name, component in tqdm(components.items(), desc="structural impetus", disable=not progress, leave=False):
        component = copy.deepcopy(component).to(dtype).train()
        for module in component.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.momentum = None  # the running statistics become this batch's statistics
        with torch.no_grad():
            after = component(before)
        if after.shape[0] != n_samples:
            raise ValueError(f"component {name!r} changed the batch size")
        component.eval()  # the Jacobian at one sample, batch statistics held fixed

        def features(v, component=component):
            return component(fc(v[None]).reshape(1, channels, size, size)).reshape(-1)

        with warnings.catch_warnings():  # attention's backward has no vmap rule: slower, not wrong
            warnings.filterwarnings("ignore", message="There is a performance drop")
            J = torch.func.jacrev(features)(inputs[0])
        rows.append({"component": name, "stage": "before", "pca_dimension": pca_dimension(before, eps),
                     "jacobian_rank": rank_before, "ambient": flat})
        rows.append({"component": name, "stage": "after", "pca_dimension": pca_dimension(after, eps),
                     "jacobian_rank": int(numerical_rank(J.detach(), eps)), "ambient": flat})
    return pd.DataFrame(rows)


def theorem5_slopes(n: int) -> torch.Tensor:
    """lim (1/L) log(sigma_k / sigma_1) = (psi((n-k+1)/2) - psi(n/2)) / 2 for
    k = 1..n (seed 003 Theorem 5, equation 10, from the Lyapunov exponents
    of Ginibre products, equation A93); entry k-1 is the slope of sigma_k."""
    n = _checks.positive_int("n", n)
    k = torch.arange(1, n + 1, dtype=torch.float64)
    half_n = torch.tensor(n / 2.0, dtype=torch.float64)
    return (torch.special.digamma((n - k + 1) / 2) - torch.special.digamma(half_n)) / 2


def mlp_rank_decay(depth: int = 50, width: int = 1000, n_samples: int | None = None, eps: float | None = None,
                   ks=(2,), dtype=torch.float32, generator: torch.Generator | None = None,
                   device=None, progress: bool = True) -> pd.DataFrame:
    """The MLP-50 experiment of seed 003 section 4.3 (Fig. 1 d-f) under the
    conditions of Theorem 5: depth dense layers of width units with i.i.d.
    Gaussian weights (scaled by 1/sqrt(width), which leaves every
    sigma_k / sigma_1 unchanged and keeps float32 finite) on Gaussian inputs.

    Per layer l: jacobian_rank, the numerical rank of J_l = W_l ... W_1;
    feature_dimension, the numerical rank (equation 4 on PCA eigenvalues) of
    the covariance of the layer's features on n_samples inputs (default
    2 x width); and log_ratio_k = log(sigma_k / sigma_1) of J_l for each k in
    ks, which Theorem 5 predicts to fall linearly in l with slope
    theorem5_slopes(width)[k-1] (NaN once the ratio is below what dtype
    resolves). The paper stops where float32 entries underflow; here J is
    rescaled each layer (ratios unchanged), so the run goes on until the
    Jacobian's rank reaches 1 or depth is reached."""
    depth = _checks.positive_int("depth", depth)
    width = _checks.positive_int("width", width)
    n_samples = 2 * width if n_samples is None else _checks.positive_int("n_samples", n_samples)
    ks = _checks.integers("ks", ks, low=1, high=width)
    _check_eps(eps)
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    floor = math.log(1e3 * torch.finfo(dtype).eps)
    from tqdm.auto import tqdm

    J = torch.eye(width, dtype=dtype, device=device)
    features = torch.randn(n_samples, width, generator=g, dtype=dtype).to(device)
    rows = []
    for layer in tqdm(range(1, depth + 1), desc="MLP rank decay", disable=not progress, leave=False):
        W = (torch.randn(width, width, generator=g, dtype=dtype) / math.sqrt(width)).to(device)
        J = W @ J
        J = J / J.abs().max()  # ratios of singular values are scale free; stay finite
        features = features @ W.T
        features = features / features.abs().max()
        rank, sigma = numerical_rank(J, eps, return_singular_values=True)
        ratios = (sigma / sigma[0]).double().log().cpu()
        row = {"layer": layer, "jacobian_rank": int(rank),
               "feature_dimension": int(_rank_of_singular_values(pca_eigenvalues(features), eps))}
        for k in ks:
            row[f"log_ratio_{k}"] = float(ratios[k - 1]) if ratios[k - 1] > floor else float("nan")
        rows.append(row)
        if int(rank) <= 1:
            break
    return pd.DataFrame(rows)
