"""A block applied to layers stacked along a leading axis (e.g. `nn.scan` over layers).

The layers are independent: each slice of the stacked parameters gets its own block,
so every array of the block gains a leading axis and every function is `jax.vmap`ed.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jkfac.blocks.base import Arrays, Array, Block


class StackedBlock(NamedTuple):
  """`block` for `size` stacked layers; `Block`'s interface but `statistics`, which the
  caller maps over the layers itself (it builds the block's inputs per layer)."""
  block: Block
  size: int

  def zeros(self, d_in: int, d_out: int) -> Arrays:
    return jax.tree_util.tree_map(lambda z: jnp.broadcast_to(z, (self.size,) + z.shape),
                                  self.block.zeros(d_in, d_out))

  def factors(self, covariances: Arrays, damping: Array) -> dict[str, tuple[Array, Array]]:
    return jax.vmap(self.block.factors, in_axes=(0, None))(covariances, damping)

  def precondition(self, inverses: Arrays, gradient: Array) -> Array:
    return jax.vmap(self.block.precondition)(inverses, gradient)

  def is_entrywise(self, factor: Array) -> bool:
    return self.block.is_entrywise(factor[0])

  def invert(self, factor: Array, damping: Array, method: str = "cholesky") -> Array:
    return jax.vmap(functools.partial(self.block.invert, method=method))(factor, damping)

  def identity(self, covariances: Arrays) -> Arrays:
    return jax.vmap(self.block.identity)(covariances)

  def inverses(self, covariances: Arrays, damping: Array, method: str = "cholesky") -> Arrays:
    return jax.vmap(functools.partial(self.block.inverses, method=method),
                    in_axes=(0, None))(covariances, damping)
