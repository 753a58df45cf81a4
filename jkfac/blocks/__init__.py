"""Curvature blocks: one file per approximation, and the one table that names them.

`REGISTRY` maps `(layer kind, approximation)` to the `Block` that implements it; which
approximations a kind supports, its default (its first row) and the rule that "kron"
on a multi-use layer means "kron_indep" are all read from it. Adding an approximation
is one file here and one row in `_TABLE`. See docs/architecture.md for the matrix view
the blocks work in.
"""

from __future__ import annotations

import math

from jkfac import approximations, layers
from jkfac.blocks import (blocked, diagonal, ekfac, embedding, full, kron, kron_diag,
                          scale_and_shift, tied_embedding)
from jkfac.blocks.base import Block
from jkfac.blocks.stacked import StackedBlock
from jkfac.layer_info import LayerInfo

_DENSE = ("dense",)
_CONV = ("conv1d", "conv2d", "conv3d")

# kinds, approximation, block. A kind's first row is its default approximation.
_TABLE: tuple[tuple[tuple[str, ...], str, Block], ...] = (
    (_DENSE + _CONV, "kron", kron.BLOCK),
    (_DENSE + _CONV, "kron_indep", kron.BLOCK),  # uses of a multi-use layer as positions
    (_DENSE + _CONV, "kron_reduce", kron.REDUCE),
    (_DENSE + _CONV, "kron_in_diag", kron_diag.IN_DIAG),
    (_DENSE + _CONV, "kron_out_diag", kron_diag.OUT_DIAG),
    (_DENSE + _CONV, "diagonal", diagonal.BLOCK),
    (_DENSE + _CONV, "full", full.BLOCK),
    (_DENSE + _CONV, "ekfac", ekfac.BLOCK),
    (("embedding",), "kron", embedding.BLOCK),
    (("embedding",), "kron_indep", embedding.BLOCK),
    (("tied_embedding",), "kron_indep", tied_embedding.BLOCK),
    (("scale_and_shift",), "diagonal", scale_and_shift.DIAGONAL),
    (("scale_and_shift",), "full", scale_and_shift.FULL),
    (("generic",), "diagonal", diagonal.BLOCK),
)

REGISTRY: dict[tuple[str, str], Block] = {(kind, approx): block for kinds, approx, block
                                          in _TABLE for kind in kinds}
APPROXIMATIONS: tuple[str, ...] = approximations.APPROXIMATIONS
if set(APPROXIMATIONS) != {approx for _, approx, _ in _TABLE}:
  raise ImportError("jkfac.blocks implements other approximations than jkfac.approximations "
                    "names: add the name there, or the block here.")


def supported(kind: str) -> tuple[str, ...]:
  """The approximations a layer of `kind` supports, its default first."""
  return tuple(approx for k, approx in REGISTRY if k == kind)


def resolve(kind: str, approx: str | None, multi_use: bool) -> str:
  """The approximation a layer gets: `approx` (its kind's default if None), with "kron"
  read as "kron_indep" where the layer is multi-use or the kind has no plain "kron"."""
  approx = approx or supported(kind)[0]
  if approx == "kron" and (kind, "kron_indep") in REGISTRY and (
      multi_use or (kind, "kron") not in REGISTRY):
    return "kron_indep"
  return approx


# Approximations whose factors may be kept block-diagonal (`blocked`).
BLOCKABLE = ("kron", "kron_indep", "kron_reduce", "kron_in_diag", "kron_out_diag")


def block(kind: str, approx: str, groups: int = 1, block_size: int | None = None
          ) -> Block | StackedBlock:
  """The block of a layer of `kind` under `approx`, its factors wider than `block_size`
  kept block-diagonal (a `BLOCKABLE` approximation); with `groups` > 1 (a grouped conv),
  one such block per feature group, stacked."""
  base = REGISTRY[kind, approx]
  if block_size is not None:
    if approx not in BLOCKABLE:
      raise ValueError(f"Approximation {approx!r} has no factors to keep block-diagonal; "
                       f"these do: {BLOCKABLE}.")
    base = blocked.blocked(base, block_size)
  return base if groups == 1 else StackedBlock(base, groups)


def for_slice(layer: LayerInfo) -> Block | StackedBlock:
  """The block of one layer (of one slice, if the layer is stacked by a scan)."""
  return block(layer.kind, layer.approx, layers.feature_groups(layer), layer.block_size)


def for_layer(layer: LayerInfo) -> Block | StackedBlock:
  """The block of a layer, stacked when the layer is (see `LayerInfo.stack`)."""
  layer_block = for_slice(layer)
  return StackedBlock(layer_block, math.prod(layer.stack)) if layer.stack else layer_block


__all__ = ["APPROXIMATIONS", "Block", "REGISTRY", "StackedBlock", "block", "for_layer",
           "for_slice", "resolve", "supported"]
