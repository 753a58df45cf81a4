"""Block-diagonal Kronecker factors (`factor_block_size`, `jkfac.blocks.blocked`).

Oracles: the diagonal blocks cut from the dense factor; dense block-diagonal matrices
built with numpy; the preconditioned gradient of whole factors' statistics, restricted to
their diagonal blocks and inverted densely in float64; the cost rule worked by hand.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jkfac
from jkfac import factor_sizes, layer_table
from jkfac.blocks import blocked


def _spd(d: int, seed: int = 0) -> np.ndarray:
  x = np.random.RandomState(seed).randn(d + 3, d)
  return x.T @ x / (d + 3)


def _dense(blocks: np.ndarray, d: int) -> np.ndarray:
  """The block-diagonal `(d, d)` matrix of `(n, s, s)` blocks, padding cut off."""
  n, s, _ = blocks.shape
  out = np.zeros((n * s, n * s))
  for k in range(n):
    out[k * s:(k + 1) * s, k * s:(k + 1) * s] = blocks[k]
  return out[:d, :d]


def test_to_blocks_cuts_the_diagonal_blocks_and_keeps_the_mean_diagonal():
  matrix = _spd(10)
  found = np.asarray(blocked.to_blocks(jnp.asarray(matrix), 4))
  assert blocked.block_shape(10, 4) == (3, 4) and found.shape == (3, 4, 4)
  np.testing.assert_allclose(found[0], matrix[:4, :4], rtol=1e-6)
  np.testing.assert_allclose(found[1], matrix[4:8, 4:8], rtol=1e-6)
  np.testing.assert_allclose(found[2][:2, :2], matrix[8:, 8:], rtol=1e-6)
  mean = np.mean(np.diag(matrix))  # the padding: zeros, with the mean on its diagonal
  np.testing.assert_allclose(found[2][2:, 2:], mean * np.eye(2), rtol=1e-6)
  np.testing.assert_allclose(found[2][:2, 2:], 0)
  np.testing.assert_allclose(np.mean(np.diagonal(found, axis1=1, axis2=2)), mean, rtol=1e-6)


@pytest.mark.parametrize("form", ["blocks", "matrix", "diagonal"])
def test_apply_left_and_right_equal_dense_products(form):
  rng = np.random.RandomState(1)
  d, other = 11, 5
  if form == "blocks":
    factor = np.stack([_spd(4, seed) for seed in range(3)])
    dense = _dense(factor, d)
  elif form == "matrix":
    factor = dense = _spd(d)
  else:
    factor = rng.rand(d)
    dense = np.diag(factor)
  x = rng.randn(d, other)
  np.testing.assert_allclose(blocked.apply_left(jnp.asarray(factor), jnp.asarray(x)),
                             dense @ x, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(blocked.apply_right(jnp.asarray(x.T), jnp.asarray(factor)),
                             x.T @ dense, rtol=1e-5, atol=1e-6)


D_IN, D_OUT, BATCH = 9, 6, 5


def _problem():
  rng = np.random.RandomState(2)
  params = {"w": jnp.asarray(rng.randn(D_IN, D_OUT) * 0.3, jnp.float32),
            "b": jnp.asarray(rng.randn(D_OUT) * 0.1, jnp.float32)}
  batch = {"x": jnp.asarray(rng.randn(BATCH, D_IN), jnp.float32),
           "y": jnp.asarray(rng.randint(0, D_OUT, BATCH))}

  def loss_fn(params, batch):
    logits = jkfac.register_dense(batch["x"] @ params["w"] + params["b"], batch["x"],
                                  params["w"], params["b"])
    jkfac.register_softmax_cross_entropy(logits, batch["y"])
    log_p = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(log_p, batch["y"][:, None], axis=1))

  return loss_fn, params, batch


def _one_update(block_size):
  loss_fn, params, batch = _problem()
  tx = jkfac.precondition(loss_fn, batch, damping=0.1, invert_every=1, cov_update_every=1,
                          estimation="exact", factor_block_size=block_size)
  grads = jax.grad(loss_fn)(params, batch)
  updates, state = tx.update(grads, tx.init(params), params, batch=batch)
  return grads, updates, state


def test_blocked_preconditioning_equals_the_dense_block_diagonal_oracle():
  grads, _, whole = _one_update(None)
  _, updates, state = _one_update(4)
  a, g = (np.asarray(whole.statistics["w"][name], np.float64) / float(whole.ema_weight)
          for name in ("A", "G"))
  assert state.statistics["w"]["A"].shape == (3, 4, 4)  # 10 = 9 inputs + bias: 3 of 4
  assert state.statistics["w"]["G"].shape == (2, 3, 3)  # 6 outputs: 2 of 3

  def block_diagonal(m, size):
    n, s = blocked.block_shape(m.shape[0], size)
    owner = np.arange(m.shape[0]) // s
    return np.where(owner[:, None] == owner[None, :], m, 0.0)

  a, g = block_diagonal(a, 4), block_diagonal(g, 4)
  # The factored damping's split uses mean diagonals, which blocking (and its padding) keeps.
  pi = np.sqrt((np.trace(a) / a.shape[0]) / (np.trace(g) / g.shape[0]))
  a_inv = np.linalg.inv(a + pi * np.sqrt(0.1) * np.eye(a.shape[0]))
  g_inv = np.linalg.inv(g + np.sqrt(0.1) / pi * np.eye(g.shape[0]))
  matrix = np.concatenate([np.asarray(grads["w"]), np.asarray(grads["b"])[None]], axis=0)
  expected = a_inv @ matrix @ g_inv
  np.testing.assert_allclose(updates["w"], expected[:-1], rtol=2e-4, atol=1e-6)
  np.testing.assert_allclose(updates["b"], expected[-1], rtol=2e-4, atol=1e-6)


def _trace(widths, batch_size):
  def loss_fn(params, batch):
    x = batch["x"]
    for i, w in enumerate(params):
      x = jkfac.register_dense(x @ w, x, w)
      x = jnp.tanh(x) if i < len(params) - 1 else x
    jkfac.register_squared_error(x, batch["t"])
    return 0.5 * jnp.mean(jnp.sum((x - batch["t"]) ** 2, -1))

  params = [jax.ShapeDtypeStruct((a, b), jnp.float32) for a, b in zip(widths, widths[1:])]
  batch = {"x": jax.ShapeDtypeStruct((batch_size, widths[0]), jnp.float32),
           "t": jax.ShapeDtypeStruct((batch_size, widths[-1]), jnp.float32)}
  return layer_table.trace_with_approximations(loss_fn, params, batch)


@pytest.mark.parametrize("batch_size,expected", [(128, 128), (384, 512), (1024, None)])
def test_auto_block_size_is_the_largest_whose_inverses_cost_at_most_the_gradient(
    batch_size, expected):
  # One 784 -> 512 layer: whole factors cost 784*512*(784+512) multiply-adds to apply,
  # the gradient 3*B*784*512, so whole factors fit from B = 432 on; 512-blocks (784 as
  # 2 of 392) cost 784*512*(392+512), fit from B = 302; 128-blocks: the smallest.
  trace = _trace((784, 512), batch_size)
  assert factor_sizes.auto_block_size(trace) == expected
  bounded = factor_sizes.bound_factors(trace, 4096, factor_block_size="auto")
  assert bounded.layers[0].block_size == expected


@pytest.mark.parametrize("example_rows,rows,layout", [(256, 32, None), (32, 256, 128)])
def test_auto_blocks_follow_the_example_batch_not_each_batch(example_rows, rows, layout):
  """A 300 -> 300 layer keeps whole factors at 256 rows and 128-blocks at 32: an update
  on a batch of the other size (an epoch's last batch) keeps the layout of `tx.init`.
  Oracle: the same update with that layout given explicitly."""
  rng = np.random.RandomState(0)
  params = {"w": jnp.asarray(rng.randn(300, 300) * 0.05, jnp.float32)}

  def loss_fn(params, batch):
    y = jkfac.register_dense(batch["x"] @ params["w"], batch["x"], params["w"])
    jkfac.register_squared_error(y, batch["t"])
    return 0.5 * jnp.mean(jnp.sum((y - batch["t"]) ** 2, -1))

  def batch_of(n):
    return {"x": jnp.asarray(rng.randn(n, 300), jnp.float32),
            "t": jnp.asarray(rng.randn(n, 300), jnp.float32)}

  example, batch = batch_of(example_rows), batch_of(rows)
  grads = jax.grad(loss_fn)(params, batch)
  settings = dict(damping=0.1, invert_every=1, cov_update_every=1, estimation="exact")
  updates = {}
  for block_size in ("auto", layout):
    tx = jkfac.precondition(loss_fn, example, factor_block_size=block_size, **settings)
    updates[block_size], state = tx.update(grads, tx.init(params), params, batch=batch)
    assert state.statistics["w"]["A"].ndim == (2 if layout is None else 3)
  np.testing.assert_allclose(updates["auto"]["w"], updates[layout]["w"], rtol=1e-6)


def test_describe_shows_blocks_and_a_bad_block_size_is_an_error():
  loss_fn, params, batch = _problem()
  rows = jkfac.describe(loss_fn, params, batch, factor_block_size=4).parameters
  assert rows[-1].factors == "A 3 blocks 4x4, G 2 blocks 3x3"
  for bad in (0, "whole", 2.5):
    with pytest.raises(ValueError, match="factor_block_size"):
      jkfac.precondition(loss_fn, batch, damping=0.1, factor_block_size=bad)
