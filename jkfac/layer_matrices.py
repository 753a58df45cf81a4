"""A parameter-shaped pytree seen as one matrix per layer (the blocks' view): read each
layer's matrix, map a function over it, and write the result back into the pytree."""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp

from jkfac import layers
from jkfac.layer_info import LayerInfo

Array = jax.Array
PyTree = Any


def layer_matrix(layer: LayerInfo, leaves: list[Array]) -> Array:
  """One layer's entries of the flattened pytree `leaves` as its parameter matrix; a
  stacked layer's (see `LayerInfo.stack`) with one leading axis over its stack."""
  w = leaves[layer.weight]
  b = None if layer.bias is None else leaves[layer.bias]
  if not layer.stack:
    return layers.param_matrix(layer, w, b)
  size = math.prod(layer.stack)
  w = w.reshape((size,) + w.shape[len(layer.stack):])
  b = None if b is None else b.reshape((size,) + b.shape[len(layer.stack):])
  return jax.vmap(lambda w, b: layers.param_matrix(layer, w, b))(w, b)


def place_matrix(layer: LayerInfo, matrix: Array, leaves: list[Array]) -> None:
  """Writes a layer's parameter matrix back into `leaves` (in place, in their shapes and
  dtypes)."""
  split = lambda m: layers.split_param_matrix(layer, m)
  parts = (jax.vmap(split) if layer.stack else split)(matrix)
  for index, part in zip((layer.weight, layer.bias), parts):
    if index is not None:
      leaves[index] = part.reshape(leaves[index].shape).astype(leaves[index].dtype)


def map_layer_matrices(layer_list: Iterable[LayerInfo],
                       fn: Callable[[LayerInfo, Array], Array], tree: PyTree,
                       others: str = "keep") -> PyTree:
  """`tree` with every layer's matrix `m` replaced by `fn(layer, m)`; the leaves no layer
  covers are kept (`others="keep"`) or zeroed (`others="zero"`)."""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  out = list(leaves) if others == "keep" else [jnp.zeros_like(x) for x in leaves]
  for layer in layer_list:
    place_matrix(layer, fn(layer, layer_matrix(layer, leaves)), out)
  return jax.tree_util.tree_unflatten(treedef, out)
