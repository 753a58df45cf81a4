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
"""

from __future__ import annotations

import math

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


def nll(kind: str, prediction: Array, targets: Array) -> Array:
  """The negative log-likelihood of every row (in float32 or wider): shape `row_shape`."""
  if prediction.ndim == 1:
    return nll(kind, prediction[:, None], targets[:, None])
  prediction = prediction.astype(jnp.promote_types(prediction.dtype, jnp.float32))
  if kind == "softmax_cross_entropy":
    log_p = jax.nn.log_softmax(prediction)
    return -jnp.sum(_one_hot(targets, prediction) * log_p, axis=-1)
  t = targets.astype(prediction.dtype)
  if kind == "sigmoid_cross_entropy":
    return -jnp.sum(t * jax.nn.log_sigmoid(prediction) + (1 - t) * jax.nn.log_sigmoid(-prediction),
                    axis=-1)
  if kind == "squared_error":
    return 0.5 * jnp.sum((prediction - t) ** 2, axis=-1)
  raise ValueError(f"Unknown loss kind {kind!r}.")


def _one_hot(targets: Array, prediction: Array) -> Array:
  if targets.shape == prediction.shape:
    return targets.astype(prediction.dtype)
  return jax.nn.one_hot(targets, prediction.shape[-1], dtype=prediction.dtype)


def _mean_grad(kind: str, prediction: Array, targets: Array) -> Array:
  """Gradient of the per-row NLL with respect to the prediction at `targets`."""
  if kind == "softmax_cross_entropy":
    return jax.nn.softmax(prediction) - _one_hot(targets, prediction)
  if kind == "sigmoid_cross_entropy":
    return jax.nn.sigmoid(prediction) - targets.astype(prediction.dtype)
  if kind == "squared_error":
    return prediction - targets.astype(prediction.dtype)
  raise ValueError(f"Unknown loss kind {kind!r}.")


def _sample_targets(kind: str, prediction: Array, key: Array) -> Array:
  """Targets drawn from the model's predictive distribution."""
  if kind == "softmax_cross_entropy":
    return jax.random.categorical(key, prediction)
  if kind == "sigmoid_cross_entropy":
    return jax.random.bernoulli(key, jax.nn.sigmoid(prediction)).astype(prediction.dtype)
  if kind == "squared_error":
    return prediction + jax.random.normal(key, prediction.shape, prediction.dtype)
  raise ValueError(f"Unknown loss kind {kind!r}.")


def _sqrt_fisher_columns(kind: str, prediction: Array) -> Array:
  """Columns `c_k` with `sum_k c_k c_k^T = F_r` per row; shape (C, *prediction.shape)."""
  num_classes = prediction.shape[-1]
  eye = jnp.eye(num_classes, dtype=prediction.dtype)
  if kind == "softmax_cross_entropy":
    # F = diag(p) - p p^T = sum_k p_k (e_k - p)(e_k - p)^T.
    p = jax.nn.softmax(prediction)
    cols = jnp.sqrt(p)[..., :, None] * (eye - p[..., None, :])   # [..., k, :]
    return jnp.moveaxis(cols, -2, 0)
  if kind == "sigmoid_cross_entropy":
    p = jax.nn.sigmoid(prediction)
    return jnp.moveaxis(jnp.sqrt(p * (1 - p))[..., None, :] * eye, -2, 0)
  if kind == "squared_error":
    return jnp.moveaxis(jnp.broadcast_to(eye, prediction.shape[:-1] + eye.shape), -2, 0)
  raise ValueError(f"Unknown loss kind {kind!r}.")


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
  if estimation == "fisher":
    cols = _mean_grad(kind, prediction, _sample_targets(kind, prediction, key))[None]
  elif estimation == "empirical":
    cols = _mean_grad(kind, prediction, targets)[None]
  elif estimation == "exact":
    cols = _sqrt_fisher_columns(kind, prediction)
    if prediction.ndim > 2:
      cols = _one_row_each(cols)
  else:
    raise ValueError(f"Unknown estimation {estimation!r}; expected one of {ESTIMATIONS}.")
  if jnp.ndim(scale) == 0:
    return cols * jnp.sqrt(scale).astype(prediction.dtype)
  return cols * jnp.sqrt(scale).astype(prediction.dtype)[..., None]
