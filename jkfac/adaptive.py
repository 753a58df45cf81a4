"""Adaptive K-FAC: quadratic-model step size and momentum, LM damping, norm constraint.

`adaptive(config, preconditioner)` wraps `jkfac.precondition` into a whole optimizer
(what `jkfac.kfac` returns when one of its adaptive keywords is used): the step
`δ = α Δ + μ v` from the exact Gauss-Newton quadratic model of the batch (or a fixed
learning rate with momentum and KL clipping), and Levenberg-Marquardt damping every
`damping_adaptation_interval` steps. All state is arrays (`AdaptiveState`);
`diagnostics(opt_state)` reads what each step recorded. docs/concepts.md has the maths.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from jkfac import interpreter, jaxprs, layer_table, losses, masking, parallel, tags
from jkfac import transform
from jkfac.layer_info import LossInfo
from jkfac.transform import PreconditionState

Array = jax.Array
PyTree = Any
ScalarOrSchedule = transform.ScalarOrSchedule

MOMENTUM_TYPES = ("regular", "adam", "qmodel", "qmodel_fixedmu")
QMODEL_TYPES = ("qmodel", "qmodel_fixedmu")
# The initial damping with `adapt_damping=True` when none is given: a scale for a mean
# loss whose Fisher is O(1); the LM rule moves it by ω = 0.95**5 ≈ 0.77 per adaptation.
DEFAULT_ADAPTIVE_DAMPING = 1e-3
LOWER_RHO, UPPER_RHO = 0.25, 0.75  # Martens & Grosse (2015), §6.5

DIAGNOSTICS = ("damping", "rho", "alpha", "mu", "quad_change", "update_norm", "norm_scale",
               "skipped_steps", "inverse_fallbacks")


class Diagnostics(NamedTuple):
  """What the last step did (see `diagnostics`).

  damping:     the λ of the last step (the state's `damping` is the next step's).
  rho:         the last reduction ratio ρ (updated on adaptation steps only; 0 before).
  alpha, mu:   the step's coefficients: `δ = α Δ + μ v` (fixed learning rate: α = −lr
               times the norm-constraint scale, μ the momentum).
  quad_change: M(δ), the undamped quadratic-model change of the step (every step with
               "qmodel*", else on adaptation steps only).
  update_norm: ‖δ‖₂.
  norm_scale:  the `norm_constraint` factor applied to Δ (1 when not clipped).
  """
  damping: Array
  rho: Array
  alpha: Array
  mu: Array
  quad_change: Array
  update_norm: Array
  norm_scale: Array


class AdaptiveState(NamedTuple):
  """The state of `adaptive`: a plain pytree of arrays.

  count:          steps taken, burn-in included (a skipped batch does not count).
  damping:        the damping λ of the next step.
  velocity:       "regular": the trace of Δ; "adam": the trace of g; "qmodel*": the
                  previous update.
  preconditioner: the state of `jkfac.precondition` (its `damping` field is the damping
                  the inverses were computed with, λ + l2_reg).
  diagnostics:    what the last step did.
  """
  count: Array
  damping: Array
  velocity: PyTree
  preconditioner: PreconditionState
  diagnostics: Diagnostics


def _is_number(value: Any) -> bool:
  return isinstance(value, numbers.Number) and not isinstance(value, bool)


def _is_integer(value: Any) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check(ok: bool, message: str) -> None:
  if not ok:
    raise ValueError(message)


@dataclasses.dataclass(frozen=True)
class AdaptiveConfig:
  """The static settings of `adaptive` (see `jkfac.kfac`), validated when built.

  Numbers may arrive as arrays from `optax.inject_hyperparams`: they are checked only
  when they are Python numbers, and used only in array arithmetic.
  """
  loss_fn: Callable[..., Any]
  example_batch: PyTree
  learning_rate: ScalarOrSchedule | None
  damping: ScalarOrSchedule | None
  momentum: ScalarOrSchedule | None = 0.9
  momentum_type: str = "regular"
  adapt_damping: bool = False
  damping_adaptation_interval: int = 5
  damping_adaptation_decay: float = 0.95
  min_damping: float = transform.DEFAULT_MIN_DAMPING
  max_damping: float = math.inf
  norm_constraint: float | None = None
  l2_reg: float | None = None
  l2_reg_exclude: Sequence[str] | str | Callable[[str], bool] | None = None
  num_burnin_steps: int | None = None
  axis_name: str | None = None
  mesh: jax.sharding.Mesh | None = None
  example_params: PyTree | None = None

  def __post_init__(self):
    _check(self.momentum_type in MOMENTUM_TYPES,
           f"momentum_type must be one of {MOMENTUM_TYPES}, got {self.momentum_type!r}.")
    _check(self.learning_rate is not None or self.qmodel,
           f"learning_rate is required with momentum_type={self.momentum_type!r}; only "
           "'qmodel' and 'qmodel_fixedmu' choose the step size themselves.")
    if _is_number(self.learning_rate):
      _check(self.learning_rate > 0, f"learning_rate must be positive, got "
             f"{self.learning_rate}.")
    _check(self.momentum is not None or self.momentum_type != "qmodel_fixedmu",
           "momentum_type='qmodel_fixedmu' needs a momentum.")
    _check(isinstance(self.adapt_damping, bool),
           f"adapt_damping must be True or False, got {self.adapt_damping!r}.")
    _check(self.damping is not None or self.adapt_damping,
           "damping is required unless adapt_damping=True (then it is the initial value, "
           f"by default {DEFAULT_ADAPTIVE_DAMPING}).")
    if self.adapt_damping:
      _check(not callable(self.damping),
             "With adapt_damping=True, damping is the initial value: a number, not a schedule.")
      self._check_adaptation()
    if self.norm_constraint is not None:
      _check(not self.qmodel, "norm_constraint needs a fixed learning rate: use it with "
             "momentum_type 'regular' or 'adam' (the quadratic model sizes its own step).")
      if _is_number(self.norm_constraint):
        _check(self.norm_constraint > 0,
               f"norm_constraint must be positive, got {self.norm_constraint}.")
    if _is_number(self.l2_reg):
      _check(self.l2_reg >= 0, f"l2_reg must be >= 0, got {self.l2_reg}.")
    _check(self.l2_reg_exclude is None or self.l2_reg is not None,
           "l2_reg_exclude was given without l2_reg.")
    if self.num_burnin_steps is not None and not isinstance(self.num_burnin_steps, jax.Array):
      _check(_is_integer(self.num_burnin_steps) and self.num_burnin_steps >= 0,
             f"num_burnin_steps must be an integer >= 0, got {self.num_burnin_steps!r}.")
    if self.example_params is not None:
      object.__setattr__(self, "example_params", transform._abstract(self.example_params))
    object.__setattr__(self, "example_batch", transform._abstract(self.example_batch))

  def _check_adaptation(self) -> None:
    interval = self.damping_adaptation_interval
    if not isinstance(interval, jax.Array):
      _check(_is_integer(interval) and interval >= 1,
             f"damping_adaptation_interval must be an integer >= 1, got {interval!r}.")
    if _is_number(self.damping_adaptation_decay):
      _check(0 < self.damping_adaptation_decay < 1, f"damping_adaptation_decay must be in "
             f"(0, 1), got {self.damping_adaptation_decay}.")
    low, high = self.min_damping, self.max_damping
    if _is_number(low):
      _check(low > 0, f"min_damping must be positive, got {low}.")
    if _is_number(low) and _is_number(high):
      _check(low <= high, f"min_damping ({low}) must not exceed max_damping ({high}).")
      if _is_number(self.initial_damping):
        _check(low <= self.initial_damping <= high,
               f"damping (the initial value, {self.initial_damping}) "
               f"must lie in [min_damping, max_damping] = [{low}, {high}].")

  @property
  def qmodel(self) -> bool:
    return self.momentum_type in QMODEL_TYPES

  @property
  def needs_model(self) -> bool:
    """Whether steps evaluate the network (curvature products, the loss)."""
    return self.qmodel or self.adapt_damping

  @property
  def device_axis(self) -> str | None:
    return self.axis_name if self.mesh is None else None

  @property
  def initial_damping(self) -> ScalarOrSchedule:
    return DEFAULT_ADAPTIVE_DAMPING if self.damping is None else self.damping


# --- small pure pieces ----------------------------------------------------------------


def _dot(a: PyTree, b: PyTree, mask: Sequence[bool] | None = None) -> Array:
  """`Σ aᵢ·bᵢ` over the leaves (only those `mask` keeps), in float32 or wider."""
  leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  mask = (True,) * len(leaves_a) if mask is None else mask
  terms = [jnp.vdot(x, y).astype(jnp.promote_types(x.dtype, jnp.float32)).real
           for x, y, keep in zip(leaves_a, leaves_b, mask) if keep]
  return sum(terms, jnp.zeros([], jnp.float32))


def _scaled_sum(terms: Sequence[tuple[Array, PyTree]]) -> PyTree:
  """`Σ cᵢ vᵢ` of pytrees, in the leaves' dtypes."""
  def combine(*leaves):
    return sum(c.astype(x.dtype) * x for (c, _), x in zip(terms, leaves))
  return jax.tree_util.tree_map(combine, *[v for _, v in terms])


def l2_mask(params: PyTree, exclude: Sequence[str] | str | Callable[[str], bool] | None
            ) -> tuple[bool, ...]:
  """Per leaf of `params`, whether `l2_reg` applies: not when its path ("a/b/c") matches
  a glob pattern of `exclude` (or `exclude(path)` is true)."""
  paths = [layer_table.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  if exclude is None:
    return (True,) * len(paths)
  if callable(exclude):
    return tuple(not exclude(path) for path in paths)
  patterns = (exclude,) if isinstance(exclude, str) else tuple(exclude)
  return tuple(not any(layer_table.pattern_matches(p, path) for p in patterns)
               for path in paths)


def add_l2(grads: PyTree, params: PyTree, l2: Array, mask: Sequence[bool]) -> PyTree:
  """`grads + l2 · params` on the leaves `mask` keeps."""
  leaves, treedef = jax.tree_util.tree_flatten(grads)
  new = [g + (l2 * p).astype(g.dtype) if keep else g
         for g, p, keep in zip(leaves, jax.tree_util.tree_leaves(params), mask)]
  return jax.tree_util.tree_unflatten(treedef, new)


def output_curvature(kind: str, prediction: Array, tangent: Array) -> Array:
  """The per-row output Hessian (the Fisher, for these losses) of a loss kind times a
  prediction-space `tangent`, row by row over the last axis."""
  if prediction.ndim == 1:  # N examples with one output each
    return output_curvature(kind, prediction[:, None], tangent[:, None])[:, 0]
  if kind == "softmax_cross_entropy":
    p = jax.nn.softmax(prediction)
    return p * tangent - p * jnp.sum(p * tangent, axis=-1, keepdims=True)
  if kind == "sigmoid_cross_entropy":
    p = jax.nn.sigmoid(prediction)
    return p * (1 - p) * tangent
  if kind == "squared_error":
    return tangent
  raise ValueError(f"Unknown loss kind {kind!r}.")


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
    hus = [output_curvature(kind, prediction, u) for u in us]
    if jnp.ndim(scale) == 0:
      gram = gram + scale * jnp.array([[jnp.sum(u * hu) for hu in hus] for u in us])
    else:  # one factor per row
      s = scale.astype(jnp.float32)
      s = s if prediction.ndim == 1 else s[..., None]
      gram = gram + jnp.array([[jnp.sum(s * u * hu) for hu in hus] for u in us])
  return gram


def solve_quadratic_model(curvature: Array, gram: Array, b: Array, damping: Array,
                          fixed_mu: Array | None = None) -> tuple[Array, Array]:
  """`(α, μ)` minimising `bᵀc + ½ cᵀ(C + λS)c` over `c = (α, μ)` (`curvature` C, `gram`
  S, both 2×2 over (Δ, v)); μ is `fixed_mu` if given. When v is zero (the first step)
  or parallel to Δ, the 1-D minimiser along Δ with μ = 0."""
  h = curvature + damping * gram
  alpha_1d = jnp.where(h[0, 0] > 0, -b[0] / h[0, 0], 0.0)
  if fixed_mu is not None:
    alpha_2d, mu_2d = -(b[0] + fixed_mu * h[0, 1]) / h[0, 0], fixed_mu
    usable = gram[1, 1] > 0
  else:
    det = h[0, 0] * h[1, 1] - h[0, 1] * h[1, 0]
    alpha_2d = (-b[0] * h[1, 1] + b[1] * h[0, 1]) / det
    mu_2d = (-b[1] * h[0, 0] + b[0] * h[1, 0]) / det
    usable = (gram[1, 1] > 0) & (det > 1e-6 * h[0, 0] * h[1, 1])
  usable = usable & (h[0, 0] > 0)
  alpha = jnp.where(usable, alpha_2d, alpha_1d)
  return alpha.astype(jnp.float32), jnp.where(usable, mu_2d, 0.0).astype(jnp.float32)


def quadratic_change(coefficients: Array, curvature: Array, b: Array) -> Array:
  """`M(c) = bᵀc + ½ cᵀCc`: the model change of the step with coefficients `c`."""
  return coefficients @ b + 0.5 * coefficients @ curvature @ coefficients


def adapted_damping(config: AdaptiveConfig, damping: Array, rho: Array) -> Array:
  """Levenberg–Marquardt: `λω` if ρ > 3/4, `λ/ω` if ρ < 1/4 (ω = decay ** interval),
  else λ (also for a ρ that is NaN), clipped to [min_damping, max_damping]."""
  omega = jnp.asarray(config.damping_adaptation_decay, damping.dtype) ** jnp.asarray(
      config.damping_adaptation_interval, damping.dtype)
  new = jnp.where(rho > UPPER_RHO, damping * omega,
                  jnp.where(rho < LOWER_RHO, damping / omega, damping))
  return jnp.clip(new, config.min_damping, config.max_damping).astype(damping.dtype)


def reduction_ratio(loss_change: Array, quad_change: Array) -> Array:
  """ρ; a loss that is not finite after the step gives −∞ (the damping then rises)."""
  return jnp.where(jnp.isfinite(loss_change), loss_change / quad_change, -jnp.inf)


def norm_scale(constraint: Array | float | None, learning_rate: Array,
               g_dot_delta: Array) -> Array:
  """`min(1, sqrt(C / (lr² gᵀΔ)))`, so that the step's squared F̂-norm is at most C."""
  if constraint is None:
    return jnp.ones([], jnp.float32)
  squared = learning_rate ** 2 * jnp.maximum(g_dot_delta, jnp.finfo(jnp.float32).tiny)
  return jnp.minimum(1.0, jnp.sqrt(constraint / squared)).astype(jnp.float32)


# --- the network as a function of the parameters ---------------------------------------


class _Model(NamedTuple):
  """`loss_and_predictions(full_params) -> ((loss, [prediction per registered loss]),
  row_scales)` on one batch (the row factors of each loss, see `losses.row_scales`), with
  the losses' records."""
  loss_and_predictions: Callable[[PyTree], tuple[tuple[Array, list[Array]], list[Any]]]
  losses: tuple[LossInfo, ...]


def model(loss_fn: Callable[..., Any], params: PyTree, batch: PyTree) -> _Model:
  """`loss_fn`'s loss and registered predictions as functions of the parameters, by
  evaluating its jaxpr (`interpreter`), with the registered losses it holds."""
  closed, _ = layer_table.make_jaxpr(loss_fn, params, batch, auto_register=False)
  infos = tuple(layer_table.loss_info(site) for site in jaxprs.find_tags(closed.jaxpr, {})
                if site.eqn.primitive is tags.loss_tag_p)
  perturbations = interpreter._zero_perturbations(closed)
  batch_leaves = jax.tree_util.tree_leaves(batch)

  def loss_and_predictions(full_params):
    args = jax.tree_util.tree_leaves(full_params) + batch_leaves
    outputs, recorded = interpreter._forward(closed, args, perturbations)
    scales = [jnp.asarray(losses.row_scales(p, info.weight, m, w), jnp.float32)
              for info, p, m, w in zip(infos, recorded.predictions, recorded.masks,
                                       recorded.row_weights)]
    # (loss, aux) outputs: the loss is the first leaf
    return (outputs[0], recorded.predictions), scales

  return _Model(loss_and_predictions, infos)


class _Problem(NamedTuple):
  """One step's fixed pieces: the parameters (the view the optimizer sees), the whole
  model's (`full`) and how a view-shaped vector becomes whole-model shaped."""
  params: PyTree
  full: PyTree
  to_full: Callable[[PyTree], PyTree]
  model: _Model | None
  mask: tuple[bool, ...]
  l2: Array | None
  axis: str | None


def _curvature(problem: _Problem, vectors: Sequence[PyTree]) -> tuple[Array, Array]:
  """`(L(θ), [vᵢᵀ(G + l2·I)vⱼ])` by one linearisation and a JVP per vector."""
  (loss, predictions), jvp, scales = jax.linearize(problem.model.loss_and_predictions,
                                                   problem.full, has_aux=True)
  tangents = [jvp(problem.to_full(v))[1] for v in vectors]
  gram = ggn_gram([info.kind for info in problem.model.losses], scales, predictions, tangents)
  loss, gram = parallel.pmean((loss.astype(jnp.float32), gram), problem.axis)
  if problem.l2 is not None:
    gram = gram + problem.l2 * jnp.array([[_dot(v, w, problem.mask) for w in vectors]
                                          for v in vectors])
  return loss, gram


def _loss_change(problem: _Problem, loss: Array, step: PyTree) -> Array:
  """`L(θ+δ) − L(θ)` on the batch, the `l2_reg` term included (one forward pass)."""
  moved = jax.tree_util.tree_map(lambda p, d: p + d.astype(p.dtype), problem.full,
                                 problem.to_full(step))
  (new_loss, _), _ = problem.model.loss_and_predictions(moved)
  change = parallel.pmean(new_loss.astype(jnp.float32), problem.axis) - loss
  if problem.l2 is not None:
    change = change + problem.l2 * (_dot(problem.params, step, problem.mask)
                                    + 0.5 * _dot(step, step, problem.mask))
  return change


# --- the step ------------------------------------------------------------------------


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


def _f32(x: Any) -> Array:
  return jnp.asarray(x, jnp.float32)


def _adaptation(config: AdaptiveConfig, state: AdaptiveState, inputs: _Inputs,
                measure: Callable[[], tuple[Array, Array]]) -> tuple[Array, Array, Array]:
  """`(new λ, ρ, M(δ))`. On adaptation steps, `measure()` gives `(L(θ+δ) − L(θ),
  M(δ))` and λ follows the LM rule; on the others λ and ρ stay."""
  old = inputs.damping, state.diagnostics.rho, state.diagnostics.quad_change
  if not config.adapt_damping:
    return old

  def adapt():
    loss_change, quad = measure()
    rho = _f32(reduction_ratio(loss_change, quad))
    return adapted_damping(config, inputs.damping, rho), rho, _f32(quad)

  return jax.lax.cond(inputs.step % config.damping_adaptation_interval == 0, adapt,
                      lambda: old)


def _qmodel_step(config: AdaptiveConfig, problem: _Problem, state: AdaptiveState,
                 inputs: _Inputs) -> _Result:
  """δ = α Δ + μ v with (α, μ) from the exact quadratic model (μ fixed for
  "qmodel_fixedmu"); `learning_rate`, if set, multiplies both."""
  vectors = (inputs.delta, state.velocity)
  loss, curvature = _curvature(problem, vectors)
  gram = jnp.array([[_dot(v, w) for w in vectors] for v in vectors])
  b = parallel.pmean(jnp.stack([_dot(inputs.grads, v) for v in vectors]), problem.axis)
  fixed_mu = inputs.momentum if config.momentum_type == "qmodel_fixedmu" else None
  alpha, mu = solve_quadratic_model(curvature, gram, b, _f32(inputs.damping), fixed_mu)
  if inputs.learning_rate is not None:
    alpha, mu = inputs.learning_rate * alpha, inputs.learning_rate * mu
  update = _scaled_sum([(alpha, vectors[0]), (mu, vectors[1])])
  quad = _f32(quadratic_change(jnp.stack([alpha, mu]), curvature, b))
  damping, rho, _ = _adaptation(config, state, inputs,
                                lambda: (_loss_change(problem, loss, update), quad))
  return _Result(update, update, damping, rho, alpha, mu, quad, _f32(1.0))


def _fixed_step(config: AdaptiveConfig, problem: _Problem, state: AdaptiveState,
                inputs: _Inputs) -> _Result:
  """`-lr · momentum(Δ)` as in `jkfac.kfac` ("regular": the trace of Δ; "adam": Δ of the
  trace of g), Δ first scaled by the norm constraint."""
  lr, momentum = inputs.learning_rate, inputs.momentum
  g_delta = parallel.pmean(_dot(inputs.source, inputs.delta), problem.axis)
  scale = norm_scale(config.norm_constraint, lr, g_delta)
  delta = jax.tree_util.tree_map(lambda d: (scale * d).astype(d.dtype), inputs.delta)
  velocity = inputs.velocity
  if config.momentum_type == "regular":
    velocity = _scaled_sum([(momentum, state.velocity), (_f32(1.0), delta)])
    update = _scaled_sum([(-lr, velocity)])
  else:
    update = _scaled_sum([(-lr, delta)])

  def measure():  # one JVP with δ for M(δ), one forward pass at θ + δ
    loss, curvature = _curvature(problem, [update])
    quad = parallel.pmean(_dot(inputs.grads, update), problem.axis) + 0.5 * curvature[0, 0]
    return _loss_change(problem, loss, update), quad

  damping, rho, quad = _adaptation(config, state, inputs, measure)
  return _Result(update, velocity, damping, rho, _f32(-lr * scale), _f32(momentum), quad,
                 scale)


def _burn_in(state: AdaptiveState, inputs: _Inputs) -> _Result:
  """Statistics only: a zero update; velocity, damping and ρ stay."""
  d = state.diagnostics
  zeros = jax.tree_util.tree_map(jnp.zeros_like, inputs.delta)
  return _Result(zeros, state.velocity, inputs.damping, d.rho, _f32(0.0), _f32(0.0),
                 d.quad_change, d.norm_scale)


def _value(hyperparameter: ScalarOrSchedule | None, count: Array) -> Array | None:
  if hyperparameter is None:
    return None
  return _f32(transform._value(hyperparameter, count))


def init(config: AdaptiveConfig, preconditioner: optax.GradientTransformation,
         params: PyTree) -> AdaptiveState:
  """The preconditioner's state, zero velocity and the initial damping; checks that a
  step that needs the network's loss finds a registered one."""
  if config.needs_model:
    full = params
    if masking.is_masked(params):
      _check(config.example_params is not None,
             transform._MASKED + "pass example_params=params (or their shapes) to jkfac.")
      full = config.example_params
    losses = model(config.loss_fn, transform._abstract(full), config.example_batch).losses
    _check(bool(losses), f"momentum_type={config.momentum_type!r} / adapt_damping="
           f"{config.adapt_damping} need the loss's predictions, but no loss is registered in "
           "loss_fn: call e.g. jkfac.register_softmax_cross_entropy(logits, labels) inside it.")
  dtype = transform.state_dtype(params)
  zero = jnp.zeros([], jnp.float32)
  damping = jnp.asarray(transform._value(config.initial_damping, jnp.zeros([], jnp.int32)),
                        dtype)
  return AdaptiveState(
      count=jnp.zeros([], jnp.int32), damping=damping,
      velocity=jax.tree_util.tree_map(jnp.zeros_like, params),
      preconditioner=preconditioner.init(params),
      diagnostics=Diagnostics(damping=damping, rho=zero, alpha=zero, mu=zero,
                              quad_change=zero, update_norm=zero, norm_scale=zero + 1))


def _problem(config: AdaptiveConfig, params: PyTree, batch: PyTree,
             model_params: PyTree | None) -> _Problem:
  masked = masking.is_masked(params)
  _check(not masked or model_params is not None, transform._MASKED + "pass "
         "tx.update(..., model_params=params), the whole model's parameters.")
  full = model_params if masked else params
  return _Problem(
      params, full, (lambda v: masking.unmask(v, model_params)) if masked else (lambda v: v),
      model(config.loss_fn, full, batch) if config.needs_model else None,
      l2_mask(params, config.l2_reg_exclude),
      None if config.l2_reg is None else _f32(config.l2_reg), config.device_axis)


def update(config: AdaptiveConfig, preconditioner: optax.GradientTransformationExtraArgs,
           grads: PyTree, state: AdaptiveState, params: PyTree, batch: PyTree,
           curvature: interpreter.Curvature | None = None,
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
    velocity = source = _scaled_sum([(momentum, state.velocity), (_f32(1.0), source)])
  damping = state.damping if config.adapt_damping else jnp.maximum(
      _value(config.damping, step), transform.MIN_DAMPING).astype(state.damping.dtype)
  delta, preconditioner_state = preconditioner.update(
      source, state.preconditioner, params, batch=batch, curvature=curvature,
      model_params=model_params,
      damping=damping if problem.l2 is None else damping + problem.l2)
  inputs = _Inputs(grads, source, velocity, delta, damping, step,
                   _value(config.learning_rate, step), momentum)
  take_step = functools.partial(_qmodel_step if config.qmodel else _fixed_step, config,
                                problem, state, inputs)
  result = take_step() if burnin is None else jax.lax.cond(
      state.count < burnin, lambda: _burn_in(state, inputs), take_step)
  diagnostics = Diagnostics(
      damping=damping, rho=result.rho, alpha=_f32(result.alpha), mu=_f32(result.mu),
      quad_change=_f32(result.quad_change),
      update_norm=_f32(jnp.sqrt(_dot(result.update, result.update))),
      norm_scale=_f32(result.norm_scale))
  new = AdaptiveState(optax.safe_increment(state.count), result.damping, result.velocity,
                      preconditioner_state, diagnostics)
  skipped = preconditioner_state.skipped_steps > state.preconditioner.skipped_steps
  return _unless_skipped(skipped, result.update, new, state)


def _unless_skipped(skipped: Array, update: PyTree, new: AdaptiveState, old: AdaptiveState
                    ) -> tuple[PyTree, AdaptiveState]:
  """A batch the preconditioner skipped (not finite): zero update, and every state as it
  was but the preconditioner's (which counts the skip)."""
  kept = jax.tree_util.tree_map(lambda n, o: jnp.where(skipped, o, n), new, old)
  update = jax.tree_util.tree_map(lambda u: jnp.where(skipped, jnp.zeros_like(u), u), update)
  return update, kept._replace(preconditioner=new.preconditioner)


def adaptive(config: AdaptiveConfig, preconditioner: optax.GradientTransformationExtraArgs
             ) -> optax.GradientTransformationExtraArgs:
  """The adaptive K-FAC optimizer around `preconditioner` (a `jkfac.precondition`)."""

  def init_fn(params):
    return init(config, preconditioner, params)

  def update_fn(updates, state, params=None, *, batch=None, curvature=None,
                model_params=None, **extra_args):
    del extra_args
    _check(params is not None and batch is not None,
           "jkfac needs the parameters and the batch: "
           "tx.update(grads, state, params, batch=batch).")
    return update(config, preconditioner, updates, state, params, batch, curvature,
                  model_params)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --- reading the diagnostics -----------------------------------------------------------


def _find(tree: PyTree, kind: type) -> list:
  leaves = jax.tree_util.tree_leaves(tree, is_leaf=lambda s: isinstance(s, kind))
  return [leaf for leaf in leaves if isinstance(leaf, kind)]


def diagnostics(opt_state: PyTree) -> dict[str, Array]:
  """The last step's diagnostics of the one jkfac optimizer in `opt_state` (any nesting
  of optax states: chains, `inject_hyperparams`, `masked`).

  Keys `DIAGNOSTICS`: damping, rho, alpha, mu, quad_change, update_norm, norm_scale (see
  `Diagnostics`), skipped_steps, inverse_fallbacks (the preconditioner's counters). For
  `jkfac.kfac` without adaptive keywords or a bare `jkfac.precondition`: only damping
  (of the inverses), skipped_steps and inverse_fallbacks.

  Example:
    >>> updates, opt_state = tx.update(grads, opt_state, params, batch=batch)
    >>> print({k: float(v) for k, v in jkfac.diagnostics(opt_state).items()})
  """
  found = _find(opt_state, AdaptiveState)
  if found:
    _check(len(found) == 1, f"opt_state holds {len(found)} adaptive jkfac states; pass one.")
    state = found[0]
    counters = state.preconditioner
    return {**state.diagnostics._asdict(), "skipped_steps": counters.skipped_steps,
            "inverse_fallbacks": counters.inverse_fallbacks}
  found = _find(opt_state, PreconditionState)
  _check(len(found) == 1, f"opt_state holds {len(found)} jkfac preconditioner states; "
         "diagnostics needs exactly one.")
  return {"damping": found[0].damping, "skipped_steps": found[0].skipped_steps,
          "inverse_fallbacks": found[0].inverse_fallbacks}
