"""`fit`: the curvature of a trained model, averaged exactly over a dataset.

The optimizer keeps an EMA of each layer's block statistics; here the same statistics
(`jkfac.statistics`, from the same layer table and interpreter) are summed over every
batch of a dataset, weighted by the batch's size, and divided by the number of
examples: the mean curvature `F` of one example's loss, block by block. Each block is
then kept in its eigenbasis (`FittedCurvature.eigen`), where every product, inverse,
determinant and sample of `F + λI` is elementwise (see `jkfac.curvature.algebra`).
EK-FAC takes a second pass, which measures the per-example gradients' second moment in
the eigenbasis of K-FAC's factors from the first.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import time
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp

from jkfac import config, factor_sizes, interpreter, layer_table, layers, linalg, losses
from jkfac import parallel
from jkfac import statistics as layer_stats
from jkfac.layer_info import LayerInfo, Trace
from jkfac.validation import check

Array = jax.Array
PyTree = Any
Arrays = dict[str, Array]

APPROXIMATIONS = ("kron", "ekfac", "diagonal", "full", "kron_in_diag", "kron_out_diag")
_CHOSEN_KINDS = ("dense", "conv1d", "conv2d", "conv3d")  # where `approximation` applies


@functools.partial(jax.tree_util.register_dataclass, data_fields=["statistics", "eigen",
                   "num_examples"], meta_fields=["trace"])
@dataclasses.dataclass(frozen=True)
class FittedCurvature:
  """The mean per-example curvature `F` of a model over a dataset, block-diagonal by layer.

  statistics:   per layer name, the block statistics averaged over every example (e.g.
                "A" and "G" for "kron", "diagonal", "F"), as the optimizer would hold them.
  eigen:        per layer name, the block in its eigenbasis: "values" (eigenvalues, shaped
                like the layer's parameter matrix `(d_in [+1], d_out)`), with "QA" and "QG"
                (Kronecker bases) or "Q" (a full block's basis) where the basis is not
                the identity.
  num_examples: N, the number of examples averaged over; `N * F` is the curvature of
                the summed loss (the Laplace posterior's precision without the prior).
  trace:        the layer table (static): which parameters each block covers.
  """
  statistics: dict[str, Arrays]
  eigen: dict[str, Arrays]
  num_examples: Array
  trace: Trace


def _subset(trace: Trace, layers_pattern: str | None) -> Trace:
  """`trace` keeping only the layers (and generic parameters) that `layers_pattern`
  names: a glob on layer names, or "last" (the last tagged layer)."""
  if layers_pattern is None:
    return trace
  if layers_pattern == "last":
    check(bool(trace.layers), "layers='last' but the model has no tagged or recognised layer.")
    return dataclasses.replace(trace, layers=trace.layers[-1:], generic=())
  kept = [l for l in trace.layers if layer_table.pattern_matches(layers_pattern, l.name)]
  generic = [l for l in trace.generic if layer_table.pattern_matches(layers_pattern, l.name)]
  check(bool(kept or generic), f"The layer pattern {layers_pattern!r} matches no layer; layers: "
        f"{[l.name for l in trace.every_layer]}.")
  return dataclasses.replace(trace, layers=tuple(kept), generic=tuple(generic))


def trace_model(loss_fn: Callable[..., Any], params: PyTree, batch: PyTree,
                approximation: str = "kron", layers_pattern: str | None = None,
                auto_register: bool = True,
                max_factor_dim: int | None = factor_sizes.MAX_FACTOR_DIM) -> Trace:
  """The layer table `fit` uses: dense and conv layers whose tag names no approximation
  get `approximation`, bounded by `max_factor_dim` (with a `jkfac.LargeFactorWarning`,
  as in the optimizer); only the layers `layers_pattern` names (see `fit`)."""
  check(approximation in APPROXIMATIONS, f"Unknown approximation {approximation!r}; "
        f"expected one of {APPROXIMATIONS}.")
  plain = layer_table.trace_with_approximations(loss_fn, params, batch,
                                                auto_register=auto_register)
  chosen = {l.name: approximation for l in plain.layers if l.kind in _CHOSEN_KINDS}
  trace = layer_table.trace_with_approximations(
      loss_fn, params, batch, approximations=chosen or None, auto_register=auto_register)
  layer_table.check_coverage(trace, strict=False)
  return factor_sizes.bound_factors(_subset(trace, layers_pattern), max_factor_dim, warn=True)


def _as_kron(trace: Trace) -> Trace:
  """`trace` with its EK-FAC layers as K-FAC ones: the first pass of an EK-FAC fit."""
  return dataclasses.replace(trace, layers=tuple(
      dataclasses.replace(l, approx="kron") if l.approx == "ekfac" else l
      for l in trace.layers))


def _batch_statistics(loss_fn, trace: Trace, estimation: str, auto_register: bool,
                      dtype, params: PyTree, batch: PyTree, key: Array,
                      bases: dict[str, Arrays]) -> tuple[dict[str, Arrays], Array]:
  """Every block's statistics of one batch (means over its examples), and its number of
  examples: the leading axis of the first registered loss's predictions."""
  linear = interpreter.linearize(loss_fn, params, batch, auto_register)
  layers_only = dataclasses.replace(trace, generic=())  # generic ones: exactly, below
  found = layer_stats.astype(layer_stats.layer_statistics(layers_only, linear, key, estimation),
                             dtype)
  statistics = {l.name: layer_stats.block_statistics(l, found[l.name],
                                                     inverses=bases.get(l.name))
                for l in trace.layers}
  statistics.update(jax.tree_util.tree_map(
      lambda x: x.astype(dtype),
      layer_stats.exact_generic_statistics(trace, linear, key, estimation)))
  return statistics, jnp.asarray(linear.predictions[0].shape[0], jnp.int32)


def iterate_batches(batches: Iterable[PyTree] | Callable[[int], PyTree],
             num_batches: int | None) -> Iterable[PyTree]:
  if callable(batches):
    check(num_batches is not None and num_batches >= 1,
          "batches is a function of the batch index: pass num_batches (>= 1) too.")
    return (batches(i) for i in range(num_batches))
  check(num_batches is None, "num_batches is only for batches given as a function.")
  return batches


def _average(loss_fn, trace: Trace, params: PyTree, batches, num_batches, estimation: str,
             key: Array, auto_register: bool, bases: dict[str, Arrays], progress: bool,
             label: str) -> tuple[dict[str, Arrays], int]:
  """The size-weighted mean of every block's statistics over all batches, and N."""
  dtype = config.state_dtype(params)
  one_batch = jax.jit(parallel.replicated_on_auto_axes(functools.partial(
      _batch_statistics, loss_fn, trace, estimation, auto_register, dtype)))
  total, count, started, shown = None, 0, time.monotonic(), 0.0
  for index, batch in enumerate(iterate_batches(batches, num_batches)):
    found, size = one_batch(params, batch, jax.random.fold_in(key, index), bases)
    weighted = jax.tree_util.tree_map(lambda x: x * size, found)
    total = weighted if total is None else jax.tree_util.tree_map(jnp.add, total, weighted)
    count += size
    if progress and time.monotonic() - shown > 1.0:
      shown = time.monotonic()
      of = f"/{num_batches}" if num_batches else ""
      line = f"{label}: batch {index + 1}{of}, {count} examples, {shown - started:.0f} s"
      if sys.stderr.isatty():  # one line, redrawn
        print("\r" + line, end="", file=sys.stderr, flush=True)
      else:
        print(line, file=sys.stderr, flush=True)
  count = int(count)  # one sync, after every batch is dispatched
  check(count > 0, "fit got no batches.")
  if progress and sys.stderr.isatty():
    print(file=sys.stderr)
  return jax.tree_util.tree_map(lambda x: x / count, total), count


def _lead(layer: LayerInfo) -> int:
  """The number of leading stack axes of a block's arrays (scan stack, feature groups)."""
  return bool(layer.stack) + (layers.feature_groups(layer) > 1)


def _factor_eigen(factor: Array, lead: int) -> tuple[Array, Array | None]:
  """Eigenvalues (clipped at 0) and eigenvectors of a factor; a 1-D one is its diagonal."""
  if factor.ndim - lead == 1:
    return jnp.maximum(factor, 0), None
  values, vectors = linalg.eigh(factor)
  return jnp.maximum(values, 0), vectors


def eigen_block(layer: LayerInfo, stats: Arrays) -> Arrays:
  """A block's statistics in their eigenbasis (see `FittedCurvature.eigen`)."""
  lead = _lead(layer)
  if set(stats) == {"diagonal"}:
    return {"values": stats["diagonal"]}
  if set(stats) == {"F"}:
    values, vectors = linalg.eigh(stats["F"])
    return {"values": jnp.maximum(values, 0), "Q": vectors}
  if set(stats) in ({"A", "G"}, {"A", "G", "scaling"}):
    values_a, basis_a = _factor_eigen(stats["A"], lead)
    values_g, basis_g = _factor_eigen(stats["G"], lead)
    found = {"values": values_a[..., :, None] * values_g[..., None, :]}
    found.update({name: q for name, q in (("QA", basis_a), ("QG", basis_g)) if q is not None})
    return found
  raise NotImplementedError(
      f"Layer {layer.name!r} ({layer.kind}, {layer.approx!r}): jkfac.curvature supports the "
      f"approximations {APPROXIMATIONS} (and embeddings' 'kron'), not this block.")


def fit(loss_fn: Callable[..., Any], params: PyTree,
        batches: Iterable[PyTree] | Callable[[int], PyTree], *,
        num_batches: int | None = None, approximation: str = "kron",
        estimation: str = "exact", layers: str | None = None, key: Array | None = None,
        auto_register: bool = True, max_factor_dim: int | None = factor_sizes.MAX_FACTOR_DIM,
        progress: bool = False) -> FittedCurvature:
  """The curvature of a trained model, averaged exactly over a dataset.

  Args:
    loss_fn: `loss_fn(params, batch)`, the mean over the batch of per-example losses with
      its loss registered (as for `jkfac.kfac`); it may return `(loss, aux)`.
    params: the trained parameters.
    batches: an iterable of batches, or a function of the batch index (with
      `num_batches`). Each batch's statistics are weighted by its number of examples
      (the leading axis of the first registered loss's predictions), so the result is
      the mean over all examples. A parameter that no layer covers (a "generic" one in
      `jkfac.describe`) takes one backward pass per example for its exact diagonal.
    approximation: the block of dense and conv layers whose tag names none: "kron"
      (K-FAC), "ekfac" (eigenvalue-corrected, one more pass over `batches`), "diagonal",
      "full", "kron_in_diag" or "kron_out_diag". Other layers get their default block, as
      in the optimizer; a layer's tag (`approximation=`) wins.
    estimation: "exact" (the GGN: one backward pass per output unit), "fisher"
      (sampled targets, with `key`) or "empirical" (true targets).
    layers: None (every layer), "last" (the last layer, laplace-torch's default), or a
      glob on layer names (e.g. "Dense_*"); the other parameters are left out.
    key: PRNG key for "fisher" (each batch folds in its index).
    max_factor_dim: as for `jkfac.kfac`: a layer side wider than this keeps a diagonal
      factor, with a `jkfac.LargeFactorWarning` (None: no bound).
    progress: print the batches done to stderr, about once a second.

  Returns:
    A `FittedCurvature` (a pytree): `F`, the mean per-example curvature of `loss_fn`.
  """
  check(estimation in losses.ESTIMATIONS, f"Unknown estimation {estimation!r}; expected one "
        f"of {losses.ESTIMATIONS}.")
  check(not hasattr(batches, "__next__"), "batches must be re-iterable (a list, a sequence) "
        "or a function of the index; got an iterator.")
  key = jax.random.PRNGKey(0) if key is None else key
  first = next(iter(iterate_batches(batches, num_batches)), None)
  check(first is not None, "fit got no batches.")
  trace = trace_model(loss_fn, params, first, approximation, layers, auto_register,
                      max_factor_dim)
  run = functools.partial(_average, loss_fn, params=params, batches=batches,
                          num_batches=num_batches, estimation=estimation, key=key,
                          auto_register=auto_register, progress=progress)
  statistics, count = run(trace=_as_kron(trace), bases={}, label="fit")
  eigen = {l.name: eigen_block(l, statistics[l.name]) for l in trace.every_layer}
  ekfac = [l for l in trace.layers if l.approx == "ekfac"]
  if ekfac:  # second pass: the per-example gradients' second moment in the bases
    bases = {l.name: {"QA": eigen[l.name]["QA"], "QG": eigen[l.name]["QG"]} for l in ekfac}
    second, _ = run(trace=dataclasses.replace(trace, layers=tuple(ekfac), generic=()),
                    bases=bases, label="fit (EK-FAC)")
    for l in ekfac:
      statistics[l.name] = second[l.name]
      eigen[l.name] = {**bases[l.name], "values": second[l.name]["scaling"]}
  return FittedCurvature(statistics, eigen, jnp.asarray(count, config.state_dtype(params)),
                         trace)


def num_parameters(curvature: FittedCurvature) -> int:
  """D, the number of parameters the curvature covers."""
  return sum(math.prod(e["values"].shape) for e in curvature.eigen.values())
