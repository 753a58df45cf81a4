"""The interface of a curvature block."""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from jkfac import linalg
from jkfac.layers import LayerInputs

Array = jax.Array
Arrays = dict[str, Array]


class Block(NamedTuple):
  """The pure functions of one approximation; the transform holds their arrays.

  zeros:        `(d_in, d_out) -> covariances` of zeros, the EMA's start.
  statistics:   `(a, g) -> covariances` of one batch; `a` is `LayerInputs` (or the
                array of input vectors), `g` the output gradients.
  factors:      `(covariances, damping) -> {name: (factor, damping to add)}`, the
                factors to invert: symmetric matrices, or arrays inverted entrywise
                when `entrywise` is set; a 1-D factor (a diagonal matrix kept as
                its diagonal) is always inverted entrywise. Kept apart from the
                inversion so the transform can place each inversion on its own device.
  precondition: `(inverses, gradient matrix) -> preconditioned matrix`.
  stacked:      every array has a leading axis of independent blocks (the feature
                groups of a grouped conv, see `stacked`), each inverted on its own.
  """
  zeros: Callable[[int, int], Arrays]
  statistics: Callable[[Array, Array], Arrays]
  factors: Callable[[Arrays, Array], dict[str, tuple[Array, Array]]]
  precondition: Callable[[Arrays, Array], Array]
  entrywise: bool = False
  stacked: bool = False

  def is_entrywise(self, factor: Array) -> bool:
    """Whether `factor` is inverted entrywise: all of an entrywise block, or a vector."""
    return self.entrywise or factor.ndim == 1 + self.stacked

  def invert(self, factor: Array, damping: Array, method: str = "cholesky") -> Array:
    """The damped inverse of one factor (of each slice of a stacked factor)."""
    if self.stacked:  # one damping per slice
      damping = jnp.broadcast_to(damping, factor.shape[:1])
      return jax.vmap(lambda f, d: self._replace(stacked=False).invert(f, d, method))(
          factor, damping)
    if self.is_entrywise(factor):
      return 1.0 / (factor + damping)
    return linalg.damped_inverse(factor, damping, method)

  def identity(self, covariances: Arrays) -> Arrays:
    """Inverses that leave gradients unchanged: the state before the first inversion."""
    return {name: jnp.ones_like(f) if self.is_entrywise(f)
            else jnp.broadcast_to(jnp.eye(f.shape[-1], dtype=f.dtype), f.shape)
            for name, (f, _) in self.factors(covariances, 1.0).items()}

  def inverses(self, covariances: Arrays, damping: Array, method: str = "cholesky") -> Arrays:
    """All damped inverses of the block, computed here."""
    return {name: self.invert(factor, d, method)
            for name, (factor, d) in self.factors(covariances, damping).items()}


def stacked(block: Block, groups: int) -> Block:
  """`block` for `groups` independent layers side by side (a grouped conv's feature groups).

  Every array gains a leading group axis: statistics `(groups, ...)` from inputs and
  output gradients stacked the same way (`jkfac.layers`), factors damped per group
  (each its own pi), inverses and preconditioning vmapped over the groups.
  """
  def zeros(d_in: int, d_out: int) -> Arrays:
    return {name: jnp.zeros((groups,) + z.shape, z.dtype)
            for name, z in block.zeros(d_in, d_out).items()}

  def statistics(a: LayerInputs | Array, g: Array) -> Arrays:
    if isinstance(a, LayerInputs):  # map over the arrays; the bias flag is static
      return jax.vmap(lambda parts, g: block.statistics(LayerInputs(parts, a.bias), g))(
          a.groups, g)
    return jax.vmap(block.statistics)(a, g)

  return block._replace(zeros=zeros, statistics=statistics,
                        factors=jax.vmap(block.factors, in_axes=(0, None)),
                        precondition=jax.vmap(block.precondition), stacked=True)


def rows(a: LayerInputs | Array) -> Array:
  """The input vectors `(batch, positions, d_in)`, from `LayerInputs` or as given."""
  return a.rows() if isinstance(a, LayerInputs) else a


def covariance(a: LayerInputs | Array) -> Array:
  """The mean of `a a^T` over examples and positions."""
  return (a if isinstance(a, LayerInputs) else LayerInputs([a], bias=False)).covariance()


def per_example_gradients(a: LayerInputs | Array, g: Array) -> Array:
  """`sum_t a_t g_t^T` per column and example: `(columns, batch, d_in, d_out)`."""
  return jnp.einsum("nta,kntg->knag", rows(a), g)
