"""tensorflow/kfac's registration names (its `LayerCollection`), functional.

For porting TF code: `from jkfac import layer_collection` and call the functions
inside the loss function. Each tags the outputs and returns them; use the returned
array downstream. `params` is the kernel or a `(kernel, bias)` pair.
`define_linked_parameters(params, approximation=...)` becomes the transform's
`approximations={"<layer name pattern>": ...}` argument.
"""

from __future__ import annotations

from typing import Sequence

import jax

from jkfac import tags

# tensorflow/kfac's loss names.
register_categorical_predictive_distribution = tags.register_softmax_cross_entropy
register_multi_bernoulli_predictive_distribution = tags.register_sigmoid_cross_entropy
register_normal_predictive_distribution = tags.register_squared_error

# Approximation names, spelled as in tensorflow/kfac (see `jkfac.blocks.REGISTRY`).
APPROX_KRONECKER_NAME = "kron"
APPROX_DIAGONAL_NAME = "diagonal"
APPROX_FULL_NAME = "full"
APPROX_KRONECKER_REDUCE_NAME = "kron_reduce"
APPROX_KRONECKER_IN_DIAG_NAME = "kron_in_diag"
APPROX_KRONECKER_OUT_DIAG_NAME = "kron_out_diag"
# A layer applied several times per example (shared weights, a scan over time): the
# Kronecker block with the uses taken as independent (Martens, Ba & Johnson 2018).
APPROX_KRON_INDEP_NAME = "kron_indep"

Array = jax.Array
Params = Array | tuple[Array, Array] | tuple[Array]


def _kernel_and_bias(params: Params) -> tuple[Array, Array | None]:
  if isinstance(params, (tuple, list)):
    if len(params) not in (1, 2):
      raise ValueError(f"params must be a kernel or (kernel, bias); got {len(params)} arrays.")
    return params[0], (params[1] if len(params) == 2 else None)
  return params, None


def register_fully_connected(params: Params, inputs: Array, outputs: Array,
                             approx: str | None = None, in_axes: int = 1) -> Array:
  """Tags `outputs = inputs @ kernel (+ bias)`; returns `outputs`.

  `in_axes` > 1: a `DenseGeneral` kernel whose leading `in_axes` axes contract the
  trailing axes of `inputs` (see `jkfac.register_dense`).
  """
  kernel, bias = _kernel_and_bias(params)
  return tags.register_dense(outputs, inputs, kernel, bias, approximation=approx, in_axes=in_axes)


def _register_conv(register, rank: int, params: Params, strides: Sequence[int],
                   padding: str | Sequence, inputs: Array, outputs: Array, approx: str | None,
                   dilations: Sequence[int] | None, feature_group_count: int) -> Array:
  kernel, bias = _kernel_and_bias(params)
  spatial = lambda v: tuple(v[1:rank + 1]) if len(v) == rank + 2 else tuple(v)
  return register(outputs, inputs, kernel, bias, window_strides=spatial(strides),
                  padding=padding, rhs_dilation=spatial(dilations or (1,) * rank),
                  feature_group_count=feature_group_count, approximation=approx)


def register_conv2d(params: Params, strides: Sequence[int], padding: str | Sequence,
                    inputs: Array, outputs: Array, approx: str | None = None,
                    dilations: Sequence[int] | None = None,
                    feature_group_count: int = 1) -> Array:
  """Tags an NHWC conv with HWIO kernel; `strides`/`dilations` as in TF (4 or 2 entries).

  `feature_group_count` as in `lax.conv_general_dilated`: a grouped or depthwise conv,
  kernel `(k_h, k_w, c_in / groups, c_out)`.
  """
  return _register_conv(tags.register_conv2d, 2, params, strides, padding, inputs, outputs,
                        approx, dilations, feature_group_count)


def register_conv1d(params: Params, strides: Sequence[int], padding: str | Sequence,
                    inputs: Array, outputs: Array, approx: str | None = None,
                    dilations: Sequence[int] | None = None,
                    feature_group_count: int = 1) -> Array:
  """Tags an NWC conv with WIO kernel; `strides`/`dilations` as in TF (3 or 1 entries)."""
  return _register_conv(tags.register_conv1d, 1, params, strides, padding, inputs, outputs,
                        approx, dilations, feature_group_count)


def register_conv3d(params: Params, strides: Sequence[int], padding: str | Sequence,
                    inputs: Array, outputs: Array, approx: str | None = None,
                    dilations: Sequence[int] | None = None,
                    feature_group_count: int = 1) -> Array:
  """Tags an NDHWC conv with DHWIO kernel; `strides`/`dilations` as in TF (5 or 3 entries)."""
  return _register_conv(tags.register_conv3d, 3, params, strides, padding, inputs, outputs,
                        approx, dilations, feature_group_count)


def register_embedding(params: Array | tuple[Array], ids: Array, outputs: Array,
                       approx: str | None = None) -> Array:
  """Tags `outputs = table[ids]` for a `(vocab, d)` table; returns `outputs`."""
  table, bias = _kernel_and_bias(params)
  if bias is not None:
    raise ValueError("register_embedding: an embedding has no bias; pass the table alone.")
  return tags.register_embedding(outputs, ids, table, approximation=approx)


def register_scale_and_shift(params: Params, inputs: Array, outputs: Array,
                             approx: str | None = None) -> Array:
  """Tags `outputs = inputs * scale (+ shift)` over the last axis; returns `outputs`.

  `params` is the scale or a `(scale, shift)` pair; `inputs` is the normalised input.
  """
  scale, shift = _kernel_and_bias(params)
  return tags.register_scale_and_shift(outputs, inputs, scale, shift, approximation=approx)


def register_generic(params: Array | Sequence[Array],
                     approx: str | None = None) -> Array | Sequence[Array]:
  """Marks each parameter in `params` as generic (a diagonal block of its own) and returns
  them unchanged, in the same structure: use the returned arrays. tensorflow/kfac's
  `batch_size`
  is not needed; only the "diagonal" approximation exists (None means it)."""
  approx = approx or APPROX_DIAGONAL_NAME
  if isinstance(params, (tuple, list)):
    return type(params)(tags.register_generic(p, approximation=approx) for p in params)
  return tags.register_generic(params, approximation=approx)


__all__ = [
    "APPROX_DIAGONAL_NAME",
    "APPROX_FULL_NAME",
    "APPROX_KRONECKER_IN_DIAG_NAME",
    "APPROX_KRONECKER_NAME",
    "APPROX_KRONECKER_OUT_DIAG_NAME",
    "APPROX_KRONECKER_REDUCE_NAME",
    "APPROX_KRON_INDEP_NAME",
    "register_categorical_predictive_distribution",
    "register_conv1d",
    "register_conv2d",
    "register_conv3d",
    "register_embedding",
    "register_fully_connected",
    "register_generic",
    "register_multi_bernoulli_predictive_distribution",
    "register_normal_predictive_distribution",
    "register_scale_and_shift",
]
