"""What every part of a zoo run shares: its error type, the names of its
tables, metrics and pair measures, and the argument checks."""
from __future__ import annotations

import collections.abc
import dataclasses

import pandas as pd

TABLES = ("models", "layers", "edges", "pairs")
METRICS = ("rank", "alpha", "svr")
WEIGHT_METRICS = ("rank", "alpha")  # from the weights alone; svr and the pair measures run the models
# The pair measures: "stitching" and every similarity measure, by its spec ("cka", "cka:kernel=max",
# "procrustes:group=grelu", "svcca:variance=0.95"; similarity.measure.parse_spec).
PAIR_MEASURES = "stitching or a similarity measure (spectral_ext.similarity.MEASURES: name or 'name:option=value')"


class ZooError(ValueError):
    """Bad zoo input: a missing path, an unknown architecture, no members.
    argument: the analyze argument at fault, when one is (the command line
    names its option)."""

    def __init__(self, message: str = "", argument: str | None = None):
        super().__init__(message)
        self.argument = argument


def _check_int(name: str, value, minimum: int, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ZooError(f"{name} must be an integer >= {minimum}{' or None' if allow_none else ''}, got {value!r}")
    return value


def pair_measures(specs) -> tuple[str, ...]:
    """The pair measures as their canonical labels ("cka:kernel=linear" ->
    "cka"), each checked: "stitching" or a similarity measure's spec."""
    from ..similarity.measure import parse_spec

    labels = []
    for spec in specs:
        if spec == "stitching":
            labels.append(spec)
            continue
        try:
            labels.append(parse_spec(spec).label)
        except (ValueError, TypeError) as error:
            raise ZooError(f"pairs: {error}", argument="pairs") from None
    return tuple(dict.fromkeys(labels))


MIN_PROBE = 4  # CKA of fewer points is degenerate (2 centred points always score 1); stitching halves the probe


def _empty() -> pd.DataFrame:
    return pd.DataFrame()


@dataclasses.dataclass(eq=False)  # DataFrames have no single truth value
class ZooTables(collections.abc.Mapping):
    """The tables of a zoo run (zoo.analyze, zoo.model_metrics,
    zoo.weight_model_metrics): models (one row per member: architecture,
    n_layers, error, alpha_hat, n_alpha_layers), layers (member x linear map,
    or member x weight tensor without an architecture, with its source
    file:tensor and a note: seed 001 and 003 metrics), edges (member x SVR
    edge, seed 000) and pairs (model_a, model_b, layer, measure, value).
    Also a read-only mapping {table name: DataFrame}, as earlier versions
    returned."""

    models: pd.DataFrame = dataclasses.field(default_factory=_empty)
    layers: pd.DataFrame = dataclasses.field(default_factory=_empty)
    edges: pd.DataFrame = dataclasses.field(default_factory=_empty)
    pairs: pd.DataFrame = dataclasses.field(default_factory=_empty)

    def __getitem__(self, table: str) -> pd.DataFrame:
        if table not in TABLES:
            raise KeyError(table)
        return getattr(self, table)

    def __iter__(self):
        return iter(TABLES)

    def __len__(self) -> int:
        return len(TABLES)

    def to_frame(self, table: str = "layers") -> pd.DataFrame:
        """One table as a tidy DataFrame (default the per-layer one)."""
        if table not in TABLES:
            raise ValueError(f"table must be one of {TABLES}, got {table!r}")
        return getattr(self, table)

    def plot(self, column: str = "alpha", ax=None):
        """The distribution of a per-layer metric across the zoo, a histogram
        per layer (plot.zoo_histograms)."""
        from .. import plot

        if column not in self.layers:
            raise ValueError(f"column must be a column of the layers table {list(self.layers.columns)}, got "
                             f"{column!r}")
        return plot.zoo_histograms(self.layers, column, ax=ax)
