"""Automatic registration (`jkfac/patterns.py`): untagged layers behave as hand-tagged ones.

Every model here is written twice, once untagged (plain `flax.linen` modules, or plain
`jnp`/`lax` ops) and once tagged by hand (`jkfac.flax.Dense`/`Conv`,
`jkfac.register_dense`/`register_conv2d`, `jkfac.layer_collection`), with the same
parameters. The auto-registered trace must equal the hand-tagged one (layers, conv
settings, parameter indices), the statistics must be the same arrays, and `jkfac.kfac`
must take the same steps.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax
from jax.extend import core as jcore

import jkfac
from jkfac import layer_collection, layers, tags, layer_table
from tests import _nets
from tests._asserts import assert_trees_close

KEY = jax.random.PRNGKey(0)
NUM_CLASSES = 3
DN = ("NHWC", "HWIO", "NHWC")

_batch = _nets.random_batch
_random_like = _nets.random_like
_loss = _nets.classifier_loss


def _flax_loss(module, jit=False):
  apply = lambda params, x: module.apply({"params": params}, x)
  return _loss(jax.jit(apply) if jit else apply)


def _count_layer_tags(jaxpr):
  count = 0
  for eqn in jaxpr.eqns:
    count += eqn.primitive is tags.layer_tag_p
    for sub in jcore.jaxprs_in_params(eqn.params):
      count += _count_layer_tags(sub)
  return count


def _kfac_steps(loss_fn, params, batch, steps=2, **kwargs):
  """The updates of `steps` jitted `jkfac.kfac` steps, and the final state."""
  options = dict(learning_rate=0.1, damping=1e-2, estimation="empirical", invert_every=1)
  tx = jkfac.kfac(loss_fn, batch, **{**options, **kwargs})
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    grads = jax.grad(loss_fn)(params, batch)
    updates, state = tx.update(grads, state, params, batch=batch)
    return optax.apply_updates(params, updates), state, updates

  all_updates = []
  for _ in range(steps):
    params, state, updates = step(params, state)
    all_updates.append(updates)
  return all_updates, state


def _assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  assert_trees_close(a, b, rtol=rtol, atol=atol, check_dtype=True)


def _statistics(loss_fn, trace, params, batch, auto_register=True):
  """`_nets.collect_statistics` with the true targets, jitted (op by op is slower on CPU)."""
  return jax.jit(lambda p, b: _nets.collect_statistics(loss_fn, trace, p, b, KEY, "empirical",
                                                        auto_register))(params, batch)


def _assert_same_as_hand_tagged(auto_loss, hand_loss, params, batch, expected, steps=True):
  """Auto-registered `auto_loss` and hand-tagged `hand_loss`: same trace, statistics, steps.

  `expected` lists `(name, kind, has_bias, conv)` of the layers, in order; conv is None
  for a dense layer. With `steps`, two `jkfac.kfac` steps are compared too (each costs
  a compilation, so only some tests ask for them).
  """
  auto = layer_table.trace_layers(auto_loss, params, batch)
  hand = layer_table.trace_layers(hand_loss, params, batch, auto_register=False)
  assert [(l.name, l.kind, l.bias is not None, l.conv) for l in auto.layers] == expected
  assert auto.layers == hand.layers   # kinds, approx, weight/bias indices, shapes, conv
  assert auto.generic == hand.generic == ()
  assert auto.param_paths == hand.param_paths
  # Nothing is recognised with auto_register=False: the untagged model has only generic leaves.
  assert layer_table.trace_layers(auto_loss, params, batch, auto_register=False).layers == ()

  auto_stats = _statistics(auto_loss, auto, params, batch)
  hand_stats = _statistics(hand_loss, hand, params, batch, auto_register=False)
  assert sorted(auto_stats) == sorted(hand_stats) == sorted(name for name, *_ in expected)
  for name in auto_stats:
    assert auto_stats[name].inputs[0].shape == next(l.input_shape for l in auto.layers
                                                 if l.name == name)
    assert np.abs(auto_stats[name].output_grads[0]).max() > 0
  _assert_trees_close(auto_stats, hand_stats)
  if not steps:
    return

  auto_updates, auto_state = _kfac_steps(auto_loss, params, batch)
  hand_updates, hand_state = _kfac_steps(hand_loss, params, batch, auto_register=False)
  _assert_trees_close(auto_updates, hand_updates, rtol=1e-4, atol=1e-6)
  auto_statistics = jkfac.preconditioner_state(auto_state).statistics
  assert sorted(auto_statistics) == sorted(name for name, *_ in expected)
  _assert_trees_close(auto_statistics, jkfac.preconditioner_state(hand_state).statistics,
                      rtol=1e-4, atol=1e-6)


def _conv(strides=(1, 1), padding=((0, 0), (0, 0)), lhs=(1, 1), rhs=(1, 1)):
  return tags.ConvParams(strides, padding, lhs, rhs)


# --- flax.linen models --------------------------------------------------------------------


class FlaxModel(nn.Module):
  """A small model of plain `nn.Dense`/`nn.Conv` (tagged=False) or jkfac.flax layers."""
  case: str
  tagged: bool

  @nn.compact
  def __call__(self, x):
    Dense = jkfac.flax.Dense if self.tagged else nn.Dense
    Conv = jkfac.flax.Conv if self.tagged else nn.Conv
    flat = lambda h: h.reshape(h.shape[0], -1)
    if self.case == "dense":
      x = jnp.tanh(Dense(5)(flat(x)))
      x = jnp.tanh(Dense(4, use_bias=False)(x))
      return Dense(NUM_CLASSES)(x)
    if self.case == "conv":
      x = jnp.tanh(Conv(3, (3, 3), strides=2, padding="SAME")(x))                  # 7x7 -> 4x4
      x = jnp.tanh(Conv(4, (2, 3), padding="VALID", kernel_dilation=(2, 1),
                        use_bias=False)(x))                                         # -> 2x2
      x = jnp.tanh(Conv(2, (3, 2), strides=(2, 1), padding=((2, 1), (0, 2)),
                        input_dilation=2)(x))                                       # -> 3x4
      x = jnp.tanh(Conv(3, (2, 2), padding="SAME", use_bias=False)(x))              # even kernel
      return Dense(NUM_CLASSES)(flat(x))
    if self.case == "remat":
      x = jnp.tanh(nn.remat(Conv)(3, (3, 3), strides=2, padding="VALID")(x))        # -> 3x4
      x = jnp.tanh(nn.remat(Conv)(2, (2, 2), padding="SAME", use_bias=False)(x))
      x = jnp.tanh(nn.remat(Dense)(5)(flat(x)))
      return Dense(NUM_CLASSES)(x)
    raise ValueError(self.case)


_FLAX_CASES = {
    "dense": [("Dense_0", "dense", True, None), ("Dense_1", "dense", False, None),
              ("Dense_2", "dense", True, None)],
    "conv": [("Conv_0", "conv2d", True, _conv((2, 2), ((1, 1), (1, 1)))),
             ("Conv_1", "conv2d", False, _conv(rhs=(2, 1))),
             ("Conv_2", "conv2d", True, _conv((2, 1), ((2, 1), (0, 2)), lhs=(2, 2))),
             ("Conv_3", "conv2d", False, _conv(padding=((0, 1), (0, 1)))),
             ("Dense_0", "dense", True, None)],
    "remat": [("CheckpointConv_0", "conv2d", True, _conv((2, 2))),
              ("CheckpointConv_1", "conv2d", False, _conv(padding=((0, 1), (0, 1)))),
              ("CheckpointDense_0", "dense", True, None),
              ("Dense_0", "dense", True, None)],
}


def _flax_problem(case, dtype=jnp.float32):
  plain, tagged = FlaxModel(case, False), FlaxModel(case, True)
  batch = _batch((7, 7, 2))
  shapes = jax.eval_shape(plain.init, KEY, batch[0])["params"]
  assert shapes == jax.eval_shape(tagged.init, KEY, batch[0])["params"]
  shapes = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), shapes)
  return plain, tagged, _random_like(shapes), batch


@pytest.mark.parametrize("case, steps", [("dense", False), ("conv", True), ("remat", True)])
def test_flax_layers_are_registered_as_jkfac_flax_layers(case, steps):
  plain, tagged, params, batch = _flax_problem(case)
  _assert_same_as_hand_tagged(_flax_loss(plain), _flax_loss(tagged), params, batch,
                              _FLAX_CASES[case], steps=steps)


def test_remat_layers_are_inside_a_sub_jaxpr():
  """The remat case really hides its layers in `checkpoint` equations."""
  plain, _, params, batch = _flax_problem("remat")
  jaxpr = jax.make_jaxpr(_flax_loss(plain))(params, batch).jaxpr
  names = [eqn.primitive.name for eqn in jaxpr.eqns]
  assert names.count("checkpoint") + names.count("remat2") == 3
  closed, _ = layer_table.make_jaxpr(_flax_loss(plain), params, batch)
  assert [e.primitive for e in closed.jaxpr.eqns].count(tags.layer_tag_p) == 1   # Dense_0
  assert _count_layer_tags(closed.jaxpr) == 4


def test_layers_inside_jit_are_registered():
  plain, tagged, params, batch = _flax_problem("conv")
  auto_loss, hand_loss = _flax_loss(plain, jit=True), _flax_loss(tagged, jit=True)
  jaxpr = jax.make_jaxpr(auto_loss)(params, batch).jaxpr
  assert not any(e.primitive.name in ("dot_general", "conv_general_dilated") for e in jaxpr.eqns)
  _assert_same_as_hand_tagged(auto_loss, hand_loss, params, batch, _FLAX_CASES["conv"],
                              steps=False)


@pytest.mark.parametrize("case, steps", [("dense", True), ("conv", False)])
def test_x64_layers_are_registered(case, steps):
  """float64 parameters under x64; the float32 inputs are promoted by a cast in the layer."""
  with jax.enable_x64(True):
    plain, tagged, params, (x, labels) = _flax_problem(case, dtype=jnp.float64)
    assert all(p.dtype == jnp.float64 for p in jax.tree_util.tree_leaves(params))
    assert x.dtype == jnp.float32
    batch = (x, labels)
    _assert_same_as_hand_tagged(_flax_loss(plain), _flax_loss(tagged), params, batch,
                                _FLAX_CASES[case], steps=steps)
    auto = layer_table.trace_layers(_flax_loss(plain), params, batch)
    stats = _statistics(_flax_loss(plain), auto, params, batch)
    assert all(s.inputs[0].dtype == s.output_grads[0].dtype == jnp.float64 for s in stats.values())


# --- plain jnp / lax models ---------------------------------------------------------------


def _jnp_params():
  shapes = {"c1": {"w": (3, 3, 2, 3), "b": (3,)}, "c2": {"w": (2, 2, 3, 4)},
            "d1": {"w": (48, 5), "b": (5,)}, "d2": {"w": (5, NUM_CLASSES), "b": (NUM_CLASSES,)}}
  return _random_like(jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32),
                                             shapes, is_leaf=lambda s: isinstance(s, tuple)))


def _jnp_apply(tagged: bool):
  """conv (stride 2, SAME) -> conv (explicit pads, kernel dilation, no bias) -> dense
  (inside jax.jit) -> dense (bias added first: `b + x @ w`)."""
  register_dense = jkfac.register_dense if tagged else lambda y, *args, **kwargs: y
  register_conv2d = jkfac.register_conv2d if tagged else lambda y, *args, **kwargs: y

  @jax.jit
  def dense(h, w, b):
    return register_dense(h @ w + b, h, w, b)

  def apply(params, x):
    c1, c2, d1, d2 = params["c1"], params["c2"], params["d1"], params["d2"]
    y = lax.conv_general_dilated(x, c1["w"], (2, 2), "SAME", dimension_numbers=DN) + c1["b"]
    x = jnp.tanh(register_conv2d(y, x, c1["w"], c1["b"], window_strides=(2, 2),
                                 padding="SAME"))                                  # 7x7 -> 4x4
    y = lax.conv_general_dilated(x, c2["w"], (1, 1), ((1, 0), (2, 0)), rhs_dilation=(2, 2),
                                 dimension_numbers=DN)
    x = jnp.tanh(register_conv2d(y, x, c2["w"], padding=((1, 0), (2, 0)),
                                 rhs_dilation=(2, 2)))                             # -> 3x4
    x = x.reshape(x.shape[0], -1)
    x = jnp.tanh(dense(x, d1["w"], d1["b"]))
    return register_dense(d2["b"] + x @ d2["w"], x, d2["w"], d2["b"])

  return apply


def test_jnp_and_lax_layers_are_registered_as_hand_tagged_ones():
  params, batch = _jnp_params(), _batch((7, 7, 2))
  expected = [("c1", "conv2d", True, _conv((2, 2), ((1, 1), (1, 1)))),
              ("c2", "conv2d", False, _conv(padding=((1, 0), (2, 0)), rhs=(2, 2))),
              ("d1", "dense", True, None), ("d2", "dense", True, None)]
  _assert_same_as_hand_tagged(_loss(_jnp_apply(False)), _loss(_jnp_apply(True)), params,
                              batch, expected)


def test_jnp_x64_dense_is_registered():
  with jax.enable_x64(True):
    rng = np.random.default_rng(3)
    params = {"w": jnp.asarray(rng.standard_normal((6, 4)) / 3, jnp.float64),
              "b": jnp.asarray(rng.standard_normal(4), jnp.float64),
              "out": jnp.asarray(rng.standard_normal((4, NUM_CLASSES)), jnp.float64)}
    batch = _batch((6,), dtype=jnp.float64)

    def apply(tagged):
      def f(params, x):
        h = x @ params["w"] + params["b"]
        if tagged:
          h = jkfac.register_dense(h, x, params["w"], params["b"])
        h = jnp.tanh(h)
        y = h @ params["out"]
        return jkfac.register_dense(y, h, params["out"]) if tagged else y
      return f

    _assert_same_as_hand_tagged(_loss(apply(False)), _loss(apply(True)), params, batch,
                                [("w", "dense", True, None), ("out", "dense", False, None)],
                                steps=False)


def _einsum_params(w_shape=(3, 5, 6)):
  rng = np.random.default_rng(4)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape) / 3, jnp.float32)
  return {"w": normal(*w_shape), "b": normal(6), "out": normal(4 * 6, NUM_CLASSES)}


def _einsum_apply(tagged: bool, spec: str = "nthd,hdf->ntf"):
  """An attention output projection `(N, T, heads, head_dim) -> (N, T, features)` by
  `jnp.einsum` (untagged), or by `lax.dot_general` tagged by hand, then a dense head."""
  def apply(params, x):
    if tagged:
      y = lax.dot_general(x, params["w"], (((2, 3), (0, 1)), ((), ()))) + params["b"]
      y = jkfac.register_dense(y, x, params["w"], params["b"], in_axes=2)
    else:
      y = jnp.einsum(spec, x, params["w"]) + params["b"]
    h = jnp.tanh(y).reshape(x.shape[0], -1)
    out = h @ params["out"]
    return jkfac.register_dense(out, h, params["out"]) if tagged else out
  return apply


def test_einsum_contracting_permuted_axes_is_a_dense_layer():
  """`jnp.einsum("nthd,hdf->ntf")` contracts its axis pairs in permuted order
  (`((3, 2), (1, 0))`); the pairs still flatten `(h, d)` alike on both sides, so it is
  the `DenseGeneral` that `lax.dot_general` tagged by hand is, with the same factors."""
  params, batch = _einsum_params(), _batch((4, 3, 5))
  auto_loss = _loss(_einsum_apply(False))
  jaxpr = jax.make_jaxpr(auto_loss)(params, batch).jaxpr
  dims = [e.params["dimension_numbers"] for e in jaxpr.eqns if e.primitive.name == "dot_general"]
  assert dims[0] == (((3, 2), (1, 0)), ((), ()))
  _assert_same_as_hand_tagged(auto_loss, _loss(_einsum_apply(True)), params, batch,
                              [("w", "dense", True, None), ("out", "dense", False, None)])
  tx = jkfac.kfac(auto_loss, batch, learning_rate=0.1, damping=1e-2, estimation="empirical")
  state = tx.init(params)
  _, state = jax.jit(lambda g, s: tx.update(g, s, params, batch=batch))(
      jax.grad(auto_loss)(params, batch), state)
  state = jkfac.preconditioner_state(state)
  rows = np.asarray(batch[0]).reshape(-1, 15)     # (N T, h d)
  a = np.concatenate([rows, np.ones((len(rows), 1))], axis=1)
  np.testing.assert_allclose(state.statistics["w"]["A"] / state.ema_weight, a.T @ a / len(a),
                             rtol=1e-5, atol=1e-6)


def test_einsum_pairing_axes_crosswise_is_not_a_dense_layer():
  """`"nthd,dhf->ntf"` pairs the input's `(h, d)` with the weight's `(d, h)`: the two do
  not flatten to the same rows, so the weight is left generic (no wrong factor)."""
  params, batch = _einsum_params((5, 3, 6)), _batch((4, 3, 5))
  trace = layer_table.trace_layers(_loss(_einsum_apply(False, "nthd,dhf->ntf")), params, batch)
  assert [layer.name for layer in trace.layers] == ["out"]
  assert sorted(layer.name for layer in trace.generic) == ["b", "w"]


# --- hand tags win, shared weights ---------------------------------------------------------


class Mixed(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(jkfac.flax.Dense(5, approximation="diagonal")(x))
    x = jnp.tanh(nn.Dense(4)(x))
    return jkfac.flax.Dense(NUM_CLASSES)(x)


def test_hand_tags_win_and_are_not_tagged_twice():
  model, batch = Mixed(), _batch((6,))
  params = _random_like(jax.eval_shape(model.init, KEY, batch[0])["params"])
  loss_fn = _flax_loss(model)
  closed, _ = layer_table.make_jaxpr(loss_fn, params, batch)
  assert _count_layer_tags(closed.jaxpr) == 3          # two hand tags + Dense_1
  trace = layer_table.trace_layers(loss_fn, params, batch, approx_for=lambda name, kind: "full")
  assert [(l.name, l.approx) for l in trace.layers] == [("Dense_0", "diagonal"),
                                                         ("Dense_1", "full"),
                                                         ("Dense_2", "full")]
  assert trace.generic == ()
  description = jkfac.describe(loss_fn, params, batch, approximations={"Dense_*": "full"})
  assert {p.path: p.approximation for p in description.parameters} == {
      "Dense_0/bias": "diagonal", "Dense_0/kernel": "diagonal", "Dense_1/bias": "full",
      "Dense_1/kernel": "full", "Dense_2/bias": "full", "Dense_2/kernel": "full"}
  # A hand tag without the bias: the kernel stays claimed, the bias is a generic parameter.
  def partly_tagged(params, batch):
    x, labels = batch
    h = jkfac.register_dense(x @ params["w"], x, params["w"], approximation="full") + params["b"]
    logits = jkfac.register_softmax_cross_entropy(jnp.tanh(h) @ params["out"], labels)
    return _nets.cross_entropy(logits, labels)
  params = {"w": params["Dense_0"]["kernel"], "b": params["Dense_0"]["bias"],
            "out": jnp.ones((5, NUM_CLASSES)) / 5}
  trace = layer_table.trace_layers(partly_tagged, params, batch)
  assert [(l.name, l.approx, l.bias) for l in trace.layers] == [("w", "full", None),
                                                                 ("out", "kron", None)]
  assert [l.name for l in trace.generic] == ["b"]


class SharedDense(nn.Module):
  """The same `nn.Dense` called twice (its weight is in two layers), then a plain Dense."""
  @nn.compact
  def __call__(self, x):
    shared = nn.Dense(x.shape[-1])
    x = shared(jnp.tanh(shared(x)))
    return nn.Dense(NUM_CLASSES)(jnp.tanh(x))


def test_weight_used_twice_is_one_multi_use_layer():
  """One kron_indep layer for the shared weight; the first `jkfac.kfac` step (float64) is
  `-lr` times each layer's Kronecker solve, the shared layer's factors over both uses."""
  model, batch = SharedDense(), _batch((4,), n=8)
  params = _random_like(jax.eval_shape(model.init, KEY, batch[0])["params"])
  loss_fn = _flax_loss(model)
  closed, _ = layer_table.make_jaxpr(loss_fn, params, batch)
  assert _count_layer_tags(closed.jaxpr) == 3
  rows = {p.path: (p.layer, p.kind, p.approximation) for p in
          jkfac.describe(loss_fn, params, batch).parameters}
  assert rows == {"Dense_0/bias": ("Dense_0", "dense", "kron_indep"),
                  "Dense_0/kernel": ("Dense_0", "dense", "kron_indep"),
                  "Dense_1/bias": ("Dense_1", "dense", "kron"),
                  "Dense_1/kernel": ("Dense_1", "dense", "kron")}

  lr, damping = 0.05, 1e-1
  with jax.enable_x64(True):
    params64 = jax.tree_util.tree_map(lambda p: p.astype(jnp.float64), params)
    batch64 = (batch[0].astype(jnp.float64), batch[1])
    updates, state = _kfac_steps(loss_fn, params64, batch64, steps=1, learning_rate=lr,
                                 damping=damping, warm_start=False)
    grads = jax.jit(jax.grad(loss_fn))(params64, batch64)
    calls = _nets.linen_layer_calls(lambda x: model.apply({"params": params64}, x), batch64[0],
                                    lambda logits: _nets.cross_entropy(logits, batch[1]),
                                    (nn.Dense,))
  assert jkfac.preconditioner_state(state).statistics["Dense_0"]["A"].shape == (5, 5)
  # kron_indep by hand: A averages [a, 1] over examples and both uses, G sums over them.
  stack = lambda uses, i: np.stack([np.asarray(use[i]) for use in uses], axis=1)   # (N, 2, d)
  assert len(calls["Dense_0"]) == 2
  factors = {"Dense_0": _nets.empirical_kron_factors(stack(calls["Dense_0"], 0),
                                                     stack(calls["Dense_0"], 1)),
             "Dense_1": _nets.empirical_kron_factors(*calls["Dense_1"][0])}
  for name, (A, G) in factors.items():
    expected = -lr * _nets.kron_solve(A, G, _nets.layer_matrix(grads, name), damping)
    np.testing.assert_allclose(_nets.layer_matrix(updates[0], name), expected, rtol=1e-7,
                               atol=1e-10, err_msg=name)


def test_bias_used_by_two_layers_is_not_registered_twice():
  """A bias shared by two dense layers (with their own weights) must not break the trace.

  Fails with jkfac at the time of writing: both recognised layers take the bias, and
  `trace_layers` raises "Parameter 'b' is used by two K-FAC layer tags", although the
  same model works with auto_register=False.
  """
  rng = np.random.default_rng(2)
  params = {"w1": jnp.asarray(rng.standard_normal((4, 3)) / 2, jnp.float32),
            "w2": jnp.asarray(rng.standard_normal((3, 3)) / 2, jnp.float32),
            "b": jnp.asarray(rng.standard_normal(3) / 2, jnp.float32)}
  batch = _batch((4,))
  loss_fn = _loss(lambda p, x: jnp.tanh(x @ p["w1"] + p["b"]) @ p["w2"] + p["b"])
  assert [l.name for l in layer_table.trace_layers(loss_fn, params, batch,
                                              auto_register=False).generic] == ["b", "w1", "w2"]
  trace = layer_table.trace_layers(loss_fn, params, batch)
  assert "b" in [l.name for l in trace.generic]   # like a shared weight: a generic leaf
  assert all(l.bias is None for l in trace.layers)
  rows = {p.path: p.kind for p in jkfac.describe(loss_fn, params, batch).parameters}
  assert rows["b"] == "generic"


# --- the seed flow, with jkfac names --------------------------------------------------------


def _seed_pool(x):
  return lax.reduce_window(x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1), "SAME")


def _seed_lax_loss(params, batch):
  """The seed's convnet in plain lax, registered by hand with `layer_collection`."""
  x, labels = batch
  conv0, conv1, fc = params["conv0"], params["conv1"], params["fc"]
  pre0 = lax.conv_general_dilated(x, conv0["w"], (1, 1), "SAME", dimension_numbers=DN)
  pre0 = pre0 + conv0["b"]
  pre0 = layer_collection.register_conv2d((conv0["w"], conv0["b"]), (1, 1, 1, 1), "SAME", x,
                                          pre0, approx=layer_collection.APPROX_DIAGONAL_NAME)
  h = _seed_pool(jax.nn.relu(pre0))
  pre1 = lax.conv_general_dilated(h, conv1["w"], (1, 1), "SAME", dimension_numbers=DN)
  pre1 = layer_collection.register_conv2d((conv1["w"], conv1["b"]), (1, 1, 1, 1), "SAME", h,
                                          pre1 + conv1["b"])
  h = _seed_pool(jax.nn.relu(pre1))
  h = h.reshape(h.shape[0], -1)
  logits = layer_collection.register_fully_connected((fc["w"], fc["b"]), h,
                                                     h @ fc["w"] + fc["b"])
  logits = layer_collection.register_categorical_predictive_distribution(logits, labels)
  return _nets.cross_entropy(logits, labels)


class SeedConvNet(nn.Module):
  tagged: bool

  @nn.compact
  def __call__(self, x):
    pool = lambda h: nn.max_pool(h, (3, 3), strides=(2, 2), padding="SAME")
    if self.tagged:
      x = jkfac.flax.Conv(16, (5, 5), padding="SAME", approximation="diagonal")(x)
      x = jkfac.flax.Conv(16, (5, 5), padding="SAME")(pool(nn.relu(x)))
      dense = jkfac.flax.Dense
    else:
      x = nn.Conv(16, (5, 5), padding="SAME")(x)
      x = nn.Conv(16, (5, 5), padding="SAME")(pool(nn.relu(x)))
      dense = nn.Dense
    x = pool(nn.relu(x))
    return dense(10)(x.reshape(x.shape[0], -1))


def test_seed_flow_with_layer_collection_matches_flax_and_auto_registration():
  batch = _batch((8, 8, 3), n=4, classes=10)
  flax_params = _random_like(jax.eval_shape(SeedConvNet(True).init, KEY, batch[0])["params"])
  to_lax = lambda p: {"conv0": {"w": p["Conv_0"]["kernel"], "b": p["Conv_0"]["bias"]},
                      "conv1": {"w": p["Conv_1"]["kernel"], "b": p["Conv_1"]["bias"]},
                      "fc": {"w": p["Dense_0"]["kernel"], "b": p["Dense_0"]["bias"]}}
  lax_params = to_lax(flax_params)
  flax_loss, auto_loss = _flax_loss(SeedConvNet(True)), _flax_loss(SeedConvNet(False))
  np.testing.assert_allclose(_seed_lax_loss(lax_params, batch), flax_loss(flax_params, batch),
                             rtol=1e-5)
  trace = layer_table.trace_layers(_seed_lax_loss, lax_params, batch)
  assert [(l.name, l.kind, l.approx) for l in trace.layers] == [
      ("conv0", "conv2d", "diagonal"), ("conv1", "conv2d", "kron"), ("fc", "dense", "kron")]
  assert trace.generic == ()

  lax_updates, lax_state = _kfac_steps(_seed_lax_loss, lax_params, batch)
  flax_updates, _ = _kfac_steps(flax_loss, flax_params, batch)
  auto_updates, auto_state = _kfac_steps(auto_loss, flax_params, batch,
                                         approximations={"Conv_0": "diagonal"})
  assert set(jkfac.preconditioner_state(lax_state).statistics["conv0"]) == {"diagonal"}
  assert set(jkfac.preconditioner_state(auto_state).statistics["Conv_0"]) == {"diagonal"}
  assert set(jkfac.preconditioner_state(auto_state).statistics["Conv_1"]) == {"A", "G"}
  for lax_u, flax_u, auto_u in zip(lax_updates, flax_updates, auto_updates):
    assert np.abs(jax.tree_util.tree_leaves(lax_u)[0]).max() > 0
    _assert_trees_close(lax_u, to_lax(flax_u), rtol=1e-4, atol=1e-7)
    _assert_trees_close(auto_u, flax_u, rtol=1e-4, atol=1e-7)


# --- jkfac.value_and_grad --------------------------------------------------------------------


def _generic_problem(n=16):
  model, batch = _nets.WithGeneric(NUM_CLASSES), _batch((5,), n=n)
  params = _random_like(jax.eval_shape(model.init, KEY, batch[0])["params"])
  params["temp"] = jnp.asarray(1.3, jnp.float32)
  return model, params, batch


def test_fused_value_and_grad_matches_unfused_update():
  model, params, batch = _generic_problem()
  loss_fn = _flax_loss(model)
  tx = jkfac.kfac(loss_fn, batch, learning_rate=0.1, damping=1e-1, invert_every=1)

  @jax.jit
  def unfused(params, state):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, state = tx.update(grads, state, params, batch=batch)
    return optax.apply_updates(params, updates), state, (loss, grads, updates)

  @jax.jit
  def fused(params, state):
    loss, grads, curvature = jkfac.value_and_grad(loss_fn)(params, batch)
    updates, state = tx.update(grads, state, params, batch=batch, curvature=curvature)
    return optax.apply_updates(params, updates), state, (loss, grads, updates)

  p1, s1, p2, s2 = params, tx.init(params), params, tx.init(params)
  assert {"LayerNorm_0/scale", "LayerNorm_0/bias", "temp"} <= set(
      jkfac.preconditioner_state(s1).statistics)
  for _ in range(2):
    p1, s1, out1 = unfused(p1, s1)
    p2, s2, out2 = fused(p2, s2)
    _assert_trees_close(out1, out2, rtol=1e-5, atol=1e-7)
    _assert_trees_close(jkfac.preconditioner_state(s1).statistics,
                        jkfac.preconditioner_state(s2).statistics, rtol=1e-5, atol=1e-7)
  assert float(jnp.abs(jkfac.preconditioner_state(s1).statistics["temp"]["diagonal"]).max()) > 0


@pytest.mark.parametrize("grad_auto, tx_auto", [(False, True), (True, False)])
def test_fused_value_and_grad_with_other_auto_register_raises(grad_auto, tx_auto):
  model, params, batch = _generic_problem()
  loss_fn = _flax_loss(model)
  tx = jkfac.kfac(loss_fn, batch, learning_rate=0.1, damping=1e-1, auto_register=tx_auto)
  state = tx.init(params)
  _, grads, curvature = jkfac.value_and_grad(loss_fn, auto_register=grad_auto)(params, batch)
  with pytest.raises(ValueError, match="auto_register"):
    tx.update(grads, state, params, batch=batch, curvature=curvature)


@jax.custom_vjp
def _quantised_dense(x, w):
  """`x @ w` rounded to quarters, with a straight-through backward rule (its primal
  derivative is zero almost everywhere)."""
  return jnp.round(4 * (x @ w)) / 4


def _quantised_dense_fwd(x, w):
  return _quantised_dense(x, w), (x, w)


def _quantised_dense_bwd(residuals, g):
  x, w = residuals
  return g @ w.T, x.T @ g


_quantised_dense.defvjp(_quantised_dense_fwd, _quantised_dense_bwd)


def _quantised_problem():
  rng = np.random.default_rng(5)
  params = {"w1": jnp.asarray(rng.standard_normal((6, 4)), jnp.float32),
            "w2": jnp.asarray(rng.standard_normal((4, NUM_CLASSES)), jnp.float32)}
  apply = lambda params, x: jnp.tanh(_quantised_dense(x, params["w1"])) @ params["w2"]
  return params, _batch((6,)), _loss(apply)


def test_layer_inside_custom_vjp_keeps_the_rule():
  """A layer inside a `jax.custom_vjp` is not recognised (a tag there would differentiate
  its primal code): `jkfac.value_and_grad` and K-FAC's update see the user's rule."""
  params, batch, loss_fn = _quantised_problem()
  expected = jax.value_and_grad(loss_fn)(params, batch)
  loss, grads, curvature = jkfac.value_and_grad(loss_fn)(params, batch)
  assert np.abs(expected[1]["w1"]).max() > 0
  _assert_trees_close((loss, grads), expected)
  trace = layer_table.trace_layers(loss_fn, params, batch)
  assert [layer.name for layer in trace.layers] == ["w2"]
  assert [layer.name for layer in trace.generic] == ["w1"]
  tx = jkfac.kfac(loss_fn, batch, learning_rate=0.1, damping=1e-1, estimation="empirical")
  with pytest.warns(layer_table.GenericBlockWarning, match="w1"):
    state = tx.init(params)
  _, state = tx.update(grads, state, params, batch=batch, curvature=curvature)
  diagonal = jkfac.preconditioner_state(state).statistics["w1"]["diagonal"]
  assert np.abs(diagonal).max() > 0   # the straight-through gradients, not zeros


def test_hand_tag_inside_custom_jvp_warns():
  """A hand tag inside a `jax.custom_jvp` is followed into its primal code, with a warning
  that the rule is not used there."""
  @jax.custom_jvp
  def layer(x, w):
    return jnp.tanh(jkfac.register_dense(x @ w, x, w))

  layer.defjvp(lambda primals, tangents: (layer(*primals), jnp.zeros((4, 4))))
  params, batch, _ = _quantised_problem()
  loss_fn = _loss(lambda params, x: layer(x, params["w1"]) @ params["w2"])
  with pytest.warns(UserWarning, match="inside a jax.custom_vjp / jax.custom_jvp function"):
    trace = layer_table.trace_layers(loss_fn, params, batch)
  assert [layer.name for layer in trace.layers] == ["w1", "w2"]


# --- Flax NNX ---------------------------------------------------------------------------------


def test_nnx_layers_are_registered():
  """`nnx.Conv`/`nnx.LayerNorm`/`nnx.Linear` in a loss that merges a split model: found,
  with the statistics and `jkfac.kfac` steps of the same model tagged by hand."""
  from flax import nnx

  class Net(nnx.Module):
    def __init__(self, tagged, rngs):
      self.tagged = tagged
      self.conv = nnx.Conv(2, 4, (3, 3), strides=2, rngs=rngs)
      self.norm = nnx.LayerNorm(4, rngs=rngs)
      self.bare = nnx.LayerNorm(4, use_scale=False, use_bias=False, rngs=rngs)
      self.linear = nnx.Linear(4 * 3 * 3, NUM_CLASSES, rngs=rngs)

    def __call__(self, x):
      if not self.tagged:
        x = self.norm(nnx.relu(self.conv(x)))
        return self.linear(x.reshape(x.shape[0], -1))
      kernel, bias = self.conv.kernel[...], self.conv.bias[...]
      y = jkfac.register_conv2d(self.conv(x), x, kernel, bias, window_strides=(2, 2),
                                padding="SAME")
      x_hat = self.bare(nnx.relu(y))
      scale, shift = self.norm.scale[...], self.norm.bias[...]
      x = jkfac.register_scale_and_shift(x_hat * scale + shift, x_hat, scale, shift)
      x = x.reshape(x.shape[0], -1)
      return jkfac.register_dense(self.linear(x), x, self.linear.kernel[...],
                                  self.linear.bias[...])

  batch, losses = _batch((6, 6, 2)), []
  for tagged in (False, True):
    graphdef, params = nnx.split(Net(tagged, nnx.Rngs(0)), nnx.Param)
    losses.append(_loss(lambda p, x, graphdef=graphdef: nnx.merge(graphdef, p)(x)))
  params = _random_like(params)
  _assert_same_as_hand_tagged(*losses, params, batch,
                              [("conv", "conv2d", True, _conv((2, 2), ((0, 1), (0, 1)))),
                               ("norm", "scale_and_shift", True, None),
                               ("linear", "dense", True, None)])


# --- K-FAC-reduce ------------------------------------------------------------------------------


def test_kron_reduce_factors_average_inputs_and_sum_output_gradients():
  """A = mean_n abar_n abar_n^T with abar the patch mean; G = sum_n gsum_n gsum_n^T."""
  model = nn.Conv(3, (3, 3), strides=2)
  batch = _batch((7, 7, 2))
  params = {"Conv_0": model.init(KEY, batch[0])["params"]}
  loss_fn = _loss(lambda p, x: model.apply({"params": p["Conv_0"]}, x).reshape(
      x.shape[0], -1)[:, :3])
  trace = layer_table.trace_layers(loss_fn, params, batch,
                                   approx_for=lambda name, kind: "kron_reduce")
  stats = _nets.collect_statistics(loss_fn, trace, params, batch, KEY, "empirical")["Conv_0"]
  tx = jkfac.precondition(loss_fn, batch, damping=1e-3, approximations={"Conv_0": "kron_reduce"},
                          estimation="empirical", cov_ema_decay=0.0)
  state = tx.init(params)
  _, state = jax.jit(lambda g, s: tx.update(g, s, params, batch=batch))(
      jax.grad(loss_fn)(params, batch), state)
  layer = trace.layers[0]
  patches = np.asarray(lax.conv_general_dilated_patches(
      batch[0], (3, 3), (2, 2), "SAME", dimension_numbers=DN))      # features (c, kh, kw)
  patches = patches.reshape(*patches.shape[:3], 2, 9).swapaxes(-1, -2).reshape(
      patches.shape[0], -1, 18)                                     # features (kh, kw, c)
  a = np.concatenate([patches.mean(axis=1), np.ones((patches.shape[0], 1))], axis=1)
  g = np.asarray(stats.output_grads[0][0]).reshape(patches.shape[0], -1, 3).sum(axis=1)
  assert layer.approx == "kron_reduce"
  np.testing.assert_allclose(state.statistics["Conv_0"]["A"], a.T @ a / len(a), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(state.statistics["Conv_0"]["G"], g.T @ g, rtol=1e-5, atol=1e-7)


# --- 1-D convolutions ----------------------------------------------------------------------------


@pytest.mark.parametrize("strides,padding,dilation", [(2, "SAME", 1), (1, "VALID", 2)])
def test_conv1d_is_registered_as_hand_tagged(strides, padding, dilation):
  """`nn.Conv` with a 1-D kernel is found as "conv1d" (a 2-D conv of height 1), with the
  same statistics and updates as `layer_collection.register_conv1d` by hand; its
  patches times the kernel matrix reproduce the conv."""
  conv = nn.Conv(5, (3,), strides=strides, padding=padding, kernel_dilation=dilation)
  batch = _batch((11, 4))
  params = {"Conv_0": _random_like(jax.eval_shape(conv.init, KEY, batch[0])["params"])}

  def auto_apply(p, x):
    return conv.apply({"params": p["Conv_0"]}, x).reshape(x.shape[0], -1)[:, :NUM_CLASSES]

  def hand_apply(p, x):
    y = conv.apply({"params": p["Conv_0"]}, x)
    y = layer_collection.register_conv1d((p["Conv_0"]["kernel"], p["Conv_0"]["bias"]),
                                         (1, strides, 1), padding, x, y,
                                         dilations=(1, dilation, 1))
    return y.reshape(x.shape[0], -1)[:, :NUM_CLASSES]

  auto, hand = _loss(auto_apply), _loss(hand_apply)
  auto_trace = layer_table.trace_layers(auto, params, batch)
  hand_trace = layer_table.trace_layers(hand, params, batch)
  assert auto_trace == hand_trace and auto_trace.layers[0].kind == "conv1d"
  auto_stats = _statistics(auto, auto_trace, params, batch)
  _assert_trees_close(auto_stats, _statistics(hand, hand_trace, params, batch))
  layer = auto_trace.layers[0]
  rows = _nets.input_rows(layer, auto_stats["Conv_0"].inputs[0])
  matrix = layers.param_matrix(layer, params["Conv_0"]["kernel"], params["Conv_0"]["bias"])
  expected = conv.apply({"params": params["Conv_0"]}, batch[0])
  np.testing.assert_allclose(rows @ matrix, expected.reshape(rows.shape[0], -1, 5), rtol=1e-5,
                             atol=1e-5)
  _assert_trees_close(_kfac_steps(auto, params, batch)[0], _kfac_steps(hand, params, batch)[0])


def test_dense_of_parameters_alone_is_not_a_layer():
  """`p @ w` with both parameters has no examples: `w` stays generic, the data layer not."""
  rng = np.random.default_rng(7)
  params = {"w": jnp.asarray(rng.standard_normal((4, NUM_CLASSES)), jnp.float32),
            "p": jnp.asarray(rng.standard_normal((2, 5)), jnp.float32),
            "v": jnp.asarray(rng.standard_normal((5, NUM_CLASSES)), jnp.float32)}
  apply = lambda params, x: x @ params["w"] + (params["p"] @ params["v"]).sum(axis=0)
  trace = layer_table.trace_layers(_loss(apply), params, _batch((4,)))
  assert [layer.name for layer in trace.layers] == ["w"]
  assert sorted(layer.name for layer in trace.generic) == ["p", "v"]


def _position_offset_apply(tagged: bool):
  """A dense layer `(N, T, 3) -> (N, T, 4)` plus a parameter `b` of shape `(T,) = (4,)`
  broadcast along the positions, not the features (a per-position offset); a dense head."""
  def apply(params, x):
    y = x @ params["w"]
    y = jkfac.register_dense(y, x, params["w"]) if tagged else y
    y = y + jnp.broadcast_to(params["b"][:, None], y.shape)
    h = jnp.tanh(y).reshape(x.shape[0], -1)
    out = h @ params["out"]
    return jkfac.register_dense(out, h, params["out"]) if tagged else out
  return apply


def test_parameter_broadcast_along_positions_is_no_bias():
  """A 1-D parameter the size of the features, broadcast along another axis, is no bias
  of the layer: it stays generic, as when the layer is tagged by hand without it."""
  rng = np.random.default_rng(8)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape) / 2, jnp.float32)
  params = {"w": normal(3, 4), "b": normal(4), "out": normal(16, NUM_CLASSES)}
  batch = _batch((4, 3))
  auto_loss, hand_loss = _loss(_position_offset_apply(False)), _loss(_position_offset_apply(True))
  auto = layer_table.trace_layers(auto_loss, params, batch)
  hand = layer_table.trace_layers(hand_loss, params, batch, auto_register=False)
  assert [(layer.name, layer.bias) for layer in auto.layers] == [("w", None), ("out", None)]
  assert auto.layers == hand.layers and auto.generic == hand.generic
  assert {p.path: p.kind for p in jkfac.describe(auto_loss, params, batch).parameters} == {
      "w": "dense", "b": "generic", "out": "dense"}
  auto_updates, auto_state = _kfac_steps(auto_loss, params, batch)
  hand_updates, hand_state = _kfac_steps(hand_loss, params, batch, auto_register=False)
  _assert_trees_close(auto_updates, hand_updates, rtol=1e-4, atol=1e-6)
  _assert_trees_close(jkfac.preconditioner_state(auto_state).statistics,
                      jkfac.preconditioner_state(hand_state).statistics, rtol=1e-4, atol=1e-6)


def test_a_layer_over_a_closed_over_table_is_no_layer_with_examples():
  """`coords @ w` over a constant table (a position-bias MLP; closed over, or built from
  `jnp.arange`) has no example axis: as a dense layer its rows would be taken for
  examples and its G summed over the batch's examples first. It stays generic (before: a
  crash in the statistics). The weight used on the table and on the batch moves the loss
  through the table's use too, no layer, so it is generic as well (`patterns.leaks`).
  Oracle: duplicating every example leaves the exact Fisher, so the factors of `out`,
  unchanged."""
  rng = np.random.default_rng(9)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape) / 2, jnp.float32)
  coords, table = normal(4, 2), normal(7, 3)
  params = {"cpb": normal(2, 3), "pe": normal(1, 3), "w": normal(3, 3),
            "out": normal(12, NUM_CLASSES)}

  def apply(params, x):  # x: (N, 4, 3)
    positions = jnp.arange(4.0)[:, None] / 4
    h = jnp.tanh(x @ params["w"] + (table @ params["w"]).mean(0) + coords @ params["cpb"]
                 + positions @ params["pe"])
    return h.reshape(h.shape[0], -1) @ params["out"]

  loss_fn, batch = _loss(apply), _batch((4, 3))
  kinds = {p.path: p.kind for p in jkfac.describe(loss_fn, params, batch).parameters}
  assert kinds == {"cpb": "generic", "pe": "generic", "w": "generic", "out": "dense"}
  def factors(batch):
    tx = jkfac.precondition(loss_fn, batch, damping=0.1, estimation="exact")
    grads = jax.grad(loss_fn)(params, batch)
    _, state = jax.jit(lambda: tx.update(grads, tx.init(params), params, batch=batch))()
    return state.statistics["out"]

  doubled = jax.tree_util.tree_map(lambda x: jnp.concatenate([x, x]), batch)
  _assert_trees_close(factors(doubled), factors(batch), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("stats_in_batch", [False, True])
def test_spectral_norms_power_iteration_is_no_layer(stats_in_batch):
  """`nn.SpectralNorm(nn.Dense)`: `u @ kernel.T` of the power iteration, from the
  statistics and the kernel alone, has no examples (before: a Kronecker block whose input
  factor was `u uᵀ`, rank one and the same for every batch). The kernel's data use is
  `x @ (kernel / σ)`, no layer of a parameter: the kernel gets a diagonal block, said.
  With the statistics in the batch, `u` is no constant, but the kernel also moves the
  loss through `kernel / σ`, no layer (before: the rank-one block again)."""
  module = nn.SpectralNorm(nn.Dense(3))
  x = jax.random.normal(KEY, (16, 5))
  variables = module.init(KEY, x, update_stats=False)

  def loss_fn(params, batch):
    stats = batch["stats"] if stats_in_batch else variables["batch_stats"]
    out, _ = module.apply({"params": params, "batch_stats": stats}, batch["x"],
                          update_stats=True, mutable=["batch_stats"])
    jkfac.register_squared_error(out, batch["y"])
    return 0.5 * jnp.mean(jnp.sum((out - batch["y"]) ** 2, -1))

  batch = {"x": x, "y": jnp.zeros((16, 3))}
  if stats_in_batch:
    batch["stats"] = variables["batch_stats"]
  assert layer_table.trace_layers(loss_fn, variables["params"], batch).layers == ()
  with pytest.warns(jkfac.GenericBlockWarning, match="kernel"):
    jkfac.precondition(loss_fn, batch, damping=1e-3).init(variables["params"])


@pytest.mark.parametrize("regulariser_only", [False, True])
def test_weight_moving_the_loss_through_a_non_layer_use_is_generic(regulariser_only):
  """`(x @ w) * sum(w²)`: the dense use of `w` is a layer, but `w` also moves the loss's
  input through the scale `sum(w²)`, which its Kronecker block would miss: `w` is left
  generic. The same `sum(w²)` added to the returned loss only (an L2 regulariser) moves
  no loss input: `w` keeps its dense block."""
  rng = np.random.default_rng(11)
  params = {"w": jnp.asarray(rng.standard_normal((4, 5)), jnp.float32),
            "out": jnp.asarray(rng.standard_normal((5, NUM_CLASSES)), jnp.float32)}
  scale = lambda w: 1.0 if regulariser_only else jnp.sum(w ** 2)
  apply = lambda params, x: jnp.tanh((x @ params["w"]) * scale(params["w"])) @ params["out"]
  data_loss = _loss(apply)
  loss_fn = lambda params, batch: data_loss(params, batch) + 1e-3 * jnp.sum(params["w"] ** 2)
  kinds = {p.path: p.kind for p in jkfac.describe(loss_fn, params, _batch((4,))).parameters}
  assert kinds == {"w": "dense" if regulariser_only else "generic", "out": "dense"}
