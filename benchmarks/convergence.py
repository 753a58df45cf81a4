"""Loss against steps and against seconds: jkfac K-FAC against Adam, SGD, AdamW and Muon.

    python -m benchmarks.convergence [--models convnet,mlp,autoencoder,lm,lstm] [--steps N]
        [--plot conv.png]

For each chosen model -- the seed convnet, the MLP 784-512-256-10, the MNIST deep autoencoder
(examples/autoencoder.py), the byte-level transformer LM (examples/transformer_lm.py) and the
BiLSTM on first == last (examples/lstm.py) -- in one process, from one initialisation and on
the same seeded batches, it trains:
- the model's baselines, each over a small learning-rate sweep (every sweep is printed):
  Adam and SGD-momentum for the MNIST models, AdamW and Muon for the LM, Adam for the LSTM;
- every K-FAC configuration of the model's table (`jkfac.kfac` keyword arguments): adaptive
  ones (untuned) and fixed ones, and for the sequence models `jkfac.eigen_adam` at two
  learning rates (`optimizer="eigen_adam"`); a configuration the installed jkfac cannot
  build is reported as skipped.
It then prints the steps and seconds each run takes to reach the target, and their ratios
to the first baseline's best run (the reference): that run's final training loss (mean of
its last `WINDOW` steps), for the LM AdamW's final eval loss after the fixed budget
(evaluated every `--eval-every` steps), and for the convnet also 98% test accuracy. Seconds
are training seconds of real steps, compilation and evaluation excluded; the smoothing and
divergence rules are benchmarks/harness.py's. A diverged run's times are not used.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import optax

import jkfac

_HERE = os.path.dirname(os.path.abspath(__file__))
from benchmarks import compare as _compare  # noqa: E402  (the sequence examples' evaluation)
from benchmarks import harness as _harness  # noqa: E402
import autoencoder  # noqa: E402  (the example's model, loss and optimizers)
import lstm  # noqa: E402
import mnist  # noqa: E402
import mnist_data  # noqa: E402
import transformer_lm  # noqa: E402
from benchmarks.step_time import MLP, make_loss  # noqa: E402  (the MLP and the classifiers' loss)

WINDOW = _harness.WINDOW
ACCURACY_TARGET = 0.98
MODELS = ("convnet", "mlp", "autoencoder", "lm", "lstm")
DEFAULT_STEPS = {"convnet": 300, "mlp": 300, "autoencoder": 300, "lm": 400, "lstm": 400}
_FIXED = dict(learning_rate=5e-4, damping=1e-3, momentum=0.9)  # examples/mnist.py's
_ADAPTIVE = dict(adapt_damping=True, momentum_type="qmodel", damping=1.0)  # untuned
DEFAULT = {"kfac default": {}}  # jkfac.kfac(loss_fn, batch), untuned
CLASSIFIER_KFAC = {
    **DEFAULT,
    "kfac adaptive": dict(_ADAPTIVE, cov_update_every=1, invert_every=10),
    "kfac adaptive cov 5 / inv 50": dict(_ADAPTIVE, cov_update_every=5, invert_every=50),
    "kfac adaptive ekfac cov 1 / inv 50": dict(_ADAPTIVE, approximations={"*": "ekfac"},
                                               cov_update_every=1, invert_every=50),
    "kfac cov 1 / inv 10": dict(_FIXED, cov_update_every=1, invert_every=10),
    "kfac cov 10 / inv 100": dict(_FIXED, cov_update_every=10, invert_every=100),
}
MLP_KFAC = {
    **CLASSIFIER_KFAC,
    "kfac cov 1 / inv 10, lr 2e-3 damp 1e-2": dict(_FIXED, learning_rate=2e-3, damping=1e-2,
                                                   cov_update_every=1, invert_every=10),
}
AUTOENCODER_KFAC = {
    **DEFAULT,
    "kfac adaptive": autoencoder.KFAC_CONFIGS["kfac adaptive"],
    "kfac cov 1 / inv 10": autoencoder.KFAC_CONFIGS["kfac fixed"],
    "kfac cov 10 / inv 100": dict(autoencoder.FIXED, cov_update_every=10, invert_every=100),
}
# The sequence examples' defaults: transformer_lm.py's tuned raw-gradient momentum, and
# lstm.py's learning rate with the shared flags' damping and momentum.
_LM_FIXED = dict(learning_rate=transformer_lm.OPTIMIZERS["kfac"].learning_rate, momentum=0.9,
                 **transformer_lm.KFAC_DEFAULTS)
_LSTM_FIXED = dict(learning_rate=lstm.OPTIMIZERS["kfac"].learning_rate, damping=1e-3,
                   momentum=0.9)
NORM_CONSTRAINT = 1e-3  # KL clipping; untuned


# `jkfac.eigen_adam` (Adam in K-FAC's eigenbases) at two learning rates, with AdamW's
# weight decay (benchmarks/compare.py's default).
EIGEN_ADAM = {f"eigen adam lr {lr:g}": dict(optimizer="eigen_adam", learning_rate=lr,
                                           weight_decay=0.01) for lr in (3e-3, 1e-2)}


def _sequence_kfac(fixed: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
  return {
      **DEFAULT,
      **EIGEN_ADAM,
      "kfac adaptive": dict(_ADAPTIVE, cov_update_every=1, invert_every=10),
      "kfac cov 1 / inv 10, norm constraint": dict(fixed, norm_constraint=NORM_CONSTRAINT,
                                                   cov_update_every=1, invert_every=10),
      "kfac cov 1 / inv 10": dict(fixed, cov_update_every=1, invert_every=10),
      "kfac cov 10 / inv 100": dict(fixed, cov_update_every=10, invert_every=100),
  }


LM_KFAC = _sequence_kfac(_LM_FIXED)
LSTM_KFAC = _sequence_kfac(_LSTM_FIXED)
# Keywords that switch jkfac.kfac to adaptive K-FAC (also momentum_type "qmodel...").
ADAPTIVE_KEYWORDS = ("adapt_damping", "norm_constraint", "l2_reg", "num_burnin_steps")

MakeTx = Callable[[float], optax.GradientTransformation]


@dataclasses.dataclass
class Problem:
  """One model with its data, loss, optimizers to try, budget and targets.

  The first baseline is the reference; `target_metric` None: its final smoothed training
  loss is the target, else its final eval `target_metric`.
  """
  name: str
  loss_fn: Callable[[Any, Any], jax.Array]
  params: Any
  batches: Callable[[], Iterator[Any]]  # a fresh iterator over the same seeded batches
  eval_fn: _harness.EvalFn | None
  make_kfac: Callable[[Mapping[str, Any]], Any]  # config -> tx or _harness.Skipped
  kfac_configs: Mapping[str, Mapping[str, Any]]
  baselines: Mapping[str, tuple[MakeTx, Sequence[float]]]
  steps: int
  eval_every: int = 0
  metrics: Sequence[str] = ()  # eval metrics in the tables
  target_metric: str | None = None
  accuracy_target: float | None = None


def is_adaptive(config: Mapping[str, Any]) -> bool:
  """Whether a configuration is untuned: adaptive K-FAC (or not K-FAC with a fixed rate)."""
  return ("optimizer" in config or "learning_rate" not in config or any(k in config for k in ADAPTIVE_KEYWORDS)
          or str(config.get("momentum_type", "")).startswith("qmodel"))


def _kfac_builder(loss_fn, example, seed: int) -> Callable[[Mapping[str, Any]], Any]:
  """`config -> tx`: `jkfac.kfac(**config)`, or `jkfac.eigen_adam` where the config says
  `optimizer="eigen_adam"`."""

  def build(config: Mapping[str, Any]):
    config = dict(config)
    factory = jkfac.eigen_adam if config.pop("optimizer", None) == "eigen_adam" else jkfac.kfac
    return _harness.try_build(factory, loss_fn, example, **{"seed": seed, **config})

  return build


def _mnist_batches(data: mnist_data.Dataset, batch_size: int, seed: int
                   ) -> Callable[[], Iterator[Any]]:
  return lambda: mnist_data.batches(*data["train"], batch_size, seed=seed)


def _mnist_baselines(adam_lrs, sgd_lrs, l2: float) -> dict[str, tuple[MakeTx, Sequence[float]]]:
  return {"adam": (lambda lr: autoencoder.make_baseline("adam", lr, l2), adam_lrs),
          "sgd": (lambda lr: autoencoder.make_baseline("sgd", lr, l2), sgd_lrs)}


def classifier(name: str, model, data, args, steps: int, kfac_configs, eval_every: int = 0,
               accuracy_target: float | None = None) -> Problem:
  batches = _mnist_batches(data, args.batch_size, args.seed)
  example = next(batches())
  params = model.init(jax.random.PRNGKey(args.seed), example["image"])["params"]
  evaluate = mnist.make_evaluate(model)
  x_test, y_test = data["test"]
  loss_fn = make_loss(model)

  def eval_fn(state) -> dict[str, float]:
    loss, accuracy = evaluate(state[0], x_test, y_test)
    return {"test_loss": loss, "test_acc": accuracy}

  return Problem(name, loss_fn, params, batches, eval_fn,
                 _kfac_builder(loss_fn, example, args.seed), kfac_configs,
                 _mnist_baselines(args.classifier_adam_lrs, args.classifier_sgd_lrs, 0.0),
                 steps, eval_every=eval_every, metrics=("test_acc",),
                 accuracy_target=accuracy_target)


def autoencoder_problem(data, args, steps: int) -> Problem:
  model = autoencoder.Autoencoder(tuple(args.widths))
  batches = _mnist_batches(data, args.ae_batch_size, args.seed)
  example = next(batches())
  params = model.init(jax.random.PRNGKey(args.seed), autoencoder.pixels(example))["params"]
  loss_fn = autoencoder.make_loss_fn(model)
  return Problem("MNIST autoencoder", loss_fn, params, batches,
                 autoencoder.make_evaluate(model, data["test"][0]),
                 lambda config: autoencoder.make_kfac(loss_fn, example,
                                                      {"seed": args.seed, **config}),
                 AUTOENCODER_KFAC,
                 _mnist_baselines(args.ae_adam_lrs, args.ae_sgd_lrs, autoencoder.L2), steps,
                 metrics=("test_loss",))


def sequence_problem(example_module, name: str, args, steps: int,
                     kfac_configs: Mapping[str, Mapping[str, Any]],
                     baseline_lrs: Mapping[str, Sequence[float]],
                     target_metric: str | None = None) -> Problem:
  """A sequence example's task (its default flags) with its own baselines' optimizers."""
  ex_args = example_module.parse_args(["--steps", str(steps), "--seed", str(args.seed)])
  task = example_module.make_task(ex_args)
  example = next(task.train_batches(args.seed))
  specs = example_module.OPTIMIZERS

  def make(spec: _compare.OptimizerSpec) -> MakeTx:
    return lambda lr: spec.make(lr, task, example, ex_args)

  return Problem(name, task.loss_fn, task.init_params(jax.random.PRNGKey(args.seed)),
                 lambda: task.train_batches(args.seed),
                 _compare.make_evaluate(task.loss_fn, task.eval_batches),
                 _kfac_builder(task.loss_fn, example, args.seed), kfac_configs,
                 {n: (make(specs[n]), lrs) for n, lrs in baseline_lrs.items()}, steps,
                 eval_every=args.eval_every, metrics=(_compare.EVAL_METRIC,),
                 target_metric=target_metric)


def train(problem: Problem, tx, label: str, args) -> _harness.Run:
  return _harness.train(problem.loss_fn, tx, problem.params, problem.batches(),
                        problem.eval_fn, label=label, steps=problem.steps,
                        eval_every=problem.eval_every, sync_every=args.sync_every,
                        log_every=args.log_every)


def _label(name: str, lr: float) -> str:
  return f"{name} lr {lr:g}"


def run_baselines(problem: Problem, args) -> dict[str, _harness.Sweep]:
  """Each baseline's sweep, printed; the best by `Run.score(problem.target_metric)`."""
  sweeps = {}
  for name, (make, lrs) in problem.baselines.items():
    sweeps[name] = _harness.sweep(
        lambda lr: train(problem, make(lr), _label(name, lr), args), lrs,
        metric=problem.target_metric)
    runs = {_label(name, lr): r for lr, r in sweeps[name].runs.items()}
    best = [_label(name, sweeps[name].best)] if sweeps[name].best is not None else []
    print(f"\n{problem.name}: {name} sweep")
    print(_harness.format_table(_harness.run_headers(problem.metrics),
                                _harness.run_rows(runs, problem.metrics, best)), flush=True)
  return sweeps


def run_kfac(problem: Problem, args) -> dict[str, Any]:
  """`{label: Run or Skipped}` for the problem's K-FAC table."""
  results = {}
  for label, config in problem.kfac_configs.items():
    if args.kfac_configs and label not in args.kfac_configs:
      continue
    tx = problem.make_kfac(config)
    r = tx if isinstance(tx, _harness.Skipped) else train(problem, tx, label, args)
    results[label] = r
    print(f"{problem.name}: {label}: " + (_harness.status(r) if isinstance(
        r, _harness.Skipped) else f"{_harness.status(r)}, final loss {r.final_loss():.4g}, "
        f"{r.ms_per_step:.1f} ms/step, compiled in {r.compile_seconds:.1f} s"), flush=True)
  return results


def best_fixed(problem: Problem, kfac: Mapping[str, Any]) -> str | None:
  """The fixed (not adaptive) K-FAC run with the best score, among finished runs."""
  scores = {k: r.score(problem.target_metric) for k, r in kfac.items()
            if isinstance(r, _harness.Run) and not is_adaptive(problem.kfac_configs[k])}
  scores = {k: s for k, s in scores.items() if s == s}
  return min(scores, key=scores.get) if scores else None


def targets(problem: Problem, reference: str, run: _harness.Run) -> list[_harness.Target]:
  """The reference run's final loss (or eval metric), and the accuracy target if any."""
  if problem.target_metric is None:
    found = [_harness.Target("loss", run.final_loss(), reference)]
  else:
    found = [_harness.Target(problem.target_metric.replace("_", " "),
                             run.final_metric(problem.target_metric), reference,
                             problem.target_metric)]
  if problem.accuracy_target is not None:
    found.append(_harness.Target(f"{problem.accuracy_target:.0%}", problem.accuracy_target,
                                 reference, "test_acc", higher_is_better=True))
  return found


def describe(problem: Problem, target: _harness.Target) -> str:
  if target.metric is None:
    return (f"{problem.name}: target = {target.reference}'s final loss {target.value:.4g} "
            f"(mean of its last {WINDOW} steps); every run's loss smoothed over {WINDOW}")
  return (f"{problem.name}: target = {target.reference}'s final {target.name} "
          f"{target.value:.4g} after {problem.steps} steps; evaluated every "
          f"{problem.eval_every} steps, unsmoothed")


def run_problem(problem: Problem, args) -> dict[str, _harness.Run]:
  """Prints the sweeps, the K-FAC runs and the target table; returns the runs to plot."""
  unknown = set(args.kfac_configs) - set(problem.kfac_configs)
  if unknown:
    raise SystemExit(f"--kfac-configs: {problem.name} has no configuration "
                     f"{sorted(unknown)}; its labels are {list(problem.kfac_configs)}")
  print(f"\n=== {problem.name}: {problem.steps} steps", flush=True)
  sweeps = run_baselines(problem, args)
  kfac = run_kfac(problem, args)
  reference = next(iter(problem.baselines))
  if sweeps[reference].best is None:
    print(f"{problem.name}: every {reference} run diverged; no target")
    return {}
  runs: dict[str, Any] = {_label(n, s.best): s.runs[s.best] for n, s in sweeps.items()
                          if s.best is not None}
  ref_label = _label(reference, sweeps[reference].best)
  fixed = best_fixed(problem, kfac)
  runs.update({(k + " (best fixed)" if k == fixed else k): r for k, r in kfac.items()})
  found = targets(problem, ref_label, runs[ref_label])
  print("\n" + describe(problem, found[0]))
  print(_harness.format_table(_harness.target_headers(found, problem.metrics),
                              _harness.target_rows(runs, found, problem.metrics)), flush=True)
  return {k: r for k, r in runs.items() if isinstance(r, _harness.Run)
          and ("kfac" not in k or "best fixed" in k or is_adaptive(kfac_config(problem, k)))}


def kfac_config(problem: Problem, label: str) -> Mapping[str, Any]:
  return problem.kfac_configs.get(label.removesuffix(" (best fixed)"), {})


def _floats(text: str) -> tuple[float, ...]:
  return tuple(float(x) for x in text.split(",") if x)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default=",".join(MODELS),
                      help=f"a comma-separated subset of {','.join(MODELS)} (default: all)")
  parser.add_argument("--steps", type=int,
                      help="every model's budget (default: each model's own: " +
                           ", ".join(f"{m} {n}" for m, n in DEFAULT_STEPS.items()) + ")")
  parser.add_argument("--batch-size", type=int, default=128, help="convnet and MLP")
  parser.add_argument("--ae-steps", type=int,
                      help="the autoencoder's budget, over --steps (default: --steps, else "
                           f"{DEFAULT_STEPS['autoencoder']})")
  parser.add_argument("--ae-batch-size", type=int, default=256)
  parser.add_argument("--widths", type=lambda s: tuple(int(x) for x in s.split(",")),
                      default=autoencoder.WIDTHS, help="the autoencoder's hidden widths")
  parser.add_argument("--classifier-adam-lrs", type=_floats, default=(1e-3, 3e-3, 1e-2))
  parser.add_argument("--classifier-sgd-lrs", type=_floats, default=(1e-2, 3e-2, 1e-1))
  parser.add_argument("--ae-adam-lrs", type=_floats, default=autoencoder.ADAM_LRS)
  parser.add_argument("--ae-sgd-lrs", type=_floats, default=autoencoder.SGD_LRS)
  lm, seq = transformer_lm.OPTIMIZERS, lstm.OPTIMIZERS
  parser.add_argument("--lm-adamw-lrs", type=_floats, default=lm["adamw"].sweep)
  parser.add_argument("--lm-muon-lrs", type=_floats, default=lm["muon"].sweep)
  parser.add_argument("--lstm-adam-lrs", type=_floats, default=seq["adam"].sweep)
  parser.add_argument("--kfac-configs", type=lambda s: tuple(s.split(",")), default=(),
                      help="run only these K-FAC configurations, by label, e.g. "
                           "'kfac default' (default: every one of each model's table)")
  parser.add_argument("--eval-every", type=int, default=20,
                      help="convnet test accuracy, LM and LSTM eval loss every this many "
                           "steps (default: 20)")
  parser.add_argument("--sync-every", type=int, default=1,
                      help="block_until_ready every this many steps (default: 1)")
  parser.add_argument("--log-every", type=int, default=50,
                      help="progress: a line every this many steps where output is no "
                           "terminal (default: 50)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--plot", metavar="PNG", default="convergence.png")
  parser.add_argument("--data-dir", default=mnist_data.BUNDLED_DIR)
  parser.add_argument("--fake-data", action="store_true")
  args = parser.parse_args(argv)
  args.models = tuple(m for m in args.models.split(",") if m)
  unknown = [m for m in args.models if m not in MODELS]
  if unknown or not args.models:
    parser.error(f"--models: unknown {','.join(unknown)}; choose from {','.join(MODELS)}")
  for flag in ("steps", "ae_steps", "eval_every", "sync_every", "log_every"):
    value = getattr(args, flag)
    if value is not None and value < 1:
      parser.error(f"--{flag.replace('_', '-')} must be at least 1")
  return args


def steps_for(model: str, args: argparse.Namespace) -> int:
  """`--ae-steps` for the autoencoder, else `--steps`, else the model's default."""
  if model == "autoencoder" and args.ae_steps is not None:
    return args.ae_steps
  return args.steps if args.steps is not None else DEFAULT_STEPS[model]


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, _harness.Run]]:
  args = parse_args(argv)
  print(f"jkfac {jkfac.__version__}, jax {jax.__version__} on {jax.default_backend()}; "
        f"models {','.join(args.models)}; sync every {args.sync_every} step(s)")
  data = None
  if {"convnet", "mlp", "autoencoder"} & set(args.models):
    data = mnist_data.fake_data(seed=args.seed) if args.fake_data else mnist_data.load_idx(
        args.data_dir)
    print(f"MNIST: {len(data['train'][0])} train / {len(data['test'][0])} test images")
  builders = {
      "convnet": lambda n: classifier("seed convnet", mnist.ConvNet(), data, args, n,
                                      CLASSIFIER_KFAC, args.eval_every, ACCURACY_TARGET),
      "mlp": lambda n: classifier("MLP 784-512-256-10", MLP(), data, args, n, MLP_KFAC),
      "autoencoder": lambda n: autoencoder_problem(data, args, n),
      "lm": lambda n: sequence_problem(
          transformer_lm, "byte-level transformer LM", args, n, LM_KFAC,
          {"adamw": args.lm_adamw_lrs, "muon": args.lm_muon_lrs}, _compare.EVAL_METRIC),
      "lstm": lambda n: sequence_problem(lstm, "BiLSTM first == last", args, n, LSTM_KFAC,
                                         {"adam": args.lstm_adam_lrs}),
  }
  panels = {}
  for name in args.models:
    problem = builders[name](steps_for(name, args))
    panels[problem.name] = run_problem(problem, args)
  if args.plot and any(panels.values()):
    _harness.plot({k: v for k, v in panels.items() if v}, args.plot,
                  eval_metric=_compare.EVAL_METRIC)
  return panels


if __name__ == "__main__":
  main()
