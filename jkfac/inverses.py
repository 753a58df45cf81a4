"""Damped inverses of every block, each factor inverted on one device (see `parallel`)."""

from __future__ import annotations

import functools
import jax
import jax.numpy as jnp

from jkfac import blocks, parallel
from jkfac.blocks import Block, StackedBlock
from jkfac.config import PreconditionConfig
from jkfac.layer_info import Trace
from jkfac.state import PreconditionState

Array = jax.Array


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
      tasks.append((functools.partial(invert_jointly, layer_block, config.inverse_method),
                    (corrected, damping)))
      costs.append(sum(inverse_cost(layer_block, c) for c in corrected.values()))
      slots.append((layer.name, None))
      continue
    for factor, (matrix, damping_added) in layer_block.factors(corrected, damping).items():
      tasks.append((functools.partial(invert_factor, layer_block, config.inverse_method),
                    (matrix, damping_added)))
      costs.append(inverse_cost(layer_block, matrix))
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


def inverse_cost(layer_block: Block | StackedBlock, factor: Array) -> int:
  """The work of inverting `factor`: its size if entrywise or not square, else `d^3` per
  matrix (a stacked factor holds several)."""
  square = factor.ndim >= 2 and factor.shape[-1] == factor.shape[-2]
  return factor.size * (factor.shape[-1] if square and not layer_block.is_entrywise(factor)
                        else 1)


def invert_factor(layer_block: Block | StackedBlock, method: str, factor: Array,
                   damping: Array) -> Array:
  """The damped inverse of `factor`; a Cholesky inverse that is not finite (round-off
  made the factor indefinite) is computed again with eigh, only then."""
  inverse = layer_block.invert(factor, damping, method)
  if method != "cholesky" or layer_block.is_entrywise(factor):
    return inverse
  return jax.lax.cond(jnp.all(jnp.isfinite(inverse)), lambda: inverse,
                      lambda: layer_block.invert(factor, damping, "eigh"))


def invert_jointly(layer_block: Block | StackedBlock, method: str,
                    statistics: dict[str, Array], damping: Array) -> dict[str, Array]:
  """The inverses of a block inverted as a whole (`Block.joint`)."""
  return layer_block.invert_jointly(statistics, damping, method)

