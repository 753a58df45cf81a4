"""Damped inverses of symmetric positive semi-definite matrices."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

INVERSE_METHODS = ("cholesky", "eigh")


def damped_inverse(matrix: Array, damping: Array, method: str = "cholesky") -> Array:
  """`(matrix + damping * I)^-1` for a symmetric PSD `matrix`.

  "cholesky" is the fastest (`M^T M` with `M = L^-1`, see `inverse_cholesky_factor`);
  "eigh" clips negative eigenvalues from round-off to zero first, so it is the more
  robust on badly conditioned factors.
  """
  eye = jnp.eye(matrix.shape[-1], dtype=matrix.dtype)
  if method == "cholesky":
    inverse_factor = inverse_cholesky_factor(matrix + damping * eye)
    return inverse_factor.T @ inverse_factor
  if method == "eigh":
    values, vectors = jnp.linalg.eigh(matrix)
    return (vectors / (jnp.maximum(values, 0) + damping)) @ vectors.T
  raise ValueError(f"Unknown inverse method {method!r}; expected one of {INVERSE_METHODS}.")


# Matrices up to this size are handled by small XLA loops, larger ones split in two.
_LEAF = 64


def inverse_cholesky_factor(matrix: Array) -> Array:
  """`L^-1` of the Cholesky factor `L` of a symmetric positive definite matrix (NaN where
  it is not), by halves: with `[[A, Bᵀ], [B, C]] = L Lᵀ`, `L^-1 = [[P, 0], [-Q B' P, Q]]`
  for `P = L_A^-1`, `B' = B Pᵀ`, `Q = L_S^-1` and `S = C - B' B'ᵀ`.

  All the work is matrix products and small loops that XLA runs itself: no LAPACK call.
  On CPU, jaxlib's Cholesky and triangular solves run in OpenBLAS, whose threads compete
  with XLA's: `benchmarks/inverse_time.py` on this project's loaded 2-core machine, in a
  default environment, 785 x 785: 59 ms that way, 20 ms this way (24 and 20 ms with
  OPENBLAS_NUM_THREADS=1, which users do not set).
  """
  n = matrix.shape[-1]
  if n <= _LEAF:
    return _leaf_triangular_inverse(_leaf_cholesky(matrix))
  half = n // 2
  top = inverse_cholesky_factor(matrix[:half, :half])
  lower_left = matrix[half:, :half] @ top.T
  bottom = inverse_cholesky_factor(matrix[half:, half:] - lower_left @ lower_left.T)
  corner = -(bottom @ lower_left) @ top
  return jnp.block([[top, jnp.zeros((half, n - half), matrix.dtype)], [corner, bottom]])


def _leaf_cholesky(matrix: Array) -> Array:
  """The Cholesky factor, column by column: `L[:, j] = (A[:, j] - L Lᵀ[:, j]) / √·`."""
  rows = jnp.arange(matrix.shape[-1])

  def column(j, lower):
    v = matrix[:, j] - lower @ lower[j]  # columns >= j of `lower` are still zero
    return lower.at[:, j].set(jnp.where(rows >= j, v / jnp.sqrt(v[j]), 0))

  return jax.lax.fori_loop(0, matrix.shape[-1], column, jnp.zeros_like(matrix))


def _leaf_triangular_inverse(lower: Array) -> Array:
  """`L^-1` row by row: `M[i] = (e_i - L[i] M) / L[i, i]` (rows >= i of M still zero)."""
  eye = jnp.eye(lower.shape[-1], dtype=lower.dtype)

  def row(i, inverse):
    return inverse.at[i].set((eye[i] - lower[i] @ inverse) / lower[i, i])

  return jax.lax.fori_loop(0, lower.shape[-1], row, jnp.zeros_like(lower))


def pi_correction(a: Array, g: Array) -> Array:
  """`pi = sqrt((tr A / dim A) / (tr G / dim G))`, Martens & Grosse (2015) §6.3.

  Splits the damping between the factors in proportion to their scales; falls back
  to 1 where a factor is zero (a layer that received no gradient).
  """
  mean_a = _mean_diagonal(a)
  mean_g = _mean_diagonal(g)
  pi = jnp.sqrt(mean_a / mean_g)
  return jnp.where(jnp.isfinite(pi) & (pi > 0), pi, jnp.ones_like(pi))


def _mean_diagonal(x: Array) -> Array:
  """The mean diagonal entry of a factor: a matrix, its diagonal (1-D) or its diagonal
  blocks (3-D, see `blocks.blocked`)."""
  return jnp.mean(x if x.ndim == 1 else jnp.diagonal(x, axis1=-2, axis2=-1))

