"""Skipping a batch: a step whose gradients or statistics are not finite changes nothing.

The preconditioner counts such steps (`PreconditionState.skipped_steps`); the optimizers
around it return zero updates and keep their own state as it was.
"""

from __future__ import annotations

import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

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


def _is_power_of_ten(count: Array, first: int) -> Array:
  powers = jnp.asarray([10 ** k for k in range(10) if 10 ** k >= first], count.dtype)
  return jnp.any(count == powers)


def warn_rarely(happened: Array, total: Array, message: str, first: int = 1) -> Array:
  """`total`, with a `RuntimeWarning` (`message` formatted with `count=total`) raised from
  inside the compiled step when `happened` and `total` is a power of ten from `first` on
  (1, 10, 100, ... by default: a run that keeps failing says so, and rarely). Store the
  result: the warning rides on it.

  The warning is a `jax.pure_callback` that gives `total` back, not a
  `jax.debug.callback`: an effect in the program turns off `jax.jit`'s C++ dispatch,
  which cost 1.4-1.8 ms a step (0.6-0.7x an Adam step) on a 784-512-256-10 MLP at batch
  128. A pure callback whose result is used is kept; it checks the condition again
  itself, so a `vmap`, which turns the `lax.cond` into a select, warns only where it
  should.
  """
  def warn(fire, count):
    if np.any(fire):
      warnings.warn(message.format(count=int(np.max(count))), RuntimeWarning, stacklevel=1)
    return np.asarray(count)

  fire = happened & _is_power_of_ten(total, first)
  return jax.lax.cond(
      fire, lambda: jax.pure_callback(warn, jax.ShapeDtypeStruct(total.shape, total.dtype),
                                      fire, total, vmap_method="sequential"),
      lambda: total)


SKIPPING_MESSAGE = (
    "jkfac skipped {count} steps so far because their gradients or curvature statistics "
    "were not finite: the parameters do not change on such steps. If every step is skipped, "
    "the parameters or the loss have become non-finite: lower the learning rate, raise the "
    "damping (it scales with the loss: a loss summed over outputs needs it that many times "
    "larger), or use jkfac.kfac's adaptive default, which rejects steps that raise the loss.")


def warn_if_skipping(skipped: Array, skipped_steps: Array) -> Array:
  """`warn_rarely` for steps skipped as not finite: `skipped_steps`, to store."""
  return warn_rarely(skipped, skipped_steps, SKIPPING_MESSAGE)
