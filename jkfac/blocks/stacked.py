"""A block applied to independent layers stacked along a leading axis.

Two things stack: the layers of a scan over stacked parameters (`nn.scan` over
layers), and the feature groups of a grouped conv (K-FAC is block diagonal over
groups). Each slice gets its own block, so every array of the block gains a leading
axis and every function is `jax.vmap`ed; stacks nest (a grouped conv in `nn.scan`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jkfac.blocks.base import Arrays, Array, Block
from jkfac.layers import LayerInputs


class StackedBlock(NamedTuple):
  """`block` for `size` stacked layers, with `Block`'s interface."""
  block: "Block | StackedBlock"
  size: int

  def zeros(self, d_in: int, d_out: int) -> Arrays:
    return jax.tree_util.tree_map(lambda z: jnp.broadcast_to(z, (self.size,) + z.shape),
                                  self.block.zeros(d_in, d_out))

  def statistics(self, a: LayerInputs | Array, g: Array, *basis: Arrays) -> Arrays:
    """From inputs and output gradients (and inverses, see `Block.refresh`) whose arrays
    lead with the stack axis."""
    if isinstance(a, LayerInputs):  # map over the arrays; the bias flag is static
      return jax.vmap(lambda parts, g, *basis: self.block.statistics(
          LayerInputs(parts, a.bias), g, *basis))(a.groups, g, *basis)
    return jax.vmap(self.block.statistics)(a, g, *basis)

  def factors(self, covariances: Arrays, damping: Array) -> dict[str, tuple[Array, Array]]:
    return jax.vmap(self.block.factors, in_axes=(0, None))(covariances, damping)

  def precondition(self, inverses: Arrays, gradient: Array) -> Array:
    return jax.vmap(self.block.precondition)(inverses, gradient)

  @property
  def joint(self):
    return self.block.joint

  @property
  def uses_basis(self) -> bool:
    return self.block.uses_basis

  @property
  def refresh(self):
    return self.block.refresh and jax.vmap(self.block.refresh)

  @property
  def rebase(self):
    return self.block.rebase and jax.vmap(self.block.rebase, in_axes=(0, 0, None))

  @property
  def reduce_positions(self) -> bool:
    return self.block.reduce_positions

  @property
  def separate_input_factor(self) -> bool:
    return self.block.separate_input_factor

  def invert_jointly(self, statistics: Arrays, damping: Array,
                     method: str = "cholesky") -> Arrays:
    return jax.vmap(functools.partial(self.block.invert_jointly, method=method),
                    in_axes=(0, None))(statistics, damping)

  def is_entrywise(self, factor: Array) -> bool:
    return self.block.is_entrywise(factor[0])

  def invert(self, factor: Array, damping: Array, method: str = "cholesky") -> Array:
    damping = jnp.broadcast_to(damping, factor.shape[:1])  # one per slice, or shared
    return jax.vmap(functools.partial(self.block.invert, method=method))(factor, damping)

  def identity(self, covariances: Arrays) -> Arrays:
    return jax.vmap(self.block.identity)(covariances)

  def finite_or_previous(self, new: Arrays, previous: Arrays) -> tuple[Arrays, Array]:
    """Slice by slice: a slice keeps its previous inverses if its new ones are not finite."""
    chosen, fell_back = jax.vmap(self.block.finite_or_previous)(new, previous)
    return chosen, jnp.sum(fell_back)
