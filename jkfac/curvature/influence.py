"""Influence functions on a fitted curvature: which training examples drove a prediction.

The influence of training example `z` on query `q` is `g_qᵀ (F + λI)⁻¹ g_z` (Koh & Liang
2017; Grosse et al. 2023), `g` per-example loss gradients and `F` the fitted curvature
(with EK-FAC, kronfluence's choice). A positive score: a gradient step on `z` lowers `q`'s
loss (a helpful example); a negative one raises it (e.g. a mislabelled example).

The query gradients are preconditioned once, then each training batch's per-example
gradients are dotted with them and dropped: memory is one batch of per-example
gradients and the queries' preconditioned gradients.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp

from jkfac.curvature import algebra, fitting
from jkfac.curvature.fitting import FittedCurvature

Array = jax.Array
PyTree = Any


def _scalar_loss(loss_fn: Callable[..., Any], params: PyTree, batch: PyTree) -> Array:
  """`loss_fn`'s loss, without its aux if it returns `(loss, aux)`."""
  out = loss_fn(params, batch)
  return out[0] if isinstance(out, tuple) else out


def per_example_gradients(loss_fn: Callable[..., Any], params: PyTree, batch: PyTree) -> PyTree:
  """Each example's loss gradient, `loss_fn` on a batch of one: leaves `(batch, *shape)`.
  Every leaf of `batch` is indexed by example along axis 0 (a model state that is not,
  such as batch-norm statistics, belongs in `params` or a closure here)."""
  def one(example: PyTree) -> PyTree:
    single = jax.tree_util.tree_map(lambda x: x[None], example)
    return jax.grad(functools.partial(_scalar_loss, loss_fn))(params, single)
  return jax.vmap(one)(batch)


def default_damping(curvature: FittedCurvature) -> Array:
  """kronfluence's default damping: 0.1 times the mean eigenvalue of `F`."""
  return 0.1 * jnp.mean(algebra.eigenvalues(curvature))


def _scores(loss_fn, params: PyTree, batch: PyTree, preconditioned: PyTree) -> Array:
  """`(batch, queries)`: each training example's gradient dotted with each query's
  preconditioned gradient."""
  grads = per_example_gradients(loss_fn, params, batch)
  return sum(jnp.einsum("n...,q...->nq", g, h) for g, h in zip(
      jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(preconditioned)))


def influence(curvature: FittedCurvature, loss_fn: Callable[..., Any], params: PyTree,
              train_batches: Iterable[PyTree] | Callable[[int], PyTree], query_batch: PyTree,
              damping: float | Array | None = None, *,
              num_batches: int | None = None) -> Array:
  """The train-by-query influence scores `g_qᵀ (F + λI)⁻¹ g_z`, shape `(train, queries)`.

  Args:
    curvature: `fit` of the training loss (over the covered parameters only: the scores
      sum over those).
    loss_fn: `loss_fn(params, batch)`, the mean loss over a batch (called on batches of
      one example for per-example gradients); it may return `(loss, aux)`.
    params: the trained parameters.
    train_batches: an iterable of training batches, or a function of the batch index
      (with `num_batches`); rows of the result follow their examples in order.
    query_batch: the query examples, one batch.
    damping: λ > 0; None uses `default_damping` (0.1 times F's mean eigenvalue).
  """
  damping = default_damping(curvature) if damping is None else jnp.asarray(damping)
  queries = jax.jit(functools.partial(per_example_gradients, loss_fn))(params, query_batch)
  preconditioned = jax.jit(jax.vmap(algebra.inverse_vector_product, in_axes=(None, 0, None)))(
      curvature, queries, damping)
  scores = jax.jit(functools.partial(_scores, loss_fn))
  batches = fitting.iterate_batches(train_batches, num_batches)
  return jnp.concatenate([scores(params, batch, preconditioned) for batch in batches], axis=0)
