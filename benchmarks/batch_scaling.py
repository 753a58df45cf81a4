"""Steps and seconds to a fixed training loss against batch size: Adam, SGD with momentum
(each with a small learning-rate sweep per batch size) and the default `jkfac.kfac`.

    python -m benchmarks.batch_scaling [--models mlp,convnet] [--batch-sizes 128,512,2048,4096]
        [--steps 300] [--target LOSS] [--plot batch_scaling.png] [--data-dir examples/data/mnist]

K-FAC's preconditioning costs the same at every batch size, so its per-step advantage
turns into a wall-clock one as batches grow. For each model and batch size, every
optimizer trains from one initialisation on the same seeded batches (the models and data
of `benchmarks/robustness.py`); a run reaches the target when the running mean of 10
training losses does, and stops there; the best run of each sweep (fewest steps) is
reported, with the whole sweep printed. The plot is steps to target against batch size, log-log (the
critical-batch-size picture).
"""

from __future__ import annotations

import argparse
import os

import optax

from benchmarks import robustness  # noqa: E402  (models, data, training loop)

import jkfac  # noqa: E402

TARGETS = {"mlp": 0.15, "convnet": 0.15}
SWEEPS = {"adam": (3e-4, 1e-3, 3e-3), "sgd momentum": (0.03, 0.1, 0.3)}


def optimizers(loss_fn, batch):
  """`name -> [(label, optimizer)]`: the sweeps, and the default K-FAC (untuned)."""
  return {
      "adam": [(f"adam {lr:g}", optax.adam(lr)) for lr in SWEEPS["adam"]],
      "sgd momentum": [(f"sgd {lr:g}", optax.sgd(lr, momentum=0.9))
                       for lr in SWEEPS["sgd momentum"]],
      "kfac default": [("kfac default", jkfac.kfac(loss_fn, batch))],
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--models", default="mlp,convnet")
  parser.add_argument("--batch-sizes", default="128,512,2048,4096")
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--target", type=float, default=None,
                      help=f"the training loss to reach, for every model (default: {TARGETS})")
  parser.add_argument("--plot", default=None)
  parser.add_argument("--data-dir", default=os.path.join(os.path.dirname(__file__), "..",
                                                        "examples", "data", "mnist"))
  args = parser.parse_args()
  images, labels = robustness.load(args.data_dir)
  sizes = [int(b) for b in args.batch_sizes.split(",")]
  results = {}  # (model, optimizer) -> {batch: (steps, seconds)}
  for name in args.models.split(","):
    target = TARGETS[name] if args.target is None else args.target
    print(f"\n{name}: steps / seconds to a training loss of {target}")
    for batch_size in sizes:
      data = robustness.batches(name, images, labels, batch_size, args.steps)
      loss_fn, params = robustness.make_model(name, data[0]["x"][:2])
      for family, runs in optimizers(loss_fn, data[0]).items():
        best = None
        for label, tx in runs:
          losses, seconds = robustness.train(loss_fn, params, tx, data, stop_at=target)
          reached = robustness.hit(losses, seconds, target)
          shown = "not reached" if reached is None else f"{reached[0]} / {reached[1]:.1f} s"
          print(f"  batch {batch_size:5d}  {label:16s} {shown}", flush=True)
          if reached is not None and (best is None or reached[0] < best[0]):
            best = reached
        results.setdefault((name, family), {})[batch_size] = best
    for family in ("adam", "sgd momentum", "kfac default"):
      row = [results[name, family].get(b) for b in sizes]
      print(f"  best {family:14s} " + "  ".join(
          "-" if r is None else f"{r[0]:4d} st {r[1]:6.1f} s" for r in row))
  if args.plot:
    targets = {name: TARGETS[name] if args.target is None else args.target
               for name in args.models.split(",")}
    plot(results, targets, args.plot)
    print(f"plot: {args.plot}")


def plot(results, targets: dict[str, float], path: str) -> None:
  """Steps to each model's target against batch size, log-log, one panel per model
  (`results`: `(model, family) -> {batch: (steps, seconds) or None}`)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.ticker import NullFormatter

  fig, axes = plt.subplots(1, len(targets), figsize=(5 * len(targets), 4), squeeze=False)
  for ax, (name, target) in zip(axes[0], targets.items()):
    for family in ("adam", "sgd momentum", "kfac default"):
      points = [(b, r[0]) for b, r in results[name, family].items() if r is not None]
      if points:
        ax.loglog(*zip(*points), marker="o", label=family)
    sizes = sorted({b for (model, _), row in results.items() if model == name for b in row})
    ax.set_xticks(sizes, [str(b) for b in sizes])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set(title=f"{name}: steps to loss {target}", xlabel="batch size", ylabel="steps")
    if ax.get_lines():
      ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  main()
