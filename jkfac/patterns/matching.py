"""Finding the layers of one jaxpr level: each equation goes to the matcher of its form."""

from __future__ import annotations

import dataclasses

from jax.extend import core as jcore

from jkfac import tags
from jkfac.jaxprs import is_var
from jkfac.patterns.bias import bias_add, carried_bias
from jkfac.patterns.dense import (
  batch_first,
  dense_or_conv,
  projection,
  split_dense,
  weight_first,
)
from jkfac.patterns.lookups import lookup, row_slice_lookup, squeezed
from jkfac.patterns.norms import scale_layer
from jkfac.patterns.records import Level, Match
from jkfac.patterns.tracking import track


def _match(level: Level, index: int, eqn: jcore.JaxprEqn) -> None:
  """Records the layer that `eqn` starts, ends or extends, if any."""
  name, all_vars = eqn.primitive.name, all(is_var(v) for v in eqn.invars)
  if name == "mul":
    match = scale_layer(level, index, eqn) if all_vars else None
  elif name == "add":
    match = bias_add(level, index, eqn) if all_vars else None
    if match is None and all_vars:
      carried_bias(level, eqn)
  elif name == "transpose":
    match = batch_first(level, index, eqn) if all_vars else None
  elif name == "squeeze":
    match = squeezed(level, index, eqn) if all_vars else None
  else:
    match = (dense_or_conv(level, index, eqn) or split_dense(level, index, eqn)
             or projection(level, index, eqn) or lookup(level, index, eqn))
    if match is None and name == "dot_general" and len(eqn.invars) == 2:
      weight_first(level, index, eqn)
    elif match is None:
      row_slice_lookup(level, index, eqn)
  if match is None:
    return
  level.add(match)
  if name == "mul" or (name != "add" and match.kind in ("dense", "embedding_projection",
                                                        *tags.CONV_KINDS)
                       and match.feature_axis is None):
    level.by_output[eqn.outvars[0]] = match.start


def find_layers(jaxpr: jcore.Jaxpr, origin: dict) -> dict[int, Match]:
  """Recognised layers of one jaxpr level, keyed by the index of their last equation."""
  level = Level.of(jaxpr, origin)
  for index, eqn in enumerate(jaxpr.eqns):
    track(level, eqn)
    _match(level, index, eqn)
  for match in level.weight_first.values():  # `w @ x` not moved batch-first: in place
    if match.start not in level.matches:
      level.add(dataclasses.replace(match, feature_axis=0))
  for start, bias in level.carried_bias.items():
    match = level.matches[start]
    if match.feature_axis is not None and match.bias is None:
      level.add(dataclasses.replace(match, bias=bias))
  return {match.last: match for match in level.matches.values()}
