"""The interface of a curvature block."""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax

Array = jax.Array
Arrays = dict[str, Array]


class Block(NamedTuple):
  """The pure functions of one approximation; the transform holds their arrays.

  zeros:        `(d_in, d_out) -> covariances` of zeros, the EMA's start.
  statistics:   `(a, g) -> covariances` of one batch.
  inverses:     `(covariances, damping, method) -> inverses` (damped).
  precondition: `(inverses, gradient matrix) -> preconditioned matrix`.
  """
  zeros: Callable[[int, int], Arrays]
  statistics: Callable[[Array, Array], Arrays]
  inverses: Callable[[Arrays, Array, str], Arrays]
  precondition: Callable[[Arrays, Array], Array]


def per_example_gradients(a: Array, g: Array) -> Array:
  """`sum_t a_t g_t^T` per column and example: `(columns, batch, d_in, d_out)`."""
  return jax.numpy.einsum("nta,kntg->knag", a, g)
