"""Skipping a batch: a step whose gradients or statistics are not finite changes nothing.

The preconditioner counts such steps (`PreconditionState.skipped_steps`); the optimizers
around it return zero updates and keep their own state as it was.
"""

from __future__ import annotations

import warnings
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


def _is_power_of_ten(count: Array) -> Array:
  powers = jnp.asarray([10 ** k for k in range(10)], count.dtype)
  return jnp.any(count == powers)


def warn_rarely(happened: Array, total: Array, message: str) -> None:
  """From inside the compiled step: a `RuntimeWarning` with `message` (formatted with
  `count=total`) when `happened` and `total` is 1, 10, 100, ... (so a run that keeps
  failing says so, and rarely)."""
  def warn(count):
    warnings.warn(message.format(count=int(count)), RuntimeWarning, stacklevel=1)

  jax.lax.cond(happened & _is_power_of_ten(total),
               lambda: jax.debug.callback(warn, total), lambda: None)


SKIPPING_MESSAGE = (
    "jkfac skipped {count} steps so far because their gradients or curvature statistics "
    "were not finite: the parameters do not change on such steps. If every step is skipped, "
    "the parameters or the loss have become non-finite: lower the learning rate, raise the "
    "damping (it scales with the loss: a loss summed over outputs needs it that many times "
    "larger), or use jkfac.kfac's adaptive default, which rejects steps that raise the loss.")


def warn_if_skipping(skipped: Array, skipped_steps: Array) -> None:
  """`warn_rarely` for steps skipped as not finite."""
  warn_rarely(skipped, skipped_steps, SKIPPING_MESSAGE)
