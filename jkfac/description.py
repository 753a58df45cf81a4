"""`jkfac.describe`: what K-FAC will do with every parameter, as a table."""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from jkfac import layers
from jkfac import blocks
from jkfac import factor_sizes
from jkfac.config import state_dtype
from jkfac.layer_table import trace_with_approximations

PyTree = Any


class ParameterInfo(NamedTuple):
  """One `params` leaf: its layer, the layer's kind and approximation, and the block.

  `factors` gives the shapes of the layer's block arrays (a grouped conv's have a
  leading group axis: `A 4x10x10` is 4 groups' 10x10 factors; `A 7 blocks 113x113` a
  block-diagonal factor, see `factor_block_size`) and `state_bytes` the
  bytes they take in the state (statistics and inverses), on the layer's first leaf;
  `itemsize` is the parameter's bytes per entry.
  """
  path: str
  shape: tuple[int, ...]
  layer: str
  kind: str
  approximation: str
  factors: str
  state_bytes: int
  itemsize: int = 4


class Description(NamedTuple):
  parameters: tuple[ParameterInfo, ...]

  @property
  def state_bytes(self) -> int:
    return sum(p.state_bytes for p in self.parameters)

  def __str__(self) -> str:
    header = ("parameter", "shape", "layer", "kind", "approximation", "factors", "state")
    rows = [header] + [(p.path, "x".join(map(str, p.shape)) or "scalar", p.layer, p.kind,
                        p.approximation, p.factors, _size(p.state_bytes) if p.state_bytes else "")
                       for p in self.parameters]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"K-FAC state: {_size(self.state_bytes)}")
    lines.append(self.coverage)
    return "\n".join(lines)

  @property
  def coverage(self) -> str:
    """One line: parameters (and their bytes) under structured blocks against generic."""
    sizes = {True: [0, 0], False: [0, 0]}
    for p in self.parameters:
      count = math.prod(p.shape)
      sizes[p.kind != "generic"][0] += count
      sizes[p.kind != "generic"][1] += count * p.itemsize
    (structured, structured_bytes), (generic, generic_bytes) = sizes[True], sizes[False]
    share = 100 * structured / max(structured + generic, 1)
    return (f"Coverage: {structured:,} parameters ({_size(structured_bytes)}) in structured "
            f"blocks, {generic:,} ({_size(generic_bytes)}) generic: {share:.1f}% structured")


def _shape(shape: tuple[int, ...], stacked: int) -> str:
  """A factor's shape, its `stacked` leading axes (groups, scanned layers) first; a
  block-diagonal factor's (`factor_block_size`) as "4 blocks 197x197"."""
  lead, core = shape[:stacked], shape[stacked:]
  if len(core) != 3:
    return "x".join(map(str, shape))
  blocks_text = f"{core[0]} blocks {core[1]}x{core[2]}"
  return f"{'x'.join(map(str, lead))}x[{blocks_text}]" if lead else blocks_text


def _size(num_bytes: int) -> str:
  for unit in ("B", "KiB", "MiB"):
    if num_bytes < 1024 or unit == "MiB":
      return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
    num_bytes /= 1024
  raise AssertionError


def describe(loss_fn: Callable[..., Any], params: PyTree, batch: PyTree, *,
             approximations: Mapping[str, str] | None = None,
             auto_register: bool = True,
             max_factor_dim: int = factor_sizes.MAX_FACTOR_DIM,
             factor_block_size: int | str | None = "auto") -> Description:
  """Every parameter of `loss_fn` with the block K-FAC gives it; `print` it for a table.

  Takes the arguments `jkfac.kfac` / `jkfac.precondition` take, so it shows what they
  will do: which layer each parameter belongs to (tagged, recognised, or "generic"
  for a diagonal block of its own), the approximation and the factor shapes, and a
  last line with the share of parameters under structured blocks.

  Examples:
    >>> print(jkfac.describe(loss_fn, params, batch))
  """
  trace = factor_sizes.bound_factors(trace_with_approximations(
      loss_fn, params, batch, approximations=approximations, auto_register=auto_register),
      max_factor_dim, factor_block_size=factor_block_size)
  leaves = jax.tree_util.tree_leaves(params)
  itemsize = jnp.dtype(state_dtype(params)).itemsize
  rows: dict[int, ParameterInfo] = {}
  for layer in trace.every_layer:
    block = blocks.for_layer(layer)
    zeros = jax.eval_shape(lambda block=block, layer=layer: block.zeros(
        *layers.matrix_shape(layer)))
    inverses = jax.eval_shape(block.identity, zeros)
    stacked = len(layer.stack) + (layers.feature_groups(layer) > 1)
    factors = ", ".join(f"{name} {_shape(x.shape, stacked)}" for name, x in zeros.items())
    state_bytes = itemsize * sum(math.prod(x.shape) for x in (*zeros.values(),
                                                               *inverses.values()))
    for index in (layer.weight, layer.bias):
      if index is not None:
        rows[index] = ParameterInfo(trace.param_paths[index], tuple(jnp.shape(leaves[index])),
                                    layer.name, layer.kind, layer.approx, factors,
                                    state_bytes if index == layer.weight else 0,
                                    jnp.dtype(jnp.result_type(leaves[index])).itemsize)
  return Description(tuple(rows[i] for i in sorted(rows)))
