"""The one-call default `jkfac.kfac(loss_fn, batch)` on models of several kinds, untuned,
against Adam with a small learning-rate sweep: does it diverge, and how many steps and
seconds does it take to reach the best Adam's final loss?

    python -m benchmarks.robustness [--models mlp,autoencoder,regression,convnet,resnet]
        [--steps 200] [--batch-sizes 128] [--adam-rates 3e-4,1e-3,3e-3,1e-2]
        [--eigen-adam-rates 1e-3,3e-3,1e-2] [--kfac-variants "invert_every=20;..."]
        [--data-dir examples/data/mnist]

Models (real MNIST digits, the first 8,000 of the bundled test split): the MNIST convnet
with the whole Flax variables dict as parameters, an MLP 784-512-256-10 (tanh), a
784-256-64-256-784 autoencoder whose loss sums sigmoid cross-entropy over the pixels, a
regression MLP with a 1-D output (the digit's value, squared error) and a small ResNet
with BatchNorm. Five more kinds, not in the default `--models`: `deepmlp` (eight
256-wide Dense-LayerNorm-ReLU layers), `convae` (a conv / transposed-conv autoencoder,
squared error summed over the pixels), `vit` (a two-block transformer over 7×7 patches),
`gru` (a GRU reading the image's rows) and `dropout` (an MLP with dropout, its key in the
batch). Six more, also not in the default `--models`, each a kind the others lack:
`conv1d` (1-D convolutions over the rows as a sequence), `tied` (one Dense layer applied
in three residual blocks), `multilabel` (two sigmoid outputs, their mean cross-entropy),
`onehot` (a GELU/LayerNorm MLP regressing one-hot targets), `zerohead` (a ReLU MLP with
a zero-initialised output layer) and `bf16` (an MLP with bfloat16 parameters and
activations). Six more: `vae` (the Flax examples' variational autoencoder, its sampling
key in the batch, the KL term not registered), `groupnorm` (a convnet with GroupNorm),
`deeptanh` (ten tanh layers without normalisation), `unet` (a small denoising U-Net:
strided conv, transposed conv, a concatenated skip), `tiedae` (an autoencoder whose
decoder is the encoder's transpose: a weight with a use that is no layer, so a diagonal
block) and `tokenlstm` (an embedding and an LSTM over 49 grey-level tokens). Every
optimizer sees the same initialisation and the same batches, in
one process; seconds are those of real training steps (compilation excluded). The
target is the best Adam run's final loss (mean of its last 10 steps); a run reaches it
when the running mean of 10 steps does. `--eigen-adam-rates` also runs
`jkfac.eigen_adam` at each of these learning rates; `--kfac-variants` the default with
other settings (`;` between variants, `,` between settings). Prints one table per batch
size.
"""

from __future__ import annotations

import argparse
import ast
import math
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jkfac
import mnist_data  # the examples' data, importable through the benchmarks package

WINDOW = 10
ADAM_RATES = (3e-4, 1e-3, 3e-3, 1e-2)


class ConvNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    for _ in range(2):
      x = nn.max_pool(nn.relu(nn.Conv(16, (5, 5), padding="SAME")(x)), (3, 3), (2, 2), "SAME")
    return nn.Dense(10)(x.reshape(x.shape[0], -1))


class MLP(nn.Module):
  widths: tuple[int, ...] = (512, 256)
  outputs: int = 10
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    for width in self.widths:
      x = jnp.tanh(nn.Dense(width, dtype=self.dtype, param_dtype=self.dtype or jnp.float32)(x))
    x = nn.Dense(self.outputs, dtype=self.dtype, param_dtype=self.dtype or jnp.float32)(x)
    return x.astype(jnp.float32)  # the loss in float32 (Dense casts its inputs to dtype)


class AutoEncoder(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(256)(x.reshape(x.shape[0], -1)))
    x = nn.relu(nn.Dense(256)(nn.Dense(64)(x)))
    return nn.Dense(784)(x)


class ResNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    for width in (16, 32):
      x = nn.relu(nn.Conv(width, (3, 3), strides=(2, 2))(x))
      y = nn.relu(nn.BatchNorm(use_running_average=False)(nn.Conv(width, (3, 3))(x)))
      x = nn.relu(x + nn.BatchNorm(use_running_average=False)(nn.Conv(width, (3, 3))(y)))
    return nn.Dense(10)(x.mean(axis=(1, 2)))


class DeepMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    for _ in range(8):
      x = nn.relu(nn.LayerNorm()(nn.Dense(256)(x)))
    return nn.Dense(10)(x)


class ConvAutoEncoder(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(16, (3, 3), strides=2)(x))
    x = nn.relu(nn.Conv(32, (3, 3), strides=2)(x))
    x = nn.relu(nn.ConvTranspose(16, (3, 3), strides=(2, 2))(x))
    return nn.ConvTranspose(1, (3, 3), strides=(2, 2))(x)


class ViT(nn.Module):
  """Two pre-LayerNorm transformer blocks over the 16 patches of 7×7 pixels."""

  @nn.compact
  def __call__(self, x):
    n = x.shape[0]
    patches = x.reshape(n, 4, 7, 4, 7).transpose(0, 1, 3, 2, 4).reshape(n, 16, 49)
    h = nn.Dense(64)(patches) + self.param("position", nn.initializers.normal(0.02), (16, 64))
    for _ in range(2):
      h = h + nn.MultiHeadDotProductAttention(num_heads=4)(nn.LayerNorm()(h))
      h = h + nn.Dense(64)(nn.gelu(nn.Dense(128)(nn.LayerNorm()(h))))
    return nn.Dense(10)(nn.LayerNorm()(h).mean(axis=1))


class GRUClassifier(nn.Module):
  @nn.compact
  def __call__(self, x):
    hidden = nn.RNN(nn.GRUCell(64))(x.reshape(x.shape[0], 28, 28))
    return nn.Dense(10)(hidden[:, -1])


class DropoutMLP(nn.Module):
  @nn.compact
  def __call__(self, x, key):
    x = x.reshape(x.shape[0], -1)
    for width in (512, 512):
      x = nn.Dropout(0.2, deterministic=False)(nn.relu(nn.Dense(width)(x)), rng=key)
    return nn.Dense(10)(x)


class VAE(nn.Module):
  """The Flax examples' VAE: 784-500-(20, 20) encoder, 20-500-784 decoder, one sample."""

  @nn.compact
  def __call__(self, x, key):
    h = nn.relu(nn.Dense(500)(x.reshape(x.shape[0], -1)))
    mean, logvar = nn.Dense(20)(h), nn.Dense(20)(h)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, logvar.shape)
    return nn.Dense(784)(nn.relu(nn.Dense(500)(z))), mean, logvar


class GroupNormCNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    for width in (32, 64):
      x = nn.relu(nn.GroupNorm(num_groups=8)(nn.Conv(width, (3, 3), strides=2)(x)))
    return nn.Dense(10)(x.mean(axis=(1, 2)))


class DeepTanhMLP(nn.Module):
  """Ten 128-wide tanh layers, no normalisation."""

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    for _ in range(10):
      x = jnp.tanh(nn.Dense(128)(x))
    return nn.Dense(10)(x)


class SmallUNet(nn.Module):
  """A denoiser: one strided conv down, a transposed conv up, a skip joined by concat."""

  @nn.compact
  def __call__(self, x):
    skip = nn.silu(nn.Conv(16, (3, 3))(x))
    h = nn.silu(nn.Conv(32, (3, 3), strides=2)(skip))
    h = nn.silu(nn.ConvTranspose(16, (3, 3), strides=(2, 2))(h))
    return nn.Conv(1, (1, 1))(jnp.concatenate([h, skip], axis=-1))


class TiedAutoEncoder(nn.Module):
  """784-128-784 with the decoder's weight the encoder's transpose."""

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    w = self.param("w", nn.initializers.lecun_normal(), (784, 128))
    h = nn.sigmoid(x @ w + self.param("c", nn.initializers.zeros, (128,)))
    return h @ w.T + self.param("b", nn.initializers.zeros, (784,))


class TokenLSTM(nn.Module):
  """An LSTM over 49 tokens (16 grey levels of a 4×4-strided image), embedded."""

  @nn.compact
  def __call__(self, tokens):
    h = nn.RNN(nn.OptimizedLSTMCell(64))(nn.Embed(16, 32)(tokens))
    return nn.Dense(10)(h[:, -1])


class Conv1DNet(nn.Module):
  """1-D convolutions over the image's rows read as a sequence of 28 steps."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(32, (5,))(x.reshape(x.shape[0], 28, 28)))
    x = nn.relu(nn.Conv(64, (3,), strides=2)(x))
    return nn.Dense(10)(x.mean(axis=1))


class TiedResidualMLP(nn.Module):
  """One Dense layer applied three times in residual blocks (a tied, multi-use weight)."""

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(128)(x.reshape(x.shape[0], -1))
    block = nn.Dense(128)
    for _ in range(3):
      h = h + jnp.tanh(block(h))
    return nn.Dense(10)(h)


class GeluLayerNormMLP(nn.Module):
  outputs: int = 10

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    for _ in range(2):
      x = nn.gelu(nn.LayerNorm()(nn.Dense(256)(x)))
    return nn.Dense(self.outputs)(x)


class ZeroHeadMLP(nn.Module):
  """ReLU MLP whose output layer starts at zero (so do its hidden layers' gradients)."""

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    for width in (256, 128):
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(10, kernel_init=nn.initializers.zeros)(x)


def classifier(model, whole_variables=False):
  def loss_fn(params, batch):
    variables = params if whole_variables else {"params": params}
    logits, _ = model.apply(variables, batch["x"], mutable=["batch_stats"])
    jkfac.register_softmax_cross_entropy(logits, batch["y"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
  return loss_fn


def autoencoder_loss(model):
  def loss_fn(params, batch):
    logits = model.apply({"params": params}, batch["x"])
    pixels = batch["x"].reshape(logits.shape)
    jkfac.register_sigmoid_cross_entropy(logits, pixels)  # a row's loss sums its outputs
    return optax.sigmoid_binary_cross_entropy(logits, pixels).sum(-1).mean()
  return loss_fn


def pixel_loss(model, inputs: str = "x"):
  """Squared error against the clean pixels `batch["x"]`, from `batch[inputs]`."""
  def loss_fn(params, batch):
    out = model.apply({"params": params}, batch[inputs])
    rows, targets = out.reshape(out.shape[0], -1), batch["x"].reshape(out.shape[0], -1)
    jkfac.register_squared_error(rows, targets)  # one row per image: the sum over pixels
    return 0.5 * jnp.mean(jnp.sum((rows - targets) ** 2, axis=-1))
  return loss_fn


def dropout_classifier(model):
  def loss_fn(params, batch):
    logits = model.apply({"params": params}, batch["x"], batch["key"])
    jkfac.register_softmax_cross_entropy(logits, batch["y"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
  return loss_fn


def token_classifier(model):
  def loss_fn(params, batch):
    logits = model.apply({"params": params}, batch["tokens"])
    jkfac.register_softmax_cross_entropy(logits, batch["y"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
  return loss_fn


def vae_loss(model):
  """The evidence bound: pixels' sigmoid cross-entropy summed, plus the KL term, which
  is left unregistered (the Gauss-Newton model then covers the reconstruction only)."""
  def loss_fn(params, batch):
    logits, mean, logvar = model.apply({"params": params}, batch["x"], batch["key"])
    pixels = batch["x"].reshape(logits.shape)
    jkfac.register_sigmoid_cross_entropy(logits, pixels)
    reconstruction = optax.sigmoid_binary_cross_entropy(logits, pixels).sum(-1)
    kl = -0.5 * jnp.sum(1 + logvar - mean ** 2 - jnp.exp(logvar), axis=-1)
    return jnp.mean(reconstruction + kl)
  return loss_fn


def multilabel_loss(model):
  """Two labels per digit (at least 5, even), the mean of their sigmoid cross-entropies."""
  def loss_fn(params, batch):
    logits = model.apply({"params": params}, batch["x"])
    targets = jnp.stack([batch["y"] >= 5, batch["y"] % 2 == 0], -1).astype(jnp.float32)
    jkfac.register_sigmoid_cross_entropy(logits, targets, weight=0.5)  # mean of 2 outputs
    return optax.sigmoid_binary_cross_entropy(logits, targets).mean()
  return loss_fn


def one_hot_regression_loss(model):
  def loss_fn(params, batch):
    out = model.apply({"params": params}, batch["x"])
    targets = jax.nn.one_hot(batch["y"], 10)
    jkfac.register_squared_error(out, targets)
    return 0.5 * jnp.mean(jnp.sum((out - targets) ** 2, axis=-1))
  return loss_fn


def regression_loss(model):
  def loss_fn(params, batch):
    y = model.apply({"params": params}, batch["x"])[:, 0]
    jkfac.register_squared_error(y, batch["t"])
    return 0.5 * jnp.mean((y - batch["t"]) ** 2)
  return loss_fn


def make_model(name: str, x0: jax.Array):
  """`(loss_fn, params)` of one benchmark model."""
  key = jax.random.PRNGKey(0)
  if name == "convnet":
    model = ConvNet()
    return classifier(model, whole_variables=True), model.init(key, x0)
  if name == "mlp":
    model = MLP()
    return classifier(model), model.init(key, x0)["params"]
  if name == "autoencoder":
    model = AutoEncoder()
    return autoencoder_loss(model), model.init(key, x0)["params"]
  if name == "regression":
    model = MLP(widths=(128, 128), outputs=1)
    return regression_loss(model), model.init(key, x0)["params"]
  if name == "resnet":
    model = ResNet()
    return classifier(model), model.init(key, x0)["params"]
  if name in ("deepmlp", "vit", "gru"):
    model = {"deepmlp": DeepMLP, "vit": ViT, "gru": GRUClassifier}[name]()
    return classifier(model), model.init(key, x0)["params"]
  if name == "convae":
    model = ConvAutoEncoder()
    return pixel_loss(model), model.init(key, x0)["params"]
  if name == "dropout":
    model = DropoutMLP()
    return dropout_classifier(model), model.init(key, x0, key)["params"]
  if name == "vae":
    model = VAE()
    return vae_loss(model), model.init(key, x0, key)["params"]
  if name in ("groupnorm", "deeptanh"):
    model = {"groupnorm": GroupNormCNN, "deeptanh": DeepTanhMLP}[name]()
    return classifier(model), model.init(key, x0)["params"]
  if name == "unet":
    model = SmallUNet()
    return pixel_loss(model, "noisy"), model.init(key, x0)["params"]
  if name == "tiedae":
    model = TiedAutoEncoder()
    return autoencoder_loss(model), model.init(key, x0)["params"]
  if name == "tokenlstm":
    model = TokenLSTM()
    return token_classifier(model), model.init(key, tokens(x0))["params"]
  if name in ("conv1d", "tied", "zerohead"):
    model = {"conv1d": Conv1DNet, "tied": TiedResidualMLP, "zerohead": ZeroHeadMLP}[name]()
    return classifier(model), model.init(key, x0)["params"]
  if name == "multilabel":
    model = MLP(widths=(256,), outputs=2)
    return multilabel_loss(model), model.init(key, x0)["params"]
  if name == "onehot":
    model = GeluLayerNormMLP()
    return one_hot_regression_loss(model), model.init(key, x0)["params"]
  if name == "bf16":
    model = MLP(widths=(256,), dtype=jnp.bfloat16)
    return classifier(model), model.init(key, x0)["params"]
  raise ValueError(f"unknown model {name!r}")


def load(data_dir: str) -> tuple[np.ndarray, np.ndarray]:
  """The 8,000 training digits of the bundled split (`examples/mnist_data.py`)."""
  images, labels = mnist_data.load_idx(data_dir)["train"]
  return np.asarray(images, np.float32), np.asarray(labels, np.int32)


def batches(name: str, images, labels, batch_size: int, steps: int, seed: int = 0):
  rng = np.random.RandomState(seed)
  out = []
  for step in range(steps):
    index = rng.randint(0, len(images), batch_size)
    batch = {"x": jnp.asarray(images[index])}
    if name == "regression":
      batch["t"] = jnp.asarray(labels[index] / 4.5 - 1.0, jnp.float32)
    elif name not in ("autoencoder", "convae", "vae", "unet", "tiedae"):
      batch["y"] = jnp.asarray(labels[index])
    if name == "unet":
      batch["noisy"] = batch["x"] + jnp.asarray(0.3 * rng.randn(*batch["x"].shape), jnp.float32)
    if name == "tokenlstm":
      batch["tokens"] = tokens(batch["x"])
    if name in ("dropout", "vae"):
      batch["key"] = jax.random.PRNGKey(seed * steps + step)
    out.append(batch)
  return out


def tokens(images: jax.Array) -> jax.Array:
  """49 tokens per image: every fourth pixel's grey level in 16 steps."""
  return (images[:, ::4, ::4, 0].reshape(images.shape[0], -1) * 15.99).astype(jnp.int32)


def train(loss_fn, params, tx, data, stop_at: float | None = None):
  """Losses and seconds after each step (the first step's compilation excluded); with
  `stop_at`, training ends once the running mean of `WINDOW` losses reaches it."""
  state = tx.init(params)

  @jax.jit
  def step(params, state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, state = tx.update(grads, state, params, batch=batch)
    return optax.apply_updates(params, updates), state, loss

  losses, seconds, start = [], [], None
  for i, batch in enumerate(data):
    params, state, loss = step(params, state, batch)
    loss = float(loss)
    if i == 0:
      start = time.perf_counter()
    losses.append(loss)
    seconds.append(time.perf_counter() - start)
    if not math.isfinite(loss):
      break
    if stop_at is not None and len(losses) >= WINDOW and np.mean(losses[-WINDOW:]) <= stop_at:
      break
  return np.array(losses), np.array(seconds)


def running_mean(losses: np.ndarray) -> np.ndarray:
  return np.convolve(losses, np.ones(WINDOW) / WINDOW, mode="valid")


def hit(losses: np.ndarray, seconds: np.ndarray, target: float):
  """`(step, seconds)` where the running mean of `WINDOW` losses first reaches `target`."""
  if len(losses) < WINDOW:
    return None
  running = running_mean(losses)
  reached = np.nonzero(running <= target)[0]
  if not len(reached):
    return None
  index = reached[0] + WINDOW - 1
  return index + 1, seconds[index]


def compare(name: str, images, labels, batch_size: int, steps: int,
            adam_rates: tuple[float, ...] = ADAM_RATES,
            eigen_adam_rates: tuple[float, ...] = (),
            kfac_variants: tuple[str, ...] = ()) -> list[str]:
  data = batches(name, images, labels, batch_size, steps)
  loss_fn, params = make_model(name, data[0]["x"][:2])
  runs = {f"adam {lr:g}": train(loss_fn, params, optax.adam(lr), data) for lr in adam_rates}
  final = {k: float(running_mean(v[0])[-1]) if len(v[0]) == steps and np.isfinite(v[0]).all()
           else math.inf for k, v in runs.items()}
  best = min(final, key=final.get)
  best_rate = adam_rates[list(runs).index(best)]
  runs["kfac default"] = train(loss_fn, params, jkfac.kfac(loss_fn, data[0]), data)
  runs[f"kfac graft adam {best_rate:g}"] = train(
      loss_fn, params, jkfac.kfac(loss_fn, data[0], learning_rate=best_rate, graft="adam"), data)
  for variant in kfac_variants:
    runs[f"kfac {variant}"] = train(loss_fn, params,
                                    jkfac.kfac(loss_fn, data[0], **settings(variant)), data)
  for lr in eigen_adam_rates:
    runs[f"eigen adam {lr:g}"] = train(loss_fn, params, jkfac.eigen_adam(loss_fn, data[0], lr),
                                       data)
  target, (_, reference) = final[best], hit(*runs[best], final[best])
  lines = []
  for label, (losses, seconds) in runs.items():
    diverged = len(losses) < steps or not np.all(np.isfinite(losses))
    end = float(running_mean(losses)[-1]) if len(losses) >= WINDOW else math.nan
    reached = None if diverged else hit(losses, seconds, target)
    ratio = ("-" if reached is None else
             f"{reached[0] / hit(*runs[best], target)[0]:.2f} / {reached[1] / reference:.2f}")
    ms = 1e3 * seconds[-1] / max(len(losses) - 1, 1)
    lines.append(f"{name:11s} {batch_size:5d} {label:24s} {'DIVERGED' if diverged else 'ok':8s}"
                 f" {end:10.4g} {ms:8.1f} {ratio:>13s}")
  return lines


def settings(variant: str) -> dict[str, object]:
  """`"invert_every=20, approximations={'*': 'ekfac'}"` -> keyword arguments, each value
  a Python literal."""
  call = ast.parse(f"kfac({variant})", mode="eval").body
  if call.args or any(keyword.arg is None for keyword in call.keywords):
    raise ValueError(f"A K-FAC variant is keyword=literal pairs, got {variant!r}.")
  return {keyword.arg: ast.literal_eval(keyword.value) for keyword in call.keywords}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--models", default="mlp,autoencoder,regression,convnet,resnet")
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--batch-sizes", default="128")
  parser.add_argument("--adam-rates", default=",".join(f"{lr:g}" for lr in ADAM_RATES))
  parser.add_argument("--eigen-adam-rates", default="",
                      help="also run jkfac.eigen_adam at these learning rates")
  parser.add_argument("--kfac-variants", default="",
                      help="also run the default with these settings, e.g. "
                           "'invert_every=20;invert_every=10,cov_update_every=2'")
  parser.add_argument("--data-dir", default=mnist_data.BUNDLED_DIR)
  args = parser.parse_args()
  rates = lambda text: tuple(float(x) for x in text.split(",") if x)
  adam_rates, eigen_adam_rates = rates(args.adam_rates), rates(args.eigen_adam_rates)
  variants = tuple(variant for variant in args.kfac_variants.split(";") if variant)
  images, labels = load(args.data_dir)
  print(f"target: the best Adam's final loss (lr in {adam_rates}); ratios: steps / seconds "
        "to it against that Adam run's")
  print(f"{'model':11s} {'batch':>5s} {'optimizer':24s} {'status':8s} {'final loss':>10s} "
        f"{'ms/step':>8s} {'to target':>13s}")
  for batch_size in map(int, args.batch_sizes.split(",")):
    for name in args.models.split(","):
      for line in compare(name, images, labels, batch_size, args.steps, adam_rates,
                          eigen_adam_rates, variants):
        print(line, flush=True)


if __name__ == "__main__":
  main()
