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
