"""Times a jitted train step of jkfac against optax Adam, in one process.

    python benchmarks/step_time.py [--model convnet|mlp|both] [--rounds 3]

For each model (the seed convnet and an MLP 784-512-256-10, batch 128) it times
Adam and K-FAC with statistics every step / inverses every 10 steps, and
statistics every 10 / inverses every 100, each with the plain `tx.update` (its own
forward pass for the statistics) and with the fused `jkfac.value_and_grad` path.
Every configuration is timed over whole inverse periods, so the periodic work is
included at its real rate, at fixed parameters (the optimizer state evolves, the
parameters stay put, so a long run on one batch cannot drift into divergence).
Rounds interleave the configurations and the figures are medians over rounds;
ratios to Adam are what to compare across machines.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import jkfac  # noqa: E402
from mnist import ConvNet  # noqa: E402  (the example's model: the seed convnet)


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
      loss, grads, stats = jkfac.value_and_grad(loss_fn)(params, batch)
      extra = {"batch": batch, "stats": stats}
    else:
      loss, grads = jax.value_and_grad(loss_fn)(params, batch)
      extra = {"batch": batch}
    updates, opt_state = tx.update(grads, opt_state, params, **extra)
    return optax.apply_updates(params, updates), opt_state, loss
  return step


def hold_params(step):
  """The step at fixed parameters: the optimizer state evolves, the parameters do not.

  Timing many steps on one random batch would otherwise drift into divergence, and
  NaN or denormal arithmetic has its own, unrepresentative speed.
  """
  def held(params, opt_state, batch):
    new_params, opt_state, loss = step(params, opt_state, batch)
    return params, opt_state, loss + 0 * jax.tree_util.tree_leaves(new_params)[0].sum()
  return jax.jit(held)


def configurations(loss_fn, batch):
  kfac = lambda cov, inv: jkfac.kfac(loss_fn, batch, learning_rate=1e-3, damping=1e-1,
                                     cov_update_every=cov, invert_every=inv)
  return {
      "adam": (optax.adam(1e-3), False, 10),
      "kfac cov 1 / inv 10": (kfac(1, 10), False, 10),
      "kfac cov 1 / inv 10, fused": (kfac(1, 10), True, 10),
      "kfac cov 10 / inv 100": (kfac(10, 100), False, 100),
      "kfac cov 10 / inv 100, fused": (kfac(10, 100), True, 100),
  }


def run_model(name: str, model: nn.Module, rounds: int, min_steps: int) -> None:
  key = jax.random.PRNGKey(0)
  batch = {"image": jax.random.uniform(key, (128, 28, 28, 1)),
           "label": jax.random.randint(key, (128,), 0, 10)}
  params = model.init(key, batch["image"])["params"]
  loss_fn = make_loss(model)
  runs = {}
  for label, (tx, fused, period) in configurations(loss_fn, batch).items():
    step = hold_params(make_step(loss_fn, tx, fused))
    state = (params, tx.init(params))
    start = time.perf_counter()
    p, s, loss = step(*state, batch)
    jax.block_until_ready(loss)
    runs[label] = dict(step=step, state=(p, s), compile=time.perf_counter() - start,
                       steps=max(period, min_steps // period * period), times=[])
  for _ in range(rounds):
    for run in runs.values():
      p, s = run["state"]
      start = time.perf_counter()
      for _ in range(run["steps"]):
        p, s, loss = run["step"](p, s, batch)
      jax.block_until_ready(loss)
      run["times"].append((time.perf_counter() - start) / run["steps"])
      run["state"] = (p, s)
  adam = statistics.median(runs["adam"]["times"])
  print(f"\n{name}, batch 128, {jax.devices()[0].platform}, median of {rounds} rounds")
  print(f"{'configuration':32s} {'ms/step':>8s} {'x adam':>7s} {'compile s':>10s}")
  for label, run in runs.items():
    ms = statistics.median(run["times"])
    print(f"{label:32s} {ms * 1e3:8.1f} {ms / adam:7.2f} {run['compile']:10.1f}")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", choices=("convnet", "mlp", "both"), default="both")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--min-steps", type=int, default=20,
                      help="time at least this many steps per round (whole inverse periods)")
  args = parser.parse_args(argv)
  if args.model in ("convnet", "both"):
    run_model("seed convnet", ConvNet(), args.rounds, args.min_steps)
  if args.model in ("mlp", "both"):
    run_model("MLP 784-512-256-10", MLP(), args.rounds, args.min_steps)


if __name__ == "__main__":
  main()
