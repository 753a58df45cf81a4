"""Automatic registration: tags untagged dense, conv, embedding and norm layers in a jaxpr.

A layer is recognised by its structure, not by module names, so it survives
`jit`, `remat`, `scan` and dtype promotion: a `dot_general` that contracts the last axis of
its input with the first axis of a 2-D parameter (a dense layer), or its trailing `k`
axes with the leading `k` of an N-D parameter without batch dimensions
(`DenseGeneral`), or a channels-last `conv_general_dilated` (NWC/WIO, NHWC/HWIO,
NDHWC/DHWIO, any `feature_group_count`) with a parameter kernel, optionally followed
by the `add` of a parameter of the output's feature shape broadcast over the output
(the bias). An embedding is a `gather` of whole rows of a 2-D parameter at integer
indices (what `jnp.take(table, ids, axis=0)` and `flax.linen.Embed` emit). A
parameter is one of the `params` leaves, seen through casts and copies.

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
the tracer treats it exactly like a hand-tagged one. Layers inside `scan` bodies are
found too: the body's parameter is then a parameter (a scan over time) or a slice of
a stacked one (`nn.scan` over layers). Parameters in a hand tag (or in
`register_generic`) win. A weight used by several layers of one kind is tagged at each
use, and the tracer makes one multi-use layer of them; weights whose uses disagree
(kind, bias, shape) stay untagged, as does an embedding table with any use besides its
lookups (see below).

A tied embedding's output projection `logits = x @ table.T` (`flax.linen.Embed.attend`)
is a `dot_general` that contracts the last axis of `x` with axis 1 of a 2-D parameter
without batch dimensions, or axis 0 of its `transpose` (used by that `dot_general`
alone). It is tagged "embedding_projection" when the same table has lookups and no
other use; the tracer makes them one "tied_embedding" layer. A projection of a weight
without lookups (e.g. a linear layer stored as `(d_out, d_in)`) stays untagged.
"""

from __future__ import annotations

import collections

import jax.numpy as jnp
from jax.extend import core as jcore

from jkfac import tags
from jkfac.jaxprs import (TRANSPARENT_PRIMITIVES, call_jaxpr, inner_origin, is_var as _is_var,
                          track_parameters)

_BROADCASTS = frozenset({"reshape", "broadcast_in_dim", "convert_element_type", "copy"})


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
  """The 2-D parameter `table` if `eqn` is `x @ table.T` (see the module docstring)."""
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


def _scale_layer(eqn: jcore.JaxprEqn, index: int, origin: dict, last_axis: dict, partial: dict,
                 uses: collections.Counter, fixed: set) -> dict | None:
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
        and last_axis[scale].aval.shape == (out.aval.shape[-1],)):
      layer = dict(kind="scale_and_shift", eqn=eqn, last=index, bias=None,
                   weight=origin[last_axis[scale]], scale=last_axis[scale], x_hat=(factor,),
                   features=(out.aval.shape[-1],))
      partial[out] = layer
      return layer if factor.aval.shape == out.aval.shape and factor not in fixed else None
  return None


def _find_layers(jaxpr: jcore.Jaxpr, origin: dict) -> dict[int, dict]:
  """Recognised layers of one jaxpr level, keyed by the index of their last equation."""
  uses = collections.Counter(v for eqn in jaxpr.eqns for v in eqn.invars if _is_var(v))
  uses.update(v for v in jaxpr.outvars if _is_var(v))
  bias_source: dict = {}  # var -> the 1-D parameter var it broadcasts
  ids_source: dict = {}  # gather indices `(..., 1)` -> the ids `(...)` they were reshaped from
  layers, by_output = [], {}
  last_axis: dict = {}  # var -> the 1-D parameter var it lays along its last axis
  partial: dict = {}  # `factor * scale` -> its scale-and-shift layer, maybe not yet complete
  fixed = set(origin)  # parameters and the variables computed from them alone
  transposed: dict = {}  # `table.T` -> the 2-D parameter var `table`
  for index, eqn in enumerate(jaxpr.eqns):
    first = eqn.invars[0] if eqn.invars and _is_var(eqn.invars[0]) else None
    track_parameters(eqn, origin)
    operands = [v for v in eqn.invars if _is_var(v)]
    if operands and all(v in fixed for v in operands):
      fixed.update(eqn.outvars)
    if (source := _last_axis_source(eqn, origin, last_axis)) is not None:
      last_axis[eqn.outvars[0]] = source
    if eqn.primitive.name in _BROADCASTS and (first in bias_source or first in origin):
      bias_source[eqn.outvars[0]] = bias_source.get(first, first)
    if (eqn.primitive.name in ("broadcast_in_dim", "reshape") and first is not None
        and eqn.outvars[0].aval.shape == first.aval.shape + (1,)):
      ids_source[eqn.outvars[0]] = first
    if (eqn.primitive.name == "transpose" and first in origin and first.aval.ndim == 2
        and tuple(eqn.params["permutation"]) == (1, 0)):
      transposed[eqn.outvars[0]] = first
    found = _layer_kind(eqn, origin)
    # An input computed from parameters alone has no examples: that is no layer.
    if found is not None and not (_is_var(eqn.invars[0]) and eqn.invars[0] in fixed):
      kind, in_axes = found
      w_shape = eqn.invars[1].aval.shape
      features = tuple(w_shape[in_axes:]) if kind == "dense" else (w_shape[-1],)
      layer = dict(kind=kind, eqn=eqn, last=index, bias=None, weight=origin[eqn.invars[1]],
                   in_axes=in_axes, features=features)
      layers.append(layer)
      by_output[eqn.outvars[0]] = layer
    elif (table := _projection_table(eqn, origin, transposed, uses)) is not None:
      layers.append(dict(kind="embedding_projection", eqn=eqn, last=index, bias=None,
                         weight=origin[table], table=table))
    elif _is_row_lookup(eqn, origin):  # no bias: a later add is not the lookup's
      table, indices = eqn.invars
      layers.append(dict(kind="embedding", eqn=eqn, last=index, bias=None, weight=origin[table],
                         ids=ids_source.get(indices, indices)))
    elif eqn.primitive.name == "mul" and all(_is_var(v) for v in eqn.invars):
      layer = _scale_layer(eqn, index, origin, last_axis, partial, uses, fixed)
      if layer is not None:
        if not any(layer is other for other in layers):  # else it moved to this `mul`
          layers.append(layer)
        by_output[eqn.outvars[0]] = layer
    elif eqn.primitive.name == "add" and all(_is_var(v) for v in eqn.invars):
      for y, b in (eqn.invars, eqn.invars[::-1]):
        layer = by_output.get(y)
        if (layer is not None and uses[y] == 1 and b in bias_source
            and bias_source[b].aval.shape == layer["features"]
            and _broadcasts_over_positions(b.aval.shape, layer["features"])
            and eqn.outvars[0].aval.shape == y.aval.shape
            and (layer["kind"] != "scale_and_shift"   # a shift lies along the last axis too
                 or (b in last_axis and origin[last_axis[b]] != layer["weight"]))):
          layer.update(last=index, bias=bias_source[b])
          break
  return {layer["last"]: layer for layer in layers}


def _broadcasts_over_positions(shape: tuple[int, ...], features: tuple[int, ...]) -> bool:
  """Whether an array of `shape` is the bias of `features` broadcast over leading axes."""
  return tuple(shape[len(shape) - len(features):]) == features


def _tag(layer: dict, rename: dict, output: jcore.Var) -> list[jcore.JaxprEqn]:
  """The equations that tag a recognised layer, the tag last; its output is a new variable."""
  eqn, before = layer["eqn"], []
  if layer["kind"] == "embedding":
    ids, table = (rename.get(v, v) for v in (layer["ids"], eqn.invars[0]))
    return [jcore.new_jaxpr_eqn([output, ids, table], [jcore.Var(output.aval)], tags.layer_tag_p,
                                dict(kind="embedding", approx=None, has_bias=False, conv=None),
                                jcore.no_effects)]
  if layer["kind"] == "embedding_projection":
    x, table = (rename.get(v, v) for v in (eqn.invars[0], layer["table"]))
    return [jcore.new_jaxpr_eqn([output, x, table], [jcore.Var(output.aval)], tags.layer_tag_p,
                                dict(kind="embedding_projection", approx=None, has_bias=False,
                                     conv=None), jcore.no_effects)]
  if layer["kind"] == "scale_and_shift":
    x, *factor = (rename.get(v, v) for v in layer["x_hat"])
    w = layer["scale"]
    if factor:  # flax's `centred * (factor * scale)`: x_hat = centred * factor
      before.append(jcore.new_jaxpr_eqn([x, *factor], [jcore.Var(x.aval)], eqn.primitive,
                                        eqn.params, jcore.no_effects))
      x = before[-1].outvars[0]
  else:
    x, w = (rename.get(v, v) for v in eqn.invars)
  bias = layer["bias"]
  operands = [output, x, w] + ([] if bias is None else [bias])
  params = dict(kind=layer["kind"], approx=None, has_bias=bias is not None, conv=None)
  if layer["kind"] == "dense":
    params["in_axes"] = layer["in_axes"]
  elif layer["kind"] in tags.CONV_KINDS:
    p = eqn.params
    params["conv"] = tags.conv_params(p["window_strides"], p["padding"], p["lhs_dilation"],
                                      p["rhs_dilation"], p["feature_group_count"])
  return before + [jcore.new_jaxpr_eqn(operands, [jcore.Var(output.aval)], tags.layer_tag_p,
                                       params, jcore.no_effects)]


def _rewrite(jaxpr: jcore.Jaxpr, origin: dict, claimed: set, dropped_biases: set,
             found: collections.defaultdict, untied: frozenset = frozenset()) -> jcore.Jaxpr:
  """`jaxpr` with a tag after each recognised layer whose weight is not `claimed`.

  Biases in `dropped_biases` are left out of the tags, and so are the output projections
  of the weights in `untied`. Records in `found[weight]` each layer's
  `(kind, bias, weight shape)`, to find weights that cannot be tagged.
  """
  origin = dict(origin)
  layers = {last: layer for last, layer in _find_layers(jaxpr, dict(origin)).items()
            if layer["weight"] not in claimed
            and not (layer["kind"] == "embedding_projection" and layer["weight"] in untied)}
  rename: dict = {}
  eqns = []
  for index, eqn in enumerate(jaxpr.eqns):
    if rename:
      eqn = eqn.replace(invars=[rename.get(v, v) if _is_var(v) else v for v in eqn.invars])
    track_parameters(eqn, origin)
    if (call := call_jaxpr(eqn)) is not None:
      name, sub, inner = call
      new_inner = _rewrite(inner, inner_origin(eqn, inner, origin), claimed, dropped_biases,
                           found, untied)
      if new_inner is not inner:
        new_sub = (jcore.ClosedJaxpr(new_inner, sub.consts)
                   if isinstance(sub, jcore.ClosedJaxpr) else new_inner)
        eqn = eqn.replace(params={**eqn.params, name: new_sub})
    eqns.append(eqn)
    if index in layers:
      layer = layers[index]
      if layer["bias"] is not None and origin[layer["bias"]] in claimed | dropped_biases:
        layer = dict(layer, bias=None)
      tagging = _tag(layer, rename, eqn.outvars[0])
      bias = None if layer["bias"] is None else origin[layer["bias"]]
      found[layer["weight"]].append((layer["kind"], bias, tagging[-1].invars[2].aval.shape))
      rename[eqn.outvars[0]] = tagging[-1].outvars[0]
      eqns += tagging
  if not rename and all(a is b for a, b in zip(eqns, jaxpr.eqns)):
    return jaxpr
  outvars = [rename.get(v, v) if _is_var(v) else v for v in jaxpr.outvars]
  return jaxpr.replace(eqns=eqns, outvars=outvars)


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
