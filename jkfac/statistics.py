"""Per-layer statistics of one batch: from loss cotangents to each block's statistics.

`layer_statistics` pulls the estimator's cotangents (see `losses.py`) back through a
`Linearization` to every layer's output, and `block_statistics` turns one layer's inputs
and output gradients into its block's statistics (e.g. `A` and `G` for "kron").
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jkfac import blocks, interpreter, layers, losses, tags
from jkfac.blocks import diagonal
from jkfac.layer_info import LayerInfo, Trace

Array = jax.Array


class LayerStatistics(NamedTuple):
  """What one layer's curvature block is built from, for one batch; per use of the layer
  (see `LayerInfo.tags`), so a layer of one use has tuples of one array.

  inputs:       the input `x` of each use as tagged, `(*scan lengths, batch, ...)`;
                empty for a generic parameter.
  output_grads: backpropagated loss cotangents at each use's output, with a leading
                axis of estimator columns: `(columns, *scan lengths, *output_shape)`;
                for a generic parameter, one array at the parameter itself:
                `(columns, *param_shape)`.
  row_weights:  the mask of the input rows (see `input_masks`), or None.
  """
  inputs: tuple[Array, ...]
  output_grads: tuple[Array, ...]
  row_weights: Array | None = None


def layer_statistics(trace: Trace, curvature: interpreter.Linearization, key: Array,
                     estimation: str) -> dict[str, LayerStatistics]:
  """Per-layer inputs and output gradients of the estimated Fisher, and the masks of the
  input rows (`input_masks`)."""
  num_tags = trace.num_tags
  if len(curvature.inputs) != num_tags:
    raise ValueError(f"The curvature has {len(curvature.inputs)} layer tags but the transform "
                     f"traced {num_tags}: use the same auto_register setting in "
                     "jkfac.value_and_grad and the transform.")
  cotangents = _cotangents(trace, curvature, key, estimation,
                           example_signs=bool(trace.generic) and estimation != "fisher")
  param_grads, output_grads = _pull_back(curvature, cotangents)
  input_weights = input_masks(trace, curvature)
  found = {layer.name: LayerStatistics(tuple(curvature.inputs[i] for i in layer.tags),
                                       tuple(output_grads[i] for i in layer.tags),
                                       input_weights.get(layer.name))
           for layer in trace.layers}
  found.update({layer.name: LayerStatistics((), (param_grads[layer.weight],))
                for layer in trace.generic})
  return found


def exact_generic_statistics(trace: Trace, curvature: interpreter.Linearization, key: Array,
                             estimation: str) -> dict[str, dict[str, Array]]:
  """Per generic parameter (`trace.generic`), its diagonal block from the squares of its
  per-example gradients: one backward pass per example, where `layer_statistics`
  squares one gradient of randomly signed examples (unbiased, not exact). For
  `jkfac.curvature.fit`, which averages exactly; the same targets as `layer_statistics`
  draws with `key`. Losses of different row counts are different examples."""
  if not trace.generic:
    return {}
  cotangents = _cotangents(trace, curvature, key, estimation, example_signs=False)
  total = None
  for rows in sorted({c.shape[1] for c in cotangents}):
    def one_example(index, rows=rows):
      def keep(c):
        if c.shape[1] != rows:
          return jnp.zeros_like(c)
        return c * (jnp.arange(rows) == index).astype(c.dtype).reshape(
            (1, rows) + (1,) * (c.ndim - 2))
      param_grads, _ = _pull_back(curvature, [keep(c) for c in cotangents])
      return [diagonal.generic_statistics(param_grads[layer.weight])["diagonal"]
              for layer in trace.generic]
    found = [jnp.sum(x, axis=0) for x in jax.lax.map(one_example, jnp.arange(rows))]
    total = found if total is None else [a + b for a, b in zip(total, found)]
  return {layer.name: {"diagonal": x} for layer, x in zip(trace.generic, total)}


def _cotangents(trace: Trace, curvature: interpreter.Linearization, key: Array,
                estimation: str, example_signs: bool) -> list[Array]:
  """Each registered loss's estimator cotangents `(columns, *prediction shape)`, on a
  shared column axis; with `example_signs`, each example's times a random sign."""
  sign_key, *keys = jax.random.split(key, len(curvature.predictions) + 1)
  masks, row_weights = _per_loss(curvature.masks, trace), _per_loss(curvature.row_weights, trace)
  cotangents = [losses.cotangents(info.kind, p, t, losses.row_scales(p, info.weight, m, w),
                                  estimation, k)
                for info, p, t, m, w, k in zip(trace.losses, curvature.predictions,
                                               curvature.targets, masks, row_weights, keys)]
  if example_signs:
    cotangents = _random_example_signs(cotangents, sign_key)
  if len(cotangents) > 1 and any(c.shape[0] > 1 for c in cotangents):
    # Deterministic columns of several losses would cross: give each its own columns.
    # (Single sampled or empirical columns may share: their sum is the right gradient.)
    cotangents = _pad_columns(cotangents)
  return cotangents


def _pull_back(curvature: interpreter.Linearization, cotangents: list[Array]
               ) -> tuple[list[Array], list[Array]]:
  """`(parameter gradients, layer output gradients)` of every column, as leaves with a
  leading column axis."""
  if cotangents[0].shape[0] == 1:  # one column: a single backward pass, no vmap.
    param_grads, output_grads = jax.tree_util.tree_map(
        lambda g: g[None], curvature.pullback([c[0] for c in cotangents]))
  else:
    param_grads, output_grads = jax.vmap(curvature.pullback)(cotangents)
  return jax.tree_util.tree_leaves(param_grads), output_grads


def astype(found: dict[str, LayerStatistics], dtype) -> dict[str, LayerStatistics]:
  """`found` with its floating arrays in `dtype` (the state's), so that the statistics of
  low-precision layers accumulate in float32; integer ids stay as they are."""
  def cast(x: Array) -> Array:
    return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
  return jax.tree_util.tree_map(cast, found)


def block_statistics(layer: LayerInfo, statistics: LayerStatistics,
                     sub_sample_patches: float | str | None = None, key: Array | None = None,
                     inverses: dict[str, Array] | None = None):
  """The block statistics of one layer for one batch, from every use of the layer; see
  `jkfac.precondition` for `sub_sample_patches` (`key` draws the patch rows). A block
  that measures in the basis of its inverses (EKFAC) needs the layer's `inverses`."""
  if layer.kind == "generic":
    return diagonal.generic_statistics(statistics.output_grads[0])
  layer_block = blocks.for_slice(layer)
  sample = None
  if (sub_sample_patches is not None and layer.kind in tags.CONV_KINDS
      and layer_block.separate_input_factor and not layer.multi_use):
    sample = layers.sample_rows(layer, sub_sample_patches, key)
  xs = [layers.scan_axes_first(scans, x) for scans, x in zip(layer.scans, statistics.inputs)]
  gs = [layers.scan_axes_first(scans, g, skip=1)
        for scans, g in zip(layer.scans, statistics.output_grads)]

  basis = ()
  if layer_block.uses_basis:
    if inverses is None:
      raise ValueError(f"Layer {layer.name!r}: {layer.approx!r} statistics need the layer's "
                       "inverses.")
    basis = (inverses,)

  def one_layer(xs, gs, *basis):
    return layer_block.statistics(*layers.block_inputs(
        layer, xs, gs, layer_block.reduce_positions, sample, statistics.row_weights),
        *basis)

  if layer.stack:  # independent layers: one block each
    return jax.vmap(one_layer, in_axes=(0, 1) + (0,) * len(basis))(xs, gs, *basis)
  return one_layer([x[0] for x in xs], [g[:, 0] for g in gs], *basis)


def _per_loss(values, trace: Trace) -> list:
  """A `Linearization`'s masks or row weights, one per loss (None for a curvature without)."""
  return list(values) if len(values) else [None] * len(trace.losses)


def _input_rows(layer: LayerInfo, role: str, step_shape: tuple[int, ...]
                ) -> tuple[int, ...] | None:
  """The rows of one use's per-step input: its shape without the feature axes (None for a
  conv, whose patches are no loss's rows)."""
  if role in tags.CONV_KINDS:
    return None
  if role == "embedding":  # integer ids: every entry is a row
    return step_shape
  return step_shape[:len(step_shape) - (layer.in_axes if role == "dense" else 1)]


def input_masks(trace: Trace, curvature: interpreter.Linearization) -> dict[str, Array]:
  """Per layer name, the mask of its input rows, for the layers whose rows line up with
  masked losses' rows.

  A layer lines up with a loss when the per-step input of every use has the loss's rows
  (the input's shape without its feature axes equals `prediction.shape[:-1]`), e.g. a
  dense layer on `(N, T, d)` inputs under `(N, T, C)` logits. A row counts if a lining-up
  loss counts it: the mask is the elementwise maximum of their masks, and a lining-up
  loss without a mask means no mask. Layers that line up with no loss (convs, layers
  inside a scan over time) keep every row. Output gradients need no mask: the
  cotangents of masked rows are zero.
  """
  masks = _per_loss(curvature.masks, trace)
  found = {}
  for layer in trace.layers:
    rows = {_input_rows(layer, role, tuple(curvature.inputs[i].shape[len(scans):]))
            for i, role, scans in zip(layer.tags, layer.roles or (layer.kind,) * len(layer.tags),
                                      layer.scans)}
    lined_up = [m for p, m in zip(curvature.predictions, masks)
                if rows == {tags.row_shape(p)}]
    if lined_up and all(m is not None for m in lined_up):
      found[layer.name] = functools.reduce(jnp.maximum, lined_up)
  return found


def _random_example_signs(cotangents: list[Array], key: Array) -> list[Array]:
  """Multiplies each example's cotangents by a random sign, shared across losses.

  Generic parameters square a gradient summed over the batch, whose cross terms
  between examples vanish in expectation only for sampled targets. Random signs per
  example make them vanish for "empirical" and "exact" too, and leave every layer
  statistic unchanged: those are per-example outer products, where the signs cancel.
  """
  signs = {}
  for c in cotangents:
    if c.shape[1] not in signs:
      key, sub = jax.random.split(key)
      signs[c.shape[1]] = jax.random.rademacher(sub, (c.shape[1],), c.dtype)
  return [c * signs[c.shape[1]].reshape((1, -1) + (1,) * (c.ndim - 2)) for c in cotangents]


def _pad_columns(cotangents: list[Array]) -> list[Array]:
  """Places each loss's columns in its own slots of a shared column axis."""
  total = sum(c.shape[0] for c in cotangents)
  padded, start = [], 0
  for c in cotangents:
    pad = [(start, total - start - c.shape[0])] + [(0, 0)] * (c.ndim - 1)
    padded.append(jnp.pad(c, pad))
    start += c.shape[0]
  return padded
