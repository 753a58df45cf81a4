"""K-FAC as optax gradient transformations with pure pytree state.

`precondition(...)` maps gradients `g` to `F^-1 g` block by block; `kfac(...)` chains
it with momentum and a learning rate, as `optax.adam` chains `scale_by_adam` with
`scale_by_learning_rate`. Statistics, EMAs and inverses are refreshed inside `update`
with `lax.cond`, so a jitted train step does all K-FAC work and compiles once. Static
settings live in a frozen `PreconditionConfig`, arrays in the state.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import warnings
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jkfac import blocks, interpreter, layer_table, layers, linalg, losses, masking, parallel
from jkfac import loss_check
from jkfac import statistics as layer_stats
from jkfac.blocks import Block, StackedBlock
from jkfac.layer_info import LayerInfo, Trace

Array = jax.Array
PyTree = Any
ScalarOrSchedule = float | Array | Callable[[Array], Array]


class PreconditionState(NamedTuple):
  """All K-FAC arrays of `precondition`: a plain pytree.

  count:        steps taken so far.
  key:          PRNG key for sampling targets (MC Fisher).
  ema_weight:   accumulated EMA weight; statistics / ema_weight is bias corrected.
  damping:      the damping the current inverses were computed with.
  statistics:   per layer name, the raw (not yet bias corrected) EMAs of the block's
                statistics (e.g. "A" and "G" for "kron", "diagonal", "F").
  inverses:     per layer name, the damped inverses of the block.
  skipped_steps:     steps skipped because their gradients or statistics were not
                     finite; such a step changes nothing else in the state.
  inverse_fallbacks: layer inversions (slices, for stacked layers) that were not finite
                     even with eigh and kept the layer's previous inverses.
  """
  count: Array
  key: Array
  ema_weight: Array
  damping: Array
  statistics: dict[str, dict[str, Array]]
  inverses: dict[str, dict[str, Array]]
  skipped_steps: Array
  inverse_fallbacks: Array


# Scheduled or injected damping below this is raised to it: zero or negative damping
# would make the factors singular and their inverses fall back for good.
MIN_DAMPING = 1e-8
# The default floor of adaptive K-FAC's damping (`kfac(min_damping=)`). ρ is measured on
# the batch the quadratic model was fitted to, so it stays near 1 and keeps lowering λ;
# far below 1e-4 the steps fit single batches (MNIST MLP, batch 128: the training loss
# rose from 0.04 to 0.14 over 50 steps at λ = 1e-6 and ended at 0.035 with this floor).
DEFAULT_MIN_DAMPING = 1e-4
# `kfac`'s default cadences `(cov_update_every, invert_every)`: those that reached the
# target loss in the fewest seconds in benchmarks/convergence.py (seed convnet and MLP
# on MNIST, this project's CPU; README "Performance"). A fixed-learning-rate step is
# cheap enough to amortise statistics and inverses over many steps; an adaptive one
# adapts the damping every 5 steps, which reaches the preconditioner at inverse updates.
DEFAULT_CADENCE = (10, 100)
DEFAULT_ADAPTIVE_CADENCE = (5, 50)


def _is_number(value: Any) -> bool:
  return isinstance(value, numbers.Number) and not isinstance(value, bool)


def _check(ok: bool, message: str) -> None:
  if not ok:
    raise ValueError(message)


def _abstract(tree: PyTree) -> PyTree:
  return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)),
                                tree)


def _value(hyperparameter: ScalarOrSchedule, count: Array) -> Array:
  return jnp.asarray(hyperparameter(count) if callable(hyperparameter) else hyperparameter)


def _tree_finite(tree: PyTree) -> Array:
  """Whether every floating entry of `tree` is finite."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
            if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def state_dtype(params: PyTree) -> jnp.dtype:
  """The curvature state's dtype: float64 for float64 parameters, else float32."""
  dtypes = {jnp.result_type(x) for x in jax.tree_util.tree_leaves(params)}
  return jnp.dtype(jnp.float64) if jnp.dtype(jnp.float64) in dtypes else jnp.dtype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class PreconditionConfig:
  """The static settings of `precondition` (see its arguments), validated when built."""
  loss_fn: Callable[..., Any]
  example_batch: PyTree
  damping: ScalarOrSchedule
  cov_ema_decay: float = 0.95
  cov_update_every: int = 1
  invert_every: int = 10
  estimation: str = "fisher"
  inverse_method: str = "cholesky"
  approximations: Mapping[str, str] | None = None
  seed: int = 0
  auto_register: bool = True
  axis_name: str | None = None
  placement: str | None = None
  mesh: jax.sharding.Mesh | None = None
  sub_sample_patches: float | None = None
  example_params: PyTree | None = None
  strict: bool = False

  def __post_init__(self):
    _check(_is_number(self.damping) or callable(self.damping)
           or isinstance(self.damping, jax.Array),
           f"damping must be a positive number, a schedule or an array, got {self.damping!r}.")
    if _is_number(self.damping):
      _check(self.damping > 0, f"damping must be positive, got {self.damping}.")
    if self.damping is not None and _is_number(self.damping) and self.damping < MIN_DAMPING:
      warnings.warn(f"damping {self.damping} is below jkfac.transform.MIN_DAMPING "
                    f"({MIN_DAMPING}); it is raised to that floor.", stacklevel=3)
    _check(_is_number(self.cov_ema_decay) or callable(self.cov_ema_decay)
           or isinstance(self.cov_ema_decay, jax.Array),
           f"cov_ema_decay must be a number in [0, 1), a schedule or an array, got "
           f"{self.cov_ema_decay!r}.")
    if _is_number(self.cov_ema_decay):
      _check(0 <= self.cov_ema_decay < 1,
             f"cov_ema_decay must be in [0, 1), got {self.cov_ema_decay}.")
    for name in ("cov_update_every", "invert_every"):
      every = getattr(self, name)
      if not isinstance(every, jax.Array):  # arrays come from optax.inject_hyperparams
        _check(isinstance(every, numbers.Integral) and not isinstance(every, bool)
               and every >= 1, f"{name} must be an integer >= 1, got {every!r}.")
    _check(self.estimation in losses.ESTIMATIONS,
           f"Unknown estimation {self.estimation!r}; expected one of {losses.ESTIMATIONS}.")
    _check(self.inverse_method in linalg.INVERSE_METHODS,
           f"Unknown inverse_method {self.inverse_method!r}; expected one of "
           f"{linalg.INVERSE_METHODS}.")
    for pattern, approx in (self.approximations or {}).items():
      _check(approx in blocks.APPROXIMATIONS,
             f"Unknown approximation {approx!r} for {pattern!r}; expected one of "
             f"{blocks.APPROXIMATIONS}.")
    _check(self.sub_sample_patches is None or (_is_number(self.sub_sample_patches)
                                               and self.sub_sample_patches > 0),
           f"sub_sample_patches must be None or a positive number, got "
           f"{self.sub_sample_patches!r}.")
    _check(self.placement is None or self.placement in parallel.PLACEMENTS,
           f"Unknown placement {self.placement!r}; expected one of {parallel.PLACEMENTS}.")
    if self.mesh is not None:
      _check(self.axis_name in self.mesh.axis_names,
             f"With mesh=, axis_name must name one of its axes {self.mesh.axis_names}; got "
             f"{self.axis_name!r}.")
    object.__setattr__(self, "_concrete_batch", self.example_batch)  # for the loss check
    object.__setattr__(self, "example_batch", _abstract(self.example_batch))
    if self.example_params is not None:
      object.__setattr__(self, "example_params", _abstract(self.example_params))
    object.__setattr__(self, "placement",
                       self.placement or ("round_robin" if self.axis_name else "replicated"))

  @property
  def device_axis(self) -> str | None:
    """The pmap axis to average over (None under `jax.jit` with a mesh, or alone)."""
    return self.axis_name if self.mesh is None else None

  def trace(self, params: PyTree, batch: PyTree, masked: PyTree | None = None) -> Trace:
    """The checked layer table of `loss_fn` at these shapes; with `masked` (the view
    `optax.masked` gives of `params`), only its layers."""
    trace = layer_table.trace_with_approximations(
        self.loss_fn, params, batch, approximations=self.approximations,
        auto_register=self.auto_register)
    if masked is None:
      return trace
    return masking.only_present(trace, masking.present_leaves(masked, params))


_MASKED = ("jkfac is inside optax.masked or optax.multi_transform, so it sees only part of "
           "the parameters, but its statistics need a forward pass of the whole model: ")


# --- the update steps ---------------------------------------------------------------


def init_state(config: PreconditionConfig, params: PyTree) -> PreconditionState:
  """Zero statistics and identity inverses for every layer of `config.loss_fn`."""
  if masking.is_masked(params):
    _check(config.example_params is not None,
           _MASKED + "pass example_params=params (or their shapes) to jkfac.")
    trace = config.trace(config.example_params, config.example_batch, masked=params)
  else:
    trace = config.trace(_abstract(params), config.example_batch)
  layer_table.check_coverage(trace, config.strict)
  loss_check.check_if_concrete(config.loss_fn, params, config._concrete_batch, config.strict)
  dtype = state_dtype(params)
  statistics = {layer.name: jax.tree_util.tree_map(
                    lambda z: z.astype(dtype),
                    blocks.for_layer(layer).zeros(*layers.matrix_shape(layer)))
                for layer in trace.every_layer}
  inverses = {layer.name: blocks.for_layer(layer).identity(statistics[layer.name])
              for layer in trace.every_layer}
  zero = jnp.zeros([], jnp.int32)
  return PreconditionState(count=zero, key=jax.random.PRNGKey(config.seed),
                           ema_weight=jnp.zeros([], dtype), damping=jnp.zeros([], dtype),
                           statistics=statistics, inverses=inverses, skipped_steps=zero,
                           inverse_fallbacks=zero)


def check_state(trace: Trace, state: PreconditionState) -> None:
  """Raises `ValueError` naming the first layer whose state does not fit the traced model
  (a state from another model, e.g. an old checkpoint)."""
  expected = {layer.name: jax.eval_shape(lambda layer=layer: blocks.for_layer(layer).zeros(
      *layers.matrix_shape(layer))) for layer in trace.every_layer}
  if set(expected) != set(state.statistics):
    missing = sorted(set(expected) - set(state.statistics))
    extra = sorted(set(state.statistics) - set(expected))
    raise ValueError(f"The K-FAC state does not belong to this model: layers missing from the "
                     f"state {missing}, layers of another model {extra}.")
  for name, arrays in expected.items():
    for factor, want in arrays.items():
      got = state.statistics[name].get(factor)
      if got is None or jnp.shape(got) != want.shape:
        raise ValueError(f"The K-FAC state does not belong to this model: layer {name!r} "
                         f"factor {factor!r} has shape {None if got is None else jnp.shape(got)}"
                         f" in the state but {want.shape} for these parameters.")


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
  decay = _value(config.cov_ema_decay, state.count).astype(state.ema_weight.dtype)
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


def update_inverses(config: PreconditionConfig, trace: Trace, state: PreconditionState,
                    damping: Array) -> PreconditionState:
  """Damped inverses of every block, each factor inverted on one device (see `parallel`).

  A layer whose new inverses are not finite (after an eigh retry of a failed Cholesky)
  keeps all its previous inverses, and `inverse_fallbacks` counts it.
  """
  tasks, costs, slots = [], [], []
  for layer in trace.every_layer:
    layer_block = blocks.for_layer(layer)
    corrected = jax.tree_util.tree_map(lambda c: c / state.ema_weight,
                                       state.statistics[layer.name])
    if layer_block.joint is not None:  # one task for the whole block
      tasks.append((functools.partial(_invert_jointly, layer_block, config.inverse_method),
                    (corrected, damping)))
      costs.append(sum(_inverse_cost(layer_block, c) for c in corrected.values()))
      slots.append((layer.name, None))
      continue
    for factor, (matrix, damping_added) in layer_block.factors(corrected, damping).items():
      tasks.append((functools.partial(_invert_factor, layer_block, config.inverse_method),
                    (matrix, damping_added)))
      costs.append(_inverse_cost(layer_block, matrix))
      slots.append((layer.name, factor))
  results = parallel.run_tasks(tasks, costs, axis_name=config.axis_name,
                               placement=config.placement, mesh=config.mesh)
  new: dict[str, dict[str, Array]] = {name: {} for name in state.inverses}
  for (name, factor), inverse in zip(slots, results):
    new[name].update(inverse if factor is None else {factor: inverse})
  inverses, statistics, fallbacks = {}, dict(state.statistics), state.inverse_fallbacks
  for layer in trace.every_layer:
    layer_block = blocks.for_layer(layer)
    inverses[layer.name], fell_back = layer_block.finite_or_previous(
        new[layer.name], state.inverses[layer.name])
    fallbacks = fallbacks + fell_back.astype(fallbacks.dtype)
    if layer_block.rebase is not None:  # EKFAC: the scaling restarts in the new basis
      statistics[layer.name] = layer_block.rebase(statistics[layer.name],
                                                  inverses[layer.name], state.ema_weight)
  return state._replace(inverses=inverses, statistics=statistics, inverse_fallbacks=fallbacks,
                        damping=jnp.asarray(damping, state.damping.dtype))


def _inverse_cost(layer_block: Block | StackedBlock, factor: Array) -> int:
  """The work of inverting `factor`: its size if entrywise or not square, else `d^3` per
  matrix (a stacked factor holds several)."""
  square = factor.ndim >= 2 and factor.shape[-1] == factor.shape[-2]
  return factor.size * (factor.shape[-1] if square and not layer_block.is_entrywise(factor)
                        else 1)


def _invert_factor(layer_block: Block | StackedBlock, method: str, factor: Array,
                   damping: Array) -> Array:
  """The damped inverse of `factor`; a Cholesky inverse that is not finite (round-off
  made the factor indefinite) is computed again with eigh, only then."""
  inverse = layer_block.invert(factor, damping, method)
  if method != "cholesky" or layer_block.is_entrywise(factor):
    return inverse
  return jax.lax.cond(jnp.all(jnp.isfinite(inverse)), lambda: inverse,
                      lambda: layer_block.invert(factor, damping, "eigh"))


def _invert_jointly(layer_block: Block | StackedBlock, method: str,
                    statistics: dict[str, Array], damping: Array) -> dict[str, Array]:
  """The inverses of a block inverted as a whole (`Block.joint`)."""
  return layer_block.invert_jointly(statistics, damping, method)


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
  _check(jax.tree_util.tree_structure(updates) == jax.tree_util.tree_structure(params),
         "The gradients and the parameters passed to jkfac have different tree structures.")
  if masking.is_masked(params):
    _check(model_params is not None, _MASKED + "pass tx.update(..., model_params=params), "
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
  grads_finite = _tree_finite(updates)

  def statistics_step(s: PreconditionState) -> tuple[PreconditionState, Array]:
    new = update_statistics(config, trace, s, params, batch, curvature)
    finite = _tree_finite(new.statistics)
    return jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, s), finite

  due = state.count % config.cov_update_every == 0
  new, finite = jax.lax.cond(grads_finite & due, statistics_step,
                             lambda s: (s, jnp.asarray(True)), state)
  finite = finite & grads_finite
  damping = _value(config.damping, state.count) if damping is None else damping
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
    _check(params is not None and batch is not None,
           "jkfac needs the parameters and the batch: "
           "tx.update(grads, state, params, batch=batch).")
    if stats is not None:
      warnings.warn("tx.update(..., stats=) is deprecated; pass curvature= instead.",
                    DeprecationWarning, stacklevel=2)
      curvature = stats if curvature is None else curvature
    return update(config, updates, state, params, batch, curvature, model_params, damping)

  return optax.GradientTransformationExtraArgs(functools.partial(init_state, config), update_fn)


def kfac(loss_fn: Callable[..., Any], example_batch: PyTree, *,
         learning_rate: ScalarOrSchedule | None = None,
         damping: ScalarOrSchedule | None = None,
         momentum: ScalarOrSchedule | None = 0.9,
         momentum_type: str = "regular",
         cov_ema_decay: float = 0.95,
         cov_update_every: int | None = None,
         invert_every: int | None = None,
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
         strict: bool = False,
         adapt_damping: bool = False,
         damping_adaptation_interval: int = 5,
         damping_adaptation_decay: float = 0.95,
         min_damping: float = DEFAULT_MIN_DAMPING,
         max_damping: float = math.inf,
         norm_constraint: float | None = None,
         l2_reg: float | None = None,
         l2_reg_exclude: Any = None,
         num_burnin_steps: int | None = None) -> optax.GradientTransformationExtraArgs:
  """The K-FAC optimizer: `-learning_rate * momentum(F^-1 g)`, or adaptive K-FAC.

  With `momentum_type="regular"` the momentum buffer accumulates preconditioned
  gradients; with "adam" (tensorflow/kfac's default) it accumulates raw gradients,
  which are then preconditioned (`v <- momentum v + g`, step `F^-1 v`). The other
  arguments up to `strict` are `jkfac.precondition`'s, but `cov_update_every` and
  `invert_every` default to the cadences measured fastest in seconds: statistics every 10
  steps and inverses every 100 (`DEFAULT_CADENCE`), or every 5 and 50 for adaptive K-FAC
  (`DEFAULT_ADAPTIVE_CADENCE`). Use as any optax optimizer,
  passing the batch: `tx.update(grads, opt_state, params, batch=batch)`. With
  `optax.inject_hyperparams`, pass `static_args=("loss_fn", "example_batch")`.

  Adaptive K-FAC (`jkfac.adaptive`; any of these keywords switches it on):
    momentum_type: also "qmodel": the step `alpha F^-1 g + mu v` (v the previous update)
      with (alpha, mu) minimising the exact (GGN) quadratic model on the batch, plus
      damping; "qmodel_fixedmu": mu = `momentum`, alpha from the model. `learning_rate`
      may then be None (else it multiplies the model's step).
    adapt_damping: Levenberg-Marquardt: every `damping_adaptation_interval` steps the
      damping is multiplied by `damping_adaptation_decay ** interval` when the reduction
      ratio rho > 3/4 and divided by it when rho < 1/4, within [`min_damping`,
      `max_damping`] (default [1e-4, inf]: see `DEFAULT_MIN_DAMPING`);
      `damping` is the initial value (default 1e-3).
    norm_constraint: C > 0: `F^-1 g` is scaled by `min(1, sqrt(C / (lr^2 g^T F^-1 g)))`
      (KL clipping, Ba et al. 2017); with "regular" or "adam" only.
    l2_reg: weight decay `l2_reg * params` added to the gradients (and to the curvature
      of the quadratic model and the preconditioner's damping), except on the parameters
      whose path ("a/b/c") matches a glob pattern of `l2_reg_exclude` (e.g. `("*bias*",)`)
      or for which `l2_reg_exclude(path)` is true.
    num_burnin_steps: the first this many steps update the statistics only (zero updates).
  `jkfac.diagnostics(opt_state)` returns what each step did (damping, rho, alpha, ...).

  Example:
    >>> tx = jkfac.kfac(loss_fn, batch, learning_rate=1e-3, damping=1e-3)
    >>> opt_state = tx.init(params)
    >>> updates, opt_state = tx.update(grads, opt_state, params, batch=batch)
    >>> untuned = jkfac.kfac(loss_fn, batch, momentum_type="qmodel", adapt_damping=True)
  """
  from jkfac import adaptive  # adaptive K-FAC builds on this module

  _check(momentum_type in adaptive.MOMENTUM_TYPES,
         f"momentum_type must be one of {adaptive.MOMENTUM_TYPES}, got {momentum_type!r}.")
  _check(momentum is None or _is_number(momentum) or callable(momentum)
         or isinstance(momentum, jax.Array),
         f"momentum must be None, a number in [0, 1), a schedule or an array, got "
         f"{momentum!r}.")
  if _is_number(momentum):
    _check(0 <= momentum < 1, f"momentum must be in [0, 1), got {momentum}.")
  is_adaptive = (adapt_damping is not False or momentum_type in adaptive.QMODEL_TYPES
                 or any(v is not None for v in (norm_constraint, l2_reg, l2_reg_exclude,
                                                num_burnin_steps)))
  default_cov, default_invert = DEFAULT_ADAPTIVE_CADENCE if is_adaptive else DEFAULT_CADENCE
  cov_update_every = default_cov if cov_update_every is None else cov_update_every
  invert_every = default_invert if invert_every is None else invert_every
  config = None
  if is_adaptive:
    config = adaptive.AdaptiveConfig(
        loss_fn, example_batch, learning_rate=learning_rate, damping=damping,
        momentum=momentum, momentum_type=momentum_type, adapt_damping=adapt_damping,
        damping_adaptation_interval=damping_adaptation_interval,
        damping_adaptation_decay=damping_adaptation_decay, min_damping=min_damping,
        max_damping=max_damping, norm_constraint=norm_constraint, l2_reg=l2_reg,
        l2_reg_exclude=l2_reg_exclude, num_burnin_steps=num_burnin_steps,
        axis_name=axis_name, mesh=mesh, example_params=example_params)
    damping = config.initial_damping
  else:
    _check(learning_rate is not None, "learning_rate is required (only momentum_type "
           "'qmodel' and 'qmodel_fixedmu' may leave it None).")
    _check(damping is not None, "damping is required (unless adapt_damping=True).")
  preconditioner = precondition(
      loss_fn, example_batch, damping=damping, cov_ema_decay=cov_ema_decay,
      cov_update_every=cov_update_every, invert_every=invert_every, estimation=estimation,
      inverse_method=inverse_method, approximations=approximations, seed=seed,
      auto_register=auto_register, axis_name=axis_name, placement=placement, mesh=mesh,
      sub_sample_patches=sub_sample_patches, example_params=example_params, strict=strict)
  if config is not None:
    return adaptive.adaptive(config, preconditioner)
  accumulate = optax.identity() if momentum is None else scale_by_momentum(momentum)
  steps = [preconditioner, accumulate] if momentum_type == "regular" else [accumulate,
                                                                           preconditioner]
  return skip_with(optax.chain(*steps, optax.scale_by_learning_rate(learning_rate)),
                   steps.index(preconditioner))


def scale_by_momentum(decay: ScalarOrSchedule) -> optax.GradientTransformation:
  """`optax.trace(decay)`, with `decay` also a schedule of the step count."""
  if not callable(decay):
    return optax.trace(decay=decay)

  def init_fn(params):
    return optax.trace(decay=0.0).init(params), jnp.zeros([], jnp.int32)

  def update_fn(updates, state, params=None):
    trace_state, count = state
    updates, trace_state = optax.trace(decay=decay(count)).update(updates, trace_state, params)
    return updates, (trace_state, optax.safe_increment(count))

  return optax.GradientTransformation(init_fn, update_fn)


def skip_with(inner: optax.GradientTransformationExtraArgs,
              index: int) -> optax.GradientTransformationExtraArgs:
  """`inner` (a chain) that, when its `precondition` step (the `index`-th) skips a
  non-finite batch, returns zero updates and leaves every other state as it was: training
  then goes on as if the batch had not come."""

  def update_fn(updates, state, params=None, **extra_args):
    new_updates, new_state = inner.update(updates, state, params, **extra_args)
    skipped = new_state[index].skipped_steps > state[index].skipped_steps
    kept = jax.tree_util.tree_map(lambda n, o: jnp.where(skipped, o, n), new_state, state)
    kept = (*kept[:index], new_state[index], *kept[index + 1:])
    return jax.tree_util.tree_map(lambda u: jnp.where(skipped, jnp.zeros_like(u), u),
                                  new_updates), kept

  return optax.GradientTransformationExtraArgs(inner.init, update_fn)
