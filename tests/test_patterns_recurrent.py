"""Recurrent cells of `flax.linen` and `flax.nnx` under automatic registration.

Every kernel of a cell applied inside `nn.RNN` / `nn.Bidirectional` (a `scan` over time)
must end in a dense (or conv) layer used at every step ("kron_indep"), with its bias where
the cell has one. `OptimizedLSTMCell` multiplies by a concatenation of its gate kernels:
`jkfac/patterns.py` splits that product back into one dense layer per kernel, which must
compute the same loss and gradients and take the same K-FAC steps as `LSTMCell`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jkfac

BATCH, TIME, FEATURES, HIDDEN, NUM_CLASSES = 2, 3, 4, 5, 3
KEY = jax.random.PRNGKey(0)
LABELS = jnp.arange(BATCH) % NUM_CLASSES


def _loss(apply):
  """Mean softmax cross-entropy of `apply(params, x)`, registered for K-FAC."""

  def loss_fn(params, batch):
    logits = apply(params, batch["x"])
    jkfac.register_softmax_cross_entropy(logits, batch["y"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

  return loss_fn


def _batch(x_shape):
  return {"x": jax.random.normal(jax.random.PRNGKey(1), (BATCH, TIME) + x_shape),
          "y": LABELS}


class LinenNet(nn.Module):
  """A recurrent layer (one cell, or a forward and a backward one) and a dense head."""
  cell: type
  cell_kwargs: tuple = ()
  bidirectional: bool = False

  @nn.compact
  def __call__(self, x):
    make = lambda: nn.RNN(self.cell(HIDDEN, **dict(self.cell_kwargs)))
    y = nn.Bidirectional(make(), make())(x) if self.bidirectional else make()(x)
    return nn.Dense(NUM_CLASSES)(y.reshape(y.shape[0], -1))


def _linen_problem(cell, bidirectional=False, cell_kwargs=(), x_shape=(FEATURES,)):
  model = LinenNet(cell, tuple(cell_kwargs), bidirectional)
  batch = _batch(x_shape)
  params = model.init(KEY, batch["x"])["params"]
  return _loss(lambda p, x: model.apply({"params": p}, x)), params, batch


def _nnx_problem(cell, bidirectional=False):
  class Net(nnx.Module):
    def __init__(self, rngs):
      make = lambda: nnx.RNN(cell(FEATURES, HIDDEN, rngs=rngs), rngs=False)
      self.rnn = nnx.Bidirectional(make(), make(), rngs=False) if bidirectional else make()
      width = HIDDEN * (2 if bidirectional else 1)
      self.head = nnx.Linear(TIME * width, NUM_CLASSES, rngs=rngs)

    def __call__(self, x):
      y = self.rnn(x, rngs=nnx.Rngs(carry=1))  # a carry stream made in the trace: merged
      # streams cannot advance inside it
      return self.head(y.reshape(y.shape[0], -1))

  graphdef, params = nnx.split(Net(nnx.Rngs(0)), nnx.Param)
  loss_fn = _loss(lambda p, x: nnx.merge(graphdef, p)(x))
  return loss_fn, params, _batch((FEATURES,))


def _assert_all_in_layers(description, kernel_kind="dense"):
  """Every cell kernel is a multi-use layer of `kernel_kind`; no parameter is generic (the
  biases join their layers)."""
  assert [p.path for p in description.parameters if p.kind == "generic"] == []
  cell = [p for p in description.parameters if not p.path.startswith(("Dense", "head"))]
  kernels = [p for p in cell if "kernel" in p.path.split("/")]
  assert kernels and {p.kind for p in kernels} == {kernel_kind}
  assert {p.approximation for p in kernels} == {"kron_indep"}
  assert {p.kind for p in cell if "bias" in p.path.split("/")} <= {kernel_kind}


LINEN_CELLS = {"LSTMCell": nn.LSTMCell, "OptimizedLSTMCell": nn.OptimizedLSTMCell,
               "GRUCell": nn.GRUCell, "MGUCell": nn.MGUCell, "SimpleCell": nn.SimpleCell}


@pytest.mark.parametrize("bidirectional", [False, True], ids=["rnn", "bidirectional"])
@pytest.mark.parametrize("name", sorted(LINEN_CELLS))
def test_linen_cells_are_dense_layers(name, bidirectional):
  loss_fn, params, batch = _linen_problem(LINEN_CELLS[name], bidirectional)
  _assert_all_in_layers(jkfac.describe(loss_fn, params, batch))


@pytest.mark.parametrize("bidirectional", [False, True], ids=["rnn", "bidirectional"])
def test_linen_conv_lstm_cell_is_conv_layers(bidirectional):
  loss_fn, params, batch = _linen_problem(nn.ConvLSTMCell, bidirectional,
                                          (("kernel_size", (2, 2)),), (3, 3, 2))
  _assert_all_in_layers(jkfac.describe(loss_fn, params, batch), "conv2d")


NNX_CELLS = {"LSTMCell": nnx.LSTMCell, "OptimizedLSTMCell": nnx.OptimizedLSTMCell,
             "GRUCell": nnx.GRUCell, "SimpleCell": nnx.SimpleCell}


@pytest.mark.parametrize("bidirectional", [False, True], ids=["rnn", "bidirectional"])
@pytest.mark.parametrize("name", sorted(NNX_CELLS))
def test_nnx_cells_are_dense_layers(name, bidirectional):
  loss_fn, params, batch = _nnx_problem(NNX_CELLS[name], bidirectional)
  _assert_all_in_layers(jkfac.describe(loss_fn, params, batch))


def test_optimized_lstm_kernels_are_split_per_gate():
  """Each gate's kernel is its own layer (d_in x hidden), the recurrent ones with their bias."""
  loss_fn, params, batch = _linen_problem(nn.OptimizedLSTMCell)
  rows = {p.path: p for p in jkfac.describe(loss_fn, params, batch).parameters}
  for gate in "ifgo":
    assert rows[f"OptimizedLSTMCell_0/i{gate}/kernel"].layer == (
        f"OptimizedLSTMCell_0/i{gate}")
    assert rows[f"OptimizedLSTMCell_0/h{gate}/bias"].layer == (
        f"OptimizedLSTMCell_0/h{gate}")
    assert rows[f"OptimizedLSTMCell_0/i{gate}/kernel"].factors == (  # no bias
        f"A {FEATURES}x{FEATURES}, G {HIDDEN}x{HIDDEN}")
    assert rows[f"OptimizedLSTMCell_0/h{gate}/kernel"].factors == (
        f"A {HIDDEN + 1}x{HIDDEN + 1}, G {HIDDEN}x{HIDDEN}")


# --- hand-written joins inside a scan over time -----------------------------------------------


def _scan_problem(step, shapes):
  """A `lax.scan` of `h = step(params, h, x_t)` over time and a dense head; `shapes` are the
  cell's parameters' shapes."""
  keys = jax.random.split(KEY, len(shapes) + 1)
  params = {name: 0.5 * jax.random.normal(k, shape) for k, (name, shape) in
            zip(keys, shapes.items())}
  params["head"] = 0.5 * jax.random.normal(keys[-1], (TIME * HIDDEN, NUM_CLASSES))

  def apply(params, x):
    cell = lambda h, x_t: (lambda h: (h, h))(step(params, h, x_t))
    _, hs = jax.lax.scan(cell, jnp.zeros((x.shape[0], HIDDEN)), jnp.swapaxes(x, 0, 1))
    return jnp.swapaxes(hs, 0, 1).reshape(x.shape[0], -1) @ params["head"]

  return _loss(apply), params, _batch((FEATURES,))


def _input_concat(p, h, x):
  """`[x, h] @ [wx; wh] + b`: a join along the input axis, one bias (it joins wx's layer)."""
  xh = jnp.concatenate([x, h], -1)
  return jnp.tanh(xh @ jnp.concatenate([p["wx"], p["wh"]], 0) + p["b"])


def _output_stack(p, h, x):
  """Two gates from `x @ stack([w1, w2], -1) + stack([b1, b2], -1)` (features `(H, 2)`)."""
  z = jnp.tensordot(x, jnp.stack([p["w1"], p["w2"]], -1), 1) + jnp.stack([p["b1"], p["b2"]], -1)
  return jnp.tanh(z[..., 0]) * jax.nn.sigmoid(z[..., 1]) + jnp.tanh(h @ p["wh"])


def _input_stack(p, h, x):
  """`[x, x^2] (stacked) @ stack([wa, wb])`, contracting two axes: parts contract one."""
  x2 = jnp.stack([x, x ** 2], 1)
  return jnp.tanh(jnp.tensordot(x2, jnp.stack([p["wa"], p["wb"]], 0), 2) + h @ p["wh"])


def _cast_concat(p, h, x):
  """A concatenated kernel cast (as by `promote_dtype`), biases concatenated too."""
  w = jnp.concatenate([p["w1"], p["w2"]], 1).astype(jnp.float16).astype(jnp.float32)
  z = x @ w + jnp.concatenate([p["b1"], p["b2"]]).reshape(1, -1)
  return jnp.tanh(z[:, :HIDDEN] * z[:, HIDDEN:] + h @ p["wh"])


def _unsplit_bias(p, h, x):
  """One `(2H,)` bias over a concatenated kernel: no part's, so it stays generic."""
  z = x @ jnp.concatenate([p["w1"], p["w2"]], 1) + p["b"]
  return jnp.tanh(z[:, :HIDDEN] + z[:, HIDDEN:] + h @ p["wh"])


def _computed_part(p, h, x):
  """A part that is no parameter (`2 * w2`): the product is not split, both stay generic."""
  z = x @ jnp.concatenate([p["w1"], 2 * p["w2"]], 1)
  return jnp.tanh(z[:, :HIDDEN] + z[:, HIDDEN:] + h @ p["wh"])


F, H = FEATURES, HIDDEN
# step, parameter shapes, and each parameter's expected layer (None: generic).
JOINS = {
    "input_concat": (_input_concat, {"wx": (F, H), "wh": (H, H), "b": (H,)},
                     {"wx": "wx", "wh": "wh", "b": "wx"}),
    "output_stack": (_output_stack, {"w1": (F, H), "w2": (F, H), "b1": (H,), "b2": (H,),
                                     "wh": (H, H)},
                     {"w1": "w1", "w2": "w2", "b1": "w1", "b2": "w2", "wh": "wh"}),
    "input_stack": (_input_stack, {"wa": (F, H), "wb": (F, H), "wh": (H, H)},
                    {"wa": "wa", "wb": "wb", "wh": "wh"}),
    "cast_concat": (_cast_concat, {"w1": (F, H), "w2": (F, H), "b1": (H,), "b2": (H,),
                                   "wh": (H, H)},
                    {"w1": "w1", "w2": "w2", "b1": "w1", "b2": "w2", "wh": "wh"}),
    "unsplit_bias": (_unsplit_bias, {"w1": (F, H), "w2": (F, H), "b": (2 * H,), "wh": (H, H)},
                     {"w1": "w1", "w2": "w2", "b": None, "wh": "wh"}),
    "computed_part": (_computed_part, {"w1": (F, H), "w2": (F, H), "wh": (H, H)},
                      {"w1": None, "w2": None, "wh": "wh"}),
}


@pytest.mark.parametrize("name", sorted(JOINS))
def test_joined_weights_split_into_dense_layers(name):
  step, shapes, expected = JOINS[name]
  loss_fn, params, batch = _scan_problem(step, shapes)
  rows = {p.path: p for p in jkfac.describe(loss_fn, params, batch).parameters}
  got = {path: None if row.kind == "generic" else row.layer for path, row in rows.items()}
  assert got == {**expected, "head": "head"}
  assert {rows[path].approximation for path, layer in expected.items() if layer} == {"kron_indep"}


@pytest.mark.parametrize("name", sorted(JOINS))
def test_split_layers_compute_the_same_loss_and_gradients(name):
  """The rewritten jaxpr (`jkfac.value_and_grad`) against `jax.value_and_grad` of the
  original."""
  loss_fn, params, batch = _scan_problem(*JOINS[name][:2])
  loss, grads = jax.value_and_grad(loss_fn)(params, batch)
  loss_k, grads_k, _ = jax.jit(jkfac.value_and_grad(loss_fn))(params, batch)
  np.testing.assert_allclose(loss_k, loss, rtol=1e-6)
  for path in grads:
    np.testing.assert_allclose(grads_k[path], grads[path], rtol=1e-5, atol=1e-6)


def test_optimized_lstm_loss_and_gradients_are_unchanged():
  loss_fn, params, batch = _linen_problem(nn.OptimizedLSTMCell, bidirectional=True)
  loss, grads = jax.value_and_grad(loss_fn)(params, batch)
  loss_k, grads_k, _ = jax.jit(jkfac.value_and_grad(loss_fn))(params, batch)
  np.testing.assert_allclose(loss_k, loss, rtol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(grads_k), jax.tree_util.tree_leaves(grads)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# --- split layers take the steps of separate dense layers -----------------------------------


def _kfac_updates(loss_fn, params, batch, steps=2):
  """The updates of `steps` jitted `jkfac.kfac` steps (empirical Fisher: no sampling)."""
  tx = jkfac.kfac(loss_fn, batch, learning_rate=0.1, damping=1e-2, estimation="empirical",
                  invert_every=1)

  @jax.jit
  def step(params, state):
    grads = jax.grad(loss_fn)(params, batch)
    updates, state = tx.update(grads, state, params, batch=batch)
    return optax.apply_updates(params, updates), state, updates

  state, all_updates = tx.init(params), []
  for _ in range(steps):
    params, state, updates = step(params, state)
    all_updates.append(updates)
  return all_updates


def _assert_updates_close(a, b):
  leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert len(leaves_a) == len(leaves_b)
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


def test_optimized_lstm_steps_like_lstm_cell():
  """`OptimizedLSTMCell` and `LSTMCell` have the same parameters and math: with the gate
  kernels split back, K-FAC takes the same steps on both."""
  loss_opt, params, batch = _linen_problem(nn.OptimizedLSTMCell)
  loss_ref, _, _ = _linen_problem(nn.LSTMCell)
  params_ref = {"Dense_0": params["Dense_0"], "LSTMCell_0": params["OptimizedLSTMCell_0"]}
  np.testing.assert_allclose(loss_opt(params, batch), loss_ref(params_ref, batch), rtol=1e-6)
  _assert_updates_close(_kfac_updates(loss_opt, params, batch),
                        _kfac_updates(loss_ref, params_ref, batch))


def _hand_tagged_input_concat(p, h, x):
  """`_input_concat` with its two dense layers tagged by hand."""
  y_x = jkfac.register_dense(x @ p["wx"] + p["b"], x, p["wx"], p["b"])
  y_h = jkfac.register_dense(h @ p["wh"], h, p["wh"])
  return jnp.tanh(y_x + y_h)


def test_input_split_steps_like_hand_tagged_layers():
  """`[x, h] @ [wx; wh] + b` split along the input axis: the statistics, hence the steps, of
  `register_dense(x @ wx + b)` and `register_dense(h @ wh)`."""
  shapes = JOINS["input_concat"][1]
  auto, params, batch = _scan_problem(_input_concat, shapes)
  hand, _, _ = _scan_problem(_hand_tagged_input_concat, shapes)
  _assert_updates_close(_kfac_updates(auto, params, batch), _kfac_updates(hand, params, batch))


def test_bfloat16_optimized_lstm_is_split():
  """With `dtype=bfloat16` the joined kernels are cast before the product: still split."""
  loss_fn, params, batch = _linen_problem(nn.OptimizedLSTMCell,
                                          cell_kwargs=(("dtype", jnp.bfloat16),))
  _assert_all_in_layers(jkfac.describe(loss_fn, params, batch))
  loss, _ = jax.value_and_grad(loss_fn)(params, batch)
  np.testing.assert_allclose(jax.jit(jkfac.value_and_grad(loss_fn))(params, batch)[0], loss,
                             rtol=1e-6)
