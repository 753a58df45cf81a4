"""Full block: F = E[vec(dW) vec(dW)^T], exact up to the estimator; for small layers."""

from __future__ import annotations

import jax.numpy as jnp

from jkfac.blocks.base import Arrays, Array, Block, per_example_gradients
from jkfac.layers import LayerInputs


def zeros(d_in: int, d_out: int) -> Arrays:
  return {"F": jnp.zeros((d_in * d_out, d_in * d_out))}


def statistics(a: LayerInputs | Array, g: Array) -> Arrays:
  v = per_example_gradients(a, g)
  v = v.reshape(-1, v.shape[-2] * v.shape[-1])
  return {"F": v.T @ v}


def factors(covariances: Arrays, damping: Array) -> dict[str, tuple[Array, Array]]:
  return {"F": (covariances["F"], damping)}


def precondition(inverses: Arrays, gradient: Array) -> Array:
  return (inverses["F"] @ gradient.reshape(-1)).reshape(gradient.shape)


BLOCK = Block(zeros, statistics, factors, precondition)
