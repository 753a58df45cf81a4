"""The preconditioner's state: its type, its initial value, and its check against a model."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jkfac import blocks, layer_table, layers, loss_check, masking
from jkfac.config import MASKED_HINT, PreconditionConfig, state_dtype
from jkfac.layer_info import Trace
from jkfac.validation import abstract, check, check_floating

Array = jax.Array
PyTree = Any


class PreconditionState(NamedTuple):
  """All K-FAC arrays of `precondition`: a plain pytree.

  Attributes:
    count: steps taken so far.
    key: PRNG key for sampling targets (MC Fisher).
    ema_weight: accumulated EMA weight; statistics / ema_weight is bias corrected.
    damping: the damping the current inverses were computed with.
    statistics: per layer name, the raw (not yet bias corrected) EMAs of the block's
      statistics (e.g. "A" and "G" for "kron", "diagonal", "F").
    inverses: per layer name, the damped inverses of the block.
    skipped_steps: steps skipped because their gradients or statistics were not
      finite; such a step changes nothing else in the state.
    inverse_fallbacks: layer inversions (slices, for stacked layers) that were not finite
      even with eigh and kept the layer's previous inverses.
    curvature_scale: `tr F̂ / dim F̂` at the last statistics step (`jkfac.damping`), the
      scale adaptive K-FAC calibrates its damping to; 0 before.
  """
  count: Array
  key: Array
  ema_weight: Array
  damping: Array
  statistics: dict[str, dict[str, Array]]
  inverses: dict[str, dict[str, Array]]
  skipped_steps: Array
  inverse_fallbacks: Array
  curvature_scale: Array


def init_state(config: PreconditionConfig, params: PyTree,
               generic_consequence: str = "generic diagonal blocks") -> PreconditionState:
  """Zero statistics and identity inverses for every layer of `config.loss_fn`; warns
  that parameters of two or more dimensions outside any layer get `generic_consequence`."""
  check_floating(params)
  if masking.is_masked(params):
    check(config.example_params is not None,
           MASKED_HINT + "pass example_params=params (or their shapes) to jkfac.")
    trace = config.trace(config.example_params, config.example_batch, masked=params,
                         warn=True)
  else:
    trace = config.trace(abstract(params), config.example_batch, warn=True)
  layer_table.check_coverage(trace, config.strict, generic_consequence)
  loss_check.check_if_concrete(config.loss_fn, params, config._concrete_batch, config.strict)
  dtype = state_dtype(params)

  def initial_blocks():
    statistics = {layer.name: jax.tree_util.tree_map(
                      lambda z: z.astype(dtype),
                      blocks.for_layer(layer).zeros(*layers.matrix_shape(layer)))
                  for layer in trace.every_layer}
    inverses = {layer.name: blocks.for_layer(layer).identity(statistics[layer.name])
                for layer in trace.every_layer}
    return statistics, inverses

  # One compiled program: run eagerly, the blocks' many small operations compile one by
  # one (the MLP's state took 5 s).
  statistics, inverses = jax.jit(initial_blocks)()
  # A buffer of its own for every leaf: a state donated to a jitted step
  # (`donate_argnums`) may not hold one buffer twice.
  counter = lambda: jnp.zeros([], jnp.int32)
  return PreconditionState(count=counter(), key=jax.random.PRNGKey(config.seed),
                           ema_weight=jnp.zeros([], dtype), damping=jnp.zeros([], dtype),
                           statistics=statistics, inverses=inverses, skipped_steps=counter(),
                           inverse_fallbacks=counter(),
                           curvature_scale=jnp.zeros([], jnp.float32))


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
