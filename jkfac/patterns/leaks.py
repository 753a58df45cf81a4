"""Parameters that move a registered loss's inputs through a use that is no recognised layer
(e.g. `flax.linen.SpectralNorm`'s `x @ (w / sigma)`): a layer block of such a weight would
model only part of its effect on the loss, so `register_layers` leaves it generic.

A forward pass over the jaxpr marks each variable with the parameters that reach it
differentiably through such a use. Views of parameters (casts, broadcasts, reshapes,
transposes, joins) are no use yet; a recognised layer's own equations (its weight,
bias or scale operands) are none either; `stop_gradient` and integer or boolean
results cut the marks. A parameter used only apart from the losses (a regulariser
added to the returned loss) moves no loss input, so it keeps its layer.
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
from jax.extend import core as jcore

from jkfac import tags
from jkfac.jaxprs import (
  CUSTOM_RULE_PRIMITIVES,
  TRANSPARENT_PRIMITIVES,
  call_jaxpr,
  inner_origin,
  is_var,
  scan_operands,
  track_parameters,
)
from jkfac.patterns.matching import find_layers
from jkfac.patterns.records import Match
from jkfac.patterns.tracking import BROADCASTS, JOINS

# Primitives whose result, from parameters alone, is a view of them (no use yet).
VIEWS = BROADCASTS | TRANSPARENT_PRIMITIVES | frozenset(JOINS) | {"transpose", "squeeze",
                                                                  "expand_dims"}
NONE = frozenset()


def leaking(jaxpr: jcore.Jaxpr, origin: dict, is_layer: Callable[[Match], bool]) -> set[int]:
  """The params leaves (by index; `origin` maps `jaxpr`'s variables to them) that reach a
  loss tag's operands through a use other than the recognised layers `is_layer` keeps."""
  leaked: set[int] = set()
  _walk(jaxpr, origin, {}, is_layer, leaked)
  return leaked


def _differentiable(v: jcore.Var) -> bool:
  """Whether a variable can carry a gradient (a float or complex array)."""
  dtype = getattr(v.aval, "dtype", None)
  return dtype is not None and jnp.issubdtype(dtype, jnp.inexact)


def _layer_operands(jaxpr: jcore.Jaxpr, origin: dict, is_layer: Callable[[Match], bool]
                    ) -> tuple[set[int], frozenset[int]]:
  """The indices of the recognised layers' equations (main and last) of one level, and the
  biases added further on (`w @ x` or NCHW conv outputs, their bias found along carries)."""
  matches = [m for m in find_layers(jaxpr, dict(origin)).values() if is_layer(m)]
  carried = frozenset(origin[m.bias] for m in matches
                      if m.feature_axis is not None and m.bias is not None)
  return {i for m in matches for i in (m.start, m.last)}, carried


def _walk(jaxpr: jcore.Jaxpr, origin: dict, marks: dict, is_layer: Callable[[Match], bool],
          leaked: set[int]) -> list[frozenset[int]]:
  """Marks `jaxpr`'s variables (its inputs marked by `marks`), adds the marks reaching loss
  tags to `leaked`, and returns the marks of its outputs."""
  origin, marks = dict(origin), dict(marks)
  views = {v: frozenset({i}) for v, i in origin.items()}
  layer_eqns, carried = _layer_operands(jaxpr, origin, is_layer)

  def mark(v) -> frozenset[int]:
    return marks.get(v, NONE) | views.get(v, NONE) if is_var(v) else NONE

  for index, eqn in enumerate(jaxpr.eqns):
    track_parameters(eqn, origin)
    ins = [v for v in eqn.invars if is_var(v)]
    name = eqn.primitive.name
    if name in VIEWS and ins and all(v in views for v in ins):
      views[eqn.outvars[0]] = frozenset().union(*(views[v] for v in ins))
      continue
    if eqn.primitive is tags.loss_tag_p:
      leaked.update(*(mark(v) for v in ins))
      continue
    if eqn.primitive is tags.layer_tag_p:  # a hand tag passes its first operand through
      outs = [marks.get(eqn.invars[0], NONE)] * len(eqn.outvars)
    elif name == "stop_gradient":
      continue
    elif name not in CUSTOM_RULE_PRIMITIVES and call_jaxpr(eqn) is not None:
      outs = _call(eqn, origin, views, marks, is_layer, leaked)
    else:
      outs = [_used(index, eqn, views, marks, layer_eqns, carried)] * len(eqn.outvars)
    marks.update((v, m) for v, m in zip(eqn.outvars, outs) if m and _differentiable(v))
  return [mark(v) for v in jaxpr.outvars]


def _used(index: int, eqn: jcore.JaxprEqn, views: dict, marks: dict, layer_eqns: set[int],
          carried: frozenset[int]) -> frozenset[int]:
  """The marks of the outputs of an equation that is no view, tag or call: its operands'
  marks, and the parameters it uses unless it is a layer's (or adds a carried bias)."""
  ins = [v for v in eqn.invars if is_var(v)]
  result = frozenset().union(*(marks.get(v, NONE) for v in ins))
  if index in layer_eqns:
    return result
  used = [views[v] for v in ins if v in views]
  if eqn.primitive.name == "add":
    used = [u for u in used if not u <= carried]
  return result.union(*used)


def _call(eqn: jcore.JaxprEqn, origin: dict, views: dict, marks: dict,
          is_layer: Callable[[Match], bool], leaked: set[int]) -> list[frozenset[int]]:
  """The output marks of a call-like or scan equation, walking its sub-jaxpr (a scan's
  until its carries' marks settle). A view that is no parameter inside marks its
  parameters as used there."""
  _, _, inner = call_jaxpr(eqn)
  inside = inner_origin(eqn, inner, origin)
  entry = [marks.get(v, NONE) | (NONE if s in inside else views.get(v, NONE))
           if is_var(v) else NONE for s, v in zip(inner.invars, eqn.invars)]
  if eqn.primitive.name != "scan":
    return _walk(inner, inside, dict(zip(inner.invars, entry)), is_layer, leaked)
  num_consts, num_carry = scan_operands(eqn)
  carry = slice(num_consts, num_consts + num_carry)
  while True:
    outs = _walk(inner, inside, dict(zip(inner.invars, entry)), is_layer, leaked)
    settled = [a | b for a, b in zip(entry[carry], outs[:num_carry])]
    if settled == entry[carry]:
      return outs
    entry[carry] = settled
