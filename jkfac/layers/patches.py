"""Conv patches: the input pixels each kernel offset meets at every output pixel, all of
them or a random sample of rows, without a patch-extraction conv."""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp

from jkfac.layer_info import LayerInfo
from jkfac.layers.matrices import matrix_shape
from jkfac.sampling import random_subset
from jkfac.tags import ConvParams

Array = jax.Array


def conv_kernel_size(layer: LayerInfo) -> tuple[int, ...]:
  """The spatial kernel size of a conv layer: `(k_w,)`, `(k_h, k_w)` or `(k_d, k_h, k_w)`."""
  return tuple(layer.weight_shape[:-2])


# `sub_sample_patches="auto"` (`jkfac.kfac`'s default): tensorflow/kfac's
# `max_num_patches_per_dimension`, on the layers whose input factor costs at least this
# many times their own product per row (d_in² against d_in·d_out), where sampling saves
# time. A narrow-input layer (a first conv over pixels) keeps every row: sampling it saved
# nothing and made batch-16 runs worse (docs/benchmarks.md).
AUTO_PATCH_ROWS_PER_DIMENSION = 3.0
AUTO_MIN_INPUT_RATIO = 4


def sample_rows(layer: LayerInfo, per_dimension: float | str, key: Array) -> Array | None:
  """Random patch rows for a conv's input factor: at most `int(per_dimension * d_in)`,
  or for "auto" `AUTO_PATCH_ROWS_PER_DIMENSION * d_in` where `d_in` is at least
  `AUTO_MIN_INPUT_RATIO * d_out`.

  Indices into the `batch * positions` rows, uniform without replacement (`d_in` and
  `d_out` those of one group, bias aside); None where that keeps every row.
  """
  rows, d_out = matrix_shape(layer)
  d_in = rows - (layer.bias is not None)
  if per_dimension == "auto":
    if d_in < AUTO_MIN_INPUT_RATIO * d_out:
      return None
    per_dimension = AUTO_PATCH_ROWS_PER_DIMENSION
  total = math.prod(layer.output_shape[:-1])
  count = max(1, int(per_dimension * d_in))
  if count >= total:
    return None
  return random_subset(key, total, count)


def _padded(x: Array, conv: ConvParams) -> Array:
  """`x` with the conv's padding and input dilation applied."""
  pads = [(lo, hi, d - 1) for (lo, hi), d in zip(conv.padding, conv.lhs_dilation)]
  return jax.lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0), *pads, (0, 0, 0)])


def _output_size(x: Array, kernel_size: tuple[int, ...], conv: ConvParams) -> list[int]:
  """The output's spatial size, from the padded input `x`."""
  return [(size - (k - 1) * d - 1) // s + 1 for size, k, d, s in
          zip(x.shape[1:-1], kernel_size, conv.rhs_dilation, conv.window_strides)]


def patch_slices(x: Array, kernel_size: tuple[int, ...], conv: ConvParams) -> list[Array]:
  """For each kernel offset (row-major), the input pixels it meets at every output pixel."""
  x = _padded(x, conv)
  out, strides = _output_size(x, kernel_size, conv), conv.window_strides
  slices = []
  for offset in itertools.product(*map(range, kernel_size)):
    start = [o * d for o, d in zip(offset, conv.rhs_dilation)]
    limit = [b + (n - 1) * s + 1 for b, n, s in zip(start, out, strides)]
    slices.append(jax.lax.slice(x, (0, *start, 0), (x.shape[0], *limit, x.shape[-1]),
                                (1, *strides, 1)))
  return slices


def sampled_patches(x: Array, kernel_size: tuple[int, ...], conv: ConvParams,
                     sample: Array) -> Array:
  """The patches of the `sample` rows (flat `(example, output pixel)` indices):
  `(rows, *kernel_size, c_in)`, gathered without building the others."""
  x = _padded(x, conv)
  out = _output_size(x, kernel_size, conv)
  example, *pixel = jnp.unravel_index(sample, (x.shape[0], *out))
  index = [example.reshape((-1,) + (1,) * len(kernel_size))]
  for axis, (p, k, s, d) in enumerate(zip(pixel, kernel_size, conv.window_strides,
                                          conv.rhs_dilation)):
    shape = [1] * len(kernel_size)
    shape[axis] = k
    index.append(p.reshape((-1,) + (1,) * len(kernel_size)) * s
                 + (jnp.arange(k) * d).reshape(shape))
  return x[tuple(index)]


def stack_features(slices: list[Array]) -> Array:
  patches = jnp.stack(slices, axis=-2)  # (batch, *out, offsets, c_in)
  return patches.reshape(*patches.shape[:-2], -1)
