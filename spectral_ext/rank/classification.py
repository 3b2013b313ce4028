"""Classification dimension (seed 003 section 3.3, equation 6, Algorithm
A3) and the accuracy-against-projection curves of Fig. 2."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import pandas as pd
import torch

from .. import _checks
from .._data import accuracy
from ._common import _features_labels


@dataclass
class ClassificationDimension:
    """Result of classification_dimension (seed 003 section 3.3): the
    dimension k, its accuracy, the full-feature accuracy, the target (ratio
    x full accuracy) and every accuracy evaluated (columns k, fraction,
    accuracy)."""
    dimension: int
    accuracy: float
    full_accuracy: float
    target: float
    evaluations: pd.DataFrame = field(repr=False)

    def to_frame(self) -> pd.DataFrame:
        """Every accuracy evaluated, one row per k (columns k, fraction,
        accuracy), with is_dimension marking the row of the result's k."""
        frame = self.evaluations.copy()
        frame["is_dimension"] = frame["k"] == self.dimension
        return frame

    def plot(self, ax=None):
        """Seed 003 Fig. 2 (plot.classification_dimension)."""
        from ..plot import classification_dimension as figure

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
            self.cache[k] = _classifier_accuracy(self.classifier, projected.to(self.dtype), self.labels)
        return self.cache[k]


def _classifier_accuracy(classifier, features, labels) -> float:
    """_data.accuracy of the classifier on all features in one call (so a
    classifier sees the same batch as it would on its own)."""
    return accuracy(classifier, (features, labels), batch_size=features.shape[0], name="features",
                    model_name="classifier")


def classification_dimension(classifier, data, ratio: float = 0.95, center: bool = False) -> ClassificationDimension:
    """ClsDim (seed 003 section 3.3, equation 6, Algorithm A3): the smallest k keeping ratio x the full accuracy.

    k is the smallest such that projecting the final features onto the top-k eigenvectors of their covariance keeps
    ratio x the full accuracy (95% in section 4.3). It is found by bisection (O(log d) evaluations, accuracy being
    monotone in k in practice), then verified: a coarse geometric sweep below k looks for a smaller k that also reaches
    the target, and if one does (accuracy not monotone) the search goes on below it, with a warning.

    Args:
        classifier: a callable (the final nn.Linear, say) from (N, d) features to logits; an nn.Module runs in eval
            mode and is given back as it came.
        data: the final features (N, d) with their labels (N,), as a pair of tensors or any form _data.batches takes.
        ratio: the fraction of the full accuracy to keep, in (0, 1] (default 0.95).
        center: False (default) projects onto the linear span of the eigenvectors as equation 6 says; True projects
            the centred features and adds the mean back.

    Returns:
        A ClassificationDimension (.to_frame(): every k evaluated; .plot(): Fig. 2).
    """
    features, labels = _features_labels(data, "data features")
    ratio = _checks.number("ratio", ratio, low=0, high=1, low_open=True)
    if not isinstance(center, bool):
        raise TypeError(f"center must be True or False, got {type(center).__name__} {center!r}")
    projector = _Projector(features, labels, classifier, center)
    d = features.shape[1]
    full = _classifier_accuracy(classifier, features, labels)
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


def projection_accuracy(classifier, data, ks, center: bool = False) -> pd.DataFrame:
    """Accuracy after projecting onto the top-k eigenvectors, for each k in ks (seed 003 section 3.3, equation 6).

    These are the curves of Fig. 2.

    Args:
        classifier: as in classification_dimension.
        data: as in classification_dimension.
        ks: the k to evaluate, each in [1, d].
        center: as in classification_dimension (default False).

    Returns:
        A DataFrame with columns k, fraction, accuracy.
    """
    features, labels = _features_labels(data, "data features")
    projector = _Projector(features, labels, classifier, center)
    d = features.shape[1]
    ks = _checks.integers("ks", ks, low=1, high=d)
    return pd.DataFrame({"k": ks, "fraction": [k / d for k in ks], "accuracy": [projector.accuracy(k) for k in ks]})
