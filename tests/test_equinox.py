"""Equinox models get the blocks of the same Flax models (issue 20).

Equinox stores a dense weight `(out, in)` and applies it as `weight @ x` to one example,
batched by `jax.vmap`; jkfac recognises that layer and gives it the block of the Flax
layer with `kernel = weight.T`. Oracle: the same model in Flax with copied weights.
"""

import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jkfac

eqx = pytest.importorskip("equinox")

KEY = jax.random.PRNGKey(0)
SIZES = (4, 8, 8, 3)
X = jax.random.normal(jax.random.PRNGKey(1), (16, SIZES[0]))
Y = jax.random.normal(jax.random.PRNGKey(2), (16, SIZES[-1]))


def _eqx_mlp():
  mlp = eqx.nn.MLP(SIZES[0], SIZES[-1], SIZES[1], len(SIZES) - 2, activation=jnp.tanh,
                   key=KEY)
  return eqx.partition(mlp, eqx.is_array)


class FlaxMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    for i, size in enumerate(SIZES[1:]):
      x = nn.Dense(size)(x)
      x = jnp.tanh(x) if i < len(SIZES) - 2 else x
    return x


def _squared_error(out, y):
  jkfac.register_squared_error(out, y)
  return 0.5 * jnp.mean(jnp.sum((out - y) ** 2, axis=-1))


def _eqx_loss(static):
  def loss_fn(params, batch):
    x, y = batch
    return _squared_error(jax.vmap(eqx.combine(params, static))(x), y)
  return loss_fn


def _flax_loss(params, batch):
  x, y = batch
  return _squared_error(FlaxMLP().apply({"params": params}, x), y)


def _flax_params(eqx_params):
  """The Flax MLP's parameters holding the Equinox MLP's weights (kernel = weight.T)."""
  return {f"Dense_{i}": {"kernel": layer.weight.T, "bias": layer.bias}
          for i, layer in enumerate(eqx_params.layers)}


def _kfac_steps(loss_fn, params, steps=2, batch=(X, Y)):
  """The updates and preconditioner state after `steps` K-FAC steps from `params`."""
  tx = jkfac.kfac(loss_fn, batch, learning_rate=0.1, damping=1e-2)
  state = tx.init(params)
  for _ in range(steps):
    grads = jax.grad(loss_fn)(params, batch)
    updates, state = tx.update(grads, state, params, batch=batch)
  stats = [s.statistics for s in jax.tree_util.tree_leaves(
      state, is_leaf=lambda s: isinstance(s, jkfac.PreconditionState))
           if isinstance(s, jkfac.PreconditionState)]
  assert len(stats) == 1
  return updates, stats[0]


def test_mlp_is_structured_and_transposed():
  params, static = _eqx_mlp()
  trace = jkfac.layer_table.trace_layers(_eqx_loss(static), params, (X, Y))
  assert not trace.generic
  assert [(l.kind, l.transposed, l.weight_shape) for l in trace.layers] == [
      ("dense", True, (SIZES[i], SIZES[i + 1])) for i in range(len(SIZES) - 1)]
  assert all(l.bias is not None for l in trace.layers)


def test_mlp_kfac_equals_flax_mlp():
  params, static = _eqx_mlp()
  flax_params = _flax_params(params)
  np.testing.assert_allclose(  # the same function
      jax.vmap(eqx.combine(params, static))(X), FlaxMLP().apply({"params": flax_params}, X),
      rtol=1e-5, atol=1e-6)
  updates, stats = _kfac_steps(_eqx_loss(static), params)
  flax_updates, flax_stats = _kfac_steps(_flax_loss, flax_params)
  assert sorted(stats) == [f"layers/{i}" for i in range(len(SIZES) - 1)]
  for i in range(len(SIZES) - 1):
    for factor in ("A", "G"):  # the same Kronecker factors
      np.testing.assert_allclose(stats[f"layers/{i}"][factor],
                                 flax_stats[f"Dense_{i}"][factor], rtol=1e-5, atol=1e-6)
    flax_layer = flax_updates[f"Dense_{i}"]
    np.testing.assert_allclose(updates.layers[i].weight, flax_layer["kernel"].T,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(updates.layers[i].bias, flax_layer["bias"], rtol=1e-5,
                               atol=1e-6)
  # Not trivially equal: the preconditioned step differs from the gradient's direction.
  grads = jax.grad(_eqx_loss(static))(params, (X, Y))
  cosine = jnp.vdot(grads.layers[0].weight, updates.layers[0].weight) / (
      jnp.linalg.norm(grads.layers[0].weight) * jnp.linalg.norm(updates.layers[0].weight))
  assert abs(float(cosine)) < 0.999


@pytest.mark.parametrize("form", ["vmap", "vmap_of_vmap"])
def test_plain_jnp_weight_first(form):
  """Plain `w @ x + b` per example under `vmap` (or two): a transposed dense layer."""
  w = jax.random.normal(KEY, (3, 4))
  b = jnp.zeros(3)

  def loss_fn(params, batch):
    x, y = batch
    layer = lambda xi: params["w"] @ xi + params["b"]
    if form == "vmap":
      return _squared_error(jax.vmap(layer)(x), y)
    out = jax.vmap(jax.vmap(layer))(x.reshape(2, -1, x.shape[-1]))
    return _squared_error(out.reshape(y.shape), y)

  trace = jkfac.layer_table.trace_layers(loss_fn, {"w": w, "b": b}, (X, Y))
  assert not trace.generic
  (layer,) = trace.layers
  assert (layer.kind, layer.transposed, layer.weight_shape) == ("dense", True, (4, 3))


def test_plain_x_times_w_transposed():
  """`x @ w.T + b` (a PyTorch-layout weight) is the dense layer `x @ v + b` with
  `v = w.T`: same factors, same update (transposed)."""
  w, b = jax.random.normal(KEY, (3, 4)), jnp.ones(3)

  def loss_fn(transposed):
    def loss(params, batch):
      x, y = batch
      kernel = params["w"].T if transposed else params["w"]
      return _squared_error(x @ kernel + params["b"], y)
    return loss

  trace = jkfac.layer_table.trace_layers(loss_fn(True), {"w": w, "b": b}, (X, Y))
  assert not trace.generic
  ((layer),) = trace.layers
  assert (layer.transposed, layer.weight_shape, layer.bias) == (True, (4, 3), 0)
  updates, stats = _kfac_steps(loss_fn(True), {"w": w, "b": b})
  plain_updates, plain_stats = _kfac_steps(loss_fn(False), {"w": w.T, "b": b})
  for factor in ("A", "G"):
    np.testing.assert_allclose(stats["w"][factor], plain_stats["w"][factor], rtol=1e-5,
                               atol=1e-6)
  np.testing.assert_allclose(updates["w"], plain_updates["w"].T, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(updates["b"], plain_updates["b"], rtol=1e-5, atol=1e-6)


def test_import_does_not_need_equinox():
  code = ("import sys; sys.modules['equinox'] = None; import jkfac; "
          "assert 'equinox' not in sys.modules or sys.modules['equinox'] is None")
  subprocess.run([sys.executable, "-c", code], check=True)


def test_weight_in_both_orientations_is_generic():
  """`x @ w` and `w @ x` of one square weight are no single layer: it stays generic."""
  w = jax.random.normal(KEY, (4, 4))

  def loss_fn(params, batch):
    x, y = batch
    h = jax.vmap(lambda xi: params["w"] @ xi)(x @ params["w"])
    return _squared_error(h[:, :3], y)

  trace = jkfac.layer_table.trace_layers(loss_fn, {"w": w}, (X, Y))
  assert not trace.layers and [l.name for l in trace.generic] == ["w"]


def test_embedding_equals_take():
  """`eqx.nn.Embedding` under `vmap` (a clipped gather of `(1, d)` slices) is the embedding
  layer `jnp.take(table, ids, axis=0)` is: same statistics, same update."""
  emb = eqx.nn.Embedding(10, 3, key=KEY)
  params, static = eqx.partition(emb, eqx.is_array)
  batch = (jnp.arange(16) * 7 % 10, Y)

  def eqx_loss(params, batch):
    return _squared_error(jax.vmap(eqx.combine(params, static))(batch[0]), batch[1])

  def take_loss(params, batch):
    return _squared_error(jnp.take(params["weight"], batch[0], axis=0), batch[1])

  trace = jkfac.layer_table.trace_layers(eqx_loss, params, batch)
  assert not trace.generic and [l.kind for l in trace.layers] == ["embedding"]
  updates, stats = _kfac_steps(eqx_loss, params, batch=batch)
  take_updates, take_stats = _kfac_steps(take_loss, {"weight": params.weight}, batch=batch)
  for factor in ("A", "G"):
    np.testing.assert_allclose(stats["weight"][factor], take_stats["weight"][factor],
                               rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(updates.weight, take_updates["weight"], rtol=1e-5, atol=1e-6)


# --- convs (OIHW weights on per-example CHW inputs), recurrent cells, coverage -------------

IMAGES = jax.random.normal(jax.random.PRNGKey(3), (16, 1, 6, 6))


class EqxConvNet(eqx.Module):
  conv: eqx.nn.Conv2d
  mlp: eqx.nn.MLP

  def __init__(self, key):
    conv_key, mlp_key = jax.random.split(key)
    self.conv = eqx.nn.Conv2d(1, 3, 3, key=conv_key)
    self.mlp = eqx.nn.MLP(3 * 4 * 4, SIZES[-1], 8, 1, activation=jnp.tanh, key=mlp_key)

  def __call__(self, image):
    return self.mlp(jnp.tanh(self.conv(image)).reshape(-1))


class FlaxConvNet(nn.Module):
  """The same function on NHWC images; flattened in CHW order as Equinox does."""
  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Conv(3, (3, 3), padding="VALID")(x))
    x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
    x = jnp.tanh(nn.Dense(8)(x))
    return nn.Dense(SIZES[-1])(x)


def test_convnet_kfac_equals_flax_convnet():
  """An OIHW conv on CHW images under `vmap` is the conv layer of the same NHWC Flax conv
  (kernel = weight in HWIO): same factors, same update."""
  params, static = eqx.partition(EqxConvNet(KEY), eqx.is_array)
  flax_params = {"Conv_0": {"kernel": jnp.transpose(params.conv.weight, (2, 3, 1, 0)),
                            "bias": params.conv.bias.reshape(-1)},
                 **{f"Dense_{i}": {"kernel": layer.weight.T, "bias": layer.bias}
                    for i, layer in enumerate(params.mlp.layers)}}
  nhwc = jnp.transpose(IMAGES, (0, 2, 3, 1))
  eqx_loss = lambda p, batch: _squared_error(jax.vmap(eqx.combine(p, static))(batch[0]),
                                             batch[1])
  flax_loss = lambda p, batch: _squared_error(FlaxConvNet().apply({"params": p}, batch[0]),
                                              batch[1])
  np.testing.assert_allclose(eqx_loss(params, (IMAGES, Y)), flax_loss(flax_params, (nhwc, Y)),
                             rtol=1e-5)
  trace = jkfac.layer_table.trace_layers(eqx_loss, params, (IMAGES, Y))
  assert not trace.generic
  conv = trace.layers[0]
  assert (conv.kind, conv.transposed, conv.weight_shape, conv.bias) == ("conv2d", True,
                                                                       (3, 3, 1, 3), 1)
  updates, stats = _kfac_steps(eqx_loss, params, batch=(IMAGES, Y))
  flax_updates, flax_stats = _kfac_steps(flax_loss, flax_params, batch=(nhwc, Y))
  names = {"conv": "Conv_0", "mlp/layers/0": "Dense_0", "mlp/layers/1": "Dense_1"}
  assert sorted(stats) == sorted(names)
  for name, flax_name in names.items():
    for factor in ("A", "G"):
      np.testing.assert_allclose(stats[name][factor], flax_stats[flax_name][factor],
                                 rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(updates.conv.weight, jnp.transpose(
      flax_updates["Conv_0"]["kernel"], (3, 2, 0, 1)), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(updates.conv.bias.reshape(-1), flax_updates["Conv_0"]["bias"],
                             rtol=1e-5, atol=1e-6)
  for i, layer in enumerate(updates.mlp.layers):
    np.testing.assert_allclose(layer.weight, flax_updates[f"Dense_{i}"]["kernel"].T,
                               rtol=1e-5, atol=1e-6)


SEQUENCES = jax.random.normal(jax.random.PRNGKey(4), (16, 5, SIZES[0]))


def _scanned(cell, hidden):
  """A cell applied along one example's sequence by `lax.scan`; the last hidden state."""
  def run(xs):
    step = lambda carry, x: (cell(x, carry), None)
    return jax.lax.scan(step, hidden, xs)[0]
  return run


def test_lstm_cell_under_scan_equals_plain_cell():
  """`eqx.nn.LSTMCell` in a scan (`w_ih @ x + w_hh @ h + b`, per example under `vmap`)
  gets the blocks of the same cell written `x @ w_ih.T + b + h @ w_hh.T`: two dense
  layers, the bias with the input weight's."""
  cell = eqx.nn.LSTMCell(SIZES[0], 3, key=KEY)
  params, static = eqx.partition(cell, eqx.is_array)
  zeros = (jnp.zeros(3), jnp.zeros(3))

  def eqx_loss(p, batch):
    return _squared_error(jax.vmap(_scanned(eqx.combine(p, static), zeros))(batch[0])[0],
                          batch[1])

  def plain_cell(p):
    def step(carry, x):
      h, c = carry
      i, f, g, o = jnp.split(x @ p["wi"] + p["b"] + h @ p["wh"], 4, axis=-1)
      c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
      return (jax.nn.sigmoid(o) * jnp.tanh(c), c), None
    return step

  def plain_loss(p, batch):
    xs = jnp.swapaxes(batch[0], 0, 1)
    hidden = (jnp.zeros((xs.shape[1], 3)),) * 2
    return _squared_error(jax.lax.scan(plain_cell(p), hidden, xs)[0][0], batch[1])

  plain = {"b": params.bias, "wh": params.weight_hh.T, "wi": params.weight_ih.T}
  np.testing.assert_allclose(eqx_loss(params, (SEQUENCES, Y)), plain_loss(plain, (SEQUENCES, Y)),
                             rtol=1e-5)
  trace = jkfac.layer_table.trace_layers(eqx_loss, params, (SEQUENCES, Y))
  assert not trace.generic
  assert [(l.name, l.transposed, l.bias is not None) for l in trace.layers] == [
      ("weight_ih", True, True), ("weight_hh", True, False)]
  updates, stats = _kfac_steps(eqx_loss, params, batch=(SEQUENCES, Y))
  plain_updates, plain_stats = _kfac_steps(plain_loss, plain, batch=(SEQUENCES, Y))
  for name, plain_name in (("weight_ih", "wi"), ("weight_hh", "wh")):
    for factor in ("A", "G"):
      np.testing.assert_allclose(stats[name][factor], plain_stats[plain_name][factor],
                                 rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(getattr(updates, name), plain_updates[plain_name].T,
                               rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(updates.bias, plain_updates["b"], rtol=1e-5, atol=1e-6)


def _coverage(model, inputs, apply=lambda model: model):
  """`describe` of a squared error on `model` applied per example: its parameters' kinds
  and the share of parameters in structured blocks."""
  params, static = eqx.partition(model, eqx.is_array)

  def loss_fn(p, batch):
    out = jax.vmap(apply(eqx.combine(p, static)))(batch)
    out = out.reshape(out.shape[0], -1)
    return _squared_error(out, jnp.zeros_like(out))

  description = jkfac.describe(loss_fn, params, inputs)
  sizes = [(p.kind != "generic", np.prod(p.shape)) for p in description.parameters]
  share = sum(n for structured, n in sizes if structured) / sum(n for _, n in sizes)
  return {p.path: p.kind for p in description.parameters}, share


@pytest.mark.parametrize("conv, shape", [
    (eqx.nn.Conv1d(2, 3, 3, key=KEY), (4, 2, 7)),
    (eqx.nn.Conv3d(2, 3, 2, key=KEY), (4, 2, 4, 4, 4)),
    (eqx.nn.ConvTranspose2d(2, 3, 3, key=KEY), (4, 2, 5, 5)),
])
def test_convs_are_structured(conv, shape):
  kinds, share = _coverage(conv, jax.random.normal(KEY, shape))
  assert set(kinds.values()) == {f"conv{len(shape) - 2}d"} and share == 1.0


@pytest.mark.parametrize("norm", [eqx.nn.LayerNorm(6), eqx.nn.RMSNorm(6)])
def test_norms_are_structured(norm):
  kinds, share = _coverage(norm, jax.random.normal(KEY, (4, 6)))
  assert set(kinds.values()) == {"scale_and_shift"} and share == 1.0


@pytest.mark.xfail(strict=True, reason="GroupNorm scales channels-first (C, ...) inputs: "
                   "a scale not along the last axis is not recognised yet")
def test_group_norm_is_structured():
  kinds, _ = _coverage(eqx.nn.GroupNorm(2, 6), jax.random.normal(KEY, (4, 6, 5)))
  assert set(kinds.values()) == {"scale_and_shift"}


def test_gru_cell_under_scan_is_structured():
  """Both weights of a scanned `GRUCell` are dense layers (the input weight with `bias`);
  `bias_n`, added to a third of the hidden product, stays a generic block of its own."""
  cell = eqx.nn.GRUCell(SIZES[0], 5, key=KEY)
  kinds, share = _coverage(cell, SEQUENCES, lambda cell: _scanned(cell, jnp.zeros(5)))
  assert kinds == {"weight_ih": "dense", "weight_hh": "dense", "bias": "dense",
                   "bias_n": "generic"}
  assert share == pytest.approx(1 - 5 / 155)  # 155 parameters, 5 generic


class Mixed(eqx.Module):
  """Issue 20's model: Conv2d, Embedding, LayerNorm, MultiheadAttention, a scanned
  LSTMCell and an MLP, applied to one example (an image and a token sequence)."""
  conv: eqx.nn.Conv2d
  embedding: eqx.nn.Embedding
  norm: eqx.nn.LayerNorm
  attention: eqx.nn.MultiheadAttention
  cell: eqx.nn.LSTMCell
  mlp: eqx.nn.MLP

  def __init__(self, key):
    keys = jax.random.split(key, 5)
    self.conv = eqx.nn.Conv2d(1, 4, 3, key=keys[0])
    self.embedding = eqx.nn.Embedding(20, 16, key=keys[1])
    self.norm = eqx.nn.LayerNorm(16)
    self.attention = eqx.nn.MultiheadAttention(2, 16, key=keys[2])
    self.cell = eqx.nn.LSTMCell(16, 16, key=keys[3])
    self.mlp = eqx.nn.MLP(4 * 6 * 6 + 16, 5, 32, 2, key=keys[4])

  def __call__(self, inputs):
    image, tokens = inputs
    features = jax.nn.relu(self.conv(image)).reshape(-1)
    e = jax.vmap(self.norm)(jax.vmap(self.embedding)(tokens))
    e = self.attention(e, e, e)
    h = _scanned(self.cell, (jnp.zeros(16), jnp.zeros(16)))(e)[0]
    return self.mlp(jnp.concatenate([features, h]))


def test_mixed_model_is_structured():
  inputs = (jax.random.normal(KEY, (4, 1, 8, 8)), jnp.arange(24).reshape(4, 6) % 20)
  kinds, share = _coverage(Mixed(KEY), inputs)
  assert share >= 0.99, (share, kinds)
  assert share == 1.0 and "generic" not in kinds.values()
