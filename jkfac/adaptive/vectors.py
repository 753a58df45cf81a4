"""Parameter-shaped vectors: inner products, linear combinations, weight decay."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from jkfac import layer_table

Array = jax.Array
PyTree = Any


def dot(a: PyTree, b: PyTree, mask: Sequence[bool] | None = None) -> Array:
  """`Σ aᵢ·bᵢ` over the leaves (only those `mask` keeps), in float32 or wider."""
  leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  mask = (True,) * len(leaves_a) if mask is None else mask
  terms = [jnp.vdot(x, y).astype(jnp.promote_types(x.dtype, jnp.float32)).real
           for x, y, keep in zip(leaves_a, leaves_b, mask) if keep]
  return sum(terms, jnp.zeros([], jnp.float32))


def scaled_sum(terms: Sequence[tuple[Array, PyTree]]) -> PyTree:
  """`Σ cᵢ vᵢ` of pytrees, in the leaves' dtypes."""
  def combine(*leaves):
    return sum(c.astype(x.dtype) * x for (c, _), x in zip(terms, leaves))
  return jax.tree_util.tree_map(combine, *[v for _, v in terms])


def l2_mask(params: PyTree, exclude: Sequence[str] | str | Callable[[str], bool] | None
            ) -> tuple[bool, ...]:
  """Per leaf of `params`, whether `l2_reg` applies: not when its path ("a/b/c") matches
  a glob pattern of `exclude` (or `exclude(path)` is true)."""
  paths = [layer_table.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  if exclude is None:
    return (True,) * len(paths)
  if callable(exclude):
    return tuple(not exclude(path) for path in paths)
  patterns = (exclude,) if isinstance(exclude, str) else tuple(exclude)
  return tuple(not any(layer_table.pattern_matches(p, path) for p in patterns)
               for path in paths)


def add_l2(grads: PyTree, params: PyTree, l2: Array, mask: Sequence[bool]) -> PyTree:
  """`grads + l2 · params` on the leaves `mask` keeps."""
  leaves, treedef = jax.tree_util.tree_flatten(grads)
  new = [g + (l2 * p).astype(g.dtype) if keep else g
         for g, p, keep in zip(leaves, jax.tree_util.tree_leaves(params), mask)]
  return jax.tree_util.tree_unflatten(treedef, new)



def graft_norms(direction: PyTree, lengths: PyTree) -> PyTree:
  """Each leaf of `direction` rescaled to the norm of the same leaf of `lengths`
  (Shampoo's grafting: the step length of one optimizer, the direction of another); a
  zero leaf of `direction` takes `lengths`' leaf."""
  def graft(d, u):
    d_norm = jnp.linalg.norm(d.astype(jnp.float32))
    u_norm = jnp.linalg.norm(u.astype(jnp.float32))
    scaled = d * (u_norm / jnp.where(d_norm > 0, d_norm, 1.0)).astype(d.dtype)
    return jnp.where(d_norm > 0, scaled, u)
  return jax.tree_util.tree_map(graft, direction, lengths)
