"""Damped inverses of symmetric positive semi-definite matrices."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

INVERSE_METHODS = ("cholesky", "eigh")


def damped_inverse(matrix: Array, damping: Array, method: str = "cholesky") -> Array:
  """`(matrix + damping * I)^-1` for a symmetric PSD `matrix`.

  "cholesky" is the fastest; "eigh" clips negative eigenvalues from round-off to
  zero first, so it is the more robust on badly conditioned factors.
  """
  eye = jnp.eye(matrix.shape[-1], dtype=matrix.dtype)
  if method == "cholesky":
    inverse_factor = lower_triangular_inverse(jnp.linalg.cholesky(matrix + damping * eye))
    return inverse_factor.T @ inverse_factor
  if method == "eigh":
    values, vectors = jnp.linalg.eigh(matrix)
    return (vectors / (jnp.maximum(values, 0) + damping)) @ vectors.T
  raise ValueError(f"Unknown inverse method {method!r}; expected one of {INVERSE_METHODS}.")


# Blocks up to this size are inverted by a triangular solve, larger ones split in two.
_TRIANGULAR_LEAF = 64


def lower_triangular_inverse(lower: Array) -> Array:
  """`L^-1` of a lower-triangular `L`, by halves: `[[A, 0], [B, C]]^-1 =
  [[A^-1, 0], [-C^-1 B A^-1, C^-1]]`.

  The work is then matrix products, which XLA runs near peak on every backend; a
  triangular solve against the identity (what `cho_solve` does) ran at a fraction of it
  on CPU: a 785 x 785 damped inverse took 26 ms that way and 13 ms this way.
  """
  n = lower.shape[-1]
  if n <= _TRIANGULAR_LEAF:
    return jax.scipy.linalg.solve_triangular(lower, jnp.eye(n, dtype=lower.dtype), lower=True)
  half = n // 2
  top, bottom = lower_triangular_inverse(lower[:half, :half]), lower_triangular_inverse(
      lower[half:, half:])
  corner = -bottom @ lower[half:, :half] @ top
  return jnp.block([[top, jnp.zeros((half, n - half), lower.dtype)], [corner, bottom]])


def pi_correction(a: Array, g: Array) -> Array:
  """`pi = sqrt((tr A / dim A) / (tr G / dim G))`, Martens & Grosse (2015) §6.3.

  Splits the damping between the factors in proportion to their scales; falls back
  to 1 where a factor is zero (a layer that received no gradient). A 1-D factor is a
  diagonal matrix given by its diagonal.
  """
  mean_a = _mean_diagonal(a)
  mean_g = _mean_diagonal(g)
  pi = jnp.sqrt(mean_a / mean_g)
  return jnp.where(jnp.isfinite(pi) & (pi > 0), pi, jnp.ones_like(pi))


def _mean_diagonal(x: Array) -> Array:
  return (jnp.sum(x) if x.ndim == 1 else jnp.trace(x)) / x.shape[0]


def finite_or_previous(new: Array, old: Array) -> Array:
  """`new` if every entry is finite, else `old`: no NaN ever reaches the parameters."""
  return jnp.where(jnp.all(jnp.isfinite(new)), new, old)
