"""Tag primitives that mark layers and losses in a jaxpr.

A tag is an identity on its first operand: it costs nothing at run time but stays
visible as an equation in `jax.make_jaxpr`, together with the arrays K-FAC needs
(a layer's inputs and parameters, a loss's targets). The layer table finds the
tags and the interpreter reads those operands.

Two primitives serve every layer and loss kind; what is tagged is said by the
`kind` parameter, plus hashable metadata (`approx`, conv settings, loss weight). A
loss's mask and per-row weights are operands: they are traced values.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from jkfac import approximations

Array = jax.Array

CONV_KINDS = ("conv1d", "conv2d", "conv3d")
# "embedding_projection" tags the output projection `x @ table.T` of an embedding table; the
# layer table makes the table's lookups and projections one "tied_embedding" layer.
LAYER_KINDS = ("dense", *CONV_KINDS, "embedding", "embedding_projection", "scale_and_shift")
# Tag kinds that may share one weight (a tied embedding table): they make one layer.
TIED_EMBEDDING_ROLES = frozenset({"embedding", "embedding_projection"})


def _make_tag(name: str) -> Primitive:
  """An identity primitive on operand 0 that survives `jit`, `grad`, `vmap`."""
  prim = Primitive(name)
  prim.def_impl(lambda out, *rest, **params: out)
  prim.def_abstract_eval(lambda out, *rest, **params: out)

  def jvp(primals, tangents, **params):
    # The output already depends on the other operands, so its tangent is the
    # tangent of operand 0; the tag stays out of the tangent computation.
    return prim.bind(*primals, **params), tangents[0]

  def batch(args, dims, **params):
    # Unmapped operands (dim None) are broadcast, so every operand gains axis 0.
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    args = [jnp.broadcast_to(a, (size,) + a.shape) if d is None else jnp.moveaxis(a, d, 0)
            for a, d in zip(args, dims)]
    return prim.bind(*args, **params), 0

  ad.primitive_jvps[prim] = jvp
  batching.primitive_batchers[prim] = batch
  mlir.register_lowering(
      prim, mlir.lower_fun(lambda out, *rest, **params: [out], multiple_results=True))
  return prim


layer_tag_p = _make_tag("kfac_layer_tag")
loss_tag_p = _make_tag("kfac_loss_tag")


def register_dense(y: Array, x: Array, w: Array, b: Array | None = None, *,
                   approximation: str | None = None, in_axes: int = 1) -> Array:
  """Tags `y = x @ w + b` as a dense layer and returns `y` unchanged.

  `x` has shape `(batch, ..., d_in)`, `w` `(d_in, d_out)`, `b` `(d_out,)`. Use the
  returned array downstream: K-FAC measures gradients at the tag's output.

  `in_axes` > 1 (or an N-D `w`) tags a `DenseGeneral`-like layer that contracts the
  trailing `in_axes` axes of `x` with the leading `in_axes` axes of `w`: `x`
  `(batch, ..., *w.shape[:in_axes])`, `y` `(batch, ..., *w.shape[in_axes:])`, `b` of
  shape `w.shape[in_axes:]`. K-FAC treats it as a dense layer with
  `d_in = prod(w.shape[:in_axes])` and `d_out = prod(w.shape[in_axes:])`.

  Examples:
    >>> y = jkfac.register_dense(x @ w + b, x, w, b)
  """
  approximations.check(approximation)
  if not isinstance(in_axes, int) or isinstance(in_axes, bool) or in_axes < 1:
    raise ValueError(f"register_dense: in_axes must be an integer >= 1, got {in_axes!r}.")
  k, features = in_axes, tuple(w.shape[in_axes:])
  if (w.ndim <= k or x.ndim < k or tuple(x.shape[x.ndim - k:]) != tuple(w.shape[:k])
      or y.ndim < len(features) or tuple(y.shape[y.ndim - len(features):]) != features
      or tuple(y.shape[:y.ndim - len(features)]) != tuple(x.shape[:x.ndim - k])):
    raise ValueError(f"register_dense: shapes do not match y = x @ w with {in_axes} contracted "
                     f"axes: x {x.shape}, w {w.shape}, y {y.shape}.")
  if b is not None and tuple(b.shape) != features:
    raise ValueError(f"register_dense: bias shape {b.shape} does not match w {w.shape} "
                     f"(expected {features}).")
  operands = (y, x, w) if b is None else (y, x, w, b)
  return layer_tag_p.bind(*operands, kind="dense", approx=approximation, has_bias=b is not None,
                          conv=None, in_axes=in_axes)


_CONV_LAYOUTS = {1: ("NWC", "WIO"), 2: ("NHWC", "HWIO"), 3: ("NDHWC", "DHWIO")}


def _register_conv(rank: int, y: Array, x: Array, w: Array, b: Array | None, window_strides,
                   padding, lhs_dilation, rhs_dilation, feature_group_count: int,
                   approximation: str | None) -> Array:
  """Checks and tags a channels-last convolution of `rank` spatial dimensions."""
  approximations.check(approximation)
  name, layout = f"register_conv{rank}d", _CONV_LAYOUTS[rank]
  groups = feature_group_count
  if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
    raise ValueError(f"{name}: feature_group_count must be an integer >= 1, got {groups!r}.")
  if (x.ndim != rank + 2 or w.ndim != rank + 2 or x.shape[-1] != w.shape[-2] * groups
      or y.shape[-1] != w.shape[-1] or w.shape[-1] % groups):
    grouped = f" with {groups} feature groups" if groups > 1 else ""
    raise ValueError(f"{name}: expected {layout[0]} input and {layout[1]} kernel{grouped}, got "
                     f"x {x.shape}, w {w.shape}, y {y.shape}.")
  if b is not None and b.shape != (w.shape[-1],):
    raise ValueError(f"{name}: bias shape {b.shape} does not match w {w.shape}.")
  settings = (window_strides, lhs_dilation, rhs_dilation)
  if any(len(v) != rank for v in settings) or (not isinstance(padding, str)
                                               and len(padding) != rank):
    raise ValueError(f"{name}: window_strides, padding, lhs_dilation and rhs_dilation need "
                     f"{rank} entries each, got {window_strides}, {padding}, {lhs_dilation}, "
                     f"{rhs_dilation}.")
  if isinstance(padding, str):
    padding = jax.lax.padtype_to_pads(x.shape[1:rank + 1], _dilated(w.shape[:rank], rhs_dilation),
                                      window_strides, padding)
  operands = (y, x, w) if b is None else (y, x, w, b)
  return layer_tag_p.bind(*operands, kind=f"conv{rank}d", approx=approximation,
                          has_bias=b is not None,
                          conv=conv_params(window_strides, padding, lhs_dilation, rhs_dilation,
                                           feature_group_count))


def register_conv2d(y: Array, x: Array, w: Array, b: Array | None = None, *,
                    window_strides: Sequence[int] = (1, 1),
                    padding: str | Sequence[tuple[int, int]] = "SAME",
                    lhs_dilation: Sequence[int] = (1, 1),
                    rhs_dilation: Sequence[int] = (1, 1),
                    feature_group_count: int = 1,
                    approximation: str | None = None) -> Array:
  """Tags a 2-D NHWC convolution with HWIO kernel `w` and returns `y` unchanged.

  The keyword arguments are those of `lax.conv_general_dilated` that produced `y`.
  With `feature_group_count=G` (grouped or depthwise conv), `w` is
  `(k_h, k_w, c_in / G, c_out)` and K-FAC keeps one block per group.
  """
  return _register_conv(2, y, x, w, b, window_strides, padding, lhs_dilation, rhs_dilation,
                        feature_group_count, approximation)


def register_conv1d(y: Array, x: Array, w: Array, b: Array | None = None, *,
                    window_strides: Sequence[int] = (1,),
                    padding: str | Sequence[tuple[int, int]] = "SAME",
                    lhs_dilation: Sequence[int] = (1,),
                    rhs_dilation: Sequence[int] = (1,),
                    feature_group_count: int = 1,
                    approximation: str | None = None) -> Array:
  """Tags a 1-D NWC convolution with WIO kernel `w` and returns `y` unchanged.

  The keyword arguments are those of `lax.conv_general_dilated` that produced `y`.
  """
  return _register_conv(1, y, x, w, b, window_strides, padding, lhs_dilation, rhs_dilation,
                        feature_group_count, approximation)


def register_conv3d(y: Array, x: Array, w: Array, b: Array | None = None, *,
                    window_strides: Sequence[int] = (1, 1, 1),
                    padding: str | Sequence[tuple[int, int]] = "SAME",
                    lhs_dilation: Sequence[int] = (1, 1, 1),
                    rhs_dilation: Sequence[int] = (1, 1, 1),
                    feature_group_count: int = 1,
                    approximation: str | None = None) -> Array:
  """Tags a 3-D NDHWC convolution with DHWIO kernel `w` and returns `y` unchanged.

  The keyword arguments are those of `lax.conv_general_dilated` that produced `y`.
  """
  return _register_conv(3, y, x, w, b, window_strides, padding, lhs_dilation, rhs_dilation,
                        feature_group_count, approximation)


def conv_params(window_strides, padding, lhs_dilation, rhs_dilation,
                feature_group_count: int = 1) -> "ConvParams":
  """`ConvParams` from `lax.conv_general_dilated`'s arguments (padding as pairs)."""
  ints = lambda v: tuple(int(i) for i in v)
  return ConvParams(ints(window_strides), tuple(ints(pair) for pair in padding),
                    ints(lhs_dilation), ints(rhs_dilation), int(feature_group_count))


def register_embedding(y: Array, ids: Array, table: Array, *,
                       approximation: str | None = None) -> Array:
  """Tags `y = table[ids]` (a `(vocab, d)` lookup table) and returns `y` unchanged.

  `ids` are the integer ids of shape `(batch, ...)`, `y` has shape `ids.shape + (d,)`.
  K-FAC keeps the input factor of the table diagonal: the one-hot inputs are never built.
  """
  approximations.check(approximation)
  if table.ndim != 2 or y.shape != ids.shape + (table.shape[1],):
    raise ValueError(f"register_embedding: shapes do not match y = table[ids]: ids {ids.shape}, "
                     f"table {table.shape}, y {y.shape}.")
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(f"register_embedding: ids must be integers, got {ids.dtype}.")
  return layer_tag_p.bind(y, ids, table, kind="embedding", approx=approximation, has_bias=False,
                          conv=None)


def register_embedding_projection(logits: Array, x: Array, table: Array, *,
                                  approximation: str | None = None) -> Array:
  """Tags `logits = x @ table.T` (a `(vocab, d)` table as output projection); returns `logits`.

  `x` has shape `(batch, ..., d)`, `logits` `(batch, ..., vocab)`. With the table's
  lookups (`register_embedding`), the tags make one "tied_embedding" layer; alone, the
  projection is such a layer without lookups.
  """
  approximations.check(approximation)
  if (table.ndim != 2 or x.ndim < 2 or x.shape[-1] != table.shape[1]
      or logits.shape != x.shape[:-1] + (table.shape[0],)):
    raise ValueError(f"register_embedding_projection: shapes do not match logits = x @ table.T: "
                     f"x {x.shape}, table {table.shape}, logits {logits.shape}.")
  return layer_tag_p.bind(logits, x, table, kind="embedding_projection", approx=approximation,
                          has_bias=False, conv=None)


def register_scale_and_shift(y: Array, x: Array, scale: Array, shift: Array | None = None, *,
                             approximation: str | None = None) -> Array:
  """Tags `y = x * scale + shift` (a norm layer's affine part) and returns `y` unchanged.

  `x` is the normalised input `x_hat`, of shape `(batch, ..., d)` like `y`; `scale` and
  `shift` have shape `(d,)` and broadcast over the last axis. Approximations: "diagonal"
  (the default for this kind) or "full".
  """
  approximations.check(approximation)
  if scale.ndim != 1 or x.ndim < 2 or x.shape[-1] != scale.shape[0] or y.shape != x.shape:
    raise ValueError(f"register_scale_and_shift: shapes do not match y = x * scale + shift "
                     f"over the last axis of a batch: x {x.shape}, scale {scale.shape}, "
                     f"y {y.shape}.")
  if shift is not None and shift.shape != scale.shape:
    raise ValueError(f"register_scale_and_shift: shift shape {shift.shape} does not match "
                     f"scale {scale.shape}.")
  operands = (y, x, scale) if shift is None else (y, x, scale, shift)
  return layer_tag_p.bind(*operands, kind="scale_and_shift", approx=approximation,
                          has_bias=shift is not None, conv=None)


def register_generic(param: Array, *, approximation: str = "diagonal") -> Array:
  """Marks `param` (a `params` leaf) as a generic parameter and returns it unchanged.

  K-FAC gives it a diagonal block of its own, estimated from its gradients, even where
  automatic registration would find it in a layer. Call it where the parameter is used,
  e.g. `w = jkfac.register_generic(params["w"])`; a layer tag on it raises instead.
  """
  if approximation != "diagonal":
    raise ValueError(f"register_generic: a generic parameter has a diagonal block only; got "
                     f"approximation={approximation!r}.")
  return layer_tag_p.bind(param, kind="generic", approx=approximation, has_bias=False, conv=None)


def _dilated(kernel: Sequence[int], dilation: Sequence[int]) -> tuple[int, ...]:
  return tuple((k - 1) * d + 1 for k, d in zip(kernel, dilation))


class ConvParams(tuple):
  """Hashable conv settings stored on a tag: strides, padding pairs, dilations, groups.

  One entry per spatial dimension (1, 2 or 3); `feature_group_count` as in
  `lax.conv_general_dilated` (1 for an ordinary conv).
  """

  def __new__(cls, window_strides, padding, lhs_dilation, rhs_dilation, feature_group_count=1):
    return super().__new__(cls, (window_strides, padding, lhs_dilation, rhs_dilation,
                                 feature_group_count))

  window_strides = property(lambda self: self[0])
  padding = property(lambda self: self[1])
  lhs_dilation = property(lambda self: self[2])
  rhs_dilation = property(lambda self: self[3])
  feature_group_count = property(lambda self: self[4])


def row_shape(prediction: Array) -> tuple[int, ...]:
  """The rows of a registered prediction: every axis but the last; `(N,)` is N rows."""
  return tuple(prediction.shape if prediction.ndim == 1 else prediction.shape[:-1])


def _row_array(kind: str, name: str, values, prediction: Array) -> Array:
  """`values` (a mask or per-row weights) checked to be one non-negative number per row,
  as floats (at least float32, so that their sums stay exact)."""
  rows = row_shape(prediction)
  concrete = not isinstance(values, jax.core.Tracer)
  values = jnp.asarray(values)
  if name == "weight" and values.ndim == 0:  # a traced scalar weight: the same for every row
    values = jnp.broadcast_to(values, rows)
  if tuple(values.shape) != rows:
    raise ValueError(f"{kind} loss: {name} of shape {values.shape} must have one entry per "
                     f"row, shape {rows} (the prediction {prediction.shape} without its last "
                     "axis).")
  if not (jnp.issubdtype(values.dtype, jnp.number) or values.dtype == jnp.bool_):
    raise ValueError(f"{kind} loss: {name} must be numbers or booleans, got {values.dtype}.")
  if concrete and bool(np.any(np.asarray(values) < 0)):  # traced values are not checked
    raise ValueError(f"{kind} loss: {name} must be non-negative, got {values}.")
  dtype = (jnp.promote_types(prediction.dtype, jnp.float32)
           if jnp.issubdtype(prediction.dtype, jnp.floating) else jnp.float32)
  return values.astype(dtype)


def _register_loss(kind: str, prediction: Array, targets: Array, weight: float | Array,
                   mask: Array | None) -> Array:
  """Checks and tags a loss; a scalar `weight` is a tag parameter, per-row weights and the
  mask are operands (traced values): `(prediction, targets, [mask], [row weights])`."""
  if prediction.ndim == 0:
    raise ValueError(f"{kind} loss: the prediction must have a batch axis (axis 0), got a "
                     "scalar.")
  if targets.shape != prediction.shape and targets.shape != prediction.shape[:-1]:
    raise ValueError(f"{kind} loss: targets of shape {targets.shape} match neither the "
                     f"prediction shape {prediction.shape} nor its leading dimensions.")
  row_weights = None
  if jnp.ndim(weight) == 0 and not isinstance(weight, jax.core.Tracer):
    if not weight > 0:
      raise ValueError(f"{kind} loss: weight must be positive, got {weight}.")
    weight = float(weight)
  else:
    row_weights, weight = _row_array(kind, "weight", weight, prediction), 1.0
  if mask is not None:
    mask = _row_array(kind, "mask", mask, prediction)
  extra = [a for a in (mask, row_weights) if a is not None]
  return loss_tag_p.bind(prediction, targets, *extra, kind=kind, weight=weight,
                         has_mask=mask is not None, has_row_weights=row_weights is not None)


def loss_operands(params: dict, operands: Sequence) -> tuple:
  """`(mask, row_weights)` of a loss tag's operands, each None where absent."""
  extra = iter(operands[2:])
  mask = next(extra) if params.get("has_mask", False) else None
  row_weights = next(extra) if params.get("has_row_weights", False) else None
  return mask, row_weights


def register_softmax_cross_entropy(logits: Array, labels: Array, *,
                                   weight: float | Array = 1.0,
                                   mask: Array | None = None) -> Array:
  """Registers softmax cross-entropy on `logits` (integer or one-hot `labels`).

  `logits` are `(batch, ..., classes)`; every axis before the last is a row (for
  `(N, T, C)` sequence logits, N*T tokens). The user's loss must be the mean over all
  rows of `weight * CE` (not a per-sequence sum); with `mask` (bool or 0/1, one entry
  per row: shape `logits.shape[:-1]`), `sum_r mask_r * weight_r * CE_r / sum_r mask_r`.
  `weight` is a positive float, or non-negative per-row weights of the mask's shape.
  Masked rows count for nothing, also in the input factors of layers whose inputs have
  these rows (see docs/sequence_models.md). Returns `logits` unchanged.
  """
  if logits.ndim < 2:
    raise ValueError(f"softmax_cross_entropy loss: logits need a batch and a class axis, got "
                     f"shape {logits.shape}.")
  return _register_loss("softmax_cross_entropy", logits, labels, weight, mask)


def register_sigmoid_cross_entropy(logits: Array, targets: Array, *,
                                   weight: float | Array = 1.0,
                                   mask: Array | None = None) -> Array:
  """Registers sigmoid cross-entropy (independent Bernoulli outputs); returns `logits`.

  Axis 0 is the batch: `(N,)` logits are N examples with one output each, as `(N, 1)`.
  A row's loss is the sum of its outputs' cross-entropies; the user's loss must be the
  mean over rows of `weight * row loss` (masked: `sum_r mask_r weight_r loss_r / sum_r
  mask_r`), with `weight` and `mask` as in `register_softmax_cross_entropy`.
  """
  if targets.shape != logits.shape:
    raise ValueError(f"sigmoid_cross_entropy loss: targets {targets.shape} must have the "
                     f"logits' shape {logits.shape}.")
  return _register_loss("sigmoid_cross_entropy", logits, targets, weight, mask)


def register_squared_error(prediction: Array, targets: Array, *,
                           weight: float | Array = 1.0,
                           mask: Array | None = None) -> Array:
  """Registers `weight * 0.5 * ||prediction - targets||^2` per row; returns `prediction`.

  Axis 0 is the batch: a `(N,)` prediction is N examples with one output each, as
  `(N, 1)`; the user's loss must be the mean over rows (masked: `sum_r mask_r weight_r
  loss_r / sum_r mask_r`), with `weight` and `mask` as in `register_softmax_cross_entropy`.
  """
  if targets.shape != prediction.shape:
    raise ValueError(f"squared_error loss: targets {targets.shape} must have the prediction's "
                     f"shape {prediction.shape}.")
  return _register_loss("squared_error", prediction, targets, weight, mask)


