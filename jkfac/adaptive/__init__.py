"""Adaptive K-FAC: quadratic-model step size and momentum, LM damping, norm constraint.

`adaptive(config, preconditioner)` wraps `jkfac.precondition` into a whole optimizer
(what `jkfac.kfac` returns). docs/concepts.md has the maths.
"""

from jkfac.adaptive.config import (DEFAULT_ADAPTIVE_DAMPING, MOMENTUM_TYPES, QMODEL_TYPES,
                                   AdaptiveConfig)
from jkfac.adaptive.ggn import Problem, curvature_products, ggn_gram, model
from jkfac.adaptive.qmodel import adapted_damping, solve_quadratic_model
from jkfac.adaptive.state import (DIAGNOSTICS, AdaptiveState, Diagnostics, diagnostics,
                                  preconditioner_state)
from jkfac.adaptive.step import adaptive
from jkfac.adaptive.vectors import l2_mask

__all__ = ["AdaptiveConfig", "AdaptiveState", "DEFAULT_ADAPTIVE_DAMPING", "DIAGNOSTICS",
           "Diagnostics", "MOMENTUM_TYPES", "Problem", "QMODEL_TYPES", "adapted_damping",
           "adaptive", "curvature_products", "diagnostics", "ggn_gram", "l2_mask", "model",
           "preconditioner_state", "solve_quadratic_model"]
