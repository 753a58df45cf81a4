"""`jkfac.precondition`: gradients to `F^-1 g`, block by block, as an optax transform.

Statistics, EMAs and inverses are refreshed inside `update` with `lax.cond`, so a jitted
train step does all K-FAC work and compiles once. Static settings live in a frozen
`PreconditionConfig` (`jkfac.config`), arrays in `PreconditionState`.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from jkfac import blocks, interpreter, layers, masking, parallel
from jkfac import statistics as layer_stats
from jkfac.config import MASKED_HINT, MIN_DAMPING, PreconditionConfig
from jkfac.inverses import update_inverses
from jkfac.state import PreconditionState, check_state, init_state
from jkfac.layer_info import LayerInfo, Trace
from jkfac.schedules import ScalarOrSchedule, value
from jkfac.skipping import tree_finite
from jkfac.validation import check

Array = jax.Array
PyTree = Any


def update_statistics(config: PreconditionConfig, trace: Trace, state: PreconditionState,
                      params: PyTree, batch: PyTree,
                      curvature: interpreter.Curvature | None) -> PreconditionState:
  """One batch's block statistics, averaged over devices, folded into the EMAs."""
  key, sample_key = jax.random.split(state.key)
  if config.device_axis is not None:  # different targets on every device
    sample_key = jax.random.fold_in(sample_key, jax.lax.axis_index(config.device_axis))
  patch_key = None
  if config.sub_sample_patches is not None:
    sample_key, patch_key = jax.random.split(sample_key)
  if curvature is None:
    curvature = interpreter.linearize(config.loss_fn, params, batch, config.auto_register)
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



def _precondition_layer(layer: LayerInfo, inverses, w: Array, b: Array | None):
  """One layer's (unstacked) gradients `w`, `b` times its inverse block."""
  matrix = layers.param_matrix(layer, w, b)
  matrix = blocks.for_slice(layer).precondition(inverses, matrix.astype(
      jax.tree_util.tree_leaves(inverses)[0].dtype))
  return layers.split_param_matrix(layer, matrix)


def precondition_gradients(trace: Trace, inverses, updates: PyTree) -> PyTree:
  """Applies each layer's inverse block (generic parameters' too) to its gradients."""
  leaves, treedef = jax.tree_util.tree_flatten(updates)
  for layer in trace.every_layer:
    indices = [i for i in (layer.weight, layer.bias) if i is not None]
    grads = [leaves[i] for i in indices] + [None] * (2 - len(indices))
    apply_block = functools.partial(_precondition_layer, layer)
    if layer.stack:  # flatten the stack axes into one and map over it
      size = math.prod(layer.stack)
      grads = [g if g is None else g.reshape((size,) + g.shape[len(layer.stack):])
               for g in grads]
      apply_block = jax.vmap(apply_block)
    new = apply_block(inverses[layer.name], *grads)
    for i, g in zip(indices, new):
      leaves[i] = g.reshape(leaves[i].shape).astype(leaves[i].dtype)
  return jax.tree_util.tree_unflatten(treedef, leaves)


def update(config: PreconditionConfig, updates: PyTree, state: PreconditionState,
           params: PyTree, batch: PyTree, curvature: interpreter.Curvature | None = None,
           model_params: PyTree | None = None,
           damping: Array | None = None) -> tuple[PyTree, PreconditionState]:
  """One step of `precondition`: statistics and inverses when due, then `F^-1 g`.

  `damping`, if given, replaces `config.damping` (an adaptive optimizer's, from its state).
  """
  check(jax.tree_util.tree_structure(updates) == jax.tree_util.tree_structure(params),
         "The gradients and the parameters passed to jkfac have different tree structures.")
  if masking.is_masked(params):
    check(model_params is not None, MASKED_HINT + "pass tx.update(..., model_params=params), "
           "the whole model's parameters.")
    trace = config.trace(model_params, batch, masked=params)
    full_updates, state = _update(config, trace, masking.unmask(updates, model_params), state,
                                  model_params, batch, curvature, damping)
    return masking.remask(full_updates, updates), state
  return _update(config, config.trace(params, batch), updates, state, params, batch, curvature,
                 damping)


def _update(config: PreconditionConfig, trace: Trace, updates: PyTree,
            state: PreconditionState, params: PyTree, batch: PyTree,
            curvature: interpreter.Curvature | None,
            damping: Array | None = None) -> tuple[PyTree, PreconditionState]:
  if config.device_axis is not None:
    parallel.check_axis(config.device_axis)
    updates = parallel.pmean(updates, config.device_axis)
  check_state(trace, state)
  # A batch whose gradients or statistics are not finite changes nothing but a counter.
  grads_finite = tree_finite(updates)

  def statistics_step(s: PreconditionState) -> tuple[PreconditionState, Array]:
    new = update_statistics(config, trace, s, params, batch, curvature)
    finite = tree_finite(new.statistics)
    return jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, s), finite

  due = state.count % config.cov_update_every == 0
  new, finite = jax.lax.cond(grads_finite & due, statistics_step,
                             lambda s: (s, jnp.asarray(True)), state)
  finite = finite & grads_finite
  damping = value(config.damping, state.count) if damping is None else damping
  damping = jnp.maximum(damping, MIN_DAMPING)
  new = jax.lax.cond(finite & (state.count % config.invert_every == 0),
                     lambda s: update_inverses(config, trace, s, damping), lambda s: s, new)
  preconditioned = precondition_gradients(trace, new.inverses, updates)
  preconditioned = jax.tree_util.tree_map(
      lambda g: jnp.where(finite, g, jnp.zeros_like(g)), preconditioned)
  skipped = jnp.logical_not(finite).astype(state.skipped_steps.dtype)
  new = new._replace(count=jnp.where(finite, optax.safe_increment(state.count), state.count),
                     skipped_steps=state.skipped_steps + skipped)
  return preconditioned, new


def precondition(loss_fn: Callable[..., Any], example_batch: PyTree, *,
                 damping: ScalarOrSchedule,
                 cov_ema_decay: float = 0.95,
                 cov_update_every: int = 1,
                 invert_every: int = 10,
                 estimation: str = "fisher",
                 inverse_method: str = "cholesky",
                 approximations: Mapping[str, str] | None = None,
                 seed: int = 0,
                 auto_register: bool = True,
                 axis_name: str | None = None,
                 placement: str | None = None,
                 mesh: jax.sharding.Mesh | None = None,
                 sub_sample_patches: float | None = None,
                 example_params: PyTree | None = None,
                 strict: bool = False
                 ) -> optax.GradientTransformationExtraArgs:
  """Preconditions gradients with the K-FAC approximation of the inverse Fisher.

  Args:
    loss_fn: `loss_fn(params, batch)`, the mean over the batch of per-example losses,
      with its layers tagged (`jkfac.flax.Dense`/`Conv`, `jkfac.register_dense`, ...)
      and its loss registered (`jkfac.register_softmax_cross_entropy`, ...). It may
      return `(loss, aux)`; only its tags are used.
    example_batch: a batch, or `jax.ShapeDtypeStruct`s with its shapes and dtypes.
    damping: Tikhonov damping λ (float or schedule of the step), > 0; values below
      `MIN_DAMPING` (1e-8), e.g. from a schedule, are raised to it.
    cov_ema_decay: EMA decay of the curvature statistics per step, in [0, 1) (or a
      schedule).
    cov_update_every: statistics are computed on every this many steps; each update
      then decays the EMA by `cov_ema_decay ** cov_update_every`, so the EMA's memory
      in steps does not depend on the cadence.
    invert_every: inverses are recomputed on every this many steps.
    estimation: "fisher" (sampled targets), "empirical" (true targets) or "exact"
      (one backward pass per output unit).
    inverse_method: "cholesky" or "eigh".
    approximations: glob patterns on layer names (e.g. `{"Conv_0": "diagonal"}`; a
      pattern also matches a suffix of the name after a "/", so "Conv_0" matches
      "params/Conv_0") choosing the approximation of layers whose tag names none
      (patterns that match one layer must agree); by default each kind's first
      approximation in `jkfac.blocks.REGISTRY` ("kron", "kron_indep" for a multi-use
      layer or a tied embedding, "diagonal" for a scale-and-shift layer).
    seed: seed of the PRNG key that samples targets.
    auto_register: also precondition untagged dense, conv, embedding and norm
      (scale-and-shift) layers that jkfac recognises in the jaxpr. Hand tags win.
    axis_name: the `jax.pmap` axis to average gradients and statistics over; with
      `mesh`, the mesh axis that spreads inverse work under `jax.jit`.
    placement: "round_robin" (default with an axis) inverts each factor on one device
      and shares it; "replicated" inverts everything on every device.
    mesh: for `jax.jit` with a batch sharded over this mesh (data parallel). Arrays
      are global there, so nothing is averaged by hand.
    sub_sample_patches: as in tensorflow/kfac: estimate each conv layer's input factor
      A from at most `int(sub_sample_patches * d_in)` of the batch's patch rows
      (examples times output positions; `d_in` the patch size), drawn uniformly
      without replacement with a fresh key on every statistics step; G still uses
      every position. Cheaper A for large images, unbiased but noisier. Applies to
      conv layers of one use under "kron", "kron_in_diag" and "kron_out_diag"; None
      uses every patch.
    example_params: the whole model's parameters (or their shapes), needed only inside
      `optax.masked` / `optax.multi_transform`, which show jkfac part of them; then pass
      `model_params=params` (the whole model's) to `update` as well. Layers with
      parameters outside the mask are left to the other transformations.
    strict: raise `ValueError` in `init`, instead of a `GenericBlockWarning`, when a
      parameter with two or more dimensions gets a generic diagonal block because no
      recognised layer uses it, and instead of a `LossScaleWarning` when `loss_fn`'s value
      is far from its registered losses' (see `jkfac.check_loss_scale`; checked when
      `init` gets concrete parameters and `example_batch` holds values).

  Returns:
    An optax transformation: `update(grads, state, params, batch=batch)`, optionally
    with `curvature=` from `jkfac.value_and_grad` to reuse its forward pass, and
    `damping=` (an array, e.g. an adaptive optimizer's) in place of `damping`.

  Example:
    >>> tx = optax.chain(jkfac.precondition(loss_fn, batch, damping=1e-3),
    ...                  optax.sgd(0.1, momentum=0.9))
  """
  config = PreconditionConfig(
      loss_fn, example_batch, damping=damping, cov_ema_decay=cov_ema_decay,
      cov_update_every=cov_update_every, invert_every=invert_every, estimation=estimation,
      inverse_method=inverse_method, approximations=approximations, seed=seed,
      auto_register=auto_register, axis_name=axis_name, placement=placement, mesh=mesh,
      sub_sample_patches=sub_sample_patches, example_params=example_params, strict=strict)

  def update_fn(updates, state, params=None, *, batch=None, curvature=None, stats=None,
                model_params=None, damping=None, **extra_args):
    del extra_args
    check(params is not None and batch is not None,
           "jkfac needs the parameters and the batch: "
           "tx.update(grads, state, params, batch=batch).")
    if stats is not None:
      warnings.warn("tx.update(..., stats=) is deprecated; pass curvature= instead.",
                    DeprecationWarning, stacklevel=2)
      curvature = stats if curvature is None else curvature
    return update(config, updates, state, params, batch, curvature, model_params, damping)

  return optax.GradientTransformationExtraArgs(functools.partial(init_state, config), update_fn)
