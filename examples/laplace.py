"""Laplace posteriors and influence functions for the MNIST convnet with `jkfac.curvature`.

Trains the convnet of examples/mnist.py briefly with K-FAC, then:
- fits the K-FAC curvature of the last layer and of all layers over the training set
  (`jkfac.curvature.fit`), tunes each Laplace posterior's prior precision by its marginal
  likelihood (`optimize_prior_precision`), and reports test NLL, accuracy and expected
  calibration error of the linearized predictive against the point estimate;
- scores every training digit's influence on a few test digits with EK-FAC
  (`jkfac.curvature.influence`) and draws the 5 most helpful and 5 most harmful.
Calibration is reported on the test digits and on the test digits rotated by 45°.

    PYTHONPATH=. python examples/laplace.py --steps 300 --plot influence.png
    PYTHONPATH=. python examples/laplace.py --fake-data --steps 5 --train-size 256

By default it reads the MNIST test digits bundled in examples/data/mnist (the last 2000
are held out for testing, the rest train).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import jkfac
import jkfac.curvature

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # our helpers sit beside us.
import mnist  # noqa: E402
import mnist_data  # noqa: E402

DEFAULT_DATA_DIR = mnist_data.BUNDLED_DIR
EVAL_BATCH = 500
ECE_BINS = 15


def train(args: argparse.Namespace, model, loss_fn, x: np.ndarray, y: np.ndarray):
  """The convnet's parameters after `args.steps` K-FAC steps."""
  batches = mnist_data.batches(x, y, args.batch_size, seed=args.seed)
  first = next(batches)
  params = model.init(jax.random.PRNGKey(args.seed), first["image"])["params"]
  tx = jkfac.kfac(loss_fn, first, learning_rate=args.learning_rate, damping=args.damping,
                  l2_reg=args.weight_decay or None, seed=args.seed)
  state = jkfac.flax.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
  step = jax.jit(mnist.make_train_step(loss_fn))
  batch = first
  for index in range(args.steps):
    state, loss, _ = step(state, batch)
    batch = next(batches)
    if (index + 1) % 100 == 0 or index + 1 == args.steps:
      print(f"train step {index + 1}: loss {float(loss):.4f}", flush=True)
  return state.params


def in_batches(x: np.ndarray, y: np.ndarray, size: int = EVAL_BATCH) -> list[dict[str, Any]]:
  """Consecutive batches, the last one smaller."""
  return [{"image": x[i:i + size], "label": y[i:i + size]} for i in range(0, len(x), size)]


def mean_nll(loss_fn, params, batches: list[dict[str, Any]]) -> float:
  """The mean cross-entropy over every example of `batches`."""
  loss = jax.jit(lambda p, b: loss_fn(p, b)[0])
  total = sum(float(loss(params, b)) * len(b["label"]) for b in batches)
  return total / sum(len(b["label"]) for b in batches)


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray,
                               bins: int = ECE_BINS) -> float:
  """ECE: the confidence-weighted gap between accuracy and confidence, in equal-width bins."""
  confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == labels
  which = np.minimum((confidence * bins).astype(int), bins - 1)
  return float(sum(np.abs(correct[which == b].mean() - confidence[which == b].mean())
                   * np.mean(which == b) for b in range(bins) if np.any(which == b)))


def report(name: str, probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
  nll = float(-np.mean(np.log(np.maximum(probs[np.arange(len(labels)), labels], 1e-12))))
  found = {"nll": nll, "accuracy": float(np.mean(probs.argmax(1) == labels)),
           "ece": expected_calibration_error(probs, labels)}
  print(f"{name:>36}: NLL {found['nll']:.4f}  accuracy {found['accuracy']:.4f}  "
        f"ECE {found['ece']:.4f}", flush=True)
  return found


def laplace(args, loss_fn, apply, params, train_batches, layers: str | None,
            train_nll: float):
  """Fits a K-FAC Laplace posterior on `layers` and tunes its prior precision; returns its
  summary and `probabilities(x)` of its linearized predictive."""
  start = time.perf_counter()
  curvature = jkfac.curvature.fit(loss_fn, params, train_batches, layers=layers,
                                  progress=True)
  tau = float(jkfac.curvature.optimize_prior_precision(curvature, params, train_nll))
  evidence = float(jkfac.curvature.log_marginal_likelihood(curvature, params, train_nll, tau))
  predict = jax.jit(lambda x, key: jkfac.curvature.predictive(
      curvature, apply, params, x, key, tau, args.num_samples))
  key = jax.random.PRNGKey(args.seed)
  print(f"{layers or 'all layers'}: {jkfac.curvature.num_parameters(curvature)} parameters, "
        f"prior precision {tau:.3g}, log evidence {evidence:.1f}, "
        f"{time.perf_counter() - start:.1f} s", flush=True)
  return {"prior_precision": tau, "log_evidence": evidence}, lambda x: np.concatenate(
      [np.asarray(predict(x[i:i + EVAL_BATCH], jax.random.fold_in(key, i)))
       for i in range(0, len(x), EVAL_BATCH)])


def rotated(images: np.ndarray, degrees: float) -> np.ndarray:
  """The digits rotated by `degrees`: a shifted test set, where calibration is harder."""
  import scipy.ndimage
  return scipy.ndimage.rotate(images, degrees, axes=(1, 2), reshape=False, order=1)


def plot_influence(path: str, queries: np.ndarray, query_labels: np.ndarray,
                   train_x: np.ndarray, train_y: np.ndarray, scores: np.ndarray,
                   top: int = 5) -> None:
  """One row per test digit: the digit, its `top` most helpful and `top` most harmful
  training digits, with their scores."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(len(queries), 2 * top + 1, figsize=(1.3 * (2 * top + 1),
                                                               1.5 * len(queries)))
  axes = np.atleast_2d(axes)
  for row, (query, label) in enumerate(zip(queries, query_labels)):
    order = np.argsort(-scores[:, row])
    picks = list(order[:top]) + list(order[::-1][:top])
    axes[row, 0].imshow(query[..., 0], cmap="gray")
    axes[row, 0].set_title(f"test: {label}", fontsize=8)
    for col, index in enumerate(picks, start=1):
      axes[row, col].imshow(train_x[index, ..., 0], cmap="gray_r" if col > top else "gray")
      axes[row, col].set_title(f"{train_y[index]} ({scores[index, row]:+.2g})", fontsize=7)
  for ax in axes.ravel():
    ax.set_xticks([])
    ax.set_yticks([])
  fig.suptitle(f"Most helpful ({top}, left) and harmful ({top}, right, inverted) training "
               "digits by EK-FAC influence", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=300, help="K-FAC training steps (300)")
  parser.add_argument("--batch-size", type=int, default=128, help="(default: 128)")
  parser.add_argument("--learning-rate", type=float, default=5e-4, help="(default: 5e-4)")
  parser.add_argument("--damping", type=float, default=1e-3, help="(default: 1e-3)")
  parser.add_argument("--weight-decay", type=float, default=1e-3,
                      help="L2 regularisation while training (kfac's l2_reg), so that the "
                      "point estimate is a MAP; 0 for none (default: 1e-3)")
  parser.add_argument("--rotation", type=float, default=45.0,
                      help="also evaluate on the test digits rotated by this (default: 45)")
  parser.add_argument("--train-size", type=int, default=None,
                      help="use only the first N training digits (default: all)")
  parser.add_argument("--num-samples", type=int, default=30,
                      help="posterior samples of the predictive (default: 30)")
  parser.add_argument("--queries", type=int, default=4, help="test digits to explain (4)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--plot", metavar="PNG", help="draw the influential digits here")
  parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR,
                      help="MNIST IDX files (default: the digits bundled in examples/data)")
  parser.add_argument("--fake-data", action="store_true", help="random MNIST-shaped data")
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  data = mnist_data.fake_data(seed=args.seed) if args.fake_data else mnist_data.load_idx(
      args.data_dir)
  (train_x, train_y), (test_x, test_y) = data["train"], data["test"]
  if args.train_size is not None:
    train_x, train_y = train_x[:args.train_size], train_y[:args.train_size]
  model = mnist.ConvNet()
  loss_fn = mnist.make_loss_fn(model)
  apply = lambda params, x: model.apply({"params": params}, x)
  params = train(args, model, loss_fn, train_x, train_y)

  train_batches = in_batches(train_x, train_y)
  train_nll = mean_nll(loss_fn, params, train_batches)
  logits = jax.jit(apply)
  splits = {"test": test_x, f"rotated {args.rotation:g}°": rotated(test_x, args.rotation)}

  def point(x: np.ndarray) -> np.ndarray:
    return np.concatenate([np.asarray(jax.nn.softmax(logits(params, x[i:i + EVAL_BATCH])))
                           for i in range(0, len(x), EVAL_BATCH)])

  results = {split: {"point estimate": report(f"{split}: point estimate", point(x), test_y)}
             for split, x in splits.items()}
  for name, layers in (("last-layer K-FAC LA", "last"), ("all-layer K-FAC LA", None)):
    found, probabilities = laplace(args, loss_fn, apply, params, train_batches, layers,
                                   train_nll)
    results[name] = found
    for split, x in splits.items():
      results[split][name] = report(f"{split}: {name}", probabilities(x), test_y)

  start = time.perf_counter()
  curvature = jkfac.curvature.fit(loss_fn, params, train_batches, approximation="ekfac",
                                  progress=True)
  queries = {"image": test_x[:args.queries], "label": test_y[:args.queries]}
  scores = np.asarray(jkfac.curvature.influence(curvature, loss_fn, params, train_batches,
                                                queries))
  print(f"influence of {len(train_y)} training digits on {args.queries} test digits: "
        f"{time.perf_counter() - start:.1f} s", flush=True)
  for q in range(args.queries):
    top = np.argsort(-scores[:, q])[:5]
    print(f"test digit {q} (label {test_y[q]}): most helpful training digits {top.tolist()} "
          f"labelled {train_y[top].tolist()}", flush=True)
  results["influence"] = scores
  if args.plot:
    plot_influence(args.plot, test_x[:args.queries], test_y[:args.queries], train_x, train_y,
                   scores)
    print(f"wrote {args.plot}")
  return results


if __name__ == "__main__":
  main()
