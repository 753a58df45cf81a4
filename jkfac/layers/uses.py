"""Multi-use inputs: what a block's statistics take from every use of a layer, scan repeats
and uses as extra positions (with loss-mask row weights), and a tied embedding's inputs."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jkfac.layer_info import LayerInfo
from jkfac.layers.inputs import (
  LayerInputs,
  embedding_counts,
  layer_inputs,
  output_rows,
  total_weight,
)
from jkfac.layers.matrices import feature_groups

Array = jax.Array


def scan_axes_first(scans: tuple[str, ...], x: Array, skip: int = 0) -> Array:
  """`x` of shape `(*skip axes, *scan lengths, ...)` as `(*skip axes, S, R, ...)`: the
  axes of scans that "stack" the layer merged into S, those that "repeat" it into R."""
  axes = range(skip, skip + len(scans))
  stack = [a for a, kind in zip(axes, scans) if kind == "stack"]
  repeat = [a for a, kind in zip(axes, scans) if kind == "repeat"]
  x = jnp.transpose(x, [*range(skip), *stack, *repeat, *range(skip + len(scans), x.ndim)])
  sizes = (math.prod(x.shape[skip:skip + len(stack)]),
           math.prod(x.shape[skip + len(stack):skip + len(scans)]))
  return x.reshape(x.shape[:skip] + sizes + x.shape[skip + len(scans):])


def _repeats_to_positions(x: Array, repeats: int, axis: int) -> Array:
  """`(..., repeats * batch, positions, d)` (repeats outermost, at `axis`) as
  `(..., batch, repeats * positions, d)`."""
  x = x.reshape(x.shape[:axis] + (repeats, -1) + x.shape[axis + 1:])
  return jnp.moveaxis(x, axis, axis + 1).reshape(
      x.shape[:axis] + (x.shape[axis + 1], -1, x.shape[-1]))


def _use_rows(layer: LayerInfo, x: Array, g: Array, reduce: bool,
              sample: Array | None) -> tuple[LayerInputs | Array, Array]:
  """The inputs and output rows of one use, whose scan repeats `R` become positions.

  `x` is `(R, batch, ...)`, `g` `(columns, R, batch, ...)`. An embedding's "inputs"
  are its ids, flattened. (A grouped conv's arrays lead with the group axis.)
  """
  repeats, lead = x.shape[0], int(feature_groups(layer) > 1)
  x = x.reshape((-1,) + x.shape[2:])
  rows = output_rows(g.reshape((g.shape[0], -1) + g.shape[3:]), reduce, layer)
  rows = _repeats_to_positions(rows, repeats, axis=lead + 1)
  if layer.kind == "embedding":
    return x.ravel(), rows
  inputs = layer_inputs(layer, x, reduce, sample)
  return inputs._replace(groups=[_repeats_to_positions(group, repeats, axis=lead)
                                 for group in inputs.groups]), rows


def block_inputs(layer: LayerInfo, xs: list[Array], gs: list[Array], reduce: bool = False,
                 sample: Array | None = None, row_weights: Array | None = None
                 ) -> tuple[LayerInputs | Array, Array]:
  """What a block's `statistics` take, from every use of the layer: `(inputs, rows)`.

  `xs[u]` `(R_u, batch, ...)` and `gs[u]` `(columns, R_u, batch, ...)` are use u's
  inputs and output gradients, repeated `R_u` times by scans. Every use and repeat
  adds positions ("kron_indep": A averages over them, G sums); with `reduce`, the
  inputs are averaged and the gradients summed over all of them. An embedding's
  inputs are its id counts; a tied embedding's are `tied_inputs`. `sample` (see
  `layer_inputs`) is for a single use. `row_weights` (a loss mask; not for a conv
  layer) weigh the rows of every use and repeat, shape `(batch, ...)`: each step's input
  rows, its shape without the feature axes.
  """
  if layer.kind == "tied_embedding":
    return tied_inputs(layer, xs, gs, row_weights)
  if sample is not None and (len(xs) > 1 or xs[0].shape[0] > 1):
    raise ValueError(f"Layer {layer.name!r}: patch sampling needs a layer of one use.")
  if row_weights is not None:
    return _weighted_block_inputs(layer, xs, gs, reduce, row_weights)
  lead = int(feature_groups(layer) > 1)  # a grouped conv's group axis
  uses = [_use_rows(layer, x, g, reduce, sample) for x, g in zip(xs, gs)]
  rows = (uses[0][1] if len(uses) == 1
          else jnp.concatenate([r for _, r in uses], axis=lead + 2))
  if layer.kind == "embedding":
    return embedding_counts(layer, jnp.concatenate([ids for ids, _ in uses])), rows
  if len(uses) == 1 and (not reduce or xs[0].shape[0] == 1):
    return uses[0][0], rows
  parts = [jnp.concatenate(part, axis=lead + 1) for part in zip(*(u.groups for u, _ in uses))]
  if reduce:  # mean over every position of every use: weigh each use's means by its count
    weights = jnp.concatenate([jnp.full(x.shape[0], math.prod(g.shape[3:-1]), parts[0].dtype)
                               for x, g in zip(xs, gs)])
    parts = [jnp.einsum("r,...rd->...d", weights, part)[..., None, :] / weights.sum()
             for part in parts]
    rows = rows.sum(axis=lead + 2, keepdims=True)
  return LayerInputs(parts, uses[0][0].bias), rows


def _weighted_block_inputs(layer: LayerInfo, xs: list[Array], gs: list[Array], reduce: bool,
                           row_weights: Array) -> tuple[LayerInputs | Array, Array]:
  """`block_inputs` with `row_weights` on the input rows of every use and repeat."""
  uses = [_use_rows(layer, x, g, False, None) for x, g in zip(xs, gs)]
  rows = uses[0][1] if len(uses) == 1 else jnp.concatenate([r for _, r in uses], axis=2)
  if layer.kind == "embedding":
    weights = jnp.concatenate([_repeated(row_weights, x.shape[0]).ravel() for x in xs])
    return embedding_counts(layer, jnp.concatenate([ids for ids, _ in uses]), weights), rows
  per_example = row_weights.reshape(row_weights.shape[0], -1)   # (batch, positions)
  weights = jnp.concatenate([jnp.moveaxis(_repeated(per_example, x.shape[0]), 0, 1).reshape(
      per_example.shape[0], -1) for x in xs], axis=1)           # positions: (use, repeat, t)
  parts = [jnp.concatenate(part, axis=1) for part in zip(*(u.groups for u, _ in uses))]
  inputs = LayerInputs(parts, uses[0][0].bias, weights)
  if reduce:
    return _weighted_means(inputs), rows.sum(axis=2, keepdims=True)
  return inputs, rows


def _weighted_means(inputs: LayerInputs) -> LayerInputs:
  """Each example's weighted mean input over its positions (K-FAC-reduce with a mask): one
  position per example, weighted 1 if any of its rows is, else 0."""
  w = inputs.row_weights
  totals = w.sum(axis=1, keepdims=True)
  means = [jnp.einsum("np,npd->nd", w.astype(x.dtype), x)[:, None, :]
           / jnp.where(totals > 0, totals, 1).astype(x.dtype)[..., None] for x in inputs.groups]
  return LayerInputs(means, inputs.bias, (totals > 0).astype(w.dtype))


def _repeated(row_weights: Array, repeats: int) -> Array:
  """`row_weights` for every scan repeat of a use: `(repeats, *row_weights.shape)`."""
  return jnp.broadcast_to(row_weights, (repeats,) + row_weights.shape)


def tied_inputs(layer: LayerInfo, xs: list[Array], gs: list[Array],
                row_weights: Array | None = None
                ) -> tuple[tuple[Array, Array], tuple[Array, Array]]:
  """A tied embedding's `((counts, x), (g1, g2))` from every use (see `block_inputs`).

  `counts` `(vocab,)` are the id frequencies of the lookups (zeros without lookups),
  `x` `(rows, d)` the projections' inputs at every position, `g1` `(rows, d)` the
  lookups' and `g2` `(rows, vocab)` the projections' output gradients at every column,
  position and scan step (their factors are sums over rows, so the layout is free).
  With `row_weights`, the counts are weighted and each row of `x` is scaled by
  `sqrt(w_r * rows / sum_r w_r)`, so that the block's `x^T x / rows` is the weighted mean.
  """
  vocab, d = layer.weight_shape
  roles = layer.roles
  lookups = [(x, g) for role, x, g in zip(roles, xs, gs) if role == "embedding"]
  projections = [(x, g) for role, x, g in zip(roles, xs, gs) if role != "embedding"]
  dtype = projections[0][1].dtype
  weights = lambda uses: (None if row_weights is None else jnp.concatenate(
      [_repeated(row_weights, x.shape[0]).ravel() for x, _ in uses]))
  counts = (embedding_counts(layer, jnp.concatenate([x.ravel() for x, _ in lookups]),
                             weights(lookups)) if lookups else jnp.zeros((vocab,), dtype))
  g1 = jnp.concatenate([jnp.zeros((0, d), dtype), *(g.reshape(-1, d) for _, g in lookups)])
  x = jnp.concatenate([x.reshape(-1, d) for x, _ in projections])
  if row_weights is not None:
    w = weights(projections).astype(x.dtype)
    x = x * jnp.sqrt(w * x.shape[0] / total_weight(w))[:, None]
  g2 = jnp.concatenate([g.reshape(-1, vocab) for _, g in projections])
  return (counts, x), (g1, g2)
