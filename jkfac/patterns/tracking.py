"""Following parameters through one jaxpr level: casts, broadcasts (biases, norm scales),
joins of parameters, transposes and id columns, recorded in the level's maps so the
matchers can look them up by variable."""

from __future__ import annotations

import jax.numpy as jnp
from jax.extend import core as jcore

from jkfac.jaxprs import TRANSPARENT_PRIMITIVES, is_var, track_parameters
from jkfac.patterns.records import Level, Split

BROADCASTS = frozenset({"reshape", "broadcast_in_dim", "convert_element_type", "copy"})


# Primitives that join parameters into one weight, and the name of their axis parameter.
JOINS = {"concatenate": "dimension", "stack": "axis"}


def _last_axis_source(eqn: jcore.JaxprEqn, origin: dict, last_axis: dict) -> jcore.Var | None:
  """The 1-D parameter that `eqn` lays along the last axis of its output, if any: a cast,
  a `reshape` to `(1, ..., 1, d)`, or a `broadcast_in_dim` that keeps it last."""
  first = eqn.invars[0] if eqn.invars and is_var(eqn.invars[0]) else None
  source = last_axis.get(first)
  if source is None and first in origin and first.aval.ndim == 1:
    source = first
  if source is None or eqn.primitive.name not in BROADCASTS:
    return None
  (d,), out = source.aval.shape, eqn.outvars[0].aval.shape
  if eqn.primitive.name == "reshape":
    return source if out == (1,) * (len(out) - 1) + (d,) else None
  if eqn.primitive.name == "broadcast_in_dim":
    dims = eqn.params["broadcast_dimensions"]
    return source if out[-1] == d and dims and dims[-1] == len(out) - 1 else None
  return source


def _bias_axes(eqn: jcore.JaxprEqn, axes: tuple[int, ...] | None) -> tuple[int, ...] | None:
  """The axes of the output of `eqn` (a broadcast, reshape or cast) along which lie the
  axes of a bias parameter that lie along `axes` of its operand: a reshape keeps them
  only as a trailing block it leaves as it is (None: they are mixed with others)."""
  if axes is not None and eqn.primitive.name == "broadcast_in_dim":
    return tuple(eqn.params["broadcast_dimensions"][a] for a in axes)
  if axes is None or eqn.primitive.name != "reshape":
    return axes
  before, after, k = eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape, len(axes)
  if (axes != tuple(range(len(before) - k, len(before)))
      or tuple(after[len(after) - k:]) != tuple(before[len(before) - k:])):
    return None
  return tuple(range(len(after) - k, len(after)))


def _join(eqn: jcore.JaxprEqn, origin: dict) -> Split | None:
  """The `Split` of a `concatenate` or `stack` of two or more parameters."""
  if (eqn.primitive.name not in JOINS or len(eqn.invars) < 2
      or not all(is_var(v) and v in origin for v in eqn.invars)):
    return None
  parts = tuple(eqn.invars)
  return Split(eqn.params[JOINS[eqn.primitive.name]], parts, tuple(origin[v] for v in parts),
               eqn.primitive.name == "stack")


def track(level: Level, eqn: jcore.JaxprEqn) -> None:
  """Extends the level's maps by what `eqn` computes from parameters (or ids)."""
  first = eqn.invars[0] if eqn.invars and is_var(eqn.invars[0]) else None
  name = eqn.primitive.name
  track_parameters(eqn, level.origin)
  if all(v in level.fixed for v in eqn.invars if is_var(v)):  # also `iota`, constants
    level.fixed.update(eqn.outvars)
  if (source := _last_axis_source(eqn, level.origin, level.last_axis)) is not None:
    level.last_axis[eqn.outvars[0]] = source
  if name in BROADCASTS and (first in level.bias_source or first in level.origin
                              or first in level.joins):
    level.bias_source[eqn.outvars[0]] = level.bias_source.get(first, first)
    level.bias_casts[eqn.outvars[0]] = level.bias_casts.get(first, ()) + _cast(eqn)
    axes = (level.bias_axes[first] if first in level.bias_source
            else tuple(range(first.aval.ndim)))
    level.bias_axes[eqn.outvars[0]] = _bias_axes(eqn, axes)
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
  _carry(level, eqn)
  if name in TRANSPARENT_PRIMITIVES and first in level.partial and level.uses[first] == 1:
    level.partial[eqn.outvars[0]] = level.partial[first]  # cast to the activations' dtype


def _carry(level: Level, eqn: jcore.JaxprEqn) -> None:
  """Extends `level.carries` through `eqn`: a sum with an array of the same shape, a
  transpose, or a reshape or squeeze that only adds or drops unit axes. Each carried
  variable has one use, so the layer's output gradient is the carried one's."""
  name, out = eqn.primitive.name, eqn.outvars[0] if len(eqn.outvars) == 1 else None
  carried = [v for v in eqn.invars if is_var(v) and v in level.carries and level.uses[v] == 1]
  if out is None or not carried:
    return
  if name == "add":
    if all(is_var(v) and v.aval.shape == out.aval.shape for v in eqn.invars):
      level.carries[out] = level.carries[carried[0]]
    return
  if carried[0] is not eqn.invars[0]:
    return
  start, axis, features = level.carries[carried[0]]
  if name == "transpose":
    level.carries[out] = (start, list(eqn.params["permutation"]).index(axis), features)
  elif name == "squeeze" or (name == "reshape" and eqn.params.get("dimensions") is None):
    moved = _unit_axes_moved(carried[0].aval.shape, out.aval.shape, axis)
    if moved is not None:
      level.carries[out] = (start, moved, features)


def _unit_axes_moved(before: tuple[int, ...], after: tuple[int, ...], axis: int) -> int | None:
  """Where axis `axis` (not of size 1) of `before` lands in `after`, if the two shapes
  differ only by axes of size 1."""
  kept = [i for i, d in enumerate(before) if d != 1]
  landed = [i for i, d in enumerate(after) if d != 1]
  if before[axis] == 1 or [before[i] for i in kept] != [after[i] for i in landed]:
    return None
  return landed[kept.index(axis)]


def _cast(eqn: jcore.JaxprEqn) -> tuple[jnp.dtype, ...]:
  """The dtype `eqn` casts to, if it is a cast."""
  return (eqn.outvars[0].aval.dtype,) if eqn.primitive.name == "convert_element_type" else ()


def has_examples(level: Level, x: jcore.Var | jcore.Literal) -> bool:
  """Whether an input is no variable computed from parameters alone (those have no
  examples, so the equation using them is no layer)."""
  return not (is_var(x) and x in level.fixed)
