"""The validated static settings of `jkfac.precondition`, and the defaults they share.

Static settings live in a frozen `PreconditionConfig`, built and checked once when the
optimizer is made; arrays live in the state. Numbers may arrive as arrays from
`optax.inject_hyperparams`: they are checked only when they are Python numbers.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
import warnings
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from jkfac import (blocks, factor_sizes, layer_table, linalg, losses, masking, parallel,
                   statistics_examples)
from jkfac.layer_info import Trace
from jkfac.schedules import ScalarOrSchedule
from jkfac.validation import abstract, check, is_integer, is_number, same_shapes

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
  """The static settings of `jkfac.precondition`, validated when built: the one place
  where each setting and its default are written.

  Attributes:
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
      (default) uses every patch; "auto" (`jkfac.kfac`'s default) is 3, tensorflow/kfac's
      `max_num_patches_per_dimension`, for layers with `d_in >= 4 * d_out` (where A
      costs well above the layer's product; the others keep every row). Static: under
      `optax.inject_hyperparams`, list a number in `static_args`.
    example_params: the whole model's parameters (or their shapes), needed only inside
      `optax.masked` / `optax.multi_transform`, which show jkfac part of them; then pass
      `model_params=params` (the whole model's) to `update` as well. Layers with
      parameters outside the mask are left to the other transformations.
    strict: raise `ValueError` in `init`, instead of a `GenericBlockWarning`, when a
      parameter with two or more dimensions gets a generic diagonal block because no
      recognised layer uses it, and instead of a `LossScaleWarning` when `loss_fn`'s value
      is far from its registered losses' (see `jkfac.check_loss_scale`; checked when
      `init` gets concrete parameters and `example_batch` holds values).

    max_factor_dim: a layer whose input or output features exceed this keeps that side's
      factor diagonal (`jkfac.factor_sizes`), with a warning at `init`; None: 4096
      (`MAX_FACTOR_DIM`). Static: under `optax.inject_hyperparams`, list it in
      `static_args`.
    factor_block_size: Kronecker factors kept block-diagonal (`jkfac.factor_sizes`):
      "auto" (default) only where whole ones would cost more to apply than the whole
      gradient (small batches of wide dense layers), in the largest of 2048, 1024, ...,
      128 features that fits; an integer: blocks of at most that many features for every
      wider factor; None: whole factors. Static.
    warm_start: no inverse from a single batch: statistics on each of the first 10 steps
      (`preconditioner.WARM_START_STATISTICS`), inverses at steps 1, 2, 4, 8, ... below
      `invert_every`,
      and none at step 0 (whose preconditioner is the identity). `jkfac.kfac` turns it on.
    max_statistics_examples: a statistics step without `jkfac.value_and_grad` (which
      reuses the gradient's pass over the whole batch) reads at most this many of the
      batch's examples, drawn without replacement on every statistics step
      (`jkfac.statistics_examples`: the leaves of the batch's leading size are cut, where
      that shrinks every layer alike, else a warning); "auto" (`jkfac.kfac`'s default):
      512 (`statistics_examples.AUTO_EXAMPLES`); None: every example. Static.
  """
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
  sub_sample_patches: float | str | None = None
  example_params: PyTree | None = None
  strict: bool = False
  warm_start: bool = False
  max_factor_dim: int | None = None
  factor_block_size: int | str | None = "auto"
  max_statistics_examples: int | str | None = None

  def __post_init__(self):
    check(is_number(self.damping) or callable(self.damping)
           or isinstance(self.damping, jax.Array),
           f"damping must be a positive number, a schedule or an array, got {self.damping!r}.")
    if is_number(self.damping):
      check(0 < self.damping < math.inf,
            f"damping must be positive and finite, got {self.damping}.")
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
    check(self.sub_sample_patches in (None, "auto") or (
        is_number(self.sub_sample_patches) and self.sub_sample_patches > 0),
          f"sub_sample_patches must be 'auto', None or a positive number (a static value: "
          f"under optax.inject_hyperparams, list it in static_args), got "
          f"{self.sub_sample_patches!r}.")
    check(self.placement is None or self.placement in parallel.PLACEMENTS,
           f"Unknown placement {self.placement!r}; expected one of {parallel.PLACEMENTS}.")
    check(self.max_factor_dim is None or (is_integer(self.max_factor_dim)
                                          and self.max_factor_dim >= 1),
          f"max_factor_dim must be None or an integer >= 1 (a static value: under "
          f"optax.inject_hyperparams, list it in static_args), got {self.max_factor_dim!r}.")
    check(self.max_statistics_examples in (None, "auto") or (
        is_integer(self.max_statistics_examples) and self.max_statistics_examples >= 1),
          f"max_statistics_examples must be 'auto', None or an integer >= 1 (a static value: "
          f"under optax.inject_hyperparams, list it in static_args), got "
          f"{self.max_statistics_examples!r}.")
    check(self.factor_block_size in (None, "auto") or (
        is_integer(self.factor_block_size) and self.factor_block_size >= 1),
          f"factor_block_size must be 'auto', None or an integer >= 1 (a static value), got "
          f"{self.factor_block_size!r}.")
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
  def examples_bound(self) -> int | None:
    """`max_statistics_examples`, "auto" resolved."""
    if self.max_statistics_examples == "auto":
      return statistics_examples.AUTO_EXAMPLES
    return self.max_statistics_examples

  @property
  def factor_bound(self) -> int:
    """`max_factor_dim`, its default resolved."""
    return factor_sizes.MAX_FACTOR_DIM if self.max_factor_dim is None else self.max_factor_dim

  @property
  def device_axis(self) -> str | None:
    """The pmap axis to average over (None under `jax.jit` with a mesh, or alone)."""
    return self.axis_name if self.mesh is None else None

  def trace(self, params: PyTree, batch: PyTree, masked: PyTree | None = None,
            warn: bool = False) -> Trace:
    """The checked layer table of `loss_fn` at these shapes, factors bounded by
    `max_factor_dim` (`warn`: say which); with `masked` (the view `optax.masked` gives of
    `params`), only its layers."""
    def traced(batch):
      return layer_table.trace_with_approximations(
          self.loss_fn, params, batch, approximations=self.approximations,
          auto_register=self.auto_register)

    trace = traced(batch)
    block_size = self.factor_block_size
    if block_size == "auto":  # chosen at the example batch's rows: the state's layout
      # must not change with the batch (an epoch's smaller last batch).
      example = trace if same_shapes(batch, self.example_batch) else traced(self.example_batch)
      block_size = factor_sizes.auto_block_size(
          factor_sizes.bound_factors(example, self.factor_bound))
    trace = factor_sizes.bound_factors(trace, self.factor_bound, warn, block_size)
    if masked is None:
      return trace
    return masking.only_present(trace, masking.present_leaves(masked, params))



CURVATURE_FIELDS = tuple(f.name for f in dataclasses.fields(PreconditionConfig)
                         if f.name not in ("loss_fn", "example_batch", "damping"))


def with_curvature_settings(factory: Callable[..., Any], defaults: Mapping[str, Any],
                            excluded: tuple[str, ...] = ()) -> Callable[..., Any]:
  """`factory` (which takes `**settings` for `PreconditionConfig`) with a signature that
  lists every curvature setting but `excluded` as a keyword with its default (`defaults`
  first), so `inspect` and `optax.inject_hyperparams` see them: the fields stay written
  once."""
  signature = inspect.signature(factory)
  parameters = [p for p in signature.parameters.values() if p.kind != p.VAR_KEYWORD]
  fields = {f.name: f for f in dataclasses.fields(PreconditionConfig)}
  for name in CURVATURE_FIELDS:
    if name in excluded:
      continue
    default = defaults.get(name, fields[name].default)
    parameters.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY,
                                        default=default, annotation=fields[name].type))
  factory.__signature__ = signature.replace(parameters=parameters)
  return factory
