"""Input views: a layer's input vectors `a` (dense inputs, conv patches) as column groups
with their covariance, embedding id counts, and output gradients as rows."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jkfac.layer_info import LayerInfo
from jkfac.layers.matrices import feature_groups, row_axes
from jkfac.layers.patches import (
  conv_kernel_size,
  patch_slices,
  sampled_patches,
  stack_features,
)
from jkfac.tags import CONV_KINDS

Array = jax.Array


def _append_ones(a: Array) -> Array:
  return jnp.concatenate([a, jnp.ones(a.shape[:-1] + (1,), a.dtype)], axis=-1)


class LayerInputs(NamedTuple):
  """A layer's input vectors `a`, kept as column groups: `a = [*groups, 1 if bias]`.

  Conv patches come as one column group per index of the first kernel axis (a 1-D
  conv: per kernel offset), so `covariance` multiplies each pair of groups once and
  uses the symmetry for the rest (about 60% of the products for a 5x5 kernel), and
  adds the bias row from column sums instead of a column of ones. (Column groups are
  not a grouped conv's feature groups: those are a leading axis of every array.)

  `row_weights` `(batch, positions)`, if set, make `covariance` the weighted mean
  `sum_r w_r a_r a_r^T / sum_r w_r`: with a loss mask, padded rows count for nothing.
  `rows` ignores them (the output gradients of masked rows are zero already).
  """
  groups: list[Array]   # each (batch, positions, d_i)
  bias: bool
  row_weights: Array | None = None

  def rows(self) -> Array:
    """`a` itself: `(batch, positions, d_in [+1])`."""
    a = self.groups[0] if len(self.groups) == 1 else jnp.concatenate(self.groups, axis=-1)
    return _append_ones(a) if self.bias else a

  def _weights(self, dtype) -> tuple[Array | None, Array | int]:
    """The flat row weights (None: all 1) and their sum (the rows' count)."""
    if self.row_weights is None:
      return None, math.prod(self.groups[0].shape[:-1])
    w = self.row_weights.reshape(-1).astype(dtype)
    return w, total_weight(w)

  def covariance(self) -> Array:
    """The mean of `a a^T` over examples and positions (weighted by `row_weights`)."""
    flat = [x.reshape(-1, x.shape[-1]) for x in self.groups]
    w, count = self._weights(flat[0].dtype)
    weighted = flat if w is None else [w[:, None] * x for x in flat]
    products = {(i, j): weighted[i].T @ flat[j] for i in range(len(flat))
                for j in range(i, len(flat))}
    a = jnp.concatenate([jnp.concatenate([products[i, j] if i <= j else products[j, i].T
                                          for j in range(len(flat))], axis=1)
                         for i in range(len(flat))], axis=0)
    if self.bias:
      sums = jnp.concatenate([x.sum(axis=0) for x in weighted])
      a = jnp.block([[a, sums[:, None]], [sums[None, :], jnp.full((1, 1), count, a.dtype)]])
    return a / count

  def covariance_diagonal(self) -> Array:
    """The diagonal of `covariance`, without the products."""
    a = self.rows()
    a = a.reshape(-1, a.shape[-1])
    w, count = self._weights(a.dtype)
    return (a ** 2 if w is None else w[:, None] * a ** 2).sum(axis=0) / count


def total_weight(weights: Array) -> Array:
  """The sum of `weights`, or 1 where it is 0 (all rows masked: zero statistics)."""
  total = jnp.sum(weights)
  return jnp.where(total > 0, total, jnp.ones_like(total))


def covariance_diagonal(a: LayerInputs | Array) -> Array:
  """The mean of `a ** 2` over examples and positions, from `LayerInputs` or as given."""
  return (a if isinstance(a, LayerInputs) else LayerInputs([a], bias=False)
          ).covariance_diagonal()


def layer_inputs(layer: LayerInfo, x: Array, reduce: bool = False,
                 sample: Array | None = None) -> LayerInputs:
  """The input vectors `a` of every position, as `LayerInputs` of `(batch, positions, d)`.

  With `reduce`, their mean over positions instead: one position (K-FAC-reduce),
  computed without building every patch. With `sample` (indices into the
  `batch * positions` rows, see `sample_rows`), only those conv patches, as
  `(len(sample), 1, d)`: the others are never built. A grouped conv's arrays gain a
  leading group axis, each group's patches over its own input channels.
  """
  groups = feature_groups(layer)
  if groups == 1:
    return LayerInputs(_input_parts(layer, x, reduce, sample), layer.bias is not None)
  x = jnp.moveaxis(x.reshape(*x.shape[:-1], groups, -1), -2, 0)
  parts = jax.vmap(lambda x: _input_parts(layer, x, reduce, sample))(x)
  return LayerInputs(parts, layer.bias is not None)


def _input_parts(layer: LayerInfo, x: Array, reduce: bool, sample: Array | None) -> list[Array]:
  """`LayerInputs.groups` of one layer (one group of a grouped conv)."""
  if layer.kind not in CONV_KINDS:
    x = x.reshape(x.shape[0], -1, math.prod(x.shape[x.ndim - layer.in_axes:]))
    return [x.mean(axis=1, keepdims=True) if reduce else x]
  kernel_size = conv_kernel_size(layer)
  if sample is not None:
    patches = sampled_patches(x, kernel_size, layer.conv, sample)  # (rows, *kernel, c_in)
    return [p.reshape(p.shape[0], 1, -1) for p in jnp.moveaxis(patches, 1, 0)]
  slices = patch_slices(x, kernel_size, layer.conv)
  if reduce:
    slices = [s.mean(axis=tuple(range(1, s.ndim - 1)), keepdims=True) for s in slices]
  per_row = len(slices) // kernel_size[0]   # one group per index of the first kernel axis
  parts = [stack_features(slices[i:i + per_row]) for i in range(0, len(slices), per_row)]
  return [p.reshape(p.shape[0], -1, p.shape[-1]) for p in parts]


def embedding_counts(layer: LayerInfo, ids: Array, weights: Array | None = None) -> Array:
  """The diagonal of the mean one-hot outer product of `ids`: `(vocab,)` id frequencies.

  Negative ids wrap as in `jnp.take`; out-of-range ids count nowhere (their lookup
  gives the table no gradient). With `weights` (one per id), the weighted mean.
  """
  vocab = layer.weight_shape[0]
  if weights is None:
    return jnp.zeros(vocab).at[ids.ravel()].add(1.0, mode="drop") / ids.size
  w = weights.ravel()
  return jnp.zeros(vocab, w.dtype).at[ids.ravel()].add(w, mode="drop") / total_weight(w)


def output_rows(output_grads: Array, reduce: bool = False,
                layer: LayerInfo | None = None) -> Array:
  """Output gradients as `(columns, batch, positions, d_out)`; with `reduce`, their sum
  over positions, `(columns, batch, 1, d_out)`.

  With `layer`, its output features (all trailing weight axes of a `DenseGeneral`) form
  `d_out`, and a grouped conv's rows gain a leading group axis, `d_out` per group.
  """
  g = output_grads
  d_out = g.shape[-1] if layer is None else math.prod(layer.weight_shape[row_axes(layer):])
  g = g.reshape(g.shape[0], g.shape[1], -1, d_out)
  g = g.sum(axis=2, keepdims=True) if reduce else g
  groups = 1 if layer is None else feature_groups(layer)
  return g if groups == 1 else jnp.moveaxis(g.reshape(*g.shape[:-1], groups, -1), -2, 0)
