"""Uniform random subsets of rows, drawn inside the compiled step."""

from __future__ import annotations

import jax

Array = jax.Array


def random_subset(key: Array, total: int, count: int) -> Array:
  """`count` distinct indices in `[0, total)`, a uniform subset in random order.

  The indices of the `count` largest of `total` uniform keys: the same distribution as
  `jax.random.choice(key, total, (count,), replace=False)`, which sorts a permutation of
  all `total` (38 ms for 100,352 rows on a 2-core CPU, against 0.4 ms for this).
  """
  return jax.lax.top_k(jax.random.uniform(key, (total,)), count)[1]
