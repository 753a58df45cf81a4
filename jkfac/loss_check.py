"""The loss-scale check: does `loss_fn` return the loss its registered losses describe?

K-FAC's curvature is that of the registered losses, `sum_r s_r NLL_r` over their rows
(the mean over rows of `weight * NLL`, or the masked sum over the mask sum; see
`losses.row_scales`), while the gradient is that of `loss_fn`. When the two disagree,
every update is off by their ratio: a per-sequence sum of `(N, T, C)` token losses makes
it T times too large, a sum over the batch N times. `check_loss_scale` compares them on
concrete values; `tx.init` runs it when it sees concrete parameters and example batch.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jkfac import interpreter, jaxprs, layer_table, losses, masking, tags
from jkfac.validation import shape_signature

PyTree = Any
LossFn = Callable[..., Any]

# The check warns when loss_fn's value and the registered losses' differ by more than this
# factor either way (an l2 term or other extra terms of loss_fn count too).
TOLERANCE = 1.5


class LossScaleWarning(UserWarning):
  """`loss_fn` returns a value far from the one its registered losses describe."""


def registered_values(loss_fn: LossFn, params: PyTree, batch: PyTree
                      ) -> tuple[jax.Array, jax.Array, list[tuple[str, tuple[int, ...], float]]]:
  """`(loss, registered, rows)`: the first leaf of `loss_fn(params, batch)` (the loss of a
  `(loss, aux)` output), the value its registered losses describe, and per registered
  loss its kind, prediction shape and number of counted rows (the mask's sum)."""
  closed, _ = layer_table.make_jaxpr(loss_fn, params, batch, auto_register=False)
  infos = [layer_table.loss_info(site) for site in jaxprs.find_tags(closed.jaxpr, {})
           if site.eqn.primitive is tags.loss_tag_p]
  args = jax.tree_util.tree_leaves(params) + jax.tree_util.tree_leaves(batch)
  outputs, recorded = interpreter.evaluate(closed, args, interpreter.zero_perturbations(closed))
  registered, rows = jnp.zeros([], jnp.float32), []
  for info, p, t, m, w in zip(infos, recorded.predictions, recorded.targets, recorded.masks,
                              recorded.row_weights):
    scale = losses.row_scales(p, info.weight, m, w)
    registered = registered + jnp.sum(scale * losses.nll(info.kind, p, t))
    counted = math.prod(tags.row_shape(p)) if m is None else jnp.sum(m)
    rows.append((info.kind, tuple(p.shape), counted))
  return outputs[0], registered, rows


def _hint(ratio: float, rows: list[tuple[str, tuple[int, ...], float]]) -> str:
  """What the ratio of the two values looks like, from the first loss's shape."""
  kind, shape, counted = rows[0]
  counted = float(counted)
  close = lambda k: k > 1 and abs(ratio / k - 1) < 0.15
  sums = [name for name, k in (("a per-sequence sum", counted / shape[0]),
                               ("a sum over the batch", shape[0]),
                               ("a sum over all rows", counted)) if close(k)]
  if sums:
    hint = (f" This looks like {' or '.join(dict.fromkeys(sums))}: use the mean over all rows "
            "(masked: the masked sum over the mask sum)")
    if len(shape) > 2 and close(counted / shape[0]):
      hint += (", or, where a sum over each example's positions is the loss you mean (e.g. "
               "a reconstruction summed over an image's pixels), register the prediction and "
               "its targets reshaped to (batch, -1), so that each example is one row")
    return hint + "."
  total = math.prod(shape[:-1]) if len(shape) > 1 else shape[0]
  if counted < total and abs(ratio * total / counted - 1) < 0.15:
    return (f" This looks like a mean over all {total} rows, padded ones included, while the "
            f"registered mask counts {counted:.0f}: divide the masked sum by the mask's sum "
            "(e.g. jnp.sum(loss * mask) / jnp.sum(mask)), or register no mask if padded "
            "rows should count.")
  if (losses.loss_kind(kind).sums_outputs and len(shape) > 1 and shape[-1] > 1
      and abs(ratio * shape[-1] - 1) < 0.15):
    return (" This looks like a mean over the last axis too: a registered row's loss is the "
            "sum over its outputs.")
  return ""


def check_loss_scale(loss_fn: LossFn, params: PyTree, batch: PyTree,
                     strict: bool = False) -> tuple[float, float]:
  """`(loss, registered)`: `loss_fn(params, batch)` and the value its registered losses
  describe (the sum over them of the mean over rows of `weight * NLL`, masked: the masked
  sum over the mask sum).

  Warns with a `LossScaleWarning` (with `strict`, raises `ValueError`) when they differ by
  more than a factor `TOLERANCE` (1.5): K-FAC's steps are then that far off, e.g. T times
  too large for a per-sequence sum of `(N, T, C)` token losses. The loss is the first
  leaf of `loss_fn`'s output (that of `(loss, aux)`). Needs values, not tracers.

  Examples:
    >>> loss, registered = jkfac.check_loss_scale(loss_fn, params, batch)
  """
  values = _evaluated(loss_fn, params, batch)
  if values is None:
    raise ValueError("check_loss_scale needs values of params and batch, not tracers: call it "
                     "outside jax.jit.")
  return _report(*values, strict)


def check_if_concrete(loss_fn: LossFn, params: PyTree, batch: PyTree | None,
                      strict: bool) -> None:
  """`check_loss_scale` where `params` and `batch` hold values (not tracers or shapes, not
  a masked view of the parameters) and `loss_fn` computes values from them; else nothing."""
  if batch is None or masking.is_masked(params) or not _concrete((params, batch)):
    return
  values = _evaluated(loss_fn, params, batch)
  if values is not None:
    _report(*values, strict)


def _concrete(tree: PyTree) -> bool:
  leaves = jax.tree_util.tree_leaves(tree)
  return bool(leaves) and all(isinstance(x, (np.ndarray, np.generic, jax.Array, int, float))
                              and not isinstance(x, jax.core.Tracer) for x in leaves)


@functools.lru_cache(maxsize=32)
def _compiled(loss_fn: LossFn):
  """`registered_values` of `loss_fn` as one jitted program (op by op, a new model's first
  check took seconds on CPU), and per input signature the losses' kinds and shapes."""
  static: dict[tuple, list[tuple[str, tuple[int, ...]]]] = {}

  def arrays(params, batch):
    loss, registered, rows = registered_values(loss_fn, params, batch)
    static[shape_signature((params, batch))] = [(kind, shape) for kind, shape, _ in rows]
    return loss, registered, [jnp.asarray(counted) for _, _, counted in rows]

  return jax.jit(arrays), static


def _evaluated(loss_fn: LossFn, params: PyTree, batch: PyTree):
  """`registered_values`, evaluated now; None where the results are tracers (`init`
  inside a jit trace)."""
  try:
    arrays, static = _compiled(loss_fn)
  except TypeError:  # an unhashable callable: compile for this call only
    arrays, static = _compiled.__wrapped__(loss_fn)
  loss, registered, counted = arrays(params, batch)
  if any(isinstance(x, jax.core.Tracer) for x in [loss, registered, *counted]):
    return None
  rows = static[shape_signature((params, batch))]
  return loss, registered, [(kind, shape, c) for (kind, shape), c in zip(rows, counted)]


def _report(loss: jax.Array, registered: jax.Array,
            rows: list[tuple[str, tuple[int, ...], float]], strict: bool) -> tuple[float, float]:
  """Warns (or raises) when the two values are more than `TOLERANCE` apart; returns them."""
  if jnp.ndim(loss) != 0:
    raise ValueError(f"check_loss_scale: loss_fn's output starts with an array of shape "
                     f"{jnp.shape(loss)}, not a scalar loss.")
  loss, registered = float(loss), float(registered)
  if not (math.isfinite(loss) and math.isfinite(registered)) or abs(registered) < 1e-30:
    return loss, registered
  ratio = loss / registered
  if 1 / TOLERANCE <= ratio <= TOLERANCE:
    return loss, registered
  message = (f"loss_fn returned {loss:.6g}, but its registered losses describe {registered:.6g} "
             f"(ratio {ratio:.4g}); K-FAC's curvature is that of the registered losses, so its "
             f"steps are about {ratio:.4g} times what they should be.{_hint(ratio, rows)} A "
             "registered loss is the mean over its rows (all axes but the last) of weight * "
             "NLL; extra terms of loss_fn, such as an l2 penalty, count too.")
  if strict:
    raise ValueError(message)
  warnings.warn(message, LossScaleWarning, stacklevel=3)
  return loss, registered
