"""`jkfac.curvature`: K-FAC curvature beyond training, for any model jkfac can trace.

`fit` averages a trained model's block-diagonal curvature exactly over a dataset;
`jkfac.curvature.algebra` multiplies, inverts, samples and takes determinants of it;
`laplace` builds a Laplace posterior on it (marginal likelihood, prior precision,
predictive); `influence` scores training examples against queries with it.
See docs/curvature.md.
"""

from jkfac.curvature.fitting import APPROXIMATIONS, FittedCurvature, fit, num_parameters
from jkfac.curvature.algebra import (eigenvalues, inverse_vector_product, logdet, restrict,
                                     sample, spectral_map, vector_product)
from jkfac.curvature.laplace import (log_marginal_likelihood, optimize_prior_precision,
                                     predictive, predictive_samples)
from jkfac.curvature.influence import default_damping, influence, per_example_gradients

__all__ = [
    "APPROXIMATIONS",
    "FittedCurvature",
    "default_damping",
    "eigenvalues",
    "fit",
    "influence",
    "inverse_vector_product",
    "log_marginal_likelihood",
    "logdet",
    "num_parameters",
    "optimize_prior_precision",
    "per_example_gradients",
    "predictive",
    "predictive_samples",
    "restrict",
    "sample",
    "spectral_map",
    "vector_product",
]
