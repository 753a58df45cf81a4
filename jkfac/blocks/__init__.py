"""Curvature blocks: one file per approximation of a layer's Fisher block.

Every block works on a layer in its matrix view (see `jkfac/layers.py`): inputs
`a` of shape `(batch, positions, d_in)`, output gradients `g` of shape
`(columns, batch, positions, d_out)` and a `(d_in, d_out)` gradient matrix.
"kron_reduce" (K-FAC-reduce, Eschenhagen et al. 2023) is the Kronecker block fed
with inputs averaged and output gradients summed over positions per example; the
transform asks `jkfac/layers.py` for those reduced rows. "kron_indep" is the
Kronecker block of a multi-use layer, whose uses `layers.py` turns into positions.

A grouped conv's block is its approximation's block stacked over the feature groups
(`stacked.StackedBlock`): K-FAC is block diagonal over groups; so is a layer stacked
by a scan.

An embedding layer's "kron" is `embedding.BLOCK`, whose input factor is diagonal; a tied
embedding's (a table that is also the output projection) "kron_indep" is
`tied_embedding.BLOCK`, a sum of two such Kronecker products inverted jointly; a
scale-and-shift layer's "diagonal" and "full" are in `scale_and_shift`: a block is
looked up by layer kind and approximation with `block`, so an approximation keeps one
name across kinds.
"""

import math

from jkfac.blocks.base import Block
from jkfac.blocks import (diagonal, embedding, full, kron, kron_diag, scale_and_shift,
                          tied_embedding)
from jkfac.blocks.stacked import StackedBlock
from jkfac import layers

BLOCKS: dict[str, Block] = {
    "kron": kron.BLOCK,
    "kron_reduce": kron.BLOCK,
    "kron_indep": kron.BLOCK,  # the uses of a multi-use layer enter as extra positions
    "kron_in_diag": kron_diag.IN_DIAG,
    "kron_out_diag": kron_diag.OUT_DIAG,
    "diagonal": diagonal.BLOCK,
    "full": full.BLOCK,
}

# Blocks that differ from `BLOCKS[approx]` for a layer kind.
KIND_BLOCKS: dict[tuple[str, str], Block] = {
    ("embedding", "kron"): embedding.BLOCK,
    ("embedding", "kron_indep"): embedding.BLOCK,
    ("tied_embedding", "kron_indep"): tied_embedding.BLOCK,
    ("scale_and_shift", "diagonal"): scale_and_shift.DIAGONAL,
    ("scale_and_shift", "full"): scale_and_shift.FULL,
}


def block(kind: str, approx: str, groups: int = 1) -> Block | StackedBlock:
  """The block of a layer of `kind` under the approximation `approx`; with `groups` > 1
  (a grouped conv), one such block per feature group, stacked."""
  base = KIND_BLOCKS.get((kind, approx)) or BLOCKS[approx]
  return base if groups == 1 else StackedBlock(base, groups)


def for_slice(layer) -> Block | StackedBlock:
  """The block of one `tracer.LayerInfo` (of one slice, if the layer is stacked by a scan)."""
  return block(layer.kind, layer.approx, layers.feature_groups(layer))


def for_layer(layer) -> Block | StackedBlock:
  """The block of a `tracer.LayerInfo`, stacked when the layer is (see `LayerInfo.stack`)."""
  layer_block = for_slice(layer)
  return StackedBlock(layer_block, math.prod(layer.stack)) if layer.stack else layer_block


__all__ = ["Block", "BLOCKS", "StackedBlock", "block", "for_layer", "for_slice"]
