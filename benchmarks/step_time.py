"""Times a jitted train step of jkfac against optax Adam, in one process.

    python -m benchmarks.step_time [--model convnet|mlp|both] [--rounds 3] [--data-dir DIR]
                                   [--configs "adam,kfac default"]

For each model (the seed convnet and an MLP 784-512-256-10, batch 128) it times
Adam, the one-call default `jkfac.kfac(loss_fn, batch)` (statistics every 5 steps,
inverses every 50, quadratic-model steps, one extra forward pass for step rejection),
`graft="adam"` at Adam's learning rate, and fixed-rate K-FAC with statistics every step
and inverses every 10 (with the plain `tx.update`, its own forward pass for the
statistics, and with the fused `jkfac.value_and_grad` path). The default is also timed
on the fused path, and Adam with its gradient from `jkfac.value_and_grad` (the
curvature it returns unused), so that the fused rows have a baseline computed the same
way: on max-pooling models that gradient avoids XLA:CPU's slow `select_and_scatter`.
Everything runs in a default environment (no thread variables set), as users run it.
Every configuration is timed over whole inverse periods of real training steps
(parameters updated, at learning rates that stay finite), cycling over the same
batches of real digits (`--data-dir`, the first 8,000 test images; random images
where the files are absent); a run whose loss or parameters stop being finite is
reported as diverged, since NaN arithmetic has its own speed. Rounds interleave the
configurations and the figures are medians over rounds; ratios to Adam are what to
compare across machines.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import jkfac  # noqa: E402
import mnist_data  # noqa: E402
from mnist import ConvNet  # noqa: E402  (the example's model: the seed convnet)

BATCH_SIZE, NUM_BATCHES = 128, 16


class MLP(nn.Module):
  """784-512-256-10 with tanh."""

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    for width in (512, 256):
      x = jnp.tanh(jkfac.flax.Dense(width)(x))
    return jkfac.flax.Dense(10)(x)


def make_loss(model: nn.Module):
  def loss_fn(params, batch):
    logits = model.apply({"params": params}, batch["image"])
    jkfac.register_softmax_cross_entropy(logits, batch["label"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
  return loss_fn


def make_step(loss_fn, tx, fused: bool):
  @jax.jit
  def step(params, opt_state, batch):
    if fused:
      loss, grads, curvature = jkfac.value_and_grad(loss_fn)(params, batch)
      extra = {"batch": batch, "curvature": curvature}
    else:
      loss, grads = jax.value_and_grad(loss_fn)(params, batch)
      extra = {"batch": batch}
    updates, opt_state = tx.update(grads, opt_state, params, **extra)
    return optax.apply_updates(params, updates), opt_state, loss
  return step


def load_batches(data_dir: str, batch_size: int = BATCH_SIZE) -> list[dict[str, jax.Array]]:
  """Up to `NUM_BATCHES` batches of real digits, as many as the files hold (or random
  images if the files are absent)."""
  try:
    images, labels = mnist_data.load_idx(data_dir)["train"]
  except FileNotFoundError:
    print(f"no MNIST IDX files in {data_dir}: timing on random images")
    key = jax.random.PRNGKey(0)
    images = jax.random.uniform(key, (batch_size * NUM_BATCHES, 28, 28, 1))
    labels = jax.random.randint(key, (batch_size * NUM_BATCHES,), 0, 10)
  count = min(NUM_BATCHES, len(images) // batch_size)
  return [{"image": jnp.asarray(images[i * batch_size:(i + 1) * batch_size]),
           "label": jnp.asarray(labels[i * batch_size:(i + 1) * batch_size])}
          for i in range(count)]


def finite(params, loss) -> bool:
  leaves = [loss, *jax.tree_util.tree_leaves(params)]
  return all(bool(jnp.all(jnp.isfinite(x))) for x in leaves)


def configurations(loss_fn, batch):
  """`label -> (optimizer, fused, inverse period)`: Adam and the one-call default (each
  also with its gradient from `jkfac.value_and_grad`), grafting (Adam's learning rate),
  `jkfac.eigen_adam`, and fixed K-FAC with statistics every step / inverses every 10
  (plain and fused)."""
  fixed = lambda: jkfac.kfac(loss_fn, batch, learning_rate=5e-4, damping=1e-3,
                             cov_update_every=1, invert_every=10, warm_start=False)
  return {
      "adam": (optax.adam(1e-3), False, 10),
      "adam, jkfac.value_and_grad": (optax.adam(1e-3), True, 10),
      "kfac default": (jkfac.kfac(loss_fn, batch), False, 50),
      "kfac default, fused": (jkfac.kfac(loss_fn, batch), True, 50),
      "kfac graft adam": (jkfac.kfac(loss_fn, batch, learning_rate=1e-3, graft="adam"),
                          False, 50),
      "eigen adam": (jkfac.eigen_adam(loss_fn, batch, learning_rate=1e-3), False, 50),
      "kfac fixed, cov 1 / inv 10": (fixed(), False, 10),
      "kfac fixed, cov 1 / inv 10, fused": (fixed(), True, 10),
  }


def run_model(name: str, model: nn.Module, batches: list, rounds: int, min_steps: int,
              steps: int | None = None, labels: tuple[str, ...] | None = None) -> None:
  """Times the `configurations` named in `labels` (all by default; Adam always, the
  ratios' baseline)."""
  key = jax.random.PRNGKey(0)
  params = model.init(key, batches[0]["image"])["params"]
  loss_fn = make_loss(model)
  chosen = configurations(loss_fn, batches[0])
  if labels is not None:
    unknown = set(labels) - set(chosen)
    if unknown:
      raise SystemExit(f"--configs: unknown {sorted(unknown)}; choose from {list(chosen)}")
    chosen = {k: v for k, v in chosen.items() if k == "adam" or k in labels}
  runs = {}
  for label, (tx, fused, period) in chosen.items():
    step = make_step(loss_fn, tx, fused)
    start = time.perf_counter()
    p, s, loss = step(params, tx.init(params), batches[0])
    jax.block_until_ready(loss)
    runs[label] = dict(step=step, state=(p, s), compile=time.perf_counter() - start,
                       steps=steps or max(period, min_steps // period * period), times=[],
                       seen=1,
                       diverged=False)
  for _ in range(rounds):
    for run in runs.values():
      if run["diverged"]:
        continue
      p, s = run["state"]
      start = time.perf_counter()
      for _ in range(run["steps"]):
        p, s, loss = run["step"](p, s, batches[run["seen"] % len(batches)])
        run["seen"] += 1
      jax.block_until_ready(loss)
      run["times"].append((time.perf_counter() - start) / run["steps"])
      run["state"] = (p, s)
      run["diverged"] = not finite(p, loss)
      run["loss"] = float(loss)
  adam = statistics.median(runs["adam"]["times"])
  print(f"\n{name}, batch {BATCH_SIZE}, {jax.devices()[0].platform}, median of {rounds} rounds"
        " of real training steps")
  print(f"{'configuration':32s} {'ms/step':>8s} {'x adam':>7s} {'compile s':>10s} "
        f"{'last loss':>9s}")
  for label, run in runs.items():
    if run["diverged"]:
      print(f"{label:32s} diverged (loss or parameters not finite): not timed")
      continue
    ms = statistics.median(run["times"])
    print(f"{label:32s} {ms * 1e3:8.1f} {ms / adam:7.2f} {run['compile']:10.1f} "
          f"{run['loss']:9.4f}")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", choices=("convnet", "mlp", "both"), default="both")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--min-steps", type=int, default=20,
                      help="time at least this many steps per round (whole inverse periods)")
  parser.add_argument("--steps", type=int, default=None,
                      help="time exactly this many steps per round (a quick check)")
  parser.add_argument("--data-dir", default=mnist_data.BUNDLED_DIR)
  parser.add_argument("--configs", type=lambda s: tuple(s.split(",")), default=None,
                      help="comma-separated configuration labels to time (default: all; "
                      "Adam always)")
  args = parser.parse_args(argv)
  batches = load_batches(args.data_dir)
  timing = (args.rounds, args.min_steps, args.steps, args.configs)
  if args.model in ("convnet", "both"):
    run_model("seed convnet", ConvNet(), batches, *timing)
  if args.model in ("mlp", "both"):
    run_model("MLP 784-512-256-10", MLP(), batches, *timing)


if __name__ == "__main__":
  main()
