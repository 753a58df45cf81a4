"""The validated static settings of `jkfac.precondition`, and the defaults they share.

Static settings live in a frozen `PreconditionConfig`, built and checked once when the
optimizer is made; arrays live in the state. Numbers may arrive as arrays from
`optax.inject_hyperparams`: they are checked only when they are Python numbers.
"""

from __future__ import annotations

import dataclasses
import numbers
import warnings
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from jkfac import blocks, layer_table, linalg, losses, masking, parallel
from jkfac.layer_info import Trace
from jkfac.schedules import ScalarOrSchedule
from jkfac.validation import abstract, check, is_number

PyTree = Any


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

MASKED_HINT = ("jkfac is inside optax.masked or optax.multi_transform, so it sees only part "
               "of the parameters, but its statistics need a forward pass of the whole model: ")


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
    check(is_number(self.damping) or callable(self.damping)
           or isinstance(self.damping, jax.Array),
           f"damping must be a positive number, a schedule or an array, got {self.damping!r}.")
    if is_number(self.damping):
      check(self.damping > 0, f"damping must be positive, got {self.damping}.")
    if self.damping is not None and is_number(self.damping) and self.damping < MIN_DAMPING:
      warnings.warn(f"damping {self.damping} is below jkfac.MIN_DAMPING "
                    f"({MIN_DAMPING}); it is raised to that floor.", stacklevel=3)
    check(is_number(self.cov_ema_decay) or callable(self.cov_ema_decay)
           or isinstance(self.cov_ema_decay, jax.Array),
           f"cov_ema_decay must be a number in [0, 1), a schedule or an array, got "
           f"{self.cov_ema_decay!r}.")
    if is_number(self.cov_ema_decay):
      check(0 <= self.cov_ema_decay < 1,
             f"cov_ema_decay must be in [0, 1), got {self.cov_ema_decay}.")
    for name in ("cov_update_every", "invert_every"):
      every = getattr(self, name)
      if not isinstance(every, jax.Array):  # arrays come from optax.inject_hyperparams
        check(isinstance(every, numbers.Integral) and not isinstance(every, bool)
               and every >= 1, f"{name} must be an integer >= 1, got {every!r}.")
    check(self.estimation in losses.ESTIMATIONS,
           f"Unknown estimation {self.estimation!r}; expected one of {losses.ESTIMATIONS}.")
    check(self.inverse_method in linalg.INVERSE_METHODS,
           f"Unknown inverse_method {self.inverse_method!r}; expected one of "
           f"{linalg.INVERSE_METHODS}.")
    for pattern, approx in (self.approximations or {}).items():
      check(approx in blocks.APPROXIMATIONS,
             f"Unknown approximation {approx!r} for {pattern!r}; expected one of "
             f"{blocks.APPROXIMATIONS}.")
    check(self.sub_sample_patches is None or (is_number(self.sub_sample_patches)
                                               and self.sub_sample_patches > 0),
           f"sub_sample_patches must be None or a positive number, got "
           f"{self.sub_sample_patches!r}.")
    check(self.placement is None or self.placement in parallel.PLACEMENTS,
           f"Unknown placement {self.placement!r}; expected one of {parallel.PLACEMENTS}.")
    if self.mesh is not None:
      check(self.axis_name in self.mesh.axis_names,
             f"With mesh=, axis_name must name one of its axes {self.mesh.axis_names}; got "
             f"{self.axis_name!r}.")
    object.__setattr__(self, "_concrete_batch", self.example_batch)  # for the loss check
    object.__setattr__(self, "example_batch", abstract(self.example_batch))
    if self.example_params is not None:
      object.__setattr__(self, "example_params", abstract(self.example_params))
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

