"""The records of the static layer table: data only, no arrays and no jaxpr walking.

`LayerInfo` describes one layer (a tagged or recognised layer, or a generic
parameter), `LossInfo` one registered loss, and `Trace` what a loss function holds.
The layer table (`jkfac/layer_table.py`) builds them once per trace; layers, blocks,
statistics and the transform read them.
"""

from __future__ import annotations

import dataclasses

from jkfac import tags


@dataclasses.dataclass(frozen=True)
class LayerInfo:
  """A tagged layer: static facts, no arrays.

  `weight` and `bias` are indices into the flattened `params` leaves; `name` is the
  weight's parent path (e.g. "Dense_0"), which keys the layer in the state.

  A layer may have several uses (tags of the same weight, or a tag inside a `scan`):
  `tags` are their indices among all layer tags, in evaluation order, and `scans` say,
  per use, what each enclosing scan does with the weight: "repeat" (the whole weight
  at every step, e.g. a scan over time) or "stack" (one slice per step, e.g.
  `nn.scan` over layers). A stacked layer is `stack` independent layers: the params
  leaves have shape `stack + weight_shape`. Shapes are those of one step's tag.

  `in_axes` is a dense layer's number of contracted input axes (> 1 for `DenseGeneral`).
  `transposed`: a weight stored outputs first (Equinox, PyTorch layout): a dense
  `(d_out, d_in)` applied as `w @ x`, a conv OIHW on NCHW inputs; `weight_shape` is then
  the shape of its matrix view, `(d_in, d_out)` or HWIO (see `matrix_axes`).
  `roles` is each use's tag kind: a "tied_embedding" layer (a table used as lookup
  and as output projection) has "embedding" and "embedding_projection" uses.
  `block_size`: the layer's Kronecker factors wider than this are kept block-diagonal
  (`jkfac.blocks.blocked`); None: whole.
  """
  name: str
  kind: str
  approx: str
  weight: int
  bias: int | None
  input_shape: tuple[int, ...]
  output_shape: tuple[int, ...]
  weight_shape: tuple[int, ...]
  conv: tags.ConvParams | None
  in_axes: int = 1
  tags: tuple[int, ...] = (0,)
  scans: tuple[tuple[str, ...], ...] = ((),)
  stack: tuple[int, ...] = ()
  roles: tuple[str, ...] = ()
  transposed: bool = False
  block_size: int | None = None

  @property
  def multi_use(self) -> bool:
    """Whether the weight is applied more than once per example."""
    return len(self.tags) > 1 or any("repeat" in kinds for kinds in self.scans)


def matrix_axes(ndim: int) -> tuple[int, ...]:
  """The axes of a `transposed` weight in its matrix view's order: a dense `(out, in)` as
  `(in, out)`, a conv `(out, in, *kernel)` (OIHW) as `(*kernel, in, out)` (HWIO)."""
  return (*range(2, ndim), 1, 0)


@dataclasses.dataclass(frozen=True)
class LossInfo:
  """A registered loss: its kind (see `losses.LOSSES`), its scalar weight, and whether
  its tag also holds a mask and per-row weights (operands, see `tags.loss_operands`)."""
  kind: str
  weight: float
  has_mask: bool = False
  has_row_weights: bool = False


@dataclasses.dataclass(frozen=True)
class Trace:
  """What `loss_fn` holds: tagged layers, losses, and the parameters of no layer.

  `generic` lists the `params` leaves that no layer tag covers (among them those
  marked by `register_generic`), each as a layer of kind "generic"; K-FAC gives them a
  diagonal block estimated from their gradients.
  """
  layers: tuple[LayerInfo, ...]
  losses: tuple[LossInfo, ...]
  param_paths: tuple[str, ...]
  generic: tuple[LayerInfo, ...] = ()
  num_tags: int = 0  # layer tags in the jaxpr, also of layers left out (see `masking`)
  marked: frozenset[int] = frozenset()  # leaves marked by `register_generic`

  @property
  def every_layer(self) -> tuple[LayerInfo, ...]:
    """The layers, then the generic parameters: everything that has a block."""
    return self.layers + self.generic
