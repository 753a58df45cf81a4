"""The optimizer comparison of the sequence examples (transformer_lm.py, lstm.py): flags,
optimizers, learning-rate sweeps and the summary; the measuring is `harness`'s.

An example describes what it trains as a `Task` and which optimizers it compares as
`OptimizerSpec`s; `main` parses the shared flags, runs every optimizer at every learning
rate of its sweep from the same initialization on the same batches (`harness.run`: real
steps timed after compilation, the divergence rule), and prints every run, then a target
table: each baseline's best final eval loss as a target, and the steps and seconds every
optimizer's best run takes to reach it, as evaluated every `--eval-every` steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np
import optax

import jkfac

from benchmarks import harness

Params = Any
Batch = Any
EVAL_METRIC = "eval_loss"


@dataclasses.dataclass(frozen=True)
class Task:
  """What an example trains; `loss_fn` registers its loss for K-FAC."""
  title: str
  loss_fn: Callable[[Params, Batch], jax.Array]
  init_params: Callable[[jax.Array], Params]
  train_batches: Callable[[int], Iterator[Batch]]  # seed -> the same stream for every run
  eval_batches: Sequence[Batch]
  muon_dimension_numbers: Callable[[Params], Any] | None = None


Make = Callable[[float, Task, Batch, argparse.Namespace], Any]  # -> tx or harness.Skipped


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
  """An optimizer of the comparison: its label, default learning rate and sweep."""
  name: str
  label: str
  learning_rate: float
  sweep: tuple[float, ...]
  make: Make


# -- Optimizers ----------------------------------------------------------------------------

def kfac_spec(learning_rate: float, sweep: tuple[float, ...]) -> OptimizerSpec:
  """jkfac.kfac with the --damping / --momentum / cadence flags and --kfac-kwargs; a keyword
  the installed jkfac does not take makes it `harness.Skipped`."""

  def make(lr, task, example_batch, args):
    kwargs = dict(damping=args.damping, momentum=args.momentum,
                  momentum_type=args.momentum_type, cov_update_every=args.cov_update_every,
                  invert_every=args.invert_every, seed=args.seed)
    kwargs.update(args.kfac_kwargs)
    return harness.try_build(jkfac.kfac, task.loss_fn, example_batch, learning_rate=lr,
                              **kwargs)

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

def make_evaluate(loss_fn, batches: Sequence[Batch]) -> harness.EvalFn:
  """`state -> {"eval_loss": mean of loss_fn over a fixed list of equally shaped batches}`."""
  batch_loss = jax.jit(loss_fn)

  def evaluate(state) -> dict[str, float]:
    losses = [float(batch_loss(state[0], batch)) for batch in batches]
    return {EVAL_METRIC: float(np.mean(losses))}

  return evaluate


def train(task: Task, tx: optax.GradientTransformation, label: str, *, steps: int,
          eval_every: int, seed: int) -> harness.Run:
  """`tx` for `steps` steps from `task`'s seeded start on its seeded batches, with progress."""
  return harness.train(task.loss_fn, tx, task.init_params(jax.random.PRNGKey(seed)),
                        task.train_batches(seed), make_evaluate(task.loss_fn, task.eval_batches),
                        label=label, steps=steps, eval_every=eval_every, log_every=eval_every)


def learning_rates(spec: OptimizerSpec, args: argparse.Namespace) -> tuple[float, ...]:
  if args.sweep:
    return spec.sweep
  return (args.lr if args.lr is not None else spec.learning_rate,)


def label(name: str, lr: float) -> str:
  return f"{name} lr {lr:g}"


def run_sweep(task: Task, spec: OptimizerSpec, lrs: Sequence[float], args: argparse.Namespace
              ) -> harness.Sweep:
  """`spec` at each of `lrs`; the best has the lowest final eval loss."""
  example = next(task.train_batches(args.seed))

  def run_one(lr: float) -> harness.Run | harness.Skipped:
    tx = spec.make(lr, task, example, args)
    if isinstance(tx, harness.Skipped):
      print(f"{label(spec.name, lr)}: {harness.status(tx)}", flush=True)
      return tx
    return train(task, tx, label(spec.name, lr), steps=args.steps,
                 eval_every=args.eval_every, seed=args.seed)

  return harness.sweep(run_one, lrs, metric=EVAL_METRIC)


def best_runs(sweeps: dict[str, harness.Sweep]) -> dict[str, harness.Run]:
  """`{label: run}` of each optimizer's best run (none where no run finished)."""
  return {label(name, s.best): s.runs[s.best] for name, s in sweeps.items()
          if s.best is not None}


def eval_targets(specs: dict[str, OptimizerSpec], best: dict[str, harness.Run]
                 ) -> list[harness.Target]:
  """Each baseline's best final eval loss (every optimizer but K-FAC) as a target."""
  targets = []
  for run_label, r in best.items():
    name = run_label.split()[0]
    if name != "kfac":
      targets.append(harness.Target(f"{specs[name].label} loss", r.final_metric(EVAL_METRIC),
                                     run_label, EVAL_METRIC))
  return targets


def summary(specs: dict[str, OptimizerSpec], sweeps: dict[str, harness.Sweep],
            window: int) -> list[str]:
  """Every run's table, then the best runs' table of steps and seconds to the targets."""
  runs = {label(name, lr): r for name, s in sweeps.items() for lr, r in s.runs.items()}
  best = best_runs(sweeps)
  lines = [harness.format_table(harness.run_headers([EVAL_METRIC], window),
                                 harness.run_rows(runs, [EVAL_METRIC], best, window))]
  targets = eval_targets(specs, best)
  for t in targets:
    lines.append(f"target {t.name}: {t.reference}'s final eval loss {t.value:.4f}")
  if targets and len(best) > 1:
    lines.append(harness.format_table(
        harness.target_headers(targets, [EVAL_METRIC], window),
        harness.target_rows(best, targets, [EVAL_METRIC], window)))
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
                      help="write one row per step: run, step, seconds, train_loss, eval_loss")
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
  """Runs the chosen optimizers and sweeps; prints, writes and returns the results:
  `{"sweeps": {name: harness.Sweep over lr}, "summary": lines}`."""
  names = tuple(specs) if args.optimizer == "all" else (args.optimizer,)
  if args.describe:
    params = task.init_params(jax.random.PRNGKey(args.seed))
    example = next(task.train_batches(args.seed))
    print(jkfac.describe(task.loss_fn, params, example,
                         approximations=args.kfac_kwargs.get("approximations")), flush=True)
  print(f"jkfac {jkfac.__version__}, jax {jax.__version__} on {jax.default_backend()}; "
        f"{task.title}; {args.steps} steps", flush=True)
  sweeps = {name: run_sweep(task, specs[name], learning_rates(specs[name], args), args)
            for name in names}
  lines = summary(specs, sweeps, window=args.eval_every)
  print("\n".join(lines), flush=True)
  runs = {label(name, lr): r for name, s in sweeps.items() for lr, r in s.runs.items()}
  if args.metrics_csv:
    harness.write_csv(args.metrics_csv, runs, [EVAL_METRIC])
  if args.plot:
    harness.plot({task.title: runs}, args.plot, eval_metric=EVAL_METRIC)
  return {"sweeps": sweeps, "summary": lines}
