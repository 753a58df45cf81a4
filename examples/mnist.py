"""Trains the tensorflow/kfac convolutional MNIST example with jkfac (or Adam).

The model is the seed's small convnet: two 5x5 convolutions with 16 channels, each
followed by ReLU and a 3x3/2 max-pool, then a dense softmax layer. The first
convolution uses the diagonal K-FAC block, the others the default Kronecker one.

    python examples/mnist.py --steps 300   # the bundled digits
    python examples/mnist.py --fake-data --steps 20
    python examples/mnist.py --optimizer both --plot out.png --metrics-csv metrics.csv
    python examples/mnist.py --fake-data --checkpoint-dir /tmp/ckpt  # resumes

jkfac is used as any optax optimizer, with two differences: `jkfac.kfac` needs the
loss function (with its layers tagged and its loss registered) and an example
batch, and its `update` takes the batch (`jkfac.flax.TrainState` forwards it).
All K-FAC work -- statistics, EMAs, periodic inverses -- happens inside the one
jitted train step.

With `--checkpoint-dir DIR` the parameters, the optimizer state and the step are saved
(`jkfac.checkpoint`) every `--checkpoint-every` steps and at the end, and a run resumes
from the latest checkpoint in DIR: it redraws the same batch order from `--seed`, so a run
stopped and resumed ends with the same bits as one that ran through (on the same devices).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from typing import Any, Sequence

import flax.jax_utils
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

import jkfac
import jkfac.checkpoint

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
from benchmarks import harness as _harness  # noqa: E402
from benchmarks import progress as _progress  # noqa: E402
import mnist_data  # noqa: E402

OPTIMIZERS = ("kfac", "adam")
DATA_AXIS = "data"
EVAL_BATCH_SIZE = 1000
CSV_FIELDS = ("optimizer", "step", "seconds", "train_loss", "test_loss", "test_accuracy")


class ConvNet(nn.Module):
  """The convnet of tensorflow/kfac's convolutional MNIST example."""
  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = jkfac.flax.Conv(16, (5, 5), padding="SAME", kfac_approx="diagonal")(x)
    x = nn.max_pool(nn.relu(x), window_shape=(3, 3), strides=(2, 2), padding="SAME")
    x = jkfac.flax.Conv(16, (5, 5), padding="SAME")(x)
    x = nn.max_pool(nn.relu(x), window_shape=(3, 3), strides=(2, 2), padding="SAME")
    x = x.reshape((x.shape[0], -1))
    return jkfac.flax.Dense(self.num_classes)(x)


def make_loss_fn(model: nn.Module):
  """`loss_fn(params, batch) -> (mean cross-entropy, batch accuracy)`."""

  def loss_fn(params, batch):
    logits = model.apply({"params": params}, batch["image"])
    # Tells K-FAC the model's predictive distribution; use the returned logits.
    logits = jkfac.register_softmax_cross_entropy(logits, batch["label"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == batch["label"])
    return loss, accuracy

  return loss_fn


def make_optimizer(name: str, args: argparse.Namespace, loss_fn, example_batch,
                   mesh=None) -> optax.GradientTransformation:
  """K-FAC or Adam; K-FAC averages over the pmap axis, or spreads inverses over `mesh`."""
  if name == "kfac":
    parallel = {}
    if mesh is not None:
      parallel = dict(axis_name=DATA_AXIS, mesh=mesh)
    elif args.devices > 1:
      parallel = dict(axis_name=DATA_AXIS)
    return jkfac.kfac(loss_fn, example_batch,
                      learning_rate=args.learning_rate,
                      damping=args.damping,
                      momentum=args.momentum,
                      cov_update_every=args.cov_update_every,
                      invert_every=args.invert_every,
                      seed=args.seed, **parallel)
  return optax.adam(args.adam_learning_rate)


def make_train_step(loss_fn, axis_name: str | None = None):
  """The whole step -- gradients, optimizer update, new parameters -- to jit or pmap.

  Under `jax.pmap(..., axis_name=axis_name)` gradients and metrics are averaged over
  the devices (K-FAC averages its statistics too, given the same axis name).
  """

  def train_step(state: jkfac.flax.TrainState, batch):
    (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch)
    if axis_name is not None:
      grads, loss, accuracy = jax.lax.pmean((grads, loss, accuracy), axis_name)
    state = state.apply_gradients(grads=grads, batch=batch)  # K-FAC needs the batch.
    return state, loss, accuracy

  return train_step


def data_parallel(args: argparse.Namespace, state: jkfac.flax.TrainState, loss_fn):
  """`(state, step, place_batch, unplace)` for one device, pmap, or jit over a mesh.

  `unplace(state)` is the state as on one device: one replica under pmap.

  pmap: the state is replicated and each batch split into `(devices, batch/devices, ...)`.
  mesh: the batch is sharded over the mesh's data axis and jit partitions the step.
  """
  if args.devices == 1:
    return state, jax.jit(make_train_step(loss_fn)), lambda batch: batch, lambda s: s
  if args.sharding:
    replicated = NamedSharding(args.mesh, PartitionSpec())
    sharded = NamedSharding(args.mesh, PartitionSpec(DATA_AXIS))
    return (jax.device_put(state, replicated), jax.jit(make_train_step(loss_fn)),
            lambda batch: jax.device_put(batch, sharded), lambda s: s)
  step = jax.pmap(make_train_step(loss_fn, DATA_AXIS), axis_name=DATA_AXIS)

  def first_device(state, batch):
    state, loss, accuracy = step(state, batch)
    return state, loss[0], accuracy[0]

  return (flax.jax_utils.replicate(state, axis_name=DATA_AXIS), first_device,
          lambda batch: jkfac.parallel.split_batch(batch, args.devices),
          flax.jax_utils.unreplicate)


def make_evaluate(model: nn.Module, batch_size: int = EVAL_BATCH_SIZE):
  """`evaluate(params, x, y) -> (mean loss, accuracy)`, in fixed-size jitted batches."""

  @jax.jit
  def eval_step(params, images, labels, mask):
    logits = model.apply({"params": params}, images)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = jnp.argmax(logits, axis=-1) == labels
    return jnp.sum(losses * mask), jnp.sum(correct * mask)

  def evaluate(params, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    size = min(batch_size, len(x))
    total_loss, total_correct = 0.0, 0
    for start in range(0, len(x), size):
      images, labels = x[start:start + size], y[start:start + size]
      mask = np.ones(size, np.float32)
      if len(images) < size:  # Pad the last batch so eval_step compiles once.
        pad = size - len(images)
        mask[len(images):] = 0
        images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
        labels = np.concatenate([labels, np.zeros(pad, labels.dtype)])
      loss, correct = eval_step(params, images, labels, mask)
      total_loss += float(loss)
      total_correct += int(correct)
    return total_loss / len(x), total_correct / len(x)

  return evaluate


def latest_checkpoint(directory: str) -> int | None:
  """The largest step with a complete checkpoint in `directory` (orbax writes unfinished ones
  under a temporary name), or None."""
  if not os.path.isdir(directory):
    return None
  steps = [int(name) for name in os.listdir(directory) if name.isdigit()]
  return max(steps, default=None)


def checkpoint_tree(state: jkfac.flax.TrainState) -> dict[str, Any]:
  """What a checkpoint holds: the step also gives the data position (one batch per step)."""
  return {"params": state.params, "opt_state": state.opt_state,
          "step": jnp.asarray(state.step, jnp.int32)}


def resume(directory: str, state: jkfac.flax.TrainState) -> tuple[jkfac.flax.TrainState, int]:
  """`state` from the latest checkpoint in `directory` and its step; `(state, 0)` if none."""
  step = latest_checkpoint(directory)
  if step is None:
    return state, 0
  path = os.path.join(directory, str(step))
  tree = jkfac.checkpoint.restore(path, checkpoint_tree(state))
  state = state.replace(params=tree["params"], opt_state=tree["opt_state"], step=tree["step"])
  return state, int(tree["step"])


def save(directory: str, state: jkfac.flax.TrainState, step: int) -> None:
  """Saves `state` (as on one device) under `directory/step`, replacing one of that step."""
  jkfac.checkpoint.save(os.path.join(directory, str(step)), checkpoint_tree(state), force=True)


def train(name: str, args: argparse.Namespace, data,
          csv: _progress.MetricsCSV | None = None) -> dict[str, Any]:
  """Trains one optimizer up to step `args.steps`; returns its history and test metrics."""
  (x_train, y_train), (x_test, y_test) = data["train"], data["test"]
  model = ConvNet()
  loss_fn = make_loss_fn(model)
  example_batch = {"image": x_train[:args.batch_size], "label": y_train[:args.batch_size]}
  params = model.init(jax.random.PRNGKey(args.seed), example_batch["image"])["params"]
  if args.devices > 1 and not args.sharding:  # K-FAC sees one device's share under pmap
    example_batch = jkfac.parallel.split_batch(example_batch, args.devices)
    example_batch = jax.tree_util.tree_map(lambda x: x[0], example_batch)
  tx = make_optimizer(name, args, loss_fn, example_batch, args.mesh)
  state = jkfac.flax.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
  directory = args.checkpoint_dir and os.path.join(args.checkpoint_dir, name)
  state, first = resume(directory, state) if directory else (state, 0)
  if first:
    print(f"{name}: resumed from step {first} ({os.path.join(directory, str(first))})",
          flush=True)
  state, train_step, place_batch, unplace = data_parallel(args, state, loss_fn)
  evaluate = make_evaluate(model)
  batches = mnist_data.batches(x_train, y_train, args.batch_size, seed=args.seed)
  for _ in range(first):  # The batches the checkpointed run has already seen.
    next(batches)

  if first < args.steps:
    print(f"--- {name}: steps {first + 1} to {args.steps} of batch {args.batch_size} on "
          f"{len(x_train)} training images", flush=True)
  else:
    print(f"--- {name}: already at step {first} of {args.steps}; nothing to train", flush=True)
  steps, seconds, losses = [], [], []
  diverged = False
  with _progress.Progress(args.steps, name, every=args.log_every, start=first) as progress:
    for step in range(first + 1, args.steps + 1):
      state, loss, accuracy = train_step(state, place_batch(next(batches)))
      # Fetching the loss waits for the step; it costs little and times every step.
      loss, accuracy = float(loss), float(accuracy)
      window = progress.update(step, loss=loss, batch_acc=accuracy)
      steps.append(step)
      seconds.append(progress.seconds)
      losses.append(loss)
      if _harness.is_diverged([loss], losses[0]):  # Not finite, or 10x the first loss.
        print(f"{name}: step {step}: loss {loss:.3g}, diverged; stopping (lower the learning "
              "rate or raise --damping)", flush=True)
        diverged = True
        break
      if directory and step % args.checkpoint_every == 0 and step < args.steps:
        save(directory, unplace(state), step)
      if csv and window and step < args.steps:
        csv.write(optimizer=name, step=step, seconds=seconds[-1], train_loss=window["loss"])
  if directory and steps and not diverged:
    save(directory, unplace(state), steps[-1])

  test_loss, test_accuracy = evaluate(unplace(state).params, x_test, y_test)
  window = min(len(losses), args.log_every)
  final_loss = float(np.mean(losses[-window:])) if losses else float("nan")
  if losses:
    print(f"{name}: final train loss {final_loss:.4f} (mean of the last {window} steps), "
          f"{progress.steps_per_second:.1f} steps/s (excluding the compiling first step)",
          flush=True)
  print(f"{name}: test loss {test_loss:.4f}, test accuracy {test_accuracy:.4f} "
        f"({len(x_test)} images)", flush=True)
  if csv:
    csv.write(optimizer=name, step=steps[-1] if steps else first,
              seconds=seconds[-1] if seconds else "", train_loss=final_loss if losses else "",
              test_loss=test_loss, test_accuracy=test_accuracy)
  return {"steps": steps, "seconds": seconds, "losses": losses, "final_loss": final_loss,
          "steps_per_second": progress.steps_per_second, "test_loss": test_loss,
          "test_accuracy": test_accuracy, "diverged": diverged, "first_step": first,
          "params": unplace(state).params}


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
  parser = argparse.ArgumentParser(prog="mnist.py", description=__doc__.split("\n\n")[0])
  parser.add_argument("--optimizer", choices=OPTIMIZERS + ("both",), default="kfac",
                      help="'both' runs K-FAC, then Adam, from the same start (default: kfac)")
  parser.add_argument("--steps", type=int, default=300, help="training steps (default: 300)")
  parser.add_argument("--batch-size", type=int, default=128, help="(default: 128)")
  parser.add_argument("--seed", type=int, default=0,
                      help="seeds the initialization, the batch order and K-FAC's sampling "
                           "(default: 0)")
  parser.add_argument("--log-every", type=int, default=25,
                      help="average the loss and batch accuracy over this many steps: shown "
                           "in the progress bar, or printed where output is no terminal, and "
                           "written to --metrics-csv (default: 25)")
  parser.add_argument("--plot", metavar="PNG",
                      help="save the training loss against step and against seconds here")
  parser.add_argument("--metrics-csv", metavar="FILE",
                      help="write one row per --log-every steps and one with the test metrics "
                           f"at the end: {', '.join(CSV_FIELDS)} (a resumed run appends)")
  checkpoints = parser.add_argument_group("checkpoints")
  checkpoints.add_argument("--checkpoint-dir", metavar="DIR",
                           help="save checkpoints in DIR/OPTIMIZER/STEP, and resume from the "
                                "latest one there (with the same --seed, --batch-size and data, "
                                "to draw the same batches)")
  checkpoints.add_argument("--checkpoint-every", type=int, default=100, metavar="N",
                           help="with --checkpoint-dir: save every N steps, and at the end "
                                "(default: 100)")
  kfac = parser.add_argument_group("K-FAC")
  kfac.add_argument("--learning-rate", type=float, default=5e-4, help="(default: 5e-4)")
  kfac.add_argument("--damping", type=float, default=1e-3,
                    help="Tikhonov damping; keep --learning-rate at most about --damping "
                         "(default: 1e-3)")
  kfac.add_argument("--momentum", type=float, default=0.9, help="(default: 0.9)")
  kfac.add_argument("--cov-update-every", type=int, default=10,
                    help="update the curvature statistics every this many steps (default: 10,"
                         " jkfac.kfac's)")
  kfac.add_argument("--invert-every", type=int, default=100,
                    help="recompute the inverses every this many steps (default: 100, "
                         "jkfac.kfac's)")
  adam = parser.add_argument_group("Adam")
  adam.add_argument("--adam-learning-rate", type=float, default=3e-3, help="(default: 3e-3)")
  devices = parser.add_argument_group(
      "data parallel", "on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=8 gives 8 devices")
  devices.add_argument("--devices", type=int, default=1,
                       help="split each batch over this many devices with jax.pmap (default: 1)")
  devices.add_argument("--sharding", action="store_true",
                       help="with --devices N: jax.jit over a mesh with the batch sharded, "
                            "instead of pmap")
  data = parser.add_argument_group("data")
  data.add_argument("--dataset", choices=("tfds", "idx", "fake"),
                    help="where MNIST comes from (default: idx, the bundled 10,000 test digits)")
  data.add_argument("--data-dir", metavar="DIR",
                    help="a folder of MNIST IDX .gz files (default: the bundled examples/data/mnist; "
                         "the TFDS data_dir with --dataset tfds)")
  data.add_argument("--fake-data", action="store_true",
                    help="random MNIST-shaped data, for smoke runs (same as --dataset fake)")
  args = parser.parse_args(argv)
  if args.fake_data:
    if args.dataset not in (None, "fake"):
      parser.error(f"--fake-data conflicts with --dataset {args.dataset}")
    args.dataset = "fake"
  elif args.dataset is None:
    args.dataset = "idx"
  if args.dataset == "idx" and not args.data_dir:
    args.data_dir = mnist_data.BUNDLED_DIR
  for flag in ("steps", "batch_size", "log_every", "cov_update_every", "invert_every", "devices",
               "checkpoint_every"):
    if getattr(args, flag) < 1:
      parser.error(f"--{flag.replace('_', '-')} must be at least 1")
  if args.devices > jax.device_count():
    parser.error(f"--devices {args.devices}, but JAX sees {jax.device_count()}; on CPU set "
                 f"XLA_FLAGS=--xla_force_host_platform_device_count={args.devices}")
  if args.batch_size % args.devices:
    parser.error(f"--batch-size {args.batch_size} is not divisible by --devices {args.devices}")
  if args.sharding and args.devices == 1:
    parser.error("--sharding needs --devices N with N > 1")
  args.mesh = (jax.make_mesh((args.devices,), (DATA_AXIS,),
                             axis_types=(jax.sharding.AxisType.Auto,))
               if args.sharding else None)
  return parser, args


def load_data(args: argparse.Namespace):
  if args.dataset == "fake":
    return mnist_data.fake_data(seed=args.seed)
  if args.dataset == "idx":
    return mnist_data.load_idx(args.data_dir)
  absl_logger = logging.getLogger("absl")  # TFDS warns on its way to failing; quiet it.
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)
  try:
    return mnist_data.load_tfds(args.data_dir)
  finally:
    absl_logger.setLevel(level)


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
  parser, args = parse_args(argv)
  try:
    data = load_data(args)
  except (OSError, RuntimeError, ValueError) as e:
    message = (str(e).strip().splitlines() or [type(e).__name__])[0]
    print(f"{parser.prog}: error: {message}", file=sys.stderr)
    raise SystemExit(2) from None
  if len(data["train"][0]) < args.batch_size:
    parser.error(f"--batch-size {args.batch_size} exceeds the {len(data['train'][0])} "
                 "training images")
  print(f"jkfac {jkfac.__version__}, jax {jax.__version__} on {jax.default_backend()}; "
        f"data: {args.dataset} ({len(data['train'][0])} train / {len(data['test'][0])} test)",
        flush=True)
  names = OPTIMIZERS if args.optimizer == "both" else (args.optimizer,)
  with contextlib.ExitStack() as stack:
    csv = args.metrics_csv and stack.enter_context(_progress.MetricsCSV(
        args.metrics_csv, CSV_FIELDS, append=bool(args.checkpoint_dir)))
    results = {name: train(name, args, data, csv or None) for name in names}
  if args.plot:
    runs = {name: _harness.Run(np.asarray(r["losses"]), np.asarray(r["seconds"]), [],
                               r["diverged"], start=r["first_step"])
            for name, r in results.items()}
    _harness.plot({"MNIST convnet: K-FAC vs Adam": runs}, args.plot)
  return results


if __name__ == "__main__":
  main()
