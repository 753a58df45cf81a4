"""Automatic registration: tags untagged dense, conv, embedding and norm layers in a jaxpr.

Layers are recognised by their structure, not by module names, so they survive `jit`, `remat`,
`scan` and dtype promotion: dense (`dot_general`, also `DenseGeneral`) and channels-last conv
layers with a parameter weight and an optional bias `add`, embedding lookups (`gather` of rows),
tied output projections (`x @ table.T`) and norm layers' scale and shift. A dense weight that
is a concatenation (or stack) of parameters, as in Flax's `OptimizedLSTMCell`, is split back
into one dense layer per parameter. `register_layers` puts a layer tag after each recognised
layer, so the tracer treats it like a hand-tagged one; weights whose uses disagree stay
untagged (generic). The exact forms are listed in docs/architecture.md.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jcore

from jkfac import tags
from jkfac.jaxprs import (TRANSPARENT_PRIMITIVES, call_jaxpr, inner_origin, is_var as _is_var,
                          track_parameters)

_BROADCASTS = frozenset({"reshape", "broadcast_in_dim", "convert_element_type", "copy"})
# Primitives that join parameters into one weight, and the name of their axis parameter.
_JOINS = {"concatenate": "dimension", "stack": "axis"}


class Split(NamedTuple):
  """A weight joined from parameters along `axis`: a `concatenate` or, if `stacked`, a `stack`.

  `parts` are the parameter variables and `weights` their params leaves; `casts` the dtypes
  the joined weight is cast to, in order, before its `dot_general`. Once a bias `add` is
  matched, `biases` holds the bias parameter variable added to each part (or None) and
  `bias_casts` the casts on the bias's way to the `add`. Replaying the casts per part keeps
  the values exact (a cast commutes with a join).
  """
  axis: int
  parts: tuple[jcore.Var, ...]
  weights: tuple[int, ...]
  stacked: bool
  casts: tuple[jnp.dtype, ...] = ()
  biases: tuple[jcore.Var | None, ...] = ()
  bias_casts: tuple[jnp.dtype, ...] = ()


@dataclasses.dataclass(frozen=True)
class Match:
  """A recognised layer of one jaxpr level.

  `eqn`, at index `start`, is its main equation (the `dot_general`, conv, `gather` or scale
  `mul`); the tag goes after equation `last` (the bias `add`, if any). `weight` is the
  weight's params leaf (None for a split dense layer: see `split`) and `bias` the bias
  parameter variable (for a split layer, the joined biases). Kind-specific: `in_axes` and
  `features` (dense, conv, scale-and-shift), `ids` (embedding), `table` (projection),
  `x_hat` and `scale` (scale-and-shift); `transposed` (dense `w @ x`, weight `(out, in)`).
  """
  kind: str
  eqn: jcore.JaxprEqn
  start: int
  last: int
  weight: int | None
  bias: jcore.Var | None = None
  in_axes: int = 1
  features: tuple[int, ...] = ()
  ids: jcore.Var | None = None
  table: jcore.Var | None = None
  x_hat: tuple[jcore.Var, ...] = ()
  scale: jcore.Var | None = None
  split: Split | None = None
  transposed: bool = False


@dataclasses.dataclass
class _Level:
  """What the walk over one jaxpr level knows so far; the maps are keyed by variable."""
  origin: dict  # -> params leaf index (through casts)
  uses: collections.Counter
  fixed: set  # parameters and the variables computed from them alone
  # -> the parameter (or join of parameters) it broadcasts, and the casts on the way
  bias_source: dict = dataclasses.field(default_factory=dict)
  bias_casts: dict = dataclasses.field(default_factory=dict)
  ids_source: dict = dataclasses.field(default_factory=dict)  # gather indices `(..., 1)` -> ids
  last_axis: dict = dataclasses.field(default_factory=dict)  # -> the 1-D parameter laid last
  transposed: dict = dataclasses.field(default_factory=dict)  # `table.T` -> 2-D parameter
  joins: dict = dataclasses.field(default_factory=dict)  # -> its `Split` (no biases yet)
  partial: dict = dataclasses.field(default_factory=dict)  # `factor * scale` -> its Match
  weight_first: dict = dataclasses.field(default_factory=dict)  # `w @ x` -> its Match
  padded_ids: dict = dataclasses.field(default_factory=dict)  # `[ids, column]` -> ids
  unsqueezed: dict = dataclasses.field(default_factory=dict)  # `(..., 1, d)` lookup -> Match
  by_output: dict = dataclasses.field(default_factory=dict)  # -> start index of its Match
  matches: dict = dataclasses.field(default_factory=dict)  # start index -> Match

  @classmethod
  def of(cls, jaxpr: jcore.Jaxpr, origin: dict) -> _Level:
    uses = collections.Counter(v for eqn in jaxpr.eqns for v in eqn.invars if _is_var(v))
    uses.update(v for v in jaxpr.outvars if _is_var(v))
    return cls(origin=origin, uses=uses, fixed=set(origin))

  def add(self, match: Match) -> None:
    """Records a match, or its update (same `start`), keeping the order of first records."""
    self.matches[match.start] = match


def _channels_last(ndim: int) -> tuple[tuple[int, ...], ...]:
  """Dimension numbers of a channels-last conv (NWC/WIO, NHWC/HWIO, NDHWC/DHWIO)."""
  spatial = tuple(range(1, ndim - 1))
  return (0, ndim - 1) + spatial, (ndim - 1, ndim - 2) + tuple(range(ndim - 2)), (
      0, ndim - 1) + spatial


def _dense_in_axes(eqn: jcore.JaxprEqn, w_ndim: int) -> int | None:
  """`k` if the `dot_general` contracts the trailing `k` axes of its input (which has a
  batch axis besides) with the leading `k` of an N-D weight, with no batch dimensions."""
  (contract_x, contract_w), (batch_x, batch_w) = eqn.params["dimension_numbers"]
  x_ndim, k = eqn.invars[0].aval.ndim, len(contract_w)
  if batch_x or batch_w or not 0 < k < w_ndim or x_ndim <= k:
    return None
  if tuple(contract_x) != tuple(range(x_ndim - k, x_ndim)) or tuple(contract_w) != tuple(
      range(k)):
    return None
  return k


def _layer_kind(eqn: jcore.JaxprEqn, origin: dict) -> tuple[str, int] | None:
  """`(kind, in_axes)` if `eqn` is a dense (or `DenseGeneral`, in_axes > 1) or
  channels-last conv layer with a parameter as its weights."""
  if len(eqn.invars) != 2 or not _is_var(eqn.invars[1]) or eqn.invars[1] not in origin:
    return None
  w_ndim = eqn.invars[1].aval.ndim  # a parameter, or its slice in a scan over layers
  if eqn.primitive.name == "dot_general":
    in_axes = _dense_in_axes(eqn, w_ndim)
    return None if in_axes is None else ("dense", in_axes)
  if eqn.primitive.name == "conv_general_dilated" and 3 <= w_ndim <= 5:
    dn = eqn.params["dimension_numbers"]
    if ((tuple(dn.lhs_spec), tuple(dn.rhs_spec), tuple(dn.out_spec)) == _channels_last(w_ndim)
        and eqn.params["batch_group_count"] == 1):
      return f"conv{w_ndim - 2}d", 1
  return None


def _is_row_lookup(eqn: jcore.JaxprEqn, origin: dict) -> bool:
  """Whether `eqn` gathers whole rows of a 2-D parameter at integer indices `(..., 1)`."""
  if eqn.primitive.name != "gather" or not all(_is_var(v) for v in eqn.invars):
    return False
  table, indices = eqn.invars
  if table not in origin or table.aval.ndim != 2:
    return False
  dn, idx = eqn.params["dimension_numbers"], indices.aval
  return (jnp.issubdtype(idx.dtype, jnp.integer) and idx.ndim >= 1 and idx.shape[-1] == 1
          and tuple(dn.offset_dims) == (idx.ndim - 1,) and tuple(dn.collapsed_slice_dims) == (0,)
          and tuple(dn.start_index_map) == (0,)
          and not tuple(getattr(dn, "operand_batching_dims", ()))
          and tuple(eqn.params["slice_sizes"]) == (1, table.aval.shape[1]))


def _projection_table(eqn: jcore.JaxprEqn, origin: dict, transposed: dict,
                      uses: collections.Counter) -> jcore.Var | None:
  """The 2-D parameter `table` if `eqn` is `x @ table.T`: a `dot_general` contracting the
  last axis of `x` with axis 1 of `table`, or axis 0 of its `transpose` used there alone."""
  if (eqn.primitive.name != "dot_general" or len(eqn.invars) != 2
      or not all(_is_var(v) for v in eqn.invars)):
    return None
  x, w = eqn.invars
  (contract_x, contract_w), (batch_x, batch_w) = eqn.params["dimension_numbers"]
  if batch_x or batch_w or x.aval.ndim < 2 or tuple(contract_x) != (x.aval.ndim - 1,):
    return None
  if w in origin and w.aval.ndim == 2 and tuple(contract_w) == (1,):
    return w
  if w in transposed and uses[w] == 1 and tuple(contract_w) == (0,):
    return transposed[w]
  return None


def _last_axis_source(eqn: jcore.JaxprEqn, origin: dict, last_axis: dict) -> jcore.Var | None:
  """The 1-D parameter that `eqn` lays along the last axis of its output, if any: a cast,
  a `reshape` to `(1, ..., 1, d)`, or a `broadcast_in_dim` that keeps it last."""
  first = eqn.invars[0] if eqn.invars and _is_var(eqn.invars[0]) else None
  source = last_axis.get(first)
  if source is None and first in origin and first.aval.ndim == 1:
    source = first
  if source is None or eqn.primitive.name not in _BROADCASTS:
    return None
  (d,), out = source.aval.shape, eqn.outvars[0].aval.shape
  if eqn.primitive.name == "reshape":
    return source if out == (1,) * (len(out) - 1) + (d,) else None
  if eqn.primitive.name == "broadcast_in_dim":
    dims = eqn.params["broadcast_dimensions"]
    return source if out[-1] == d and dims and dims[-1] == len(out) - 1 else None
  return source


def _join(eqn: jcore.JaxprEqn, origin: dict) -> Split | None:
  """The `Split` of a `concatenate` or `stack` of two or more parameters."""
  if (eqn.primitive.name not in _JOINS or len(eqn.invars) < 2
      or not all(_is_var(v) and v in origin for v in eqn.invars)):
    return None
  parts = tuple(eqn.invars)
  return Split(eqn.params[_JOINS[eqn.primitive.name]], parts, tuple(origin[v] for v in parts),
               eqn.primitive.name == "stack")


def _track(level: _Level, eqn: jcore.JaxprEqn) -> None:
  """Extends the level's maps by what `eqn` computes from parameters (or ids)."""
  first = eqn.invars[0] if eqn.invars and _is_var(eqn.invars[0]) else None
  name = eqn.primitive.name
  track_parameters(eqn, level.origin)
  operands = [v for v in eqn.invars if _is_var(v)]
  if operands and all(v in level.fixed for v in operands):
    level.fixed.update(eqn.outvars)
  if (source := _last_axis_source(eqn, level.origin, level.last_axis)) is not None:
    level.last_axis[eqn.outvars[0]] = source
  if name in _BROADCASTS and (first in level.bias_source or first in level.origin
                              or first in level.joins):
    level.bias_source[eqn.outvars[0]] = level.bias_source.get(first, first)
    level.bias_casts[eqn.outvars[0]] = level.bias_casts.get(first, ()) + _cast(eqn)
  if (name in ("broadcast_in_dim", "reshape") and first is not None
      and eqn.outvars[0].aval.shape == first.aval.shape + (1,)):
    level.ids_source[eqn.outvars[0]] = first
  if (name == "concatenate" and len(eqn.invars) == 2 and first in level.ids_source
      and eqn.params["dimension"] == first.aval.ndim - 1 and eqn.outvars[0].aval.shape[-1] == 2):
    level.padded_ids[eqn.outvars[0]] = level.ids_source[first]
  if (name == "transpose" and first in level.origin and first.aval.ndim == 2
      and tuple(eqn.params["permutation"]) == (1, 0)):
    level.transposed[eqn.outvars[0]] = first
  if (split := _join(eqn, level.origin)) is not None:
    level.joins[eqn.outvars[0]] = split
  elif name in TRANSPARENT_PRIMITIVES and first in level.joins:
    split = level.joins[first]
    level.joins[eqn.outvars[0]] = split._replace(casts=split.casts + _cast(eqn))


def _cast(eqn: jcore.JaxprEqn) -> tuple[jnp.dtype, ...]:
  """The dtype `eqn` casts to, if it is a cast."""
  return (eqn.outvars[0].aval.dtype,) if eqn.primitive.name == "convert_element_type" else ()


def _has_examples(level: _Level, x: jcore.Var | jcore.Literal) -> bool:
  """Whether an input is no variable computed from parameters alone (those have no
  examples, so the equation using them is no layer)."""
  return not (_is_var(x) and x in level.fixed)


# --- one function per recognised form -------------------------------------------------------


def _dense_or_conv(level: _Level, index: int, eqn: jcore.JaxprEqn) -> Match | None:
  """A dense or conv layer whose weight is a parameter."""
  found = _layer_kind(eqn, level.origin)
  if found is None or not _has_examples(level, eqn.invars[0]):
    return None
  kind, in_axes = found
  w_shape = eqn.invars[1].aval.shape
  features = tuple(w_shape[in_axes:]) if kind == "dense" else (w_shape[-1],)
  return Match(kind, eqn, index, index, level.origin[eqn.invars[1]], in_axes=in_axes,
               features=features)


def _split_dense(level: _Level, index: int, eqn: jcore.JaxprEqn) -> Match | None:
  """A dense layer whose weight is a join of parameters. A `stack` along the only input
  axis would leave parts without one: no layer."""
  if eqn.primitive.name != "dot_general" or len(eqn.invars) != 2:
    return None
  x, w = eqn.invars
  split = level.joins.get(w) if _is_var(w) else None
  if split is None or not _is_var(x) or x in level.fixed:
    return None
  in_axes = _dense_in_axes(eqn, w.aval.ndim)
  if in_axes is None or (split.stacked and split.axis < in_axes == 1):
    return None
  return Match("dense", eqn, index, index, None, in_axes=in_axes,
               features=tuple(w.aval.shape[in_axes:]), split=split)


def _weight_first(level: _Level, index: int, eqn: jcore.JaxprEqn) -> None:
  """Notes a dense `w @ x` (a `(out, in)` weight first, examples on `x`'s leading axes,
  as `vmap` batches Equinox's `Linear`): it is a layer once `_batch_first` sees its
  output's `out` axis moved last."""
  w, x = eqn.invars
  if not (_is_var(w) and w in level.origin and w.aval.ndim == 2 and _is_var(x)
          and x.aval.ndim >= 2 and _has_examples(level, x)):
    return
  if eqn.params["dimension_numbers"] == (((1,), (x.aval.ndim - 1,)), ((), ())):
    level.weight_first[eqn.outvars[0]] = Match(
        "dense", eqn, index, index, level.origin[w], features=(w.aval.shape[0],),
        transposed=True)


def _batch_first(level: _Level, index: int, eqn: jcore.JaxprEqn) -> Match | None:
  """The `w @ x` layer whose `(out, *batch)` output `eqn` transposes to `(*batch, out)`."""
  match = level.weight_first.get(eqn.invars[0])
  ndim = eqn.outvars[0].aval.ndim
  if (match is None or level.uses[eqn.invars[0]] != 1
      or tuple(eqn.params["permutation"]) != (*range(1, ndim), 0)):
    return None
  return dataclasses.replace(match, last=index)


def _row_slice_lookup(level: _Level, index: int, eqn: jcore.JaxprEqn) -> None:
  """Notes a lookup `table[ids]` as `vmap` batches Equinox's `Embedding`: a clipped
  `gather` of `(1, d)` slices at `[ids, column]` (a full-row slice clips any column to
  0), giving `(..., 1, d)`; it is a layer once `_squeezed` sees that axis dropped."""
  if eqn.primitive.name != "gather" or not all(_is_var(v) for v in eqn.invars):
    return
  table, indices = eqn.invars
  if table not in level.origin or table.aval.ndim != 2 or indices not in level.padded_ids:
    return
  dn, n = eqn.params["dimension_numbers"], indices.aval.ndim
  if (tuple(dn.offset_dims) == (n - 1, n) and not tuple(dn.collapsed_slice_dims)
      and tuple(dn.start_index_map) == (0, 1)
      and not tuple(getattr(dn, "operand_batching_dims", ()))
      and eqn.params["mode"] == lax.GatherScatterMode.CLIP
      and tuple(eqn.params["slice_sizes"]) == (1, table.aval.shape[1])):
    level.unsqueezed[eqn.outvars[0]] = Match("embedding", eqn, index, index,
                                             level.origin[table], ids=level.padded_ids[indices])


def _squeezed(level: _Level, index: int, eqn: jcore.JaxprEqn) -> Match | None:
  """The lookup whose `(..., 1, d)` output `eqn` squeezes to `(..., d)`."""
  match = level.unsqueezed.get(eqn.invars[0])
  ndim = eqn.invars[0].aval.ndim
  if (match is None or level.uses[eqn.invars[0]] != 1
      or tuple(eqn.params["dimensions"]) != (ndim - 2,)):
    return None
  return dataclasses.replace(match, last=index)


def _projection(level: _Level, index: int, eqn: jcore.JaxprEqn) -> Match | None:
  """A tied embedding's output projection `x @ table.T`."""
  table = _projection_table(eqn, level.origin, level.transposed, level.uses)
  if table is None:
    return None
  return Match("embedding_projection", eqn, index, index, level.origin[table], table=table)


def _lookup(level: _Level, index: int, eqn: jcore.JaxprEqn) -> Match | None:
  """An embedding lookup; no bias: a later add is not the lookup's."""
  if not _is_row_lookup(eqn, level.origin):
    return None
  table, indices = eqn.invars
  return Match("embedding", eqn, index, index, level.origin[table],
               ids=level.ids_source.get(indices, indices))


def _scale(level: _Level, index: int, eqn: jcore.JaxprEqn) -> Match | None:
  """The scale-and-shift layer whose scale `mul` is `eqn` (shift not yet seen), or None.

  `x_hat * scale` is one if `x_hat` has the output's shape. A product `factor * scale`
  is kept in `level.partial`: if its only use is `centred * (factor * scale)` (flax's
  norms), that `mul` ends the layer instead, with `x_hat = centred * factor`. An x_hat
  computed from parameters alone (e.g. a weight-normed kernel `w * scale`) has no
  examples, so it is no such layer.
  """
  out = eqn.outvars[0]
  for centred, product in (eqn.invars, eqn.invars[::-1]):
    match = level.partial.get(product)
    if (match is not None and level.uses[product] == 1 and centred not in level.last_axis
        and centred.aval.shape == out.aval.shape
        and not {centred, match.x_hat[0]} <= level.fixed):
      return dataclasses.replace(match, last=index, x_hat=(centred, match.x_hat[0]))
  for factor, scale in (eqn.invars, eqn.invars[::-1]):
    source = level.last_axis.get(scale)
    if (source is not None and factor not in level.last_axis and out.aval.ndim >= 2
        and source.aval.shape == (out.aval.shape[-1],)):
      match = Match("scale_and_shift", eqn, index, index, level.origin[source],
                    features=(out.aval.shape[-1],), x_hat=(factor,), scale=source)
      level.partial[out] = match
      complete = factor.aval.shape == out.aval.shape and factor not in level.fixed
      return match if complete else None
  return None


def _split_biases(level: _Level, match: Match, root: jcore.Var, b: jcore.Var) -> Split | None:
  """`match.split` with the biases of a bias `add` of `root`, or None if they do not split.

  Joined biases split along the weight's output axis of the join, part by part; one
  bias parameter joins the first part of a weight joined along an input axis.
  """
  split, in_axes = match.split._replace(bias_casts=level.bias_casts.get(b, ())), match.in_axes
  if root in level.origin:
    return split._replace(biases=(root,) + (None,) * (len(split.parts) - 1)) if (
        split.axis < in_axes) else None
  biases = level.joins.get(root)
  if (biases is None or split.axis < in_axes or biases.axis != split.axis - in_axes
      or biases.stacked != split.stacked or len(biases.parts) != len(split.parts)
      or any(bias.aval.shape != w.aval.shape[in_axes:]
             for w, bias in zip(split.parts, biases.parts))):
    return None
  return split._replace(biases=biases.parts)


def _with_bias(level: _Level, match: Match, root: jcore.Var, b: jcore.Var,
               index: int) -> Match | None:
  """`match` extended by the bias `add` (at `index`) of `b`, a broadcast of `root`."""
  if match.split is not None:
    split = _split_biases(level, match, root, b)
    return None if split is None else dataclasses.replace(match, last=index, bias=root,
                                                          split=split)
  if root not in level.origin:  # a join of biases belongs to a split layer
    return None
  if match.kind == "scale_and_shift" and not (  # a shift lies along the last axis too
      b in level.last_axis and level.origin[level.last_axis[b]] != match.weight):
    return None
  return dataclasses.replace(match, last=index, bias=root)


def _bias(level: _Level, index: int, eqn: jcore.JaxprEqn) -> Match | None:
  """The layer whose output `eqn` adds a bias to, extended by that bias."""
  for y, b in (eqn.invars, eqn.invars[::-1]):
    start, root = level.by_output.get(y), level.bias_source.get(b)
    if start is None or root is None or level.uses[y] != 1:
      continue
    match = level.matches[start]
    if (root.aval.shape == match.features
        and _broadcasts_over_positions(b.aval.shape, match.features)
        and eqn.outvars[0].aval.shape == y.aval.shape
        and (extended := _with_bias(level, match, root, b, index)) is not None):
      return extended
  return None


def _broadcasts_over_positions(shape: tuple[int, ...], features: tuple[int, ...]) -> bool:
  """Whether an array of `shape` is the bias of `features` broadcast over leading axes."""
  return tuple(shape[len(shape) - len(features):]) == features


def _match(level: _Level, index: int, eqn: jcore.JaxprEqn) -> None:
  """Records the layer that `eqn` starts, ends or extends, if any."""
  name, all_vars = eqn.primitive.name, all(_is_var(v) for v in eqn.invars)
  if name == "mul":
    match = _scale(level, index, eqn) if all_vars else None
  elif name == "add":
    match = _bias(level, index, eqn) if all_vars else None
  elif name == "transpose":
    match = _batch_first(level, index, eqn) if all_vars else None
  elif name == "squeeze":
    match = _squeezed(level, index, eqn) if all_vars else None
  else:
    match = (_dense_or_conv(level, index, eqn) or _split_dense(level, index, eqn)
             or _projection(level, index, eqn) or _lookup(level, index, eqn))
    if match is None and name == "dot_general" and len(eqn.invars) == 2:
      _weight_first(level, index, eqn)
    elif match is None:
      _row_slice_lookup(level, index, eqn)
  if match is None:
    return
  level.add(match)
  if name == "mul" or (name != "add" and match.kind in ("dense", *tags.CONV_KINDS)):
    level.by_output[eqn.outvars[0]] = match.start


def _find_layers(jaxpr: jcore.Jaxpr, origin: dict) -> dict[int, Match]:
  """Recognised layers of one jaxpr level, keyed by the index of their last equation."""
  level = _Level.of(jaxpr, origin)
  for index, eqn in enumerate(jaxpr.eqns):
    _track(level, eqn)
    _match(level, index, eqn)
  return {match.last: match for match in level.matches.values()}


# --- tagging ---------------------------------------------------------------------------------


def _tag_eqn(operands: list, output: jcore.Var, kind: str, has_bias: bool,
             conv: tags.ConvParams | None = None, **extra) -> jcore.JaxprEqn:
  """A layer tag equation with the params `tags.register_*` give it."""
  params = dict(kind=kind, approx=None, has_bias=has_bias, conv=conv, **extra)
  return jcore.new_jaxpr_eqn(operands, [jcore.Var(output.aval)], tags.layer_tag_p, params,
                             jcore.no_effects)


def _tag(match: Match, rename: dict, output: jcore.Var) -> list[jcore.JaxprEqn]:
  """The equations that tag a recognised layer, the tag last; its output is a new variable."""
  eqn, before = match.eqn, []
  if match.kind in tags.TIED_EMBEDDING_ROLES:
    first, table = (match.ids, eqn.invars[0]) if match.kind == "embedding" else (
        eqn.invars[0], match.table)
    return [_tag_eqn([output, *(rename.get(v, v) for v in (first, table))], output,
                     kind=match.kind, has_bias=False)]
  if match.kind == "scale_and_shift":
    x, *factor = (rename.get(v, v) for v in match.x_hat)
    w = match.scale
    if factor:  # flax's `centred * (factor * scale)`: x_hat = centred * factor
      before.append(jcore.new_jaxpr_eqn([x, *factor], [jcore.Var(x.aval)], eqn.primitive,
                                        eqn.params, jcore.no_effects))
      x = before[-1].outvars[0]
  else:
    x, w = (rename.get(v, v) for v in eqn.invars[::-1 if match.transposed else 1])
  operands = [output, x, w] + ([] if match.bias is None else [match.bias])
  params = dict(kind=match.kind, has_bias=match.bias is not None)
  if match.kind == "dense":
    params["in_axes"] = match.in_axes
    if match.transposed:
      params["transposed"] = True
  elif match.kind in tags.CONV_KINDS:
    p = eqn.params
    params["conv"] = tags.conv_params(p["window_strides"], p["padding"], p["lhs_dilation"],
                                      p["rhs_dilation"], p["feature_group_count"])
  return before + [_tag_eqn(operands, output, **params)]


def _dense_parts(x: jax.Array, *operands: jax.Array, dot: jcore.JaxprEqn, in_axes: int,
                 split: Split, tagged: tuple[bool, ...], tag_bias: tuple[bool, ...]
                 ) -> jax.Array:
  """`dot(x, join(parts)) + join(biases)` computed part by part, each part that `tagged`
  says tagged as a dense layer (with its bias where `tag_bias` says so).

  A join along an output axis concatenates the parts' outputs; along an input axis, each
  part takes its slice of `x` and the outputs are summed.
  """
  num = len(split.parts)
  weights, rest = operands[:num], iter(operands[num:])
  biases = [None if b is None else next(rest) for b in split.biases or (None,) * num]
  params = dot.primitive.get_bind_params(dot.params)
  batch_ndim, offset, outs = x.ndim - in_axes, 0, []
  for i, (w, b) in enumerate(zip(weights, biases)):
    w, xi, k = functools.reduce(lax.convert_element_type, split.casts, w), x, in_axes
    if split.axis < in_axes and split.stacked:
      xi, k = lax.index_in_dim(x, i, batch_ndim + split.axis, keepdims=False), in_axes - 1
    elif split.axis < in_axes:
      size = w.shape[split.axis]
      xi, offset = lax.slice_in_dim(x, offset, offset + size, axis=batch_ndim + split.axis), (
          offset + size)
    contract = (tuple(range(xi.ndim - k, xi.ndim)), tuple(range(k)))
    y = dot.primitive.bind(xi, w, **{**params, "dimension_numbers": (contract, ((), ()))})
    if b is not None:
      cast = functools.reduce(lax.convert_element_type, split.bias_casts, b)
      y = lax.add(y, lax.broadcast_in_dim(cast, y.shape, tuple(range(y.ndim - b.ndim, y.ndim))))
    if tagged[i]:
      y = tags.register_dense(y, xi, w, b if tag_bias[i] else None, in_axes=k)
    outs.append(y)
  if split.axis < in_axes:
    return functools.reduce(lax.add, outs)
  axis = batch_ndim + split.axis - in_axes
  return lax.concatenate([lax.expand_dims(y, (axis,)) if split.stacked else y for y in outs],
                         axis)


def _inline(fn: Callable[..., jax.Array], args: list[jcore.Var],
            output: jcore.Var) -> list[jcore.JaxprEqn]:
  """The equations of `fn` traced on the variables `args`, the last defining `output`."""
  closed = jax.make_jaxpr(fn)(*(jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype,
                                                     weak_type=v.aval.weak_type) for v in args))
  (result,) = closed.jaxpr.outvars
  assert not closed.consts and (result.aval.shape, result.aval.dtype) == (
      output.aval.shape, output.aval.dtype), (result.aval, output.aval)
  env = {**dict(zip(closed.jaxpr.invars, args)), result: output}
  return [eqn.replace(invars=[env[v] if _is_var(v) else v for v in eqn.invars],
                      outvars=[env.setdefault(v, jcore.Var(v.aval)) for v in eqn.outvars])
          for eqn in closed.jaxpr.eqns]


def _split_eqns(match: Match, rename: dict, origin: dict, untagged: set, found: dict,
                output: jcore.Var) -> list[jcore.JaxprEqn]:
  """A split dense layer's equations, replacing its `dot_general` and bias `add`: one
  `dot_general` and tag per part whose weight is not `untagged`, joined into `output`.
  Biases in `untagged` are added but left out of the tags."""
  split = match.split
  biases = split.biases or (None,) * len(split.parts)
  tagged = tuple(w not in untagged for w in split.weights)
  tag_bias = tuple(b is not None and origin[b] not in untagged for b in biases)
  for weight, part, bias, tag, with_bias in zip(split.weights, split.parts, biases, tagged,
                                                tag_bias):
    if tag:
      found[weight].append(("dense", origin[bias] if with_bias else None, part.aval.shape))
  fn = functools.partial(_dense_parts, dot=match.eqn, in_axes=match.in_axes, split=split,
                         tagged=tagged, tag_bias=tag_bias)
  x = rename.get(match.eqn.invars[0], match.eqn.invars[0])
  return _inline(fn, [x, *split.parts, *(b for b in biases if b is not None)], output)


def _keep(match: Match, claimed: set, untied: frozenset) -> bool:
  """Whether a match is tagged: its weight (a split layer: one of its parts') is not
  claimed, and an output projection's table is no untied weight."""
  if match.split is not None:
    return any(w not in claimed for w in match.split.weights)
  return match.weight not in claimed and not (match.kind == "embedding_projection"
                                              and match.weight in untied)


def _rewrite(jaxpr: jcore.Jaxpr, origin: dict, claimed: set, dropped_biases: set,
             found: collections.defaultdict, untied: frozenset = frozenset()) -> jcore.Jaxpr:
  """`jaxpr` with a tag after each recognised layer whose weight is not `claimed`.

  Biases in `dropped_biases` are left out of the tags, and so are the output projections
  of the weights in `untied`. Records in `found[weight]` each layer's
  `(kind, bias, weight shape)`, to find weights that cannot be tagged.
  """
  origin = dict(origin)
  matches = {last: match for last, match in _find_layers(jaxpr, dict(origin)).items()
             if _keep(match, claimed, untied)}
  replaced = {i for m in matches.values() if m.split is not None for i in (m.start, m.last)}
  rename: dict = {}
  eqns = []
  for index, eqn in enumerate(jaxpr.eqns):
    if rename:
      eqn = eqn.replace(invars=[rename.get(v, v) if _is_var(v) else v for v in eqn.invars])
    track_parameters(eqn, origin)
    eqn = _rewrite_inner(eqn, origin, claimed, dropped_biases, found, untied)
    match = matches.get(index)
    if index in replaced:
      if match is not None:
        eqns += _split_eqns(match, rename, origin, claimed | dropped_biases, found,
                            eqn.outvars[0])
      continue
    eqns.append(eqn)
    if match is not None:
      if match.bias is not None and origin[match.bias] in claimed | dropped_biases:
        match = dataclasses.replace(match, bias=None)
      tagging = _tag(match, rename, eqn.outvars[0])
      bias = None if match.bias is None else origin[match.bias]
      kind = match.kind + ("_transposed" if match.transposed else "")
      found[match.weight].append((kind, bias, tagging[-1].invars[2].aval.shape))
      rename[eqn.outvars[0]] = tagging[-1].outvars[0]
      eqns += tagging
  if not rename and all(a is b for a, b in zip(eqns, jaxpr.eqns)) and len(eqns) == len(
      jaxpr.eqns):
    return jaxpr
  outvars = [rename.get(v, v) if _is_var(v) else v for v in jaxpr.outvars]
  return jaxpr.replace(eqns=eqns, outvars=outvars)


def _rewrite_inner(eqn: jcore.JaxprEqn, origin: dict, claimed: set, dropped_biases: set,
                   found: collections.defaultdict, untied: frozenset) -> jcore.JaxprEqn:
  """A call-like or scan equation with its sub-jaxpr rewritten; other equations as they are."""
  if (call := call_jaxpr(eqn)) is None:
    return eqn
  name, sub, inner = call
  new_inner = _rewrite(inner, inner_origin(eqn, inner, origin), claimed, dropped_biases, found,
                       untied)
  if new_inner is inner:
    return eqn
  new_sub = (jcore.ClosedJaxpr(new_inner, sub.consts) if isinstance(sub, jcore.ClosedJaxpr)
             else new_inner)
  return eqn.replace(params={**eqn.params, name: new_sub})


def _parameter_uses(jaxpr: jcore.Jaxpr, origin: dict, uses: collections.Counter) -> None:
  """Counts, at every level, the equations that use each params leaf (casts and calls aside,
  and dead equations, whose outputs nothing uses: `nn.scan` leaves some)."""
  origin = dict(origin)
  used = {v for eqn in jaxpr.eqns for v in eqn.invars if _is_var(v)}
  used.update(v for v in jaxpr.outvars if _is_var(v))
  for eqn in jaxpr.eqns:
    if not eqn.effects and not any(v in used for v in eqn.outvars):
      continue
    if (call := call_jaxpr(eqn)) is not None:
      _parameter_uses(call[2], inner_origin(eqn, call[2], origin), uses)
    elif eqn.primitive.name in TRANSPARENT_PRIMITIVES:
      track_parameters(eqn, origin)
    else:
      uses.update({origin[v] for v in eqn.invars if _is_var(v) and v in origin})


def _untaggable(found: dict, uses: collections.Counter
                ) -> tuple[set[int], set[int], frozenset[int]]:
  """Weights whose recognised layers cannot form one (multi-use) layer, biases shared by
  several weights, and weights whose output projections are no tied embedding's.

  The layers of one weight must agree on kind, bias and weight shape (a scan over
  stacked layers slices it), except that an embedding table's lookups and output
  projections make one tied layer; an embedding table must have no use besides those,
  and a projection needs lookups of its table.
  """
  untied = frozenset(weight for weight, records in found.items()
                     if all(kind != "embedding" for kind, _, _ in records)
                     and any(kind == "embedding_projection" for kind, _, _ in records))
  found = {weight: [r for r in records if weight not in untied or r[0] != "embedding_projection"]
           for weight, records in found.items()}
  found = {weight: records for weight, records in found.items() if records}

  def disagree(records: list) -> bool:
    kinds = {kind for kind, _, _ in records}
    if kinds <= tags.TIED_EMBEDDING_ROLES:
      return len({record[1:] for record in records}) > 1
    return len(set(records)) > 1

  weights = {weight for weight, records in found.items()
             if disagree(records)
             or (records[0][0] in tags.TIED_EMBEDDING_ROLES
                 and uses[weight] != len(records))}
  owners = collections.defaultdict(set)
  for weight, records in found.items():
    for _, bias, _ in records:
      if bias is not None:
        owners[bias].add(weight)
  return weights, {bias for bias, ws in owners.items() if len(ws) > 1}, untied


def register_layers(closed: jcore.ClosedJaxpr, num_params: int,
                    claimed: set[int]) -> jcore.ClosedJaxpr:
  """Tags the untagged dense, conv, embedding and scale-and-shift layers of `loss_fn`'s jaxpr.

  The first `num_params` inputs of `closed` are the `params` leaves; `claimed` holds
  the indices of leaves already in a hand tag. A weight used by several layers of
  the same kind is tagged at every use (the tracer makes it one multi-use layer).
  """
  origin = {v: i for i, v in enumerate(closed.jaxpr.invars[:num_params])}
  uses: collections.Counter = collections.Counter()
  _parameter_uses(closed.jaxpr, origin, uses)
  found: collections.defaultdict = collections.defaultdict(list)
  jaxpr = _rewrite(closed.jaxpr, origin, set(claimed), set(), found)
  weights, biases, untied = _untaggable(found, uses)
  if weights or biases or untied:
    jaxpr = _rewrite(closed.jaxpr, origin, set(claimed) | weights, biases,
                     collections.defaultdict(list), untied)
  return jcore.ClosedJaxpr(jaxpr, closed.consts)
