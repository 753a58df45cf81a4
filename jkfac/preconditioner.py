"""`jkfac.precondition`: gradients to `F^-1 g`, block by block, as an optax transform.

Statistics, EMAs and inverses are refreshed inside `update` with `lax.cond`, so a jitted
train step does all K-FAC work and compiles once. Static settings live in a frozen
`PreconditionConfig` (`jkfac.config`), arrays in `PreconditionState`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from jkfac import blocks, interpreter, layer_matrices, masking, parallel
from jkfac import statistics_examples
from jkfac import statistics as layer_stats
from jkfac.config import MASKED_HINT, MIN_DAMPING, PreconditionConfig, with_curvature_settings
from jkfac.inverses import update_inverses
from jkfac.state import PreconditionState, check_state, init_state
from jkfac.layer_info import LayerInfo, Trace
from jkfac.schedules import ScalarOrSchedule, value
from jkfac.damping import curvature_scale
from jkfac.skipping import tree_finite, warn_if_skipping, zero_if
from jkfac.validation import check

Array = jax.Array
PyTree = Any


PATCH_STREAM = 1  # `fold_in` tag of the key that draws `sub_sample_patches`'s rows


def update_statistics(config: PreconditionConfig, trace: Trace, state: PreconditionState,
                      params: PyTree, batch: PyTree,
                      curvature: interpreter.Linearization | None) -> PreconditionState:
  """One batch's block statistics, averaged over devices, folded into the EMAs."""
  key, sample_key = jax.random.split(state.key)
  if config.device_axis is not None:  # different targets on every device
    sample_key = jax.random.fold_in(sample_key, jax.lax.axis_index(config.device_axis))
  # Patch rows from their own stream: sub-sampling leaves the sampled targets as they were.
  patch_key = (None if config.sub_sample_patches is None
               else jax.random.fold_in(sample_key, PATCH_STREAM))
  if curvature is None:
    batch, sample_key = statistics_examples.for_statistics(
        config.loss_fn, params, batch, config.examples_bound, sample_key,
        config.auto_register)
    curvature = interpreter.linearize(config.loss_fn, params, batch, config.auto_register,
                                      in_branch=True)
  found = layer_stats.layer_statistics(trace, curvature, sample_key, config.estimation)
  found = layer_stats.astype(found, state.ema_weight.dtype)  # low precision: float32
  new = {layer.name: layer_stats.block_statistics(
             layer, found[layer.name], config.sub_sample_patches,
             None if patch_key is None else jax.random.fold_in(patch_key, index),
             state.inverses[layer.name])
         for index, layer in enumerate(trace.every_layer)}
  new = parallel.pmean(new, config.device_axis)
  # Statistics every k steps forget as much per step as every step with `decay`.
  decay = value(config.cov_ema_decay, state.count).astype(state.ema_weight.dtype)
  decay = decay ** config.cov_update_every
  statistics = jax.tree_util.tree_map(
      lambda old, x: decay * old + (1 - decay) * x.astype(old.dtype), state.statistics, new)
  ema_weight = decay * state.ema_weight + (1 - decay)
  inverses = dict(state.inverses)
  for layer in trace.every_layer:
    layer_block = blocks.for_layer(layer)
    if layer_block.refresh is not None:  # EKFAC: its scaling enters the inverses now
      inverses[layer.name] = layer_block.refresh(inverses[layer.name], jax.tree_util.tree_map(
          lambda c: c / ema_weight, statistics[layer.name]))
  return state._replace(key=key, statistics=statistics, ema_weight=ema_weight,
                        inverses=inverses)



def _precondition_matrix(inverses, layer: LayerInfo, matrix: Array) -> Array:
  """One layer's gradient matrix (one per slice of a stacked layer) times its inverse
  block."""
  apply = blocks.for_slice(layer).precondition
  apply = jax.vmap(apply) if layer.stack else apply
  return apply(inverses[layer.name], matrix.astype(
      jax.tree_util.tree_leaves(inverses[layer.name])[0].dtype))


def precondition_gradients(trace: Trace, inverses, updates: PyTree) -> PyTree:
  """Applies each layer's inverse block (generic parameters' too) to its gradients."""
  return layer_matrices.map_layer_matrices(
      trace.every_layer, functools.partial(_precondition_matrix, inverses), updates)


def update(config: PreconditionConfig, updates: PyTree, state: PreconditionState,
           params: PyTree, batch: PyTree, curvature: interpreter.Linearization | None = None,
           model_params: PyTree | None = None,
           damping: Array | Callable[[Array], Array] | None = None,
           invert_now: Array | None = None) -> tuple[PyTree, PreconditionState]:
  """One step of `precondition`: statistics and inverses when due, then `F^-1 g`.

  `damping`, if given, replaces `config.damping`: an array (an adaptive optimizer's, from
  its state), or a function of the curvature scale of the statistics this step refreshed
  (a damping calibrated to them); `invert_now`, if true, recomputes the inverses at this
  step even when none are due.
  """
  check(jax.tree_util.tree_structure(updates) == jax.tree_util.tree_structure(params),
         "The gradients and the parameters passed to jkfac have different tree structures.")
  if masking.is_masked(params):
    check(model_params is not None, MASKED_HINT + "pass tx.update(..., model_params=params), "
           "the whole model's parameters.")
    trace = config.trace(model_params, batch, masked=params)
    full_updates, state = _update(config, trace, masking.unmask(updates, model_params), state,
                                  model_params, batch, curvature, damping, invert_now)
    return masking.remask(full_updates, updates), state
  return _update(config, config.trace(params, batch), updates, state, params, batch, curvature,
                 damping, invert_now)


def _is_power_of_two(count: Array) -> Array:
  return (count > 0) & ((count & (count - 1)) == 0)


# With `warm_start`, statistics run on every one of the first this many steps, so the
# first inverses (steps 1, 2, 4, 8) come from several batches; then every
# `cov_update_every`. Measured against every step until the first regular inverse update
# (step 50 in `jkfac.kfac`), 200 steps at batch 128 (docs/tuning.md): convnet 0.0050 vs
# 0.0082, MLP 0.0329 vs 0.0316, autoencoder 57.9 vs 58.0, at 40 fewer statistics steps.
WARM_START_STATISTICS = 10


def statistics_due(config: PreconditionConfig, count: Array) -> Array:
  """Whether step `count` computes statistics: every `cov_update_every` steps, and with
  `warm_start` every one of the first `WARM_START_STATISTICS` steps."""
  due = count % config.cov_update_every == 0
  if not config.warm_start:
    return due
  return due | (count < jnp.minimum(WARM_START_STATISTICS, config.invert_every))


def inverses_due(config: PreconditionConfig, count: Array) -> Array:
  """Whether step `count` recomputes the inverses: every `invert_every` steps; with
  `warm_start` not at step 0 (the first step is a gradient step, no one-batch inverse)
  but at steps 1, 2, 4, 8, ... below `invert_every`, as the statistics accumulate."""
  due = count % config.invert_every == 0
  if not config.warm_start:
    return due
  return (due & (count > 0)) | ((count < config.invert_every) & _is_power_of_two(count))


def refresh_statistics(config: PreconditionConfig, trace: Trace, state: PreconditionState,
                       params: PyTree, batch: PyTree,
                       curvature: interpreter.Linearization | None, grads_finite: Array
                       ) -> tuple[PreconditionState, Array]:
  """`state` with this batch's statistics folded in when they are due, and whether the
  batch is finite (its gradients, `grads_finite`, and statistics): a batch that is not
  leaves the statistics as they were."""

  def statistics_step(s: PreconditionState) -> tuple[PreconditionState, Array]:
    new = update_statistics(config, trace, s, params, batch, curvature)
    finite = tree_finite(new.statistics)
    new = new._replace(curvature_scale=curvature_scale(trace, new.statistics, new.ema_weight))
    return jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, s), finite

  new, finite = jax.lax.cond(grads_finite & statistics_due(config, state.count),
                             statistics_step, lambda s: (s, jnp.asarray(True)), state)
  return new, finite & grads_finite


def count_step(new: PreconditionState, old: PreconditionState, finite: Array
               ) -> PreconditionState:
  """`new` with the step counted: taken if `finite`, else skipped (and warned about)."""
  skipped_steps = old.skipped_steps + jnp.logical_not(finite).astype(old.skipped_steps.dtype)
  return new._replace(count=jnp.where(finite, optax.safe_increment(old.count), old.count),
                      skipped_steps=warn_if_skipping(~finite, skipped_steps))


def _update(config: PreconditionConfig, trace: Trace, updates: PyTree,
            state: PreconditionState, params: PyTree, batch: PyTree,
            curvature: interpreter.Linearization | None,
            damping: Array | Callable[[Array], Array] | None = None,
            invert_now: Array | None = None) -> tuple[PyTree, PreconditionState]:
  if config.device_axis is not None:
    parallel.check_axis(config.device_axis)
    updates = parallel.pmean(updates, config.device_axis)
  check_state(trace, state)
  # A batch whose gradients or statistics are not finite changes nothing but a counter.
  new, finite = refresh_statistics(config, trace, state, params, batch, curvature,
                                   tree_finite(updates))
  if callable(damping):
    damping = damping(new.curvature_scale)
  damping = value(config.damping, state.count) if damping is None else damping
  damping = jnp.maximum(damping, MIN_DAMPING)
  due = inverses_due(config, state.count)
  if invert_now is not None:
    due = due | invert_now
  new = jax.lax.cond(finite & due, lambda s: update_inverses(config, trace, s, damping),
                     lambda s: s, new)
  preconditioned = zero_if(~finite, precondition_gradients(trace, new.inverses, updates))
  return preconditioned, count_step(new, state, finite)


def precondition(loss_fn: Callable[..., Any], example_batch: PyTree, *,
                 damping: ScalarOrSchedule, **settings: Any
                 ) -> optax.GradientTransformationExtraArgs:
  """Preconditions gradients with the K-FAC approximation of the inverse Fisher.

  Args:
    loss_fn: `loss_fn(params, batch)`, the mean over the batch of per-example losses,
      with its layers tagged or recognised and its loss registered (see
      `PreconditionConfig`).
    example_batch: a batch, or `jax.ShapeDtypeStruct`s with its shapes and dtypes.
    damping: Tikhonov damping λ (float or schedule of the step), > 0.
    **settings: any other field of `jkfac.PreconditionConfig` (cadences, estimation,
      approximations, parallelism, ...), where each is documented with its default.

  Returns:
    An optax transformation: `update(grads, state, params, batch=batch)`, optionally
    with `curvature=` from `jkfac.value_and_grad` to reuse its forward pass, and
    `damping=` (an array, e.g. an adaptive optimizer's) in place of `damping`.

  Examples:
    >>> tx = optax.chain(jkfac.precondition(loss_fn, batch, damping=1e-3),
    ...                  optax.sgd(0.1, momentum=0.9))
  """
  config = PreconditionConfig(loss_fn, example_batch, damping=damping, **settings)

  @parallel.on_auto_axes
  def update_fn(updates, state, params=None, *, batch=None, curvature=None,
                model_params=None, damping=None, invert_now=None, **extra_args):
    del extra_args
    check(params is not None and batch is not None,
           "jkfac needs the parameters and the batch: "
           "tx.update(grads, state, params, batch=batch).")
    return update(config, updates, state, params, batch, curvature, model_params, damping,
                  invert_now)

  return optax.GradientTransformationExtraArgs(functools.partial(init_state, config), update_fn)


with_curvature_settings(precondition, {})
