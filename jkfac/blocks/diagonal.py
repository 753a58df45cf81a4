"""Diagonal block: F = diag(E[dW ⊙ dW]) of the per-example parameter gradients."""

from __future__ import annotations

import jax.numpy as jnp

from jkfac.blocks.base import Arrays, Array, Block, per_example_gradients, rows
from jkfac.layers import LayerInputs


def zeros(d_in: int, d_out: int) -> Arrays:
  return {"diagonal": jnp.zeros((d_in, d_out))}


def statistics(a: LayerInputs | Array, g: Array) -> Arrays:
  a = rows(a)
  if a.shape[1] == 1:  # one position: (a g^T)^2 = a^2 g^2^T, no per-example product.
    return {"diagonal": jnp.einsum("na,kng->ag", a[:, 0] ** 2, g[:, :, 0] ** 2)}
  return {"diagonal": jnp.sum(per_example_gradients(a, g) ** 2, axis=(0, 1))}


def generic_statistics(param_grads: Array) -> Arrays:
  """The diagonal block of a parameter that no layer covers, from its gradients.

  `param_grads` `(columns, *shape)` are gradients of the cotangent-weighted loss; their
  squares estimate the diagonal Fisher without bias for sampled targets ("fisher"),
  since the cross terms between examples vanish in expectation.
  """
  g = param_grads.reshape(param_grads.shape[0], -1, 1)
  return {"diagonal": jnp.sum(g ** 2, axis=0)}


def factors(covariances: Arrays, damping: Array) -> dict[str, tuple[Array, Array]]:
  return {"diagonal": (covariances["diagonal"], damping)}


def precondition(inverses: Arrays, gradient: Array) -> Array:
  return inverses["diagonal"] * gradient


BLOCK = Block(zeros, statistics, factors, precondition, entrywise=True)
