"""Kronecker-factored block (K-FAC): F = A ⊗ G.

A = E[a a^T] is the mean over examples and positions of the input outer products;
G = sum of g g^T over columns, examples and positions of the backpropagated
cotangents, which carry the 1/batch scale (see `jkfac/losses.py`).
"""

from __future__ import annotations

import jax.numpy as jnp

from jkfac import linalg
from jkfac.blocks.base import Arrays, Array, Block, covariance
from jkfac.layers import LayerInputs


def zeros(d_in: int, d_out: int) -> Arrays:
  return {"A": jnp.zeros((d_in, d_in)), "G": jnp.zeros((d_out, d_out))}


def statistics(a: LayerInputs | Array, g: Array) -> Arrays:
  g = g.reshape(-1, g.shape[-1])
  return {"A": covariance(a), "G": g.T @ g}


def factors(covariances: Arrays, damping: Array) -> dict[str, tuple[Array, Array]]:
  """Factored Tikhonov damping: `A + pi sqrt(damping) I` and `G + sqrt(damping)/pi I`."""
  a, g = covariances["A"], covariances["G"]
  pi = linalg.pi_correction(a, g)
  root = jnp.sqrt(damping)
  return {"A": (a, pi * root), "G": (g, root / pi)}


def precondition(inverses: Arrays, gradient: Array) -> Array:
  return inverses["A"] @ gradient @ inverses["G"]


BLOCK = Block(zeros, statistics, factors, precondition, separate_input_factor=True)
# K-FAC-reduce (Eschenhagen et al. 2023): fed with inputs averaged and output gradients
# summed over each example's positions.
REDUCE = Block(zeros, statistics, factors, precondition, reduce_positions=True)
