"""The harness of the sequence examples: timed optimizer sweeps, CSV, plot and summary.

An example describes what it trains as a `Task` and which optimizers it compares as
`OptimizerSpec`s; `main` parses the shared flags, runs every optimizer at every learning
rate of its sweep from the same initialization on the same batches, and prints a summary
with K-FAC's time to reach each other optimizer's final eval loss (`time_to_target`).

Timing: the whole train step is one `jax.jit`; the clock covers the step calls only
(blocked on the loss), starting after the compiling first step and paused for evals. A
run whose training loss is not finite or passes `Task.max_loss` stops and is reported as
diverged; the diverging step is neither recorded nor timed.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import time
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import jax
import numpy as np
import optax

import jkfac

Params = Any
Batch = Any
CSV_COLUMNS = ("optimizer", "lr", "step", "seconds", "train_loss", "eval_loss")


@dataclasses.dataclass(frozen=True)
class Task:
  """What an example trains; `loss_fn` registers its loss for K-FAC."""
  title: str
  loss_fn: Callable[[Params, Batch], jax.Array]
  init_params: Callable[[jax.Array], Params]
  train_batches: Callable[[int], Iterator[Batch]]  # seed -> the same stream for every run
  eval_batches: Sequence[Batch]
  max_loss: float  # A training loss above this (or not finite) means the run diverged.
  muon_dimension_numbers: Callable[[Params], Any] | None = None


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
  """An optimizer of the comparison: its label, default learning rate and sweep."""
  name: str
  label: str
  learning_rate: float
  sweep: tuple[float, ...]
  make: Callable[[float, Task, Batch, argparse.Namespace], optax.GradientTransformation]


class Curve(NamedTuple):
  """A loss curve: the loss at each of `steps`, `seconds` of training in."""
  steps: Sequence[float]
  seconds: Sequence[float]
  losses: Sequence[float]


@dataclasses.dataclass
class Run:
  """The history of one optimizer at one learning rate."""
  optimizer: str
  lr: float
  train: Curve
  eval: Curve
  diverged: bool

  @property
  def final_eval_loss(self) -> float:
    return float(self.eval.losses[-1]) if self.eval.losses and not self.diverged else math.nan

  def final_train_loss(self, window: int) -> float:
    """The mean training loss of the last `window` steps (NaN if diverged)."""
    losses = self.train.losses[-window:]
    return float(np.mean(losses)) if losses and not self.diverged else math.nan

  @property
  def total_seconds(self) -> float:
    return float(self.train.seconds[-1]) if self.train.seconds else 0.0

  @property
  def steps_per_second(self) -> float:
    timed = len(self.train.steps) - 1  # The first step compiles and is not timed.
    return timed / self.total_seconds if timed > 0 and self.total_seconds > 0 else math.nan


# -- Time to target ------------------------------------------------------------------------

def time_to_target(curve: Curve, target: float) -> tuple[float, float] | None:
  """`(step, seconds)` at which `curve` first reaches `target`, or None if it never does.

  Linear interpolation between the last point above the target and the first at or
  below it; a curve that starts at or below the target reaches it at its first point.
  """
  for i, loss in enumerate(curve.losses):
    if loss <= target:
      if i == 0:
        return float(curve.steps[0]), float(curve.seconds[0])
      before = curve.losses[i - 1]
      f = (before - target) / (before - loss)  # before > target >= loss, so 0 < f <= 1.
      step = curve.steps[i - 1] + f * (curve.steps[i] - curve.steps[i - 1])
      seconds = curve.seconds[i - 1] + f * (curve.seconds[i] - curve.seconds[i - 1])
      return float(step), float(seconds)
  return None


class Comparison(NamedTuple):
  """How fast a candidate reaches a reference's final loss, against the reference itself."""
  target: float
  steps: float | None     # The candidate's; None if it never reaches the target.
  seconds: float | None
  reference_steps: float  # The reference's own first arrival at its final loss.
  reference_seconds: float

  @property
  def step_ratio(self) -> float:
    return self.steps / self.reference_steps if self.steps is not None else math.nan

  @property
  def seconds_ratio(self) -> float:
    if self.seconds is None or self.reference_seconds <= 0:
      return math.nan
    return self.seconds / self.reference_seconds


def compare(candidate: Curve, reference: Curve) -> Comparison:
  """The candidate's steps and seconds to reach `reference`'s last loss, and the reference's."""
  target = float(reference.losses[-1])
  reference_steps, reference_seconds = time_to_target(reference, target)
  reached = time_to_target(candidate, target)
  steps, seconds = reached if reached is not None else (None, None)
  return Comparison(target, steps, seconds, reference_steps, reference_seconds)


# -- Optimizers ----------------------------------------------------------------------------

def kfac_spec(learning_rate: float, sweep: tuple[float, ...]) -> OptimizerSpec:
  """jkfac.kfac with the --damping / --momentum / cadence flags and --kfac-kwargs."""

  def make(lr, task, example_batch, args):
    kwargs = dict(damping=args.damping, momentum=args.momentum,
                  momentum_type=args.momentum_type, cov_update_every=args.cov_update_every,
                  invert_every=args.invert_every, seed=args.seed)
    kwargs.update(args.kfac_kwargs)
    return jkfac.kfac(task.loss_fn, example_batch, learning_rate=lr, **kwargs)

  return OptimizerSpec("kfac", "K-FAC", learning_rate, sweep, make)


def adam_spec(learning_rate: float, sweep: tuple[float, ...]) -> OptimizerSpec:
  return OptimizerSpec("adam", "Adam", learning_rate, sweep,
                       lambda lr, task, batch, args: optax.adam(lr))


def adamw_spec(learning_rate: float, sweep: tuple[float, ...]) -> OptimizerSpec:
  return OptimizerSpec("adamw", "AdamW", learning_rate, sweep,
                       lambda lr, task, batch, args: optax.adamw(
                           lr, weight_decay=args.weight_decay))


def muon_spec(learning_rate: float, sweep: tuple[float, ...]) -> OptimizerSpec:
  """optax.contrib.muon; parameters outside `Task.muon_dimension_numbers` get its Adam."""

  def make(lr, task, batch, args):
    return optax.contrib.muon(lr, adam_learning_rate=args.muon_adam_lr,
                              muon_weight_dimension_numbers=task.muon_dimension_numbers)

  return OptimizerSpec("muon", "Muon", learning_rate, sweep, make)


# -- Training ------------------------------------------------------------------------------

def make_train_step(loss_fn, tx: optax.GradientTransformation):
  """`(params, opt_state, batch) -> (params, opt_state, loss)`, to jit whole."""
  tx = optax.with_extra_args_support(tx)

  def train_step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params, batch=batch)  # K-FAC's batch.
    return optax.apply_updates(params, updates), opt_state, loss

  return train_step


def make_evaluate(loss_fn, batches: Sequence[Batch]) -> Callable[[Params], float]:
  """The mean of `loss_fn` over a fixed list of equally shaped batches."""
  batch_loss = jax.jit(loss_fn)

  def evaluate(params) -> float:
    return float(np.mean([float(batch_loss(params, batch)) for batch in batches]))

  return evaluate


def train_run(task: Task, spec: OptimizerSpec, lr: float, args: argparse.Namespace,
              progress) -> Run:
  """Trains `spec` at `lr` for `args.steps` steps; evaluates every `args.eval_every`."""
  params = task.init_params(jax.random.PRNGKey(args.seed))
  batches = task.train_batches(args.seed)
  first = next(batches)
  tx = spec.make(lr, task, first, args)
  opt_state = tx.init(params)
  train_step = jax.jit(make_train_step(task.loss_fn, tx))
  evaluate = make_evaluate(task.loss_fn, task.eval_batches)
  train, evals = Curve([], [], []), Curve([], [], [])
  bar = progress.add_task(f"{spec.name} lr {lr:g}", total=args.steps, loss="-", rate="-")
  clock, batch, diverged = 0.0, first, False
  for step in range(1, args.steps + 1):
    start = time.perf_counter()
    new_params, new_state, loss = train_step(params, opt_state, batch)
    loss = float(loss)  # Waits for the step.
    if step > 1:  # Step 1 compiles.
      clock += time.perf_counter() - start
    if not loss <= task.max_loss:  # Also catches NaN.
      progress.console.print(f"{spec.name} lr {lr:g}: step {step}: loss {loss:.3g}, "
                             "diverged; stopping")
      diverged = True
      break
    params, opt_state = new_params, new_state
    for values, value in zip(train, (step, clock, loss)):
      values.append(value)
    if step % args.eval_every == 0 or step == args.steps:
      for values, value in zip(evals, (step, clock, evaluate(params))):
        values.append(value)
      progress.console.print(f"{spec.name} lr {lr:g} step {step:5d}  train "
                             f"{np.mean(train.losses[-args.eval_every:]):.4f}  eval "
                             f"{evals.losses[-1]:.4f}  {clock:6.1f} s")
    rate = (step - 1) / clock if clock > 0 else math.nan
    progress.update(bar, advance=1, loss=f"{loss:.3f}", rate=f"{rate:.1f}")
    batch = next(batches)
  return Run(spec.name, lr, train, evals, diverged)


def learning_rates(spec: OptimizerSpec, args: argparse.Namespace) -> tuple[float, ...]:
  if args.sweep:
    return spec.sweep
  return (args.lr if args.lr is not None else spec.learning_rate,)


def best_run(runs: Sequence[Run]) -> Run | None:
  """The run with the lowest final eval loss, among those that did not diverge."""
  finished = [run for run in runs if not run.diverged and run.eval.losses]
  return min(finished, key=lambda run: run.final_eval_loss) if finished else None


# -- Output --------------------------------------------------------------------------------

def write_csv(runs: Sequence[Run], path: str) -> None:
  """One row per training step of every run; `eval_loss` is empty where not evaluated."""
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(CSV_COLUMNS)
    for run in runs:
      evals = dict(zip(run.eval.steps, run.eval.losses))
      for step, seconds, loss in zip(*run.train):
        writer.writerow([run.optimizer, f"{run.lr:g}", step, f"{seconds:.4f}", f"{loss:.6g}",
                         f"{evals[step]:.6g}" if step in evals else ""])
  print(f"wrote {path}", flush=True)


def plot(task: Task, runs: Sequence[Run], best: dict[str, Run | None], path: str) -> None:
  """Eval loss (and smoothed training loss) against steps and seconds; sweeps faint."""
  import matplotlib  # Lazy: only --plot needs it.
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  colors = dict(zip(best, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
  for run in runs:
    is_best = best.get(run.optimizer) is run
    for ax, x_eval, x_train in zip(axes, (run.eval.steps, run.eval.seconds),
                                   (run.train.steps, run.train.seconds)):
      label = f"{run.optimizer} lr {run.lr:g}" + (" (best)" if is_best else "")
      ax.plot(x_eval, run.eval.losses, color=colors[run.optimizer], marker="." if is_best else "",
              linewidth=1.5 if is_best else 0.8, alpha=1.0 if is_best else 0.35, label=label)
      if is_best:
        ax.plot(x_train, smooth(run.train.losses), color=colors[run.optimizer], linewidth=0.6,
                alpha=0.5)
  axes[0].set_xlabel("step")
  axes[1].set_xlabel("training seconds (after the compiling first step)")
  for ax in axes:
    ax.set_ylabel("eval loss (lines: train, smoothed)")
    ax.grid(True, alpha=0.3)
  axes[0].legend(fontsize=7)
  fig.suptitle(task.title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  print(f"wrote {path}", flush=True)


def smooth(values: Sequence[float], decay: float = 0.9) -> list[float]:
  """A bias-corrected exponential moving average, for plotting noisy batch losses."""
  out, average = [], 0.0
  for i, value in enumerate(values):
    average = decay * average + (1 - decay) * value
    out.append(average / (1 - decay ** (i + 1)))
  return out


def summary(specs: dict[str, OptimizerSpec], runs: Sequence[Run], best: dict[str, Run | None],
            window: int) -> list[str]:
  """The summary table's lines, then K-FAC's time to each other optimizer's final loss."""
  lines = [f"{'optimizer':<10} {'best lr':>8} {'train loss':>10} {'eval loss':>10} "
           f"{'seconds':>8} {'steps/s':>8} {'diverged':>8}"]
  for name, run in best.items():
    tried = [r for r in runs if r.optimizer == name]
    diverged = f"{sum(r.diverged for r in tried)}/{len(tried)}"
    if run is None:
      lines.append(f"{name:<10} {'-':>8} {'diverged':>10} {'':>10} {'':>8} {'':>8} {diverged:>8}")
      continue
    lines.append(f"{name:<10} {run.lr:>8.3g} {run.final_train_loss(window):>10.4f} "
                 f"{run.final_eval_loss:>10.4f} {run.total_seconds:>8.1f} "
                 f"{run.steps_per_second:>8.1f} {diverged:>8}")
  kfac = best.get("kfac")
  for name, reference in best.items():
    if name == "kfac" or kfac is None or reference is None:
      continue
    c = compare(kfac.eval, reference.eval)
    label = specs[name].label
    if c.steps is None:
      lines.append(f"K-FAC never reaches {label}'s final eval loss {c.target:.4f}")
      continue
    lines.append(f"K-FAC reaches {label}'s final eval loss {c.target:.4f} at step "
                 f"{c.steps:.0f} ({c.step_ratio:.2f}x {label}'s {c.reference_steps:.0f}) "
                 f"in {c.seconds:.1f} s ({c.seconds_ratio:.2f}x {label}'s "
                 f"{c.reference_seconds:.1f} s)")
  return lines


# -- Command line --------------------------------------------------------------------------

def make_parser(prog: str, description: str, specs: dict[str, OptimizerSpec],
                steps: int = 400, batch_size: int = 32) -> argparse.ArgumentParser:
  """The flags every sequence example shares; add the model's own to the result."""
  parser = argparse.ArgumentParser(prog=prog, description=description)
  names = ", ".join(f"{name} {spec.sweep}" for name, spec in specs.items())
  parser.add_argument("--optimizer", choices=tuple(specs) + ("all",), default="all",
                      help="(default: all, one after the other from the same start)")
  parser.add_argument("--lr", type=float,
                      help="one learning rate for every chosen optimizer (default: each "
                           "optimizer's own: " +
                           ", ".join(f"{n} {s.learning_rate:g}" for n, s in specs.items()) + ")")
  parser.add_argument("--sweep", action="store_true",
                      help=f"try each optimizer's learning rates: {names}")
  parser.add_argument("--steps", type=int, default=steps, help=f"(default: {steps})")
  parser.add_argument("--batch-size", type=int, default=batch_size,
                      help=f"(default: {batch_size})")
  parser.add_argument("--eval-every", type=int, default=50,
                      help="evaluate (and log) every this many steps (default: 50)")
  parser.add_argument("--seed", type=int, default=0,
                      help="seeds the initialization, the batches and K-FAC's sampling")
  parser.add_argument("--plot", metavar="PNG", help="save the loss curves here")
  parser.add_argument("--metrics-csv", metavar="FILE",
                      help=f"write one row per step: {', '.join(CSV_COLUMNS)}")
  parser.add_argument("--describe", action="store_true",
                      help="print jkfac.describe's table of K-FAC blocks first")
  kfac = parser.add_argument_group("K-FAC")
  kfac.add_argument("--damping", type=float, default=1e-3, help="(default: %(default)g)")
  kfac.add_argument("--momentum", type=float, default=0.9, help="(default: 0.9)")
  kfac.add_argument("--momentum-type", default="regular",
                    help="jkfac.kfac's momentum_type: 'regular' accumulates preconditioned "
                         "gradients, 'adam' preconditions accumulated raw gradients "
                         "(default: %(default)s)")
  kfac.add_argument("--cov-update-every", type=int, default=1, help="(default: 1)")
  kfac.add_argument("--invert-every", type=int, default=10, help="(default: 10)")
  kfac.add_argument("--kfac-kwargs", type=json.loads, default={}, metavar="JSON",
                    help="more jkfac.kfac keyword arguments, e.g. "
                         "'{\"cov_ema_decay\": 0.99}'; they win over the flags")
  others = parser.add_argument_group("the other optimizers")
  if "adamw" in specs:
    others.add_argument("--weight-decay", type=float, default=0.01,
                        help="AdamW's (default: 0.01)")
  if "muon" in specs:
    others.add_argument("--muon-adam-lr", type=float, default=3e-3,
                        help="the learning rate of the parameters Muon leaves to Adam: "
                             "embeddings, norms, biases (default: 3e-3)")
  return parser


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None
               ) -> argparse.Namespace:
  args = parser.parse_args(argv)
  for flag in ("steps", "batch_size", "eval_every", "cov_update_every", "invert_every"):
    if getattr(args, flag) < 1:
      parser.error(f"--{flag.replace('_', '-')} must be at least 1")
  if args.lr is not None and args.sweep:
    parser.error("--lr and --sweep exclude each other")
  if not isinstance(args.kfac_kwargs, dict) or "learning_rate" in args.kfac_kwargs:
    parser.error("--kfac-kwargs must be a JSON object without learning_rate (use --lr)")
  return args


def main(task: Task, specs: dict[str, OptimizerSpec], args: argparse.Namespace
         ) -> dict[str, Any]:
  """Runs the chosen optimizers and sweeps; prints, writes and returns the results."""
  from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

  names = tuple(specs) if args.optimizer == "all" else (args.optimizer,)
  if args.describe:
    params = task.init_params(jax.random.PRNGKey(args.seed))
    example = next(task.train_batches(args.seed))
    print(jkfac.describe(task.loss_fn, params, example,
                         approximations=args.kfac_kwargs.get("approximations")), flush=True)
  print(f"jkfac {jkfac.__version__}, jax {jax.__version__} on {jax.default_backend()}; "
        f"{task.title}; {args.steps} steps", flush=True)
  columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
             TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]} steps/s"))
  runs = []
  with Progress(*columns) as progress:
    for name in names:
      for lr in learning_rates(specs[name], args):
        runs.append(train_run(task, specs[name], lr, args, progress))
  best = {name: best_run([run for run in runs if run.optimizer == name]) for name in names}
  lines = summary(specs, runs, best, window=args.eval_every)
  print("\n".join(lines), flush=True)
  if args.metrics_csv:
    write_csv(runs, args.metrics_csv)
  if args.plot:
    plot(task, runs, best, args.plot)
  return {"runs": runs, "best": best, "summary": lines}

