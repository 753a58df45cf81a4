"""Eigenvalue-corrected K-FAC (EKFAC, George et al. 2018): F = Q diag(s) Q^T, Q = Q_A ⊗ Q_G.

Q_A and Q_G are the eigenbases of K-FAC's factors A and G, refreshed at inverse updates.
The scaling `s` is the second moment of the per-example gradients in that basis,
re-estimated at every statistics step, so a stale basis costs less than a stale K-FAC
inverse. At an inverse update `s` restarts from the products of the factors'
eigenvalues: right then EKFAC is K-FAC with Tikhonov damping, `(A ⊗ G + λI)^-1`.
"""

from __future__ import annotations

import jax.numpy as jnp

from jkfac import linalg
from jkfac.blocks import diagonal, kron
from jkfac.blocks.base import Arrays, Array, Block, rows
from jkfac.layers import LayerInputs


def zeros(d_in: int, d_out: int) -> Arrays:
  return {**kron.zeros(d_in, d_out), "scaling": jnp.zeros((d_in, d_out))}


def statistics(a: LayerInputs | Array, g: Array, basis: Arrays) -> Arrays:
  """K-FAC's factors, and the per-example gradients' second moment in `basis` (the
  layer's current inverses): `sum_{k,n} (Q_A^T dW_kn Q_G)^2`."""
  projected = diagonal.statistics(rows(a) @ basis["QA"], g @ basis["QG"])["diagonal"]
  return {**kron.statistics(a, g), "scaling": projected}


def factors(covariances: Arrays, damping: Array) -> dict[str, tuple[Array, Array]]:
  return {}  # inverted jointly: see `invert`


def invert(covariances: Arrays, damping: Array, method: str = "eigh") -> Arrays:
  """A new basis from the factors' eigenvectors, with their eigenvalue products as the
  scaling (`method` is unused: this is always an eigendecomposition)."""
  del method
  values_a, basis_a = linalg.eigh(covariances["A"])
  values_g, basis_g = linalg.eigh(covariances["G"])
  scaling = jnp.outer(jnp.maximum(values_a, 0), jnp.maximum(values_g, 0))
  return {"QA": basis_a, "QG": basis_g, "scaling": scaling,
          "damping": jnp.asarray(damping, scaling.dtype)}


def refresh(inverses: Arrays, covariances: Arrays) -> Arrays:
  """The inverses after a statistics step: the same basis, the new scaling."""
  return {**inverses, "scaling": covariances["scaling"]}


def rebase(statistics: Arrays, inverses: Arrays, ema_weight: Array) -> Arrays:
  """The raw EMAs after an inverse update: the scaling restarts from `inverses`'s,
  measured in the new basis (the old one's EMA would mix two bases)."""
  return {**statistics, "scaling": inverses["scaling"] * ema_weight}


def precondition(inverses: Arrays, gradient: Array) -> Array:
  basis_a, basis_g = inverses["QA"], inverses["QG"]
  projected = basis_a.T @ gradient @ basis_g
  return basis_a @ (projected / (inverses["scaling"] + inverses["damping"])) @ basis_g.T


BLOCK = Block(zeros, statistics, factors, precondition, joint=invert, refresh=refresh,
              rebase=rebase)
