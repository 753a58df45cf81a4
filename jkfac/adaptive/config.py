"""The validated static settings of adaptive K-FAC (see `jkfac.kfac`)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax

from jkfac.config import DEFAULT_MIN_DAMPING
from jkfac.schedules import ScalarOrSchedule
from jkfac.validation import abstract, check, is_integer, is_number

PyTree = Any

MOMENTUM_TYPES = ("regular", "adam", "qmodel", "qmodel_fixedmu", "qmodel_trace")
GRAFTS = ("adam",)
QMODEL_TYPES = ("qmodel", "qmodel_fixedmu", "qmodel_trace")
# The initial damping with `adapt_damping=True` when none is given and the curvature has
# no scale to calibrate it to (no K-FAC block's statistics): a scale for a mean loss.
DEFAULT_ADAPTIVE_DAMPING = 1e-3
# Calibrated damping (`damping=None`): the first step's λ is this times the K-FAC
# curvature's mean eigenvalue `tr F̂ / dim F̂` (`jkfac.damping`), so it follows the loss's
# scale (a loss summed over outputs has a larger Fisher than their mean).
CALIBRATED_DAMPING = 1.0
# With `min_damping=None`, λ is kept at least this times the current mean eigenvalue:
# a floor that moves with the curvature instead of a constant in the loss's units.
RELATIVE_MIN_DAMPING = 1e-3
# A rejected step (the batch loss rose, or is not finite at the new parameters) multiplies
# λ by this at once, on top of the LM rule's slow ω.
REJECTION_BOOST = 4.0
# The quadratic model's momentum coefficient μ is kept in [0, MAX_MU]: a negative μ
# undoes the previous step, one above 1 compounds it (both seen on single batches).
MAX_MU = 0.99
# "qmodel_trace" steps along `u = F̂⁻¹g + TRACE_DECAY · u_prev`: at 0.5 and 0.3 it matched
# "qmodel"'s steps on the five robustness models at batch 128; at 0.9 the MLP needed
# 0.96x Adam's steps instead of 0.52x (docs/benchmarks.md, 2026-12-07).
TRACE_DECAY = 0.5


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
  min_damping: float | None = DEFAULT_MIN_DAMPING
  max_damping: float = math.inf
  reject_steps: bool = False
  graft: str | None = None
  norm_constraint: float | None = None
  l2_reg: float | None = None
  l2_reg_exclude: Sequence[str] | str | Callable[[str], bool] | None = None
  num_burnin_steps: int | None = None
  axis_name: str | None = None
  mesh: jax.sharding.Mesh | None = None
  example_params: PyTree | None = None

  def __post_init__(self):
    check(self.momentum_type in MOMENTUM_TYPES,
           f"momentum_type must be one of {MOMENTUM_TYPES}, got {self.momentum_type!r}.")
    check(self.learning_rate is not None or self.qmodel,
           f"learning_rate is required with momentum_type={self.momentum_type!r}; only "
           "the 'qmodel' types choose the step size themselves.")
    if is_number(self.learning_rate):
      check(self.learning_rate > 0, f"learning_rate must be positive, got "
             f"{self.learning_rate}.")
    check(self.momentum is None or is_number(self.momentum) or callable(self.momentum)
          or isinstance(self.momentum, jax.Array),
          f"momentum must be None, a number in [0, 1), a schedule or an array, got "
          f"{self.momentum!r}.")
    if is_number(self.momentum):
      check(0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}.")
    check(self.momentum is not None or self.momentum_type != "qmodel_fixedmu",
           "momentum_type='qmodel_fixedmu' needs a momentum.")
    check(isinstance(self.adapt_damping, bool),
           f"adapt_damping must be True or False, got {self.adapt_damping!r}.")
    check(self.damping is not None or self.adapt_damping or self.graft is not None,
           "damping is required unless adapt_damping=True (then it is the initial value, "
           "by default calibrated to the curvature's scale) or graft is set.")
    if self.adapt_damping:
      check(not callable(self.damping),
             "With adapt_damping=True, damping is the initial value: a number, not a schedule.")
      self._check_adaptation()
    if self.norm_constraint is not None:
      check(not self.qmodel, "norm_constraint needs a fixed learning rate: use it with "
             "momentum_type 'regular' or 'adam' (the quadratic model sizes its own step).")
      if is_number(self.norm_constraint):
        check(self.norm_constraint > 0,
               f"norm_constraint must be positive, got {self.norm_constraint}.")
    if is_number(self.l2_reg):
      check(self.l2_reg >= 0, f"l2_reg must be >= 0, got {self.l2_reg}.")
    check(self.l2_reg_exclude is None or self.l2_reg is not None,
           "l2_reg_exclude was given without l2_reg.")
    check(self.graft is None or self.graft in GRAFTS,
          f"graft must be None or one of {GRAFTS}, got {self.graft!r}.")
    check(self.graft is None or not self.qmodel,
          "graft='adam' takes Adam's step lengths for a fixed learning rate: pass "
          "learning_rate (the quadratic model sizes its own steps).")
    check(isinstance(self.reject_steps, bool) and (self.adapt_damping or not self.reject_steps),
          "reject_steps=True needs adapt_damping=True (a rejection raises the damping).")
    if self.num_burnin_steps is not None and not isinstance(self.num_burnin_steps, jax.Array):
      check(is_integer(self.num_burnin_steps) and self.num_burnin_steps >= 0,
             f"num_burnin_steps must be an integer >= 0, got {self.num_burnin_steps!r}.")
    if self.example_params is not None:
      object.__setattr__(self, "example_params", abstract(self.example_params))
    object.__setattr__(self, "example_batch", abstract(self.example_batch))

  @classmethod
  def from_kfac(cls, loss_fn: Callable[..., Any], example_batch: PyTree, *,
                learning_rate: ScalarOrSchedule | None, momentum_type: str | None,
                damping: ScalarOrSchedule | None, adapt_damping: bool | None,
                reject_steps: bool | None, damping_adaptation_interval: int | None,
                **settings: Any) -> "AdaptiveConfig":
    """The configuration `jkfac.kfac` builds: its `None`s resolved to their defaults.

    momentum_type: "qmodel" without a learning rate, else "regular"; adapt_damping: when
    no damping is given and no graft (a grafted step's length is Adam's, so its damping
    only shapes the direction: calibrated to the curvature, not adapted); reject_steps: with adapt_damping; damping_adaptation_interval: 1
    when every step is measured (reject_steps), else 5.
    """
    if momentum_type is None:
      momentum_type = "qmodel" if learning_rate is None else "regular"
    if adapt_damping is None:
      adapt_damping = damping is None and settings.get("graft") is None
    if reject_steps is None:
      reject_steps = adapt_damping
    if damping_adaptation_interval is None:
      damping_adaptation_interval = 1 if reject_steps else 5
    return cls(loss_fn, example_batch, learning_rate=learning_rate,
               momentum_type=momentum_type, damping=damping, adapt_damping=adapt_damping,
               reject_steps=reject_steps,
               damping_adaptation_interval=damping_adaptation_interval, **settings)

  def _check_adaptation(self) -> None:
    interval = self.damping_adaptation_interval
    if not isinstance(interval, jax.Array):
      check(is_integer(interval) and interval >= 1,
             f"damping_adaptation_interval must be an integer >= 1, got {interval!r}.")
    if is_number(self.damping_adaptation_decay):
      check(0 < self.damping_adaptation_decay < 1, f"damping_adaptation_decay must be in "
             f"(0, 1), got {self.damping_adaptation_decay}.")
    low, high = self.min_damping, self.max_damping
    check(low is not None or self.adapt_damping,
          "min_damping=None (a floor relative to the curvature) needs adapt_damping=True.")
    if is_number(low):
      check(low > 0, f"min_damping must be positive, got {low}.")
    if is_number(high):
      check(high > 0, f"max_damping must be positive, got {high}.")
    if is_number(low) and is_number(high):
      check(low <= high, f"min_damping ({low}) must not exceed max_damping ({high}).")
    low = low if is_number(low) else 0.0
    if is_number(high) and is_number(self.damping):
      check(low <= self.damping <= high,
            f"damping (the initial value, {self.damping}) "
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
  def calibrated(self) -> bool:
    """Whether the damping is calibrated to the curvature's scale: the first step's, when
    it is adapted; every inverse update's, when it is not (`graft` without a damping)."""
    return self.damping is None

  @property
  def initial_damping(self) -> ScalarOrSchedule:
    """The damping before the first step (0 when it is calibrated at the first step)."""
    return 0.0 if self.calibrated else self.damping

