"""K-FAC on part of a model, under `optax.masked` or `optax.multi_transform`.

Those wrappers hand the inner transformation the parameters and gradients with the
leaves of other labels replaced by `optax.MaskedNode`. K-FAC's statistics still need a
forward pass of the whole model, so jkfac is given the whole parameters besides
(`example_params=` at construction, `model_params=` in `update`), and keeps blocks for
the layers whose parameters are all in the masked tree; the others are ignored.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jkfac.layer_info import Trace

PyTree = Any


def _is_masked(x: Any) -> bool:
  return isinstance(x, optax.MaskedNode)


def is_masked(tree: PyTree) -> bool:
  """Whether `tree` is a masked view (holds an `optax.MaskedNode`)."""
  return any(_is_masked(x) for x in jax.tree_util.tree_leaves(tree, is_leaf=_is_masked))


def present_leaves(masked: PyTree, full: PyTree) -> tuple[bool, ...]:
  """Per leaf of `full`, whether the masked view `masked` keeps it (a mask may be a prefix
  of the tree, masking whole subtrees)."""
  flags = jax.tree_util.tree_map(
      lambda m, f: jax.tree_util.tree_map(lambda _: not _is_masked(m), f), masked, full,
      is_leaf=_is_masked)
  return tuple(jax.tree_util.tree_leaves(flags))


def unmask(masked: PyTree, full: PyTree) -> PyTree:
  """`full`'s structure with `masked`'s leaves where present and zeros elsewhere."""
  return jax.tree_util.tree_map(
      lambda m, f: jax.tree_util.tree_map(jnp.zeros_like, f) if _is_masked(m) else m,
      masked, full, is_leaf=_is_masked)


def remask(full: PyTree, masked: PyTree) -> PyTree:
  """The leaves of `full` at the places `masked` keeps, in `masked`'s structure."""
  return jax.tree_util.tree_map(lambda m, f: m if _is_masked(m) else f, masked, full,
                                is_leaf=_is_masked)


def only_present(trace: Trace, present: tuple[bool, ...]) -> Trace:
  """`trace` restricted to the layers (and generic parameters) whose leaves are present;
  raises `ValueError` for a layer that the mask splits."""
  layers = []
  for layer in trace.layers:
    kept = [present[i] for i in (layer.weight, layer.bias) if i is not None]
    if any(kept) and not all(kept):
      paths = [trace.param_paths[i] for i in (layer.weight, layer.bias) if i is not None]
      raise ValueError(f"The mask splits the K-FAC layer {layer.name!r}: give its parameters "
                       f"{paths} the same label.")
    if all(kept):
      layers.append(layer)
  generic = tuple(layer for layer in trace.generic if present[layer.weight])
  return dataclasses.replace(trace, layers=tuple(layers), generic=generic)
