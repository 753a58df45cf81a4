"""Curvature blocks: one file per approximation of a layer's Fisher block.

Every block works on a layer in its matrix view (see `jkfac/layers.py`): inputs
`a` of shape `(batch, positions, d_in)`, output gradients `g` of shape
`(columns, batch, positions, d_out)` and a `(d_in, d_out)` gradient matrix.
"kron_reduce" (K-FAC-reduce, Eschenhagen et al. 2023) is the Kronecker block fed
with inputs averaged and output gradients summed over positions per example; the
transform asks `jkfac/layers.py` for those reduced rows.

An embedding layer's "kron" is `embedding.BLOCK`, whose input factor is diagonal, and a
scale-and-shift layer's "diagonal" and "full" are in `scale_and_shift`: a block is
looked up by layer kind and approximation with `block`, so an approximation keeps one
name across kinds.
"""

from jkfac.blocks.base import Block
from jkfac.blocks import diagonal, embedding, full, kron, kron_diag, scale_and_shift

BLOCKS: dict[str, Block] = {
    "kron": kron.BLOCK,
    "kron_reduce": kron.BLOCK,
    "kron_in_diag": kron_diag.IN_DIAG,
    "kron_out_diag": kron_diag.OUT_DIAG,
    "diagonal": diagonal.BLOCK,
    "full": full.BLOCK,
}

# Blocks that differ from `BLOCKS[approx]` for a layer kind.
KIND_BLOCKS: dict[tuple[str, str], Block] = {
    ("embedding", "kron"): embedding.BLOCK,
    ("scale_and_shift", "diagonal"): scale_and_shift.DIAGONAL,
    ("scale_and_shift", "full"): scale_and_shift.FULL,
}


def block(kind: str, approx: str) -> Block:
  """The block of a layer of `kind` under the approximation `approx`."""
  return KIND_BLOCKS.get((kind, approx)) or BLOCKS[approx]


__all__ = ["Block", "BLOCKS", "block"]
