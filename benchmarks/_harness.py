"""Timing and target helpers shared by the convergence benchmark and the autoencoder example.

The clock: `run` times real training steps (the jitted step, its state threaded through,
parameters updated), synchronised with `jax.block_until_ready` every `sync_every` steps
(default 1: every step). Compilation happens before the clock starts (two warm-up calls
whose results are discarded). Host work between synchronisations -- assembling the next
batches, evaluation, progress display -- is outside the clock; dispatching the steps and
the batches' host-to-device transfer are inside. Within a block of `sync_every` steps the
per-step times are the block's time spread evenly.

Targets: a loss curve reaches `target` at the first step whose trailing running mean (over
`window` steps, fewer at the start) is at most `target`. A run whose loss becomes non-finite
or grows past `diverge_factor` times its first loss, or whose final state is not finite, is
diverged: it is reported as such and its times are never used.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

StepFn = Callable[[Any, Any], tuple[Any, jax.Array]]  # (state, batch) -> (state, loss)
EvalFn = Callable[[Any], Mapping[str, float]]          # state -> metrics
WINDOW = 20  # steps in the running mean of the training loss


@dataclasses.dataclass
class Run:
  """One training run: per-step losses, cumulative training seconds, evaluations.

  `seconds[i]` is the training time after step `i + 1`; `evals` holds
  `(step, seconds, metrics)` for each evaluation; `state` is the final state.
  """
  losses: np.ndarray
  seconds: np.ndarray
  evals: list[tuple[int, float, dict[str, float]]]
  diverged: bool
  compile_seconds: float
  sync_every: int
  state: Any = None

  @property
  def steps(self) -> np.ndarray:
    return np.arange(1, len(self.losses) + 1)

  @property
  def ms_per_step(self) -> float:
    return 1e3 * float(self.seconds[-1]) / len(self.seconds) if len(self.seconds) else math.nan


class Hit(NamedTuple):
  """Where a curve first reached its target."""
  step: int
  seconds: float


class Skipped(NamedTuple):
  """A configuration the installed library cannot build, and why."""
  reason: str


def _finite_state(state: Any) -> bool:
  leaves = [x for x in jax.tree_util.tree_leaves(state)
            if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  return all(bool(jnp.all(jnp.isfinite(x))) for x in leaves)


def _is_diverged(losses: np.ndarray, first: float, factor: float) -> bool:
  return bool(np.any(~np.isfinite(losses)) or np.any(losses > factor * abs(first)))


def run(step_fn: StepFn, init_state: Any, batches: Iterable[Any], eval_fn: EvalFn | None = None,
        *, steps: int, eval_every: int = 0, sync_every: int = 1, diverge_factor: float = 10.0,
        on_sync: Callable[[int, float, float], None] | None = None) -> Run:
  """Trains `steps` steps of `step_fn` from `init_state` on `batches`; see the module doc.

  `eval_fn(state)` runs off the clock at the first synchronisation at or after each multiple
  of `eval_every` (0: none) and after the last step. `on_sync(step, loss, seconds)` is
  called after each synchronisation.
  """
  if steps < 1 or sync_every < 1:
    raise ValueError(f"steps and sync_every must be >= 1, got {steps}, {sync_every}")
  batches = iter(batches)
  first_batch = next(batches)
  start = time.perf_counter()
  warm, _ = step_fn(init_state, first_batch)  # compiles; the second call catches a retrace
  jax.block_until_ready(step_fn(warm, first_batch))
  compile_seconds = time.perf_counter() - start
  del warm
  pending = _prepend(first_batch, batches)
  state, losses, seconds, evals = init_state, [], [], []
  elapsed, diverged = 0.0, False
  while len(losses) < steps and not diverged:
    block = [next(pending) for _ in range(min(sync_every, steps - len(losses)))]
    start = time.perf_counter()
    block_losses = []
    for batch in block:
      state, loss = step_fn(state, batch)
      block_losses.append(loss)
    block_losses = np.asarray(jax.block_until_ready(jnp.stack(block_losses)), np.float64)
    block_time = time.perf_counter() - start
    seconds.extend(elapsed + block_time * np.arange(1, len(block) + 1) / len(block))
    elapsed += block_time
    losses.extend(block_losses)
    diverged = _is_diverged(block_losses, losses[0], diverge_factor)
    if on_sync is not None:
      on_sync(len(losses), float(block_losses[-1]), elapsed)
    if eval_fn is not None and not diverged and _eval_due(len(losses), len(block), eval_every):
      evals.append((len(losses), elapsed, dict(eval_fn(state))))
  diverged = diverged or not _finite_state(state)
  if eval_fn is not None and not diverged and (not evals or evals[-1][0] != len(losses)):
    evals.append((len(losses), elapsed, dict(eval_fn(state))))
  return Run(np.asarray(losses), np.asarray(seconds), evals, diverged, compile_seconds,
             sync_every, state)


def _prepend(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
  yield first
  yield from rest


def _eval_due(done: int, block: int, every: int) -> bool:
  """Whether a multiple of `every` lies in the last `block` steps up to `done`."""
  return every > 0 and done // every > (done - block) // every


def running_mean(values: Sequence[float], window: int = WINDOW) -> np.ndarray:
  """`out[i]` = mean of `values[max(0, i - window + 1) : i + 1]`."""
  values = np.asarray(values, np.float64)
  if window < 1:
    raise ValueError(f"window must be >= 1, got {window}")
  sums = np.cumsum(np.concatenate([[0.0], values]))
  ends = np.arange(1, len(values) + 1)
  starts = np.maximum(0, ends - window)
  return (sums[ends] - sums[starts]) / (ends - starts)


def final_loss(losses: Sequence[float], window: int = WINDOW) -> float:
  """The mean of the last `window` losses (NaN for none)."""
  return float(np.mean(losses[-window:])) if len(losses) else math.nan


def time_to_target(values: Sequence[float], seconds: Sequence[float], target: float, *,
                   window: int = WINDOW, steps: Sequence[int] | None = None,
                   higher_is_better: bool = False) -> Hit | None:
  """The first (step, seconds) where the running mean of `values` reaches `target`.

  `steps` defaults to 1, 2, ...; pass it for sparse curves (evaluations), with `window=1`.
  None if the target is never reached (or is NaN).
  """
  smooth = running_mean(values, window)
  reached = smooth >= target if higher_is_better else smooth <= target
  if not reached.any():
    return None
  i = int(np.argmax(reached))
  step = int(steps[i]) if steps is not None else i + 1
  return Hit(step, float(seconds[i]))


class Sweep(NamedTuple):
  """Runs of one optimizer over a hyperparameter, and the best value (None if all diverged)."""
  best: Any
  runs: dict[Any, Run]


def sweep(run_one: Callable[[Any], Run], values: Iterable[Any], window: int = WINDOW) -> Sweep:
  """Runs `run_one(value)` for each value; the best has the lowest final running-mean loss
  among the runs that did not diverge."""
  runs = {value: run_one(value) for value in values}
  finite = {v: final_loss(r.losses, window) for v, r in runs.items() if not r.diverged}
  return Sweep(min(finite, key=finite.get) if finite else None, runs)


def _unsupported_keyword(factory: Callable[..., Any], kwargs: Mapping[str, Any]) -> str | None:
  params = inspect.signature(factory).parameters
  if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
    return None
  return next((k for k in kwargs if k not in params), None)


def try_build(factory: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
  """`factory(*args, **kwargs)`, or `Skipped(reason)` when the installed version takes no such
  keyword (TypeError) or rejects a value (ValueError) at construction."""
  keyword = _unsupported_keyword(factory, kwargs)
  if keyword is not None:
    return Skipped(f"unsupported keyword {keyword}")
  try:
    return factory(*args, **kwargs)
  except TypeError as e:
    return Skipped(f"unsupported arguments ({e})")
  except ValueError as e:
    return Skipped(f"unsupported value ({e})")


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
  """A Markdown table; floats with 4 significant digits, None as '-'."""
  def cell(x: Any) -> str:
    if x is None:
      return "-"
    if isinstance(x, float):
      return "nan" if math.isnan(x) else f"{x:.4g}"
    return str(x)

  body = [[cell(x) for x in row] for row in rows]
  widths = [max([len(h)] + [len(r[i]) for r in body]) for i, h in enumerate(headers)]
  line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
  rule = "| " + " | ".join("-" * w for w in widths) + " |"
  return "\n".join([line(headers), rule] + [line(r) for r in body])


def plot(panels: Mapping[str, Mapping[str, Run]], path: str, window: int = WINDOW) -> None:
  """Running-mean training loss against steps and against seconds, log y; one row per panel
  title, one line per run. Diverged runs are left out."""
  import matplotlib  # Lazy: only plotting needs it.
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(len(panels), 2, figsize=(11, 3.6 * len(panels)), squeeze=False)
  for (title, runs), (by_step, by_time) in zip(panels.items(), axes):
    for label, r in runs.items():
      if r.diverged or not len(r.losses):
        continue
      smooth = running_mean(r.losses, window)
      by_step.plot(r.steps, smooth, label=label, linewidth=1)
      by_time.plot(r.seconds, smooth, label=label, linewidth=1)
    by_step.set_xlabel("step")
    by_time.set_xlabel("training seconds (compilation excluded)")
    for ax in (by_step, by_time):
      ax.set_title(title, fontsize=10)
      ax.set_ylabel(f"training loss (mean of {window})")
      ax.set_yscale("log")
      ax.grid(True, alpha=0.3)
      ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
