"""Max pooling differentiated with strided slices: fast derivatives on XLA:CPU.

JAX differentiates `lax.reduce_window_max` in forward mode through a reduce-window over
(value, tangent) pairs, and in reverse mode through `select_and_scatter`, which XLA:CPU
expands into a reduce-window that tracks argmax indices, then a scatter. Both are slow
there: the poolings' JVPs in K-FAC's quadratic model took about 10 ms of the seed
convnet's 124 ms step (batch 128), the pooling itself 3 ms.

`max_pool` computes the same value with the same primitive. Its tangent takes, in each
window, the tangent of the first maximal entry (the one JAX's rule takes), from the
window's `K` entries seen as `K` strided slices of the padded input: a JVP, and a
transpose of it, made of slices, pads, comparisons and selects. Pools of integers, with
dilations, negative padding or windows of more than `MAX_WINDOW` entries bind the
primitive as it is.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array

# Larger windows keep JAX's rule: the tangent unrolls a slice and a select per entry.
MAX_WINDOW = 16


def supported(params: dict[str, Any]) -> bool:
  """Whether `max_pool` differentiates a `reduce_window_max` with `params` itself."""
  return (all(d == 1 for d in (*params["base_dilation"], *params["window_dilation"]))
          and all(low >= 0 and high >= 0 for low, high in params["padding"])
          and math.prod(params["window_dimensions"]) <= MAX_WINDOW)


def _entries(x: Array, params: dict[str, Any], fill: float, out_shape: tuple[int, ...]
             ) -> list[Array]:
  """Every window entry of `x` padded with `fill`, as one `out_shape` array per position
  in the window (row-major)."""
  padded = jax.lax.pad(x, jnp.asarray(fill, x.dtype),
                       [(low, high, 0) for low, high in params["padding"]])
  window, strides = params["window_dimensions"], params["window_strides"]
  return [jax.lax.slice(padded, offset,
                        [o + (n - 1) * s + 1 for o, n, s in zip(offset, out_shape, strides)],
                        strides)
          for offset in itertools.product(*(range(w) for w in window))]


def _first_max(x: Array, y: Array, params: dict[str, Any]) -> list[Array]:
  """One mask per window entry: where that entry is its window's first maximum."""
  seen = jnp.zeros(y.shape, bool)
  picks = []
  for entry in _entries(x, params, -jnp.inf, y.shape):
    is_max = entry == y
    picks.append(is_max & ~seen)
    seen = seen | is_max
  return picks


def max_pool(operand: Array, **params: Any) -> Array:
  """`lax.reduce_window_max_p.bind(operand, **params)`, differentiated as the module
  says."""
  bind = jax.lax.reduce_window_max_p.bind
  if not supported(params) or not jnp.issubdtype(operand.dtype, jnp.floating):
    return bind(operand, **params)

  @jax.custom_jvp
  def pool(x):
    return bind(x, **params)

  @pool.defjvp
  def pool_jvp(primals, tangents):
    (x,), (x_dot,) = primals, tangents
    y = bind(x, **params)
    picks = jax.lax.stop_gradient(_first_max(x, y, params))
    entries = _entries(x_dot, params, 0.0, y.shape)
    zero = jnp.zeros(y.shape, x_dot.dtype)
    return y, sum(jnp.where(pick, entry, zero) for pick, entry in zip(picks, entries))

  return pool(operand)
