"""Parameter matrices: a layer's weight and bias as one `(d_in [+1], d_out)` matrix (one per
group of a grouped conv; a transposed dense weight `(out, in)` is transposed first), and
back."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jkfac.layer_info import LayerInfo, matrix_axes

Array = jax.Array


def feature_groups(layer: LayerInfo) -> int:
  """The independent groups of a grouped conv (`feature_group_count`); 1 otherwise."""
  return layer.conv.feature_group_count if layer.conv is not None else 1


def row_axes(layer: LayerInfo) -> int:
  """How many leading weight axes index the rows (`d_in`) of the parameter matrix."""
  if layer.kind == "dense":
    return layer.in_axes
  return len(layer.weight_shape) - (layer.kind != "generic")


def param_matrix(layer: LayerInfo, w: Array, b: Array | None) -> Array:
  """The layer's parameters (or their gradients) as one `(d_in [+1], d_out)` matrix.

  A generic parameter is a column: `(size, 1)`. A grouped conv gives one matrix per
  group, `(groups, d_in [+1], d_out / groups)`.
  """
  w = jnp.transpose(w, matrix_axes(w.ndim)) if layer.transposed else w
  rows = math.prod(w.shape[:row_axes(layer)])
  m = w.reshape(rows, -1)
  groups = feature_groups(layer)
  if groups > 1:
    m = m.reshape(rows, groups, -1).swapaxes(0, 1)
  if b is None:
    return m
  return jnp.concatenate([m, b.reshape(m.shape[:-2] + (1, m.shape[-1]))], axis=-2)


def split_param_matrix(layer: LayerInfo, m: Array) -> tuple[Array, Array | None]:
  """Inverse of `param_matrix`."""
  w, b = (m[..., :-1, :], m[..., -1, :]) if layer.bias is not None else (m, None)
  if feature_groups(layer) > 1:
    w = w.swapaxes(0, 1)
  bias_shape = layer.weight_shape[row_axes(layer):]
  w = w.reshape(layer.weight_shape)
  if layer.transposed:
    axes = matrix_axes(w.ndim)
    w = jnp.transpose(w, sorted(range(w.ndim), key=axes.__getitem__))
  return w, None if b is None else b.reshape(bias_shape)


def matrix_shape(layer: LayerInfo) -> tuple[int, int]:
  """`(d_in [+1], d_out)` of the layer's parameter matrix (of one group, if grouped)."""
  k = row_axes(layer)
  d_in, d_out = math.prod(layer.weight_shape[:k]), math.prod(layer.weight_shape[k:])
  return d_in + (layer.bias is not None), d_out // feature_groups(layer)
