"""The examples a statistics step reads: at most `max_statistics_examples` of the batch's.

A statistics step evaluates the network again with sampled targets (the plain path,
without `jkfac.value_and_grad`); at large batches that pass is a large part of the step,
while the factors, averages over rows kept in EMAs, need far fewer rows. The batch's
examples lie along the leading axis of its leaves: the batch size is the leading size
most leaves share (ties: the larger), and every leaf of that leading size is cut to the
same rows, drawn without replacement. A cut is used only where every layer's inputs and
outputs (every use) and every registered loss's predictions shrink by the same factor on
the traced shapes. A leaf that is as long as the batch but not indexed by example (a
table) would be cut as well: such batches need `max_statistics_examples=None`.
"""

from __future__ import annotations

import collections
import math
import warnings
from typing import Any, Callable

import jax
import numpy as np

from jkfac import jaxprs, layer_table, tags
from jkfac.sampling import random_subset

Array = jax.Array
PyTree = Any

# "auto": four times a batch of 128, where `jkfac.kfac`'s defaults were chosen.
AUTO_EXAMPLES = 512


def batch_size(batch: PyTree) -> int | None:
  """The leading size most of the batch's leaves (of one or more axes) share; ties go to
  the larger size. None for a batch without such leaves."""
  sizes = collections.Counter(np.shape(x)[0] for x in jax.tree_util.tree_leaves(batch)
                              if np.ndim(x) >= 1)
  if not sizes:
    return None
  return max(sizes, key=lambda size: (sizes[size], size))


def cut(batch: PyTree, max_examples: int, key: Array) -> PyTree:
  """`batch` with `max_examples` of its examples, drawn by `key` without replacement (the
  same rows in every leaf of the batch's leading size); the batch itself when it has no
  more than `max_examples`."""
  size = batch_size(batch)
  if size is None or size <= max_examples:
    return batch
  rows = random_subset(key, size, max_examples)
  return jax.tree_util.tree_map(
      lambda x: x[rows] if np.ndim(x) >= 1 and np.shape(x)[0] == size else x, batch)


def _tagged_shapes(loss_fn: Callable[..., Any], params: PyTree, batch: PyTree,
                   auto_register: bool) -> list[tuple[str, tuple[int, ...]]]:
  """`(what, shape)` of every use of a layer (its output and input) and of every
  registered loss's prediction in `loss_fn`, in evaluation order."""
  closed, _ = layer_table.make_jaxpr(loss_fn, params, batch, auto_register)
  paths, _ = jax.tree_util.tree_flatten_with_path(params)
  paths = [layer_table.path_str(path) for path, _ in paths]
  found = []
  for site in jaxprs.find_tags(closed.jaxpr, jaxprs.leaf_origin(closed, len(paths))):
    if site.is_layer:
      owner = site.origin[2]
      name = f"layer {paths[owner[0]]!r}" if owner else "a layer"
      found += [(f"the outputs of {name}", site.eqn.invars[0].aval.shape),
                (f"the inputs of {name}", site.eqn.invars[1].aval.shape)]
    elif site.eqn.primitive is tags.loss_tag_p:
      found.append(("a registered loss's predictions", site.eqn.invars[0].aval.shape))
  return found


def why_not_cut(loss_fn: Callable[..., Any], params: PyTree, batch: PyTree,
                max_examples: int, auto_register: bool) -> str | None:
  """Why `cut(batch, max_examples)` would not be a batch of fewer examples for `loss_fn`:
  a layer's inputs or outputs (any use) or a loss's predictions that do not shrink by
  `max_examples / batch size`, or a loss that fails on it; None if it is one. Traces
  `loss_fn` at the cut's shapes."""
  size = batch_size(batch)
  small = jax.eval_shape(lambda b: cut(b, max_examples, jax.random.PRNGKey(0)), batch)
  whole = _tagged_shapes(loss_fn, params, batch, auto_register)
  try:
    part = _tagged_shapes(loss_fn, params, small, auto_register)
  except Exception as error:  # pylint: disable=broad-except
    return f"loss_fn fails on {max_examples} of the batch's {size} examples ({error})"
  if len(whole) != len(part):
    return f"loss_fn holds other tags on {max_examples} of the batch's {size} examples"
  for (what, shape), (_, shrunk) in zip(whole, part):
    if math.prod(shape) * max_examples != math.prod(shrunk) * size:
      return (f"{what}, {tuple(shape)}, would become {tuple(shrunk)}, not "
              f"{max_examples}/{size} of them")
  return None


def for_statistics(loss_fn: Callable[..., Any], params: PyTree, batch: PyTree,
                   max_examples: int | None, key: Array, auto_register: bool
                   ) -> tuple[PyTree, Array]:
  """`(batch, key)`: the batch a statistics step reads, `cut` by part of `key` where
  `why_not_cut` finds no reason against it (else a `UserWarning` says the reason, and the
  whole batch is read), and the key left for the step's other draws (`key` itself when
  nothing is cut)."""
  if max_examples is None or (batch_size(batch) or 0) <= max_examples:
    return batch, key
  reason = why_not_cut(loss_fn, params, batch, max_examples, auto_register)
  if reason is not None:
    warnings.warn(f"jkfac computes the statistics from every example of the batch, not "
                  f"from max_statistics_examples={max_examples} of them: {reason}. Pass "
                  f"max_statistics_examples=None to silence this.", stacklevel=2)
    return batch, key
  key, rows_key = jax.random.split(key)
  return cut(batch, max_examples, rows_key), key
