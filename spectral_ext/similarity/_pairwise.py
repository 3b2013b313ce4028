"""The similarity of many models' representations of one probe (zoos):
pairwise_similarity, its memory planner (blocks of models within
max_memory), the block sweep, and the batched CKA, Procrustes and
generic-measure engines."""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import pandas as pd
import torch

from .. import _checks
from .._hooks import first_tensor
from ._hsic import (_centre_gram_, _centred_features, _check_kernel, _cka_from_hsic, _constant, _feature_hsic, _gram,
                    _hsic_scale, _undefined)
from ._layout import _rescaled, as_channels
from ._procrustes import _aligned, _check_group

@dataclass(frozen=True)
class PairwiseSimilarity:
    """Result of pairwise_similarity: one measure over pairs of models.

    measure: the measure's label (a spec string: "cka", "cka:kernel=max",
    "svcca:variance=0.95"); pairs: the (model_a, model_b) name pairs, in the
    order asked; values: one float per pair, in the same order."""

    measure: str
    pairs: tuple[tuple, ...]
    values: tuple[float, ...]

    def to_frame(self) -> pd.DataFrame:
        """One row per pair: model_a, model_b, measure, value (a pair table,
        README "Conventions")."""
        return pd.DataFrame({"model_a": [a for a, _ in self.pairs], "model_b": [b for _, b in self.pairs],
                             "measure": [self.measure] * len(self.pairs), "value": list(self.values)})


def pairwise_similarity(features: dict, pairs=None, measure="cka", kernel: str = "linear",
                        group: str = "orthogonal", unbiased: bool = True, centered: bool = False,
                        feature_axis: int | None = None, chunk: int = 64, bandwidth: float = 0.5,
                        gamma: float | None = None, progress: bool = True, share=None,
                        max_memory: int | None = None) -> PairwiseSimilarity:
    """The similarity of many models' representations of one probe, each model's share computed once.

    Seed 004 section 5: the CKA of equation 5.4 with the kernels of cka, the Procrustes measures of
    definition 5.2 / appendix D.7.1; the pairs as batched products. measure "cka" (`kernel`, `unbiased`,
    `bandwidth`, `gamma`): one centred Gram per model and the HSIC of every pair from one GEMM of the
    stacked vectorised U-centred Grams, or, for linear kernels when it is cheaper, one centred feature
    matrix per model and every |X_i'X_j|^2 from one product per model with the stacked features. measure
    "procrustes" (`group`, `centered`): each model's normalised features once, every pair's X_i'X_j a
    block of one product of the stacked features, the nuclear norms (orthogonal) or the assignments
    (G_ReLU) batched, `chunk` pairs at a time. The other measures take each representation flattened to
    (N, D), reduce it once and batch the pairs with the measure's matrix (their reductions planned within
    max_memory by Measure.footprint, in blocks of models as below).

    Memory: when every model's share fits in max_memory, each is made once, as above; else the models go
    in blocks, each block pair (I, J >= I) that holds a pair has its blocks' Grams / features made for it
    (block J remade once per row block I), with the same numbers; where even one block cannot fit, a
    ValueError naming the probe size comes before any work. Features whose squares would overflow or
    underflow are divided by a power of two first (every measure is scale invariant).

    Args:
        features: {model name: (N, ...) features of the same N probe inputs} (a layer's or model's output
            as it came does too: a tuple's first element, a Hugging Face output's last_hidden_state;
            hidden states (N, T, C) need feature_axis=-1).
        pairs: (a, b) names (default None: every unordered pair; (a, a) is allowed).
        measure: "cka", "procrustes", any other measure of similarity.MEASURES as a name or spec string
            ("svcca:variance=0.95", "cka:kernel=max") or a Measure object (default "cka").
        kernel: the CKA kernel, as in cka (default "linear").
        group: the Procrustes group, "orthogonal" or "grelu" (default "orthogonal").
        unbiased: the unbiased CKA estimator (default True).
        centered: Procrustes subtracts each channel's mean first (default False).
        feature_axis: the axis of the features that holds the channels (default None: axis 1).
        chunk: Procrustes pairs per batch (default 64).
        bandwidth: the rbf kernel's multiple of the median distance (default 0.5).
        gamma: the laplace kernel's gamma; None for 1 / the median l1 distance (default None).
        progress: a progress bar over the models (default True).
        share: None, or share(name, options, compute) -> dict that keeps a model's U-centred Gram across
            calls (compute() makes it; zoo.pair_metrics passes its ActivationCache, so a zoo run reduces
            each model once, whatever its pair chunks); used only when every Gram fits twice (the cache's
            copy and the stacked one), otherwise the Grams are recomputed per block and share is not
            called (default None).
        max_memory: bytes the Grams, stacked features and Gram blocks may take at once (default None:
            half of _checks.free_memory of the features' device).

    Returns:
        A PairwiseSimilarity (the measure's label, the pairs, their values); .to_frame() has columns
        model_a, model_b, measure, value (one row per pair, in the order of pairs).
    """
    if not isinstance(features, dict) or not features:
        raise TypeError("features must be a non-empty dict {model name: (N, ...) tensor}")
    from .measure import Measure, engine_label, engine_options, parse_spec

    if isinstance(measure, str) and measure not in ("cka", "procrustes"):
        measure = parse_spec(measure)
    label = measure.label if isinstance(measure, Measure) else None  # a string: from the options below
    engine = engine_options(measure) if isinstance(measure, Measure) else None
    if engine is not None:  # the batched engines below compute it: their arguments from its options
        measure = engine.pop("measure")
        kernel, unbiased = engine.get("kernel", kernel), engine.get("unbiased", unbiased)
        bandwidth, gamma = engine.get("bandwidth", bandwidth), engine.get("gamma", gamma)
        group, centered = engine.get("group", group), engine.get("centered", centered)
    names = list(features)
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]] if pairs is None else \
        [tuple(p) for p in pairs]
    if any(len(p) != 2 for p in pairs):
        raise ValueError("pairs must be (model_a, model_b) name pairs")
    unknown = sorted({str(n) for p in pairs for n in p if n not in features})
    if unknown:
        raise ValueError(f"pairs name models without features: {unknown}")
    chunk = _checks.positive_int("chunk", chunk)
    named = {n for p in pairs for n in p}  # a set: K x pairs membership tests would dominate a large zoo
    involved = [n for n in names if n in named]
    if isinstance(measure, Measure):
        values = _pairwise_measure(measure, features, involved, pairs, progress, share, max_memory)
        return PairwiseSimilarity(label, tuple(pairs), tuple(values))
    # every measure is scale invariant: representations too large or small for their squares scaled first
    meta = [n for n in involved if isinstance(features[n], torch.Tensor) and _checks.data_free(features[n])]
    if meta:
        raise ValueError(f"features of {meta[:3]} are meta tensors (shapes only): the measures need values")
    reps = {n: _rescaled(as_channels(f"features[{n!r}]", _hidden_states(n, features[n]), feature_axis))
            for n in involved}
    if len({R.shape[0] for R in reps.values()}) > 1:
        raise ValueError("every model's features must hold the same N probe samples")
    budget = _budget(max_memory, reps[involved[0]].device) if involved else math.inf
    from tqdm.auto import tqdm

    with tqdm(total=len(involved), desc=f"pairwise {measure}", unit="model", disable=not progress,
              leave=False, mininterval=0, miniters=1) as bar:
        if measure == "cka":
            _check_kernel(kernel, bandwidth, gamma)
            index = {n: i for i, n in enumerate(involved)}
            wanted = [(index[a], index[b]) for a, b in pairs]
            matrix = _pairwise_cka([reps[n] for n in involved], involved, kernel, unbiased, bandwidth, gamma, bar,
                                   share, wanted, budget) if wanted else None
            values = matrix[[i for i, _ in wanted], [j for _, j in wanted]].tolist() if wanted else []
        elif measure == "procrustes":
            _check_group(group)
            if not isinstance(centered, bool):
                raise TypeError(f"centered must be True or False, got {centered!r}")
            values = _pairwise_procrustes(reps, pairs, group, centered, chunk, bar, budget)
        else:
            raise ValueError(f"measure must be 'cka' or 'procrustes', got {measure!r}")
    if label is None:
        label = engine_label(measure, kernel, unbiased, bandwidth, gamma, group, centered)
    return PairwiseSimilarity(label, tuple(pairs), tuple(values))


def _pairwise_measure(m, features, involved, pairs, progress, share, max_memory) -> list[float]:
    """pairwise_similarity for a Measure: each involved representation
    reduced once per block (the measure's reduce), the pairs of a block pair
    from one m.matrix of both blocks' reductions; blocks of models within
    max_memory by the measures' footprint, as the CKA route."""
    from tqdm.auto import tqdm

    from .measure import reduced as reduce_one

    reps = {n: _hidden_states(n, features[n]) for n in involved}
    shapes = {n: tuple(R.shape) for n, R in reps.items()}
    if len({s[0] for s in shapes.values()}) > 1:
        raise ValueError("every model's features must hold the same N probe samples")
    if not involved:
        return []
    n = shapes[involved[0]][0]
    sizes = [m.footprint(n, math.prod(shapes[k][1:])) for k in involved]
    device = reps[involved[0]].device
    blocks = _model_blocks(sizes, [0] * len(sizes), 0, _budget(max_memory, device), device, what=m.name, n=n)
    index = {k: i for i, k in enumerate(involved)}
    wanted = [(index[a], index[b]) for a, b in pairs]

    def reduced(name):
        def compute():
            return reduce_one(m, f"features[{name!r}]", reps[name])
        return share(name, ("measure", m.label), compute) if share is not None else compute()

    values = [math.nan] * len(pairs)
    with tqdm(total=len(involved), desc=f"pairwise {m.label}", unit="model", disable=not progress,
              leave=False, mininterval=0, miniters=1) as bar:
        def make(block):
            return {i: reduced(involved[i]) for i in block}

        def visit(p, q, positions, rows, columns):
            order = list(rows) + [i for i in columns if i not in rows]
            matrix = m.matrix([rows.get(i, columns.get(i)) for i in order])
            where = {i: t for t, i in enumerate(order)}
            for position in positions:
                i, j = wanted[position]
                values[position] = float(matrix[where[i], where[j]])

        _sweep(blocks, _block_pairs(blocks, wanted, diagonal=False), make, visit, bar)
    bad = [pairs[t] for t, v in enumerate(values) if not math.isfinite(v)]
    if bad:
        raise FloatingPointError(f"{m.label} gave a non-finite value for pairs {bad[:3]}")
    return values


def _hidden_states(name, value):
    """A model's features as given, or the hidden states of a layer's or
    model's output (a tuple's first element, a Hugging Face output's
    last_hidden_state: first_tensor)."""
    if isinstance(value, torch.Tensor):
        return value
    try:
        return first_tensor(value)
    except TypeError:
        raise TypeError(f"features[{name!r}] must be a tensor (or a model output holding one), got "
                        f"{type(value).__name__}") from None


def _budget(max_memory, device) -> float:
    """max_memory in bytes, by default half the free memory of `device` (none known: no limit)."""
    if max_memory is None:
        free = _checks.free_memory(device)
        return math.inf if free is None else free // 2
    if isinstance(max_memory, bool) or not isinstance(max_memory, (int, float)) or not max_memory > 0:
        raise ValueError(f"max_memory must be a positive number of bytes, got {max_memory!r}")
    return max_memory


def _model_blocks(linear, square, fixed, budget, device, single=None, what="", n=0) -> list[list[int]]:
    """Consecutive blocks of model indices whose cost, sum(linear) +
    sum(square)^2 bytes over the block, lets `fixed` plus two blocks fit in
    `budget`; one block of all (costed with `single` instead of `linear`
    where given) when that fits whole. Raises, before any work, where one
    model alone does not fit, or the plan does not fit the device's free
    memory (a max_memory above it)."""
    single = linear if single is None else single
    advice = f"reduce the probe size (N = {n} samples) or the layers' feature sizes, compare fewer models per call"
    whole = fixed + sum(single) + sum(square) ** 2
    if whole <= budget:
        _checks.memory(whole, device, f"pairwise {what}", advice)
        return [list(range(len(linear)))]
    room = (budget - fixed) / 2
    least = fixed + 2 * max(a + b * b for a, b in zip(linear, square))
    if least > budget:
        raise ValueError(f"pairwise {what} needs at least {_size(least)} for one block of models but max_memory "
                         f"allows {_size(budget)}: {advice}, or raise max_memory")
    blocks, cost, side = [[]], 0, 0
    for i, (a, b) in enumerate(zip(linear, square)):
        if blocks[-1] and cost + a + (side + b) ** 2 > room:
            blocks.append([])
            cost, side = 0, 0
        blocks[-1].append(i)
        cost, side = cost + a, side + b
    _checks.memory(fixed + 2 * room, device, f"pairwise {what}", advice)
    return blocks


def _size(nbytes) -> str:
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{int(nbytes)} bytes"


def _block_pairs(blocks, wanted, diagonal: bool) -> dict:
    """{(p, q) with p <= q: the positions in `wanted` of the index pairs between blocks p and q};
    every (p, p) too when `diagonal` (the CKA's self terms)."""
    owner = {i: p for p, block in enumerate(blocks) for i in block}
    out = {(p, p): [] for p in range(len(blocks))} if diagonal else {}
    for position, (i, j) in enumerate(wanted):
        out.setdefault(tuple(sorted((owner[i], owner[j]))), []).append(position)
    return dict(sorted(out.items()))


def _sweep(blocks, block_pairs: dict, make, visit, bar=None) -> None:
    """visit(p, q, positions, rows, columns) for every block pair, rows =
    make(blocks[p]) once per row block, columns = make(blocks[q]) per pair
    (rows itself when q == p); the columns of a row go from the last block
    down, so its last column is often the next row block and is kept as it:
    at most two blocks alive at once. The bar counts each model once."""
    keys = sorted(block_pairs, key=lambda pq: (pq[0], pq[1] != pq[0], -pq[1]))
    seen, row, kept = set(), None, None

    def made(index):
        if bar is not None:
            bar.update(0 if index in seen else len(blocks[index]))
        seen.add(index)
        return make(blocks[index])

    for t, (p, q) in enumerate(keys):
        if row is None or row[0] != p:
            row = None  # the previous row block goes before the next is made
            row, kept = (p, kept if kept is not None else made(p)), None
        columns = row[1] if q == p else made(q)
        visit(p, q, block_pairs[(p, q)], row[1], columns)
        if q != p and t + 1 < len(keys) and keys[t + 1][0] == q:
            kept = columns
        del columns


def _pairwise_cka(reps, names, kernel, unbiased, bandwidth, gamma, bar, share=None, wanted=None,
                  budget=math.inf) -> torch.Tensor:
    """The (K, K) CKA matrix of K representations (N, C, S) of one probe:
    the HSICs of all pairs from batched products (see pairwise_similarity),
    in blocks of models within `budget` bytes (entries outside `wanted`, when
    blocked, are not computed); NaN, with a warning naming them, for
    constant representations."""
    n, k = reps[0].shape[0], len(reps)
    if unbiased and n < 4:
        raise ValueError(f"the unbiased HSIC needs at least 4 samples, got {n}")
    wanted = [(i, j) for i in range(k) for j in range(k)] if wanted is None else wanted
    dims = [R.shape[1] * R.shape[2] for R in reps]
    # flops: N D_i D_j per pair (one triangle) against N^2 D_i per Gram plus N^2 per entry of the K x K
    cost_features = n * (sum(dims) ** 2 + sum(d * d for d in dims)) / 2
    cost_grams = n * n * (sum(dims) + k * k)  # the pair GEMM computes both triangles
    fixed = 6 * 8 * k * k  # the K x K matrices of the normalisation
    device = reps[0].device
    if kernel in ("linear", "ortho") and cost_features < cost_grams:
        size, wide = reps[0].element_size(), max(dims)
        # per model: its centred columns and their share of one row's product (and its float64 norms)
        linear = [d * (n * size + wide * (size + 8)) for d in dims]
        blocks = _model_blocks(linear, [0] * k, fixed + 16 * k * n + 2 * n * wide * max(size, 8), budget, device,
                               what="cka (centred features)", n=n)
        hsic_matrix = _pairwise_hsic_features(reps, kernel, unbiased, bar, blocks, _block_pairs(blocks, wanted, True))
    else:
        gram = 8 * n * n
        blocks = _model_blocks([gram] * k, [0] * k, fixed + 4 * gram, budget, device,
                               single=[gram * (1 if share is None else 2)] * k, what="cka (Gram matrices)", n=n)
        share = share if len(blocks) == 1 else None  # blocked: the cache would hold every Gram again
        options = (kernel, unbiased, bandwidth, gamma)

        def grams(block):  # (len(block), N N): one float64 copy of each model's U-centred Gram
            stacked = torch.empty((len(block), n * n), dtype=torch.float64, device=device)
            for row, i in enumerate(block):
                def centred(R=reps[i]):  # centred in place in its float64 copy
                    K = torch.empty((n, n), dtype=torch.float64, device=R.device)
                    K.copy_(_gram(R, kernel, bandwidth, gamma))
                    _centre_gram_(K[None], unbiased)
                    return {"gram": K}
                gram_i = (centred() if share is None else share(names[i], options, centred))["gram"]
                stacked[row].view(n, n).copy_(gram_i)
                del gram_i
            return stacked

        hsic_matrix = torch.zeros((k, k), dtype=torch.float64, device=device)

        def visit(p, q, _, rows, columns):  # <vec U(K_i), vec U(K_j)>: one GEMM per block pair
            block = (rows @ columns.T) * _hsic_scale(n, unbiased)
            hsic_matrix[blocks[p][0]:blocks[p][-1] + 1, blocks[q][0]:blocks[q][-1] + 1] = block
            hsic_matrix[blocks[q][0]:blocks[q][-1] + 1, blocks[p][0]:blocks[p][-1] + 1] = block.T

        _sweep(blocks, _block_pairs(blocks, wanted, True), grams, visit, bar)
    constant = torch.tensor([_constant(R) for R in reps], device=hsic_matrix.device)
    hsic_matrix = hsic_matrix.masked_fill(constant[:, None] | constant[None, :], 0.0)
    self_terms = hsic_matrix.diagonal().clone()
    matrix, bad, _ = _cka_from_hsic(hsic_matrix, self_terms, self_terms)
    if bool(bad.any()):
        which = _undefined([f"features[{name!r}]" for name in names], bad, constant)
        warnings.warn(f"CKA is undefined for {', '.join(which)}; their entries are NaN", RuntimeWarning,
                      stacklevel=3)
    return matrix


class _Centred:
    """One block of models' centred features side by side (N, sum D), which
    model owns each column, and each model's float64 squared row norms."""

    def __init__(self, reps, block, kernel):
        n = reps[block[0]].shape[0]
        self.starts = [0]
        for i in block:
            self.starts.append(self.starts[-1] + reps[i].shape[1] * reps[i].shape[2])
        self.stacked = torch.empty((n, self.starts[-1]), dtype=reps[block[0]].dtype,
                                   device=reps[block[0]].device)
        self.norms = []
        for row, i in enumerate(block):
            part = self.stacked[:, self.starts[row]:self.starts[row + 1]]
            self.norms.append(_centred_features(reps[i], kernel, part)[1])
        self.owner = torch.repeat_interleave(torch.arange(len(block), device=self.stacked.device),
                                             torch.diff(torch.tensor(self.starts, device=self.stacked.device)))

    def traces(self, other: "_Centred", same: bool) -> torch.Tensor:
        """(len(self), len(other)) |X_i'X_j|^2: row i from one product X_i' [X_j ...] (the upper
        triangle only when same)."""
        out = torch.zeros((len(self.norms), len(other.norms)), dtype=torch.float64, device=self.stacked.device)
        for i in range(len(self.norms)):
            low = self.starts[i] if same else 0
            F = self.stacked[:, self.starts[i]:self.starts[i + 1]]
            columns = torch.linalg.vector_norm(F.T @ other.stacked[:, low:], dim=0, dtype=torch.float64).square()
            out[i].index_add_(0, other.owner[low:], columns)
        return out.triu() + out.triu(1).T if same else out


def _pairwise_hsic_features(reps, kernel, unbiased, bar, blocks=None, block_pairs=None) -> torch.Tensor:
    """(K, K) linear HSICs from centred features (N, D_i): tr(K~_i K~_j) =
    |X_i'X_j|^2 - k_i.k_j (k the squared row norms, X'1 = 0), the
    |X_i'X_j|^2 of row i from one product X_i' [X_i ... X_K], per block
    pair of `blocks` (default one block; entries of block pairs absent from
    block_pairs are not computed)."""
    n, k = reps[0].shape[0], len(reps)
    blocks = [list(range(k))] if blocks is None else blocks
    block_pairs = {(0, 0): []} if block_pairs is None else block_pairs
    trace = torch.zeros((k, k), dtype=torch.float64, device=reps[0].device)
    rows = torch.empty((k, n), dtype=torch.float64, device=reps[0].device)

    def visit(p, q, _, left, right):
        I, J = blocks[p], blocks[q]
        if p == q:
            rows[I[0]:I[-1] + 1] = torch.stack(left.norms)
        block = left.traces(right, p == q)
        trace[I[0]:I[-1] + 1, J[0]:J[-1] + 1] = block
        trace[J[0]:J[-1] + 1, I[0]:I[-1] + 1] = block.T

    _sweep(blocks, block_pairs, lambda block: _Centred(reps, block, kernel), visit, bar)
    return _feature_hsic(trace, rows, rows, n, unbiased)


def _normalised_positions(name, R, group, centered) -> torch.Tensor:
    """(N S, C) float64 rows = samples x positions, scaled as the Procrustes
    measure needs: unit Frobenius norm (orthogonal) or unit channels (D_X^-1)."""
    F = R.to(torch.float64).transpose(1, 2).reshape(-1, R.shape[1])
    if centered:
        F = F - F.mean(0)
    norms = F.norm(dim=0)
    if group == "orthogonal":
        total = norms.square().sum().sqrt()
        if total == 0:
            raise ValueError(f"{name} is zero (constant, when centred): Procrustes is undefined")
        return F / total
    if bool((norms == 0).any()):
        raise ValueError(f"a channel of {name} is zero (constant, when centred): D_X^-1 of "
                         "definition 5.2 does not exist and the measure is undefined")
    return F / norms


def _pairwise_procrustes(reps, pairs, group, centered, chunk, bar=None, budget=math.inf):
    """Every pair's Procrustes measure (see pairwise_similarity): the models in
    blocks within `budget` bytes, each block pair's X_a'X_b as blocks of one
    Gram of its stacked normalised features where its pairs cover much of it,
    else one product per pair."""
    names = list(reps)
    for a, b in pairs:  # before any work
        if reps[a].shape[2] != reps[b].shape[2]:
            raise ValueError(f"features[{a!r}] and features[{b!r}] differ in positions per sample")
        if group == "grelu" and reps[a].shape[1] != reps[b].shape[1]:
            raise ValueError(f"G_ReLU-Procrustes needs equal channel counts, got {reps[a].shape[1]} for "
                             f"{a!r} and {reps[b].shape[1]} for {b!r}")
    if not names:
        return []
    channels = [reps[m].shape[1] for m in names]
    rows = [reps[m].shape[0] * reps[m].shape[2] for m in names]
    widest, longest = max(channels), max(rows)
    # per model its normalised features (twice: the stacked copy); the chunk's crosses and their SVD / assignment
    blocks = _model_blocks([16 * r * c for r, c in zip(rows, channels)], [4 * c for c in channels],
                           3 * 8 * chunk * widest ** 2 + 2 * 8 * longest * widest, budget, reps[names[0]].device,
                           what=f"procrustes ({group})", n=reps[names[0]].shape[0])
    index = {m: i for i, m in enumerate(names)}
    wanted = [(index[a], index[b]) for a, b in pairs]
    values = [None] * len(pairs)

    def visit(p, q, positions, rows, columns):
        part = [wanted[t] for t in positions]
        for t, value in zip(positions, _procrustes_block(rows, columns, part, group, chunk)):
            values[t] = value

    _sweep(blocks, _block_pairs(blocks, wanted, False),
           lambda block: {i: _normalised_positions(f"features[{names[i]!r}]", reps[names[i]], group, centered)
                          for i in block}, visit, bar)
    return values


def _procrustes_block(rows: dict, columns: dict, part, group, chunk) -> list[float]:
    """The measures of the index pairs `part` between two blocks of models
    (rows, columns: each model's normalised features; the same dict for a
    block with itself), their crosses from one product of the blocks'
    stacked features when the pairs cover much of it (half the pairs or more)."""
    same = rows is columns
    offsets = [{}, {}]
    for side, block in enumerate((rows, columns)):
        total = 0
        for i, F in block.items():
            offsets[side][i] = (total, total + F.shape[1])
            total += F.shape[1]
    gram = None
    if len(rows) * len(columns) <= (4 if same else 2) * len(part):
        left = torch.cat(list(rows.values()), 1)
        right = left if same else torch.cat(list(columns.values()), 1)
        gram = torch.empty((left.shape[1], right.shape[1]), dtype=left.dtype, device=left.device)
        if same:  # its upper half computed, the lower half its transpose
            for start, stop in offsets[0].values():
                gram[start:stop, start:] = left[:, start:stop].T @ left[:, start:]
                gram[stop:, start:stop] = gram[start:stop, stop:].T
        else:
            torch.matmul(left.T, right, out=gram)
        del left, right

    def cross(a, b):
        if gram is None:
            return flat[a].T @ flat[b]
        if a in offsets[0] and b in offsets[1]:
            (i0, i1), (j0, j1) = offsets[0][a], offsets[1][b]
            return gram[i0:i1, j0:j1]
        (i0, i1), (j0, j1) = offsets[0][b], offsets[1][a]
        return gram[i0:i1, j0:j1].T

    flat = {**columns, **rows}
    values = []
    for start in range(0, len(part), chunk):
        piece = part[start:start + chunk]
        shapes = {(flat[a].shape[1], flat[b].shape[1]) for a, b in piece}
        groups = [torch.stack([cross(a, b) for a, b in piece])] if len(shapes) == 1 else \
            [cross(a, b)[None] for a, b in piece]  # mixed channel counts: one problem at a time
        for crosses in groups:
            values.extend(similarity for similarity, _ in _aligned(crosses, group))
    return values
