"""Rank diminishing (seed 003), one module per concern:

matrix          numerical rank (section 3.1, equation 4), stable rank, singular values
jacobian        partial rank of the Jacobian (section 3.2, Algorithm A1, appendix D)
pca             PCA dimension (section 4.3), perturbed PCA dimension (appendix E, Algorithm A2)
classification  classification dimension (section 3.3, Algorithm A3), Fig. 2's curves
independence    independence deficit (section 5, Algorithm A4)
experiments     structural impetus (section 4.3, Fig. 3), MLP-50 under Theorem 5 (Fig. 1 d-f)
_common         the private helpers they share

Every public name is importable from spectral_ext.rank itself."""
from ._common import FLOAT32_EPS, OUTPUT, _rank_of_singular_values  # noqa: F401  (spectra.py uses the latter)
from .classification import ClassificationDimension, classification_dimension, projection_accuracy
from .experiments import default_components, mlp_rank_decay, structural_impetus, theorem5_slopes
from .independence import IndependenceDeficit, independence_deficit, lasso_kkt_violation
from .jacobian import JacobianPartialRank, jacobian_partial_rank
from .matrix import numerical_rank, rank_of_singular_values, singular_values_of_rows, stable_rank
from .pca import PerturbedPCADimension, pca_dimension, pca_eigenvalues, perturbed_pca_dimension

__all__ = ["FLOAT32_EPS", "OUTPUT", "ClassificationDimension", "IndependenceDeficit", "JacobianPartialRank",
           "PerturbedPCADimension", "classification_dimension",
           "default_components", "independence_deficit", "jacobian_partial_rank", "lasso_kkt_violation",
           "mlp_rank_decay", "numerical_rank", "pca_dimension", "pca_eigenvalues", "perturbed_pca_dimension",
           "projection_accuracy", "rank_of_singular_values", "singular_values_of_rows", "stable_rank",
           "structural_impetus", "theorem5_slopes"]
