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
  joint:        optional `(covariances, damping, method) -> inverses`, for a block whose
                factors are inverted together (as one task): it replaces `factors`
                (which then returns nothing) and the inversion factor by factor.
  reduce_positions:      fed with inputs averaged and output gradients summed over each
                         example's positions (K-FAC-reduce) instead of every position.
  separate_input_factor: the input factor is estimated apart from the output side, so
                         `sub_sample_patches` may thin its rows.
  refresh, rebase: optional, for a block whose statistics are measured in the basis of
                its inverses (EKFAC): `statistics` then takes the layer's inverses as a
                third argument, `refresh(inverses, covariances) -> inverses` brings the
                bias-corrected statistics into the inverses after every statistics step,
                and `rebase(statistics, inverses, ema_weight) -> statistics` restarts the
                raw EMAs that belong to the old basis after every inverse update.
  """
  zeros: Callable[[int, int], Arrays]
  statistics: Callable[[Array, Array], Arrays]
  factors: Callable[[Arrays, Array], dict[str, tuple[Array, Array]]]
  precondition: Callable[[Arrays, Array], Array]
  entrywise: bool = False
  joint: Callable[[Arrays, Array, str], Arrays] | None = None
  reduce_positions: bool = False
  separate_input_factor: bool = False
  refresh: Callable[[Arrays, Arrays], Arrays] | None = None
  rebase: Callable[[Arrays, Arrays, Array], Arrays] | None = None

  @property
  def uses_basis(self) -> bool:
    """Whether `statistics` takes the layer's inverses (see `refresh`)."""
    return self.refresh is not None

  def is_entrywise(self, factor: Array) -> bool:
    """Whether `factor` is inverted entrywise: all of an entrywise block, or a vector."""
    return self.entrywise or factor.ndim == 1

  def invert(self, factor: Array, damping: Array, method: str = "cholesky") -> Array:
    """The damped inverse of one factor."""
    if self.is_entrywise(factor):
      return 1.0 / (factor + damping)
    if factor.ndim == 3:  # diagonal blocks (`blocks.blocked`), each inverted alone
      return jax.vmap(lambda m: linalg.damped_inverse(m, damping, method))(factor)
    return linalg.damped_inverse(factor, damping, method)

  def identity(self, covariances: Arrays) -> Arrays:
    """Inverses that leave gradients unchanged: the state before the first inversion."""
    if self.joint is not None:  # zero statistics with unit damping invert to the identity
      zeros = {name: jnp.zeros_like(c) for name, c in covariances.items()}
      return self.joint(zeros, jnp.ones((), jnp.result_type(*zeros.values())), "eigh")
    return {name: jnp.ones_like(f) if self.is_entrywise(f)
            else jnp.broadcast_to(jnp.eye(f.shape[-1], dtype=f.dtype), f.shape)
            for name, (f, _) in self.factors(covariances, 1.0).items()}

  def invert_jointly(self, statistics: Arrays, damping: Array,
                     method: str = "cholesky") -> Arrays:
    """All inverses of a `joint` block, computed as one task."""
    return self.joint(statistics, damping, method)

  def finite_or_previous(self, new: Arrays, previous: Arrays) -> tuple[Arrays, Array]:
    """The layer's `new` inverses if all are finite, else all of `previous` (never a mix
    of fresh and stale factors), and 1 where it fell back (0 otherwise)."""
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in new.values()]))
    chosen = {name: jnp.where(finite, x, previous[name]).astype(previous[name].dtype)
              for name, x in new.items()}
    return chosen, jnp.logical_not(finite).astype(jnp.int32)


def rows(a: LayerInputs | Array) -> Array:
  """The input vectors `(batch, positions, d_in)`, from `LayerInputs` or as given."""
  return a.rows() if isinstance(a, LayerInputs) else a


def covariance(a: LayerInputs | Array) -> Array:
  """The mean of `a a^T` over examples and positions."""
  return (a if isinstance(a, LayerInputs) else LayerInputs([a], bias=False)).covariance()


def per_example_gradients(a: LayerInputs | Array, g: Array) -> Array:
  """`sum_t a_t g_t^T` per column and example: `(columns, batch, d_in, d_out)`."""
  return jnp.einsum("nta,kntg->knag", rows(a), g)
