"""Embedding lookups: a `gather` of whole rows of a 2-D parameter, or Equinox's clipped
gather of `(1, d)` slices under `vmap` followed by a squeeze."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax
from jax.extend import core as jcore

from jkfac.jaxprs import is_var
from jkfac.patterns.records import Level, Match


def _is_row_lookup(eqn: jcore.JaxprEqn, origin: dict) -> bool:
  """Whether `eqn` gathers whole rows of a 2-D parameter at integer indices `(..., 1)`."""
  if eqn.primitive.name != "gather" or not all(is_var(v) for v in eqn.invars):
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


def lookup(level: Level, index: int, eqn: jcore.JaxprEqn) -> Match | None:
  """An embedding lookup; no bias: a later add is not the lookup's."""
  if not _is_row_lookup(eqn, level.origin):
    return None
  table, indices = eqn.invars
  return Match("embedding", eqn, index, index, level.origin[table],
               ids=level.ids_source.get(indices, indices))


def row_slice_lookup(level: Level, index: int, eqn: jcore.JaxprEqn) -> None:
  """Notes a lookup `table[ids]` as `vmap` batches Equinox's `Embedding`: a clipped
  `gather` of `(1, d)` slices at `[ids, column]` (a full-row slice clips any column to
  0), giving `(..., 1, d)`; it is a layer once `squeezed` sees that axis dropped."""
  if eqn.primitive.name != "gather" or not all(is_var(v) for v in eqn.invars):
    return
  table, indices = eqn.invars
  if table not in level.origin or table.aval.ndim != 2 or indices not in level.padded_ids:
    return
  dn, n = eqn.params["dimension_numbers"], indices.aval.ndim
  if (tuple(dn.offset_dims) == (n - 1, n) and not tuple(dn.collapsed_slice_dims)
      and tuple(dn.start_index_map) == (0, 1)
      and not tuple(getattr(dn, "operand_batching_dims", ()))
      and eqn.params["mode"] == lax.GatherScatterMode.CLIP
      and tuple(eqn.params["slice_sizes"]) == (1, table.aval.shape[1])):
    level.unsqueezed[eqn.outvars[0]] = Match("embedding", eqn, index, index,
                                             level.origin[table], ids=level.padded_ids[indices])


def squeezed(level: Level, index: int, eqn: jcore.JaxprEqn) -> Match | None:
  """The lookup whose `(..., 1, d)` output `eqn` squeezes to `(..., d)`."""
  match = level.unsqueezed.get(eqn.invars[0])
  ndim = eqn.invars[0].aval.ndim
  if (match is None or level.uses[eqn.invars[0]] != 1
      or tuple(eqn.params["dimensions"]) != (ndim - 2,)):
    return None
  return dataclasses.replace(match, last=index)
