"""Checks of user input shared by the optimizer's configurations."""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def check(ok: bool, message: str) -> None:
  """Raises `ValueError(message)` unless `ok`."""
  if not ok:
    raise ValueError(message)


def is_number(value: Any) -> bool:
  """A Python number (not a bool, not an array)."""
  return isinstance(value, numbers.Number) and not isinstance(value, bool)


def is_integer(value: Any) -> bool:
  """A Python integer (not a bool)."""
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def abstract(tree: PyTree) -> PyTree:
  """`tree` as `jax.ShapeDtypeStruct`s: what a static configuration may keep of arrays."""
  return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)),
                                tree)


def shape_signature(tree: PyTree) -> tuple:
  """`tree`'s structure with its leaves' shapes and dtypes: hashable, equal for trees a
  jitted function would trace the same way."""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  return treedef, tuple((jnp.shape(x), jnp.result_type(x)) for x in leaves)


def same_shapes(a: PyTree, b: PyTree) -> bool:
  """`a` and `b` have one tree structure and the same shapes and dtypes."""
  return shape_signature(a) == shape_signature(b)


def check_floating(params: PyTree) -> None:
  """Raises `ValueError` naming the first parameter leaf that is not floating point: K-FAC
  has no curvature for an integer leaf (e.g. a step counter), and its gradient is float0."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    dtype = jnp.result_type(leaf)
    if not jnp.issubdtype(dtype, jnp.inexact):
      raise ValueError(
          f"jkfac optimizes floating-point parameters, but {jax.tree_util.keystr(path)} is "
          f"{dtype}. Keep counters and other integer state out of the parameters (e.g. in "
          "another Flax collection), or give jkfac only the floating leaves with "
          "optax.multi_transform (see docs: K-FAC for part of a model).")
