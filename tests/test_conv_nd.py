"""3-D convolutions, grouped and depthwise convs, `DenseGeneral` and `sub_sample_patches`.

- auto-registered layers (flax.linen, flax.nnx, plain lax / `dot_general`) against the
  same models tagged by hand: same trace, same covariances, same updates;
- kron (and diagonal, full) factors against references built from explicit patches
  (`lax.conv_general_dilated_patches`) and explicit matrices, group by group;
- the preconditioned step of a grouped layer against per-group dense inverses;
- stacked blocks: inverses per slice, also through the round-robin inverse tasks;
- `sub_sample_patches`: the sampled rows are patch rows, their covariance is unbiased;
- the first `jkfac.kfac` step of whole models against per-layer, per-group Kronecker
  solves from explicit patches; bad inputs raise `ValueError`.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax import lax

import jkfac
from jkfac import layer_collection, layers, parallel, tags, layer_table
from jkfac import inverses as inverses_lib
from jkfac.blocks import StackedBlock
from tests import _nets
from tests._asserts import assert_trees_close

KEY = jax.random.PRNGKey(0)
NUM_CLASSES = 3
DN = {1: ("NWC", "WIO", "NWC"), 2: ("NHWC", "HWIO", "NHWC"), 3: ("NDHWC", "DHWIO", "NDHWC")}

_batch = _nets.random_batch
_random_like = _nets.random_like
_loss = _nets.classifier_loss


def _kfac_steps(loss_fn, params, batch, steps=2, **kwargs):
  """`[(updates, state)]` of `steps` jitted `jkfac.kfac` steps on one batch."""
  options = dict(learning_rate=0.1, damping=1e-2, estimation="empirical", invert_every=1)
  tx = jkfac.kfac(loss_fn, batch, **{**options, **kwargs})

  @jax.jit
  def step(params, state):
    grads = jax.grad(loss_fn)(params, batch)
    updates, state = tx.update(grads, state, params, batch=batch)
    return optax.apply_updates(params, updates), state, updates

  state, out = tx.init(params), []
  for _ in range(steps):
    params, state, updates = step(params, state)
    out.append((updates, state))
  return out


def _assert_same_as_hand_tagged(auto_loss, hand_loss, params, batch, expected):
  """Same trace, then the same covariances and updates over two `jkfac.kfac` steps.

  `expected` lists `(name, kind, in_axes, groups)` of the layers, in order.
  """
  auto = layer_table.trace_layers(auto_loss, params, batch)
  hand = layer_table.trace_layers(hand_loss, params, batch, auto_register=False)
  assert [(l.name, l.kind, l.in_axes, layers.feature_groups(l)) for l in auto.layers] == expected
  assert auto == hand
  assert auto.generic == ()
  assert layer_table.trace_layers(auto_loss, params, batch, auto_register=False).layers == ()
  auto_steps = _kfac_steps(auto_loss, params, batch)
  hand_steps = _kfac_steps(hand_loss, params, batch, auto_register=False)
  for (auto_updates, auto_state), (hand_updates, hand_state) in zip(auto_steps, hand_steps):
    assert np.abs(jax.tree_util.tree_leaves(auto_updates)[0]).max() > 0
    assert_trees_close(jkfac.preconditioner_state(auto_state).statistics,
                       jkfac.preconditioner_state(hand_state).statistics, rtol=1e-4, atol=1e-6)
    assert_trees_close(auto_updates, hand_updates, rtol=1e-4, atol=1e-6)
  return auto, auto_steps


# --- flax.linen ---------------------------------------------------------------------------


def _tag_conv(module, x, y, rank, **settings):
  """`y` of a called `nn.Conv` tagged by hand with the module's own parameters."""
  p = module.variables["params"]
  register = {1: jkfac.register_conv1d, 2: jkfac.register_conv2d, 3: jkfac.register_conv3d}[rank]
  return register(y, x, p["kernel"], p.get("bias"), **settings)


def _tag_dense(module, x, y, in_axes):
  p = module.variables["params"]
  return jkfac.register_dense(y, x, p["kernel"], p.get("bias"), in_axes=in_axes)


class Linen3d(nn.Module):
  """3-D conv -> depthwise 3-D conv -> DenseGeneral (2 axes) -> DenseGeneral (4 axes)."""
  tagged: bool

  @nn.compact
  def __call__(self, x):                                                   # (N, 4, 5, 4, 2)
    conv = nn.Conv(4, (2, 3, 2), strides=(1, 2, 1), padding="SAME")
    y = conv(x)                                                            # (N, 4, 3, 4, 4)
    if self.tagged:
      y = _tag_conv(conv, x, y, 3, window_strides=(1, 2, 1), padding="SAME")
    x = jnp.tanh(y)
    conv = nn.Conv(8, (2, 2, 2), padding="VALID", feature_group_count=4, use_bias=False,
                   kernel_dilation=(1, 1, 2))
    y = conv(x)                                                            # (N, 3, 2, 2, 8)
    if self.tagged:
      y = _tag_conv(conv, x, y, 3, padding="VALID", rhs_dilation=(1, 1, 2),
                    feature_group_count=4)
    x = jnp.tanh(y)
    dense = nn.DenseGeneral((2, 3), axis=(-2, -1))
    y = dense(x)                                                           # (N, 3, 2, 2, 3)
    x = jnp.tanh(_tag_dense(dense, x, y, 2) if self.tagged else y)
    dense = nn.DenseGeneral(NUM_CLASSES, axis=(-4, -3, -2, -1))
    y = dense(x)
    return _tag_dense(dense, x, y, 4) if self.tagged else y


class Linen2dGrouped(nn.Module):
  """Grouped conv (2 groups) -> depthwise conv (multiplier 2) -> DenseGeneral (1 axis, 2-D
  features) -> Dense."""
  tagged: bool

  @nn.compact
  def __call__(self, x):                                                   # (N, 7, 6, 4)
    conv = nn.Conv(6, (3, 3), strides=2, padding="VALID", feature_group_count=2)
    y = conv(x)                                                            # (N, 3, 2, 6)
    if self.tagged:
      y = _tag_conv(conv, x, y, 2, window_strides=(2, 2), padding="VALID",
                    feature_group_count=2)
    x = jnp.tanh(y)
    conv = nn.Conv(12, (3, 2), padding="SAME", feature_group_count=6)
    y = conv(x)                                                            # (N, 3, 2, 12)
    if self.tagged:
      y = _tag_conv(conv, x, y, 2, padding="SAME", feature_group_count=6)
    x = jnp.tanh(y)
    dense = nn.DenseGeneral((2, 2), axis=-1)
    y = dense(x)                                                           # (N, 3, 2, 2, 2)
    x = jnp.tanh(_tag_dense(dense, x, y, 1) if self.tagged else y)
    dense = nn.Dense(NUM_CLASSES)
    x = x.reshape(x.shape[0], -1)
    y = dense(x)
    return _tag_dense(dense, x, y, 1) if self.tagged else y


def _linen_problem(model_cls, input_shape):
  plain, tagged = model_cls(False), model_cls(True)
  batch = _batch(input_shape)
  shapes = jax.eval_shape(plain.init, KEY, batch[0])["params"]
  assert shapes == jax.eval_shape(tagged.init, KEY, batch[0])["params"]
  params = _random_like(shapes)
  flax_loss = lambda m: _loss(lambda p, x: m.apply({"params": p}, x))
  return flax_loss(plain), flax_loss(tagged), params, batch


def test_linen_3d_conv_and_dense_general_are_registered_as_hand_tagged():
  auto_loss, hand_loss, params, batch = _linen_problem(Linen3d, (4, 5, 4, 2))
  trace, _ = _assert_same_as_hand_tagged(
      auto_loss, hand_loss, params, batch,
      [("Conv_0", "conv3d", 1, 1), ("Conv_1", "conv3d", 1, 4), ("DenseGeneral_0", "dense", 2, 1),
       ("DenseGeneral_1", "dense", 4, 1)])
  conv0, conv1, _, _ = trace.layers
  assert conv0.conv == tags.ConvParams((1, 2, 1), ((0, 1), (1, 1), (0, 1)), (1, 1, 1), (1, 1, 1))
  assert conv1.conv == tags.ConvParams((1, 1, 1), ((0, 0),) * 3, (1, 1, 1), (1, 1, 2), 4)
  covariances = jkfac.preconditioner_state(jkfac.kfac(
      auto_loss, batch, learning_rate=0.1, damping=1e-2).init(params)).statistics
  assert covariances["Conv_0"]["A"].shape == (2 * 3 * 2 * 2 + 1,) * 2
  assert covariances["Conv_1"]["A"].shape == (4, 8, 8)              # 4 groups, 2x2x2 patches
  assert covariances["Conv_1"]["G"].shape == (4, 2, 2)              # 2 outputs per group
  assert covariances["DenseGeneral_0"]["A"].shape == (2 * 8 + 1,) * 2
  assert covariances["DenseGeneral_0"]["G"].shape == (6, 6)
  assert covariances["DenseGeneral_1"]["A"].shape == (3 * 2 * 2 * 3 + 1,) * 2


def test_linen_grouped_and_depthwise_convs_are_registered_as_hand_tagged():
  auto_loss, hand_loss, params, batch = _linen_problem(Linen2dGrouped, (7, 6, 4))
  _assert_same_as_hand_tagged(
      auto_loss, hand_loss, params, batch,
      [("Conv_0", "conv2d", 1, 2), ("Conv_1", "conv2d", 1, 6), ("DenseGeneral_0", "dense", 1, 1),
       ("Dense_0", "dense", 1, 1)])


# --- plain lax / dot_general --------------------------------------------------------------


def _lax_params():
  shapes = {"c1": {"w": (2, 3, 2, 2, 4), "b": (4,)}, "c2": {"w": (2, 2, 2, 2, 4)},
            "dg": {"w": (2, 4, 2, 3), "b": (2, 3)}, "c3": {"w": (3, 2, 6), "b": (6,)},
            "out": {"w": (12, NUM_CLASSES), "b": (NUM_CLASSES,)}}
  return _random_like(jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32),
                                             shapes, is_leaf=lambda s: isinstance(s, tuple)))


def _lax_apply(tagged: bool):
  """conv3d (SAME, strided) -> grouped conv3d (2 groups, dilated) -> dot_general over the
  trailing (W, C) axes -> depthwise-like grouped conv1d (3 groups) -> dense."""
  def tag(register, y, *args, **kwargs):
    return register(y, *args, **kwargs) if tagged else y

  def apply(params, x):                                                    # (N, 4, 5, 4, 2)
    c1, c2, dg, c3, out = (params[k] for k in ("c1", "c2", "dg", "c3", "out"))
    y = lax.conv_general_dilated(x, c1["w"], (1, 2, 1), "SAME", dimension_numbers=DN[3])
    y = c1["b"] + y
    if tagged:  # the seed's argument order and TF-style strides
      y = layer_collection.register_conv3d((c1["w"], c1["b"]), (1, 1, 2, 1, 1), "SAME", x, y)
    x = jnp.tanh(y)                                                        # (N, 4, 3, 4, 4)
    y = lax.conv_general_dilated(x, c2["w"], (1, 1, 1), "VALID", rhs_dilation=(1, 1, 2),
                                 dimension_numbers=DN[3], feature_group_count=2)
    x = jnp.tanh(tag(jkfac.register_conv3d, y, x, c2["w"], padding="VALID",
                     rhs_dilation=(1, 1, 2), feature_group_count=2))       # (N, 3, 2, 2, 4)
    y = lax.dot_general(x, dg["w"], (((3, 4), (0, 1)), ((), ()))) + dg["b"]
    x = jnp.tanh(tag(jkfac.register_dense, y, x, dg["w"], dg["b"], in_axes=2))  # (N,3,2,2,3)
    x = x.reshape(x.shape[0], 6, 6)
    y = lax.conv_general_dilated(x, c3["w"], (2,), ((1, 1),), dimension_numbers=DN[1],
                                 feature_group_count=3) + c3["b"]
    if tagged:
      y = layer_collection.register_conv1d((c3["w"], c3["b"]), (2,), ((1, 1),), x, y,
                                           feature_group_count=3)
    x = jnp.tanh(y)                                                        # (N, 3, 6)
    x = x.reshape(x.shape[0], -1)[:, :12]
    return tag(jkfac.register_dense, x @ out["w"] + out["b"], x, out["w"], out["b"])

  return apply


def test_lax_3d_grouped_and_dot_general_layers_are_registered_as_hand_tagged():
  params, batch = _lax_params(), _batch((4, 5, 4, 2))
  _assert_same_as_hand_tagged(_loss(_lax_apply(False)), _loss(_lax_apply(True)), params, batch,
                              [("c1", "conv3d", 1, 1), ("c2", "conv3d", 1, 2),
                               ("dg", "dense", 2, 1), ("c3", "conv1d", 1, 3),
                               ("out", "dense", 1, 1)])


# --- flax.nnx -----------------------------------------------------------------------------


class Nnx3d(nnx.Module):
  """nnx.Conv 3-D -> grouped nnx.Conv 3-D -> nnx.LinearGeneral (2 axes) -> nnx.Linear."""

  def __init__(self, tagged: bool, rngs: nnx.Rngs):
    self.tagged = tagged
    self.conv = nnx.Conv(2, 4, (2, 2, 2), strides=(2, 1, 1), rngs=rngs)
    self.grouped = nnx.Conv(4, 4, (1, 2, 2), padding="VALID", feature_group_count=2,
                            use_bias=False, rngs=rngs)
    self.general = nnx.LinearGeneral((3, 4), (2, 2), axis=(-2, -1), rngs=rngs)
    self.linear = nnx.Linear(2 * 3 * 2 * 2, NUM_CLASSES, rngs=rngs)

  def _tag(self, register, y, x, module, **kwargs):
    if not self.tagged:
      return y
    bias = module.bias.get_value() if module.bias is not None else None
    return register(y, x, module.kernel.get_value(), bias, **kwargs)

  def __call__(self, x):                                                   # (N, 4, 4, 4, 2)
    y = self._tag(jkfac.register_conv3d, self.conv(x), x, self.conv,
                  window_strides=(2, 1, 1), padding="SAME")
    x = jnp.tanh(y)                                                        # (N, 2, 4, 4, 4)
    y = self._tag(jkfac.register_conv3d, self.grouped(x), x, self.grouped, padding="VALID",
                  feature_group_count=2)
    x = jnp.tanh(y)                                                        # (N, 2, 3, 3, 4)
    y = self._tag(jkfac.register_dense, self.general(x), x, self.general, in_axes=2)
    x = jnp.tanh(y).reshape(x.shape[0], -1)                                # (N, 2, 3, 2, 2)
    return self._tag(jkfac.register_dense, self.linear(x), x, self.linear)


def test_nnx_3d_grouped_and_linear_general_are_registered_as_hand_tagged():
  batch = _batch((4, 4, 4, 2))
  losses = []
  for tagged in (False, True):
    graphdef, params = nnx.split(Nnx3d(tagged, nnx.Rngs(0)), nnx.Param)
    losses.append(_loss(lambda p, x, graphdef=graphdef: nnx.merge(graphdef, p)(x)))
  params = _random_like(params)
  _assert_same_as_hand_tagged(
      *losses, params, batch,
      [("conv", "conv3d", 1, 1), ("grouped", "conv3d", 1, 2), ("general", "dense", 2, 1),
       ("linear", "dense", 1, 1)])


# --- DenseGeneral that stays generic ------------------------------------------------------


def test_dense_general_with_batch_dims_or_leading_axes_stays_generic():
  class Unsupported(nn.Module):
    @nn.compact
    def __call__(self, x):                                                 # (N, 3, 4)
      x = jnp.tanh(nn.DenseGeneral(2, axis=-1, batch_dims=(0,))(x))       # batch dims
      x = jnp.tanh(nn.DenseGeneral(5, axis=1)(x))                         # not trailing
      return nn.Dense(NUM_CLASSES)(x.reshape(x.shape[0], -1))

  model, batch = Unsupported(), _batch((3, 4))
  params = _random_like(jax.eval_shape(model.init, KEY, batch[0])["params"])
  loss_fn = _loss(lambda p, x: model.apply({"params": p}, x))
  trace = layer_table.trace_layers(loss_fn, params, batch)
  assert [l.name for l in trace.layers] == ["Dense_0"]
  assert sorted(l.name for l in trace.generic) == [
      "DenseGeneral_0/bias", "DenseGeneral_0/kernel", "DenseGeneral_1/bias",
      "DenseGeneral_1/kernel"]
  (_, state), = _kfac_steps(loss_fn, params, batch, steps=1)
  found = jkfac.preconditioner_state(state).statistics
  assert found["DenseGeneral_0/kernel"]["diagonal"].shape == (4 * 4 * 2, 1)


# --- brute-force references -----------------------------------------------------------------


_CASES = {
    # input shape, kernel shape, strides, padding, lhs_dilation, rhs_dilation, groups, bias
    "conv3d": ((4, 5, 4, 2), (2, 3, 2, 2, 3), (1, 2, 1), "SAME", (1, 1, 1), (1, 1, 2), 1, True),
    "conv3d_grouped": ((3, 4, 3, 4), (2, 2, 2, 2, 4), (1, 1, 1), "VALID", (1, 1, 1), (1, 1, 1),
                       2, False),
    "conv2d_grouped": ((6, 5, 4), (3, 3, 2, 6), (2, 1), ((1, 1), (0, 1)), (1, 1), (1, 1), 2,
                       True),
    "conv2d_depthwise": ((6, 5, 3), (3, 2, 1, 6), (1, 1), "SAME", (1, 1), (2, 1), 3, True),
    "conv2d_grouped_input_dilation": ((4, 3, 4), (2, 2, 1, 4), (1, 2), ((1, 0), (0, 1)),
                                      (2, 1), (1, 1), 4, True),
    "conv1d_depthwise": ((9, 4), (3, 1, 4), (2,), "VALID", (1,), (1,), 4, True),
    # DenseGeneral: input (N, 3, 4, 5) contracted over (4, 5) with a (4, 5, 2, 3) kernel.
    "dense_general": ((3, 4, 5), (4, 5, 2, 3), None, None, None, None, 1, True),
}


@functools.lru_cache(maxsize=None)
def _case(name):
  """`(loss_fn, params, batch, y_fn)`: one layer "layer" (untagged) -> tanh -> dense "out".

  `y_fn(params, x, eps)` is the layer's output plus `eps`, computed without jkfac.
  """
  input_shape, kernel, strides, padding, lhs, rhs, groups, bias = _CASES[name]
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.standard_normal((6,) + input_shape))
  layer = {"kernel": jnp.asarray(rng.standard_normal(kernel) / np.sqrt(np.prod(kernel[:-1])))}
  bias_shape = kernel[2:] if name == "dense_general" else kernel[-1:]
  if bias:
    layer["bias"] = jnp.asarray(0.3 * rng.standard_normal(bias_shape))

  def y_fn(params, x, eps=0.0):
    p = params["layer"]
    if name == "dense_general":
      y = lax.dot_general(x, p["kernel"], (((2, 3), (0, 1)), ((), ())), precision="highest")
    else:
      y = lax.conv_general_dilated(x, p["kernel"], strides, padding, lhs, rhs,
                                   dimension_numbers=DN[len(strides)],
                                   feature_group_count=groups, precision="highest")
    return (y + p["bias"] if "bias" in p else y) + eps

  out_features = int(np.prod(jax.eval_shape(y_fn, {"layer": layer}, x).shape[1:]))
  params = {"layer": layer,
            "out": {"kernel": jnp.asarray(rng.standard_normal((out_features, NUM_CLASSES))
                                          / np.sqrt(out_features))}}

  def loss_fn(params, batch, eps=0.0):
    x, labels = batch
    h = jnp.tanh(y_fn(params, x, eps)).reshape(x.shape[0], -1)
    logits = jkfac.register_softmax_cross_entropy(jnp.dot(h, params["out"]["kernel"],
                                                          precision="highest"), labels)
    return _nets.cross_entropy(logits, labels)

  labels = jnp.asarray(rng.integers(0, NUM_CLASSES, 6))
  return loss_fn, params, (x, labels), y_fn


def _patch_rows(x, kernel, strides, padding, lhs, rhs, groups, bias):
  """Per group, `(N * positions, d_in [+1])` conv patches of `x` from
  `lax.conv_general_dilated_patches` (features ordered as the kernel's `(*spatial, c_in)`),
  with a column of ones for the bias."""
  x, c, rows = np.asarray(x), kernel[-2], []
  for j in range(groups):
    patches = np.asarray(lax.conv_general_dilated_patches(
        x[..., j * c:(j + 1) * c], kernel[:-2], strides, padding, lhs, rhs,
        dimension_numbers=DN[len(strides)]))                          # features (c, *spatial)
    patches = patches.reshape(-1, c, int(np.prod(kernel[:-2]))).swapaxes(1, 2)
    rows.append(patches.reshape(patches.shape[0], -1))
  return [np.concatenate([r, np.ones((len(r), 1))], axis=1) if bias else r for r in rows]


def _explicit_rows(name, x):
  """Per group, `(N * positions, d_in [+1])`: patches or flattened inputs, with a column
  of ones for the bias."""
  input_shape, kernel, strides, padding, lhs, rhs, groups, bias = _CASES[name]
  if name == "dense_general":
    x = np.asarray(x).reshape(-1, 20)
    return [np.concatenate([x, np.ones((len(x), 1))], axis=1)]
  return _patch_rows(x, kernel, strides, padding, lhs, rhs, groups, bias)


def _explicit_output_grads(name, params, batch):
  """Per group, `(N * positions, d_out)`: `N * d(mean loss)/d(output)`, per example."""
  loss_fn, _, _, y_fn = _case(name)
  groups = _CASES[name][6]
  y = y_fn(params, batch[0])
  g = np.asarray(batch[0].shape[0] * jax.grad(lambda eps: loss_fn(params, batch, eps))(
      jnp.zeros_like(y)))
  d_out = 6 if name == "dense_general" else y.shape[-1]
  g = g.reshape(-1, d_out)
  return np.split(g, groups, axis=1)


def _group_matrices(tree, d_in, groups):
  """Per group, a layer's `(d_in [+1], d_out)` matrix from a `{"kernel", "bias"}` tree."""
  m = np.asarray(tree["kernel"]).reshape(d_in, -1)
  if "bias" in tree:
    m = np.concatenate([m, np.asarray(tree["bias"]).reshape(1, -1)], axis=0)
  return np.split(m, groups, axis=1)


def _explicit_param_matrices(name, tree):
  """Per group, the layer's `(d_in [+1], d_out)` matrix from a `{"kernel", "bias"}` tree."""
  kernel = np.asarray(tree["kernel"])
  d_in = 20 if name == "dense_general" else int(np.prod(kernel.shape[:-1]))
  return _group_matrices(tree, d_in, _CASES[name][6])


def _one_update(name, approx, **kwargs):
  """grads, updates and bias-corrected covariances of one `precondition` step (float64)."""
  loss_fn, params, batch, _ = _case(name)
  tx = jkfac.precondition(loss_fn, batch, damping=1e-2, estimation="empirical", invert_every=1,
                          approximations={"layer": approx}, **kwargs)

  @jax.jit
  def run(params):
    grads = jax.grad(loss_fn)(params, batch)
    updates, state = tx.update(grads, tx.init(params), params, batch=batch)
    covariances = jax.tree_util.tree_map(lambda c: c / state.ema_weight, state.statistics)
    return grads, updates, covariances

  return run(params)


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    _case.cache_clear()
    yield
  _case.cache_clear()


@pytest.mark.parametrize("name", list(_CASES))
def test_kron_factors_and_update_match_explicit_patches(name, x64):
  loss_fn, params, batch, _ = _case(name)
  groups, damping = _CASES[name][6], 1e-2
  grads, updates, covariances = _one_update(name, "kron")
  trace = layer_table.trace_layers(loss_fn, params, batch)
  layer = trace.layers[0]
  assert (layer.name, layers.feature_groups(layer)) == ("layer", groups)
  rows = _explicit_rows(name, batch[0])
  output_grads = _explicit_output_grads(name, params, batch)
  A = np.stack([a.T @ a / len(a) for a in rows])
  G = np.stack([g.T @ g / batch[0].shape[0] for g in output_grads])
  stacked_shape = lambda f: f if groups > 1 else f[0]
  np.testing.assert_allclose(covariances["layer"]["A"], stacked_shape(A), rtol=1e-9, atol=1e-12)
  np.testing.assert_allclose(covariances["layer"]["G"], stacked_shape(G), rtol=1e-9, atol=1e-12)
  assert np.abs(G).max() > 1e-4
  # Block diagonal over groups: each group's own damped Kronecker inverse.
  expected = []
  for a, g, m in zip(A, G, _explicit_param_matrices(name, grads["layer"])):
    pi = np.sqrt((np.trace(a) / len(a)) / (np.trace(g) / len(g)))
    expected.append(np.linalg.inv(a + pi * np.sqrt(damping) * np.eye(len(a))) @ m
                    @ np.linalg.inv(g + np.sqrt(damping) / pi * np.eye(len(g))))
  actual = _explicit_param_matrices(name, updates["layer"])
  for e, u in zip(expected, actual):
    np.testing.assert_allclose(u, e, rtol=1e-7, atol=1e-10)
  # param_matrix / split_param_matrix are inverse to each other.
  leaves = jax.tree_util.tree_leaves(grads)
  bias = None if layer.bias is None else leaves[layer.bias]
  m = layers.param_matrix(layer, leaves[layer.weight], bias)
  assert m.shape == ((groups,) if groups > 1 else ()) + layers.matrix_shape(layer)
  w, b = layers.split_param_matrix(layer, m)
  np.testing.assert_array_equal(w, leaves[layer.weight])
  if bias is not None:
    np.testing.assert_array_equal(b, bias)


@pytest.mark.parametrize("name", ["conv2d_grouped", "conv3d_grouped", "dense_general"])
@pytest.mark.parametrize("approx", ["diagonal", "full"])
def test_diagonal_and_full_blocks_match_per_example_gradients(name, approx, x64):
  loss_fn, params, batch, _ = _case(name)
  _, _, covariances = _one_update(name, approx)
  per_example = jax.vmap(jax.grad(lambda p, x, y: loss_fn(p, (x[None], y[None]))),
                         in_axes=(None, 0, 0))(params, *batch)["layer"]
  matrices = [np.stack(m) for m in zip(*[
      _explicit_param_matrices(name, jax.tree_util.tree_map(lambda v: v[n], per_example))
      for n in range(batch[0].shape[0])])]                            # per group (N, d_in, d_out)
  if approx == "diagonal":
    expected = np.stack([np.mean(m ** 2, axis=0) for m in matrices])
  else:
    expected = np.stack([np.einsum("np,nq->pq", v, v) / len(v)
                         for v in (m.reshape(len(m), -1) for m in matrices)])
  key = "diagonal" if approx == "diagonal" else "F"
  expected = expected if len(matrices) > 1 else expected[0]
  np.testing.assert_allclose(covariances["layer"][key], expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("approx", ["kron_reduce", "kron_in_diag", "kron_out_diag"])
def test_grouped_conv_other_kron_blocks_are_per_group(approx, x64):
  """Each group's block equals that of the same conv run on the group's channels alone."""
  name = "conv2d_grouped"
  loss_fn, params, batch, _ = _case(name)
  _, _, covariances = _one_update(name, approx)
  layer = layer_table.trace_layers(loss_fn, params, batch).layers[0]
  stats = _nets.collect_statistics(loss_fn, layer_table.trace_layers(loss_fn, params, batch),
                                   params, batch, KEY, "empirical")["layer"]
  reduce = approx == "kron_reduce"
  single = _nets.block_for(approx)
  one = dataclasses.replace(layer, input_shape=layer.input_shape[:-1] + (2,),
                            output_shape=layer.output_shape[:-1] + (3,),
                            conv=tags.ConvParams(*layer.conv[:4]))       # a 1-group conv
  for j in range(2):
    expected = single.statistics(
        layers.layer_inputs(one, stats.inputs[0][..., 2 * j:2 * j + 2], reduce),
        layers.output_rows(stats.output_grads[0][..., 3 * j:3 * j + 3], reduce))
    for key, value in expected.items():
      np.testing.assert_allclose(covariances["layer"][key][j], value, rtol=1e-9, atol=1e-12)


# --- stacked blocks and the inverse tasks -----------------------------------------------------


def _random_psd_stack(rng, groups, dim):
  x = rng.standard_normal((groups, dim, dim + 2))
  return x @ x.swapaxes(1, 2) / (dim + 2)


@pytest.mark.parametrize("method", ["cholesky", "eigh"])
def test_stacked_block_inverts_each_slice(method, x64):
  rng = np.random.default_rng(0)
  block = StackedBlock(_nets.block_for("kron"), 3)
  covs = {"A": jnp.asarray(_random_psd_stack(rng, 3, 4)),
          "G": jnp.asarray(_random_psd_stack(rng, 3, 2))}
  factors = block.factors(covs, 0.01)
  assert factors["A"][1].shape == (3,)                                   # one pi per group
  inverses = _nets.block_inverses(block, covs, 0.01, method)
  for j in range(3):
    a, g = covs["A"][j], covs["G"][j]
    pi = np.sqrt((np.trace(a) / 4) / (np.trace(g) / 2))
    np.testing.assert_allclose(inverses["A"][j], np.linalg.inv(a + pi * 0.1 * np.eye(4)),
                               rtol=1e-9)
    np.testing.assert_allclose(inverses["G"][j], np.linalg.inv(g + 0.1 / pi * np.eye(2)),
                               rtol=1e-9)
  identity = block.identity(block.zeros(4, 2))
  np.testing.assert_array_equal(identity["A"], np.broadcast_to(np.eye(4), (3, 4, 4)))
  # A stacked vector factor (kron_in_diag) is inverted entrywise, per group.
  in_diag = StackedBlock(_nets.block_for("kron_in_diag"), 3)
  diag = jnp.asarray(rng.uniform(0.5, 1.0, (3, 4)))
  assert in_diag.is_entrywise(diag) and not in_diag.is_entrywise(covs["G"])
  damping = jnp.asarray([0.1, 0.2, 0.3])
  np.testing.assert_allclose(in_diag.invert(diag, damping), 1 / (diag + damping[:, None]))
  # A non-finite group keeps its previous inverse; the other groups are updated.
  poisoned = covs["A"].at[1, 0, 0].set(jnp.nan)
  previous = jnp.zeros_like(covs["A"])
  kept, fell_back = block.finite_or_previous(
      {"A": block.invert(poisoned, factors["A"][1], method)}, {"A": previous})
  kept = kept["A"]
  assert int(fell_back) == 1
  np.testing.assert_array_equal(kept[1], previous[1])
  np.testing.assert_allclose(np.asarray(kept)[[0, 2]], np.asarray(inverses["A"])[[0, 2]],
                             rtol=1e-9)
  assert inverses_lib.inverse_cost(block, covs["A"]) == 3 * 4 ** 3
  assert inverses_lib.inverse_cost(in_diag, diag) == 12


def test_stacked_factors_in_round_robin_inverse_tasks(x64):
  """`parallel.run_tasks` on a named axis (here vmap's): each device gets every inverse."""
  rng = np.random.default_rng(1)
  block = StackedBlock(_nets.block_for("kron"), 2)
  a, g = jnp.asarray(_random_psd_stack(rng, 2, 3)), jnp.asarray(_random_psd_stack(rng, 2, 2))
  tasks = [(block.invert, (a, jnp.asarray([0.1, 0.2]))), (block.invert, (g, jnp.asarray(0.3)))]
  costs = [inverses_lib.inverse_cost(block, a), inverses_lib.inverse_cost(block, g)]

  @functools.partial(jax.vmap, axis_name="devices")
  def run(_):
    return parallel.run_tasks(tasks, costs, axis_name="devices", placement="round_robin")

  inv_a, inv_g = run(jnp.arange(2))
  for d in range(2):
    for j, damping in enumerate([0.1, 0.2]):
      np.testing.assert_allclose(inv_a[d, j], np.linalg.inv(a[j] + damping * np.eye(3)),
                                 rtol=1e-9)
      np.testing.assert_allclose(inv_g[d, j], np.linalg.inv(g[j] + 0.3 * np.eye(2)), rtol=1e-9)


# --- sub_sample_patches ---------------------------------------------------------------------


def _covariance(inputs: layers.LayerInputs):
  """`inputs.covariance()`, per feature group if the arrays carry a group axis."""
  if inputs.groups[0].ndim == 3:
    return inputs.covariance()
  return jax.vmap(lambda parts: layers.LayerInputs(parts, inputs.bias).covariance())(
      inputs.groups)


@pytest.mark.parametrize("name", ["conv3d", "conv2d_grouped", "conv2d_depthwise",
                                  "conv2d_grouped_input_dilation"])
def test_sampled_rows_are_patch_rows_and_unbiased(name, x64):
  loss_fn, params, batch, _ = _case(name)
  layer = layer_table.trace_layers(loss_fn, params, batch).layers[0]
  x = batch[0]
  full = layers.layer_inputs(layer, x)
  total = int(np.prod(layer.output_shape[:-1]))
  d_in = layers.matrix_shape(layer)[0] - (layer.bias is not None)
  sample = layers.sample_rows(layer, 0.5, KEY)
  assert sample.shape == (int(0.5 * d_in),) and len(np.unique(sample)) == len(sample)
  assert int(0.5 * d_in) < total
  rows = layers.layer_inputs(layer, x, sample=sample).rows()
  full_rows = full.rows()
  np.testing.assert_array_equal(
      rows[..., 0, :], full_rows.reshape(*full_rows.shape[:-3], total, -1)[..., sample, :])
  assert layers.sample_rows(layer, total, KEY) is None                   # keeps every row

  @jax.jit
  def draws(keys):
    return jax.vmap(lambda key: _covariance(layers.layer_inputs(
        layer, x, sample=layers.sample_rows(layer, 0.5, key))))(keys)

  expected = _covariance(full)
  samples = np.asarray(draws(jax.random.split(KEY, 4000)))
  assert np.abs(samples[0] - expected).max() > 0.05 * np.abs(expected).max()   # one is noisy
  # The mean of the draws is within 5 standard errors of the full covariance: unbiased.
  error = samples.std(axis=0) / np.sqrt(len(samples))
  assert (np.abs(samples.mean(axis=0) - expected) <= 5 * error + 1e-12).all()


def test_sub_sample_patches_in_the_transform():
  """Only the conv input factors change; G (from the same sampled targets: the rows are
  drawn from their own key) and dense layers are as without sub-sampling; every
  statistics step draws new rows; compiled updates are finite."""
  auto_loss, _, params, batch = _linen_problem(Linen2dGrouped, (7, 6, 4))
  kwargs = dict(damping=1e-2, estimation="fisher", invert_every=1, cov_ema_decay=0.0)

  def two_steps(**extra):
    tx = jkfac.precondition(auto_loss, batch, **kwargs, **extra)

    @jax.jit
    def run(params):
      grads, state, out = jax.grad(auto_loss)(params, batch), tx.init(params), []
      for _ in range(2):
        updates, state = tx.update(grads, state, params, batch=batch)
        out.append((updates, state.statistics))
      return out

    return run(params)

  full = two_steps()
  sampled = two_steps(sub_sample_patches=0.5)
  everything = two_steps(sub_sample_patches=1000.0)                     # more than every row
  assert_trees_close(everything, full)
  for (updates, covs), (_, full_covs) in zip(sampled, full):
    assert all(np.isfinite(u).all() for u in jax.tree_util.tree_leaves(updates))
    assert_trees_close(jax.tree_util.tree_map(jnp.shape, covs),
                        jax.tree_util.tree_map(jnp.shape, full_covs))
    for name in covs:
      np.testing.assert_allclose(covs[name]["G"], full_covs[name]["G"], rtol=1e-5, atol=1e-7)
    for name in ("DenseGeneral_0", "Dense_0"):
      np.testing.assert_allclose(covs[name]["A"], full_covs[name]["A"], rtol=1e-5, atol=1e-7)
    assert np.abs(covs["Conv_0"]["A"] - full_covs["Conv_0"]["A"]).max() > 1e-3
  # A fresh draw on each statistics step (same batch, no EMA).
  assert np.abs(sampled[0][1]["Conv_0"]["A"] - sampled[1][1]["Conv_0"]["A"]).max() > 1e-3
  # Conv_0 has 2 groups of 3x3x2 patches: 9 of the 4 * 3 * 2 = 24 rows.
  assert layers.sample_rows(layer_table.trace_layers(auto_loss, params, batch).layers[0], 0.5,
                            KEY).shape == (9,)


def test_kfac_samples_three_patch_rows_per_dimension_of_wide_input_convs_by_default():
  """`jkfac.kfac`'s `sub_sample_patches="auto"` (`jkfac.precondition`'s and
  `jkfac.eigen_adam`'s defaults keep every row) is 3 rows per input feature on a conv
  with `d_in >= 4 d_out` and every row on a narrower one: here the grouped conv
  (d_in 18, d_out 3 per group) gets `3.0`'s statistics and the depthwise conv (d_in 6,
  d_out 2) every row's. Under `optax.inject_hyperparams` "auto" stays static; a number
  must be listed in `static_args`, and the error says so."""
  assert inspect.signature(jkfac.kfac).parameters["sub_sample_patches"].default == "auto"
  assert inspect.signature(jkfac.precondition).parameters["sub_sample_patches"].default is None
  assert inspect.signature(jkfac.eigen_adam).parameters["sub_sample_patches"].default is None
  assert layers.AUTO_PATCH_ROWS_PER_DIMENSION == 3.0 and layers.AUTO_MIN_INPUT_RATIO == 4
  auto_loss, _, params, batch = _linen_problem(Linen2dGrouped, (15, 14, 4))  # 7x6 outputs
  wide, narrow = layer_table.trace_layers(auto_loss, params, batch).layers[:2]
  assert layers.sample_rows(wide, "auto", KEY).shape == (3 * 18,)
  assert layers.sample_rows(narrow, "auto", KEY) is None
  assert layers.sample_rows(narrow, 3.0, KEY).shape == (3 * 6,)

  def statistics(**extra):
    tx = jkfac.kfac(auto_loss, batch, learning_rate=0.1, damping=1e-2, **extra)
    _, state = jax.jit(lambda: tx.update(jax.grad(auto_loss)(params, batch), tx.init(params),
                                         params, batch=batch))()
    return jkfac.preconditioner_state(state).statistics

  auto, three, every = statistics(), statistics(sub_sample_patches=3.0), statistics(
      sub_sample_patches=None)
  assert_trees_close(auto["Conv_0"], three["Conv_0"])
  assert_trees_close(auto["Conv_1"], every["Conv_1"])
  for name in ("Conv_0", "Conv_1"):  # 3.0 samples both
    assert np.abs(three[name]["A"] - every[name]["A"]).max() > 1e-3
  inject = functools.partial(optax.inject_hyperparams(
      jkfac.kfac, static_args=("loss_fn", "example_batch")), auto_loss, batch,
      learning_rate=0.1, damping=1e-2)
  inject().init(params)
  with pytest.raises(ValueError, match="list it in static_args"):
    inject(sub_sample_patches=3.0).init(params)


# --- training ---------------------------------------------------------------------------------


# The layers of the models above for `_patch_rows`: (strides, padding, rhs_dilation,
# groups) of a conv, None for a dense layer (its contracted axes trailing).
_LAYERS = {
    Linen3d: {"Conv_0": ((1, 2, 1), "SAME", (1, 1, 1), 1),
              "Conv_1": ((1, 1, 1), "VALID", (1, 1, 2), 4),
              "DenseGeneral_0": None, "DenseGeneral_1": None},
    Linen2dGrouped: {"Conv_0": ((2, 2), "VALID", (1, 1), 2),
                     "Conv_1": ((1, 1), "SAME", (1, 1), 6),
                     "DenseGeneral_0": None, "Dense_0": None},
}


@pytest.mark.parametrize("model_cls, input_shape", [(Linen3d, (4, 5, 4, 2)),
                                                    (Linen2dGrouped, (7, 6, 4))])
def test_first_kfac_step_of_3d_grouped_and_dense_general_models(model_cls, input_shape, x64):
  """The first `jkfac.kfac` step of the untagged models is `-lr` times every layer's
  damped Kronecker solve, group by group, with A and G from explicit patches of the
  layers' inputs and their output gradients, captured from the flax modules by hand.
  (Sub-sampled patches in the transform: `test_sub_sample_patches_in_the_transform`.)"""
  lr, damping = 0.05, 1e-1
  model = model_cls(False)
  batch = _batch(input_shape, n=16, dtype=jnp.float64)
  params = jax.tree_util.tree_map(lambda p: p.astype(jnp.float64), _random_like(
      jax.eval_shape(model.init, KEY, batch[0])["params"]))
  apply = lambda p, x: model.apply({"params": p}, x)
  loss_fn = _loss(apply)
  tx = jkfac.kfac(loss_fn, batch, learning_rate=lr, damping=damping, estimation="empirical",
                  invert_every=1, warm_start=False, sub_sample_patches=None)
  grads = jax.jit(jax.grad(loss_fn))(params, batch)
  updates, _ = jax.jit(lambda g: tx.update(g, tx.init(params), params, batch=batch))(grads)
  calls = _nets.linen_layer_calls(lambda x: apply(params, x), batch[0],
                                  lambda logits: _nets.cross_entropy(logits, batch[1]),
                                  (nn.Conv, nn.DenseGeneral, nn.Dense))
  assert sorted(calls) == sorted(_LAYERS[model_cls])
  for name, conv in _LAYERS[model_cls].items():
    [(inputs, output_grads)] = calls[name]
    kernel, bias = params[name]["kernel"], "bias" in params[name]
    d_out = kernel.shape[-1] if conv else params[name]["bias"].size
    d_in = kernel.size // d_out
    if conv:
      strides, padding, rhs, groups = conv
      rows = _patch_rows(inputs, kernel.shape, strides, padding, (1,) * len(strides), rhs,
                         groups, bias)
    else:
      groups, rows = 1, [np.asarray(inputs).reshape(-1, d_in)]
    output_grads = np.asarray(output_grads).reshape(batch[0].shape[0], -1, d_out)
    for j, (a, g, grad, update) in enumerate(zip(
        rows, np.split(output_grads, groups, axis=-1), _group_matrices(grads[name], d_in, groups),
        _group_matrices(updates[name], d_in, groups))):
      A, G = _nets.empirical_kron_factors(a, g, bias=not conv and bias)
      assert np.abs(G).max() > 1e-4
      np.testing.assert_allclose(update, -lr * _nets.kron_solve(A, G, grad, damping),
                                 rtol=1e-7, atol=1e-10, err_msg=f"{name} group {j}")


def test_describe_shows_stacked_group_factors():
  auto_loss, _, params, batch = _linen_problem(Linen2dGrouped, (7, 6, 4))
  rows = {p.path: p for p in jkfac.describe(auto_loss, params, batch).parameters}
  assert (rows["Conv_0/kernel"].kind, rows["Conv_0/kernel"].factors) == (
      "conv2d", "A 2x19x19, G 2x3x3")
  assert rows["Conv_1/kernel"].factors == "A 6x7x7, G 6x2x2"
  assert rows["DenseGeneral_0/kernel"].factors == "A 13x13, G 4x4"        # 12 channels
  state = jkfac.kfac(auto_loss, batch, learning_rate=0.1, damping=1e-2).init(params)
  assert rows["Conv_0/kernel"].state_bytes == sum(
      x.nbytes for x in jax.tree_util.tree_leaves(
          (jkfac.preconditioner_state(state).statistics["Conv_0"],
           jkfac.preconditioner_state(state).inverses["Conv_0"])))


# --- bad inputs ----------------------------------------------------------------------------------


def test_bad_inputs_raise():
  x3, k3 = jnp.ones((2, 4, 4, 4, 4)), jnp.ones((2, 2, 2, 2, 6))
  y3 = lax.conv_general_dilated(x3, k3, (1, 1, 1), "SAME", dimension_numbers=DN[3],
                                feature_group_count=2)
  jkfac.register_conv3d(y3, x3, k3, feature_group_count=2)              # fine
  with pytest.raises(ValueError, match="register_conv3d: expected NDHWC input and DHWIO"):
    jkfac.register_conv3d(y3, x3, k3)                                    # groups missing
  with pytest.raises(ValueError, match="register_conv3d: expected NDHWC"):
    jkfac.register_conv3d(y3, x3[0], k3, feature_group_count=2)          # unbatched
  with pytest.raises(ValueError, match="feature_group_count must be an integer >= 1"):
    jkfac.register_conv3d(y3, x3, k3, feature_group_count=0)
  with pytest.raises(ValueError, match="with 4 feature groups"):
    jkfac.register_conv3d(y3, x3, k3[..., :1, :], feature_group_count=4)  # 6 % 4 != 0
  with pytest.raises(ValueError, match="need 3 entries each"):
    jkfac.register_conv3d(y3, x3, k3, window_strides=(1, 1), feature_group_count=2)
  with pytest.raises(ValueError, match="register_conv3d: bias shape"):
    jkfac.register_conv3d(y3, x3, k3, jnp.ones(5), feature_group_count=2)
  x, w = jnp.ones((2, 3, 4, 5)), jnp.ones((4, 5, 2, 3))
  y = lax.dot_general(x, w, (((2, 3), (0, 1)), ((), ())))
  jkfac.register_dense(y, x, w, jnp.ones((2, 3)), in_axes=2)            # fine
  with pytest.raises(ValueError, match="register_dense: shapes do not match"):
    jkfac.register_dense(y, x, w)                                        # in_axes=1
  with pytest.raises(ValueError, match=r"register_dense: bias shape \(6,\)"):
    jkfac.register_dense(y, x, w, jnp.ones(6), in_axes=2)
  for in_axes in (0, 2.0, True):
    with pytest.raises(ValueError, match="in_axes must be an integer >= 1"):
      jkfac.register_dense(y, x, w, in_axes=in_axes)
  with pytest.raises(ValueError, match="register_dense: shapes do not match"):
    jkfac.register_dense(y, x, w, in_axes=4)                             # no output axes
  loss_fn, params, batch, _ = _case("conv2d_grouped")
  for bad in (0, -1.0, "half", True):
    with pytest.raises(ValueError, match="sub_sample_patches must be 'auto', None or a positive"):
      jkfac.kfac(loss_fn, batch, learning_rate=0.1, damping=1e-2, sub_sample_patches=bad)
