"""Measuring optimizers: timed runs, targets, sweeps, skipped configurations, tables, plots.

Used by the examples (autoencoder.py, and through `benchmarks.compare` transformer_lm.py
and lstm.py) and by benchmarks/convergence.py; `benchmarks.progress` shows progress and
writes CSV.

The clock: `run` times real training steps (the jitted step, its state threaded through,
parameters updated), synchronised with `jax.block_until_ready` every `sync_every` steps
(default 1: every step). Compilation happens before the clock starts: two warm-up calls on
the first batch whose results are discarded, so every recorded step is a real one, from the
initial state, on the batches in their order. Host work between synchronisations --
assembling the next batches, evaluation, progress display -- is outside the clock;
dispatching the steps and the batches' host-to-device transfer are inside. Within a block of
`sync_every` steps the per-step times are the block's time spread evenly.

Divergence: a run whose training loss becomes non-finite or passes `DIVERGE_FACTOR` times
its first loss stops at that step; one whose state at the end is not finite is diverged too.
A diverged run is reported as such and never reaches a target.

Targets (`Target`, `Run.hit`, `time_to_target`): the training loss is smoothed by a trailing
running mean over `WINDOW` steps (fewer at the start), and a run reaches a loss target at the
first step whose mean is at most the target; an evaluation metric (already a mean over an
eval set) is used as evaluated, at the evaluated steps. No interpolation between points.

Smoke mode (`JKFAC_SMOKE=1`, how the tests run the documented commands): `try_build` builds
the first configuration it is asked for per loss function (the one-call default heads every
K-FAC table) and reports the others skipped, so a benchmark compiles one K-FAC step per model.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import progress as _progress

StepFn = Callable[[Any, Any], tuple[Any, jax.Array]]  # (state, batch) -> (state, loss)
EvalFn = Callable[[Any], Mapping[str, float]]          # state -> metrics
WINDOW = 20           # steps in the running mean of the training loss
DIVERGE_FACTOR = 10.0  # a loss above this times the first one means divergence


class Eval(NamedTuple):
  """One evaluation: after `step`, `seconds` of training in."""
  step: int
  seconds: float
  metrics: dict[str, float]


class Hit(NamedTuple):
  """Where a curve first reached its target."""
  step: int
  seconds: float


class Skipped(NamedTuple):
  """A configuration the installed library cannot build, and why."""
  reason: str


class Target(NamedTuple):
  """A level to reach; the ratios' unit is `reference`'s (a run label) own arrival.

  `metric` None: the training loss, smoothed (module doc); else that evaluation metric.
  """
  name: str
  value: float
  reference: str
  metric: str | None = None
  higher_is_better: bool = False


@dataclasses.dataclass
class Run:
  """One training run: per-step losses, cumulative training seconds, evaluations.

  `seconds[i]` is the training time after the `i + 1`-th recorded step, `start` the step
  before the first (a resumed run's); `state` is the final state.
  """
  losses: np.ndarray
  seconds: np.ndarray
  evals: list[Eval]
  diverged: bool
  compile_seconds: float = 0.0
  state: Any = None
  start: int = 0

  @property
  def steps(self) -> np.ndarray:
    return self.start + np.arange(1, len(self.losses) + 1)

  @property
  def ms_per_step(self) -> float:
    return 1e3 * float(self.seconds[-1]) / len(self.seconds) if len(self.seconds) else math.nan

  def final_loss(self, window: int = WINDOW) -> float:
    """The mean of the last `window` training losses (NaN for none)."""
    return float(np.mean(self.losses[-window:])) if len(self.losses) else math.nan

  def final_metric(self, metric: str) -> float:
    """The last evaluation's `metric` (NaN if never evaluated)."""
    return float(self.evals[-1][2].get(metric, math.nan)) if self.evals else math.nan

  def score(self, metric: str | None = None) -> float:
    """`final_loss()` (metric None) or `final_metric(metric)`; NaN if diverged."""
    if self.diverged:
      return math.nan
    return self.final_loss() if metric is None else self.final_metric(metric)

  def hit(self, target: Target, window: int = WINDOW) -> Hit | None:
    """Where this run first reaches `target` (module doc); None if never or diverged."""
    if self.diverged:
      return None
    if target.metric is None:
      return time_to_target(self.losses, self.seconds, target.value, window=window,
                            steps=self.steps)
    evals = [(s, t, m[target.metric]) for s, t, m in self.evals if target.metric in m]
    if not evals:
      return None
    steps, seconds, values = zip(*evals)
    return time_to_target(values, seconds, target.value, window=1, steps=steps,
                          higher_is_better=target.higher_is_better)


# -- Training ------------------------------------------------------------------------------

def make_step(loss_fn: Callable[[Any, Any], jax.Array],
              tx: optax.GradientTransformation) -> StepFn:
  """The jitted train step on `(params, opt_state)`; every optimizer gets the batch."""
  tx = optax.with_extra_args_support(tx)

  @jax.jit
  def step(state, batch):
    params, opt_state = state
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params, batch=batch)  # K-FAC's batch.
    return (optax.apply_updates(params, updates), opt_state), loss

  return step


def is_diverged(losses: Sequence[float], first: float,
                factor: float = DIVERGE_FACTOR) -> bool:
  """Whether a loss is not finite or passes `factor` times the `first` loss."""
  losses = np.asarray(losses, np.float64)
  return bool(np.any(~np.isfinite(losses)) or np.any(losses > factor * abs(first)))


def finite_state(state: Any) -> bool:
  """Whether every floating-point leaf of `state` is finite."""
  leaves = [x for x in jax.tree_util.tree_leaves(state)
            if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  return all(bool(jnp.all(jnp.isfinite(x))) for x in leaves)


def run(step_fn: StepFn, init_state: Any, batches: Iterable[Any], eval_fn: EvalFn | None = None,
        *, steps: int, eval_every: int = 0, sync_every: int = 1,
        diverge_factor: float = DIVERGE_FACTOR,
        progress: _progress.Progress | None = None) -> Run:
  """Trains `steps` steps of `step_fn` from `init_state` on `batches`; see the module doc.

  `eval_fn(state)` runs off the clock at the first synchronisation at or after each multiple
  of `eval_every` (0: none) and after the last step. `progress.update(step, loss=...)` gets
  every step after its synchronisation, with the evaluation's metrics at evaluated steps.
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
    diverged = is_diverged(block_losses, losses[0], diverge_factor)
    done = len(losses)
    if done == steps:
      diverged = diverged or not finite_state(state)
    metrics = {}
    if eval_fn is not None and not diverged and (
        done == steps or _eval_due(done, len(block), eval_every)):
      metrics = dict(eval_fn(state))
      evals.append(Eval(done, elapsed, metrics))
    if progress is not None:
      for i, loss in enumerate(block_losses, done - len(block) + 1):
        progress.update(i, loss=loss, **(metrics if i == done else {}))
  return Run(np.asarray(losses), np.asarray(seconds), evals, diverged, compile_seconds, state)


def train(loss_fn: Callable[[Any, Any], jax.Array], tx: optax.GradientTransformation,
          params: Any, batches: Iterable[Any], eval_fn: EvalFn | None = None, *, label: str,
          steps: int, eval_every: int = 0, sync_every: int = 1, log_every: int = 50,
          quiet: bool = False) -> Run:
  """`run` of `make_step(loss_fn, tx)` from `(params, tx.init(params))`, showing a
  `_progress.Progress` named `label` (a line every `log_every` steps off a terminal)."""
  step, state = make_step(loss_fn, tx), (params, tx.init(params))
  kwargs = dict(steps=steps, eval_every=eval_every, sync_every=sync_every)
  if quiet:
    return run(step, state, batches, eval_fn, **kwargs)
  with _progress.Progress(steps, label, every=log_every) as progress:
    return run(step, state, batches, eval_fn, progress=progress, **kwargs)


def _prepend(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
  yield first
  yield from rest


def _eval_due(done: int, block: int, every: int) -> bool:
  """Whether a multiple of `every` lies in the last `block` steps up to `done`."""
  return every > 0 and done // every > (done - block) // every


# -- Targets -------------------------------------------------------------------------------

def running_mean(values: Sequence[float], window: int = WINDOW) -> np.ndarray:
  """`out[i]` = mean of `values[max(0, i - window + 1) : i + 1]`."""
  values = np.asarray(values, np.float64)
  if window < 1:
    raise ValueError(f"window must be >= 1, got {window}")
  sums = np.cumsum(np.concatenate([[0.0], values]))
  ends = np.arange(1, len(values) + 1)
  starts = np.maximum(0, ends - window)
  return (sums[ends] - sums[starts]) / (ends - starts)


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


def _ratio(hit: Hit | None, ref: Hit | None, field: str) -> float | None:
  if hit is None or ref is None or getattr(ref, field) <= 0:
    return None
  return getattr(hit, field) / getattr(ref, field)


# -- Sweeps and configurations -------------------------------------------------------------

class Sweep(NamedTuple):
  """Runs (or `Skipped`) over a hyperparameter, and the best value (None if none finished)."""
  best: Any
  runs: dict[Any, Run | Skipped]


def sweep(run_one: Callable[[Any], Run | Skipped], values: Iterable[Any],
          metric: str | None = None) -> Sweep:
  """Runs `run_one(value)` for each value; the best has the lowest `Run.score(metric)` (the
  final running-mean training loss, or the final eval `metric`) among the finished runs."""
  runs = {value: run_one(value) for value in values}
  scores = {v: r.score(metric) for v, r in runs.items() if isinstance(r, Run)}
  scores = {v: s for v, s in scores.items() if math.isfinite(s)}
  return Sweep(min(scores, key=scores.get) if scores else None, runs)


def _unsupported_keyword(factory: Callable[..., Any], kwargs: Mapping[str, Any]) -> str | None:
  params = inspect.signature(factory).parameters
  if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
    return None
  return next((k for k in kwargs if k not in params), None)


_SMOKE_BUILT: list[Any] = []  # the loss functions (first arguments) built for in smoke mode


def try_build(factory: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
  """`factory(*args, **kwargs)`, or `Skipped(reason)` when the installed version takes no such
  keyword (TypeError) or rejects a value (ValueError) at construction, or, in smoke mode
  (`JKFAC_SMOKE` set), when a configuration was already built for this first argument."""
  keyword = _unsupported_keyword(factory, kwargs)
  if keyword is not None:
    return Skipped(f"unsupported keyword {keyword}")
  if os.environ.get("JKFAC_SMOKE") and args:
    if any(built is args[0] for built in _SMOKE_BUILT):
      return Skipped("smoke mode: one configuration per model")
    _SMOKE_BUILT.append(args[0])
  try:
    return factory(*args, **kwargs)
  except TypeError as e:
    return Skipped(f"unsupported arguments ({e})")
  except ValueError as e:
    return Skipped(f"unsupported value ({e})")


# -- Output --------------------------------------------------------------------------------

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


def status(r: Run | Skipped) -> str:
  if isinstance(r, Skipped):
    return f"skipped: {r.reason}"
  return "diverged" if r.diverged else f"ok ({len(r.losses)} steps)"


def run_headers(metrics: Sequence[str] = (), window: int = WINDOW) -> list[str]:
  return (["run", f"train loss (last {window})"] + [m.replace("_", " ") for m in metrics]
          + ["ms/step", "status"])


def run_rows(runs: Mapping[str, Run | Skipped], metrics: Sequence[str] = (),
             best: Iterable[str] = (), window: int = WINDOW) -> list[list[Any]]:
  """Per run: final training loss, the last evaluation's `metrics`, ms/step, status."""
  best, rows = set(best), []
  for label, r in runs.items():
    mark = " (best)" if label in best else ""
    if isinstance(r, Skipped):
      rows.append([label] + [None] * (len(metrics) + 2) + [status(r)])
      continue
    rows.append([label, r.final_loss(window)] + [r.final_metric(m) for m in metrics]
                + [r.ms_per_step, status(r) + mark])
  return rows


def target_headers(targets: Sequence[Target], metrics: Sequence[str] = (),
                   window: int = WINDOW) -> list[str]:
  headers = ["run", f"train loss (last {window})"] + [m.replace("_", " ") for m in metrics]
  headers.append("ms/step")
  for t in targets:
    ref = t.reference.split()[0]
    headers += [f"steps to {t.name}", f"s to {t.name}", f"steps x {ref}", f"s x {ref}"]
  return headers + ["status"]


def target_rows(runs: Mapping[str, Run | Skipped], targets: Sequence[Target],
                metrics: Sequence[str] = (), window: int = WINDOW) -> list[list[Any]]:
  """Per run: `run_rows`' columns less status, then per target steps and seconds to it and
  their ratios to the target's reference run, then the status."""
  refs = [runs[t.reference].hit(t, window) if isinstance(runs.get(t.reference), Run)
          else None for t in targets]
  rows = []
  for label, r in runs.items():
    if isinstance(r, Skipped):
      rows.append([label] + [None] * (len(metrics) + 2 + 4 * len(targets)) + [status(r)])
      continue
    row = [label, r.final_loss(window)] + [r.final_metric(m) for m in metrics] + [r.ms_per_step]
    hits = [r.hit(t, window) for t in targets]
    for hit, ref in zip(hits, refs):
      row += [hit and hit.step, hit and hit.seconds, _ratio(hit, ref, "step"),
              _ratio(hit, ref, "seconds")]
    reached = "" if r.diverged or all(hits) else ", target not reached"
    rows.append(row + [status(r) + reached])
  return rows


def write_csv(path: str, runs: Mapping[str, Run | Skipped], metrics: Sequence[str] = ()) -> None:
  """One row per training step of every run: run, step, seconds, train_loss, then the
  evaluation `metrics`, empty where not evaluated. Skipped configurations have none."""
  with _progress.MetricsCSV(path, ["run", "step", "seconds", "train_loss", *metrics]) as table:
    for label, r in runs.items():
      if not isinstance(r, Run):
        continue
      evals = {int(step): m for step, _, m in r.evals}
      for step, seconds, loss in zip(r.steps, r.seconds, r.losses):
        row = {m: f"{evals[int(step)][m]:.6g}" for m in metrics
               if m in evals.get(int(step), {})}
        table.write(run=label, step=int(step), seconds=f"{seconds:.6f}",
                    train_loss=f"{loss:.6g}", **row)
  print(f"wrote {path}", flush=True)


def plot(panels: Mapping[str, Mapping[str, Run | Skipped]], path: str, window: int = WINDOW,
         eval_metric: str | None = None) -> None:
  """Per panel (a row): the running-mean training loss against steps and against seconds,
  log y, one line per run, and dots of `eval_metric` where a run evaluated it. Skipped and
  diverged runs are left out."""
  import matplotlib  # Lazy: only plotting needs it.
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(len(panels), 2, figsize=(11, 3.6 * len(panels)), squeeze=False)
  for (title, runs), (by_step, by_time) in zip(panels.items(), axes):
    for label, r in runs.items():
      if not isinstance(r, Run) or r.diverged or not len(r.losses):
        continue
      smooth = running_mean(r.losses, window)
      line, = by_step.plot(r.steps, smooth, label=label, linewidth=1)
      by_time.plot(r.seconds, smooth, label=label, linewidth=1)
      evals = [(s, t, m[eval_metric]) for s, t, m in r.evals if eval_metric in m]
      if evals:
        steps, seconds, values = zip(*evals)
        for ax, x in ((by_step, steps), (by_time, seconds)):
          ax.plot(x, values, color=line.get_color(), marker=".", linestyle="--", linewidth=0.6)
    by_step.set_xlabel("step")
    by_time.set_xlabel("training seconds (compilation excluded)")
    eval_note = f"; dots: {eval_metric.replace('_', ' ')}" if eval_metric else ""
    for ax in (by_step, by_time):
      ax.set_title(title, fontsize=10)
      ax.set_ylabel(f"training loss (mean of {window}){eval_note}", fontsize=8)
      ax.set_yscale("log")
      ax.grid(True, alpha=0.3)
      ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  print(f"wrote {path}", flush=True)
