"""`jkfac.kfac`: the K-FAC optimizer people call, built from the pieces below it.

As `optax.adam` chains `scale_by_adam` with a learning rate, `kfac` chains
`jkfac.precondition` with momentum and a learning rate, or wraps it into adaptive K-FAC
(`jkfac.adaptive`).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from jkfac import adaptive
from jkfac.config import DEFAULT_ADAPTIVE_CADENCE, DEFAULT_CADENCE, DEFAULT_MIN_DAMPING
from jkfac.precondition import precondition
from jkfac.schedules import ScalarOrSchedule
from jkfac.skipping import keep_unless, zero_if
from jkfac.validation import check, is_number

PyTree = Any


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
  check(momentum_type in adaptive.MOMENTUM_TYPES,
         f"momentum_type must be one of {adaptive.MOMENTUM_TYPES}, got {momentum_type!r}.")
  check(momentum is None or is_number(momentum) or callable(momentum)
         or isinstance(momentum, jax.Array),
         f"momentum must be None, a number in [0, 1), a schedule or an array, got "
         f"{momentum!r}.")
  if is_number(momentum):
    check(0 <= momentum < 1, f"momentum must be in [0, 1), got {momentum}.")
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
    check(learning_rate is not None, "learning_rate is required (only momentum_type "
           "'qmodel' and 'qmodel_fixedmu' may leave it None).")
    check(damping is not None, "damping is required (unless adapt_damping=True).")
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
    kept = keep_unless(skipped, new_state, state)
    kept = (*kept[:index], new_state[index], *kept[index + 1:])
    return zero_if(skipped, new_updates), kept

  return optax.GradientTransformationExtraArgs(inner.init, update_fn)
