"""Block of a tied embedding table: F = D1 ⊗ G1 + D2 ⊗ A2, never vocab x vocab.

A `(vocab, d)` table used as a lookup (`D1` id counts, `G1` the lookups' output
factor) and as the output projection `x @ W.T` (`D2` the diagonal of the logits'
cotangent covariance, `A2` the projections' input factor). Rows of W are independent,
with the `d x d` block `D1[v] G1 + D2[v] A2`, inverted exactly for all rows at once
through the generalized eigendecomposition of `(G1, A2')` (`Block.joint`); the
derivation is in docs/architecture.md.
"""

from __future__ import annotations

import jax.numpy as jnp

from jkfac import linalg
from jkfac.blocks.base import Arrays, Array, Block


def zeros(vocab: int, d: int) -> Arrays:
  return {"D1": jnp.zeros((vocab,)), "G1": jnp.zeros((d, d)), "D2": jnp.zeros((vocab,)),
          "A2": jnp.zeros((d, d))}


def statistics(inputs: tuple[Array, Array], grads: tuple[Array, Array]) -> Arrays:
  """From `layers.tied_inputs`: `(counts, x)` and `(g1, g2)` as rows."""
  (counts, x), (g1, g2) = inputs, grads
  return {"D1": counts, "G1": g1.T @ g1, "D2": jnp.sum(g2 ** 2, axis=0),
          "A2": x.T @ x / x.shape[0]}


def factors(covariances: Arrays, damping: Array) -> dict[str, tuple[Array, Array]]:
  del covariances, damping
  return {}  # inverted jointly: see `invert`


def invert(covariances: Arrays, damping: Array, method: str = "eigh") -> Arrays:
  """`Q`, `s`, `D1` and the damped `D2'` of the damped block (see the module docstring).

  Eigendecompositions whatever `method`: the generalized eigenproblem needs them.
  """
  del method
  d1, g1, d2, a2 = (covariances[k] for k in ("D1", "G1", "D2", "A2"))
  pi = linalg.pi_correction(d2, a2)
  root = jnp.sqrt(damping)
  values, vectors = linalg.eigh(a2)
  values = jnp.maximum(values, 0) + root / pi
  a2_inv_sqrt = (vectors * values ** -0.5) @ vectors.T
  s, u = linalg.eigh(a2_inv_sqrt @ g1 @ a2_inv_sqrt)
  return {"Q": a2_inv_sqrt @ u, "s": jnp.maximum(s, 0), "D1": d1, "D2": d2 + pi * root}


def precondition(inverses: Arrays, gradient: Array) -> Array:
  q = inverses["Q"]
  scale = inverses["D1"][:, None] * inverses["s"][None, :] + inverses["D2"][:, None]
  return ((gradient @ q) / scale) @ q.T


BLOCK = Block(zeros, statistics, factors, precondition, joint=invert)
