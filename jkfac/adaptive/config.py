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

MOMENTUM_TYPES = ("regular", "adam", "qmodel", "qmodel_fixedmu")
QMODEL_TYPES = ("qmodel", "qmodel_fixedmu")
# The initial damping with `adapt_damping=True` when none is given: a scale for a mean
# loss whose Fisher is O(1); the LM rule moves it by ω = 0.95**5 ≈ 0.77 per adaptation.
DEFAULT_ADAPTIVE_DAMPING = 1e-3


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
  min_damping: float = DEFAULT_MIN_DAMPING
  max_damping: float = math.inf
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
           "'qmodel' and 'qmodel_fixedmu' choose the step size themselves.")
    if is_number(self.learning_rate):
      check(self.learning_rate > 0, f"learning_rate must be positive, got "
             f"{self.learning_rate}.")
    check(self.momentum is not None or self.momentum_type != "qmodel_fixedmu",
           "momentum_type='qmodel_fixedmu' needs a momentum.")
    check(isinstance(self.adapt_damping, bool),
           f"adapt_damping must be True or False, got {self.adapt_damping!r}.")
    check(self.damping is not None or self.adapt_damping,
           "damping is required unless adapt_damping=True (then it is the initial value, "
           f"by default {DEFAULT_ADAPTIVE_DAMPING}).")
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
    if self.num_burnin_steps is not None and not isinstance(self.num_burnin_steps, jax.Array):
      check(is_integer(self.num_burnin_steps) and self.num_burnin_steps >= 0,
             f"num_burnin_steps must be an integer >= 0, got {self.num_burnin_steps!r}.")
    if self.example_params is not None:
      object.__setattr__(self, "example_params", abstract(self.example_params))
    object.__setattr__(self, "example_batch", abstract(self.example_batch))

  def _check_adaptation(self) -> None:
    interval = self.damping_adaptation_interval
    if not isinstance(interval, jax.Array):
      check(is_integer(interval) and interval >= 1,
             f"damping_adaptation_interval must be an integer >= 1, got {interval!r}.")
    if is_number(self.damping_adaptation_decay):
      check(0 < self.damping_adaptation_decay < 1, f"damping_adaptation_decay must be in "
             f"(0, 1), got {self.damping_adaptation_decay}.")
    low, high = self.min_damping, self.max_damping
    if is_number(low):
      check(low > 0, f"min_damping must be positive, got {low}.")
    if is_number(low) and is_number(high):
      check(low <= high, f"min_damping ({low}) must not exceed max_damping ({high}).")
      if is_number(self.initial_damping):
        check(low <= self.initial_damping <= high,
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

