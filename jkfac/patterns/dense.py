"""Dense and conv layers: a parameter weight (or a join of parameters) contracted with
inputs that carry examples; `w @ x` as `vmap` batches it; a tied output projection
`x @ table.T`."""

from __future__ import annotations

import collections
import dataclasses

from jax.extend import core as jcore

from jkfac.jaxprs import is_var
from jkfac.patterns.records import Level, Match
from jkfac.patterns.tracking import has_examples


def _channels_last(ndim: int) -> tuple[tuple[int, ...], ...]:
  """Dimension numbers of a channels-last conv (NWC/WIO, NHWC/HWIO, NDHWC/DHWIO)."""
  spatial = tuple(range(1, ndim - 1))
  return (0, ndim - 1) + spatial, (ndim - 1, ndim - 2) + tuple(range(ndim - 2)), (
      0, ndim - 1) + spatial


def _dense_in_axes(eqn: jcore.JaxprEqn, w_ndim: int) -> int | None:
  """`k` if the `dot_general` contracts the trailing `k` axes of its input (which has a
  batch axis besides) with the leading `k` of an N-D weight, in order, with no batch
  dimensions. The pairs of contracted axes may come in any order (`jnp.einsum` permutes
  them); the input's `i`-th trailing axis must pair with the weight's `i`-th, so that both
  flatten to the same matrix row."""
  (contract_x, contract_w), (batch_x, batch_w) = eqn.params["dimension_numbers"]
  x_ndim, k = eqn.invars[0].aval.ndim, len(contract_w)
  if batch_x or batch_w or not 0 < k < w_ndim or x_ndim <= k:
    return None
  if sorted(zip(contract_x, contract_w)) != list(zip(range(x_ndim - k, x_ndim), range(k))):
    return None
  return k


def _channels_first(ndim: int) -> tuple[tuple[int, ...], ...]:
  """Dimension numbers of a channels-first conv (NCW/OIW, NCHW/OIHW, NCDHW/OIDHW)."""
  return (tuple(range(ndim)),) * 3


def _layer_kind(eqn: jcore.JaxprEqn, origin: dict) -> tuple[str, int, bool] | None:
  """`(kind, in_axes, channels_first)` if `eqn` is a dense (or `DenseGeneral`, in_axes >
  1) or conv layer (channels-last, or channels-first as Equinox's) with a parameter as its
  weights."""
  if len(eqn.invars) != 2 or not is_var(eqn.invars[1]) or eqn.invars[1] not in origin:
    return None
  w_ndim = eqn.invars[1].aval.ndim  # a parameter, or its slice in a scan over layers
  if eqn.primitive.name == "dot_general":
    in_axes = _dense_in_axes(eqn, w_ndim)
    return None if in_axes is None else ("dense", in_axes, False)
  if (eqn.primitive.name == "conv_general_dilated" and 3 <= w_ndim <= 5
      and eqn.params["batch_group_count"] == 1):
    dn = eqn.params["dimension_numbers"]
    specs = (tuple(dn.lhs_spec), tuple(dn.rhs_spec), tuple(dn.out_spec))
    if specs in (_channels_last(w_ndim), _channels_first(w_ndim)):
      return f"conv{w_ndim - 2}d", 1, specs == _channels_first(w_ndim)
  return None


def _projection_table(eqn: jcore.JaxprEqn, origin: dict, transposed: dict,
                      uses: collections.Counter) -> jcore.Var | None:
  """The 2-D parameter `table` if `eqn` is `x @ table.T`: a `dot_general` contracting the
  last axis of `x` with axis 1 of `table`, or axis 0 of its `transpose` used there alone."""
  if (eqn.primitive.name != "dot_general" or len(eqn.invars) != 2
      or not all(is_var(v) for v in eqn.invars)):
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


def dense_or_conv(level: Level, index: int, eqn: jcore.JaxprEqn) -> Match | None:
  """A dense or conv layer whose weight is a parameter."""
  found = _layer_kind(eqn, level.origin)
  if found is None or not has_examples(level, eqn.invars[0]):
    return None
  kind, in_axes, channels_first = found
  w_shape = eqn.invars[1].aval.shape
  features = (tuple(w_shape[in_axes:]) if kind == "dense"
              else (w_shape[0],) if channels_first else (w_shape[-1],))
  if channels_first:  # OIHW weight, NCHW output: its bias comes along `level.carries`
    level.carries[eqn.outvars[0]] = (index, 1, features)
  return Match(kind, eqn, index, index, level.origin[eqn.invars[1]], in_axes=in_axes,
               features=features, transposed=channels_first,
               feature_axis=1 if channels_first else None)


def split_dense(level: Level, index: int, eqn: jcore.JaxprEqn) -> Match | None:
  """A dense layer whose weight is a join of parameters. A `stack` along the only input
  axis would leave parts without one: no layer."""
  if eqn.primitive.name != "dot_general" or len(eqn.invars) != 2:
    return None
  x, w = eqn.invars
  split = level.joins.get(w) if is_var(w) else None
  if split is None or not is_var(x) or x in level.fixed:
    return None
  in_axes = _dense_in_axes(eqn, w.aval.ndim)
  if in_axes is None or (split.stacked and split.axis < in_axes == 1):
    return None
  return Match("dense", eqn, index, index, None, in_axes=in_axes,
               features=tuple(w.aval.shape[in_axes:]), split=split)


def weight_first(level: Level, index: int, eqn: jcore.JaxprEqn) -> None:
  """Notes a dense `w @ x` (a `(out, in)` weight first, examples on `x`'s leading axes,
  as `vmap` batches Equinox's `Linear`): it ends at the transpose that moves its output's
  `out` axis last (`batch_first`), or else is tagged in place (`matching.find_layers`),
  its bias found along `level.carries` (`w_ih @ x + w_hh @ h + b` in a recurrent cell)."""
  w, x = eqn.invars
  if not (is_var(w) and w in level.origin and w.aval.ndim == 2 and is_var(x)
          and x.aval.ndim >= 2 and has_examples(level, x)):
    return
  if eqn.params["dimension_numbers"] == (((1,), (x.aval.ndim - 1,)), ((), ())):
    level.weight_first[eqn.outvars[0]] = Match(
        "dense", eqn, index, index, level.origin[w], features=(w.aval.shape[0],),
        transposed=True)
    level.carries[eqn.outvars[0]] = (index, 0, (w.aval.shape[0],))


def batch_first(level: Level, index: int, eqn: jcore.JaxprEqn) -> Match | None:
  """The `w @ x` layer whose `(out, *batch)` output `eqn` transposes to `(*batch, out)`."""
  match = level.weight_first.get(eqn.invars[0])
  ndim = eqn.outvars[0].aval.ndim
  if (match is None or level.uses[eqn.invars[0]] != 1
      or tuple(eqn.params["permutation"]) != (*range(1, ndim), 0)):
    return None
  return dataclasses.replace(match, last=index)


def projection(level: Level, index: int, eqn: jcore.JaxprEqn) -> Match | None:
  """A tied embedding's output projection `x @ table.T`; without lookups of the table, a
  dense layer with a weight `(out, in)` (`register.register_layers` decides)."""
  table = _projection_table(eqn, level.origin, level.transposed, level.uses)
  if table is None or not has_examples(level, eqn.invars[0]):
    return None
  return Match("embedding_projection", eqn, index, index, level.origin[table], table=table,
               features=(table.aval.shape[0],))
