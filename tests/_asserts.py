"""Shared assertions on pytrees of arrays for the jkfac tests.

Each helper first checks that the trees have the same structure, then compares leaf by
leaf and names the failing leaf by its key path (e.g. `['dense0']['kernel']`).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

PyTree = Any


def _leaves_with_paths(tree: PyTree) -> list[tuple[str, Any]]:
  return [(jax.tree_util.keystr(path), leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _paired(actual: PyTree, expected: PyTree) -> list[tuple[str, Any, Any]]:
  """The leaves of both trees side by side, after checking that their structures match."""
  actual_def = jax.tree_util.tree_structure(actual)
  expected_def = jax.tree_util.tree_structure(expected)
  assert actual_def == expected_def, f"tree structures differ:\n{actual_def}\n{expected_def}"
  return [(path, a, e) for (path, a), (_, e) in zip(_leaves_with_paths(actual),
                                                     _leaves_with_paths(expected))]


def assert_trees_close(actual: PyTree, expected: PyTree, rtol: float = 1e-5,
                       atol: float = 1e-6, check_dtype: bool = False) -> None:
  """Same structure and shapes (and dtypes, with `check_dtype`), and every leaf within
  `atol + rtol * |expected|` (compared in float64, so low-precision leaves are compared
  at their own values)."""
  for path, a, e in _paired(actual, expected):
    if check_dtype:
      assert np.asarray(a).dtype == np.asarray(e).dtype, f"{path}: dtype differs"
    a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
    assert a.shape == e.shape, f"{path}: shape {a.shape} != {e.shape}"
    np.testing.assert_allclose(a, e, rtol=rtol, atol=atol, err_msg=path)


def assert_trees_equal(actual: PyTree, expected: PyTree) -> None:
  """Same structure, dtypes, shapes and bits in every leaf (NaN equals NaN)."""
  for path, a, e in _paired(actual, expected):
    a, e = np.asarray(a), np.asarray(e)
    assert a.dtype == e.dtype, f"{path}: dtype {a.dtype} != {e.dtype}"
    assert a.shape == e.shape, f"{path}: shape {a.shape} != {e.shape}"
    assert a.tobytes() == e.tobytes(), f"{path}: values differ\n{a}\n{e}"


def assert_all_finite(tree: PyTree) -> None:
  """Every floating leaf of `tree` is finite (integer leaves and PRNG keys pass)."""
  leaves = _leaves_with_paths(tree)
  assert leaves, "empty tree"
  for path, leaf in leaves:
    x = np.asarray(leaf)
    if np.issubdtype(x.dtype, np.inexact) or x.dtype.name == "bfloat16":
      x = x.astype(np.float64)
      assert np.all(np.isfinite(x)), f"{path}: not finite\n{x}"


def assert_dtypes(tree: PyTree, dtype) -> None:
  """Every floating leaf of `tree` has `dtype`."""
  for path, leaf in _leaves_with_paths(tree):
    x = np.asarray(leaf)
    if np.issubdtype(x.dtype, np.inexact) or x.dtype.name == "bfloat16":
      assert x.dtype == np.dtype(dtype), f"{path}: dtype {x.dtype}, expected {dtype}"
