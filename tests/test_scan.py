"""Layers in `scan`s and layers used several times: stacked layers and `kron_indep`.

A scan over stacked parameters (`nn.scan` over layers) must give every slice the
block that the same layer gets when the loop is unrolled into separate parameters.
A scan over time with a broadcast weight, and a weight applied several times, make
one multi-use layer: its factors are checked against factors built by hand
(`kron_indep`: A averages over every use, G sums), and its diagonal and full blocks
against per-example gradients.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jkfac
from jkfac import layer_table
from tests import _nets

KEY = jax.random.PRNGKey(0)
NUM_CLASSES = 3
DEPTH = 3
DN = ("NHWC", "HWIO", "NHWC")

_loss = _nets.classifier_loss
_batch = functools.partial(_nets.random_batch, n=6)


def _one_step(loss_fn, params, batch, **kwargs):
  """`(updates, state)` of one jitted K-FAC step whose EMA is the batch statistic."""
  tx = jkfac.precondition(loss_fn, batch, damping=1e-2, cov_ema_decay=0.0, invert_every=1,
                          estimation="empirical", **kwargs)
  grads = jax.grad(loss_fn)(params, batch)
  return jax.jit(lambda g, s, p: tx.update(g, s, p, batch=batch))(grads, tx.init(params), params)


def _close(actual, expected, rtol=1e-4, atol=1e-6):
  np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=rtol, atol=atol)


# --- nn.scan over layers: stacked layers --------------------------------------------------------


class _ScanBlock(nn.Module):
  conv: bool

  @nn.compact
  def __call__(self, x, _):
    layer = nn.Conv(x.shape[-1], (3, 3)) if self.conv else nn.Dense(x.shape[-1])
    return jnp.tanh(layer(x)), None


class _Stacked(nn.Module):
  """A layer, `DEPTH` layers of one shape under `nn.scan` (and `nn.remat`), a head."""
  conv: bool

  @nn.compact
  def __call__(self, x):
    x = (nn.Conv(4, (3, 3)) if self.conv else nn.Dense(4))(x)
    block = nn.scan(nn.remat(_ScanBlock), variable_axes={"params": 0},
                    split_rngs={"params": True}, length=DEPTH)
    x, _ = block(self.conv)(x, None)
    return nn.Dense(NUM_CLASSES)(x.reshape(x.shape[0], -1))


def _layer(conv, x, p):
  if conv:
    return lax.conv_general_dilated(x, p["kernel"], (1, 1), "SAME", dimension_numbers=DN) + (
        p["bias"])
  return x @ p["kernel"] + p["bias"]


def _unrolled(conv):
  """The same network as a Python loop over separate parameters, in plain jnp/lax.

  `apply(params, x, perturbations)` adds `perturbations[name]` to layer `name`'s output
  and returns `(logits, {name: its input})` (the untagged hand-written pass for oracles).
  """
  def apply(params, x, perturbations=None):
    inputs = {}

    def layer(name, x, conv=conv):
      inputs[name] = x
      y = _layer(conv, x, params[name])
      return y if perturbations is None else y + perturbations[name]

    x = layer("first", x)
    for i in range(DEPTH):
      x = jnp.tanh(layer(f"block_{i}", x))
    logits = layer("head", x.reshape(x.shape[0], -1), False)
    return logits if perturbations is None else (logits, inputs)
  return apply


def _unrolled_params(conv, params):
  inner = params["ScanCheckpoint_ScanBlock_0"]["Conv_0" if conv else "Dense_0"]
  unrolled = {f"block_{i}": jax.tree_util.tree_map(lambda p, i=i: p[i], inner)
              for i in range(DEPTH)}
  return {"first": params["Conv_0" if conv else "Dense_0"], "head": params["Dense_0" if conv
                                                                           else "Dense_1"],
          **unrolled}


@pytest.mark.parametrize("conv", [False, True], ids=["dense", "conv"])
@pytest.mark.parametrize("approx", [None, "diagonal", "ekfac"])
def test_stacked_layers_match_the_unrolled_loop(conv, approx):
  batch = _batch((5, 5, 2) if conv else (4,))
  model = _Stacked(conv)
  params = model.init(KEY, batch[0])["params"]
  stacked_loss = _loss(lambda p, x: model.apply({"params": p}, x))
  unrolled_loss = _loss(_unrolled(conv))
  unrolled_params = _unrolled_params(conv, params)
  np.testing.assert_allclose(stacked_loss(params, batch), unrolled_loss(unrolled_params, batch),
                             rtol=1e-5)
  name = "ScanCheckpoint_ScanBlock_0/" + ("Conv_0" if conv else "Dense_0")
  kind = "conv2d" if conv else "dense"

  trace = layer_table.trace_layers(stacked_loss, params, batch)
  scanned = next(layer for layer in trace.layers if layer.name == name)
  assert (scanned.kind, scanned.stack, scanned.scans) == (kind, (DEPTH,), (("stack",),))
  assert not trace.generic

  stacked_updates, stacked_state = _one_step(
      stacked_loss, params, batch, approximations=approx and {name: approx})
  unrolled_updates, unrolled_state = _one_step(
      unrolled_loss, unrolled_params, batch, approximations=approx and {"block_*": approx})
  for i in range(DEPTH):
    for factor, value in unrolled_state.statistics[f"block_{i}"].items():
      _close(stacked_state.statistics[name][factor][i], value)
  # EKFAC's batched eigh (stacked) and unbatched eigh round apart at about 1e-6 of the
  # largest update.
  _close_trees(_unrolled_params(conv, stacked_updates), unrolled_updates,
               atol=1e-5 if approx == "ekfac" else 1e-6)


def _close_trees(actual, expected, atol=1e-6):
  jax.tree_util.tree_map(lambda a, e: _close(a, e, rtol=2e-4, atol=atol), actual, expected)


def test_stacked_layers_describe_and_first_kfac_step_is_the_kronecker_solve():
  """The first `jkfac.kfac` step (float64, inverting at once) gives every slice of the
  stacked layer, and the other layers, `-lr` times its Kronecker solve, with A and G from
  the inputs and output gradients of the unrolled loop written by hand."""
  lr, damping = 0.1, 1e-2
  batch = _batch((4,))
  model = _Stacked(conv=False)
  params = model.init(KEY, batch[0])["params"]
  loss_fn = _loss(lambda p, x: model.apply({"params": p}, x))
  rows = {p.path: (p.kind, p.approximation, p.factors) for p in
          jkfac.describe(loss_fn, params, batch).parameters}
  assert rows["ScanCheckpoint_ScanBlock_0/Dense_0/kernel"] == ("dense", "kron", "A 3x5x5, G 3x4x4")
  with jax.enable_x64(True):
    params = jax.tree_util.tree_map(lambda p: p.astype(jnp.float64), params)
    batch = (batch[0].astype(jnp.float64), batch[1])
    tx = jkfac.kfac(loss_fn, batch, learning_rate=lr, damping=damping, invert_every=1,
                    estimation="empirical", warm_start=False)
    grads = jax.jit(jax.grad(loss_fn))(params, batch)
    updates, _ = jax.jit(lambda g: tx.update(g, tx.init(params), params, batch=batch))(grads)
    unrolled = _unrolled_params(False, params)
    zeros = {name: jnp.zeros((batch[0].shape[0], p["bias"].shape[0]))
             for name, p in unrolled.items()}

    def mean_loss(perturbations):
      logits, inputs = _unrolled(False)(unrolled, batch[0], perturbations)
      return _nets.cross_entropy(logits, batch[1]), inputs

    output_grads, inputs = jax.jit(jax.grad(mean_loss, has_aux=True))(zeros)
  unrolled_grads = _unrolled_params(False, grads)
  unrolled_updates = _unrolled_params(False, updates)
  for name in unrolled:
    A, G = _nets.empirical_kron_factors(inputs[name], output_grads[name])
    expected = -lr * _nets.kron_solve(A, G, _nets.layer_matrix(unrolled_grads, name), damping)
    _close(_nets.layer_matrix(unrolled_updates, name), expected, rtol=1e-7, atol=1e-10)


# --- a scan over time: one weight, many uses ---------------------------------------------------


def _rnn_params(d_in=3, width=4, seed=2):
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape) / np.sqrt(shape[0]), jnp.float32)
  return {"hh": {"kernel": normal(width, width), "bias": normal(width) * 0.3},
          "xh": {"kernel": normal(d_in, width)},
          "out": {"kernel": normal(width, NUM_CLASSES), "bias": normal(NUM_CLASSES) * 0.3}}


def _cell(params, h, x, perturbation=0.0):
  y = h @ params["hh"]["kernel"] + params["hh"]["bias"] + perturbation
  return jnp.tanh(y + x @ params["xh"]["kernel"])


def _rnn_scan(params, xs):
  """`xs` `(batch, time, d)`; the cell's weights are constants of a `lax.scan`."""
  h0 = jnp.tanh(xs[:, 0] @ params["xh"]["kernel"])
  h, _ = lax.scan(lambda h, x: (_cell(params, h, x), None), h0, jnp.swapaxes(xs, 0, 1)[1:])
  return h @ params["out"]["kernel"] + params["out"]["bias"]


def _rnn_unrolled(params, xs, perturbations=None):
  """The same recurrence as a Python loop: every step tags the same weights again."""
  h = jnp.tanh(xs[:, 0] @ params["xh"]["kernel"])
  hidden = []
  for t in range(1, xs.shape[1]):
    hidden.append(h)
    h = _cell(params, h, xs[:, t], 0.0 if perturbations is None else perturbations[t - 1])
  return h @ params["out"]["kernel"] + params["out"]["bias"], hidden


def test_scan_over_time_is_one_multi_use_layer():
  params, batch = _rnn_params(), _batch((5, 3))
  loss_fn = _loss(_rnn_scan)
  trace = layer_table.trace_layers(loss_fn, params, batch)
  by_name = {layer.name: layer for layer in trace.layers}
  assert set(by_name) == {"hh", "xh", "out"} and not trace.generic
  hh = by_name["hh"]
  assert (hh.approx, hh.stack, hh.scans, hh.multi_use) == ("kron_indep", (), (("repeat",),), True)
  # xh is used once before the scan and once inside it: two tags, one layer.
  assert len(by_name["xh"].tags) == 2 and by_name["xh"].approx == "kron_indep"
  assert by_name["out"].approx == "kron" and not by_name["out"].multi_use


def test_scan_over_time_matches_unrolled_loop_and_hand_factors():
  params, (xs, labels) = _rnn_params(), _batch((5, 3))
  batch = (xs, labels)
  scan_updates, scan_state = _one_step(_loss(_rnn_scan), params, batch)
  loop_updates, loop_state = _one_step(_loss(lambda p, x: _rnn_unrolled(p, x)[0]), params, batch)
  _close_trees(scan_state.statistics, loop_state.statistics)
  _close_trees(scan_updates, loop_updates)

  # kron_indep by hand: A averages [h_t, 1] over examples and steps, G sums the
  # (sqrt(N)-scaled) output gradients of the mean loss over examples and steps.
  n, steps = xs.shape[0], xs.shape[1] - 1
  zeros = [jnp.zeros((n, 4))] * steps
  mean_loss = lambda perturbations: _nets.cross_entropy(
      _rnn_unrolled(params, xs, perturbations)[0], labels)
  grads = np.asarray(jax.grad(mean_loss)(zeros), np.float64) * np.sqrt(n)   # (T, N, 4)
  hidden = np.asarray(_rnn_unrolled(params, xs)[1], np.float64)             # (T, N, 4)
  a = np.concatenate([hidden, np.ones(hidden.shape[:-1] + (1,))], axis=-1)
  _close(scan_state.statistics["hh"]["A"], np.einsum("tna,tnb->ab", a, a) / (n * steps))
  _close(scan_state.statistics["hh"]["G"], np.einsum("tna,tnb->ab", grads, grads))


@pytest.mark.parametrize("approx", ["diagonal", "full"])
def test_multi_use_diagonal_and_full_sum_gradients_over_uses(approx):
  """Per example, the gradient of a multi-use weight sums over its uses."""
  params, (xs, labels) = _rnn_params(), _batch((5, 3))
  _, state = _one_step(_loss(_rnn_scan), params, (xs, labels), approximations={"hh": approx})

  def example_loss(hh, x, label):
    logits = _rnn_scan({**params, "hh": hh}, x[None])
    return _nets.cross_entropy(logits, label[None])

  grads = jax.vmap(jax.grad(example_loss), in_axes=(None, 0, 0))(params["hh"], xs, labels)
  v = np.concatenate([np.asarray(grads["kernel"]), np.asarray(grads["bias"])[:, None]], axis=1)
  if approx == "diagonal":
    _close(state.statistics["hh"]["diagonal"], np.mean(v ** 2, axis=0))
  else:
    v = v.reshape(v.shape[0], -1)
    _close(state.statistics["hh"]["F"], v.T @ v / v.shape[0])


# --- multi-use convs with kron_reduce ----------------------------------------------------------


def test_multi_use_conv_kron_reduce_by_hand():
  """One conv kernel on an image and on its 2x2-pooled copy: K-FAC-reduce averages the
  patches of both uses per example, weighted by their positions, and sums gradients."""
  rng = np.random.default_rng(3)
  params = {"conv": {"kernel": jnp.asarray(rng.standard_normal((3, 3, 2, 3)) * 0.3, jnp.float32),
                     "bias": jnp.asarray(rng.standard_normal(3) * 0.3, jnp.float32)},
            "out": {"kernel": jnp.asarray(rng.standard_normal((6, NUM_CLASSES)), jnp.float32)}}
  (x, labels) = batch = _batch((6, 6, 2))
  conv = lambda x, p, perturbation=0.0: _layer(True, x, p) + perturbation

  def apply(params, x, perturbations=(0.0, 0.0)):
    pooled = lax.reduce_window(x, 0.0, lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "VALID") / 4
    features = [jnp.tanh(conv(image, params["conv"], e)).mean(axis=(1, 2))
                for image, e in zip((x, pooled), perturbations)]
    return jnp.concatenate(features, axis=-1) @ params["out"]["kernel"]

  _, state = _one_step(_loss(apply), params, batch, approximations={"conv": "kron_reduce"})
  n = x.shape[0]
  pooled = np.asarray(x).reshape(n, 3, 2, 3, 2, 2).mean(axis=(2, 4))
  uses = [_nets.patches_by_loops(image, (3, 3), (1, 1), [(1, 1), (1, 1)])
          for image in (x, pooled)]
  sums = sum(u.reshape(n, -1, u.shape[-1]).sum(axis=1) for u in uses)
  count = sum(u.shape[1] * u.shape[2] for u in uses)
  a = np.concatenate([sums / count, np.ones((n, 1))], axis=1)
  _close(state.statistics["conv"]["A"], a.T @ a / n)
  zeros = [jnp.zeros((n, 6, 6, 3)), jnp.zeros((n, 3, 3, 3))]
  mean_loss = lambda e: _nets.cross_entropy(apply(params, x, e), labels)
  g = sum(np.asarray(d, np.float64).sum(axis=(1, 2)) for d in jax.grad(mean_loss)(zeros))
  g = g * np.sqrt(n)
  _close(state.statistics["conv"]["G"], g.T @ g)


# --- embeddings and errors ---------------------------------------------------------------------


def test_two_lookups_of_one_table_are_one_embedding_layer():
  table = jnp.asarray(np.random.default_rng(4).standard_normal((7, 3)), jnp.float32)
  params = {"table": table, "out": jnp.ones((3, NUM_CLASSES)) * 0.1}
  ids = jnp.asarray(np.random.default_rng(5).integers(0, 7, (6, 2)), jnp.int32)
  labels = jnp.arange(6) % NUM_CLASSES
  apply = lambda p, ids: (jnp.take(p["table"], ids[:, 0], axis=0)
                          * jnp.take(p["table"], ids[:, 1], axis=0)) @ p["out"]
  _, state = _one_step(_loss(apply), params, (ids, labels))
  counts = np.bincount(np.asarray(ids).ravel(), minlength=7) / ids.size
  _close(state.statistics["table"]["A"], counts)


def test_loss_inside_scan_raises():
  params, batch = _rnn_params(), _batch((5, 3))

  def loss_fn(params, batch):
    xs, labels = batch
    def step(total, x):
      logits = jkfac.register_softmax_cross_entropy(x @ params["xh"]["kernel"][:, :3], labels)
      return total + _nets.cross_entropy(logits, labels), None
    return lax.scan(step, 0.0, jnp.swapaxes(xs, 0, 1))[0]

  with pytest.raises(NotImplementedError, match="loss inside a scan"):
    jax.jit(lambda p: jkfac.value_and_grad(loss_fn)(p, batch))(params)
  with pytest.raises(NotImplementedError, match="loss inside a scan"):
    layer_table.trace_layers(loss_fn, params, batch)


def test_weight_stacked_and_bias_repeated_raise():
  params = {"kernel": jnp.ones((DEPTH, 4, 4)), "bias": jnp.zeros(4)}
  batch = _batch((4,))

  def apply(params, x):
    step = lambda h, k: (jnp.tanh(jkfac.register_dense(h @ k + params["bias"], h, k,
                                                       params["bias"])), None)
    return lax.scan(step, x, params["kernel"])[0][:, :NUM_CLASSES]

  with pytest.raises(ValueError, match="enter the enclosing scans differently"):
    layer_table.trace_layers(_loss(apply), params, batch)


def test_fused_value_and_grad_through_a_scan_matches_the_plain_step():
  params, batch = _rnn_params(), _batch((5, 3))
  loss_fn = _loss(_rnn_scan)
  tx = jkfac.precondition(loss_fn, batch, damping=1e-2, invert_every=1, estimation="empirical")
  state = tx.init(params)
  loss, grads, curvature = jax.jit(jkfac.value_and_grad(loss_fn))(params, batch)
  _close(loss, loss_fn(params, batch))
  _close_trees(grads, jax.grad(loss_fn)(params, batch))
  fused = jax.jit(lambda g, s, c: tx.update(g, s, params, batch=batch, curvature=c))
  plain = jax.jit(lambda g, s: tx.update(g, s, params, batch=batch))
  _close_trees(fused(grads, state, curvature), plain(grads, state))


def test_hand_tags_inside_a_scan_equal_auto_registration():
  params = {"kernel": jnp.asarray(np.random.default_rng(6).standard_normal((DEPTH, 4, 4)) * 0.5,
                                  jnp.float32),
            "bias": jnp.full((DEPTH, 4), 0.1, jnp.float32)}
  batch = _batch((4,))

  def apply(tag):
    def body(h, p):
      y = h @ p["kernel"] + p["bias"]
      y = jkfac.register_dense(y, h, p["kernel"], p["bias"]) if tag else y
      return jnp.tanh(y), None
    return lambda params, x: lax.scan(body, x, params)[0][:, :NUM_CLASSES]

  hand, auto = _loss(apply(True)), _loss(apply(False))
  assert (layer_table.trace_layers(hand, params, batch)
          == layer_table.trace_layers(auto, params, batch))
  _close_trees(_one_step(hand, params, batch), _one_step(auto, params, batch))


def test_nnx_scan_over_stacked_layers():
  from flax import nnx  # noqa: PLC0415

  class Block(nnx.Module):
    def __init__(self, rngs):
      self.linear = nnx.Linear(4, 4, rngs=rngs)

    def __call__(self, x):
      return jnp.tanh(self.linear(x))

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.first = nnx.Linear(4, 4, rngs=rngs)
      make = nnx.split_rngs(splits=DEPTH)(nnx.vmap(Block, in_axes=(0,), out_axes=0))
      self.blocks = make(rngs)
      self.head = nnx.Linear(4, NUM_CLASSES, rngs=rngs)

    def __call__(self, x):
      forward = nnx.scan(lambda x, block: block(x), in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
      return self.head(forward(self.first(x), self.blocks))

  graphdef, params = nnx.split(Net(nnx.Rngs(0)), nnx.Param)
  loss_fn = _loss(lambda params, x: nnx.merge(graphdef, params)(x))
  batch = _batch((4,))
  rows = {p.path: (p.layer, p.kind, p.factors) for p in
          jkfac.describe(loss_fn, params, batch).parameters}
  assert rows["blocks/linear/kernel/value"] == ("blocks/linear", "dense", "A 3x5x5, G 3x4x4")
  assert {kind for _, kind, _ in rows.values()} == {"dense"}
  # Slice i of the stacked blocks equals an unrolled layer with slice i's parameters.
  flat = nnx.to_pure_dict(params)
  unrolled = {"first": flat["first"], "head": flat["head"],
              **{f"block_{i}": jax.tree_util.tree_map(lambda p, i=i: p[i], flat["blocks"]["linear"])
                 for i in range(DEPTH)}}
  _, state = _one_step(loss_fn, params, batch)
  _, unrolled_state = _one_step(_loss(_unrolled(False)), unrolled, batch)
  for i in range(DEPTH):
    _close(state.statistics["blocks/linear"]["A"][i],
           unrolled_state.statistics[f"block_{i}"]["A"])
