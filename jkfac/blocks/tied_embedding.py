"""Block of a tied embedding table: F = D1 ⊗ G1 + D2 ⊗ A2, never vocab x vocab.

A `(vocab, d)` table used as a lookup and as the output projection (`logits = x @ W.T`)
has per-example gradient `dW = sum_t e_{id_t} g1_t^T + sum_s g2_s x_s^T`. Each use is
a Kronecker product whose vocab-side factor is kept diagonal:

- the lookups: `D1 = diag(counts)` of the id frequencies and `G1 = sum g1 g1^T`, as the
  embedding block's A and G (`jkfac/blocks/embedding.py`);
- the projections: `D2 = diag(sum g2 g2^T)` of the logits' cotangents and
  `A2 = E[x x^T]` of their inputs, as kron's G and A.

Rows of W are then independent, with the `d x d` block `D1[v] G1 + D2[v] A2`. The damping
goes into the second term by factored Tikhonov (`D2' = D2 + pi sqrt(damping)`,
`A2' = A2 + sqrt(damping) / pi I`), and the sum is inverted exactly with the generalized
eigendecomposition of `(G1, A2')`: `Q = A2'^{-1/2} U` with `U diag(s) U^T =
A2'^{-1/2} G1 A2'^{-1/2}`, so `Q^T A2' Q = I`, `Q^T G1 Q = diag(s)`, and row v of the
preconditioned gradient is `m_v Q diag(1 / (D1[v] s + D2'[v])) Q^T`. The four factors
are inverted together (`Block.joint`), as one task.
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
  values, vectors = jnp.linalg.eigh(a2)
  values = jnp.maximum(values, 0) + root / pi
  a2_inv_sqrt = (vectors * values ** -0.5) @ vectors.T
  s, u = jnp.linalg.eigh(a2_inv_sqrt @ g1 @ a2_inv_sqrt)
  return {"Q": a2_inv_sqrt @ u, "s": jnp.maximum(s, 0), "D1": d1, "D2": d2 + pi * root}


def precondition(inverses: Arrays, gradient: Array) -> Array:
  q = inverses["Q"]
  scale = inverses["D1"][:, None] * inverses["s"][None, :] + inverses["D2"][:, None]
  return ((gradient @ q) / scale) @ q.T


BLOCK = Block(zeros, statistics, factors, precondition, joint=invert)
