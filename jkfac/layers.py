"""Layer kinds as matrices: the view every curvature block works in.

A dense or conv layer computes, at each of its `T` positions (one for a plain dense
layer, the output pixels for a conv), `y_t = W^T a_t` with `a_t` the input (or input
patch) with a trailing 1 for the bias and `W` a `(d_in [+1], d_out)` matrix. The
functions here map a layer's inputs, output gradients and parameters to that view
and back, so blocks need not know the layer kind.

An embedding `y_t = table[id_t]` is the same with `a_t` the one-hot vector of `id_t`
and `W` the `(vocab, d)` table; its inputs are never built as one-hot vectors, only
counted (`embedding_counts`), since their covariance is diagonal.

A scale-and-shift layer `y_t = x_hat_t * scale + shift` acts channel by channel: its
matrix is `(2, d)`, a scale row and a shift row (`(1, d)` without shift), and its inputs
are the `x_hat` rows `(batch, positions, d)`, which its blocks
(`jkfac/blocks/scale_and_shift.py`) multiply with the output gradients entrywise.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jkfac.tags import ConvParams
from jkfac.tracer import LayerInfo

Array = jax.Array

def _append_ones(a: Array) -> Array:
  return jnp.concatenate([a, jnp.ones(a.shape[:-1] + (1,), a.dtype)], axis=-1)


class LayerInputs(NamedTuple):
  """A layer's input vectors `a`, kept as column groups: `a = [*groups, 1 if bias]`.

  Conv patches come as one group per kernel row, so `covariance` multiplies each pair
  of groups once and uses the symmetry for the rest (about 60% of the products for a
  5x5 kernel), and adds the bias row from column sums instead of a column of ones.
  """
  groups: list[Array]   # each (batch, positions, d_i)
  bias: bool

  def rows(self) -> Array:
    """`a` itself: `(batch, positions, d_in [+1])`."""
    a = self.groups[0] if len(self.groups) == 1 else jnp.concatenate(self.groups, axis=-1)
    return _append_ones(a) if self.bias else a

  def covariance(self) -> Array:
    """The mean of `a a^T` over examples and positions."""
    flat = [x.reshape(-1, x.shape[-1]) for x in self.groups]
    count = flat[0].shape[0]
    products = {(i, j): flat[i].T @ flat[j] for i in range(len(flat)) for j in range(i, len(flat))}
    a = jnp.concatenate([jnp.concatenate([products[i, j] if i <= j else products[j, i].T
                                          for j in range(len(flat))], axis=1)
                         for i in range(len(flat))], axis=0)
    if self.bias:
      sums = jnp.concatenate([x.sum(axis=0) for x in flat])
      a = jnp.block([[a, sums[:, None]], [sums[None, :], jnp.full((1, 1), count, a.dtype)]])
    return a / count


def layer_inputs(layer: LayerInfo, x: Array, reduce: bool = False) -> LayerInputs:
  """The input vectors `a` of every position, as `LayerInputs` of `(batch, positions, d)`.

  With `reduce`, their mean over positions instead: one position (K-FAC-reduce),
  computed without building every patch.
  """
  if layer.kind in ("conv1d", "conv2d"):
    if layer.kind == "conv1d":  # a 2-D conv of height 1
      x = x[:, None]
    slices = _patch_slices(x, conv_kernel_size(layer), layer.conv)
    if reduce:
      slices = [s.mean(axis=(1, 2), keepdims=True) for s in slices]
    width = conv_kernel_size(layer)[1]
    groups = [_stack_features(slices[row:row + width]) for row in range(0, len(slices), width)]
  else:
    groups = [x.mean(axis=tuple(range(1, x.ndim - 1)), keepdims=True) if reduce else x]
  return LayerInputs([g.reshape(g.shape[0], -1, g.shape[-1]) for g in groups],
                     layer.bias is not None)


def conv_kernel_size(layer: LayerInfo) -> tuple[int, int]:
  """`(k_h, k_w)` of a conv layer; a 1-D conv has height 1."""
  return (1, layer.weight_shape[0]) if layer.kind == "conv1d" else layer.weight_shape[:2]


def embedding_counts(layer: LayerInfo, ids: Array) -> Array:
  """The diagonal of the mean one-hot outer product of `ids`: `(vocab,)` id frequencies.

  Negative ids wrap as in `jnp.take`; out-of-range ids count nowhere (their lookup
  gives the table no gradient).
  """
  vocab = layer.weight_shape[0]
  return jnp.zeros(vocab).at[ids.ravel()].add(1.0, mode="drop") / ids.size


def input_rows(layer: LayerInfo, x: Array, reduce: bool = False) -> Array:
  """The vectors `a` of every position, `(batch, positions, d_in [+1])`."""
  return layer_inputs(layer, x, reduce).rows()


def _patch_slices(x: Array, kernel_size: tuple[int, ...], conv: ConvParams) -> list[Array]:
  """For each kernel offset, the input pixels it meets at every output pixel."""
  (pad_h, pad_w), (dil_h, dil_w) = conv.padding, conv.lhs_dilation
  x = jax.lax.pad(x, jnp.zeros((), x.dtype),
                  ((0, 0, 0), (*pad_h, dil_h - 1), (*pad_w, dil_w - 1), (0, 0, 0)))
  strides, rhs_dilation = conv.window_strides, conv.rhs_dilation
  out = [(size - (k - 1) * d - 1) // s + 1
         for size, k, d, s in zip(x.shape[1:3], kernel_size, rhs_dilation, strides)]
  slices = []
  for i in range(kernel_size[0]):
    for j in range(kernel_size[1]):
      start = (0, i * rhs_dilation[0], j * rhs_dilation[1], 0)
      limit = (x.shape[0], start[1] + (out[0] - 1) * strides[0] + 1,
               start[2] + (out[1] - 1) * strides[1] + 1, x.shape[3])
      slices.append(jax.lax.slice(x, start, limit, (1, *strides, 1)))
  return slices


def _stack_features(slices: list[Array]) -> Array:
  patches = jnp.stack(slices, axis=3)  # (batch, h_out, w_out, k_h * k_w, c_in)
  return patches.reshape(*patches.shape[:3], -1)


def conv_patches(x: Array, kernel_size: tuple[int, ...], conv: ConvParams) -> Array:
  """The input patch of every output pixel, `(batch, h_out, w_out, k_h * k_w * c_in)`.

  Features are ordered as in an HWIO kernel reshaped to `(-1, c_out)`. Built from
  strided slices of the padded input: `lax.conv_general_dilated_patches` does the
  same with a convolution by an identity kernel, which costs a matrix product.
  """
  return _stack_features(_patch_slices(x, kernel_size, conv))


def output_rows(output_grads: Array, reduce: bool = False) -> Array:
  """Output gradients as `(columns, batch, positions, d_out)`; with `reduce`, their sum
  over positions, `(columns, batch, 1, d_out)`."""
  g = output_grads
  g = g.reshape(g.shape[0], g.shape[1], -1, g.shape[-1])
  return g.sum(axis=2, keepdims=True) if reduce else g


def param_matrix(layer: LayerInfo, w: Array, b: Array | None) -> Array:
  """The layer's parameters (or their gradients) as one `(d_in [+1], d_out)` matrix.

  A generic parameter is a column: `(size, 1)`.
  """
  m = w.reshape(-1, 1) if layer.kind == "generic" else w.reshape(-1, w.shape[-1])
  return m if b is None else jnp.concatenate([m, b[None, :]], axis=0)


def split_param_matrix(layer: LayerInfo, m: Array) -> tuple[Array, Array | None]:
  """Inverse of `param_matrix`."""
  w, b = (m[:-1], m[-1]) if layer.bias is not None else (m, None)
  return w.reshape(layer.weight_shape), b


def matrix_shape(layer: LayerInfo) -> tuple[int, int]:
  """`(d_in [+1], d_out)` of the layer's parameter matrix."""
  size = math.prod(layer.weight_shape)
  if layer.kind == "generic":
    return size, 1
  d_out = layer.weight_shape[-1]
  return size // d_out + (layer.bias is not None), d_out

