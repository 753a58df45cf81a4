"""Layer kinds as matrices: the view every curvature block works in.

At each of its positions a dense or conv layer computes `y_t = W^T a_t`, with `a_t` the
input (or input patch) plus a trailing 1 for the bias and `W` a `(d_in [+1], d_out)`
matrix. The functions here map a layer's inputs, output gradients and parameters to
that view and back, so blocks need not know the layer kind: embeddings (one-hot inputs,
only counted), tied embeddings, scale-and-shift layers, grouped convs (a leading group
axis), and multi-use layers (uses as extra positions). docs/architecture.md has the
details per kind.
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jkfac.tags import CONV_KINDS, ConvParams
from jkfac.layer_info import LayerInfo

Array = jax.Array

def _append_ones(a: Array) -> Array:
  return jnp.concatenate([a, jnp.ones(a.shape[:-1] + (1,), a.dtype)], axis=-1)


class LayerInputs(NamedTuple):
  """A layer's input vectors `a`, kept as column groups: `a = [*groups, 1 if bias]`.

  Conv patches come as one column group per index of the first kernel axis (a 1-D
  conv: per kernel offset), so `covariance` multiplies each pair of groups once and
  uses the symmetry for the rest (about 60% of the products for a 5x5 kernel), and
  adds the bias row from column sums instead of a column of ones. (Column groups are
  not a grouped conv's feature groups: those are a leading axis of every array.)

  `row_weights` `(batch, positions)`, if set, make `covariance` the weighted mean
  `sum_r w_r a_r a_r^T / sum_r w_r`: with a loss mask, padded rows count for nothing.
  `rows` ignores them (the output gradients of masked rows are zero already).
  """
  groups: list[Array]   # each (batch, positions, d_i)
  bias: bool
  row_weights: Array | None = None

  def rows(self) -> Array:
    """`a` itself: `(batch, positions, d_in [+1])`."""
    a = self.groups[0] if len(self.groups) == 1 else jnp.concatenate(self.groups, axis=-1)
    return _append_ones(a) if self.bias else a

  def _weights(self, dtype) -> tuple[Array | None, Array | int]:
    """The flat row weights (None: all 1) and their sum (the rows' count)."""
    if self.row_weights is None:
      return None, math.prod(self.groups[0].shape[:-1])
    w = self.row_weights.reshape(-1).astype(dtype)
    return w, _total(w)

  def covariance(self) -> Array:
    """The mean of `a a^T` over examples and positions (weighted by `row_weights`)."""
    flat = [x.reshape(-1, x.shape[-1]) for x in self.groups]
    w, count = self._weights(flat[0].dtype)
    weighted = flat if w is None else [w[:, None] * x for x in flat]
    products = {(i, j): weighted[i].T @ flat[j] for i in range(len(flat))
                for j in range(i, len(flat))}
    a = jnp.concatenate([jnp.concatenate([products[i, j] if i <= j else products[j, i].T
                                          for j in range(len(flat))], axis=1)
                         for i in range(len(flat))], axis=0)
    if self.bias:
      sums = jnp.concatenate([x.sum(axis=0) for x in weighted])
      a = jnp.block([[a, sums[:, None]], [sums[None, :], jnp.full((1, 1), count, a.dtype)]])
    return a / count

  def covariance_diagonal(self) -> Array:
    """The diagonal of `covariance`, without the products."""
    a = self.rows()
    a = a.reshape(-1, a.shape[-1])
    w, count = self._weights(a.dtype)
    return (a ** 2 if w is None else w[:, None] * a ** 2).sum(axis=0) / count


def _total(weights: Array) -> Array:
  """The sum of `weights`, or 1 where it is 0 (all rows masked: zero statistics)."""
  total = jnp.sum(weights)
  return jnp.where(total > 0, total, jnp.ones_like(total))


def covariance_diagonal(a: LayerInputs | Array) -> Array:
  """The mean of `a ** 2` over examples and positions, from `LayerInputs` or as given."""
  return (a if isinstance(a, LayerInputs) else LayerInputs([a], bias=False)
          ).covariance_diagonal()


def _weighted_means(inputs: LayerInputs) -> LayerInputs:
  """Each example's weighted mean input over its positions (K-FAC-reduce with a mask): one
  position per example, weighted 1 if any of its rows is, else 0."""
  w = inputs.row_weights
  totals = w.sum(axis=1, keepdims=True)
  means = [jnp.einsum("np,npd->nd", w.astype(x.dtype), x)[:, None, :]
           / jnp.where(totals > 0, totals, 1).astype(x.dtype)[..., None] for x in inputs.groups]
  return LayerInputs(means, inputs.bias, (totals > 0).astype(w.dtype))


def layer_inputs(layer: LayerInfo, x: Array, reduce: bool = False,
                 sample: Array | None = None) -> LayerInputs:
  """The input vectors `a` of every position, as `LayerInputs` of `(batch, positions, d)`.

  With `reduce`, their mean over positions instead: one position (K-FAC-reduce),
  computed without building every patch. With `sample` (indices into the
  `batch * positions` rows, see `sample_rows`), only those conv patches, as
  `(len(sample), 1, d)`: the others are never built. A grouped conv's arrays gain a
  leading group axis, each group's patches over its own input channels.
  """
  groups = feature_groups(layer)
  if groups == 1:
    return LayerInputs(_input_parts(layer, x, reduce, sample), layer.bias is not None)
  x = jnp.moveaxis(x.reshape(*x.shape[:-1], groups, -1), -2, 0)
  parts = jax.vmap(lambda x: _input_parts(layer, x, reduce, sample))(x)
  return LayerInputs(parts, layer.bias is not None)


def _input_parts(layer: LayerInfo, x: Array, reduce: bool, sample: Array | None) -> list[Array]:
  """`LayerInputs.groups` of one layer (one group of a grouped conv)."""
  if layer.kind not in CONV_KINDS:
    x = x.reshape(x.shape[0], -1, math.prod(x.shape[x.ndim - layer.in_axes:]))
    return [x.mean(axis=1, keepdims=True) if reduce else x]
  kernel_size = conv_kernel_size(layer)
  if sample is not None:
    patches = _sampled_patches(x, kernel_size, layer.conv, sample)  # (rows, *kernel, c_in)
    return [p.reshape(p.shape[0], 1, -1) for p in jnp.moveaxis(patches, 1, 0)]
  slices = _patch_slices(x, kernel_size, layer.conv)
  if reduce:
    slices = [s.mean(axis=tuple(range(1, s.ndim - 1)), keepdims=True) for s in slices]
  per_row = len(slices) // kernel_size[0]   # one group per index of the first kernel axis
  parts = [_stack_features(slices[i:i + per_row]) for i in range(0, len(slices), per_row)]
  return [p.reshape(p.shape[0], -1, p.shape[-1]) for p in parts]


def feature_groups(layer: LayerInfo) -> int:
  """The independent groups of a grouped conv (`feature_group_count`); 1 otherwise."""
  return layer.conv.feature_group_count if layer.conv is not None else 1


def conv_kernel_size(layer: LayerInfo) -> tuple[int, ...]:
  """The spatial kernel size of a conv layer: `(k_w,)`, `(k_h, k_w)` or `(k_d, k_h, k_w)`."""
  return tuple(layer.weight_shape[:-2])


def embedding_counts(layer: LayerInfo, ids: Array, weights: Array | None = None) -> Array:
  """The diagonal of the mean one-hot outer product of `ids`: `(vocab,)` id frequencies.

  Negative ids wrap as in `jnp.take`; out-of-range ids count nowhere (their lookup
  gives the table no gradient). With `weights` (one per id), the weighted mean.
  """
  vocab = layer.weight_shape[0]
  if weights is None:
    return jnp.zeros(vocab).at[ids.ravel()].add(1.0, mode="drop") / ids.size
  w = weights.ravel()
  return jnp.zeros(vocab, w.dtype).at[ids.ravel()].add(w, mode="drop") / _total(w)


def sample_rows(layer: LayerInfo, per_dimension: float, key: Array) -> Array | None:
  """Random patch rows for a conv's input factor: at most `int(per_dimension * d_in)`.

  Indices into the `batch * positions` rows, uniform without replacement (`d_in` the
  patch size of one group, bias aside); None where that keeps every row.
  """
  total = math.prod(layer.output_shape[:-1])
  count = max(1, int(per_dimension * (matrix_shape(layer)[0] - (layer.bias is not None))))
  if count >= total:
    return None
  return jax.random.choice(key, total, (count,), replace=False)


def _padded(x: Array, conv: ConvParams) -> Array:
  """`x` with the conv's padding and input dilation applied."""
  pads = [(lo, hi, d - 1) for (lo, hi), d in zip(conv.padding, conv.lhs_dilation)]
  return jax.lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0), *pads, (0, 0, 0)])


def _output_size(x: Array, kernel_size: tuple[int, ...], conv: ConvParams) -> list[int]:
  """The output's spatial size, from the padded input `x`."""
  return [(size - (k - 1) * d - 1) // s + 1 for size, k, d, s in
          zip(x.shape[1:-1], kernel_size, conv.rhs_dilation, conv.window_strides)]


def _patch_slices(x: Array, kernel_size: tuple[int, ...], conv: ConvParams) -> list[Array]:
  """For each kernel offset (row-major), the input pixels it meets at every output pixel."""
  x = _padded(x, conv)
  out, strides = _output_size(x, kernel_size, conv), conv.window_strides
  slices = []
  for offset in itertools.product(*map(range, kernel_size)):
    start = [o * d for o, d in zip(offset, conv.rhs_dilation)]
    limit = [b + (n - 1) * s + 1 for b, n, s in zip(start, out, strides)]
    slices.append(jax.lax.slice(x, (0, *start, 0), (x.shape[0], *limit, x.shape[-1]),
                                (1, *strides, 1)))
  return slices


def _sampled_patches(x: Array, kernel_size: tuple[int, ...], conv: ConvParams,
                     sample: Array) -> Array:
  """The patches of the `sample` rows (flat `(example, output pixel)` indices):
  `(rows, *kernel_size, c_in)`, gathered without building the others."""
  x = _padded(x, conv)
  out = _output_size(x, kernel_size, conv)
  example, *pixel = jnp.unravel_index(sample, (x.shape[0], *out))
  index = [example.reshape((-1,) + (1,) * len(kernel_size))]
  for axis, (p, k, s, d) in enumerate(zip(pixel, kernel_size, conv.window_strides,
                                          conv.rhs_dilation)):
    shape = [1] * len(kernel_size)
    shape[axis] = k
    index.append(p.reshape((-1,) + (1,) * len(kernel_size)) * s
                 + (jnp.arange(k) * d).reshape(shape))
  return x[tuple(index)]


def _stack_features(slices: list[Array]) -> Array:
  patches = jnp.stack(slices, axis=-2)  # (batch, *out, offsets, c_in)
  return patches.reshape(*patches.shape[:-2], -1)


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
    x = x * jnp.sqrt(w * x.shape[0] / _total(w))[:, None]
  g2 = jnp.concatenate([g.reshape(-1, vocab) for _, g in projections])
  return (counts, x), (g1, g2)


def output_rows(output_grads: Array, reduce: bool = False,
                layer: LayerInfo | None = None) -> Array:
  """Output gradients as `(columns, batch, positions, d_out)`; with `reduce`, their sum
  over positions, `(columns, batch, 1, d_out)`.

  With `layer`, its output features (all trailing weight axes of a `DenseGeneral`) form
  `d_out`, and a grouped conv's rows gain a leading group axis, `d_out` per group.
  """
  g = output_grads
  d_out = g.shape[-1] if layer is None else math.prod(layer.weight_shape[_row_axes(layer):])
  g = g.reshape(g.shape[0], g.shape[1], -1, d_out)
  g = g.sum(axis=2, keepdims=True) if reduce else g
  groups = 1 if layer is None else feature_groups(layer)
  return g if groups == 1 else jnp.moveaxis(g.reshape(*g.shape[:-1], groups, -1), -2, 0)


def _row_axes(layer: LayerInfo) -> int:
  """How many leading weight axes index the rows (`d_in`) of the parameter matrix."""
  if layer.kind == "dense":
    return layer.in_axes
  return len(layer.weight_shape) - (layer.kind != "generic")


def param_matrix(layer: LayerInfo, w: Array, b: Array | None) -> Array:
  """The layer's parameters (or their gradients) as one `(d_in [+1], d_out)` matrix.

  A generic parameter is a column: `(size, 1)`. A grouped conv gives one matrix per
  group, `(groups, d_in [+1], d_out / groups)`.
  """
  w = w.T if layer.transposed else w
  rows = math.prod(w.shape[:_row_axes(layer)])
  m = w.reshape(rows, -1)
  groups = feature_groups(layer)
  if groups > 1:
    m = m.reshape(rows, groups, -1).swapaxes(0, 1)
  if b is None:
    return m
  return jnp.concatenate([m, b.reshape(m.shape[:-2] + (1, m.shape[-1]))], axis=-2)


def split_param_matrix(layer: LayerInfo, m: Array) -> tuple[Array, Array | None]:
  """Inverse of `param_matrix`."""
  w, b = (m[..., :-1, :], m[..., -1, :]) if layer.bias is not None else (m, None)
  if feature_groups(layer) > 1:
    w = w.swapaxes(0, 1)
  bias_shape = layer.weight_shape[_row_axes(layer):]
  w = w.reshape(layer.weight_shape)
  return w.T if layer.transposed else w, None if b is None else b.reshape(bias_shape)


def matrix_shape(layer: LayerInfo) -> tuple[int, int]:
  """`(d_in [+1], d_out)` of the layer's parameter matrix (of one group, if grouped)."""
  k = _row_axes(layer)
  d_in, d_out = math.prod(layer.weight_shape[:k]), math.prod(layer.weight_shape[k:])
  return d_in + (layer.bias is not None), d_out // feature_groups(layer)
