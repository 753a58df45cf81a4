"""Loss against steps and against seconds: jkfac K-FAC against Adam and SGD-momentum.

    python benchmarks/convergence.py [--models convnet,mlp,autoencoder] [--plot conv.png]

For the seed convnet, the MLP 784-512-256-10 and the MNIST deep autoencoder, in one
process, from one initialisation and on the same seeded batches, it trains:
- Adam and SGD-momentum, each over a small learning-rate sweep (every sweep is printed;
  the best is the lowest final running-mean training loss among the finite runs);
- every K-FAC configuration of the model's table (`jkfac.kfac` keyword arguments): the
  adaptive one (untuned) and fixed ones; a configuration the installed jkfac cannot build
  is reported as skipped.
It then prints the steps and seconds each run takes to reach the target -- the best Adam
run's final training loss (mean of its last `WINDOW` steps), and for the convnet 98% test
accuracy (evaluated every `--eval-every` steps) -- and their ratios to Adam's. Seconds are
training seconds of real steps, compilation and evaluation excluded (`_harness.py`); a
diverged run's times are not used.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

# One OpenBLAS thread (jaxlib's CPU Cholesky and triangular solves, i.e. K-FAC's inverses):
# on a small shared machine OpenBLAS's spinning threads made an inverse 3x slower (785x785:
# 190 ms against 66 ms at load 12 on 2 cores). XLA's own ops are unaffected. Set before
# jax loads; override from the environment.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(_HERE), "examples"))
sys.path.insert(0, _HERE)
import _harness  # noqa: E402
import autoencoder  # noqa: E402  (the example's model, loss, optimizers and step)
import mnist  # noqa: E402
import mnist_data  # noqa: E402
from step_time import MLP, make_loss  # noqa: E402  (the MLP and the classifiers' loss)

WINDOW = _harness.WINDOW
ACCURACY_TARGET = 0.98
_FIXED = dict(learning_rate=5e-4, damping=1e-3, momentum=0.9)  # examples/mnist.py's
_ADAPTIVE = dict(adapt_damping=True, momentum_type="qmodel", damping=1.0)  # untuned
CLASSIFIER_KFAC = {
    "kfac adaptive": dict(_ADAPTIVE, cov_update_every=1, invert_every=10),
    "kfac cov 1 / inv 10": dict(_FIXED, cov_update_every=1, invert_every=10),
    "kfac cov 10 / inv 100": dict(_FIXED, cov_update_every=10, invert_every=100),
}
MLP_KFAC = {
    **CLASSIFIER_KFAC,
    "kfac cov 1 / inv 10, lr 2e-3 damp 1e-2": dict(_FIXED, learning_rate=2e-3, damping=1e-2,
                                                   cov_update_every=1, invert_every=10),
}
AUTOENCODER_KFAC = {
    "kfac adaptive": autoencoder.KFAC_CONFIGS["kfac adaptive"],
    "kfac cov 1 / inv 10": autoencoder.KFAC_CONFIGS["kfac fixed"],
    "kfac cov 10 / inv 100": dict(autoencoder.FIXED, cov_update_every=10, invert_every=100),
}


@dataclasses.dataclass
class Problem:
  """One model with its data, loss, optimizers to try and budget."""
  name: str
  loss_fn: Callable[[Any, Any], jax.Array]
  params: Any
  batches: Callable[[], Any]  # a fresh iterator over the same seeded batches
  example_batch: Any
  eval_fn: Callable[[Any], dict[str, float]]
  kfac_configs: Mapping[str, Mapping[str, Any]]
  adam_lrs: Sequence[float]
  sgd_lrs: Sequence[float]
  steps: int
  l2: float = 0.0
  eval_every: int = 0
  accuracy_target: float | None = None


def _batches(data: mnist_data.Dataset, batch_size: int, seed: int) -> Callable[[], Any]:
  return lambda: mnist_data.batches(*data["train"], batch_size, seed=seed)


def classifier(name: str, model, data, args, steps: int, kfac_configs, eval_every: int = 0,
               accuracy_target: float | None = None) -> Problem:
  batches = _batches(data, args.batch_size, args.seed)
  example = next(batches())
  params = model.init(jax.random.PRNGKey(args.seed), example["image"])["params"]
  evaluate = mnist.make_evaluate(model)
  x_test, y_test = data["test"]

  def eval_fn(state) -> dict[str, float]:
    loss, accuracy = evaluate(state[0], x_test, y_test)
    return {"test_loss": loss, "test_acc": accuracy}

  return Problem(name, make_loss(model), params, batches, example, eval_fn, kfac_configs,
                 args.classifier_adam_lrs, args.classifier_sgd_lrs, steps,
                 eval_every=eval_every, accuracy_target=accuracy_target)


def autoencoder_problem(data, args) -> Problem:
  model = autoencoder.Autoencoder(tuple(args.widths))
  batches = _batches(data, args.ae_batch_size, args.seed)
  example = next(batches())
  params = model.init(jax.random.PRNGKey(args.seed), autoencoder.pixels(example))["params"]
  return Problem("MNIST autoencoder", autoencoder.make_loss_fn(model), params, batches,
                 example, autoencoder.make_evaluate(model, data["test"][0]), AUTOENCODER_KFAC,
                 args.ae_adam_lrs, args.ae_sgd_lrs, args.ae_steps, l2=autoencoder.L2)


def train(problem: Problem, tx, args) -> _harness.Run:
  step = autoencoder.make_step(problem.loss_fn, tx)
  return _harness.run(step, (problem.params, tx.init(problem.params)), problem.batches(),
                      problem.eval_fn, steps=problem.steps, eval_every=problem.eval_every,
                      sync_every=args.sync_every)


def _status(r: _harness.Run) -> str:
  return "diverged" if r.diverged else "ok"


def run_baselines(problem: Problem, args) -> dict[str, _harness.Sweep]:
  sweeps = {}
  for name, lrs in (("adam", problem.adam_lrs), ("sgd", problem.sgd_lrs)):
    sweeps[name] = _harness.sweep(
        lambda lr: train(problem, autoencoder.make_baseline(name, lr, problem.l2), args), lrs)
    rows = [[f"{name} lr {lr:g}", _harness.final_loss(r.losses, WINDOW), r.ms_per_step,
             _status(r) + (" (best)" if lr == sweeps[name].best else "")]
            for lr, r in sweeps[name].runs.items()]
    print(f"\n{problem.name}: {name} sweep")
    print(_harness.format_table(("run", f"final loss (last {WINDOW})", "ms/step", "status"),
                                rows), flush=True)
  return sweeps


def run_kfac(problem: Problem, args) -> dict[str, Any]:
  """`{label: Run or Skipped}` for the problem's K-FAC table."""
  results = {}
  for label, config in problem.kfac_configs.items():
    tx = autoencoder.make_kfac(problem.loss_fn, problem.example_batch, config, problem.l2)
    results[label] = tx if isinstance(tx, _harness.Skipped) else train(problem, tx, args)
    r = results[label]
    print(f"{problem.name}: {label}: " + (f"skipped: {r.reason}" if isinstance(
        r, _harness.Skipped) else f"{_status(r)}, final loss "
        f"{_harness.final_loss(r.losses, WINDOW):.4g}, {r.ms_per_step:.1f} ms/step, "
        f"compiled in {r.compile_seconds:.1f} s"), flush=True)
  return results


def best_fixed(kfac: Mapping[str, Any]) -> str | None:
  """The fixed (not adaptive) K-FAC run with the lowest final loss, among finite runs."""
  finite = {k: _harness.final_loss(r.losses, WINDOW) for k, r in kfac.items()
            if isinstance(r, _harness.Run) and not r.diverged and "adaptive" not in k}
  return min(finite, key=finite.get) if finite else None


def _accuracy_hit(r: _harness.Run, target: float) -> _harness.Hit | None:
  accs = [m["test_acc"] for _, _, m in r.evals]
  return _harness.time_to_target(accs, [s for _, s, _ in r.evals], target, window=1,
                                 steps=[step for step, _, _ in r.evals], higher_is_better=True)


def _ratio(hit: _harness.Hit | None, ref: _harness.Hit | None, field: str) -> float | None:
  if hit is None or ref is None:
    return None
  return getattr(hit, field) / getattr(ref, field)


def target_rows(runs: Mapping[str, Any], target: float,
                accuracy_target: float | None) -> list[list[Any]]:
  """Per run: final loss, ms/step, steps / seconds to the target(s) and ratios to Adam."""
  usable = {k: r for k, r in runs.items() if isinstance(r, _harness.Run) and not r.diverged}
  hits = {k: _harness.time_to_target(r.losses, r.seconds, target) for k, r in usable.items()}
  acc_hits = {k: _accuracy_hit(r, accuracy_target) for k, r in usable.items()
              if accuracy_target is not None}
  adam = next(k for k in runs if k.startswith("adam"))
  rows = []
  for label, r in runs.items():
    if isinstance(r, _harness.Skipped):
      rows.append([label] + [None] * (6 if accuracy_target is None else 11)
                  + [f"skipped: {r.reason}"])
      continue
    hit, ref = hits.get(label), hits.get(adam)
    row = [label, _harness.final_loss(r.losses, WINDOW), r.ms_per_step,
           hit and hit.step, hit and hit.seconds, _ratio(hit, ref, "step"),
           _ratio(hit, ref, "seconds")]
    if accuracy_target is not None:
      acc = acc_hits.get(label)
      row += [r.evals[-1][2]["test_acc"] if r.evals else None, acc and acc.step,
              acc and acc.seconds, _ratio(acc, acc_hits.get(adam), "step"),
              _ratio(acc, acc_hits.get(adam), "seconds")]
    rows.append(row + ["diverged" if r.diverged else
                       ("ok" if hit else "ok, target not reached")])
  return rows


def target_headers(accuracy_target: float | None) -> list[str]:
  headers = ["run", f"final loss (last {WINDOW})", "ms/step", "steps to loss", "s to loss",
             "steps x adam", "s x adam"]
  if accuracy_target is not None:
    pct = f"{accuracy_target:.0%}"
    headers += ["test acc", f"steps to {pct}", f"s to {pct}", "steps x adam", "s x adam"]
  return headers + ["status"]


def run_problem(problem: Problem, args) -> dict[str, _harness.Run]:
  """Prints the sweeps, the K-FAC runs and the target table; returns the runs to plot."""
  print(f"\n=== {problem.name}: {problem.steps} steps", flush=True)
  sweeps = run_baselines(problem, args)
  kfac = run_kfac(problem, args)
  if sweeps["adam"].best is None:
    print(f"{problem.name}: every Adam run diverged; no target")
    return {}
  adam = sweeps["adam"].runs[sweeps["adam"].best]
  target = _harness.final_loss(adam.losses, WINDOW)
  runs: dict[str, Any] = {f"adam lr {sweeps['adam'].best:g}": adam}
  if sweeps["sgd"].best is not None:
    runs[f"sgd lr {sweeps['sgd'].best:g}"] = sweeps["sgd"].runs[sweeps["sgd"].best]
  fixed = best_fixed(kfac)
  runs.update({(k + " (best fixed)" if k == fixed else k): r for k, r in kfac.items()})
  print(f"\n{problem.name}: target = Adam's final loss {target:.4g} (lr "
        f"{sweeps['adam'].best:g}, mean of its last {WINDOW} steps); smoothed over {WINDOW}")
  print(_harness.format_table(target_headers(problem.accuracy_target),
                              target_rows(runs, target, problem.accuracy_target)), flush=True)
  return {k: r for k, r in runs.items() if isinstance(r, _harness.Run)
          and ("kfac" not in k or "adaptive" in k or "best fixed" in k)}


def _floats(text: str) -> tuple[float, ...]:
  return tuple(float(x) for x in text.split(",") if x)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default="convnet,mlp,autoencoder")
  parser.add_argument("--steps", type=int, default=300, help="convnet and MLP (default: 300)")
  parser.add_argument("--batch-size", type=int, default=128, help="convnet and MLP")
  parser.add_argument("--ae-steps", type=int, default=300, help="autoencoder (default: 300)")
  parser.add_argument("--ae-batch-size", type=int, default=256)
  parser.add_argument("--widths", type=lambda s: tuple(int(x) for x in s.split(",")),
                      default=autoencoder.WIDTHS, help="the autoencoder's hidden widths")
  parser.add_argument("--classifier-adam-lrs", type=_floats, default=(1e-3, 3e-3, 1e-2))
  parser.add_argument("--classifier-sgd-lrs", type=_floats, default=(1e-2, 3e-2, 1e-1))
  parser.add_argument("--ae-adam-lrs", type=_floats, default=autoencoder.ADAM_LRS)
  parser.add_argument("--ae-sgd-lrs", type=_floats, default=autoencoder.SGD_LRS)
  parser.add_argument("--eval-every", type=int, default=20,
                      help="convnet test accuracy every this many steps (default: 20)")
  parser.add_argument("--sync-every", type=int, default=1,
                      help="block_until_ready every this many steps (default: 1)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--plot", metavar="PNG", default="convergence.png")
  parser.add_argument("--data-dir", default=os.path.join(_HERE, "..", "..", "shared", "data",
                                                         "mnist"))
  parser.add_argument("--fake-data", action="store_true")
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, _harness.Run]]:
  args = parse_args(argv)
  data = mnist_data.fake_data(seed=args.seed) if args.fake_data else mnist_data.load_idx(
      args.data_dir)
  print(f"jax {jax.__version__} on {jax.default_backend()}; {len(data['train'][0])} train / "
        f"{len(data['test'][0])} test images; sync every {args.sync_every} step(s)")
  builders = {
      "convnet": lambda: classifier("seed convnet", mnist.ConvNet(), data, args, args.steps,
                                    CLASSIFIER_KFAC, args.eval_every, ACCURACY_TARGET),
      "mlp": lambda: classifier("MLP 784-512-256-10", MLP(), data, args, args.steps, MLP_KFAC),
      "autoencoder": lambda: autoencoder_problem(data, args),
  }
  panels = {}
  for name in args.models.split(","):
    problem = builders[name]()
    panels[problem.name] = run_problem(problem, args)
  if args.plot and any(panels.values()):
    _harness.plot({k: v for k, v in panels.items() if v}, args.plot)
    print(f"\nwrote {args.plot}")
  return panels


if __name__ == "__main__":
  main()
