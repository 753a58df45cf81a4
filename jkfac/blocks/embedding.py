"""Kronecker block of an embedding table: F = diag(counts) ⊗ G.

The inputs of a `(vocab, d)` lookup are one-hot vectors, whose mean outer product is
the diagonal `A = diag(counts)` of id frequencies (`jkfac.layers.embedding_counts`):
it is kept as a `(vocab,)` vector and inverted entrywise, never as a vocab x vocab
matrix. G is as in `kron`: the sum of g g^T of the cotangents.
"""

from __future__ import annotations

import jax.numpy as jnp

from jkfac.blocks import kron
from jkfac.blocks.base import Arrays, Array, Block


def zeros(vocab: int, d: int) -> Arrays:
  return {"A": jnp.zeros((vocab,)), "G": jnp.zeros((d, d))}


def statistics(counts: Array, g: Array) -> Arrays:
  """`counts` `(vocab,)` from `embedding_counts`; `g` `(columns, batch, positions, d)`."""
  g = g.reshape(-1, g.shape[-1])
  return {"A": counts, "G": g.T @ g}


def precondition(inverses: Arrays, gradient: Array) -> Array:
  return inverses["A"][:, None] * gradient @ inverses["G"]


BLOCK = Block(zeros, statistics, kron.factors, precondition)  # kron's damping, pi from sum(A)
