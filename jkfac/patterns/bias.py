"""Bias `add`s: a recognised layer's output plus a broadcast parameter (for a split
layer, its joined biases, split back part by part)."""

from __future__ import annotations

import dataclasses

from jax.extend import core as jcore

from jkfac.patterns.records import Level, Match, Split


def _split_biases(level: Level, match: Match, root: jcore.Var, b: jcore.Var) -> Split | None:
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


def _with_bias(level: Level, match: Match, root: jcore.Var, b: jcore.Var,
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


def bias_add(level: Level, index: int, eqn: jcore.JaxprEqn) -> Match | None:
  """The layer whose output `eqn` adds a bias to, extended by that bias."""
  for y, b in (eqn.invars, eqn.invars[::-1]):
    start, root = level.by_output.get(y), level.bias_source.get(b)
    if start is None or root is None or level.uses[y] != 1:
      continue
    match = level.matches[start]
    if (root.aval.shape == match.features
        and _broadcasts_over_positions(level, b, match.features)
        and eqn.outvars[0].aval.shape == y.aval.shape
        and (extended := _with_bias(level, match, root, b, index)) is not None):
      return extended
  return None


def _broadcasts_over_positions(level: Level, b: jcore.Var, features: tuple[int, ...]) -> bool:
  """Whether `b` is the bias of `features` broadcast over leading axes: the bias's axes
  lie along `b`'s trailing axes, in order (not along others of the same sizes)."""
  ndim, k = b.aval.ndim, len(features)
  return (tuple(b.aval.shape[ndim - k:]) == features
          and level.bias_axes.get(b) == tuple(range(ndim - k, ndim)))


def carried_bias(level: Level, eqn: jcore.JaxprEqn) -> None:
  """Notes the bias that `eqn` adds to a layer's output carried along `level.carries` (its
  feature axis not last): a parameter of the features' size, broadcast along that axis."""
  for y, b in (eqn.invars, eqn.invars[::-1]):
    carry, root = level.carries.get(y), level.bias_source.get(b)
    if carry is None or root not in level.origin or level.uses[y] != 1:
      continue
    start, axis, features = carry
    shape = tuple(features[0] if i == axis else 1 for i in range(y.aval.ndim))
    if (len(features) == 1 and tuple(b.aval.shape) == shape
        and [d for d in root.aval.shape if d != 1] == list(features)
        and eqn.outvars[0].aval.shape == y.aval.shape):
      level.carried_bias.setdefault(start, root)
      return
