"""The tracer: the static layer table of `trace_layers` and the arrays of `collect_statistics`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jkfac
from jkfac import layer_table
from tests import _nets

KEY = jax.random.PRNGKey(0)


def _leaves(params):
  return jax.tree_util.tree_leaves(params)


def _assert_layer_params(trace, layer, params, name):
  """`layer.weight`/`layer.bias` index exactly `params[name]["kernel"/"bias"]`."""
  leaves = _leaves(params)
  assert trace.param_paths[layer.weight] == f"{name}/kernel"
  assert trace.param_paths[layer.bias] == f"{name}/bias"
  np.testing.assert_array_equal(leaves[layer.weight], params[name]["kernel"])
  np.testing.assert_array_equal(leaves[layer.bias], params[name]["bias"])
  assert layer.weight_shape == params[name]["kernel"].shape


# --- the layer table ------------------------------------------------------------------------


def test_trace_finds_every_convnet_tag():
  net = _nets.CONVNET
  _, params, batch, loss_fn = _nets.make_problem(net, approx=(None, "diagonal", "full"))
  trace = layer_table.trace_layers(loss_fn, params, batch)
  assert [l.name for l in trace.layers] == ["Conv_0", "Conv_1", "Dense_0"]
  assert [l.kind for l in trace.layers] == ["conv2d", "conv2d", "dense"]
  assert [l.approx for l in trace.layers] == ["kron", "diagonal", "full"]
  for layer in trace.layers:
    _assert_layer_params(trace, layer, params, layer.name)
  conv0, conv1, dense = trace.layers
  assert (conv0.input_shape, conv0.output_shape) == ((4, 7, 7, 2), (4, 3, 3, 3))
  assert (conv1.input_shape, conv1.output_shape) == ((4, 3, 3, 3), (4, 3, 3, 4))
  assert (dense.input_shape, dense.output_shape) == ((4, 36), (4, 3))
  # 3x3 stride-2 VALID; 2x3 stride-1 SAME on 3x3: one padded row (at the end), two columns.
  assert conv0.conv.window_strides == (2, 2) and conv0.conv.padding == ((0, 0), (0, 0))
  assert conv1.conv.window_strides == (1, 1) and conv1.conv.padding == ((0, 1), (1, 1))
  assert dense.conv is None
  assert [(l.kind, l.weight) for l in trace.losses] == [("softmax_cross_entropy", 1.0)]
  assert len(trace.param_paths) == len(_leaves(params))
  # approx_for applies to layers whose tag names none.
  trace = layer_table.trace_layers(loss_fn, params, batch, approx_for=lambda name, kind: "full")
  assert [l.approx for l in trace.layers] == ["full", "diagonal", "full"]


def test_trace_finds_every_mlp_tag():
  net = _nets.MLP
  _, params, batch, loss_fn = _nets.make_problem(net)
  trace = layer_table.trace_layers(loss_fn, params, batch)
  assert [l.name for l in trace.layers] == ["Dense_0", "Dense_1"]
  assert [l.kind for l in trace.layers] == ["dense", "dense"]
  assert [l.approx for l in trace.layers] == ["kron", "kron"]
  for layer in trace.layers:
    _assert_layer_params(trace, layer, params, layer.name)
    assert layer.bias is not None and layer.conv is None
  assert [(l.input_shape, l.output_shape) for l in trace.layers] == [((4, 6), (4, 5)),
                                                                      ((4, 5), (4, 3))]
  # approx_for fills in layers whose tag names none, by name.
  by_name = lambda name, kind: "diagonal" if name == "Dense_1" else None
  trace = layer_table.trace_layers(loss_fn, params, batch, approx_for=by_name)
  assert [l.approx for l in trace.layers] == ["kron", "diagonal"]
  # ... but a tag's own approximation wins.
  _, params, batch, loss_fn = _nets.make_problem(net, approx=("full", None))
  trace = layer_table.trace_layers(loss_fn, params, batch, approx_for=lambda name, kind: "diagonal")
  assert [l.approx for l in trace.layers] == ["full", "diagonal"]


def test_trace_works_on_abstract_inputs():
  _, params, batch, loss_fn = _nets.make_problem(_nets.MLP)
  abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                    (params, batch))
  assert (layer_table.trace_layers(loss_fn, *abstract)
          == layer_table.trace_layers(loss_fn, params, batch))


# --- tags inside sub-jaxprs ----------------------------------------------------------------


def _dense(x, kernel, bias):
  return jkfac.register_dense(x @ kernel + bias, x, kernel, bias)


_WRAPPERS = {
    "jit": jax.jit,
    "checkpoint": jax.checkpoint,
    "jit_of_checkpoint": lambda f: jax.jit(jax.checkpoint(f)),
    "checkpoint_of_jit": lambda f: jax.checkpoint(jax.jit(f)),
}


def _wrapped_problem(mode):
  """A 2-layer MLP whose first layer runs inside a jit/checkpoint (possibly closing over params)."""
  rng = np.random.default_rng(1)
  normal = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  params = {"first": {"kernel": normal(3, 4), "bias": normal(4)},
            "second": {"kernel": normal(4, 2), "bias": normal(2)}}
  batch = (normal(5, 3), jnp.asarray(rng.integers(0, 2, 5), jnp.int32))

  def loss_fn(params, batch):
    x, labels = batch
    first = params["first"]
    if mode == "jit_closure":
      h = jax.jit(lambda x: _dense(x, first["kernel"], first["bias"]))(x)
    else:
      h = _WRAPPERS[mode](_dense)(x, first["kernel"], first["bias"])
    logits = _dense(jnp.tanh(h), params["second"]["kernel"], params["second"]["bias"])
    logits = jkfac.register_softmax_cross_entropy(logits, labels)
    return _nets.cross_entropy(logits, labels)

  return params, batch, loss_fn


@pytest.mark.parametrize("mode", list(_WRAPPERS) + ["jit_closure"])
def test_tags_inside_jit_and_checkpoint_are_found(mode):
  params, batch, loss_fn = _wrapped_problem(mode)
  # The tag really is inside a sub-jaxpr.
  top_level = [e.primitive.name for e in jax.make_jaxpr(loss_fn)(params, batch).jaxpr.eqns]
  assert top_level.count("kfac_layer_tag") == 1
  trace = layer_table.trace_layers(loss_fn, params, batch)
  assert [l.name for l in trace.layers] == ["first", "second"]
  for layer in trace.layers:
    _assert_layer_params(trace, layer, params, layer.name)
  # collect_statistics evaluates through the sub-jaxpr too.
  stats = _nets.collect_statistics(loss_fn, trace, params, batch, KEY, "empirical")
  np.testing.assert_array_equal(stats["first"].inputs[0], batch[0])
  expected = jnp.tanh(batch[0] @ params["first"]["kernel"] + params["first"]["bias"])
  np.testing.assert_allclose(stats["second"].inputs[0], expected, rtol=1e-5, atol=1e-6)
  assert stats["first"].output_grads[0].shape == (1, 5, 4)
  assert np.abs(stats["first"].output_grads[0]).max() > 0


# --- errors -----------------------------------------------------------------------------------


def _mlp_params_and_batch():
  _, params, batch, _ = _nets.make_problem(_nets.MLP)
  return params, batch


def _two_layer_loss(first_layer, register_loss=True):
  """MLP loss whose first layer is `first_layer(x, kernel, bias)`."""
  def loss_fn(params, batch):
    x, labels = batch
    h = jnp.tanh(first_layer(x, params["Dense_0"]["kernel"], params["Dense_0"]["bias"]))
    logits = _dense(h, params["Dense_1"]["kernel"], params["Dense_1"]["bias"])
    if register_loss:
      logits = jkfac.register_softmax_cross_entropy(logits, labels)
    return _nets.cross_entropy(logits, labels)
  return loss_fn


def test_no_loss_registered_raises():
  params, batch = _mlp_params_and_batch()
  with pytest.raises(ValueError, match=r"No loss is registered"):
    layer_table.trace_layers(_two_layer_loss(_dense, register_loss=False), params, batch)


@pytest.mark.parametrize("which", ["kernel", "bias"])
def test_weights_not_in_params_raise(which):
  params, batch = _mlp_params_and_batch()

  def scaled(x, kernel, bias):
    if which == "kernel":
      return jkfac.register_dense(x @ kernel + bias, x, kernel * 2.0, bias)
    return jkfac.register_dense(x @ kernel + bias, x, kernel, bias * 2.0)

  with pytest.raises(ValueError, match=r"dense layer tag's weights .* are not leaves of `params`"):
    layer_table.trace_layers(_two_layer_loss(scaled), params, batch)


def test_weights_from_the_batch_raise():
  params, batch = _mlp_params_and_batch()
  kernel = params["Dense_0"]["kernel"]

  def loss_fn(params, batch):
    x, labels, w = batch
    return _two_layer_loss(lambda x, k, b: _dense(x, w, b))(params, (x, labels))

  with pytest.raises(ValueError, match=r"not leaves of `params`"):
    layer_table.trace_layers(loss_fn, params, batch + (kernel,))


def test_tags_of_one_weight_that_disagree_raise():
  params, batch = _mlp_params_and_batch()

  def loss_fn(params, batch):
    x, labels = batch
    kernel, bias = params["Dense_0"]["kernel"], params["Dense_0"]["bias"]
    h = jnp.tanh(_dense(x, kernel, bias))
    h2 = jkfac.register_dense(x @ kernel, x, kernel)   # the same kernel, without the bias
    logits = _dense(h + h2, params["Dense_1"]["kernel"], params["Dense_1"]["bias"])
    logits = jkfac.register_softmax_cross_entropy(logits, labels)
    return _nets.cross_entropy(logits, labels)

  with pytest.raises(ValueError, match=r"'Dense_0/kernel' is tagged several times .* must agree"):
    layer_table.trace_layers(loss_fn, params, batch)


def test_tags_inside_control_flow_raise():
  params, batch = _mlp_params_and_batch()
  in_cond = lambda x, k, b: jax.lax.cond(jnp.all(x > -1e9), _dense, lambda x, k, b: x @ k + b,
                                          x, k, b)
  with pytest.raises(NotImplementedError, match=r"lax.cond / lax.switch"):
    layer_table.trace_layers(_two_layer_loss(in_cond), params, batch)


# --- collect_statistics -------------------------------------------------------------------------


@pytest.mark.parametrize("net", list(_nets.NETS))
def test_collect_statistics_empirical_matches_hand_written_pass(net):
  net = _nets.NETS[net]
  _, params, batch, loss_fn = _nets.make_problem(net)
  n = batch[0].shape[0]
  trace = layer_table.trace_layers(loss_fn, params, batch)
  stats = jax.jit(lambda p, b: _nets.collect_statistics(loss_fn, trace, p, b, KEY, "empirical"))(
      params, batch)
  inputs, per_example = _nets.per_example_output_grads(net, params, batch)
  assert list(stats) == net.layer_names
  for name, x, g in zip(net.layer_names, inputs, per_example):
    np.testing.assert_allclose(stats[name].inputs[0], x, rtol=1e-5, atol=1e-6)
    assert stats[name].output_grads[0].shape == (1,) + g.shape
    # The cotangent of a mean loss is scaled by sqrt(1/N) (losses.py), so that
    # G = sum g g^T = (1/N) sum_n g_n g_n^T; i.e. output_grads = sqrt(N) * d(mean loss)/dy.
    np.testing.assert_allclose(stats[name].output_grads[0][0], g / np.sqrt(n), rtol=1e-4, atol=1e-6)
    assert np.abs(g).max() > 1e-3


def test_collect_statistics_fisher_samples_one_hot_targets():
  """With sampled targets the logits' cotangent is (softmax - onehot(sample)) / sqrt(N)."""
  net = _nets.MLP
  _, params, batch, loss_fn = _nets.make_problem(net, batch=64)
  n = batch[0].shape[0]
  trace = layer_table.trace_layers(loss_fn, params, batch)
  collect = jax.jit(lambda key: _nets.collect_statistics(loss_fn, trace, params, batch, key,
                                                          "fisher"))
  probs = jax.nn.softmax(_nets.forward(net, params, batch[0])[0])
  samples = []
  for seed in range(2):
    g = collect(jax.random.PRNGKey(seed))["Dense_1"].output_grads[0]
    assert g.shape == (1, n, _nets.NUM_CLASSES)
    one_hot = np.asarray(probs - np.sqrt(n) * g[0])
    np.testing.assert_allclose(one_hot.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.sort(one_hot, -1)[:, :-1], 0.0, atol=1e-5)
    samples.append(one_hot.argmax(-1))
  assert (samples[0] != samples[1]).any()          # different keys, different samples
  assert (samples[0] != np.asarray(batch[1])).any()  # not the true labels
  np.testing.assert_array_equal(collect(jax.random.PRNGKey(0))["Dense_1"].output_grads[0],
                                collect(jax.random.PRNGKey(0))["Dense_1"].output_grads[0])


def test_collect_statistics_exact_has_one_column_per_class():
  net = _nets.CONVNET
  _, params, batch, loss_fn = _nets.make_problem(net)
  trace = layer_table.trace_layers(loss_fn, params, batch)
  stats = jax.jit(lambda p, b: _nets.collect_statistics(loss_fn, trace, p, b, KEY, "exact"))(
      params, batch)
  for layer in trace.layers:
    assert stats[layer.name].output_grads[0].shape == (_nets.NUM_CLASSES,) + layer.output_shape
  # At the logits, sum_k c_k c_k^T = (diag(p) - p p^T) / N for every example.
  c = stats["Dense_0"].output_grads[0]
  fisher = _nets.softmax_fisher(_nets.forward(net, params, batch[0])[0])
  np.testing.assert_allclose(jnp.einsum("kni,knj->nij", c, c) * batch[0].shape[0], fisher,
                             rtol=1e-4, atol=1e-6)


# Per loss kind: the NLL gradient at the targets and the Fisher in the prediction, by hand.
_LOSS_KINDS = {
    "softmax_cross_entropy": (
        jkfac.register_softmax_cross_entropy,
        lambda z, t: jax.nn.softmax(z) - jax.nn.one_hot(t, z.shape[-1], dtype=z.dtype),
        lambda z: (jnp.eye(z.shape[-1]) * jax.nn.softmax(z)[..., None]
                   - jax.nn.softmax(z)[..., :, None] * jax.nn.softmax(z)[..., None, :])),
    "sigmoid_cross_entropy": (
        jkfac.register_sigmoid_cross_entropy,
        lambda z, t: jax.nn.sigmoid(z) - t,
        lambda z: jnp.eye(z.shape[-1]) * (jax.nn.sigmoid(z) * (1 - jax.nn.sigmoid(z)))[..., None]),
    "squared_error": (
        jkfac.register_squared_error,
        lambda z, t: z - t,
        lambda z: jnp.broadcast_to(jnp.eye(z.shape[-1]), z.shape + z.shape[-1:])),
}


@pytest.mark.parametrize("estimation", ["empirical", "exact"])
@pytest.mark.parametrize("kind", list(_LOSS_KINDS))
def test_collect_statistics_loss_cotangents(kind, estimation):
  """Predictions with an extra axis: rows = N * 2; loss weight 2.

  The cotangent at the prediction is the per-row NLL gradient times sqrt(weight / rows)
  ("empirical"), or columns whose outer products sum to weight / rows * F_row ("exact").
  """
  register, residual, fisher = _LOSS_KINDS[kind]
  rng = np.random.default_rng(2)
  n, positions, classes, weight = 3, 2, 4, 2.0
  params = {"out": {"kernel": jnp.asarray(rng.standard_normal((5, classes)), jnp.float32),
                    "bias": jnp.asarray(rng.standard_normal(classes), jnp.float32)}}
  x = jnp.asarray(rng.standard_normal((n, positions, 5)), jnp.float32)
  if kind == "softmax_cross_entropy":
    targets = jnp.asarray(rng.integers(0, classes, (n, positions)))
  elif kind == "sigmoid_cross_entropy":
    targets = jnp.asarray(rng.integers(0, 2, (n, positions, classes)), jnp.float32)
  else:
    targets = jnp.asarray(rng.standard_normal((n, positions, classes)), jnp.float32)

  def loss_fn(params, batch):
    x, targets = batch
    p = params["out"]
    z = jkfac.register_dense(x @ p["kernel"] + p["bias"], x, p["kernel"], p["bias"])
    z = register(z, targets, weight=weight)
    # Only the registered loss matters to collect_statistics; the value is not used.
    return weight * jnp.mean(jnp.sum(residual(z, targets) ** 2, -1))

  trace = layer_table.trace_layers(loss_fn, params, (x, targets))
  assert [(l.kind, l.weight) for l in trace.losses] == [(kind, weight)]
  stats = jax.jit(lambda p, b: _nets.collect_statistics(loss_fn, trace, p, b, KEY, estimation))(
      params, (x, targets))["out"]
  z = x @ params["out"]["kernel"] + params["out"]["bias"]
  scale = weight / (n * positions)
  if estimation == "empirical":
    assert stats.output_grads[0].shape == (1, n, positions, classes)
    np.testing.assert_allclose(stats.output_grads[0][0], residual(z, targets) * np.sqrt(scale),
                               rtol=1e-5, atol=1e-6)
  else:
    c = stats.output_grads[0]   # one set of columns per row of an example
    assert c.shape == (positions * classes, n, positions, classes)
    np.testing.assert_allclose(jnp.einsum("k...i,k...j->...ij", c, c), scale * fisher(z),
                               rtol=1e-5, atol=1e-6)
    # No cross terms between the rows of an example.
    np.testing.assert_allclose(jnp.einsum("knpi,knqj->npqij", c, c)[:, 0, 1], 0, atol=1e-7)
