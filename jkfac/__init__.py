"""jkfac: K-FAC natural-gradient optimization for JAX, as optax transformations."""

import importlib

from jkfac.tags import (
    register_conv1d,
    register_conv2d,
    register_conv3d,
    register_dense,
    register_embedding,
    register_embedding_projection,
    register_generic,
    register_scale_and_shift,
    register_sigmoid_cross_entropy,
    register_softmax_cross_entropy,
    register_squared_error,
)
from jkfac.description import Description, describe
from jkfac.interpreter import Linearization, value_and_grad
from jkfac.loss_check import LossScaleWarning, check_loss_scale
from jkfac.config import MIN_DAMPING, PreconditionConfig
from jkfac.factor_sizes import LargeFactorWarning
from jkfac.layer_table import GenericBlockWarning
from jkfac.state import PreconditionState
from jkfac.preconditioner import precondition
from jkfac.alias import eigen_adam, kfac
from jkfac.eigenbasis import EigenAdamState, scale_by_eigen_adam
from jkfac.adaptive import AdaptiveState, diagnostics, preconditioner_state
from jkfac import layer_collection, parallel

__version__ = "0.1.0"

# Imported on first use: jkfac.flax imports flax; jkfac.curvature is not needed to train.
_LAZY_MODULES = ("flax", "checkpoint", "curvature")


def __getattr__(name: str):
  if name in _LAZY_MODULES:
    return importlib.import_module(f"jkfac.{name}")
  raise AttributeError(f"module 'jkfac' has no attribute {name!r}")


__all__ = [
    "AdaptiveState",
    "EigenAdamState",
    "LargeFactorWarning",
    "GenericBlockWarning",
    "PreconditionConfig",
    "MIN_DAMPING",
    "Linearization",
    "Description",
    "LossScaleWarning",
    "PreconditionState",
    "check_loss_scale",
    "curvature",
    "describe",
    "diagnostics",
    "eigen_adam",
    "flax",
    "layer_collection",
    "parallel",
    "kfac",
    "precondition",
    "scale_by_eigen_adam",
    "preconditioner_state",
    "register_conv1d",
    "register_conv2d",
    "register_conv3d",
    "register_dense",
    "register_embedding",
    "register_embedding_projection",
    "register_generic",
    "register_scale_and_shift",
    "register_sigmoid_cross_entropy",
    "register_softmax_cross_entropy",
    "register_squared_error",
    "value_and_grad",
]
