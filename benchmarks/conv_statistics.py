"""Times the cheaper conv input factors on the seed convnet, in one process.

    python -m benchmarks.conv_statistics [--rounds 5] [--batch 128] [--steps 10]

The seed convnet's second conv (`Conv_1`: 5x5x16 patches at 128·14·14 positions, a
401x401 input factor A) dominates K-FAC's statistics. This times, jitted:
  - the A statistic alone, from the layer's input: every patch ("kron"), patches
    averaged per example ("kron_reduce", K-FAC-reduce), and a random subset of
    `sub_sample_patches=3` x 400 patch rows (as tensorflow/kfac's default);
  - the whole K-FAC step (statistics every step, inverses every 10) with each, next
    to Adam, at fixed parameters (see `step_time.py`).
Rounds interleave the configurations; figures are medians, compared as ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import optax

import jkfac  # noqa: E402
from jkfac import layer_table, layers  # noqa: E402
from jkfac import interpreter  # noqa: E402
from mnist import ConvNet  # noqa: E402
from benchmarks.step_time import make_loss, make_step  # noqa: E402

LAYER = "Conv_1"
SUB_SAMPLE = 3.0


def timed(fn, *args, repeats: int) -> float:
  """Seconds per call of the jitted `fn(*args)`, after a warm-up call."""
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  for _ in range(repeats):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / repeats


def input_factor_functions(layer):
  """The A statistic of `layer` from its input `x`, for each way of estimating it."""
  key = jax.random.PRNGKey(1)
  return {
      "kron (every patch)": jax.jit(lambda x: layers.layer_inputs(layer, x).covariance()),
      "kron_reduce": jax.jit(lambda x: layers.layer_inputs(layer, x, reduce=True).covariance()),
      f"sub_sample_patches={SUB_SAMPLE:g}": jax.jit(lambda x: layers.layer_inputs(
          layer, x, sample=layers.sample_rows(layer, SUB_SAMPLE, key)).covariance()),
  }


def step_configurations(loss_fn, batch):
  kfac = lambda **kwargs: jkfac.kfac(loss_fn, batch, learning_rate=1e-3, damping=1e-1,
                                     invert_every=10, **kwargs)
  return {
      "adam": optax.adam(1e-3),
      "kfac (kron)": kfac(),
      "kfac, Conv_1 kron_reduce": kfac(approximations={LAYER: "kron_reduce"}),
      f"kfac, sub_sample_patches={SUB_SAMPLE:g}": kfac(sub_sample_patches=SUB_SAMPLE),
  }


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--steps", type=int, default=10,
                      help="calls timed per round (default: 10, one inverse period); 0: the "
                           "input factors only, no whole steps")
  args = parser.parse_args(argv)
  key = jax.random.PRNGKey(0)
  batch = {"image": jax.random.uniform(key, (args.batch, 28, 28, 1)),
           "label": jax.random.randint(key, (args.batch,), 0, 10)}
  model = ConvNet()
  params = model.init(key, batch["image"])["params"]
  loss_fn = make_loss(model)

  trace = layer_table.trace_layers(loss_fn, params, batch)
  layer = next(layer for layer in trace.layers if layer.name == LAYER)
  x = interpreter.linearize(loss_fn, params, batch).inputs[layer.tags[0]]
  factor_fns = input_factor_functions(layer)
  steps = {}
  for label, tx in (step_configurations(loss_fn, batch) if args.steps else {}).items():
    step = make_step(loss_fn, tx, fused=False)
    state = (params, tx.init(params))
    jax.block_until_ready(step(*state, batch)[2])
    steps[label] = dict(step=step, state=state)

  factor_times = {label: [] for label in factor_fns}
  step_times = {label: [] for label in steps}
  for _ in range(args.rounds):
    for label, fn in factor_fns.items():
      factor_times[label].append(timed(fn, x, repeats=max(args.steps, 1)))
    for label, run in steps.items():
      p, s = run["state"]
      start = time.perf_counter()
      for _ in range(args.steps):
        p, s, loss = run["step"](p, s, batch)
      jax.block_until_ready(loss)
      step_times[label].append((time.perf_counter() - start) / args.steps)

  print(f"\n{LAYER} input factor A ({layer.input_shape} inputs), "
        f"{jax.devices()[0].platform}, median of {args.rounds} rounds")
  print(f"{'estimate':32s} {'ms':>8s} {'x kron':>7s}")
  base = statistics.median(factor_times["kron (every patch)"])
  for label, times in factor_times.items():
    ms = statistics.median(times)
    print(f"{label:32s} {ms * 1e3:8.2f} {ms / base:7.2f}")
  if not steps:
    return
  print(f"\nconvnet step, batch {args.batch}, statistics every step, inverses every 10")
  print(f"{'configuration':32s} {'ms/step':>8s} {'x adam':>7s}")
  adam = statistics.median(step_times["adam"])
  for label, times in step_times.items():
    ms = statistics.median(times)
    print(f"{label:32s} {ms * 1e3:8.1f} {ms / adam:7.2f}")


if __name__ == "__main__":
  main()
