"""Automatic registration: tags untagged dense, conv, embedding and norm layers in a jaxpr.

A layer is recognised by its structure, not by module names, so it survives
`jit`, `remat` and dtype promotion: a `dot_general` that contracts the last axis of
its input with the first axis of a 2-D parameter (a dense layer), or an NHWC/HWIO
(or 1-D NWC/WIO) `conv_general_dilated` with a parameter kernel, optionally followed by
the `add` of a 1-D parameter broadcast over the output (the bias). An embedding is a
`gather` of whole rows of a 2-D parameter at integer indices (what
`jnp.take(table, ids, axis=0)` and `flax.linen.Embed` emit). A parameter is one of the
`params` leaves, seen through casts and copies.

A scale-and-shift layer `y = x_hat * scale + shift` is a `mul` by a 1-D parameter laid
along the last axis (reshaped to `(1, ..., 1, d)` or broadcast there), optionally
followed by the `add` of another such parameter. Flax's norms (linen and nnx
`LayerNorm`, `BatchNorm` in train and eval mode, `GroupNorm`, `RMSNorm`) compute
`(x - mean) * (rsqrt(var + eps) * scale)`, so x_hat is no variable of theirs: the tag is
preceded by an equation `x_hat = (x - mean) * rsqrt(var + eps)` that only the tag uses
(XLA drops it from the plain gradient pass). Not recognised, so generic: a shift without
a scale (`use_scale=False`), and norms over another axis than the last (e.g.
`BatchNorm(axis=1)` on NCHW).

`register_layers` returns the jaxpr with a layer tag after each recognised layer, so
the tracer treats it exactly like a hand-tagged one. Parameters in a hand tag (or in
`register_generic`) win, and a weight (or scale) used by several layers is left
untagged. An embedding table counts once per equation that uses it anywhere, so a table
tied to an output projection (`x @ table.T`) stays untagged too.
"""

from __future__ import annotations

import collections

import jax.numpy as jnp
from jax.extend import core as jcore

from jkfac import tags
from jkfac.jaxprs import (TRANSPARENT_PRIMITIVES, call_jaxpr, inner_origin, is_var as _is_var,
                          track_parameters)

_BROADCASTS = frozenset({"reshape", "broadcast_in_dim", "convert_element_type", "copy"})
# Dimension numbers of NWC/WIO and NHWC/HWIO convolutions, by kernel rank.
_CHANNELS_LAST = {3: ((0, 2, 1), (2, 1, 0), (0, 2, 1)),
                  4: ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))}


def _layer_kind(eqn: jcore.JaxprEqn, origin: dict, shapes: list) -> str | None:
  """'dense' or 'conv2d' if `eqn` is such a layer with a parameter as its weights."""
  if len(eqn.invars) != 2 or not _is_var(eqn.invars[1]) or eqn.invars[1] not in origin:
    return None
  x, w = eqn.invars
  ndim = len(shapes[origin[w]])
  if eqn.primitive.name == "dot_general" and ndim == 2:
    (contract_x, contract_w), (batch_x, batch_w) = eqn.params["dimension_numbers"]
    if (tuple(contract_x) == (x.aval.ndim - 1,) and tuple(contract_w) == (0,)
        and not batch_x and not batch_w and x.aval.ndim >= 2):
      return "dense"
  if eqn.primitive.name == "conv_general_dilated" and ndim in _CHANNELS_LAST:
    dn = eqn.params["dimension_numbers"]
    if ((tuple(dn.lhs_spec), tuple(dn.rhs_spec), tuple(dn.out_spec)) == _CHANNELS_LAST[ndim]
        and eqn.params["feature_group_count"] == 1 and eqn.params["batch_group_count"] == 1):
      return f"conv{ndim - 2}d"
  return None


def _is_row_lookup(eqn: jcore.JaxprEqn, origin: dict, shapes: list) -> bool:
  """Whether `eqn` gathers whole rows of a 2-D parameter at integer indices `(..., 1)`."""
  if eqn.primitive.name != "gather" or not all(_is_var(v) for v in eqn.invars):
    return False
  table, indices = eqn.invars
  if table not in origin or len(shapes[origin[table]]) != 2:
    return False
  dn, idx = eqn.params["dimension_numbers"], indices.aval
  return (jnp.issubdtype(idx.dtype, jnp.integer) and idx.ndim >= 1 and idx.shape[-1] == 1
          and tuple(dn.offset_dims) == (idx.ndim - 1,) and tuple(dn.collapsed_slice_dims) == (0,)
          and tuple(dn.start_index_map) == (0,)
          and not tuple(getattr(dn, "operand_batching_dims", ()))
          and tuple(eqn.params["slice_sizes"]) == (1, table.aval.shape[1]))


def _last_axis_source(eqn: jcore.JaxprEqn, origin: dict, shapes: list,
                      last_axis: dict) -> jcore.Var | None:
  """The 1-D parameter that `eqn` lays along the last axis of its output, if any: a cast,
  a `reshape` to `(1, ..., 1, d)`, or a `broadcast_in_dim` that keeps it last."""
  first = eqn.invars[0] if eqn.invars and _is_var(eqn.invars[0]) else None
  source = last_axis.get(first)
  if source is None and first in origin and len(shapes[origin[first]]) == 1:
    source = first
  if source is None or eqn.primitive.name not in _BROADCASTS:
    return None
  (d,), out = shapes[origin[source]], eqn.outvars[0].aval.shape
  if eqn.primitive.name == "reshape":
    return source if out == (1,) * (len(out) - 1) + (d,) else None
  if eqn.primitive.name == "broadcast_in_dim":
    dims = eqn.params["broadcast_dimensions"]
    return source if out[-1] == d and dims and dims[-1] == len(out) - 1 else None
  return source


def _scale_layer(eqn: jcore.JaxprEqn, index: int, origin: dict, shapes: list, last_axis: dict,
                 partial: dict, uses: collections.Counter, fixed: set) -> dict | None:
  """The scale-and-shift layer whose scale `mul` is `eqn` (shift not yet seen), or None.

  `x_hat * scale` is one if `x_hat` has the output's shape. A product `factor * scale`
  is kept in `partial`: if its only use is `centred * (factor * scale)` (flax's norms),
  that `mul` ends the layer instead, with `x_hat = centred * factor`. An x_hat computed
  from parameters alone (`fixed`, e.g. a weight-normed kernel `w * scale`) has no
  examples, so it is no such layer.
  """
  out = eqn.outvars[0]
  for centred, product in (eqn.invars, eqn.invars[::-1]):
    layer = partial.get(product)
    if (layer is not None and uses[product] == 1 and centred not in last_axis
        and centred.aval.shape == out.aval.shape
        and not {centred, layer["x_hat"][0]} <= fixed):
      layer.update(last=index, x_hat=(centred, layer["x_hat"][0]))
      return layer
  for factor, scale in (eqn.invars, eqn.invars[::-1]):
    if (scale in last_axis and factor not in last_axis and out.aval.ndim >= 2
        and shapes[origin[last_axis[scale]]] == (out.aval.shape[-1],)):
      layer = dict(kind="scale_and_shift", eqn=eqn, last=index, bias=None,
                   weight=origin[last_axis[scale]], scale=last_axis[scale], x_hat=(factor,))
      partial[out] = layer
      return layer if factor.aval.shape == out.aval.shape and factor not in fixed else None
  return None


def _find_layers(jaxpr: jcore.Jaxpr, origin: dict, shapes: list) -> dict[int, dict]:
  """Recognised layers of one jaxpr level, keyed by the index of their last equation."""
  uses = collections.Counter(v for eqn in jaxpr.eqns for v in eqn.invars if _is_var(v))
  uses.update(v for v in jaxpr.outvars if _is_var(v))
  bias_source: dict = {}  # var -> the 1-D parameter var it broadcasts
  ids_source: dict = {}  # gather indices `(..., 1)` -> the ids `(...)` they were reshaped from
  last_axis: dict = {}  # var -> the 1-D parameter var it lays along its last axis
  partial: dict = {}  # `factor * scale` -> its scale-and-shift layer, maybe not yet complete
  fixed = set(origin)  # parameters and the variables computed from them alone
  layers, by_output = [], {}
  for index, eqn in enumerate(jaxpr.eqns):
    first = eqn.invars[0] if eqn.invars and _is_var(eqn.invars[0]) else None
    track_parameters(eqn, origin)
    operands = [v for v in eqn.invars if _is_var(v)]
    if operands and all(v in fixed for v in operands):
      fixed.update(eqn.outvars)
    if (source := _last_axis_source(eqn, origin, shapes, last_axis)) is not None:
      last_axis[eqn.outvars[0]] = source
    if eqn.primitive.name in _BROADCASTS and (
        first in bias_source or (first in origin and len(shapes[origin[first]]) == 1)):
      bias_source[eqn.outvars[0]] = bias_source.get(first, first)
    if (eqn.primitive.name in ("broadcast_in_dim", "reshape") and first is not None
        and eqn.outvars[0].aval.shape == first.aval.shape + (1,)):
      ids_source[eqn.outvars[0]] = first
    kind = _layer_kind(eqn, origin, shapes)
    if kind is not None:
      layer = dict(kind=kind, eqn=eqn, last=index, bias=None, weight=origin[eqn.invars[1]])
      layers.append(layer)
      by_output[eqn.outvars[0]] = layer
    elif _is_row_lookup(eqn, origin, shapes):  # no bias: a later add is not the lookup's
      table, indices = eqn.invars
      layers.append(dict(kind="embedding", eqn=eqn, last=index, bias=None, weight=origin[table],
                         ids=ids_source.get(indices, indices)))
    elif eqn.primitive.name == "mul" and all(_is_var(v) for v in eqn.invars):
      layer = _scale_layer(eqn, index, origin, shapes, last_axis, partial, uses, fixed)
      if layer is not None:
        if not any(layer is other for other in layers):  # else it moved to this `mul`
          layers.append(layer)
        by_output[eqn.outvars[0]] = layer
    elif eqn.primitive.name == "add" and all(_is_var(v) for v in eqn.invars):
      for y, b in (eqn.invars, eqn.invars[::-1]):
        layer = by_output.get(y)
        if (layer is not None and uses[y] == 1 and b in bias_source
            and shapes[origin[bias_source[b]]] == (y.aval.shape[-1],)
            and eqn.outvars[0].aval.shape == y.aval.shape
            and (layer["kind"] != "scale_and_shift"   # a shift lies along the last axis too
                 or (b in last_axis and origin[last_axis[b]] != layer["weight"]))):
          layer.update(last=index, bias=bias_source[b])
          break
  return {layer["last"]: layer for layer in layers}


def _tag(layer: dict, rename: dict, output: jcore.Var, origin: dict,
         claimed: set) -> list[jcore.JaxprEqn]:
  """The equations that tag a recognised layer, the tag last; its output is a new variable."""
  eqn, before = layer["eqn"], []
  if layer["kind"] == "embedding":
    ids, table = (rename.get(v, v) for v in (layer["ids"], eqn.invars[0]))
    return [jcore.new_jaxpr_eqn([output, ids, table], [jcore.Var(output.aval)], tags.layer_tag_p,
                                dict(kind="embedding", approx=None, has_bias=False, conv=None),
                                jcore.no_effects)]
  if layer["kind"] == "scale_and_shift":
    x, *factor = (rename.get(v, v) for v in layer["x_hat"])
    w = layer["scale"]
    if factor:  # flax's `centred * (factor * scale)`: x_hat = centred * factor
      before.append(jcore.new_jaxpr_eqn([x, *factor], [jcore.Var(x.aval)], eqn.primitive,
                                        eqn.params, jcore.no_effects))
      x = before[-1].outvars[0]
  else:
    x, w = (rename.get(v, v) for v in eqn.invars)
  bias = layer["bias"] if layer["bias"] is not None and origin[layer["bias"]] not in claimed \
      else None
  conv = None
  if layer["kind"] in ("conv1d", "conv2d"):
    p = eqn.params
    conv = tags.conv_params_2d(p["window_strides"], p["padding"], p["lhs_dilation"],
                               p["rhs_dilation"])
  operands = [output, x, w] + ([] if bias is None else [bias])
  params = dict(kind=layer["kind"], approx=None, has_bias=bias is not None, conv=conv)
  return before + [jcore.new_jaxpr_eqn(operands, [jcore.Var(output.aval)], tags.layer_tag_p,
                                       params, jcore.no_effects)]


def _rewrite(jaxpr: jcore.Jaxpr, origin: dict, shapes: list, claimed: set,
             tagged: collections.Counter, uses: collections.Counter) -> jcore.Jaxpr:
  """`jaxpr` with a tag after each recognised layer whose weight is not `claimed`.

  Counts in `tagged` the layers of each weight; an embedding counts its table's `uses`.
  """
  origin = dict(origin)
  layers = {last: layer for last, layer in _find_layers(jaxpr, dict(origin), shapes).items()
            if layer["weight"] not in claimed}
  rename: dict = {}
  eqns = []
  for index, eqn in enumerate(jaxpr.eqns):
    if rename:
      eqn = eqn.replace(invars=[rename.get(v, v) if _is_var(v) else v for v in eqn.invars])
    track_parameters(eqn, origin)
    if (call := call_jaxpr(eqn)) is not None:
      name, sub, inner = call
      new_inner = _rewrite(inner, inner_origin(eqn, inner, origin), shapes, claimed, tagged,
                           uses)
      if new_inner is not inner:
        new_sub = (jcore.ClosedJaxpr(new_inner, sub.consts)
                   if isinstance(sub, jcore.ClosedJaxpr) else new_inner)
        eqn = eqn.replace(params={**eqn.params, name: new_sub})
    eqns.append(eqn)
    if index in layers:
      tagging = _tag(layers[index], rename, eqn.outvars[0], origin, claimed)
      weight = layers[index]["weight"]
      tagged[weight] += uses[weight] if layers[index]["kind"] == "embedding" else 1
      if layers[index]["bias"] is not None:  # a bias shared by layers is counted too
        tagged[origin[layers[index]["bias"]]] += 1
      rename[eqn.outvars[0]] = tagging[-1].outvars[0]
      eqns += tagging
  if not rename and all(a is b for a, b in zip(eqns, jaxpr.eqns)):
    return jaxpr
  outvars = [rename.get(v, v) if _is_var(v) else v for v in jaxpr.outvars]
  return jaxpr.replace(eqns=eqns, outvars=outvars)


def _parameter_uses(jaxpr: jcore.Jaxpr, origin: dict, uses: collections.Counter) -> None:
  """Counts, at every level, the equations that use each params leaf (casts and calls aside)."""
  origin = dict(origin)
  for eqn in jaxpr.eqns:
    if (call := call_jaxpr(eqn)) is not None:
      _parameter_uses(call[2], inner_origin(eqn, call[2], origin), uses)
    elif eqn.primitive.name in TRANSPARENT_PRIMITIVES:
      track_parameters(eqn, origin)
    else:
      uses.update({origin[v] for v in eqn.invars if _is_var(v) and v in origin})


def register_layers(closed: jcore.ClosedJaxpr, num_params: int,
                    claimed: set[int]) -> jcore.ClosedJaxpr:
  """Tags the untagged dense, conv, embedding and scale-and-shift layers of `loss_fn`'s jaxpr.

  The first `num_params` inputs of `closed` are the `params` leaves; `claimed` holds
  the indices of leaves already in a hand tag.
  """
  shapes = [tuple(v.aval.shape) for v in closed.jaxpr.invars[:num_params]]
  origin = {v: i for i, v in enumerate(closed.jaxpr.invars[:num_params])}
  tagged: collections.Counter = collections.Counter()
  uses: collections.Counter = collections.Counter()
  _parameter_uses(closed.jaxpr, origin, uses)
  jaxpr = _rewrite(closed.jaxpr, origin, shapes, set(claimed), tagged, uses)
  shared = {weight for weight, count in tagged.items() if count > 1}
  if shared:  # weights used by several layers stay untagged
    jaxpr = _rewrite(closed.jaxpr, origin, shapes, set(claimed) | shared,
                     collections.Counter(), uses)
  return jcore.ClosedJaxpr(jaxpr, closed.consts)
