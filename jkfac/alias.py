"""The optimizers people call, built from the pieces below them.

As `optax.adam` chains `scale_by_adam` with a learning rate, `kfac` wraps
`jkfac.precondition` into the K-FAC step of `jkfac.adaptive` (quadratic model or fixed
rate, damping, momentum), with the defaults of the one-call configuration, and
`eigen_adam` chains `jkfac.scale_by_eigen_adam` with weight decay and a learning rate.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import optax

from jkfac import adaptive, eigenbasis
from jkfac.eigenbasis import scale_by_eigen_adam
from jkfac.config import with_curvature_settings
from jkfac.preconditioner import precondition
from jkfac.schedules import ScalarOrSchedule
from jkfac.skipping import keep_unless, zero_if

# `kfac`'s curvature settings that differ from `PreconditionConfig`'s defaults: statistics
# every 5 steps and inverses every 50, no inverse from a single batch, statistics from at
# most 512 examples, and the input factors of wide-input convs from at most 3·d_in patch
# rows (the same steps and losses on the benchmarks' conv models, in less time:
# docs/benchmarks.md).
KFAC_CURVATURE = dict(cov_update_every=5, invert_every=50, warm_start=True,
                      max_statistics_examples="auto", sub_sample_patches="auto")
# `eigen_adam`'s: `kfac`'s, but with every patch row. Its eigenbases follow A's noise: on
# three of four conv models at learning rate 1e-2 sampled rows ended 20-35% higher
# (docs/benchmarks.md).
EIGEN_ADAM_CURVATURE = {**KFAC_CURVATURE, "sub_sample_patches": None}

PyTree = Any


def kfac(loss_fn: Callable[..., Any], example_batch: PyTree, *,
         learning_rate: ScalarOrSchedule | None = None,
         momentum: ScalarOrSchedule | None = 0.9,
         momentum_type: str | None = None,
         graft: str | None = None,
         damping: ScalarOrSchedule | None = None,
         adapt_damping: bool | None = None,
         reject_steps: bool | None = None,
         damping_adaptation_interval: int | None = None,
         damping_adaptation_decay: float = 0.95,
         min_damping: float | None = None,
         max_damping: float = math.inf,
         norm_constraint: float | None = None,
         l2_reg: float | None = None,
         l2_reg_exclude: Any = None,
         num_burnin_steps: int | None = None,
         **curvature_settings: Any) -> optax.GradientTransformationExtraArgs:
  """The K-FAC optimizer. `jkfac.kfac(loss_fn, batch)` with nothing else is the default.

  The default takes each step `δ = α F̂⁻¹g + μ δ_prev` with (α, μ) minimising the exact
  Gauss-Newton quadratic model of the batch (μ kept in [0, 0.99]), adapts the damping by
  Levenberg-Marquardt every step starting from the curvature's own scale, and rejects a
  step that raises the batch loss (raising the damping at once). docs/concepts.md has
  the maths; `jkfac.diagnostics(opt_state)` reads what each step did.

  Use as any optax optimizer, passing the batch:
  `tx.update(grads, opt_state, params, batch=batch)`.

  Args:
    loss_fn: `loss_fn(params, batch)`, the mean over the batch of per-example losses,
      with its loss registered (`jkfac.register_softmax_cross_entropy`, ...).
    example_batch: a batch, or its shapes and dtypes.
    learning_rate: None (default): the quadratic model chooses the step size. A number or
      schedule: a fixed-rate step `-learning_rate * momentum(F̂⁻¹g)`.
    momentum: the momentum of a fixed-rate step (or the μ of "qmodel_fixedmu").
    momentum_type: "qmodel" (the default without a learning rate), "qmodel_fixedmu" (α
      from the model, μ = `momentum`), "qmodel_trace" (α along the trace
      `u = F̂⁻¹g + 0.5 u_prev`: one Jacobian-vector product a step instead of two),
      "regular" (the default with a learning rate: the trace of F̂⁻¹g) or "adam"
      (tensorflow/kfac's: F̂⁻¹ of the trace of g).
    graft: "adam": each parameter's step length is that of Adam's update (with this
      `learning_rate`), its direction K-FAC's (Shampoo's grafting): Adam users keep
      their learning rate. Needs a learning rate.
    damping: None (default): adapted (Levenberg-Marquardt), starting from the K-FAC
      curvature's mean eigenvalue; with `graft`, that mean eigenvalue at every inverse
      update, not adapted. A number or schedule fixes it (then it is not adapted unless
      `adapt_damping=True`, and is the initial value).
    adapt_damping: whether to adapt the damping; default: when `damping` is None and
      there is no `graft`.
    reject_steps: reject a step that raises the batch loss or makes it non-finite (zero
      update, the state as it was, the damping times 4); default: with `adapt_damping`.
      It costs one forward pass per step.
    damping_adaptation_interval: adapt every this many steps, by a factor
      `damping_adaptation_decay ** interval`; default 1 with `reject_steps`, else 5.
    damping_adaptation_decay: the LM factor per step, in (0, 1).
    min_damping: the lower bound of the adapted damping; None keeps it at least 1e-3
      times the curvature's current mean eigenvalue.
    max_damping: the upper bound of the adapted damping.
    norm_constraint: C > 0: with a learning rate, `F̂⁻¹g` is scaled by
      `min(1, sqrt(C / (lr² gᵀF̂⁻¹g)))` (KL clipping, Ba et al. 2017).
    l2_reg: weight decay `l2_reg * params` added to the gradients (and to the curvature of
      the quadratic model and the damping).
    l2_reg_exclude: parameters without weight decay: those whose path ("a/b/c") matches
      one of these glob patterns, or for which `l2_reg_exclude(path)` is true.
    num_burnin_steps: the first this many steps update the statistics only.
    **curvature_settings: fields of `jkfac.PreconditionConfig` (cadences, estimation,
      approximations, parallelism, ...). `kfac`'s defaults differ in five:
      `cov_update_every` 5, `invert_every` 50, `warm_start` True,
      `max_statistics_examples` "auto", 512, and `sub_sample_patches` "auto", 3 on
      convs with `d_in >= 4 d_out` (`KFAC_CURVATURE`).

  Examples:
    >>> tx = jkfac.kfac(loss_fn, batch)
    >>> opt_state = tx.init(params)
    >>> updates, opt_state = tx.update(grads, opt_state, params, batch=batch)
    >>> adam_users = jkfac.kfac(loss_fn, batch, learning_rate=3e-4, graft="adam")
  """
  config = adaptive.AdaptiveConfig.from_kfac(
      loss_fn, example_batch, learning_rate=learning_rate, momentum=momentum,
      momentum_type=momentum_type, graft=graft, damping=damping, adapt_damping=adapt_damping,
      reject_steps=reject_steps, damping_adaptation_interval=damping_adaptation_interval,
      damping_adaptation_decay=damping_adaptation_decay, min_damping=min_damping,
      max_damping=max_damping, norm_constraint=norm_constraint, l2_reg=l2_reg,
      l2_reg_exclude=l2_reg_exclude, num_burnin_steps=num_burnin_steps,
      axis_name=curvature_settings.get("axis_name"), mesh=curvature_settings.get("mesh"),
      example_params=curvature_settings.get("example_params"))
  settings = {**KFAC_CURVATURE, **curvature_settings}
  # The step passes its damping to the preconditioner at every update: this one is a
  # placeholder where the damping is calibrated at the first step.
  preconditioner = precondition(
      loss_fn, example_batch, damping=adaptive.DEFAULT_ADAPTIVE_DAMPING if config.calibrated
      else config.initial_damping, **settings)
  return adaptive.adaptive(config, preconditioner)


with_curvature_settings(kfac, KFAC_CURVATURE)


def eigen_adam(loss_fn: Callable[..., Any], example_batch: PyTree,
               learning_rate: ScalarOrSchedule, *, b1: float = 0.9, b2: float = 0.95,
               eps: float = 1e-8, weight_decay: float = 0.0,
               mask: Any = None, **curvature_settings: Any
               ) -> optax.GradientTransformationExtraArgs:
  """AdamW in the eigenbases of K-FAC's Kronecker factors (SOAP's idea on K-FAC's factors).

  Each dense or conv layer runs Adam in the coordinates where its K-FAC curvature is
  diagonal; everything else runs plain AdamW (see `jkfac.scale_by_eigen_adam`). It takes
  an Adam-like learning rate and needs no damping. Use as any optax optimizer, passing
  the batch: `tx.update(grads, opt_state, params, batch=batch)`.

  Args:
    loss_fn: `loss_fn(params, batch)`, with its layers tagged or recognised and its loss
      registered, as for `jkfac.kfac`.
    example_batch: a batch, or its shapes and dtypes.
    learning_rate: a number or schedule, as for `optax.adamw`.
    b1: the decay rate of Adam's first moment.
    b2: the decay rate of Adam's second moment; 0.95, as SOAP's.
    eps: the constant added to Adam's denominator.
    weight_decay: decoupled weight decay, as for `optax.adamw`.
    mask: the parameters that `weight_decay` applies to, as for `optax.adamw`.
    **curvature_settings: fields of `jkfac.PreconditionConfig` but
      `jkfac.eigenbasis.UNSUPPORTED_SETTINGS`; as `kfac`'s, `cov_update_every` 5,
      `invert_every` (here: eigendecompositions) 50, `warm_start` True and
      `max_statistics_examples` "auto" (512) by default; unlike `kfac`, every conv
      patch row (`sub_sample_patches` None).

  Examples:
    >>> tx = jkfac.eigen_adam(loss_fn, batch, learning_rate=1e-2)
  """
  return _chain_unless_skipped(
      scale_by_eigen_adam(loss_fn, example_batch, b1=b1, b2=b2, eps=eps,
                          **{**EIGEN_ADAM_CURVATURE, **curvature_settings}),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate))


def _chain_unless_skipped(first: optax.GradientTransformationExtraArgs,
                          *rest: optax.GradientTransformation
                          ) -> optax.GradientTransformationExtraArgs:
  """`optax.chain(first, *rest)` (the same state), but on a batch that `first` skips
  as not finite, a zero update and `rest`'s states as they were: weight decay does not
  move the parameters, and a learning-rate schedule's count does not run ahead of
  jkfac's."""
  chained = optax.chain(*rest)

  def update_fn(updates, state, params=None, **extra_args):
    updates, first_state = first.update(updates, state[0], params, **extra_args)
    skipped = (first_state.preconditioner.skipped_steps
               > state[0].preconditioner.skipped_steps)
    updates, rest_state = chained.update(updates, tuple(state[1:]), params)
    rest_state = keep_unless(skipped, rest_state, tuple(state[1:]))
    return zero_if(skipped, updates), (first_state, *rest_state)

  return optax.GradientTransformationExtraArgs(
      lambda params: (first.init(params), *chained.init(params)), update_fn)


with_curvature_settings(eigen_adam, EIGEN_ADAM_CURVATURE, eigenbasis.UNSUPPORTED_SETTINGS)
