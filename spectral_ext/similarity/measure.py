"""The Measure protocol: every representational similarity (or distance) is
three steps, in the pattern of netrep's partial_fit / finalize (Williams et
al. 2021, docs/references.md [netrep]):

1. ``reduce(X)``: per representation, once, a reduction that every pair it
   takes part in reuses (a centred Gram, centred features, a whitened basis,
   a k-NN graph, an RDM);
2. ``pair(a, b)``: per pair, the cross term of two reductions and its finish
   (a float);
3. ``matrix(reduced)``: the K x K of K reductions; the default calls ``pair``
   on every unordered pair, measures override it with batched products.

A measure is a small object holding its options (``MEASURES[name](**options)``
or ``get_measure(name, **options)``); ``compare(X, Y, measure)`` runs one pair and
``measure_matrix(reps, measure)`` the K x K of a dict or list of
representations. Representations are (N, ...) tensors or arrays of the same N
inputs, flattened per input to (N, D) (a conv feature map (N, C, H, W) gives
D = C*H*W; pool or select tokens first for another convention) and computed
in float64. Inputs are checked once, here, at the edge; the measures' own
code assumes (N, D) float64 finite matrices.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

from .. import _checks

#: name -> Measure subclass; filled by register() in the measure modules.
MEASURES: dict[str, type["Measure"]] = {}


def register(cls: type["Measure"]) -> type["Measure"]:
    """Class decorator: make a measure reachable by its name (one name everywhere: API, zoo, CLI)."""
    if cls.name in MEASURES and MEASURES[cls.name] is not cls:
        raise RuntimeError(f"two measures named {cls.name!r}")
    MEASURES[cls.name] = cls
    return cls


class Measure:
    """One measure of the similarity (``kind = "similarity"``, larger = more
    alike) or distance (``kind = "distance"``, 0 = alike) of two
    representations of the same N inputs.

    Class attributes, shown in the README's table: name, kind, invariances
    (the transformations of one representation that leave the value
    unchanged), reference (a key of docs/references.md), cost (of one pair,
    for N inputs of D features).

    Subclasses set ``min_samples`` (the smallest N the measure is defined
    for) and ``symmetric`` (whether pair(a, b) == pair(b, a)) and implement
    reduce and pair; override matrix to batch the pairs.
    """

    name: str = ""
    kind: str = "similarity"
    invariances: str = ""
    reference: str = ""
    cost: str = ""
    min_samples: int = 2
    symmetric: bool = True

    def reduce(self, X: torch.Tensor) -> Any:
        """The per-representation reduction of X, (N, D) float64."""
        raise NotImplementedError

    def pair(self, a: Any, b: Any) -> float:
        """The measure of two reduced representations."""
        raise NotImplementedError

    def matrix(self, reduced: list) -> torch.Tensor:
        """The K x K float64 matrix of every ordered pair of K reductions,
        entry [i, j] = pair(reduced[i], reduced[j]) (the diagonal: each with
        itself); symmetric unless the measure is not (``symmetric = False``:
        PWCCA's weights and linear regression's predictor come from row i)."""
        k = len(reduced)
        out = torch.empty(k, k, dtype=torch.float64)
        for i in range(k):
            for j in range(i if self.symmetric else 0, k):
                out[i, j] = self.pair(reduced[i], reduced[j])
                if self.symmetric:
                    out[j, i] = out[i, j]
        return out

    def footprint(self, n: int, d: int) -> int:
        """Bytes one reduction of an (N, D) representation keeps (the memory
        planner of pairwise_similarity); measures whose reduction is N x N
        (RDMs, similarity matrices) override it."""
        return 8 * n * d

    def options(self) -> dict:
        """The options this instance was built with (for tables and cache keys)."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    @property
    def label(self) -> str:
        """The measure as a spec string, ``name`` or ``name:option=value:...``
        with the options that differ from their defaults (the zoo's --pairs
        and the `measure` column of pair tables; parse_spec reads it back)."""
        import inspect

        defaults = {k: p.default for k, p in inspect.signature(type(self).__init__).parameters.items()
                    if p.default is not inspect.Parameter.empty}
        changed = [f"{k}={v}" for k, v in self.options().items() if k in defaults and defaults[k] != v]
        return ":".join([self.name, *changed])

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({args})"

    def __call__(self, X, Y) -> float:
        """compare(X, Y, self)."""
        return compare(X, Y, self)


def get_measure(name_or_measure: str | Measure, **options) -> Measure:
    """The Measure named ``name_or_measure``, built with ``options``.

    Args:
        name_or_measure: a name of MEASURES (any other name raises ValueError), or a Measure, returned
            as given.
        **options: the measure's options; must be empty with a Measure (TypeError), and options the
            measure does not take raise TypeError naming it.

    Returns:
        A Measure.
    """
    if isinstance(name_or_measure, Measure):
        if options:
            raise TypeError(f"options {sorted(options)} given with a Measure object: build it with them instead")
        return name_or_measure
    _load_measures()
    if not isinstance(name_or_measure, str) or name_or_measure not in MEASURES:
        raise ValueError(f"measure must be one of {sorted(MEASURES)} or a Measure, got {name_or_measure!r}")
    try:
        return MEASURES[name_or_measure](**options)
    except TypeError as error:
        raise TypeError(f"measure {name_or_measure!r}: {error}") from None


def parse_spec(spec: str) -> Measure:
    """The Measure of a spec string ``name`` or ``name:option=value:...``
    (values read as Python literals where they parse, else as strings):
    "cka:kernel=max", "svcca:variance=0.95", "mutual_knn:k=5"."""
    import ast

    if isinstance(spec, Measure):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a measure spec must be a string 'name' or 'name:option=value', got {spec!r}")
    name, *parts = spec.strip().split(":")
    options = {}
    for part in parts:
        key, eq, text = part.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"measure spec {spec!r}: {part!r} is not option=value")
        try:
            options[key.strip()] = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            options[key.strip()] = text.strip()
    return get_measure(name, **options)


def engine_options(m: Measure) -> dict | None:
    """The arguments of the batched CKA / Procrustes engines (pairwise_similarity,
    similarity_matrix) when they compute measure m exactly as it is defined;
    None for any other measure or option (repsim's RBF variants, the "lange"
    estimator, the midpoint median: those run through m.matrix)."""
    if m.name == "procrustes":
        return {"measure": "procrustes", "group": m.group, "centered": m.centered}
    if m.name == "cka" and m._core_route:
        return {"measure": "cka", "kernel": m.kernel, "unbiased": m._estimator == "song",
                "bandwidth": m.bandwidth, "gamma": m.gamma}
    return None


def engine_label(measure: str, kernel: str = "linear", unbiased: bool = True, bandwidth: float = 0.5,
                 gamma: float | None = None, group: str = "orthogonal", centered: bool = False) -> str:
    """The label of what the batched CKA ("cka") or Procrustes
    ("procrustes") engine computes with these options: the label of the
    Measure it equals ("cka", "cka:kernel=max", "procrustes:group=grelu")."""
    if measure == "cka":
        return get_measure("cka", kernel=kernel, unbiased=bool(unbiased), bandwidth=bandwidth, gamma=gamma).label
    return get_measure("procrustes", group=group, centered=bool(centered)).label


def _load_measures() -> None:
    """Import the modules that register measures (lazily: importing the
    package should not import scipy.stats and friends)."""
    from . import baselines, cca, kernels, neighbours, rsa, shape  # noqa: F401  (each registers its measures)


def representation(name: str, X, min_samples: int = 2) -> torch.Tensor:
    """X as the (N, D) float64 CPU matrix the measures take, checked: a
    tensor or array of at least two axes (N, ...) flattened per input, real,
    finite, N >= min_samples, D >= 1. ``name`` names the argument in errors."""
    if isinstance(X, np.ndarray):
        X = torch.from_numpy(np.ascontiguousarray(X))
    if not isinstance(X, torch.Tensor):
        raise TypeError(f"{name} must be a tensor or array of shape (N, ...), got {type(X).__name__}")
    if _checks.data_free(X):
        raise ValueError(f"{name} is a meta tensor (shape only): the measures need values")
    if X.dim() < 2:
        raise ValueError(f"{name} must have shape (N, D) or (N, ...), got shape {tuple(X.shape)}")
    if X.is_complex() or not (X.is_floating_point() or X.dtype in (torch.int8, torch.int16, torch.int32,
                                                                    torch.int64, torch.uint8)):
        raise TypeError(f"{name} must be real numbers, got {X.dtype}")
    X = X.detach().reshape(X.shape[0], -1).to("cpu", torch.float64)
    if X.shape[0] < min_samples:
        raise ValueError(f"{name} has {X.shape[0]} inputs; this measure needs N >= {min_samples}")
    if X.shape[1] == 0:
        raise ValueError(f"{name} has no features (shape {tuple(X.shape)})")
    # one sum first: finite unless a value is NaN/inf or the sum overflows (then the full check decides)
    if not torch.isfinite(X.sum()) and not torch.isfinite(X).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    return X


def reduced(m: Measure, name: str, X, checked: bool = False):
    """m's reduction of representation X, checked at the edge (representation;
    checked=True: X already is one) and with any ValueError from the measure
    naming the representation."""
    if not checked:
        X = representation(name, X, m.min_samples)
    try:
        return m.reduce(X)
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from None


def compare(X, Y, measure: str | Measure = "cka", **options) -> float:
    """The measure of two representations X and Y of the same N inputs.

    Args:
        X: (N, ...) tensor or array, flattened per input.
        Y: (N, ...) tensor or array of the same N inputs.
        measure: a name of MEASURES (built with ``options``) or a Measure (default "cka").
        **options: the measure's options, when measure is a name.

    Returns:
        The measure's value, a float.
    """
    m = get_measure(measure, **options)
    X, Y = representation("X", X, m.min_samples), representation("Y", Y, m.min_samples)
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"X and Y must hold the same inputs: N = {X.shape[0]} and {Y.shape[0]}")
    return float(m.pair(reduced(m, "X", X, checked=True), reduced(m, "Y", Y, checked=True)))


def _named(reps) -> dict:
    if isinstance(reps, dict):
        if not reps:
            raise ValueError("reps must not be empty")
        return reps
    if isinstance(reps, (list, tuple)):
        if not reps:
            raise ValueError("reps must not be empty")
        return dict(enumerate(reps))
    raise TypeError(f"reps must be a dict {{name: (N, ...) tensor}} or a list of them, got {type(reps).__name__}")


def reduce_all(reps, m: Measure, progress: bool = False, share: Callable | None = None) -> dict:
    """Each representation of ``reps`` (dict or list) checked and reduced once
    by measure m: {name: reduction}. share(name, compute) -> reduction may
    keep reductions across calls (the zoo's cache)."""
    from tqdm.auto import tqdm

    reps = _named(reps)
    sizes = set()
    out = {}
    for name in tqdm(reps, desc=f"reduce {m.name}", unit="rep", disable=not progress, leave=False):
        def compute(name=name):
            return reduced(m, f"reps[{name!r}]", reps[name])
        X = reps[name]
        sizes.add(int(X.shape[0]) if hasattr(X, "shape") and len(X.shape) else -1)
        out[name] = share(name, compute) if share is not None else compute()
    if len(sizes) > 1:
        raise ValueError(f"every representation must hold the same N inputs, got N in {sorted(sizes)}")
    return out


@dataclass(frozen=True, eq=False)  # tensors have no single truth value
class MeasureMatrix:
    """Result of measure_matrix: one measure over every ordered pair of K
    representations.

    measure: the measure's label (a spec string: "cka", "svcca:variance=0.95");
    kind: "similarity" (larger = more alike) or "distance" (0 = alike);
    names: the representations' names, in order; values: the (K, K) float64
    matrix, [i, j] the measure of names[i] against names[j]."""

    measure: str
    kind: str
    names: tuple
    values: torch.Tensor = field(repr=False)

    @property
    def matrix(self) -> pd.DataFrame:
        """The square DataFrame, indexed and labelled by the names."""
        names = list(self.names)
        return pd.DataFrame(self.values.numpy(), index=names, columns=names)

    def to_frame(self) -> pd.DataFrame:
        """Tidy rows, one per ordered pair (the diagonal included): rep_a,
        rep_b, measure, value (a pair table, README "Conventions")."""
        k = len(self.names)
        return pd.DataFrame({"rep_a": [a for a in self.names for _ in range(k)],
                             "rep_b": [b for _ in range(k) for b in self.names],
                             "measure": [self.measure] * (k * k), "value": self.values.reshape(-1).tolist()})

    def plot(self, ax=None, title: str | None = None, annotate: bool | None = None):
        """The matrix as a heatmap (plot.similarity_heatmap)."""
        from ..plot import similarity_heatmap

        return similarity_heatmap(self, ax=ax, title=title, annotate=annotate)


def measure_matrix(reps, measure: str | Measure = "cka", progress: bool = False, **options) -> MeasureMatrix:
    """The K x K matrix of one measure over K representations of the same N inputs.

    Each representation is reduced once and the pairs batched where the measure can. A non-finite value
    raises FloatingPointError.

    Args:
        reps: {name: (N, ...)} or a list (named 0..K-1).
        measure: a name of MEASURES (built with ``options``) or a Measure (default "cka").
        progress: a progress bar over the reductions (default False).
        **options: the measure's options, when measure is a name.

    Returns:
        A MeasureMatrix; .matrix is the square DataFrame indexed and labelled by the names, .to_frame()
        its tidy rows rep_a, rep_b, measure, value.
    """
    m = get_measure(measure, **options)
    reduced = reduce_all(reps, m, progress)
    values = m.matrix(list(reduced.values()))
    if not torch.isfinite(values).all():
        raise FloatingPointError(f"{m.name} gave a non-finite value; check the representations")
    return MeasureMatrix(m.label, m.kind, tuple(reduced), values)


def table() -> pd.DataFrame:
    """The registered measures (the README's table).

    Args:
        None.

    Returns:
        A DataFrame with columns name, kind, invariances, reference, cost, one row per measure, sorted by
        name.
    """
    _load_measures()
    rows = [{"name": c.name, "kind": c.kind, "invariances": c.invariances, "reference": c.reference,
             "cost": c.cost} for c in MEASURES.values()]
    columns = ["name", "kind", "invariances", "reference", "cost"]
    return pd.DataFrame(rows, columns=columns).sort_values("name").reset_index(drop=True)


def check_positive(name: str, value, integer: bool = False):
    """value, checked > 0 (an int when integer), naming the option."""
    if integer:
        return _checks.positive_int(name, value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def check_choice(name: str, value, choices) -> str:
    """value, checked to be one of choices, naming the option."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value
