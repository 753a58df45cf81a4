"""The network as a function of the parameters: loss, registered predictions and exact
Gauss-Newton products `vᵢᵀ G vⱼ`, evaluated from `loss_fn`'s jaxpr."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from jkfac import interpreter, jaxprs, layer_table, losses, parallel, tags
from jkfac.adaptive.vectors import dot
from jkfac.layer_info import LossInfo

Array = jax.Array
PyTree = Any


def ggn_gram(kinds: Sequence[str], scales: Sequence[float | Array],
             predictions: Sequence[Array], tangents: Sequence[Sequence[Array]]) -> Array:
  """`[vᵢᵀ G vⱼ]` for the GGN `G` of the registered loss `Σ_r s_r NLL_r` (`scales`: each
  loss's `losses.row_scales`, e.g. `weight / rows` for the mean over rows), from
  `tangents[i]`, the Jacobian-vector products `J vᵢ` of every registered prediction."""
  size = len(tangents)
  gram = jnp.zeros((size, size), jnp.float32)
  for index, (kind, scale, prediction) in enumerate(zip(kinds, scales, predictions)):
    prediction = prediction.astype(jnp.float32)
    us = [t[index].astype(jnp.float32) for t in tangents]
    hus = [losses.output_curvature(kind, prediction, u) for u in us]
    if jnp.ndim(scale) == 0:
      gram = gram + scale * jnp.array([[jnp.sum(u * hu) for hu in hus] for u in us])
    else:  # one factor per row
      s = scale.astype(jnp.float32)
      s = s if prediction.ndim == 1 else s[..., None]
      gram = gram + jnp.array([[jnp.sum(s * u * hu) for hu in hus] for u in us])
  return gram


class Model(NamedTuple):
  """`loss_and_predictions(full_params) -> ((loss, [prediction per registered loss]),
  row_scales)` on one batch (the row factors of each loss, see `losses.row_scales`), with
  the losses' records."""
  loss_and_predictions: Callable[[PyTree], tuple[tuple[Array, list[Array]], list[Any]]]
  losses: tuple[LossInfo, ...]


def model(loss_fn: Callable[..., Any], params: PyTree, batch: PyTree) -> Model:
  """`loss_fn`'s loss and registered predictions as functions of the parameters, by
  evaluating its jaxpr (`interpreter`), with the registered losses it holds."""
  closed, _ = layer_table.make_jaxpr(loss_fn, params, batch, auto_register=False)
  infos = tuple(layer_table.loss_info(site) for site in jaxprs.find_tags(closed.jaxpr, {})
                if site.eqn.primitive is tags.loss_tag_p)
  perturbations = interpreter.zero_perturbations(closed)
  batch_leaves = jax.tree_util.tree_leaves(batch)

  def loss_and_predictions(full_params):
    args = jax.tree_util.tree_leaves(full_params) + batch_leaves
    outputs, recorded = interpreter.evaluate(closed, args, perturbations)
    scales = [jnp.asarray(losses.row_scales(p, info.weight, m, w), jnp.float32)
              for info, p, m, w in zip(infos, recorded.predictions, recorded.masks,
                                       recorded.row_weights)]
    # (loss, aux) outputs: the loss is the first leaf
    return (outputs[0], recorded.predictions), scales

  return Model(loss_and_predictions, infos)


class Problem(NamedTuple):
  """One step's fixed pieces: the parameters (the view the optimizer sees), the whole
  model's (`full`) and how a view-shaped vector becomes whole-model shaped."""
  params: PyTree
  full: PyTree
  to_full: Callable[[PyTree], PyTree]
  model: Model | None
  mask: tuple[bool, ...]
  l2: Array | None
  axis: str | None


def curvature_products(problem: Problem, vectors: Sequence[PyTree]) -> tuple[Array, Array]:
  """`(L(θ), [vᵢᵀ(G + l2·I)vⱼ])` by one linearisation and a JVP per vector."""
  (loss, predictions), jvp, scales = jax.linearize(problem.model.loss_and_predictions,
                                                   problem.full, has_aux=True)
  tangents = [jvp(problem.to_full(v))[1] for v in vectors]
  gram = ggn_gram([info.kind for info in problem.model.losses], scales, predictions, tangents)
  loss, gram = parallel.pmean((loss.astype(jnp.float32), gram), problem.axis)
  if problem.l2 is not None:
    gram = gram + problem.l2 * jnp.array([[dot(v, w, problem.mask) for w in vectors]
                                          for v in vectors])
  return loss, gram


def loss_change(problem: Problem, loss: Array, step: PyTree) -> Array:
  """`L(θ+δ) − L(θ)` on the batch, the `l2_reg` term included (one forward pass)."""
  moved = jax.tree_util.tree_map(lambda p, d: p + d.astype(jnp.result_type(p)),
                                 problem.full, problem.to_full(step))
  (new_loss, _), _ = problem.model.loss_and_predictions(moved)
  change = parallel.pmean(new_loss.astype(jnp.float32), problem.axis) - loss
  if problem.l2 is not None:
    change = change + problem.l2 * (dot(problem.params, step, problem.mask)
                                    + 0.5 * dot(step, step, problem.mask))
  return change

