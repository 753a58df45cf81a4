"""jkfac: K-FAC natural-gradient optimization for JAX, as optax transformations."""

from jkfac.tags import (
    APPROX_DIAGONAL_NAME,
    APPROX_FULL_NAME,
    APPROX_KRONECKER_IN_DIAG_NAME,
    APPROX_KRONECKER_NAME,
    APPROX_KRONECKER_OUT_DIAG_NAME,
    APPROX_KRONECKER_REDUCE_NAME,
    APPROX_KRON_INDEP_NAME,
    register_categorical_predictive_distribution,
    register_conv1d,
    register_conv2d,
    register_conv3d,
    register_dense,
    register_embedding,
    register_embedding_projection,
    register_generic,
    register_multi_bernoulli_predictive_distribution,
    register_normal_predictive_distribution,
    register_scale_and_shift,
    register_sigmoid_cross_entropy,
    register_softmax_cross_entropy,
    register_squared_error,
)
from jkfac.describe import Description, describe
from jkfac.tracer import Curvature, value_and_grad
from jkfac.transform import PreconditionState, kfac, precondition
from jkfac import flax, layer_collection, parallel

__version__ = "0.1.0"

__all__ = [
    "APPROX_DIAGONAL_NAME",
    "APPROX_FULL_NAME",
    "APPROX_KRONECKER_IN_DIAG_NAME",
    "APPROX_KRONECKER_NAME",
    "APPROX_KRONECKER_OUT_DIAG_NAME",
    "APPROX_KRONECKER_REDUCE_NAME",
    "APPROX_KRON_INDEP_NAME",
    "Curvature",
    "Description",
    "PreconditionState",
    "describe",
    "flax",
    "layer_collection",
    "parallel",
    "kfac",
    "precondition",
    "register_categorical_predictive_distribution",
    "register_conv1d",
    "register_conv2d",
    "register_conv3d",
    "register_dense",
    "register_embedding",
    "register_embedding_projection",
    "register_generic",
    "register_multi_bernoulli_predictive_distribution",
    "register_normal_predictive_distribution",
    "register_scale_and_shift",
    "register_sigmoid_cross_entropy",
    "register_softmax_cross_entropy",
    "register_squared_error",
    "value_and_grad",
]
