"""Skipping a batch: a step whose gradients or statistics are not finite changes nothing.

The preconditioner counts such steps (`PreconditionState.skipped_steps`); the optimizers
around it return zero updates and keep their own state as it was.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array
PyTree = Any


def tree_finite(tree: PyTree) -> Array:
  """Whether every floating entry of `tree` is finite."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
            if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def keep_unless(skipped: Array, new: PyTree, old: PyTree) -> PyTree:
  """`old` where `skipped`, else `new`, leaf by leaf."""
  return jax.tree_util.tree_map(lambda n, o: jnp.where(skipped, o, n), new, old)


def zero_if(skipped: Array, updates: PyTree) -> PyTree:
  """Zero updates where `skipped`."""
  return jax.tree_util.tree_map(lambda u: jnp.where(skipped, jnp.zeros_like(u), u), updates)
