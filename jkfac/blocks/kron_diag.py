"""Kronecker blocks with one diagonal factor: cheaper where one side is wide.

"kron_in_diag" keeps only the diagonal of A (`(d_in,)`), "kron_out_diag" only the
diagonal of G (`(d_out,)`); the other factor is as in `kron`. A 1-D factor is
inverted entrywise (see `Block.invert`), with kron's factored damping.
"""

from __future__ import annotations

import jax.numpy as jnp

from jkfac import layers
from jkfac.blocks import kron
from jkfac.blocks.base import Arrays, Array, Block, covariance
from jkfac.layers import LayerInputs


def _flat(x: Array) -> Array:
  return x.reshape(-1, x.shape[-1])


def zeros_in_diag(d_in: int, d_out: int) -> Arrays:
  return {"A": jnp.zeros((d_in,)), "G": jnp.zeros((d_out, d_out))}


def statistics_in_diag(a: LayerInputs | Array, g: Array) -> Arrays:
  g = _flat(g)
  return {"A": layers.covariance_diagonal(a), "G": g.T @ g}


def precondition_in_diag(inverses: Arrays, gradient: Array) -> Array:
  return inverses["A"][:, None] * gradient @ inverses["G"]


def zeros_out_diag(d_in: int, d_out: int) -> Arrays:
  return {"A": jnp.zeros((d_in, d_in)), "G": jnp.zeros((d_out,))}


def statistics_out_diag(a: LayerInputs | Array, g: Array) -> Arrays:
  return {"A": covariance(a), "G": jnp.sum(_flat(g) ** 2, axis=0)}


def precondition_out_diag(inverses: Arrays, gradient: Array) -> Array:
  return inverses["A"] @ gradient * inverses["G"][None, :]


IN_DIAG = Block(zeros_in_diag, statistics_in_diag, kron.factors, precondition_in_diag,
                separate_input_factor=True)
OUT_DIAG = Block(zeros_out_diag, statistics_out_diag, kron.factors, precondition_out_diag,
                 separate_input_factor=True)
