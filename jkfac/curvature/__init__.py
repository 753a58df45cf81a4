"""`jkfac.curvature`: K-FAC curvature beyond training, for any model jkfac can trace.

`fit` averages a trained model's block-diagonal curvature exactly over a dataset;
`jkfac.curvature.algebra` multiplies, inverts, samples and takes determinants of it;
`laplace` builds a Laplace posterior on it (marginal likelihood, prior precision,
predictive); `influence` scores training examples against queries with it.
See docs/curvature.md.
"""

from jkfac.curvature.fitting import APPROXIMATIONS, FittedCurvature, fit, num_parameters
from jkfac.curvature.algebra import (eigenvalues, inverse_vector_product, logdet, sample,
                                     spectral_map, vector_product)

__all__ = [
    "APPROXIMATIONS",
    "FittedCurvature",
    "eigenvalues",
    "fit",
    "inverse_vector_product",
    "logdet",
    "num_parameters",
    "sample",
    "spectral_map",
    "vector_product",
]
