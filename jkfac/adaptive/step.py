"""The adaptive K-FAC step: `δ = α Δ + μ v` from the exact Gauss-Newton quadratic model
of the batch (or a fixed learning rate with momentum and KL clipping), and
Levenberg-Marquardt damping every `damping_adaptation_interval` steps."""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jkfac import interpreter, masking, parallel, schedules
from jkfac.adaptive.config import (CALIBRATED_DAMPING, DEFAULT_ADAPTIVE_DAMPING, MAX_MU,
                                   REJECTION_BOOST, RELATIVE_MIN_DAMPING, TRACE_DECAY,
                                   AdaptiveConfig)
from jkfac.adaptive.ggn import Problem, curvature_products, loss_change, model
from jkfac.adaptive.qmodel import (adapted_damping, line_minimiser, norm_scale,
                                   quadratic_change, reduction_ratio, solve_quadratic_model)
from jkfac.adaptive.state import AdaptiveState, Diagnostics
from jkfac.adaptive.vectors import add_l2, dot, graft_norms, l2_mask, scaled_sum
from jkfac.config import MASKED_HINT, MIN_DAMPING, state_dtype
from jkfac.skipping import keep_unless, warn_rarely, zero_if
from jkfac.validation import abstract, check

Array = jax.Array
PyTree = Any
ScalarOrSchedule = schedules.ScalarOrSchedule

REJECTING_MESSAGE = (
    "jkfac rejected {count} steps so far because they raised the batch loss (or made it "
    "not finite); each raises the damping. A few are part of adapting it; if most steps "
    "are rejected, the loss may not be the registered losses' (see jkfac.check_loss_scale) "
    "or max_damping is too low.")
# Rejections are part of Levenberg-Marquardt damping: warn from the 10th on, not the 1st.
FIRST_REJECTION_WARNING = 10


class _Inputs(NamedTuple):
  """One step's vectors and scalars: `grads` (with l2, this device's), `source` (what was
  preconditioned: `grads`, or the "adam" trace of g, `velocity`), `delta` = F̂⁻¹ source."""
  grads: PyTree
  source: PyTree
  velocity: PyTree
  delta: PyTree
  damping: Array
  step: Array
  learning_rate: Array | None
  momentum: Array
  min_damping: Array


class _Result(NamedTuple):
  """What a step computed: the update and the next velocity, damping and diagnostics."""
  update: PyTree
  velocity: PyTree
  damping: Array
  rho: Array
  alpha: Array
  mu: Array
  quad_change: Array
  norm_scale: Array
  rejected: Array
  graft: PyTree


def _f32(x: Any) -> Array:
  return jnp.asarray(x, jnp.float32)


def _adaptation(config: AdaptiveConfig, state: AdaptiveState, inputs: _Inputs,
                measure: Callable[[], tuple[Array, Array]]
                ) -> tuple[Array, Array, Array, Array]:
  """`(new λ, ρ, M(δ), rejected)`. `measure()` gives `(L(θ+δ) − L(θ), M(δ))`.

  With `reject_steps`, every step is measured: one that raises the batch loss (or makes
  it not finite) is rejected and λ multiplied by `REJECTION_BOOST`; otherwise λ follows
  the LM rule on adaptation steps. Without it, only adaptation steps are measured.
  """
  old = inputs.damping, state.diagnostics.rho, state.diagnostics.quad_change
  if not config.adapt_damping:
    return (*old, jnp.asarray(False))

  def lm_rule(rho):
    return adapted_damping(inputs.damping, rho, config.damping_adaptation_decay,
                           config.damping_adaptation_interval, inputs.min_damping,
                           config.max_damping)

  due = inputs.step % config.damping_adaptation_interval == 0
  if config.reject_steps:
    change, quad = measure()
    rho = _f32(reduction_ratio(change, quad))
    rejected = ~(change <= 0)  # a rise, or not finite
    boosted = jnp.minimum(inputs.damping * REJECTION_BOOST, config.max_damping)
    damping = jnp.where(rejected, boosted.astype(inputs.damping.dtype),
                        jnp.where(due, lm_rule(rho), inputs.damping))
    return damping, rho, _f32(quad), rejected

  def adapt():
    change, quad = measure()
    rho = _f32(reduction_ratio(change, quad))
    return lm_rule(rho), rho, _f32(quad)

  return (*jax.lax.cond(due, adapt, lambda: old), jnp.asarray(False))


def _qmodel_step(config: AdaptiveConfig, problem: Problem, state: AdaptiveState,
                 inputs: _Inputs) -> _Result:
  """δ = α Δ + μ v with (α, μ) from the exact quadratic model (μ fixed for
  "qmodel_fixedmu"); `learning_rate`, if set, multiplies both."""
  vectors = (inputs.delta, state.velocity)
  loss, curvature = curvature_products(problem, vectors)
  gram = jnp.array([[dot(v, w) for w in vectors] for v in vectors])
  b = parallel.pmean(jnp.stack([dot(inputs.grads, v) for v in vectors]), problem.axis)
  fixed_mu = inputs.momentum if config.momentum_type == "qmodel_fixedmu" else None
  alpha, mu = solve_quadratic_model(curvature, gram, b, _f32(inputs.damping), fixed_mu,
                                    MAX_MU if config.reject_steps else None)
  if inputs.learning_rate is not None:
    alpha, mu = inputs.learning_rate * alpha, inputs.learning_rate * mu
  update = scaled_sum([(alpha, vectors[0]), (mu, vectors[1])])
  quad = _f32(quadratic_change(jnp.stack([alpha, mu]), curvature, b))
  damping, rho, _, rejected = _adaptation(config, state, inputs,
                                          lambda: (loss_change(problem, loss, update), quad))
  return _Result(update, update, damping, rho, alpha, mu, quad, _f32(1.0), rejected,
                 state.graft)


def _trace_step(config: AdaptiveConfig, problem: Problem, state: AdaptiveState,
                inputs: _Inputs) -> _Result:
  """δ = α u along the trace `u = Δ + TRACE_DECAY · u_prev` (the velocity keeps u), α
  from the exact quadratic model along u: one Jacobian-vector product, where "qmodel"
  takes two; `learning_rate`, if set, multiplies α."""
  trace = scaled_sum([(_f32(TRACE_DECAY), state.velocity), (_f32(1.0), inputs.delta)])
  loss, curvature = curvature_products(problem, [trace])
  b = parallel.pmean(jnp.stack([dot(inputs.grads, trace)]), problem.axis)
  alpha = line_minimiser(b[0], curvature[0, 0] + _f32(inputs.damping) * dot(trace, trace))
  alpha = alpha.astype(jnp.float32)
  if inputs.learning_rate is not None:
    alpha = inputs.learning_rate * alpha
  update = scaled_sum([(alpha, trace)])
  quad = _f32(quadratic_change(alpha[None], curvature, b))
  damping, rho, _, rejected = _adaptation(config, state, inputs,
                                          lambda: (loss_change(problem, loss, update), quad))
  return _Result(update, trace, damping, rho, alpha, _f32(TRACE_DECAY), quad, _f32(1.0),
                 rejected, state.graft)


def _fixed_step(config: AdaptiveConfig, problem: Problem, state: AdaptiveState,
                inputs: _Inputs) -> _Result:
  """`-lr · momentum(Δ)` as in `jkfac.kfac` ("regular": the trace of Δ; "adam": Δ of the
  trace of g), Δ first scaled by the norm constraint."""
  lr, momentum = inputs.learning_rate, inputs.momentum
  g_delta = parallel.pmean(dot(inputs.source, inputs.delta), problem.axis)
  scale = norm_scale(config.norm_constraint, lr, g_delta)
  delta = jax.tree_util.tree_map(lambda d: (scale * d).astype(d.dtype), inputs.delta)
  velocity = inputs.velocity
  if config.momentum_type == "regular":
    velocity = scaled_sum([(momentum, state.velocity), (_f32(1.0), delta)])
    update = scaled_sum([(-lr, velocity)])
  else:
    update = scaled_sum([(-lr, delta)])
  graft_state = state.graft
  if config.graft == "adam":
    adam, graft_state = optax.scale_by_adam().update(
        parallel.pmean(inputs.grads, problem.axis), state.graft, problem.params)
    update = graft_norms(update, scaled_sum([(-lr, adam)]))

  def measure():  # one JVP with δ for M(δ), one forward pass at θ + δ
    loss, curvature = curvature_products(problem, [update])
    quad = parallel.pmean(dot(inputs.grads, update), problem.axis) + 0.5 * curvature[0, 0]
    return loss_change(problem, loss, update), quad

  damping, rho, quad, rejected = _adaptation(config, state, inputs, measure)
  return _Result(update, velocity, damping, rho, _f32(-lr * scale), _f32(momentum), quad,
                 scale, rejected, graft_state)


def _burn_in(state: AdaptiveState, inputs: _Inputs) -> _Result:
  """Statistics only: a zero update; velocity, damping and ρ stay."""
  d = state.diagnostics
  zeros = jax.tree_util.tree_map(jnp.zeros_like, inputs.delta)
  return _Result(zeros, state.velocity, inputs.damping, d.rho, _f32(0.0), _f32(0.0),
                 d.quad_change, d.norm_scale, jnp.asarray(False), state.graft)


def _value(hyperparameter: ScalarOrSchedule | None, count: Array) -> Array | None:
  if hyperparameter is None:
    return None
  return _f32(schedules.value(hyperparameter, count))


def init(config: AdaptiveConfig, preconditioner: optax.GradientTransformation,
         params: PyTree) -> AdaptiveState:
  """The preconditioner's state, zero velocity and the initial damping; checks that a
  step that needs the network's loss finds a registered one."""
  if config.needs_model:
    full = params
    if masking.is_masked(params):
      check(config.example_params is not None,
             MASKED_HINT + "pass example_params=params (or their shapes) to jkfac.")
      full = config.example_params
    losses = model(config.loss_fn, abstract(full), config.example_batch).losses
    check(bool(losses), f"momentum_type={config.momentum_type!r} / adapt_damping="
           f"{config.adapt_damping} need the loss's predictions, but no loss is registered in "
           "loss_fn: call e.g. jkfac.register_softmax_cross_entropy(logits, labels) inside it.")
  dtype = state_dtype(params)
  # A buffer of its own for every leaf: a state donated to a jitted step
  # (`donate_argnums`) may not hold one buffer twice, nor one of the caller's (a damping
  # injected by `optax.inject_hyperparams` is also in its state): `jnp.array` copies.
  zero = lambda: jnp.zeros([], jnp.float32)
  damping = lambda: jnp.array(
      schedules.value(config.initial_damping, jnp.zeros([], jnp.int32)), dtype)
  return AdaptiveState(
      count=jnp.zeros([], jnp.int32), damping=damping(),
      velocity=jax.tree_util.tree_map(jnp.zeros_like, params),
      preconditioner=preconditioner.init(params),
      diagnostics=Diagnostics(damping=damping(), rho=zero(), alpha=zero(), mu=zero(),
                              quad_change=zero(), update_norm=zero(),
                              norm_scale=jnp.ones([], jnp.float32)),
      rejected_steps=jnp.zeros([], jnp.int32),
      graft=optax.scale_by_adam().init(params) if config.graft == "adam"
      else optax.EmptyState())


def _problem(config: AdaptiveConfig, params: PyTree, batch: PyTree,
             model_params: PyTree | None) -> Problem:
  masked = masking.is_masked(params)
  check(not masked or model_params is not None, MASKED_HINT + "pass "
         "tx.update(..., model_params=params), the whole model's parameters.")
  full = model_params if masked else params
  return Problem(
      params, full, (lambda v: masking.unmask(v, model_params)) if masked else (lambda v: v),
      model(config.loss_fn, full, batch) if config.needs_model else None,
      l2_mask(params, config.l2_reg_exclude),
      None if config.l2_reg is None else _f32(config.l2_reg), config.device_axis)


def update(config: AdaptiveConfig, preconditioner: optax.GradientTransformationExtraArgs,
           grads: PyTree, state: AdaptiveState, params: PyTree, batch: PyTree,
           curvature: interpreter.Linearization | None = None,
           model_params: PyTree | None = None) -> tuple[PyTree, AdaptiveState]:
  """One adaptive K-FAC step (see the module docstring)."""
  problem = _problem(config, params, batch, model_params)
  burnin = config.num_burnin_steps
  step = state.count if burnin is None else jnp.maximum(state.count - burnin, 0)
  if problem.l2 is not None:
    grads = add_l2(grads, params, problem.l2, problem.mask)
  momentum = _value(config.momentum, step)
  momentum = _f32(0.0) if momentum is None else momentum
  velocity, source = state.velocity, grads
  if config.momentum_type == "adam":  # the trace of the device-averaged gradients
    source = parallel.pmean(grads, config.device_axis)
    velocity = source = scaled_sum([(momentum, state.velocity), (_f32(1.0), source)])
  dtype = state.damping.dtype
  fixed = (None if config.adapt_damping or config.calibrated
           else jnp.maximum(_value(config.damping, step), MIN_DAMPING).astype(dtype))

  def damping_for(scale: Array) -> Array:
    """λ, given the curvature scale of this step's statistics: the state's (adapted), a
    calibrated one (the first of an adapted λ; every one of a fixed-rate step's), or
    the `damping` setting."""
    if fixed is not None:
      return fixed
    calibrated = jnp.where(scale > 0, jnp.maximum(CALIBRATED_DAMPING * scale, MIN_DAMPING),
                           DEFAULT_ADAPTIVE_DAMPING).astype(dtype)
    if not config.adapt_damping:
      return calibrated
    return jnp.where(state.damping > 0, state.damping, calibrated) if config.calibrated \
        else state.damping

  l2 = 0.0 if problem.l2 is None else problem.l2
  inverted_with = state.preconditioner.damping
  # λ rose well above the inverses' (a rejection): refresh them now, not at the next due.
  invert_now = ((inverted_with > 0) & (state.damping + l2 > 2 * inverted_with)
                if config.adapt_damping else None)
  delta, preconditioner_state = preconditioner.update(
      source, state.preconditioner, params, batch=batch, curvature=curvature,
      model_params=model_params,
      damping=jax.tree_util.Partial(lambda scale: damping_for(scale) + l2),
      invert_now=invert_now)
  scale = preconditioner_state.curvature_scale.astype(dtype)
  damping = damping_for(scale)
  min_damping = (jnp.maximum(RELATIVE_MIN_DAMPING * scale, MIN_DAMPING)
                 if config.min_damping is None else _f32(config.min_damping))
  inputs = _Inputs(grads, source, velocity, delta, damping, step,
                   _value(config.learning_rate, step), momentum, min_damping)
  step_kind = (_trace_step if config.momentum_type == "qmodel_trace"
               else _qmodel_step if config.qmodel else _fixed_step)
  take_step = functools.partial(step_kind, config, problem, state, inputs)
  result = take_step() if burnin is None else jax.lax.cond(
      state.count < burnin, lambda: _burn_in(state, inputs), take_step)
  diagnostics = Diagnostics(
      damping=damping, rho=result.rho, alpha=_f32(result.alpha), mu=_f32(result.mu),
      quad_change=_f32(result.quad_change),
      update_norm=_f32(jnp.sqrt(dot(result.update, result.update))),
      norm_scale=_f32(result.norm_scale))
  new = AdaptiveState(optax.safe_increment(state.count), result.damping, result.velocity,
                      preconditioner_state, diagnostics, state.rejected_steps, result.graft)
  skipped = preconditioner_state.skipped_steps > state.preconditioner.skipped_steps
  update, new = _unless_rejected(result.rejected & ~skipped, result.update, new, state)
  return _unless_skipped(skipped, update, new, state)


def _unless_rejected(rejected: Array, update: PyTree, new: AdaptiveState,
                     old: AdaptiveState) -> tuple[PyTree, AdaptiveState]:
  """A rejected step: zero update, every state as it was (the preconditioner's too) but
  the raised damping, the diagnostics and the rejection count."""
  rejected_steps = old.rejected_steps + rejected.astype(old.rejected_steps.dtype)
  rejected_steps = warn_rarely(rejected, rejected_steps, REJECTING_MESSAGE,
                               FIRST_REJECTION_WARNING)
  restored = old._replace(damping=new.damping, diagnostics=new.diagnostics,
                          rejected_steps=rejected_steps)
  return zero_if(rejected, update), keep_unless(rejected, new, restored)


def _unless_skipped(skipped: Array, update: PyTree, new: AdaptiveState, old: AdaptiveState
                    ) -> tuple[PyTree, AdaptiveState]:
  """A batch the preconditioner skipped (not finite): zero update, and every state as it
  was but the preconditioner's (which counts the skip)."""
  kept = keep_unless(skipped, new, old)
  return zero_if(skipped, update), kept._replace(preconditioner=new.preconditioner)


def adaptive(config: AdaptiveConfig, preconditioner: optax.GradientTransformationExtraArgs
             ) -> optax.GradientTransformationExtraArgs:
  """The adaptive K-FAC optimizer around `preconditioner` (a `jkfac.precondition`)."""

  def init_fn(params):
    return init(config, preconditioner, params)

  @parallel.on_auto_axes
  def update_fn(updates, state, params=None, *, batch=None, curvature=None,
                model_params=None, **extra_args):
    del extra_args
    check(params is not None and batch is not None,
           "jkfac needs the parameters and the batch: "
           "tx.update(grads, state, params, batch=batch).")
    return update(config, preconditioner, updates, state, params, batch, curvature,
                  model_params)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)

