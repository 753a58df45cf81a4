"""Trains a small convnet on MNIST with K-FAC (jkfac), then with Adam, and compares them.

    python examples/mnist.py                       # the bundled digits: 8,000 train / 2,000 test
    python examples/mnist.py --dataset download    # full MNIST: 60,000 train / 10,000 test
    python examples/mnist.py --steps 3             # a quick check that everything runs

`jkfac.kfac` is an optax optimizer with two differences: it takes the loss function (its
layers tagged, here by `jkfac.flax` modules, and its loss registered) and an example
batch, and its `update` takes the batch (`jkfac.flax.TrainState` passes it on).
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import jkfac
import jkfac.flax
import mnist_data  # beside this file


class ConvNet(nn.Module):
  """Two 5x5 convolutions (16 channels, ReLU, 3x3/2 max-pool), then a dense softmax layer."""
  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = jkfac.flax.Conv(16, (5, 5), padding="SAME", approximation="diagonal")(x)
    x = nn.max_pool(nn.relu(x), window_shape=(3, 3), strides=(2, 2), padding="SAME")
    x = jkfac.flax.Conv(16, (5, 5), padding="SAME")(x)
    x = nn.max_pool(nn.relu(x), window_shape=(3, 3), strides=(2, 2), padding="SAME")
    return jkfac.flax.Dense(self.num_classes)(x.reshape((x.shape[0], -1)))


def make_loss_fn(model: nn.Module):
  """`loss_fn(params, batch) -> (mean cross-entropy, accuracy)`."""

  def loss_fn(params, batch):
    logits = model.apply({"params": params}, batch["image"])
    # Tells K-FAC the model's predictive distribution; use the logits it returns.
    logits = jkfac.register_softmax_cross_entropy(logits, batch["label"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    return loss, jnp.mean(jnp.argmax(logits, axis=-1) == batch["label"])

  return loss_fn


def make_train_step(loss_fn):
  """One step: gradients, the optimizer's update (with the batch), new parameters."""

  def train_step(state: jkfac.flax.TrainState, batch):
    (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch)
    return state.apply_gradients(grads=grads, batch=batch), loss, accuracy

  return train_step


def make_evaluate(model: nn.Module, batch_size: int = 1000):
  """`evaluate(params, x, y) -> (mean loss, accuracy)` over every example."""
  loss_fn = jax.jit(make_loss_fn(model))

  def evaluate(params, x, y) -> tuple[float, float]:
    sums = [(len(x[i:i + batch_size]), loss_fn(params, {"image": x[i:i + batch_size],
                                                        "label": y[i:i + batch_size]}))
            for i in range(0, len(x), batch_size)]
    return tuple(sum(n * float(m[k]) for n, m in sums) / len(x) for k in (0, 1))

  return evaluate


def train(name: str, args: argparse.Namespace, data) -> dict[str, Any]:
  """Trains with `name` ("kfac" or "adam") for `args.steps` steps; returns the history."""
  (x, y), (x_test, y_test) = data["train"], data["test"]
  model, batches = ConvNet(), mnist_data.batches(x, y, args.batch_size, seed=args.seed)
  loss_fn, batch = make_loss_fn(model), next(batches)
  params = model.init(jax.random.PRNGKey(args.seed), batch["image"])["params"]
  tx = jkfac.kfac(loss_fn, batch) if name == "kfac" else optax.adam(args.adam_learning_rate)
  state = jkfac.flax.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
  step, losses, seconds, start = jax.jit(make_train_step(loss_fn)), [], [], time.perf_counter()
  for i in range(1, args.steps + 1):
    state, loss, accuracy = step(state, batch)
    losses.append(float(loss))  # waits for the step
    seconds.append(time.perf_counter() - start)
    if i % args.log_every == 0 or i == args.steps:
      print(f"{name} step {i}/{args.steps}: loss {losses[-1]:.4f}, batch accuracy "
            f"{float(accuracy):.3f}, {seconds[-1]:.1f} s", flush=True)
    batch = next(batches)
  test_loss, test_accuracy = make_evaluate(model)(state.params, x_test, y_test)
  return dict(losses=losses, seconds=seconds, test_loss=test_loss, test_accuracy=test_accuracy)


def plot(results: dict[str, dict[str, Any]], path: str) -> None:
  """Training loss against steps and against seconds (the first step includes compiling)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for name, r in results.items():
    axes[0].plot(range(1, len(r["losses"]) + 1), r["losses"], label=name)
    axes[1].plot(r["seconds"], r["losses"], label=name)
  for ax, xlabel in zip(axes, ("step", "seconds")):
    ax.set(xlabel=xlabel, ylabel="training loss", yscale="log", title="MNIST convnet")
    ax.legend()
  fig.savefig(path, dpi=100, bbox_inches="tight")


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
  parser = argparse.ArgumentParser(prog="mnist.py", description=__doc__.split("\n\n")[0])
  parser.add_argument("--optimizer", choices=("kfac", "adam", "both"), default="both")
  parser.add_argument("--steps", type=int, default=3 if os.environ.get("JKFAC_SMOKE") else 300,
                      help="(default: 300; 3 with JKFAC_SMOKE=1)")
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--adam-learning-rate", type=float, default=3e-3)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--log-every", type=int, default=50)
  parser.add_argument("--dataset", choices=("idx", "download", "fake"), default="idx",
                      help="idx: IDX files in --data-dir (default: the bundled test split); "
                           "download: full MNIST into --data-dir (default ~/.cache/jkfac/mnist)")
  parser.add_argument("--data-dir")
  parser.add_argument("--plot", default="mnist.png", help="where to save the plot ('' for none)")
  args = parser.parse_args(argv)
  try:
    data = {"idx": lambda: mnist_data.load_idx(args.data_dir or mnist_data.BUNDLED_DIR),
            "download": lambda: mnist_data.load_download(args.data_dir),
            "fake": lambda: mnist_data.fake_data(seed=args.seed)}[args.dataset]()
  except (OSError, ValueError) as e:
    parser.error(str(e).splitlines()[0])
  print(f"{len(data['train'][0])} training and {len(data['test'][0])} test digits", flush=True)
  names = ("kfac", "adam") if args.optimizer == "both" else (args.optimizer,)
  results = {name: train(name, args, data) for name in names}
  print(f"\n{'optimizer':10s} {'train loss':>10s} {'test loss':>9s} {'test accuracy':>13s}"
        f" {'seconds':>8s}")
  for name, r in results.items():
    print(f"{name:10s} {r['losses'][-1]:10.4f} {r['test_loss']:9.4f} "
          f"{r['test_accuracy']:13.4f} {r['seconds'][-1]:8.1f}")
  if args.plot:
    plot(results, args.plot)
    print(f"plot saved to {args.plot}")
  return results


if __name__ == "__main__":
  main()
