"""Damped inverses and eigendecompositions of symmetric positive semi-definite matrices."""

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
    values, vectors = eigh(matrix)
    return (vectors / (jnp.maximum(values, 0) + damping)) @ vectors.T
  raise ValueError(f"Unknown inverse method {method!r}; expected one of {INVERSE_METHODS}.")


def eigh(matrices: Array) -> tuple[Array, Array]:
  """`(eigenvalues, eigenvectors)` of each symmetric matrix of `(..., d, d)`, as
  `jnp.linalg.eigh`, but one LAPACK call per matrix, also under `jax.vmap`.

  A batched eigh inside a compiled step can deadlock on XLA:CPU (jax 0.10.2, 2 cores):
  jaxlib's batched kernel waits for the thread pool that is running it. It hung a
  training step with EK-FAC or `inverse_method="eigh"` on scanned layers.
  """
  lead = matrices.shape[:-2]
  if not lead:
    return _eigh_one(matrices)
  flat = matrices.reshape(-1, *matrices.shape[-2:])
  values, vectors = jax.lax.map(_eigh_one, flat)
  return values.reshape(*lead, -1), vectors.reshape(matrices.shape)


@jax.custom_batching.custom_vmap
def _eigh_one(matrix: Array) -> tuple[Array, Array]:
  values, vectors = jnp.linalg.eigh(matrix)
  return values, vectors


@_eigh_one.def_vmap
def _eigh_one_batched(axis_size: int, in_batched: list[bool], matrix: Array
                      ) -> tuple[tuple[Array, Array], tuple[bool, bool]]:
  """Under `vmap`: a loop of single-matrix calls (`_eigh_one` again, so that an outer
  `vmap` of the loop is a loop of loops)."""
  del axis_size
  if not in_batched[0]:
    return _eigh_one(matrix), (False, False)
  return jax.lax.map(_eigh_one, matrix), (True, True)


# Matrices up to this size are handled by one XLA loop, larger ones split in two. Each
# loop compiles on its own: with leaves of 64 (two loops each) the default step of the
# MLP 784-512-256-10 compiled in 7.2 s, the seed convnet's in 8.0; with 128 (one loop)
# in 5.4 and 6.8 s, and a 785 x 785 inverse took 12 ms instead of 13.
_LEAF = 128


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
    return _leaf_inverse_factor(matrix)
  half = n // 2
  top = inverse_cholesky_factor(matrix[:half, :half])
  lower_left = matrix[half:, :half] @ top.T
  bottom = inverse_cholesky_factor(matrix[half:, half:] - lower_left @ lower_left.T)
  corner = -(bottom @ lower_left) @ top
  return jnp.block([[top, jnp.zeros((half, n - half), matrix.dtype)], [corner, bottom]])


def _leaf_inverse_factor(matrix: Array) -> Array:
  """`L^-1` in one loop over `j`: column `j` of the Cholesky factor,
  `L[:, j] = (A[:, j] - L Lᵀ[:, j]) / √·`, completes row `j` of `L`, and with it row `j`
  of the inverse, `M[j] = (e_j - L[j] M) / L[j, j]` (columns and rows >= j still zero)."""
  n = matrix.shape[-1]
  rows, eye = jnp.arange(n), jnp.eye(n, dtype=matrix.dtype)

  def step(j, carry):
    lower, inverse = carry
    v = matrix[:, j] - lower @ lower[j]
    lower = lower.at[:, j].set(jnp.where(rows >= j, v / jnp.sqrt(v[j]), 0))
    inverse = inverse.at[j].set((eye[j] - lower[j] @ inverse) / lower[j, j])
    return lower, inverse

  zeros = jnp.zeros_like(matrix)
  return jax.lax.fori_loop(0, n, step, (zeros, zeros))[1]


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

