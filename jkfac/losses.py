"""Loss kinds: what K-FAC backpropagates from a registered loss.

A registered loss is the negative log-likelihood of a distribution over the last axis
of its prediction; every other axis indexes rows (axis 0 is the batch, so `(N,)` is N
examples with one output each), and the user's loss is `sum_r s_r NLL_r`, with the
row factors `s_r` of `row_scales`: `weight / rows` (the mean over rows), or with per-row
weights and a mask, `weight_r * mask_r / sum(mask)`. For each loss, `cotangents` returns
a stack `c` of shape `(columns, *prediction.shape)` with `E[sum_k c_k c_k^T] = s_r F_r`
per row: "fisher" samples targets from the model, "empirical" uses the true ones,
"exact" backpropagates the columns of a square root of `F_r`, one row at a time (so rows
of an example that interact add no cross terms). docs/architecture.md has the derivation.
Each loss kind is one row of `LOSSES`.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from jkfac import tags

Array = jax.Array

ESTIMATIONS = ("fisher", "empirical", "exact")


def row_scales(prediction: Array, weight: float, mask: Array | None = None,
               row_weights: Array | None = None) -> float | Array:
  """The factor `s_r` of every row in the registered loss `sum_r s_r NLL_r`.

  `weight * row_weights_r * mask_r / sum(mask)`, or `/ rows` without a mask (a mask that
  is zero everywhere gives zeros); the float `weight / rows` without either.
  """
  rows = tags.row_shape(prediction)
  if mask is None and row_weights is None:
    return weight / math.prod(rows)
  dtype = jnp.promote_types(prediction.dtype, jnp.float32)
  scale = weight * (jnp.ones(rows, dtype) if row_weights is None else row_weights.astype(dtype))
  if mask is None:
    return jax.lax.stop_gradient(scale / math.prod(rows))
  mask = mask.astype(dtype)
  total = jnp.sum(mask)
  return jax.lax.stop_gradient(scale * mask / jnp.where(total > 0, total, 1))


def _one_hot(targets: Array, prediction: Array) -> Array:
  if targets.shape == prediction.shape:
    return targets.astype(prediction.dtype)
  return jax.nn.one_hot(targets, prediction.shape[-1], dtype=prediction.dtype)


def _columns(per_row: Array) -> Array:
  """`(..., k, C)` columns as the stack `(k, ..., C)`."""
  return jnp.moveaxis(per_row, -2, 0)


class LossKind(NamedTuple):
  """One loss kind: its functions of a `(..., C)` prediction, row by row over the last axis.

  `nll(prediction, targets)`: the negative log-likelihood of every row. `grad(prediction,
  targets)`: its gradient in the prediction. `sample(prediction, key)`: targets drawn from
  the model (the Monte-Carlo Fisher). `sqrt_fisher(prediction)`: columns `c_k`, stacked
  `(C, ..., C)`, with `sum_k c_k c_k^T = F_r`. `fisher_product(prediction, tangent)`: `F_r`
  times a tangent (the output Hessian, the GGN's middle factor, for these losses).
  `sums_outputs`: a row's NLL is a sum over independent outputs on the last axis.
  """
  nll: Callable[[Array, Array], Array]
  grad: Callable[[Array, Array], Array]
  sample: Callable[[Array, Array], Array]
  sqrt_fisher: Callable[[Array], Array]
  fisher_product: Callable[[Array, Array], Array]
  sums_outputs: bool


def _eye(z: Array) -> Array:
  return jnp.eye(z.shape[-1], dtype=z.dtype)


def _softmax_fisher_product(z: Array, v: Array) -> Array:
  p = jax.nn.softmax(z)
  return p * v - p * jnp.sum(p * v, axis=-1, keepdims=True)


def _softmax_sqrt_fisher(z: Array) -> Array:
  # F = diag(p) - p p^T = sum_k p_k (e_k - p)(e_k - p)^T.
  p = jax.nn.softmax(z)
  return _columns(jnp.sqrt(p)[..., :, None] * (_eye(z) - p[..., None, :]))


def _sigmoid_nll(z: Array, t: Array) -> Array:
  t = t.astype(z.dtype)
  return -jnp.sum(t * jax.nn.log_sigmoid(z) + (1 - t) * jax.nn.log_sigmoid(-z), axis=-1)


def _sigmoid_variance(z: Array) -> Array:
  p = jax.nn.sigmoid(z)
  return p * (1 - p)


LOSSES: dict[str, LossKind] = {
    "softmax_cross_entropy": LossKind(
        nll=lambda z, t: -jnp.sum(_one_hot(t, z) * jax.nn.log_softmax(z), axis=-1),
        grad=lambda z, t: jax.nn.softmax(z) - _one_hot(t, z),
        sample=lambda z, key: jax.random.categorical(key, z),
        sqrt_fisher=_softmax_sqrt_fisher,
        fisher_product=_softmax_fisher_product,
        sums_outputs=False),
    "sigmoid_cross_entropy": LossKind(
        nll=_sigmoid_nll,
        grad=lambda z, t: jax.nn.sigmoid(z) - t.astype(z.dtype),
        sample=lambda z, key: jax.random.bernoulli(key, jax.nn.sigmoid(z)).astype(z.dtype),
        sqrt_fisher=lambda z: _columns(jnp.sqrt(_sigmoid_variance(z))[..., None, :] * _eye(z)),
        fisher_product=lambda z, v: _sigmoid_variance(z) * v,
        sums_outputs=True),
    "squared_error": LossKind(
        nll=lambda z, t: 0.5 * jnp.sum((z - t.astype(z.dtype)) ** 2, axis=-1),
        grad=lambda z, t: z - t.astype(z.dtype),
        sample=lambda z, key: z + jax.random.normal(key, z.shape, z.dtype),
        sqrt_fisher=lambda z: _columns(jnp.broadcast_to(_eye(z), z.shape[:-1] + _eye(z).shape)),
        fisher_product=lambda z, v: v,
        sums_outputs=True),
}
"""The loss kinds, one row each: a new loss is a new row (and a `register_*` in tags)."""


def loss_kind(kind: str) -> LossKind:
  """The table's row for `kind`; a ValueError names the known kinds."""
  if kind not in LOSSES:
    raise ValueError(f"Unknown loss kind {kind!r}; expected one of {tuple(LOSSES)}.")
  return LOSSES[kind]


def nll(kind: str, prediction: Array, targets: Array) -> Array:
  """The negative log-likelihood of every row (in float32 or wider): shape `row_shape`."""
  if prediction.ndim == 1:
    return nll(kind, prediction[:, None], targets[:, None])
  prediction = prediction.astype(jnp.promote_types(prediction.dtype, jnp.float32))
  return loss_kind(kind).nll(prediction, targets)


def output_curvature(kind: str, prediction: Array, tangent: Array) -> Array:
  """The per-row output Hessian (the Fisher, for these losses) of a loss kind times a
  prediction-space `tangent`, row by row over the last axis."""
  if prediction.ndim == 1:  # N examples with one output each
    return output_curvature(kind, prediction[:, None], tangent[:, None])[:, 0]
  return loss_kind(kind).fisher_product(prediction, tangent)


def _one_row_each(cols: Array) -> Array:
  """Square-root columns `(C, N, *rows, C)` as `(R * C, N, *rows, C)`: column `(r, k)` is
  column k at row r of every example and zero at the example's other rows."""
  num_rows = math.prod(cols.shape[2:-1])
  flat = cols.reshape(cols.shape[0], cols.shape[1], num_rows, cols.shape[-1])
  spread = jnp.einsum("knrc,rs->rknsc", flat, jnp.eye(num_rows, dtype=cols.dtype))
  return spread.reshape((num_rows * cols.shape[0],) + cols.shape[1:])


def cotangents(kind: str, prediction: Array, targets: Array, scale: float | Array,
               estimation: str, key: Array) -> Array:
  """The stacked cotangents of one loss, shape `(num_columns, *prediction.shape)`; `scale`
  is the loss's `row_scales` (rows of zero scale, masked ones, get zero columns)."""
  if prediction.ndim == 1:  # N examples with one output each
    cols = cotangents(kind, prediction[:, None], targets[:, None], scale, estimation, key)
    return cols[..., 0]
  prediction = jax.lax.stop_gradient(prediction)
  loss = loss_kind(kind)
  if estimation == "fisher":
    cols = loss.grad(prediction, loss.sample(prediction, key))[None]
  elif estimation == "empirical":
    cols = loss.grad(prediction, targets)[None]
  elif estimation == "exact":
    cols = loss.sqrt_fisher(prediction)
    if prediction.ndim > 2:
      cols = _one_row_each(cols)
  else:
    raise ValueError(f"Unknown estimation {estimation!r}; expected one of {ESTIMATIONS}.")
  if jnp.ndim(scale) == 0:
    return cols * jnp.sqrt(scale).astype(prediction.dtype)
  return cols * jnp.sqrt(scale).astype(prediction.dtype)[..., None]
