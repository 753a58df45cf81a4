"""Tied embeddings: a `(vocab, d)` table used as lookup and as the output projection.

`F ~ D1 ⊗ G1 + D2 ⊗ A2` (see `jkfac/blocks/tied_embedding.py`): the factors are checked
against factors built by hand from each use's inputs and output gradients (zero
perturbations added at the lookup and at the logits), the preconditioned gradient and
the first `jkfac.kfac` step against a dense float64 solve, and `flax.linen.Embed.attend` and plain `x @ table.T`
against hand tags.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jkfac
from tests import _nets

KEY = jax.random.PRNGKey(0)
VOCAB, D, TIME = 7, 3, 4
NAME = "params/Embed_0"


class TinyLM(nn.Module):
  """Embed, a dense layer at every position, and the tied table as output projection."""
  vocab: int = VOCAB
  d: int = D

  @nn.compact
  def __call__(self, ids):
    embed = nn.Embed(self.vocab, self.d)
    return embed.attend(jnp.tanh(nn.Dense(self.d)(embed(ids))))


def _apply_jnp(params, ids, hand=False, e1=0.0, e2=0.0):
  """`TinyLM` in plain jnp on its parameters; `hand` tags its layers (both uses of the
  table), and `e1`, `e2` perturb the lookup and the logits."""
  table, dense = params["params"]["Embed_0"]["embedding"], params["params"]["Dense_0"]
  y = jnp.take(table, ids, axis=0)
  y = (jkfac.register_embedding(y, ids, table) if hand else y) + e1
  z = y @ dense["kernel"] + dense["bias"]
  h = jnp.tanh(jkfac.register_dense(z, y, dense["kernel"], dense["bias"]) if hand else z)
  logits = h @ table.T
  return (jkfac.register_embedding_projection(logits, h, table) if hand else logits) + e2


def _loss(apply):
  def loss_fn(params, batch):
    ids, labels = batch
    logits = jkfac.register_softmax_cross_entropy(apply(params, ids), labels)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return loss_fn


def _setup(vocab=VOCAB, n=5, seed=0):
  rng = np.random.default_rng(seed)
  ids = jnp.asarray(rng.integers(0, vocab, (n, TIME)), jnp.int32)
  labels = jnp.asarray(rng.integers(0, vocab, (n, TIME)), jnp.int32)
  model = TinyLM(vocab)
  return model, model.init(KEY, ids), (ids, labels)


def _one_step(loss_fn, params, batch, damping=0.1, auto_register=True):
  """`(grads, updates, state)` of one step whose EMA is the batch statistic."""
  tx = jkfac.precondition(loss_fn, batch, damping=damping, cov_ema_decay=0.0, invert_every=1,
                          estimation="empirical", auto_register=auto_register)
  grads = jax.grad(loss_fn)(params, batch)
  updates, state = jax.jit(tx.update)(grads, tx.init(params), params, batch=batch)
  return grads, updates, state


def _hand_factors(params, batch):
  """D1, G1, D2, A2 from the ids, the projection inputs and the output gradients.

  With `g` the gradient of the mean loss over `rows = n * TIME` rows at a use's output,
  the empirical cotangents are `sqrt(rows) * g` (see `jkfac/losses.py`), so the G-type
  factors are `rows * sum g g^T`.
  """
  ids, labels = batch
  table, dense = params["params"]["Embed_0"]["embedding"], params["params"]["Dense_0"]
  rows = ids.size

  def loss(e1, e2):
    logits = _apply_jnp(params, ids, e1=e1, e2=e2)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  e1, e2 = jnp.zeros(ids.shape + (D,)), jnp.zeros(ids.shape + (VOCAB,))
  g1, g2 = (np.asarray(g, np.float64) for g in jax.grad(loss, argnums=(0, 1))(e1, e2))
  g1, g2 = g1.reshape(-1, D), g2.reshape(-1, VOCAB)
  h = np.asarray(jnp.tanh(jnp.take(table, ids, axis=0) @ dense["kernel"] + dense["bias"]),
                 np.float64).reshape(-1, D)
  d1 = np.bincount(np.asarray(ids).ravel(), minlength=VOCAB) / ids.size
  return d1, rows * g1.T @ g1, rows * np.sum(g2 ** 2, axis=0), h.T @ h / len(h)


def _dense_solve(d1, g1, d2, a2, damping, grad):
  """`(D1 ⊗ G1 + D2' ⊗ A2')^-1 vec(grad)` built densely in float64 (row-major vec)."""
  vocab, d = grad.shape
  pi = np.sqrt((d2.sum() / vocab) / (np.trace(a2) / d))
  root = np.sqrt(damping)
  fisher = (np.kron(np.diag(d1), g1)
            + np.kron(np.diag(d2 + pi * root), a2 + root / pi * np.eye(d)))
  return np.linalg.solve(fisher, np.asarray(grad, np.float64).reshape(-1)).reshape(vocab, d)


# --- registration --------------------------------------------------------------------------


def test_flax_attend_and_plain_jnp_register_as_hand_tags():
  model, params, batch = _setup()
  flax_loss, jnp_loss = _loss(model.apply), _loss(_apply_jnp)
  hand_loss = _loss(lambda p, ids: _apply_jnp(p, ids, hand=True))
  traces = [jkfac.layer_table.trace_with_approximations(f, params, batch)
            for f in (flax_loss, jnp_loss)]
  hand = jkfac.layer_table.trace_with_approximations(hand_loss, params, batch,
                                                   auto_register=False)
  tied, = [layer for layer in hand.layers if layer.kind == "tied_embedding"]
  assert (tied.name, tied.approx, tied.roles) == (NAME, "kron_indep",
                                                  ("embedding", "embedding_projection"))
  for trace in traces:
    assert trace.layers == hand.layers and not trace.generic
  _, hand_updates, hand_state = _one_step(hand_loss, params, batch, auto_register=False)
  for loss_fn in (flax_loss, jnp_loss):
    _, updates, state = _one_step(loss_fn, params, batch)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                           (state.statistics, state.inverses, updates),
                           (hand_state.statistics, hand_state.inverses, hand_updates))


def test_einsum_projection_is_registered():
  """`dot_general` contracting `x`'s last axis with axis 1 of the table, no transpose."""
  model, params, batch = _setup()

  def apply(p, ids):
    table = p["params"]["Embed_0"]["embedding"]
    return jnp.einsum("ntd,vd->ntv", jnp.take(table, ids, axis=0), table)

  trace = jkfac.layer_table.trace_with_approximations(_loss(apply), params, batch)
  assert [(layer.kind, layer.roles) for layer in trace.layers] == [
      ("tied_embedding", ("embedding", "embedding_projection"))]


def test_projection_without_lookup_is_a_dense_layer():
  """`x @ w.T` of a table without lookups is a dense layer of the `(d_out, d_in)` weight
  (oracle: tests/test_equinox.py::test_plain_x_times_w_transposed); a weight also used as
  `x @ w` makes no one layer of both uses, and the untagged one moves the loss: it is
  generic (`patterns.leaks`; before: the dense layer of its `x @ w` use alone)."""
  rng = np.random.default_rng(0)
  batch = (jnp.asarray(rng.standard_normal((6, 4)), jnp.float32), jnp.zeros(6, jnp.int32))
  params = {"w": jnp.ones((3, 4)), "v": jnp.ones((4, 3))}
  trace = jkfac.layer_table.trace_with_approximations(
      _loss(lambda p, x: (x @ p["w"].T) @ p["v"].T @ p["v"]), params, batch)
  assert [(layer.name, layer.kind, layer.transposed) for layer in trace.layers] == [
      ("w", "dense", True)]
  assert [layer.name for layer in trace.generic] == ["v"]


def test_hand_tagged_projection_alone_is_the_second_term():
  """A projection without lookups: D1 = 0, so `P = (M A2'^-1) / D2'` row by row."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((8, D)), jnp.float32)
  batch = (x, jnp.asarray(rng.integers(0, VOCAB, 8), jnp.int32))
  params = {"table": jnp.asarray(rng.standard_normal((VOCAB, D)), jnp.float32)}

  def apply(p, x):
    return jkfac.register_embedding_projection(x @ p["table"].T, x, p["table"])

  damping = 0.1
  grads, updates, state = _one_step(_loss(apply), params, batch, damping, auto_register=False)
  covariances = state.statistics["table"]
  np.testing.assert_array_equal(covariances["D1"], 0)
  np.testing.assert_allclose(covariances["A2"], x.T @ x / len(x), rtol=1e-5)
  expected = _dense_solve(np.zeros(VOCAB), np.zeros((D, D)), np.asarray(covariances["D2"]),
                          np.asarray(covariances["A2"]), damping, grads["table"])
  np.testing.assert_allclose(updates["table"], expected, rtol=1e-4, atol=1e-6)


class _Cell(nn.Module):
  @nn.compact
  def __call__(self, h, x, embed):
    h = jnp.tanh(nn.Dense(D)(jnp.concatenate([h, x], -1)))
    return h, embed.attend(h)


class _RNN(nn.Module):
  """The projection inside `nn.scan` over time (the table repeated), the lookup outside."""

  @nn.compact
  def __call__(self, ids):
    embed = nn.Embed(VOCAB, D)
    scan = nn.scan(lambda cell, h, x: cell(h, x, embed), variable_broadcast="params",
                   split_rngs={"params": False}, in_axes=1, out_axes=1)
    return scan(_Cell(), jnp.zeros((ids.shape[0], D)), embed(ids))[1]


def _rnn_unrolled(params, ids):
  """`_RNN` as a Python loop in plain jnp: one projection per step."""
  table, dense = params["params"]["Embed_0"]["embedding"], params["params"]["_Cell_0"]["Dense_0"]
  x, h, logits = jnp.take(table, ids, axis=0), jnp.zeros((ids.shape[0], D)), []
  for t in range(ids.shape[1]):
    h = jnp.tanh(jnp.concatenate([h, x[:, t]], -1) @ dense["kernel"] + dense["bias"])
    logits.append(h @ table.T)
  return jnp.stack(logits, axis=1)


def test_projection_in_a_scan_matches_the_unrolled_loop():
  _, _, batch = _setup(seed=6)
  model = _RNN()
  params = model.init(KEY, batch[0])
  scan_loss, unrolled_loss = _loss(model.apply), _loss(_rnn_unrolled)
  layers = {layer.name: layer for layer in jkfac.layer_table.trace_with_approximations(
      scan_loss, params, batch).layers}
  assert (layers[NAME].kind, layers[NAME].scans) == ("tied_embedding", ((), ("repeat",)))
  unrolled = jkfac.layer_table.trace_with_approximations(unrolled_loss, params, batch)
  assert [layer.roles for layer in unrolled.layers if layer.name == NAME] == [
      ("embedding",) + ("embedding_projection",) * TIME]
  _, scan_updates, scan_state = _one_step(scan_loss, params, batch)
  _, unrolled_updates, unrolled_state = _one_step(unrolled_loss, params, batch)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                         (scan_state.statistics, scan_updates),
                         (unrolled_state.statistics, unrolled_updates))


def test_register_embedding_projection_checks_shapes():
  table, x = jnp.zeros((10, 4)), jnp.zeros((2, 3, 4))
  assert jkfac.register_embedding_projection(jnp.zeros((2, 3, 10)), x, table).shape == (2, 3, 10)
  with pytest.raises(ValueError, match="shapes"):
    jkfac.register_embedding_projection(jnp.zeros((2, 3, 9)), x, table)
  with pytest.raises(ValueError, match="shapes"):
    jkfac.register_embedding_projection(jnp.zeros((2, 3, 10)), jnp.zeros((2, 3, 5)), table)


# --- the block -----------------------------------------------------------------------------


def test_factors_equal_hand_computed():
  model, params, batch = _setup(n=6, seed=2)
  _, _, state = _one_step(_loss(model.apply), params, batch)
  hand = dict(zip(("D1", "G1", "D2", "A2"), _hand_factors(params, batch)))
  for name, expected in hand.items():
    np.testing.assert_allclose(state.statistics[NAME][name], expected, rtol=1e-4, atol=1e-7,
                               err_msg=name)


@pytest.mark.parametrize("damping", [1e-3, 0.1])
def test_preconditioned_gradient_is_the_dense_solve(damping):
  model, params, (ids, labels) = _setup(n=3, seed=3)
  batch = (ids % (VOCAB - 1), labels)   # the last id unseen: D1 = 0 there
  grads, updates, _ = _one_step(_loss(model.apply), params, batch, damping)
  d1, g1, d2, a2 = _hand_factors(params, batch)
  assert (d1 == 0).any()
  grad = grads["params"]["Embed_0"]["embedding"]
  expected = _dense_solve(d1, g1, d2, a2, damping, grad)
  np.testing.assert_allclose(updates["params"]["Embed_0"]["embedding"], expected,
                             rtol=1e-4, atol=1e-6 * np.abs(expected).max())


def test_non_finite_inverses_keep_the_previous_ones():
  block = jkfac.blocks.block("tied_embedding", "kron_indep")
  covariances = block.zeros(VOCAB, D)
  previous = block.identity(covariances)
  poisoned = dict(covariances, A2=jnp.full((D, D), jnp.nan))
  new = jkfac.inverses.invert_jointly(block, "eigh", poisoned, jnp.asarray(0.1))
  kept, fell_back = block.finite_or_previous(new, previous)
  assert int(fell_back) == 1
  jax.tree_util.tree_map(np.testing.assert_array_equal, kept, previous)
  m = jnp.arange(VOCAB * D, dtype=jnp.float32).reshape(VOCAB, D)
  np.testing.assert_allclose(block.precondition(previous, m), m, rtol=1e-6, atol=1e-6)


def test_state_never_holds_vocab_squared():
  vocab = 50
  model, params, batch = _setup(vocab)
  loss_fn = _loss(model.apply)
  state = jkfac.kfac(loss_fn, batch, learning_rate=0.1, damping=1e-3).init(params)
  _nets.assert_no_square_of(state, vocab)
  kstate = jkfac.precondition(loss_fn, batch, damping=1e-3).init(params)
  assert {k: v.shape for k, v in kstate.statistics[NAME].items()} == {
      "D1": (vocab,), "G1": (D, D), "D2": (vocab,), "A2": (D, D)}
  assert {k: v.shape for k, v in kstate.inverses[NAME].items()} == {
      "Q": (D, D), "s": (D,), "D1": (vocab,), "D2": (vocab,)}


def test_describe_shows_the_tied_layer():
  model, params, batch = _setup()
  description = jkfac.describe(_loss(model.apply), params, batch)
  row, = [p for p in description.parameters if p.path == f"{NAME}/embedding"]
  assert (row.layer, row.kind, row.approximation) == (NAME, "tied_embedding", "kron_indep")
  assert row.factors == f"A2 {D}x{D}, D1 {VOCAB}, D2 {VOCAB}, G1 {D}x{D}"
  assert row.state_bytes == 4 * (2 * VOCAB + 2 * D * D + 2 * VOCAB + D * D + D)
  assert "tied_embedding" in str(description)


def test_first_kfac_step_is_the_dense_solve_and_the_kronecker_solve():
  """The first `jkfac.kfac` step (float64, inverting at once) of `TinyLM` on sequence
  labels is `-lr` times the dense solve of the tied table's block with the factors by
  hand, and the Kronecker solve of the dense layer from its captured input and output
  gradients (the loss's rows are examples x positions)."""
  lr, damping = 0.1, 1e-2
  model, params, (ids, _) = _setup(n=16, seed=4)
  batch = (ids, (ids + 1) % VOCAB)   # the next id
  loss_fn = _loss(model.apply)
  with jax.enable_x64(True):
    params = jax.tree_util.tree_map(lambda p: p.astype(jnp.float64), params)
    tx = jkfac.kfac(loss_fn, batch, learning_rate=lr, damping=damping, invert_every=1,
                    estimation="empirical", warm_start=False)
    grads = jax.jit(jax.grad(loss_fn))(params, batch)
    updates, _ = jax.jit(lambda g: tx.update(g, tx.init(params), params, batch=batch))(grads)
    factors = _hand_factors(params, batch)
    [(inputs, output_grads)] = _nets.linen_layer_calls(
        lambda ids: model.apply(params, ids), ids,
        lambda logits: optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean(),
        (nn.Dense,))["Dense_0"]
  expected = -lr * _dense_solve(*factors, damping, grads["params"]["Embed_0"]["embedding"])
  np.testing.assert_allclose(updates["params"]["Embed_0"]["embedding"], expected, rtol=1e-7,
                             atol=1e-10)
  A, G = _nets.empirical_kron_factors(inputs, output_grads, rows=ids.size)
  expected = -lr * _nets.kron_solve(A, G, _nets.layer_matrix(grads["params"], "Dense_0"), damping)
  np.testing.assert_allclose(_nets.layer_matrix(updates["params"], "Dense_0"), expected,
                             rtol=1e-7, atol=1e-10)


_PMAP_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    import jkfac
    from jkfac import parallel
    from tests import test_tied_embedding as t

    model, params, batch = t._setup(n=8, seed=5)
    loss_fn = t._loss(model.apply)
    results = []
    for axis in (None, "d"):
      example = jax.tree_util.tree_map(lambda x: x[:4], batch) if axis else batch
      tx = jkfac.precondition(loss_fn, example,
                              damping=0.1, cov_ema_decay=0.0, invert_every=1,
                              estimation="empirical", axis_name=axis)
      def step(params, batch, tx=tx):
        grads = jax.grad(loss_fn)(params, batch)
        return tx.update(grads, tx.init(params), params, batch=batch)[0]
      if axis:
        out = jax.pmap(step, axis_name="d", in_axes=(None, 0))(params,
                                                              parallel.split_batch(batch, 2))
        out = jax.tree_util.tree_map(lambda x: x[0], out)
      else:
        out = jax.jit(step)(params, batch)
      results.append(out)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                           *results)
    print("ok")
""")


def test_round_robin_under_pmap_matches_one_device():
  """The joint inversion is one task of `parallel.run_tasks` on two devices."""
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()  # conftest's fast compile kept
           if not f.startswith("--xla_force_host_platform_device_count")]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.getcwd(),
             XLA_FLAGS=" ".join(flags + ["--xla_force_host_platform_device_count=2"]))
  result = subprocess.run([sys.executable, "-c", _PMAP_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0 and "ok" in result.stdout, result.stdout + result.stderr
