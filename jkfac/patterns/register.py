"""`register_layers`: tag every recognised layer whose weight's uses agree on one layer."""

from __future__ import annotations

import collections

from jax.extend import core as jcore

from jkfac import tags
from jkfac.jaxprs import (
  TRANSPARENT_PRIMITIVES,
  call_jaxpr,
  inner_origin,
  is_var,
  track_parameters,
)
from jkfac.patterns.leaks import leaking
from jkfac.patterns.rewrite import rewrite


def _parameter_uses(jaxpr: jcore.Jaxpr, origin: dict, uses: collections.Counter) -> None:
  """Counts, at every level, the equations that use each params leaf (casts and calls aside,
  and dead equations, whose outputs nothing uses: `nn.scan` leaves some)."""
  origin = dict(origin)
  used = {v for eqn in jaxpr.eqns for v in eqn.invars if is_var(v)}
  used.update(v for v in jaxpr.outvars if is_var(v))
  for eqn in jaxpr.eqns:
    if not eqn.effects and not any(v in used for v in eqn.outvars):
      continue
    if (call := call_jaxpr(eqn)) is not None:
      _parameter_uses(call[2], inner_origin(eqn, call[2], origin), uses)
    elif eqn.primitive.name in TRANSPARENT_PRIMITIVES:
      track_parameters(eqn, origin)
    else:
      uses.update({origin[v] for v in eqn.invars if is_var(v) and v in origin})


def _untaggable(found: dict, uses: collections.Counter
                ) -> tuple[set[int], set[int], frozenset[int], frozenset[int]]:
  """Weights whose recognised layers cannot form one (multi-use) layer, biases shared by
  several weights, weights whose output projections are no layer, and weights whose
  output projections `x @ w.T` are dense layers.

  The layers of one weight must agree on kind, bias and weight shape (a scan over
  stacked layers slices it), except that an embedding table's lookups and output
  projections make one tied layer (a bias after its projection is no part of it); an
  embedding table must have no use besides those. A projection without lookups of its
  table is a dense layer if the weight's other uses are the same dense layer, else it
  is left out.
  """
  projected = {weight: [("dense_transposed", *r[1:]) if r[0] == "embedding_projection" else r
                        for r in records] for weight, records in found.items()
               if all(kind != "embedding" for kind, _, _ in records)
               and any(kind == "embedding_projection" for kind, _, _ in records)}
  dense = frozenset(weight for weight, records in projected.items() if len(set(records)) == 1)
  untied = frozenset(projected) - dense
  found = {weight: projected[weight] if weight in dense else
           [r if r[0] != "embedding_projection" else (r[0], None, r[2]) for r in records
            if weight not in untied or r[0] != "embedding_projection"]
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
  return weights, {bias for bias, ws in owners.items() if len(ws) > 1}, untied, dense


def register_layers(closed: jcore.ClosedJaxpr, num_params: int,
                    claimed: set[int]) -> jcore.ClosedJaxpr:
  """Tags the untagged dense, conv, embedding and scale-and-shift layers of `loss_fn`'s jaxpr.

  The first `num_params` inputs of `closed` are the `params` leaves; `claimed` holds
  the indices of leaves already in a hand tag. A weight used by several layers of
  the same kind is tagged at every use (the tracer makes it one multi-use layer). A
  weight or bias that also moves a loss's inputs through a use that is no layer
  (`leaks.leaking`) is left untagged: its layer block would miss that part.
  """
  origin = {v: i for i, v in enumerate(closed.jaxpr.invars[:num_params])}
  uses: collections.Counter = collections.Counter()
  _parameter_uses(closed.jaxpr, origin, uses)
  found: collections.defaultdict = collections.defaultdict(list)
  jaxpr = rewrite(closed.jaxpr, origin, set(claimed), set(), found)
  weights, biases, untied, dense = _untaggable(found, uses)
  leaked = leaking(closed.jaxpr, origin, lambda match: not (
      match.kind == "embedding_projection" and match.weight in untied))
  weights, biases = weights | (leaked & set(found)), biases | leaked
  if weights or biases or untied or dense:
    jaxpr = rewrite(closed.jaxpr, origin, set(claimed) | weights, biases,
                    collections.defaultdict(list), untied, dense)
  return jcore.ClosedJaxpr(jaxpr, closed.consts)
