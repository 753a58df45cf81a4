"""`jkfac.flax`: drop-in Dense/Conv (same parameters, same outputs), tags, TrainState."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state

import jkfac
from jkfac import tags, layer_table

KEY = jax.random.PRNGKey(0)


def _init_both(jk_module, flax_module, x):
  """Initializes both modules with the same key; returns (jk_params, flax_params)."""
  return (jk_module.init(KEY, x)["params"], flax_module.init(KEY, x)["params"])


def _spec(tree):
  """Names (tree structure), shapes and dtypes of a parameter tree."""
  return jax.tree_util.tree_structure(tree), jax.tree_util.tree_map(
      lambda p: (p.shape, p.dtype), tree)


def assert_same_as_flax(jk_cls, flax_cls, x, *, atol=1e-5, **kwargs):
  """`jk_cls(**kwargs)` creates the parameters of `flax_cls(**kwargs)` and computes its function."""
  jk_module, flax_module = jk_cls(**kwargs), flax_cls(**kwargs)
  jk_params, flax_params = _init_both(jk_module, flax_module, x)
  assert _spec(jk_params) == _spec(flax_params)
  # Same names, same initializers, same key: same values.
  jax.tree_util.tree_map(np.testing.assert_array_equal, jk_params, flax_params)
  # Use non-trivial parameters (flax initializes biases to zero).
  params = jax.tree_util.tree_map(
      lambda p: jax.random.normal(jax.random.PRNGKey(p.size), p.shape, p.dtype), flax_params)
  y_jk = jk_module.apply({"params": params}, x)
  y_flax = flax_module.apply({"params": params}, x)
  assert y_jk.shape == y_flax.shape
  assert y_jk.dtype == y_flax.dtype
  np.testing.assert_allclose(np.asarray(y_jk, np.float32), np.asarray(y_flax, np.float32),
                             atol=atol, rtol=atol)
  return jk_params, y_jk


def _inputs(shape, dtype=jnp.float32):
  return jax.random.normal(jax.random.PRNGKey(1), shape, dtype)


# --- Dense ----------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [
    dict(features=5),
    dict(features=5, use_bias=False),
    dict(features=3, kernel_init=nn.initializers.normal(1.0),
         bias_init=nn.initializers.normal(1.0)),
], ids=["bias", "no_bias", "custom_init"])
def test_dense_matches_flax(kwargs):
  params, _ = assert_same_as_flax(jkfac.flax.Dense, nn.Dense, _inputs((4, 7)), **kwargs)
  assert ("bias" in params) == kwargs.get("use_bias", True)


def test_dense_on_3d_inputs_matches_flax():
  _, y = assert_same_as_flax(jkfac.flax.Dense, nn.Dense, _inputs((2, 3, 7)), features=4)
  assert y.shape == (2, 3, 4)


@pytest.mark.parametrize("input_dtype,dtype,param_dtype", [
    (jnp.float32, jnp.bfloat16, jnp.float32),   # compute in bf16, float32 params
    (jnp.float32, None, jnp.bfloat16),          # bf16 params promoted to float32 inputs
    (jnp.bfloat16, None, jnp.bfloat16),         # all bf16
    (jnp.bfloat16, None, jnp.float32),          # bf16 inputs promoted to float32 params
    (jnp.bfloat16, jnp.float32, jnp.bfloat16),  # explicit float32 computation
])
@pytest.mark.parametrize("layer", ["dense", "conv"])
def test_dtype_promotion_matches_flax(layer, input_dtype, dtype, param_dtype):
  if layer == "dense":
    classes, x, kwargs = (jkfac.flax.Dense, nn.Dense), _inputs((4, 6), input_dtype), {}
  else:
    classes, x, kwargs = (jkfac.flax.Conv, nn.Conv), _inputs((2, 5, 5, 3), input_dtype), dict(
        kernel_size=(3, 3))
  params, y = assert_same_as_flax(*classes, x, atol=2e-2, features=4, dtype=dtype,
                                  param_dtype=param_dtype, **kwargs)
  assert all(p.dtype == param_dtype for p in jax.tree_util.tree_leaves(params))
  expected = dtype or jnp.promote_types(input_dtype, param_dtype)
  assert y.dtype == expected


# --- Conv -----------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [
    dict(kernel_size=(3, 3)),
    dict(kernel_size=(3, 3), use_bias=False),
    dict(kernel_size=(3, 2), strides=(2, 1)),
    dict(kernel_size=(3, 3), strides=2, padding="VALID"),
    dict(kernel_size=(3, 3), padding="SAME"),
    dict(kernel_size=(2, 3), padding=((1, 2), (0, 1))),
    dict(kernel_size=(3, 3), padding=1),
    dict(kernel_size=(3, 3), padding="CIRCULAR"),
    dict(kernel_size=(2, 3), padding="CIRCULAR", kernel_dilation=(2, 1)),
    dict(kernel_size=(2, 4), padding="CIRCULAR"),  # even kernels pad unevenly
    dict(kernel_size=(3, 3), padding="REFLECT"),
    dict(kernel_size=(2, 2), padding="REFLECT", strides=(1, 2)),
    dict(kernel_size=(3, 3), kernel_dilation=2),
    dict(kernel_size=(3, 3), kernel_dilation=(2, 1), padding="VALID"),
    # lax rejects string padding with input dilation, in Flax too: explicit padding.
    dict(kernel_size=(3, 3), input_dilation=2, padding=1),
    dict(kernel_size=(2, 2), input_dilation=(2, 1), strides=(1, 2), padding=((0, 1), (1, 0))),
    dict(kernel_size=(3, 3), strides=2, kernel_dilation=2, padding=((2, 1), (1, 2)),
         use_bias=False),
], ids=lambda kwargs: ",".join(f"{k}={v}" for k, v in kwargs.items()))
def test_conv_matches_flax(kwargs):
  params, _ = assert_same_as_flax(jkfac.flax.Conv, nn.Conv, _inputs((2, 9, 8, 3)),
                                  features=4, **kwargs)
  assert ("bias" in params) == kwargs.get("use_bias", True)


@pytest.mark.parametrize("kwargs,input_shape", [
    (dict(kernel_size=(3, 3), feature_group_count=2), (2, 6, 6, 4)),
    (dict(kernel_size=(3, 3), feature_group_count=4, strides=2), (2, 7, 7, 4)),  # depthwise
    (dict(kernel_size=3), (2, 6, 4)),      # an int is a 1-D kernel in Flax
    (dict(kernel_size=(3,), kernel_dilation=2, padding="CAUSAL"), (2, 7, 4)),
    (dict(kernel_size=(2,), padding="CIRCULAR", feature_group_count=2), (2, 6, 4)),
    (dict(kernel_size=(2, 3, 2), strides=(1, 2, 1), padding="VALID"), (2, 4, 6, 5, 2)),
    (dict(kernel_size=(3, 3, 3), input_dilation=(1, 2, 1), padding=1), (2, 3, 3, 4, 2)),
], ids=["grouped", "depthwise", "int_kernel", "1d_causal", "1d_circular_grouped", "3d",
        "3d_input_dilation"])
def test_conv_of_any_rank_and_groups_matches_flax(kwargs, input_shape):
  kind = f"conv{len(input_shape) - 2}d"
  params, _ = assert_same_as_flax(jkfac.flax.Conv, nn.Conv, _inputs(input_shape), features=4,
                                  **kwargs)
  x = _inputs(input_shape)
  model = jkfac.flax.Conv(features=4, **kwargs)
  variables = model.init(KEY, x)
  eqns = [e for e in jax.make_jaxpr(lambda v: model.apply(v, x))(variables).jaxpr.eqns
          if e.primitive is jkfac.tags.layer_tag_p]
  assert [e.params["kind"] for e in eqns] == [kind]
  assert eqns[0].params["conv"].feature_group_count == kwargs.get("feature_group_count", 1)


@pytest.mark.parametrize("kwargs,input_shape", [
    (dict(kernel_size=(3, 3)), (6, 6, 4)),  # no batch axis
    (dict(kernel_size=(3, 3), mask=jnp.ones((3, 3, 4, 4))), (2, 6, 6, 4)),
], ids=["unbatched", "mask"])
def test_conv_unsupported_configs_raise(kwargs, input_shape):
  x = _inputs(input_shape)
  nn.Conv(features=4, **kwargs).init(KEY, x)  # Flax itself accepts the configuration.
  with pytest.raises(NotImplementedError):
    jkfac.flax.Conv(features=4, **kwargs).init(KEY, x)


# --- approximation reaches the tag -----------------------------------------------------


class _Net(nn.Module):
  dense_approx: str | None = None
  conv_approx: str | None = None

  @nn.compact
  def __call__(self, x):
    x = jkfac.flax.Conv(4, (3, 3), approximation=self.conv_approx, name="conv")(x)
    x = jnp.tanh(x).reshape(x.shape[0], -1)
    return jkfac.flax.Dense(3, approximation=self.dense_approx, name="dense")(x)


def _net_loss(net):
  def loss_fn(params, batch):
    logits = net.apply({"params": params}, batch["x"])
    logits = jkfac.register_softmax_cross_entropy(logits, batch["y"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
  return loss_fn


def _net_setup(**approx):
  net = _Net(**approx)
  batch = {"x": _inputs((2, 5, 5, 2)), "y": jnp.array([0, 2])}
  params = net.init(KEY, batch["x"])["params"]
  return _net_loss(net), params, batch


@pytest.mark.parametrize("dense_approx,conv_approx", [
    ("diagonal", "full"), ("full", "kron"), (None, "diagonal"), (None, None)])
def test_approximation_reaches_the_tag(dense_approx, conv_approx):
  loss_fn, params, batch = _net_setup(dense_approx=dense_approx, conv_approx=conv_approx)
  # In the jaxpr: the tag equation's `approx` parameter.
  jaxpr = jax.make_jaxpr(loss_fn)(params, batch).jaxpr
  found = {}

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive is tags.layer_tag_p:
        found[eqn.params["kind"]] = eqn.params["approx"]
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jaxpr)
  assert found == {"conv2d": conv_approx, "dense": dense_approx}
  # In the tracer's table, None falls back to the default.
  trace = layer_table.trace_layers(loss_fn, params, batch, approx_for=lambda name, kind: "kron")
  assert {layer.name: layer.approx for layer in trace.layers} == {
      "conv": conv_approx or "kron", "dense": dense_approx or "kron"}
  assert {layer.name: layer.kind for layer in trace.layers} == {
      "conv": "conv2d", "dense": "dense"}


def test_approximation_invalid_name_raises():
  with pytest.raises(ValueError, match="approximation"):
    _net_setup(dense_approx="kronecker")


# --- TrainState -------------------------------------------------------------------------


def _kfac_tx(loss_fn, batch):
  return jkfac.kfac(loss_fn, batch, learning_rate=0.1, damping=1e-2, invert_every=2)


def _batches(steps):
  return [{"x": _inputs((2, 5, 5, 2)) * (step + 1), "y": jnp.array([step % 3, 1])}
          for step in range(steps)]


def test_train_state_apply_gradients_equals_plain_optax_update():
  loss_fn, params, batch = _net_setup()
  tx = _kfac_tx(loss_fn, batch)

  @jax.jit
  def train_state_step(state, batch):
    return state.apply_gradients(grads=jax.grad(loss_fn)(state.params, batch), batch=batch)

  @jax.jit
  def plain_step(params, opt_state, batch):
    grads = jax.grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params, batch=batch)
    return optax.apply_updates(params, updates), opt_state

  state = jkfac.flax.TrainState.create(apply_fn=None, params=params, tx=tx)
  plain_params, plain_opt_state = params, tx.init(params)
  for batch in _batches(3):  # step 1 reuses the inverses, step 2 recomputes them
    state = train_state_step(state, batch)
    plain_params, plain_opt_state = plain_step(plain_params, plain_opt_state, batch)
  assert int(state.step) == 3
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  jax.tree_util.tree_map(close, state.params, plain_params)
  jax.tree_util.tree_map(close, state.opt_state, plain_opt_state)
  # The parameters moved: the test would notice a TrainState that dropped the update.
  assert not np.allclose(state.params["dense"]["kernel"], params["dense"]["kernel"])


def test_train_state_apply_gradients_passes_extra_fields():
  _, params, batch = _net_setup()
  tx = optax.with_extra_args_support(optax.sgd(0.1))
  state = jkfac.flax.TrainState.create(apply_fn=None, params=params, tx=tx)
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  new = state.apply_gradients(grads=grads, batch=batch)
  assert int(new.step) == 1
  jax.tree_util.tree_map(lambda p, q: np.testing.assert_allclose(q, p - 0.1, rtol=1e-6),
                         params, new.params)
  # Extra keyword arguments replace fields.
  assert new.apply_fn is None
  assert state.apply_gradients(grads=grads, batch=batch, apply_fn=len).apply_fn is len


def test_flax_train_state_with_jkfac_raises_about_batch():
  loss_fn, params, batch = _net_setup()
  state = train_state.TrainState.create(apply_fn=None, params=params,
                                        tx=_kfac_tx(loss_fn, batch))
  with pytest.raises(ValueError, match="batch"):
    state.apply_gradients(grads=jax.grad(loss_fn)(params, batch))
  # The jkfac TrainState without a batch fails the same clear way.
  state = jkfac.flax.TrainState.create(apply_fn=None, params=params, tx=_kfac_tx(loss_fn, batch))
  with pytest.raises(ValueError, match="batch"):
    state.apply_gradients(grads=jax.grad(loss_fn)(params, batch))
