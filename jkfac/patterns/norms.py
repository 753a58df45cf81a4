"""Norm layers' scale: `x_hat * scale` with a 1-D parameter laid along the last axis."""

from __future__ import annotations

import dataclasses

from jax.extend import core as jcore

from jkfac.patterns.records import Level, Match


def scale_layer(level: Level, index: int, eqn: jcore.JaxprEqn) -> Match | None:
  """The scale-and-shift layer whose scale `mul` is `eqn` (shift not yet seen), or None.

  `x_hat * scale` is one if `x_hat` has the output's shape. A product `factor * scale`
  is kept in `level.partial`: if its only use is `centred * (factor * scale)` (flax's
  norms; the product maybe cast to `centred`'s dtype, `tracking.track`), that `mul` ends
  the layer instead, with `x_hat = centred * factor`. An x_hat
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
