"""The curvature's own scale, from which adaptive K-FAC calibrates its damping.

The damping λ is added to the curvature, so a good λ is relative to it: a loss summed
over 784 pixels has a Fisher 784 times that of the mean, and a fixed λ that suits one
is wrong for the other. `curvature_scale` is the mean eigenvalue of the K-FAC
curvature, `tr F̂ / dim F̂`: for a Kronecker block `tr(A ⊗ G) / (d_A d_G)` is the product
of the factors' mean diagonals.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jkfac import blocks, layers
from jkfac.layer_info import LayerInfo, Trace

Array = jax.Array


def _mean_diagonal(factor: Array, entrywise: bool) -> Array:
  """The mean diagonal entry of a factor (of every slice, for stacked factors)."""
  if entrywise:
    return jnp.mean(factor)
  return jnp.mean(jnp.diagonal(factor, axis1=-2, axis2=-1))


def layer_scale(layer: LayerInfo, statistics: dict[str, Array]) -> Array | None:
  """The mean eigenvalue of one layer's block from its bias-corrected statistics; None
  for a block inverted as a whole (`Block.joint`), whose factors are not exposed."""
  layer_block = blocks.for_layer(layer)
  if layer_block.joint is not None:
    return None
  factors = layer_block.factors(statistics, jnp.ones([], jnp.float32))
  scale = jnp.ones([], jnp.float32)
  for factor, _ in factors.values():
    scale = scale * _mean_diagonal(factor, layer_block.is_entrywise(factor)).astype(jnp.float32)
  return scale


def curvature_scale(trace: Trace, statistics: dict[str, dict[str, Array]],
                    ema_weight: Array) -> Array:
  """`tr F̂ / dim F̂` over all layers (each weighted by its parameter count), from the raw
  EMAs and their accumulated weight; 0 before any statistics."""
  total, count = jnp.zeros([], jnp.float32), 0
  for layer in trace.every_layer:
    corrected = jax.tree_util.tree_map(lambda s: s / jnp.maximum(ema_weight, 1e-30),
                                       statistics[layer.name])
    scale = layer_scale(layer, corrected)
    if scale is None:
      continue
    size = math.prod(layers.matrix_shape(layer)) * layers.feature_groups(layer) * math.prod(
        layer.stack or (1,))
    total, count = total + size * scale, count + size
  return total / max(count, 1)
