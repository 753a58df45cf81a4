"""Embedding layers: a Kronecker block with a diagonal input factor, never vocab x vocab.

A = diag(counts) of the id frequencies, G the summed outer products of the output
cotangents; the state keeps A as a `(vocab,)` vector. `flax.linen.Embed` is registered
automatically, the same as `jkfac.register_embedding` by hand (a tied table, also the
output projection, is tests/test_tied_embedding.py's).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jkfac
from tests import _nets
from jkfac import layer_collection

KEY = jax.random.PRNGKey(0)
CLASSES = 4
POSITIONS = 3


class Auto(nn.Module):
  """Untagged: `flax.linen.Embed`, mean over positions, a dense layer (or the tied table)."""
  vocab: int
  d: int = 5
  tied: bool = False

  @nn.compact
  def __call__(self, ids):
    embed = nn.Embed(self.vocab, self.d)
    h = embed(ids).mean(axis=1)
    return embed.attend(h) if self.tied else nn.Dense(CLASSES)(h)


def _hand_logits(params, ids, use_layer_collection=False):
  """`Auto` with the embedding tagged by hand, on `Auto`'s parameters."""
  table = params["params"]["Embed_0"]["embedding"]
  y = jnp.take(table, ids, axis=0)
  if use_layer_collection:
    y = layer_collection.register_embedding(table, ids, y)
  else:
    y = jkfac.register_embedding(y, ids, table)
  dense = params["params"]["Dense_0"]
  return y.mean(axis=1) @ dense["kernel"] + dense["bias"]


def _loss(logits_fn):
  def loss_fn(params, batch):
    ids, labels = batch
    logits = jkfac.register_softmax_cross_entropy(logits_fn(params, ids), labels)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return loss_fn


def _setup(vocab, n=6, seed=0, tied=False):
  model = Auto(vocab, tied=tied)
  rng = np.random.default_rng(seed)
  ids = jnp.asarray(rng.integers(0, vocab, (n, POSITIONS)), jnp.int32)
  labels = jnp.asarray(ids[:, 0] % (vocab if tied else CLASSES))
  params = model.init(KEY, ids)
  return model, params, (ids, labels)


def _one_step_state(loss_fn, params, batch, damping=0.1):
  """The precondition state and update after one step: the EMAs equal this batch's."""
  tx = jkfac.precondition(loss_fn, batch, damping=damping, cov_ema_decay=0.0, invert_every=1,
                          estimation="empirical")
  grads = jax.grad(loss_fn)(params, batch)
  updates, state = jax.jit(tx.update)(grads, tx.init(params), params, batch=batch)
  return grads, updates, state


def _hand_factors(params, batch):
  """counts and G computed by hand from the ids and the gradients at the lookup.

  G is the mean over examples of the per-example `sum_t g_t g_t^T`: with `g` the
  gradient of the batch-mean loss (1/n per example), that is `n * g^T g`.
  """
  ids, labels = batch
  table = params["params"]["Embed_0"]["embedding"]
  dense = params["params"]["Dense_0"]
  counts = np.bincount(np.asarray(ids).ravel(), minlength=table.shape[0]) / ids.size

  def loss_of_lookup(y):
    logits = y.mean(axis=1) @ dense["kernel"] + dense["bias"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  g = np.asarray(jax.grad(loss_of_lookup)(jnp.take(table, ids, axis=0))).reshape(-1, table.shape[1])
  return counts, ids.shape[0] * g.T @ g


def test_state_never_holds_vocab_squared():
  vocab = 1000
  model, params, batch = _setup(vocab)
  loss_fn = _loss(model.apply)
  state = jkfac.kfac(loss_fn, batch, learning_rate=0.1, damping=1e-3).init(params)
  _nets.assert_no_square_of(state, vocab)
  kstate = jkfac.precondition(loss_fn, batch, damping=1e-3).init(params)
  assert kstate.statistics["params/Embed_0"]["A"].shape == (vocab,)
  assert kstate.inverses["params/Embed_0"]["A"].shape == (vocab,)
  assert kstate.statistics["params/Embed_0"]["G"].shape == (5, 5)
  description = str(jkfac.describe(loss_fn, params, batch))
  assert "embedding" in description and "A 1000, G 5x5" in description


def test_factors_equal_hand_computed():
  model, params, batch = _setup(vocab=11, n=8)
  _, _, state = _one_step_state(_loss(model.apply), params, batch)
  counts, g = _hand_factors(params, batch)
  covariances = state.statistics["params/Embed_0"]
  np.testing.assert_allclose(covariances["A"], counts, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(covariances["G"], g, rtol=1e-4, atol=1e-8)


def test_preconditioned_gradient_matches_dense_formula():
  vocab, damping = 7, 0.1
  model, params, batch = _setup(vocab, n=5, seed=1)  # some ids unseen: counts of 0
  grads, updates, _ = _one_step_state(_loss(model.apply), params, batch, damping)
  counts, g = _hand_factors(params, batch)
  assert (counts == 0).any()
  d = g.shape[0]
  pi = np.sqrt((counts.sum() / vocab) / (np.trace(g) / d))
  root = np.sqrt(damping)
  m = np.asarray(grads["params"]["Embed_0"]["embedding"], np.float64)
  expected = (np.linalg.inv(np.diag(counts) + pi * root * np.eye(vocab)) @ m
              @ np.linalg.inv(g + root / pi * np.eye(d)))
  np.testing.assert_allclose(updates["params"]["Embed_0"]["embedding"], expected, rtol=1e-4,
                             atol=1e-6)


@pytest.mark.parametrize("use_layer_collection", [False, True])
def test_flax_embed_auto_registers_as_hand_tag(use_layer_collection):
  model, params, batch = _setup(vocab=13, n=8, seed=2)
  auto_loss = _loss(model.apply)
  hand_loss = _loss(lambda p, ids: _hand_logits(p, ids, use_layer_collection))
  auto = jkfac.layer_table.trace_with_approximations(auto_loss, params, batch)
  hand = jkfac.layer_table.trace_with_approximations(hand_loss, params, batch,
                                                   auto_register=False)
  auto_embed, = [layer for layer in auto.layers if layer.kind == "embedding"]
  hand_embed, = [layer for layer in hand.layers if layer.kind == "embedding"]
  assert auto_embed == hand_embed
  assert auto_embed.input_shape == batch[0].shape
  _, auto_updates, auto_state = _one_step_state(auto_loss, params, batch)
  _, hand_updates, hand_state = _one_step_state(hand_loss, params, batch)
  for name in ("A", "G"):
    np.testing.assert_allclose(auto_state.statistics["params/Embed_0"][name],
                               hand_state.statistics["params/Embed_0"][name], rtol=1e-6)
  np.testing.assert_allclose(auto_updates["params"]["Embed_0"]["embedding"],
                             hand_updates["params"]["Embed_0"]["embedding"], rtol=1e-5,
                             atol=1e-7)


def test_jnp_take_is_registered():
  model, params, batch = _setup(vocab=9)

  def logits(p, ids):
    dense = p["params"]["Dense_0"]
    y = jnp.take(p["params"]["Embed_0"]["embedding"], ids, axis=0)
    return y.mean(axis=1) @ dense["kernel"] + dense["bias"]

  trace = jkfac.layer_table.trace_with_approximations(_loss(logits), params, batch)
  assert sorted(layer.kind for layer in trace.layers) == ["dense", "embedding"]


def test_tied_embedding_is_one_tied_layer():
  """A table that is also the output projection: see tests/test_tied_embedding.py."""
  model, params, batch = _setup(vocab=9, tied=True)
  trace = jkfac.layer_table.trace_with_approximations(_loss(model.apply), params, batch)
  layer, = trace.layers
  assert (layer.name, layer.kind, layer.approx) == ("params/Embed_0", "tied_embedding",
                                                    "kron_indep")
  assert not trace.generic


def test_register_embedding_checks_shapes():
  table, ids = jnp.zeros((10, 4)), jnp.zeros((2, 3), jnp.int32)
  with pytest.raises(ValueError, match="shapes"):
    jkfac.register_embedding(jnp.zeros((2, 3, 5)), ids, table)
  with pytest.raises(ValueError, match="shapes"):
    jkfac.register_embedding(jnp.zeros((2, 3, 4)), ids, jnp.zeros((10, 4, 1)))
  with pytest.raises(ValueError, match="integers"):
    jkfac.register_embedding(jnp.zeros((2, 3, 4)), ids.astype(jnp.float32), table)


def test_first_kfac_step_is_the_kronecker_solve_of_both_layers():
  """The first `jkfac.kfac` step of the untagged model (float64, inverting at once) is
  `-lr` times the embedding's solve with diag(counts) and G by hand, and the dense
  layer's with A and G from its input and output gradients captured from flax."""
  lr, damping = 0.1, 1e-2
  with jax.enable_x64(True):
    model, params, batch = _setup(vocab=20, n=32, seed=3)
    params = jax.tree_util.tree_map(lambda p: p.astype(jnp.float64), params)
    loss_fn = _loss(model.apply)
    tx = jkfac.kfac(loss_fn, batch, learning_rate=lr, damping=damping, invert_every=1,
                    estimation="empirical", warm_start=False)
    grads = jax.jit(jax.grad(loss_fn))(params, batch)
    updates, _ = jax.jit(lambda g: tx.update(g, tx.init(params), params, batch=batch))(grads)
    counts, g = _hand_factors(params, batch)
    [(inputs, output_grads)] = _nets.linen_layer_calls(
        lambda ids: model.apply(params, ids), batch[0],
        lambda logits: optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean(),
        (nn.Dense,))["Dense_0"]
  expected = -lr * _nets.kron_solve(counts, g, grads["params"]["Embed_0"]["embedding"], damping)
  np.testing.assert_allclose(updates["params"]["Embed_0"]["embedding"], expected, rtol=1e-7,
                             atol=1e-10)
  A, G = _nets.empirical_kron_factors(inputs, output_grads)
  expected = -lr * _nets.kron_solve(A, G, _nets.layer_matrix(grads["params"], "Dense_0"), damping)
  np.testing.assert_allclose(_nets.layer_matrix(updates["params"], "Dense_0"), expected,
                             rtol=1e-7, atol=1e-10)
