"""Blocks of a scale-and-shift layer `y = x_hat * scale + shift` (the affine part of a norm).

The layer acts channel by channel, so there is nothing to factor: each example's
gradient is cheap to form exactly, `sum_t x_hat_t * g_t` for the scale and `sum_t g_t`
for the shift (sums over positions), as the rows of the layer's `(2, d)` matrix view
(`(1, d)` without shift; see `jkfac/layers/`). "diagonal" keeps their squares,
"full" their `(2d)^2` outer products, both summed over estimator columns and examples:
the output gradients carry the 1/batch scale (`jkfac/losses.py`), so the sums are the
means of the diagonal and full blocks.
"""

from __future__ import annotations

import jax.numpy as jnp

from jkfac.blocks import diagonal, full
from jkfac.blocks.base import Arrays, Array, Block
from jkfac.layers import LayerInputs


def per_example_gradients(a: LayerInputs, g: Array) -> Array:
  """`(columns, batch, 1 [+1], d)`: each example's gradient of scale [and shift].

  `a` holds `x_hat` as its one group `(batch, positions, d)`, with `bias` set if the
  layer has a shift; `g` is `(columns, batch, positions, d)`.
  """
  x_hat = a.groups[0]
  scale = jnp.einsum("ntd,kntd->knd", x_hat, g)
  return jnp.stack([scale, g.sum(axis=2)] if a.bias else [scale], axis=2)


def diagonal_statistics(a: LayerInputs, g: Array) -> Arrays:
  return {"diagonal": jnp.sum(per_example_gradients(a, g) ** 2, axis=(0, 1))}


def full_statistics(a: LayerInputs, g: Array) -> Arrays:
  v = per_example_gradients(a, g)
  v = v.reshape(-1, v.shape[-2] * v.shape[-1])
  return {"F": v.T @ v}


DIAGONAL = Block(diagonal.zeros, diagonal_statistics, diagonal.factors, diagonal.precondition,
                 entrywise=True)
FULL = Block(full.zeros, full_statistics, full.factors, full.precondition)
