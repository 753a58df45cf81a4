"""Hyperparameters that are numbers, arrays or schedules of the step count."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

Array = jax.Array
ScalarOrSchedule = float | Array | Callable[[Array], Array]


def value(hyperparameter: ScalarOrSchedule, count: Array) -> Array:
  """The hyperparameter's value at step `count`."""
  return jnp.asarray(hyperparameter(count) if callable(hyperparameter) else hyperparameter)
