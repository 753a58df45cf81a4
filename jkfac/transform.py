"""K-FAC as optax gradient transformations with pure pytree state.

`precondition(...)` maps gradients `g` to `F^-1 g` block by block; `kfac(...)` chains
it with momentum and a learning rate, as `optax.adam` chains `scale_by_adam` with
`scale_by_learning_rate`. Statistics, EMAs and inverses are refreshed inside
`update` with `lax.cond`, so a jitted train step does all K-FAC work and compiles
once. Static configuration lives in the closure, arrays in the state.
"""

from __future__ import annotations

import fnmatch
import functools
import math
import numbers
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jkfac import blocks, layers, linalg, losses, parallel, tags, tracer
from jkfac.blocks import Block, diagonal

Array = jax.Array
PyTree = Any
ScalarOrSchedule = float | Array | Callable[[Array], Array]

_CONV_APPROXIMATIONS = ("kron", "kron_indep", "kron_reduce", "kron_in_diag", "kron_out_diag",
                        "diagonal", "full")
SUPPORTED_APPROXIMATIONS = {"dense": ("kron", "kron_indep", "kron_in_diag", "kron_out_diag",
                                      "diagonal", "full"),
                            "conv1d": _CONV_APPROXIMATIONS,
                            "conv2d": _CONV_APPROXIMATIONS,
                            "conv3d": _CONV_APPROXIMATIONS,
                            "embedding": ("kron", "kron_indep"),
                            "tied_embedding": ("kron_indep",),
                            "scale_and_shift": ("diagonal", "full"),
                            "generic": ("diagonal",)}
# Approximations whose input factor is estimated apart from G: those `sub_sample_patches` thins.
_SEPARATE_INPUT_FACTOR = ("kron", "kron_indep", "kron_in_diag", "kron_out_diag")


class PreconditionState(NamedTuple):
  """All K-FAC arrays of `precondition`: a plain pytree.

  count:        steps taken so far.
  key:          PRNG key for sampling targets (MC Fisher).
  ema_weight:   accumulated EMA weight; covariances / ema_weight is bias corrected.
  damping:      the damping the current inverses were computed with.
  covariances:  per layer name, the raw (not yet bias corrected) EMAs of the block.
  inverses:     per layer name, the damped inverses of the block.
  """
  count: Array
  key: Array
  ema_weight: Array
  damping: Array
  covariances: dict[str, dict[str, Array]]
  inverses: dict[str, dict[str, Array]]


def _check(ok: bool, message: str) -> None:
  if not ok:
    raise ValueError(message)


def _is_number(value: Any) -> bool:
  return isinstance(value, numbers.Number) and not isinstance(value, bool)


def _validate(damping, cov_ema_decay, cov_update_every, invert_every, estimation,
              inverse_method, approximations, axis_name, placement, mesh,
              sub_sample_patches) -> None:
  if _is_number(damping):
    _check(damping > 0, f"damping must be positive, got {damping}.")
  if _is_number(cov_ema_decay):
    _check(0 <= cov_ema_decay < 1, f"cov_ema_decay must be in [0, 1), got {cov_ema_decay}.")
  for name, every in (("cov_update_every", cov_update_every), ("invert_every", invert_every)):
    if not isinstance(every, jax.Array):  # arrays come from optax.inject_hyperparams
      _check(isinstance(every, numbers.Integral) and not isinstance(every, bool) and every >= 1,
             f"{name} must be an integer >= 1, got {every!r}.")
  _check(estimation in losses.ESTIMATIONS,
         f"Unknown estimation {estimation!r}; expected one of {losses.ESTIMATIONS}.")
  _check(inverse_method in linalg.INVERSE_METHODS,
         f"Unknown inverse_method {inverse_method!r}; expected one of {linalg.INVERSE_METHODS}.")
  for pattern, approx in (approximations or {}).items():
    _check(approx in tags.APPROXIMATIONS,
           f"Unknown approximation {approx!r} for {pattern!r}; expected one of "
           f"{tags.APPROXIMATIONS}.")
  _check(sub_sample_patches is None or (_is_number(sub_sample_patches)
                                        and sub_sample_patches > 0),
         f"sub_sample_patches must be None or a positive number, got {sub_sample_patches!r}.")
  _check(placement is None or placement in parallel.PLACEMENTS,
         f"Unknown placement {placement!r}; expected one of {parallel.PLACEMENTS}.")
  if mesh is not None:
    _check(axis_name in mesh.axis_names,
           f"With mesh=, axis_name must name one of its axes {mesh.axis_names}; got {axis_name!r}.")


def _value(hyperparameter: ScalarOrSchedule, count: Array) -> Array:
  return hyperparameter(count) if callable(hyperparameter) else jnp.asarray(hyperparameter)


def _abstract(tree: PyTree) -> PyTree:
  return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)),
                                tree)


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
                 sub_sample_patches: float | None = None
                 ) -> optax.GradientTransformationExtraArgs:
  """Preconditions gradients with the K-FAC approximation of the inverse Fisher.

  Args:
    loss_fn: `loss_fn(params, batch)`, the mean over the batch of per-example losses,
      with its layers tagged (`jkfac.flax.Dense`/`Conv`, `jkfac.register_dense`, ...)
      and its loss registered (`jkfac.register_softmax_cross_entropy`, ...). It may
      return `(loss, aux)`; only its tags are used.
    example_batch: a batch, or `jax.ShapeDtypeStruct`s with its shapes and dtypes.
    damping: Tikhonov damping λ (float or schedule of the step), > 0.
    cov_ema_decay: EMA decay of the covariance statistics, in [0, 1).
    cov_update_every: statistics are computed on every this many steps.
    invert_every: inverses are recomputed on every this many steps.
    estimation: "fisher" (sampled targets), "empirical" (true targets) or "exact"
      (one backward pass per output unit).
    inverse_method: "cholesky" or "eigh".
    approximations: glob patterns on layer names (e.g. `{"Conv_0": "diagonal"}`)
      choosing the approximation of layers whose tag names none (patterns that match
      one layer must agree); default "kron" ("kron_indep" for a multi-use layer or a
      tied embedding, "diagonal" for a scale-and-shift layer, see
      `jkfac.tags.DEFAULT_APPROX`).
    seed: seed of the PRNG key that samples targets.
    auto_register: also precondition untagged dense, conv, embedding and norm
      (scale-and-shift) layers that jkfac recognises in the jaxpr (see
      `jkfac/patterns.py`). Hand tags win.
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

  Returns:
    An optax transformation: `update(grads, state, params, batch=batch)`.
  """
  _validate(damping, cov_ema_decay, cov_update_every, invert_every, estimation,
            inverse_method, approximations, axis_name, placement, mesh, sub_sample_patches)
  example_batch = _abstract(example_batch)
  placement = placement or ("round_robin" if axis_name else "replicated")
  device_axis = axis_name if mesh is None else None  # the pmap axis, if any

  layer_table = functools.partial(trace_with_approximations, loss_fn,
                                  approximations=approximations, auto_register=auto_register)

  def init_fn(params: PyTree) -> PreconditionState:
    trace = layer_table(_abstract(params), example_batch)
    every = trace.layers + trace.generic
    covariances = {layer.name: blocks.for_layer(layer).zeros(*layers.matrix_shape(layer))
                   for layer in every}
    inverses = {layer.name: blocks.for_layer(layer).identity(covariances[layer.name])
                for layer in every}
    return PreconditionState(count=jnp.zeros([], jnp.int32), key=jax.random.PRNGKey(seed),
                             ema_weight=jnp.zeros([]), damping=jnp.zeros([]),
                             covariances=covariances, inverses=inverses)

  def update_covariances(state, params, batch, stats, trace):
    key, sample_key = jax.random.split(state.key)
    if device_axis is not None:  # different targets on every device
      sample_key = jax.random.fold_in(sample_key, jax.lax.axis_index(device_axis))
    patch_key = None
    if sub_sample_patches is not None:
      sample_key, patch_key = jax.random.split(sample_key)
    if stats is None:
      stats = tracer.linearize(loss_fn, params, batch, auto_register)
    statistics = tracer.statistics(trace, stats, sample_key, estimation)
    new = {layer.name: _batch_statistics(
               layer, statistics[layer.name], sub_sample_patches,
               None if patch_key is None else jax.random.fold_in(patch_key, index))
           for index, layer in enumerate(trace.layers + trace.generic)}
    new = parallel.pmean(new, device_axis)
    decay = jnp.asarray(cov_ema_decay, state.ema_weight.dtype)
    covariances = jax.tree_util.tree_map(lambda old, x: decay * old + (1 - decay) * x.astype(
        old.dtype), state.covariances, new)
    return state._replace(key=key, covariances=covariances,
                          ema_weight=decay * state.ema_weight + (1 - decay))

  def update_inverses(state, damping_now, trace):
    tasks, costs, slots = [], [], []
    for layer in trace.layers + trace.generic:
      layer_block = blocks.for_layer(layer)
      covariances = jax.tree_util.tree_map(lambda c: c / state.ema_weight,
                                           state.covariances[layer.name])
      if layer_block.joint is not None:  # one task for the whole block
        invert = functools.partial(_invert_jointly_or_keep, layer_block, inverse_method)
        tasks.append((invert, (covariances, damping_now, state.inverses[layer.name])))
        costs.append(sum(_inverse_cost(layer_block, c) for c in covariances.values()))
        slots.append((layer.name, None))
        continue
      for factor, (matrix, damping_added) in layer_block.factors(covariances, damping_now).items():
        invert = functools.partial(_invert_or_keep, layer_block, inverse_method)
        tasks.append((invert, (matrix, damping_added, state.inverses[layer.name][factor])))
        costs.append(_inverse_cost(layer_block, matrix))
        slots.append((layer.name, factor))
    results = parallel.run_tasks(tasks, costs, axis_name=axis_name, placement=placement,
                                 mesh=mesh)
    inverses = {name: dict(factors) for name, factors in state.inverses.items()}
    for (name, factor), inverse in zip(slots, results):
      if factor is None:
        inverses[name] = dict(inverse)
      else:
        inverses[name][factor] = inverse
    return state._replace(inverses=inverses,
                          damping=jnp.asarray(damping_now, state.damping.dtype))

  def update_fn(updates, state, params=None, *, batch=None, stats=None, **extra_args):
    """`stats`, optional: the `Curvature` from `jkfac.value_and_grad`, saving a forward pass."""
    del extra_args
    _check(params is not None and batch is not None,
           "jkfac needs the parameters and the batch: "
           "tx.update(grads, state, params, batch=batch).")
    _check(jax.tree_util.tree_structure(updates) == jax.tree_util.tree_structure(params),
           "The gradients and the parameters passed to jkfac have different tree structures.")
    if device_axis is not None:
      parallel.check_axis(device_axis)
      updates = parallel.pmean(updates, device_axis)
    trace = layer_table(params, batch)
    state = jax.lax.cond(state.count % cov_update_every == 0,
                         lambda s: update_covariances(s, params, batch, stats, trace),
                         lambda s: s, state)
    damping_now = _value(damping, state.count)
    state = jax.lax.cond(state.count % invert_every == 0,
                         lambda s: update_inverses(s, damping_now, trace), lambda s: s, state)
    updates = _precondition_gradients(trace, state.inverses, updates)
    return updates, state._replace(count=optax.safe_increment(state.count))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _batch_statistics(layer: tracer.LayerInfo, statistics: tracer.LayerStatistics,
                      sub_sample_patches: float | None = None, key: Array | None = None):
  """The block statistics of one layer for one batch, from every use of the layer; see
  `precondition` for `sub_sample_patches` (`key` draws the patch rows)."""
  if layer.kind == "generic":
    return diagonal.generic_statistics(statistics.output_grads[0])
  reduce = layer.approx == "kron_reduce"
  sample = None
  if (sub_sample_patches is not None and layer.kind in tags.CONV_KINDS
      and layer.approx in _SEPARATE_INPUT_FACTOR and not layer.multi_use):
    sample = layers.sample_rows(layer, sub_sample_patches, key)
  xs = [layers.scan_axes_first(scans, x) for scans, x in zip(layer.scans, statistics.inputs)]
  gs = [layers.scan_axes_first(scans, g, skip=1)
        for scans, g in zip(layer.scans, statistics.output_grads)]

  def one_layer(xs, gs):
    return blocks.for_slice(layer).statistics(*layers.block_inputs(layer, xs, gs, reduce,
                                                                   sample))

  if layer.stack:  # independent layers: one block each
    return jax.vmap(one_layer, in_axes=(0, 1))(xs, gs)
  return one_layer([x[0] for x in xs], [g[:, 0] for g in gs])


def _inverse_cost(layer_block: Block | blocks.StackedBlock, factor: Array) -> int:
  """The work of inverting `factor`: its size if entrywise, else `d^3` per matrix (a
  stacked factor holds several)."""
  return factor.size * (1 if layer_block.is_entrywise(factor) else factor.shape[-1])


def _invert_or_keep(layer_block: Block | blocks.StackedBlock, method: str, factor: Array,
                    damping: Array, previous: Array) -> Array:
  """The damped inverse of `factor`, or `previous` if it is not finite (slice by slice
  for a stacked factor)."""
  return layer_block.keep_finite(layer_block.invert(factor, damping, method), previous)


def _invert_jointly_or_keep(layer_block: Block | blocks.StackedBlock, method: str,
                            covariances: dict[str, Array], damping: Array,
                            previous: dict[str, Array]) -> dict[str, Array]:
  """The inverses of a block inverted as a whole (`Block.joint`), or `previous` if they are
  not finite (slice by slice for a stacked block)."""
  return layer_block.joint_or_keep(covariances, damping, previous, method)


def _precondition_layer(layer: tracer.LayerInfo, inverses, w: Array, b: Array | None):
  """One layer's (unstacked) gradients `w`, `b` times its inverse block."""
  matrix = layers.param_matrix(layer, w, b)
  matrix = blocks.for_slice(layer).precondition(inverses, matrix.astype(
      jax.tree_util.tree_leaves(inverses)[0].dtype))
  return layers.split_param_matrix(layer, matrix)


def _precondition_gradients(trace: tracer.Trace, inverses, updates: PyTree) -> PyTree:
  """Applies each layer's inverse block (generic parameters' too) to its gradients."""
  leaves, treedef = jax.tree_util.tree_flatten(updates)
  for layer in trace.layers + trace.generic:
    indices = [i for i in (layer.weight, layer.bias) if i is not None]
    grads = [leaves[i] for i in indices] + [None] * (2 - len(indices))
    precondition = functools.partial(_precondition_layer, layer)
    if layer.stack:  # flatten the stack axes into one and map over it
      size = math.prod(layer.stack)
      grads = [g if g is None else g.reshape((size,) + g.shape[len(layer.stack):])
               for g in grads]
      precondition = jax.vmap(precondition)
    new = precondition(inverses[layer.name], *grads)
    for i, g in zip(indices, new):
      leaves[i] = g.reshape(leaves[i].shape).astype(leaves[i].dtype)
  return jax.tree_util.tree_unflatten(treedef, leaves)


def trace_with_approximations(loss_fn: Callable[..., Any], params: PyTree, batch: PyTree, *,
                              approximations: Mapping[str, str] | None = None,
                              auto_register: bool = True) -> tracer.Trace:
  """The layer table of `loss_fn`, each layer with its approximation, checked."""
  trace = tracer.trace_layers(loss_fn, params, batch,
                              approx_for=lambda name, kind: _match(approximations, name),
                              auto_register=auto_register)
  _check_approximations(trace, approximations)
  return trace


def _matches(approximations: Mapping[str, str] | None, name: str) -> dict[str, str]:
  """The `approximations` entries whose pattern matches layer `name`."""
  return {pattern: approx for pattern, approx in (approximations or {}).items()
          if fnmatch.fnmatchcase(name, pattern)}


def _match(approximations: Mapping[str, str] | None, name: str) -> str | None:
  return next(iter(_matches(approximations, name).values()), None)


def _check_approximations(trace: tracer.Trace, approximations: Mapping[str, str] | None) -> None:
  """Every pattern matches a layer, overlapping patterns agree, and every layer supports
  its approximation; errors name the layer's parameters."""
  names = [layer.name for layer in trace.layers]
  for pattern in approximations or {}:
    _check(any(fnmatch.fnmatchcase(n, pattern) for n in names),
           f"The approximation pattern {pattern!r} matches no layer; layers: {names}.")
  for layer in trace.layers:
    paths = [trace.param_paths[i] for i in (layer.weight, layer.bias) if i is not None]
    matches = _matches(approximations, layer.name)
    _check(len(set(matches.values())) <= 1,
           f"Layer {layer.name!r} (parameters {paths}) is matched by approximation patterns "
           f"that disagree: {matches}; make the patterns disjoint.")
    supported = SUPPORTED_APPROXIMATIONS[layer.kind]
    _check(layer.approx in supported,
           f"Layer {layer.name!r} ({layer.kind}, parameters {paths}) does not support the "
           f"{layer.approx!r} approximation; supported: {supported}.")


def kfac(loss_fn: Callable[..., Any], example_batch: PyTree, *,
         learning_rate: ScalarOrSchedule,
         damping: ScalarOrSchedule,
         momentum: float | None = 0.9,
         momentum_type: str = "regular",
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
         sub_sample_patches: float | None = None) -> optax.GradientTransformationExtraArgs:
  """The K-FAC optimizer: `-learning_rate * momentum(F^-1 g)`.

  With `momentum_type="regular"` the momentum buffer accumulates preconditioned
  gradients; with "adam" (the seed's default) it accumulates raw gradients, which
  are then preconditioned (`v <- momentum v + g`, step `F^-1 v`). The other arguments
  are `jkfac.precondition`'s. Use as any optax optimizer, passing the batch:
  `tx.update(grads, opt_state, params, batch=batch)`. With `optax.inject_hyperparams`,
  pass `static_args=("loss_fn", "example_batch")`.
  """
  _check(momentum_type in ("regular", "adam"),
         f"momentum_type must be 'regular' or 'adam', got {momentum_type!r}.")
  if _is_number(momentum):
    _check(0 <= momentum < 1, f"momentum must be in [0, 1), got {momentum}.")
  preconditioner = precondition(
      loss_fn, example_batch, damping=damping, cov_ema_decay=cov_ema_decay,
      cov_update_every=cov_update_every, invert_every=invert_every, estimation=estimation,
      inverse_method=inverse_method, approximations=approximations, seed=seed,
      auto_register=auto_register, axis_name=axis_name, placement=placement, mesh=mesh,
      sub_sample_patches=sub_sample_patches)
  accumulate = optax.identity() if momentum is None else optax.trace(decay=momentum)
  steps = [preconditioner, accumulate] if momentum_type == "regular" else [accumulate,
                                                                           preconditioner]
  return optax.chain(*steps, optax.scale_by_learning_rate(learning_rate))
