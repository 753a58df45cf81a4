"""Rewriting a jaxpr: a layer tag after each recognised layer (a split dense layer
recomputed part by part, each part tagged), in sub-jaxprs too."""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jcore

from jkfac import tags
from jkfac.jaxprs import (
  CUSTOM_RULE_PRIMITIVES,
  call_jaxpr,
  inner_origin,
  is_var,
  track_parameters,
)
from jkfac.patterns.matching import find_layers
from jkfac.patterns.records import Match, Split


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
      before, x = _times_factor(x, factor[0])
  else:
    weight_first = match.transposed and match.kind == "dense" and match.table is None
    x, w = (rename.get(v, v) for v in eqn.invars[::-1 if weight_first else 1])
    w = w if match.table is None else match.table  # `x @ w.T`: the weight `(out, in)`
  operands = [output, x, w] + ([] if match.bias is None else [match.bias])
  params = dict(kind=match.kind, has_bias=match.bias is not None)
  if match.kind == "dense":
    params["in_axes"] = match.in_axes
  elif match.kind in tags.CONV_KINDS:
    p = eqn.params
    params["conv"] = tags.conv_params(p["window_strides"], p["padding"], p["lhs_dilation"],
                                      p["rhs_dilation"], p["feature_group_count"])
  if match.transposed:
    params["transposed"] = True
  if match.feature_axis is not None:
    return _moved_tag(operands, params, match.feature_axis, match.kind in tags.CONV_KINDS)
  return before + [_tag_eqn(operands, output, **params)]


def _times_factor(centred: jcore.Var, factor: jcore.Var
                  ) -> tuple[list[jcore.JaxprEqn], jcore.Var]:
  """The equations of `centred * factor` (a norm's x_hat), the factor cast to `centred`'s
  dtype (float32 statistics on float64 activations), and their result."""
  dtype = centred.aval.dtype
  x_hat = jcore.Var(centred.aval)
  return _inline(lambda c, f: c * lax.convert_element_type(f, dtype), [centred, factor],
                 x_hat), x_hat


def _moved_tag(operands: list[jcore.Var], params: dict, feature_axis: int,
               conv: bool) -> list[jcore.JaxprEqn]:
  """The tag of a layer whose output's features lie along `feature_axis`: the tag sees the
  output (and a conv's NCHW input) channels-last, as a tagged layer's; the tagged output
  is moved back, a new variable defined by the last equation."""
  params = {"approx": None, "conv": None, **params}

  def tagged(y: jax.Array, x: jax.Array, *weights: jax.Array) -> jax.Array:
    x = jnp.moveaxis(x, 1, -1) if conv else x
    out = tags.layer_tag_p.bind(jnp.moveaxis(y, feature_axis, -1), x, *weights, **params)
    return jnp.moveaxis(out, -1, feature_axis)

  return _inline(tagged, operands, jcore.Var(operands[0].aval))


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
  return [eqn.replace(invars=[env[v] if is_var(v) else v for v in eqn.invars],
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


def rewrite(jaxpr: jcore.Jaxpr, origin: dict, claimed: set, dropped_biases: set,
            found: collections.defaultdict, untied: frozenset = frozenset(),
            dense: frozenset = frozenset()) -> jcore.Jaxpr:
  """`jaxpr` with a tag after each recognised layer whose weight is not `claimed`.

  Biases in `dropped_biases` are left out of the tags, and so are the output projections
  of the weights in `untied`; those of the weights in `dense` are dense layers
  `x @ w.T` (weight `(out, in)`). Records in `found[weight]` each layer's
  `(kind, bias, weight shape)`, to find weights that cannot be tagged.
  """
  origin = dict(origin)
  matches = {last: match for last, match in find_layers(jaxpr, dict(origin)).items()
             if _keep(match, claimed, untied)}
  replaced = {i for m in matches.values() if m.split is not None for i in (m.start, m.last)}
  rename: dict = {}
  eqns = []
  for index, eqn in enumerate(jaxpr.eqns):
    if rename:
      eqn = eqn.replace(invars=[rename.get(v, v) if is_var(v) else v for v in eqn.invars])
    track_parameters(eqn, origin)
    eqn = _rewrite_inner(eqn, origin, claimed, dropped_biases, found, untied, dense)
    match = matches.get(index)
    if index in replaced:
      if match is not None:
        eqns += _split_eqns(match, rename, origin, claimed | dropped_biases, found,
                            eqn.outvars[0])
      continue
    eqns.append(eqn)
    if match is not None:
      if match.kind == "embedding_projection" and match.weight in dense:
        match = dataclasses.replace(match, kind="dense", transposed=True)
      if match.bias is not None and origin[match.bias] in claimed | dropped_biases:
        match = dataclasses.replace(match, bias=None)
      tagging = _tag(match, rename, eqn.outvars[0])
      bias = None if match.bias is None else origin[match.bias]
      kind = match.kind + ("_transposed" if match.transposed else "")
      tag = next(e for e in reversed(tagging) if e.primitive is tags.layer_tag_p)
      found[match.weight].append((kind, bias, tag.invars[2].aval.shape))
      rename[eqn.outvars[0]] = tagging[-1].outvars[0]
      eqns += tagging
  if not rename and all(a is b for a, b in zip(eqns, jaxpr.eqns)) and len(eqns) == len(
      jaxpr.eqns):
    return jaxpr
  outvars = [rename.get(v, v) if is_var(v) else v for v in jaxpr.outvars]
  return jaxpr.replace(eqns=eqns, outvars=outvars)


def _rewrite_inner(eqn: jcore.JaxprEqn, origin: dict, claimed: set, dropped_biases: set,
                   found: collections.defaultdict, untied: frozenset,
                   dense: frozenset) -> jcore.JaxprEqn:
  """A call-like or scan equation with its sub-jaxpr rewritten; other equations as they are.

  A `jax.custom_jvp` / `jax.custom_vjp` call stays as it is: a tag inside would make the
  interpreter differentiate its primal code instead of the user's rule.
  """
  if eqn.primitive.name in CUSTOM_RULE_PRIMITIVES or (call := call_jaxpr(eqn)) is None:
    return eqn
  name, sub, inner = call
  new_inner = rewrite(inner, inner_origin(eqn, inner, origin), claimed, dropped_biases, found,
                      untied, dense)
  if new_inner is inner:
    return eqn
  new_sub = (jcore.ClosedJaxpr(new_inner, sub.consts) if isinstance(sub, jcore.ClosedJaxpr)
             else new_inner)
  return eqn.replace(params={**eqn.params, name: new_sub})
