"""Where a K-FAC step's time goes: its parts switched on one at a time.

    python -m benchmarks.step_breakdown [--model mlp|convnet|tiny] [--parts fixed|default]
        [--batch-size 128] [--rounds 5] [--steps N]

In one process, real training steps of the model of `benchmarks/step_time.py` at a
learning rate that stays finite. `--parts fixed` (the fixed-rate step): Adam; K-FAC
preconditioning only (statistics and inverses once, at step 0); statistics every step
without new inverses (plain and fused); statistics every step and inverses every 10.
`--parts default` (the one-call default): Adam; preconditioning only; the quadratic model
(α and μ, without the rejection test); the rejection test as well; the default with its
statistics every 5 steps and inverses every 50. Differences between rows are the cost of
each part; medians over interleaved rounds of `--steps` steps (default: 20, two inverse
periods, with `fixed`; 50, one, with `default`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path


import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

_HERE = Path(__file__).resolve().parent
import jkfac  # noqa: E402
from mnist import ConvNet  # noqa: E402
import mnist_data  # noqa: E402
from benchmarks.step_time import MLP, finite, load_batches, make_loss, make_step  # noqa: E402

NEVER = 2 ** 30  # a period no run reaches: the work happens at step 0 only


class TinyMLP(nn.Module):
  """784-32-10 with tanh: `--model tiny`, a quick check that the script runs (its K-FAC
  step compiles in a few seconds, the 784-512-256-10 MLP's in 10 to 15)."""

  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(jkfac.flax.Dense(32)(x.reshape(x.shape[0], -1)))
    return jkfac.flax.Dense(10)(x)


MODELS = {"mlp": MLP, "convnet": ConvNet, "tiny": TinyMLP}


def configurations(loss_fn, batch, parts: str = "fixed"):
  """`label -> (optimizer, fused)`, one part added per row (see the module docstring)."""
  kfac = lambda cov, inv: jkfac.kfac(loss_fn, batch, learning_rate=5e-4, damping=1e-3,
                                     cov_update_every=cov, invert_every=inv)
  if parts == "default":
    once = dict(cov_update_every=NEVER, invert_every=NEVER, warm_start=False)
    return {
        "adam": (optax.adam(1e-3), False),
        "kfac: preconditioning only": (kfac(NEVER, NEVER), False),
        "default: + quadratic model": (jkfac.kfac(
            loss_fn, batch, reject_steps=False, damping_adaptation_interval=NEVER, **once),
                                       False),
        "default: + rejection test": (jkfac.kfac(loss_fn, batch, **once), False),
        "default: + statistics / 5, inverses / 50": (jkfac.kfac(loss_fn, batch), False),
    }
  return {
      "adam": (optax.adam(1e-3), False),
      "kfac: preconditioning only": (kfac(NEVER, NEVER), False),
      "kfac: + statistics every step": (kfac(1, NEVER), False),
      "kfac: + statistics every step, fused": (kfac(1, NEVER), True),
      "kfac: + inverses every 10": (kfac(1, 10), False),
  }


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", choices=tuple(MODELS), default="mlp")
  parser.add_argument("--parts", choices=("fixed", "default"), default="fixed")
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--steps", type=int, default=None,
                      help="steps per round (default: 20 with fixed, 50 with default)")
  parser.add_argument("--data-dir", default=mnist_data.BUNDLED_DIR)
  args = parser.parse_args(argv)
  steps = args.steps or (50 if args.parts == "default" else 20)
  batches = load_batches(args.data_dir, args.batch_size)
  model = MODELS[args.model]()
  params = model.init(jax.random.PRNGKey(0), batches[0]["image"])["params"]
  loss_fn = make_loss(model)
  runs = {}
  for label, (tx, fused) in configurations(loss_fn, batches[0], args.parts).items():
    step = make_step(loss_fn, tx, fused)
    p, s, loss = step(params, tx.init(params), batches[0])
    jax.block_until_ready(loss)
    runs[label] = dict(step=step, state=(p, s), times=[], seen=1)
  for _ in range(args.rounds):
    for run in runs.values():
      p, s = run["state"]
      start = time.perf_counter()
      for _ in range(steps):
        p, s, loss = run["step"](p, s, batches[run["seen"] % len(batches)])
        run["seen"] += 1
      jax.block_until_ready(loss)
      run["times"].append((time.perf_counter() - start) / steps)
      run["state"], run["loss"] = (p, s), loss
  adam = statistics.median(runs["adam"]["times"])
  print(f"{args.model}, batch {args.batch_size}, {jax.devices()[0].platform}, median of "
        f"{args.rounds} rounds of {steps} steps")
  print(f"{'configuration':40s} {'ms/step':>8s} {'x adam':>7s} {'finite':>7s}")
  for label, run in runs.items():
    ms = statistics.median(run["times"])
    print(f"{label:40s} {ms * 1e3:8.2f} {ms / adam:7.2f} "
          f"{str(finite(run['state'][0], run['loss'])):>7s}")


if __name__ == "__main__":
  main()
