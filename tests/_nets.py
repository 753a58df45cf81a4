"""Small tagged Flax networks, a plain-JAX tagged MLP, and hand-written references for the
jkfac tests.

Every reference here is computed without jkfac: the forward pass with plain
`jnp`/`lax` ops, conv patches with numpy loops over kernel offsets, output and
parameter gradients with `jax.grad`/`jax.jacfwd`. The tests compare jkfac with them.
The jax references are jitted (with the static net): on CPU, op-by-op dispatch
compiles every small op and would dominate the test time.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jkfac
import jkfac.blocks
import jkfac.interpreter
import jkfac.layers
import jkfac.statistics

NUM_CLASSES = 3
BATCH = 4


@dataclasses.dataclass(frozen=True)
class Layer:
  """One layer of a test network; hidden layers are followed by tanh."""
  kind: str                       # "dense" or "conv2d"
  features: int
  kernel: tuple[int, int] = (1, 1)
  strides: tuple[int, int] = (1, 1)
  padding: str = "VALID"


@dataclasses.dataclass(frozen=True)
class Net:
  name: str
  layers: tuple[Layer, ...]
  input_shape: tuple[int, ...]    # without the batch axis

  @property
  def layer_names(self) -> list[str]:
    counts, names = {"dense": 0, "conv2d": 0}, []
    for layer in self.layers:
      prefix = "Dense" if layer.kind == "dense" else "Conv"
      names.append(f"{prefix}_{counts[layer.kind]}")
      counts[layer.kind] += 1
    return names


MLP = Net("mlp", (Layer("dense", 5), Layer("dense", NUM_CLASSES)), (6,))
# A strided VALID conv, then a SAME conv with a non-square kernel (asymmetric padding).
CONVNET = Net("convnet", (Layer("conv2d", 3, (3, 3), (2, 2), "VALID"),
                          Layer("conv2d", 4, (2, 3), (1, 1), "SAME"),
                          Layer("dense", NUM_CLASSES)), (7, 7, 2))
NETS = {net.name: net for net in (MLP, CONVNET)}


class FlaxNet(nn.Module):
  """`net` built from jkfac.flax layers.

  `approx` is every layer's `approximation`, or a tuple with one per layer.
  """
  net: Net
  approx: str | None | tuple[str | None, ...] = None

  @nn.compact
  def __call__(self, x):
    approx = self.approx if isinstance(self.approx, tuple) else (self.approx,) * len(
        self.net.layers)
    for i, layer in enumerate(self.net.layers):
      if layer.kind == "dense":
        x = jkfac.flax.Dense(layer.features, approximation=approx[i])(x.reshape(x.shape[0], -1))
      else:
        x = jkfac.flax.Conv(layer.features, layer.kernel, strides=layer.strides,
                            padding=layer.padding, approximation=approx[i])(x)
      if i < len(self.net.layers) - 1:
        x = jnp.tanh(x)
    return x


def cross_entropy(logits, labels):
  """Mean softmax cross-entropy with integer labels."""
  log_p = jax.nn.log_softmax(logits)
  return -jnp.mean(jnp.take_along_axis(log_p, labels[:, None], axis=1))


def make_problem(net: Net, approx: str | None | tuple[str | None, ...] = None,
                 dtype=jnp.float32, batch: int = BATCH, seed: int = 0):
  """`(module, params, (x, labels), loss_fn)`; `loss_fn` registers its loss for K-FAC."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((batch,) + net.input_shape), dtype)
  labels = jnp.asarray(rng.integers(0, NUM_CLASSES, batch), jnp.int32)
  module = FlaxNet(net, approx)
  # Flax's initializers are slow to compile on CPU: take only the shapes from `init`
  # and draw the values with numpy (nonzero biases, so that the bias rows matter).
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(seed), x)["params"]
  scale = lambda shape: 0.3 if len(shape) == 1 else 1 / np.sqrt(np.prod(shape[:-1]))
  params = jax.tree_util.tree_map(
      lambda p: jnp.asarray(scale(p.shape) * rng.standard_normal(p.shape), dtype), shapes)

  def loss_fn(params, batch):
    inputs, targets = batch
    logits = module.apply({"params": params}, inputs)
    logits = jkfac.register_softmax_cross_entropy(logits, targets)
    return cross_entropy(logits, targets)

  return module, params, (x, labels), loss_fn


# --- the hand-written forward pass ----------------------------------------------------------


@functools.partial(jax.jit, static_argnums=0)
def forward(net: Net, params, x, perturbations: Sequence[Any] | None = None):
  """`(logits, layer_inputs, layer_outputs)`, with `perturbations[i]` added to layer i's output."""
  inputs, outputs, h = [], [], x
  for i, (layer, name) in enumerate(zip(net.layers, net.layer_names)):
    kernel, bias = params[name]["kernel"], params[name]["bias"]
    if layer.kind == "dense":
      h = h.reshape(h.shape[0], -1)
      z = jnp.dot(h, kernel, precision="highest") + bias
    else:
      z = jax.lax.conv_general_dilated(h, kernel, layer.strides, layer.padding,
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                       precision="highest") + bias
    inputs.append(h)
    if perturbations is not None:
      z = z + perturbations[i]
    outputs.append(z)
    h = jnp.tanh(z) if i < len(net.layers) - 1 else z
  return h, inputs, outputs


@functools.partial(jax.jit, static_argnums=0)
def per_example_output_grads(net: Net, params, batch):
  """Layer inputs and `g_n = N * d(mean loss)/d(output of layer)`: per-example gradients."""
  x, labels = batch
  _, inputs, outputs = forward(net, params, x)
  zeros = [jnp.zeros_like(z) for z in outputs]
  grads = jax.grad(lambda eps: cross_entropy(forward(net, params, x, eps)[0], labels))(zeros)
  return inputs, [x.shape[0] * g for g in grads]


@jax.jit
def softmax_fisher(logits):
  """`diag(p) - p p^T` per example: the Fisher of softmax cross-entropy in the logits."""
  p = jax.nn.softmax(logits)
  return jax.vmap(jnp.diag)(p) - p[:, :, None] * p[:, None, :]


@functools.partial(jax.jit, static_argnums=0)
def output_jacobians(net: Net, params, x):
  """Per layer, `d logits_n / d output_n` of every example: `(N, classes, *output[1:])`."""
  _, _, outputs = forward(net, params, x)
  zeros = [jnp.zeros_like(z) for z in outputs]
  jac = jax.jacfwd(lambda eps: forward(net, params, x, eps)[0])(zeros)
  n = np.arange(x.shape[0])
  return [j[n, :, n] for j in jac]   # the (example n, example n) blocks


# --- layers as matrices, by hand ---------------------------------------------------------------


def layer_matrix(params, name):
  """`[kernel reshaped to (-1, d_out); bias]`, the `(d_in + 1, d_out)` matrix of a layer."""
  kernel, bias = params[name]["kernel"], params[name]["bias"]
  return jnp.concatenate([kernel.reshape(-1, kernel.shape[-1]), bias[None]], axis=0)


def with_layer_matrix(params, name, flat):
  """`params` with layer `name` replaced by the row-major flattened matrix `flat`."""
  kernel = params[name]["kernel"]
  m = flat.reshape(-1, kernel.shape[-1])
  new = dict(params)
  new[name] = {"kernel": m[:-1].reshape(kernel.shape), "bias": m[-1]}
  return new


@functools.partial(jax.jit, static_argnums=(0, 3))
def per_example_param_grads(net: Net, params, batch, name):
  """`(N, (d_in+1) * d_out)`: each example's loss gradient w.r.t. the layer's flat matrix."""
  x, labels = batch
  flat = layer_matrix(params, name).reshape(-1)

  def loss(flat, xn, yn):
    logits = forward(net, with_layer_matrix(params, name, flat), xn[None])[0]
    return cross_entropy(logits, yn[None])

  return jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(flat, x, labels)


@functools.partial(jax.jit, static_argnums=(0, 3))
def param_jacobians(net: Net, params, x, name):
  """`(N, classes, (d_in+1) * d_out)`: `J_n`, the Jacobian of example n's logits."""
  flat = layer_matrix(params, name).reshape(-1)

  def logits(flat, xn):
    return forward(net, with_layer_matrix(params, name, flat), xn[None])[0][0]

  return jax.vmap(jax.jacfwd(logits), in_axes=(None, 0))(flat, x)


# --- conv patches, by hand -----------------------------------------------------------------------


def same_pads(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
  """TensorFlow's SAME padding: `ceil(size / stride)` outputs, the extra pad at the end."""
  out = -(-size // stride)
  total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
  return total // 2, total - total // 2


def conv_pads(layer: Layer, spatial: Sequence[int]) -> list[tuple[int, int]]:
  if layer.padding == "VALID":
    return [(0, 0), (0, 0)]
  return [same_pads(s, k, st) for s, k, st in zip(spatial, layer.kernel, layer.strides)]


def patches_by_loops(x, kernel: Sequence[int], strides: Sequence[int],
                     pads: Sequence[tuple[int, int]], rhs_dilation: Sequence[int] = (1, 1),
                     lhs_dilation: Sequence[int] = (1, 1)) -> np.ndarray:
  """`(N, h_out, w_out, kh * kw * c_in)` patches, features ordered (i, j, c) like HWIO."""
  x = np.asarray(x, np.float64)
  n, h, w, c = x.shape
  dilated = np.zeros((n, (h - 1) * lhs_dilation[0] + 1, (w - 1) * lhs_dilation[1] + 1, c))
  dilated[:, ::lhs_dilation[0], ::lhs_dilation[1]] = x
  padded = np.pad(dilated, [(0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0)])
  spans = [(k - 1) * d + 1 for k, d in zip(kernel, rhs_dilation)]
  h_out, w_out = [(padded.shape[1 + a] - spans[a]) // strides[a] + 1 for a in range(2)]
  out = np.zeros((n, h_out, w_out, kernel[0] * kernel[1] * c))
  for oh in range(h_out):
    for ow in range(w_out):
      for i in range(kernel[0]):
        for j in range(kernel[1]):
          row = oh * strides[0] + i * rhs_dilation[0]
          col = ow * strides[1] + j * rhs_dilation[1]
          out[:, oh, ow, (i * kernel[1] + j) * c:(i * kernel[1] + j + 1) * c] = padded[:, row, col]
  return out


def layer_input_vectors(net: Net, layer_index: int, layer_input) -> np.ndarray:
  """`(N, positions, d_in + 1)`: each position's input (or patch) with a trailing 1."""
  layer = net.layers[layer_index]
  a = np.asarray(layer_input, np.float64)
  if layer.kind == "conv2d":
    a = patches_by_loops(a, layer.kernel, layer.strides, conv_pads(layer, a.shape[1:3]))
  a = a.reshape(a.shape[0], -1, a.shape[-1])
  return np.concatenate([a, np.ones(a.shape[:-1] + (1,))], axis=-1)


def kron_factors_by_hand(net: Net, params, batch, estimation: str):
  """Per layer name, `(A, G)` from the hand-written pass; "empirical" or "exact" G."""
  x, labels = batch
  n = x.shape[0]
  inputs, grads = per_example_output_grads(net, params, batch)
  if estimation == "exact":
    fisher = np.asarray(softmax_fisher(forward(net, params, x)[0]), np.float64)
    jacobians = output_jacobians(net, params, x)
  factors = {}
  for i, name in enumerate(net.layer_names):
    a = layer_input_vectors(net, i, inputs[i])
    A = np.einsum("nta,ntb->ab", a, a) / (a.shape[0] * a.shape[1])
    if estimation == "empirical":
      g = np.asarray(grads[i], np.float64).reshape(n, -1, grads[i].shape[-1])
      G = np.einsum("nto,ntp->op", g, g) / n
    else:
      jac = np.asarray(jacobians[i], np.float64)
      jac = jac.reshape(n, jac.shape[1], -1, jac.shape[-1])      # (N, classes, T, d_out)
      G = np.einsum("ncto,ncd,ndtp->op", jac, fisher, jac) / n
    factors[name] = (A, G)
  return factors


def _generic(variables):
  return jax.tree_util.tree_map(jkfac.register_generic, variables)


class WithGeneric(nn.Module):
  """Two untagged Dense layers, a LayerNorm whose scale and bias `jkfac.register_generic`
  keeps generic, and a free scalar: recognised layers and generic parameters in one model."""
  num_classes: int

  @nn.compact
  def __call__(self, x):
    norm = nn.map_variables(nn.LayerNorm, "params", _generic, init=True)(name="LayerNorm_0")
    x = norm(jnp.tanh(nn.Dense(6)(x)))
    return nn.Dense(self.num_classes)(x) * self.param("temp", nn.initializers.ones, ())


# --- small problems shared by the test modules -----------------------------------------------


def random_batch(input_shape, n: int = 4, seed: int = 0, dtype=jnp.float32,
                 classes: int = NUM_CLASSES):
  """`(x, labels)`: standard normal inputs `(n, *input_shape)` and integer labels."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((n,) + tuple(input_shape)), dtype)
  return x, jnp.asarray(rng.integers(0, classes, n), jnp.int32)


def random_like(shapes, seed: int = 1, vector_mean: float = 0.0):
  """Random values for a tree of shapes: matrices scaled by 1/sqrt(fan-in), vectors
  (biases, scales) around `vector_mean` with spread 0.3, so that their rows matter."""
  rng = np.random.default_rng(seed)
  scale = lambda shape: 0.3 if len(shape) <= 1 else 1 / np.sqrt(np.prod(shape[:-1]))
  return jax.tree_util.tree_map(
      lambda p: jnp.asarray(scale(p.shape) * rng.standard_normal(p.shape)
                            + vector_mean * (len(p.shape) == 1), p.dtype), shapes)


def classifier_loss(apply):
  """`loss_fn(params, (x, labels))`: registered softmax cross-entropy of `apply(params, x)`."""
  def loss_fn(params, batch):
    x, labels = batch
    logits = jkfac.register_softmax_cross_entropy(apply(params, x), labels)
    return cross_entropy(logits, labels)
  return loss_fn


def assert_no_square_of(tree, size: int) -> None:
  """No array in `tree` has two axes of `size` (e.g. no vocab x vocab factor)."""
  shapes = [x.shape for x in jax.tree_util.tree_leaves(tree) if hasattr(x, "shape")]
  assert not any(shape.count(size) > 1 for shape in shapes), shapes


# --- library views used only by the tests ------------------------------------------------


def block_for(approx: str):
  """The block of a dense or conv layer under `approx` (the same for both kinds)."""
  return jkfac.blocks.REGISTRY["conv2d", approx]


def block_inverses(block, statistics, damping, method: str = "cholesky"):
  """All damped inverses of `block` (a `Block` or `StackedBlock`), computed here."""
  if isinstance(block, jkfac.blocks.StackedBlock):
    return jax.vmap(functools.partial(block_inverses, block.block, method=method),
                    in_axes=(0, None))(statistics, damping)
  if block.joint is not None:
    return block.joint(statistics, damping, method)
  return {name: block.invert(factor, d, method)
          for name, (factor, d) in block.factors(statistics, damping).items()}


def input_rows(layer, x, reduce: bool = False):
  """The vectors `a` of every position, `(batch, positions, d_in [+1])`."""
  return jkfac.layers.layer_inputs(layer, x, reduce).rows()


def conv_patches(x, kernel_size, conv):
  """The input patch of every output pixel, `(batch, *out, prod(kernel_size) * c_in)`,
  features ordered as a channels-last kernel reshaped to `(-1, c_out)`."""
  slices = jkfac.layers.patch_slices(x, kernel_size, conv)
  return jkfac.layers.stack_features(slices)


def import_script(path, name: str):
  """Imports a script as `name`, its folder importable as when it runs (`import mnist_data`)."""
  import importlib.util
  import sys
  if str(pathlib.Path(path).parent) not in sys.path:
    sys.path.append(str(pathlib.Path(path).parent))
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module  # Flax's dataclasses look their module up there.
  spec.loader.exec_module(module)
  return module


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def row_scaled_ggn(logits_fn, params, x, name, kind, scale=None):
  """`sum_r s_r J_r^T H_r J_r` for layer `name`'s flat `(d_in + 1, d_out)` matrix (row
  major): `J` by `jax.jacfwd` of the untagged `(N, T, C)` logits
  (`logits_fn(params, x, tag=False)`), `H` the per-row Hessian of softmax cross-entropy
  or squared error, `s` the `(N, T)` row factors (default `1 / (N T)`: the mean)."""
  w, b = params[name]["kernel"], params[name]["bias"]

  def logits_of(flat):
    m = flat.reshape(-1, w.shape[1])
    return logits_fn({**params, name: {"kernel": m[:-1], "bias": m[-1]}}, x, tag=False)

  jac = jax.jacfwd(logits_of)(jnp.concatenate([w, b[None]]).reshape(-1))  # (N, T, C, P)
  logits = logits_fn(params, x, tag=False)
  classes = logits.shape[-1]
  if kind == "softmax_cross_entropy":
    p = jax.nn.softmax(logits)
    hess = jnp.einsum("ntc,cd->ntcd", p, jnp.eye(classes)) - p[..., :, None] * p[..., None, :]
  else:
    hess = jnp.broadcast_to(jnp.eye(classes), logits.shape + (classes,))
  if scale is None:
    scale = jnp.full(logits.shape[:2], 1.0 / (logits.shape[0] * logits.shape[1]), logits.dtype)
  return jnp.einsum("nt,ntcp,ntcd,ntdq->pq", scale, jac, hess, jac)


def collect_statistics(loss_fn, trace, params, batch, key, estimation, auto_register=True):
  """`statistics.layer_statistics` of one batch, with a forward pass of its own."""
  linearization = jkfac.interpreter.linearize(loss_fn, params, batch, auto_register)
  return jkfac.statistics.layer_statistics(trace, linearization, key, estimation)


# --- the same MLP in plain JAX, tagged by hand (or not) ---------------------------------------


def mlp_params(sizes: Sequence[int], seed: int = 0, dtype=jnp.float32, bias: float = 0.1):
  """Dense layers "dense0", "dense1", ... (kernel scaled by 1/sqrt(fan-in), bias
  `bias * N(0, 1)`)."""
  rng = np.random.default_rng(seed)
  return {f"dense{i}": {
      "kernel": jnp.asarray(rng.standard_normal((d_in, d_out)) / np.sqrt(d_in), dtype),
      "bias": jnp.asarray(bias * rng.standard_normal(d_out), dtype)}
      for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:]))}


def mlp_apply(params, x, activation=jnp.tanh, tag: bool = True, with_inputs: bool = False):
  """The MLP of `mlp_params`: `activation` between layers, on `(N, ..., d_in)` inputs; each
  layer tagged with `jkfac.register_dense` (with `tag`). With `with_inputs`, `(logits,
  {layer name: its input})`."""
  inputs, names = {}, sorted(params)
  for i, name in enumerate(names):
    inputs[name] = x
    w, b = params[name]["kernel"], params[name]["bias"]
    y = x @ w + b
    y = jkfac.register_dense(y, x, w, b) if tag else y
    x = activation(y) if i + 1 < len(names) else y
  return (x, inputs) if with_inputs else x


# --- first K-FAC steps by hand ------------------------------------------------------------------


def kron_solve(A, G, m, damping: float):
  """`(A + π√λ I)⁻¹ M (G + √λ/π I)⁻¹`, the damped Kronecker block's solve of a layer's
  `(d_in [+1], d_out)` matrix `M`, π = sqrt((tr A / dim A) / (tr G / dim G)), in float64.
  A 1-D `A` (an embedding's counts) is a diagonal factor."""
  A, G, m = (np.asarray(v, np.float64) for v in (A, G, m))
  A = np.diag(A) if A.ndim == 1 else A
  pi = np.sqrt((np.trace(A) / len(A)) / (np.trace(G) / len(G)))
  root = np.sqrt(damping)
  return np.linalg.solve(A + pi * root * np.eye(len(A)), m) @ np.linalg.inv(
      G + root / pi * np.eye(len(G)))


def empirical_kron_factors(inputs, output_grads, bias: bool = True, rows: int | None = None):
  """A layer's empirical `(A, G)` from its input rows `(..., d_in)` (inputs or patches)
  and its output gradients `(N, ..., d_out)` of the mean loss: A the mean of `[a, 1]
  [a, 1]ᵀ` over examples and positions (`bias=False`: of `a aᵀ`), G `rows Σ g gᵀ` over
  examples and positions, `rows` the loss's rows (default N: g of the mean loss is
  1/rows of the row's)."""
  a = np.asarray(inputs, np.float64)
  a = a.reshape(-1, a.shape[-1])
  if bias:
    a = np.concatenate([a, np.ones((len(a), 1))], axis=1)
  g = np.asarray(output_grads, np.float64)
  rows = g.shape[0] if rows is None else rows
  g = g.reshape(-1, g.shape[-1])
  return a.T @ a / len(a), rows * g.T @ g


def linen_layer_calls(apply, x, loss_of_output, modules):
  """`{module path: [(input, output gradient), ...]}`, one pair per `__call__` of every
  linen module of a type in `modules` while `apply(x)` runs: the call's first argument
  and the gradient of `loss_of_output(apply(x))` in the call's output (by adding a zero
  perturbation to it), captured with `flax.linen.intercept_methods`, without jkfac."""

  def run(perturbations):
    calls = {}

    def interceptor(method, args, kwargs, context):
      out = method(*args, **kwargs)
      if context.method_name != "__call__" or not isinstance(context.module, modules):
        return out
      path = "/".join(context.module.path)
      uses = calls.setdefault(path, [])
      if perturbations is not None:
        out = out + perturbations[path][len(uses)]
      uses.append((args[0], out))
      return out

    with nn.intercept_methods(interceptor):
      output = apply(x)
    return loss_of_output(output), calls

  @jax.jit  # one compilation: op by op, every small op compiles on CPU
  def captured():
    _, calls = jax.eval_shape(run, None)
    zeros = {path: [jnp.zeros(out.shape, out.dtype) for _, out in uses]
             for path, uses in calls.items()}
    grads, calls = jax.grad(run, has_aux=True)(zeros)
    return {path: [(inp, g) for (inp, _), g in zip(uses, grads[path])]
            for path, uses in calls.items()}

  return captured()
