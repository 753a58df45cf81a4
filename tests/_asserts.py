"""Assertions on pytrees, shared by the test files."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def assert_trees_close(actual: Any, expected: Any, rtol: float = 1e-5, atol: float = 1e-6,
                       check_dtype: bool = False) -> None:
  """Same tree structure, and every leaf close (and of the same dtype, if asked)."""
  assert jax.tree_util.tree_structure(actual) == jax.tree_util.tree_structure(expected)
  for x, y in zip(jax.tree_util.tree_leaves(actual), jax.tree_util.tree_leaves(expected)):
    if check_dtype:
      assert x.dtype == y.dtype, (x.dtype, y.dtype)
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def assert_trees_equal(actual: Any, expected: Any) -> None:
  """Same tree structure and bit-identical leaves."""
  assert jax.tree_util.tree_structure(actual) == jax.tree_util.tree_structure(expected)
  for x, y in zip(jax.tree_util.tree_leaves(actual), jax.tree_util.tree_leaves(expected)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def assert_all_finite(tree: Any) -> None:
  """Every leaf of `tree` is finite."""
  for x in jax.tree_util.tree_leaves(tree):
    assert np.isfinite(np.asarray(x, dtype=np.float64)).all()
