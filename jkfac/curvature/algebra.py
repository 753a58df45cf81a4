"""Products, inverses, determinants and samples of a fitted curvature `scale * F + λI`.

Every block is held in its eigenbasis (`FittedCurvature.eigen`): a Kronecker block
`A ⊗ G = (Q_A ⊗ Q_G) diag(s) (Q_A ⊗ Q_G)^T`, an EK-FAC block the same with its own
`s`, a full block `Q diag(s) Q^T`, a diagonal block `diag(s)`. So `f(scale * F + λI) v`
for any function `f` of the eigenvalues is one projection, an elementwise product and
one projection back: the exact matrix function of the block (no factored damping),
what a Laplace posterior and an influence function need.

Vectors are pytrees shaped like the parameters; entries of parameters the curvature
does not cover (see `fit(layers=)`) come back as zeros. The public functions are jitted
(a `FittedCurvature`'s layer table is static), so that calls outside `jit` are one program.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jkfac.layer_matrices import map_layer_matrices
from jkfac.curvature.fitting import FittedCurvature
from jkfac.layer_info import LayerInfo

Array = jax.Array
PyTree = Any
Arrays = dict[str, Array]


def spectral_map(curvature: FittedCurvature, vector: PyTree,
                 fn: Callable[[Array], Array], project: bool = True) -> PyTree:
  """`Q diag(fn(s)) Q^T v` for every block (`Q` its eigenbasis, `s` its eigenvalues); with
  `project=False`, `Q diag(fn(s)) v`: `v` is already in eigen coordinates (a sample)."""
  def one_block(layer: LayerInfo, m: Array) -> Array:
    eigen = curvature.eigen[layer.name]
    scale = fn(eigen["values"]).astype(m.dtype)
    if "Q" in eigen:  # a full block, on the flattened matrix
      flat = m.reshape(m.shape[:-2] + (-1,))
      q = eigen["Q"].astype(m.dtype)
      flat = jnp.einsum("...ij,...j->...i", q, scale * (
          jnp.einsum("...ji,...j->...i", q, flat) if project else flat))
      return flat.reshape(m.shape)
    qa, qg = eigen.get("QA"), eigen.get("QG")
    if project:
      m = m if qa is None else jnp.swapaxes(qa, -1, -2).astype(m.dtype) @ m
      m = m if qg is None else m @ qg.astype(m.dtype)
    m = scale * m
    m = m if qa is None else qa.astype(m.dtype) @ m
    return m if qg is None else m @ jnp.swapaxes(qg, -1, -2).astype(m.dtype)

  return map_layer_matrices(curvature.trace.every_layer, one_block, vector, others="zero")


@jax.jit
def restrict(curvature: FittedCurvature, vector: PyTree) -> PyTree:
  """`vector` with zeros in the entries of parameters the curvature does not cover."""
  return map_layer_matrices(curvature.trace.every_layer, lambda layer, m: m, vector,
                            others="zero")


@jax.jit
def vector_product(curvature: FittedCurvature, vector: PyTree, damping: float | Array = 0.0,
                   scale: float | Array = 1.0) -> PyTree:
  """`(scale * F + damping * I) v`."""
  return spectral_map(curvature, vector, lambda s: scale * s + damping)


@jax.jit
def inverse_vector_product(curvature: FittedCurvature, vector: PyTree,
                           damping: float | Array, scale: float | Array = 1.0) -> PyTree:
  """`(scale * F + damping * I)^-1 v`, exactly for the fitted blocks; `damping` > 0 (or
  `F` positive definite) keeps it finite."""
  return spectral_map(curvature, vector, lambda s: 1.0 / (scale * s + damping))


@jax.jit
def logdet(curvature: FittedCurvature, damping: float | Array,
           scale: float | Array = 1.0) -> Array:
  """`log det(scale * F + damping * I)` over the parameters the curvature covers."""
  return sum(jnp.sum(jnp.log(scale * e["values"] + damping))
             for e in curvature.eigen.values())


def eigenvalues(curvature: FittedCurvature) -> Array:
  """Every eigenvalue of `F`, concatenated (in no particular order)."""
  return jnp.concatenate([e["values"].reshape(-1) for e in curvature.eigen.values()])


@functools.partial(jax.jit, static_argnames="num_samples")
def sample(curvature: FittedCurvature, params: PyTree, key: Array,
           prior_precision: float | Array, num_samples: int) -> PyTree:
  """`num_samples` draws from the Laplace posterior `N(params, (N F + τ I)^-1)`, `τ` the
  prior precision and `N` the number of examples fitted; parameters the curvature does
  not cover stay at `params`. Every leaf gains a leading axis of `num_samples`."""
  n = curvature.num_examples

  def one(key: Array) -> PyTree:
    leaves, treedef = jax.tree_util.tree_flatten(params)
    noise = [jax.random.normal(k, x.shape, x.dtype)
             for k, x in zip(jax.random.split(key, len(leaves)), leaves)]
    noise = jax.tree_util.tree_unflatten(treedef, noise)
    delta = spectral_map(curvature, noise, lambda s: jax.lax.rsqrt(n * s + prior_precision),
                         project=False)
    return jax.tree_util.tree_map(jnp.add, params, delta)

  return jax.vmap(one)(jax.random.split(key, num_samples))
