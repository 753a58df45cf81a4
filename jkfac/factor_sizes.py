"""Never silently huge: factors over more than `max_factor_dim` features are kept diagonal.

A Kronecker factor over d features costs d² memory and d³ work per inversion: a
32768-wide output layer (an ordinary language-model head) would get a 32768 × 32768 `G`,
4.3 GB in float32 before its inverse. As Shampoo bounds its preconditioners, a layer
whose input or output side is wider than `max_factor_dim` keeps that side diagonal:
"kron" becomes "kron_out_diag" (wide outputs), "kron_in_diag" (wide inputs) or
"diagonal" (both); `jkfac.precondition` warns at `init`, and `jkfac.describe` shows it.

Below that bound, `factor_block_size` keeps wide factors block-diagonal
(`jkfac.blocks.blocked`) where whole ones would cost more than the network's gradient:
applying a layer's Kronecker inverses costs about `d_in d_out (s_in + s_out)` per step
(`s` a factor's side, or its blocks'), its gradient about `3 r d_in d_out` for `r` rows
(examples times positions) per batch. "auto" keeps every factor whole when the sum over
layers of the first is at most the sum of the second; else it takes the largest block
size of `AUTO_BLOCK_SIZES` that fits, or the smallest. At large batches, and in
convolutional or sequence models, whose rows include every position, factors stay whole.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

from jkfac import blocks, layers
from jkfac.blocks import blocked
from jkfac.layer_info import LayerInfo, Trace

# The default bound (features, the bias row not counted): a 4096² float32 factor is
# 64 MiB and one inversion about 23 GFLOP.
MAX_FACTOR_DIM = 4096
# The block sizes "auto" chooses from, largest first. The smallest: 128-feature blocks
# left an MLP's, an autoencoder's and a regression MLP's losses after 200 steps within
# 15% of whole factors' at 0.6-0.75x their step time (docs/tuning.md).
AUTO_BLOCK_SIZES = (2048, 1024, 512, 256, 128)

# Approximations with a dense factor on (input side, output side).
_DENSE_SIDES = {"kron": (True, True), "kron_indep": (True, True),
                "kron_reduce": (True, True), "ekfac": (True, True),
                "kron_in_diag": (False, True), "kron_out_diag": (True, False)}


class LargeFactorWarning(UserWarning):
  """A layer's factor would exceed `max_factor_dim`, so that side is kept diagonal."""


def _features(layer: LayerInfo) -> tuple[int, int]:
  d_in, d_out = layers.matrix_shape(layer)
  return d_in - (layer.bias is not None), d_out


def bounded_approximation(layer: LayerInfo, max_factor_dim: int | None) -> str:
  """The approximation `layer` gets under the bound: its own if every dense factor fits."""
  if max_factor_dim is None or layer.kind not in ("dense", "conv1d", "conv2d", "conv3d"):
    return layer.approx
  d_in, d_out = _features(layer)
  if layer.approx == "full":
    return "diagonal" if d_in * d_out > max_factor_dim else "full"
  dense_in, dense_out = _DENSE_SIDES.get(layer.approx, (False, False))
  wide_in, wide_out = dense_in and d_in > max_factor_dim, dense_out and d_out > max_factor_dim
  if not (wide_in or wide_out):
    return layer.approx
  keep_in, keep_out = dense_in and not wide_in, dense_out and not wide_out
  if keep_in and (layer.kind, "kron_out_diag") in blocks.REGISTRY:
    return "kron_out_diag"
  if keep_out and (layer.kind, "kron_in_diag") in blocks.REGISTRY:
    return "kron_in_diag"
  return "diagonal"


def _rows(layer: LayerInfo) -> int:
  """The rows (examples times positions, every use) its gradient sums over per batch."""
  return math.prod(layer.output_shape[:-1]) * len(layer.tags)


def _copies(layer: LayerInfo) -> int:
  return layers.feature_groups(layer) * math.prod(layer.stack or (1,))


def _apply_cost(layer: LayerInfo, size: int | None) -> int:
  """Multiply-adds of applying the layer's inverses to its gradient, with factors wider
  than `size` blocked."""
  if layer.approx not in blocks.BLOCKABLE:
    return 0
  d_in, d_out = layers.matrix_shape(layer)
  dense_in, dense_out = _DENSE_SIDES[layer.approx]

  def side(d: int, dense: bool) -> int:
    if not dense:
      return 1
    return d if size is None or d <= size else blocked.block_shape(d, size)[1]

  return d_in * d_out * (side(d_in, dense_in) + side(d_out, dense_out)) * _copies(layer)


def _gradient_cost(layer: LayerInfo) -> int:
  return 3 * _rows(layer) * math.prod(layers.matrix_shape(layer)) * _copies(layer)


def auto_block_size(trace: Trace) -> int | None:
  """The block size "auto" chooses for `trace` (see module); None: whole factors."""
  budget = sum(_gradient_cost(layer) for layer in trace.layers)
  for size in (None, *AUTO_BLOCK_SIZES):
    if sum(_apply_cost(layer, size) for layer in trace.layers) <= budget:
      return size
  return AUTO_BLOCK_SIZES[-1]


def block_size(layer: LayerInfo, size: int | None) -> int | None:
  """`size` if `layer` has a factor wider than it to keep block-diagonal, else None."""
  if size is None or layer.approx not in blocks.BLOCKABLE:
    return None
  return size if max(layers.matrix_shape(layer)) > size else None


def bound_factors(trace: Trace, max_factor_dim: int | None, warn: bool = False,
                  factor_block_size: int | str | None = None) -> Trace:
  """`trace` with every layer's approximation bounded by `max_factor_dim` and its wide
  factors blocked by `factor_block_size` (see module); with `warn`, a
  `LargeFactorWarning` names each layer whose approximation changed."""
  changed, bounded = [], []
  for layer in trace.layers:
    approx = bounded_approximation(layer, max_factor_dim)
    if approx != layer.approx:
      changed.append(f"{layer.name} ({'x'.join(map(str, _features(layer)))}: "
                     f"{layer.approx} -> {approx})")
      layer = dataclasses.replace(layer, approx=approx)
    bounded.append(layer)
  trace = dataclasses.replace(trace, layers=tuple(bounded))
  size = auto_block_size(trace) if factor_block_size == "auto" else factor_block_size
  bounded = [dataclasses.replace(layer, block_size=block_size(layer, size))
             for layer in trace.layers]
  if warn and changed:
    warnings.warn(f"jkfac keeps factors over max_factor_dim={max_factor_dim} features "
                  f"diagonal: {', '.join(changed)}. Raise max_factor_dim (memory grows as "
                  "its square) or choose these layers' approximations to silence this.",
                  LargeFactorWarning, stacklevel=3)
  return dataclasses.replace(trace, layers=tuple(bounded))

