"""Evaluating the loss jaxpr linearized at the layer tags: `linearize`, `value_and_grad`.

A small interpreter runs the loss jaxpr and, at each layer tag, records the layer's
input and adds a zero "perturbation" to its output (in a scan, one per step: the scan
runs the interpreter on its body). The vjp with respect to those zeros maps loss
cotangents to the gradients at every layer's output: in one backward pass, what the
curvature blocks need (see `statistics.py`).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

from jkfac import conv_layout, jaxprs, tags, window_max
from jkfac.layer_table import make_jaxpr

Array = jax.Array
PyTree = Any
LossFn = Callable[..., Any]


class Linearization(NamedTuple):
  """One forward pass, linearized at the layer tags: what the statistics need.

  inputs:      each tagged layer's input, in tag order.
  predictions: each registered loss's prediction.
  targets:     each registered loss's targets.
  pullback:    maps cotangents of the predictions to `(gradients of params, gradients
               at every layer's output)` (a `jax.tree_util.Partial`, so it may cross
               into `tx.update`).
  masks:       each registered loss's mask, None where it has none.
  row_weights: each registered loss's per-row weights, None where it has none.
  """
  inputs: list[Array]
  predictions: list[Array]
  targets: list[Array]
  pullback: jax.tree_util.Partial
  masks: Sequence[Array | None] = ()
  row_weights: Sequence[Array | None] = ()


class _Recorded(NamedTuple):
  """What a forward pass saw at the tags: each layer tag's input (stacked over the
  steps of enclosing scans) and each loss's prediction, targets, mask and row weights."""
  inputs: list[Array]
  predictions: list[Array]
  targets: list[Array]
  masks: list[Array | None]
  row_weights: list[Array | None]


def _evaluate(jaxpr: jcore.Jaxpr, consts: Sequence[Any], args: Sequence[Any],
              perturbations: Sequence[Array], in_branch: bool = False
              ) -> tuple[list[Any], _Recorded]:
  """`jax.core.eval_jaxpr` that adds `perturbations` at the layer tags' outputs (in tag
  order, also in sub-jaxprs) and records what the tags see. Max pools go through
  `window_max.max_pool`; `in_branch`: the pass runs inside control flow, so convolutions
  use `conv_layout.conv`."""
  env: dict = {}
  env.update(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  recorded = _Recorded([], [], [], [], [])
  perturbations = iter(perturbations)
  for eqn in jaxpr.eqns:
    invals = [jaxprs.read(env, v) for v in eqn.invars]
    if eqn.primitive is tags.loss_tag_p:
      recorded.predictions.append(invals[0])
      recorded.targets.append(invals[1])
      mask, row_weights = tags.loss_operands(eqn.params, invals)
      recorded.masks.append(None if mask is None else jax.lax.stop_gradient(mask))
      recorded.row_weights.append(
          None if row_weights is None else jax.lax.stop_gradient(row_weights))
      outvals = [invals[0]]
    elif jaxprs.is_generic_tag(eqn):
      outvals = [invals[0]]
    elif eqn.primitive is tags.layer_tag_p:
      recorded.inputs.append(jax.lax.stop_gradient(invals[1]))
      outvals = [invals[0] + next(perturbations)]
    elif (sub := jaxprs.tagged_sub_jaxpr(eqn)) is not None:
      inner_perturbations = [next(perturbations) for _ in jaxprs.layer_sites(sub.jaxpr)]
      if eqn.primitive.name == "scan":
        outvals, inner = _evaluate_scan(sub.jaxpr, sub.consts, invals, inner_perturbations,
                                        eqn, in_branch)
      elif eqn.primitive.name in jaxprs.REMAT_PRIMITIVES:  # keep the remat boundary
        evaluate = jax.checkpoint(functools.partial(_evaluate, sub.jaxpr, sub.consts,
                                                    in_branch=in_branch),
                                  prevent_cse=eqn.params.get("prevent_cse", True),
                                  policy=eqn.params.get("policy"))
        outvals, inner = evaluate(invals, inner_perturbations)
      else:
        outvals, inner = _evaluate(sub.jaxpr, sub.consts, invals, inner_perturbations,
                                   in_branch)
      for mine, theirs in zip(recorded, inner):
        mine.extend(theirs)
    elif in_branch and eqn.primitive is jax.lax.conv_general_dilated_p:
      outvals = [conv_layout.conv(*invals, **eqn.params)]
    elif eqn.primitive is jax.lax.reduce_window_max_p:
      outvals = [window_max.max_pool(*invals, **eqn.params)]
    else:
      out = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
      outvals = out if eqn.primitive.multiple_results else [out]
    env.update(zip(eqn.outvars, outvals))
  return [jaxprs.read(env, v) for v in jaxpr.outvars], recorded


def _evaluate_scan(body: jcore.Jaxpr, body_consts: Sequence[Any], args: Sequence[Any],
                   perturbations: Sequence[Array], eqn: jcore.JaxprEqn, in_branch: bool
                   ) -> tuple[list[Any], _Recorded]:
  """A scan equation whose body has layer tags, as `jax.lax.scan` over `_evaluate`.

  Each step takes its slice of the perturbations and returns the inputs its tags
  saw, which come out stacked along a leading axis of the scan's length.
  """
  num_consts, num_carry = jaxprs.scan_operands(eqn)
  consts, carry, xs = (list(args[:num_consts]), list(args[num_consts:num_consts + num_carry]),
                       list(args[num_consts + num_carry:]))

  def step(carry, step_xs):
    xs_now, perturbations_now = step_xs
    outs, recorded = _evaluate(body, body_consts, consts + list(carry) + list(xs_now),
                               perturbations_now, in_branch)
    if recorded.predictions:
      raise NotImplementedError(jaxprs.LOSS_IN_SCAN)
    return outs[:num_carry], (outs[num_carry:], recorded.inputs)

  carry, (ys, inputs) = jax.lax.scan(step, carry, (xs, list(perturbations)),
                                     length=eqn.params["length"], reverse=eqn.params["reverse"],
                                     unroll=eqn.params["unroll"])
  return list(carry) + list(ys), _Recorded(list(inputs), [], [], [], [])


def evaluate(closed: jcore.ClosedJaxpr, args: list[Any], perturbations: list[Array],
             in_branch: bool = False) -> tuple[list[Any], _Recorded]:
  """Evaluates the loss jaxpr, adding `perturbations` at the layer tags' outputs;
  `in_branch` where it runs inside `lax.cond` or a loop (see `conv_layout`)."""
  return _evaluate(closed.jaxpr, closed.consts, args, perturbations, in_branch)


def zero_perturbations(closed: jcore.ClosedJaxpr) -> list[Array]:
  """Zeros shaped as each layer tag's output (stacked over enclosing scans), in tag order."""
  return [jnp.zeros(site.scan_lengths + site.eqn.invars[0].aval.shape,
                    site.eqn.invars[0].aval.dtype) for site in jaxprs.layer_sites(closed.jaxpr)]


def _from_predictions(pullback, output_zeros, cotangents):
  """The pullback of the prediction cotangents alone (the loss's own cotangent is 0)."""
  return pullback((output_zeros, cotangents))


def linearize(loss_fn: LossFn, params: PyTree, batch: PyTree,
              auto_register: bool = True, in_branch: bool = False) -> Linearization:
  """A forward pass of `loss_fn`, linearized in the layer outputs only; `in_branch` where
  it runs inside `lax.cond` or a loop (K-FAC's statistics; see `conv_layout`)."""
  closed, _ = make_jaxpr(loss_fn, params, batch, auto_register)
  batch_leaves = jax.tree_util.tree_leaves(batch)

  def forward(params, perturbations):
    args = jax.tree_util.tree_leaves(params) + batch_leaves
    _, recorded = evaluate(closed, args, perturbations, in_branch)
    return ((), recorded.predictions), recorded._replace(predictions=[])

  # Gradients of params are only used for generic parameters; XLA drops the rest.
  (_, predictions), pullback, recorded = jax.vjp(
      forward, params, zero_perturbations(closed), has_aux=True)
  return Linearization(recorded.inputs, predictions, recorded.targets,
                   jax.tree_util.Partial(_from_predictions, pullback, ()), recorded.masks,
                   recorded.row_weights)


def value_and_grad(loss_fn: LossFn, has_aux: bool = False,
                   auto_register: bool = True) -> Callable[..., Any]:
  """`jax.value_and_grad(loss_fn)` that also returns the `Linearization` of the same pass.

  `value, grads, curvature = jkfac.value_and_grad(loss_fn)(params, batch)`; pass
  `curvature=curvature` to `tx.update` and K-FAC's statistics reuse this forward pass
  instead of running their own. `auto_register` must match the transform's.

  Examples:
    >>> loss, grads, curvature = jkfac.value_and_grad(loss_fn)(params, batch)
    >>> updates, opt_state = tx.update(grads, opt_state, params, batch=batch,
    ...                                curvature=curvature)
  """

  def value_grads_and_curvature(params: PyTree, batch: PyTree):
    closed, out_shape = make_jaxpr(loss_fn, params, batch, auto_register)
    out_tree = jax.tree_util.tree_structure(out_shape)
    batch_leaves = jax.tree_util.tree_leaves(batch)
    perturbations = zero_perturbations(closed)

    def forward(params, perturbations):
      args = jax.tree_util.tree_leaves(params) + batch_leaves
      # The pullback runs again in K-FAC's statistics branch: convs as `conv_layout` says.
      outputs, recorded = evaluate(closed, args, perturbations, in_branch=True)
      value = jax.tree_util.tree_unflatten(out_tree, outputs)
      loss, aux = value if has_aux else (value, None)
      return (loss, recorded.predictions), (aux, recorded._replace(predictions=[]))

    (loss, predictions), pullback, (aux, recorded) = jax.vjp(
        forward, params, perturbations, has_aux=True)
    zeros = [jnp.zeros_like(p) for p in predictions]
    grads, _ = pullback((jnp.ones_like(loss), zeros))
    curvature = Linearization(recorded.inputs, predictions, recorded.targets, jax.tree_util.Partial(
        _from_predictions, pullback, jnp.zeros_like(loss)), recorded.masks, recorded.row_weights)
    return ((loss, aux) if has_aux else loss), grads, curvature

  return value_grads_and_curvature
