"""The records of pattern matching: a recognised layer (`Match`), a weight joined from
parameters (`Split`), and what the walk over one jaxpr level knows so far (`Level`)."""

from __future__ import annotations

import collections
import dataclasses
from typing import NamedTuple

import jax.numpy as jnp
from jax.extend import core as jcore

from jkfac.jaxprs import is_var


class Split(NamedTuple):
  """A weight joined from parameters along `axis`: a `concatenate` or, if `stacked`, a `stack`.

  `parts` are the parameter variables and `weights` their params leaves; `casts` the dtypes
  the joined weight is cast to, in order, before its `dot_general`. Once a bias `add` is
  matched, `biases` holds the bias parameter variable added to each part (or None) and
  `bias_casts` the casts on the bias's way to the `add`. Replaying the casts per part keeps
  the values exact (a cast commutes with a join).
  """
  axis: int
  parts: tuple[jcore.Var, ...]
  weights: tuple[int, ...]
  stacked: bool
  casts: tuple[jnp.dtype, ...] = ()
  biases: tuple[jcore.Var | None, ...] = ()
  bias_casts: tuple[jnp.dtype, ...] = ()


@dataclasses.dataclass(frozen=True)
class Match:
  """A recognised layer of one jaxpr level.

  `eqn`, at index `start`, is its main equation (the `dot_general`, conv, `gather` or scale
  `mul`); the tag goes after equation `last` (the bias `add`, if any). `weight` is the
  weight's params leaf (None for a split dense layer: see `split`) and `bias` the bias
  parameter variable (for a split layer, the joined biases). Kind-specific: `in_axes` and
  `features` (dense, conv, scale-and-shift), `ids` (embedding), `table` (projection),
  `x_hat` and `scale` (scale-and-shift); `transposed` (dense `w @ x`, weight `(out, in)`;
  conv in OIHW/NCHW layout). `feature_axis`, if not None, is the output's feature axis when
  it is not last (a `w @ x` under `vmap`: 0; an NCHW conv: 1): the tag then sees the
  output (and a conv's input) with that axis moved last.
  """
  kind: str
  eqn: jcore.JaxprEqn
  start: int
  last: int
  weight: int | None
  bias: jcore.Var | None = None
  in_axes: int = 1
  features: tuple[int, ...] = ()
  ids: jcore.Var | None = None
  table: jcore.Var | None = None
  x_hat: tuple[jcore.Var, ...] = ()
  scale: jcore.Var | None = None
  split: Split | None = None
  transposed: bool = False
  feature_axis: int | None = None


@dataclasses.dataclass
class Level:
  """What the walk over one jaxpr level knows so far; the maps are keyed by variable."""
  origin: dict  # -> params leaf index (through casts)
  uses: collections.Counter
  fixed: set  # parameters, closed-over constants and the variables computed from them alone
  # -> the parameter (or join of parameters) it broadcasts, and the casts on the way
  bias_source: dict = dataclasses.field(default_factory=dict)
  bias_casts: dict = dataclasses.field(default_factory=dict)
  # -> the axes along which its source's axes lie, in order (None: a reshape mixed them)
  bias_axes: dict = dataclasses.field(default_factory=dict)
  ids_source: dict = dataclasses.field(default_factory=dict)  # gather indices `(..., 1)` -> ids
  last_axis: dict = dataclasses.field(default_factory=dict)  # -> the 1-D parameter laid last
  transposed: dict = dataclasses.field(default_factory=dict)  # `table.T` -> 2-D parameter
  joins: dict = dataclasses.field(default_factory=dict)  # -> its `Split` (no biases yet)
  partial: dict = dataclasses.field(default_factory=dict)  # `factor * scale` -> its Match
  weight_first: dict = dataclasses.field(default_factory=dict)  # `w @ x` -> its Match
  padded_ids: dict = dataclasses.field(default_factory=dict)  # `[ids, column]` -> ids
  unsqueezed: dict = dataclasses.field(default_factory=dict)  # `(..., 1, d)` lookup -> Match
  by_output: dict = dataclasses.field(default_factory=dict)  # -> start index of its Match
  # -> `(start, feature axis, features)`: a layer's output with its feature axis not last,
  # moved (transposes, unit axes) or summed with others' (`w_ih @ x + w_hh @ h`)
  carries: dict = dataclasses.field(default_factory=dict)
  carried_bias: dict = dataclasses.field(default_factory=dict)  # start -> bias parameter
  matches: dict = dataclasses.field(default_factory=dict)  # start index -> Match

  @classmethod
  def of(cls, jaxpr: jcore.Jaxpr, origin: dict) -> Level:
    uses = collections.Counter(v for eqn in jaxpr.eqns for v in eqn.invars if is_var(v))
    uses.update(v for v in jaxpr.outvars if is_var(v))
    return cls(origin=origin, uses=uses, fixed=set(origin) | set(jaxpr.constvars))

  def add(self, match: Match) -> None:
    """Records a match, or its update (same `start`), keeping the order of first records."""
    self.matches[match.start] = match
