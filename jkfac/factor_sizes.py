"""Never silently huge: factors over more than `max_factor_dim` features are kept diagonal.

A Kronecker factor over d features costs d² memory and d³ work per inversion: a
32768-wide output layer (an ordinary language-model head) would get a 32768 × 32768 `G`,
4.3 GB in float32 before its inverse. As Shampoo bounds its preconditioners, a layer
whose input or output side is wider than `max_factor_dim` keeps that side diagonal:
"kron" becomes "kron_out_diag" (wide outputs), "kron_in_diag" (wide inputs) or
"diagonal" (both); `jkfac.precondition` warns at `init`, and `jkfac.describe` shows it.
"""

from __future__ import annotations

import dataclasses
import warnings

from jkfac import blocks, layers
from jkfac.layer_info import LayerInfo, Trace

# The default bound (features, the bias row not counted): a 4096² float32 factor is
# 64 MiB and one inversion about 23 GFLOP.
MAX_FACTOR_DIM = 4096

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


def bound_factors(trace: Trace, max_factor_dim: int | None, warn: bool = False) -> Trace:
  """`trace` with every layer's approximation bounded by `max_factor_dim` (see module);
  with `warn`, a `LargeFactorWarning` names each layer that changed."""
  changed, bounded = [], []
  for layer in trace.layers:
    approx = bounded_approximation(layer, max_factor_dim)
    if approx != layer.approx:
      changed.append(f"{layer.name} ({'x'.join(map(str, _features(layer)))}: "
                     f"{layer.approx} -> {approx})")
      layer = dataclasses.replace(layer, approx=approx)
    bounded.append(layer)
  if warn and changed:
    warnings.warn(f"jkfac keeps factors over max_factor_dim={max_factor_dim} features "
                  f"diagonal: {', '.join(changed)}. Raise max_factor_dim (memory grows as "
                  "its square) or choose these layers' approximations to silence this.",
                  LargeFactorWarning, stacklevel=3)
  return dataclasses.replace(trace, layers=tuple(bounded)) if changed else trace

