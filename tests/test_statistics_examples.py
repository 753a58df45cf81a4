"""Statistics from at most `max_statistics_examples` of a batch's examples.

Oracles: a cut batch holds the same original rows in every leaf of the batch's leading
size; the statistics of a cut batch equal the uncut statistics of the batch made of the
rows it kept (read off the first layer's input factor, whose inputs are basis vectors);
a batch whose cut would change a layer gives a warning and the statistics of every
example.
"""

import collections
import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jkfac
from jkfac import sampling, statistics_examples

N, D, CUT = 16, 16, 4


class _Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    hidden = jnp.tanh(nn.Dense(8, name="hidden")(x))
    return nn.Dense(3, name="out")(hidden)


def _loss(params, batch):
  logits = _Net().apply({"params": params}, batch["x"])
  jkfac.register_softmax_cross_entropy(logits, batch["y"])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


def _batch():
  return {"x": jnp.eye(N, D), "y": jnp.arange(N) % 3}


def _params():
  return _Net().init(jax.random.PRNGKey(0), jnp.zeros((1, D)))["params"]


def _statistics(loss_fn, batch, params=None, **settings):
  """The statistics after one statistics step of `jkfac.precondition` (empirical Fisher:
  no sampled targets, so only the examples read matter)."""
  params = _params() if params is None else params
  tx = jkfac.precondition(loss_fn, batch, damping=1e-3, estimation="empirical", **settings)
  grads = jax.grad(loss_fn)(params, batch)
  _, state = jax.jit(lambda g, s, p, b: tx.update(g, s, p, batch=b))(
      grads, tx.init(params), params, batch)
  return state.statistics


def test_batch_size_is_the_leading_size_most_leaves_share():
  assert statistics_examples.batch_size(
      {"x": np.zeros((8, 3)), "y": np.zeros(8), "key": np.zeros(2)}) == 8
  assert statistics_examples.batch_size({"a": np.zeros(4), "b": np.zeros((6, 2))}) == 6
  assert statistics_examples.batch_size({"step": np.zeros(())}) is None


def test_a_cut_keeps_the_same_distinct_rows_in_every_leaf_of_the_batch_size():
  batch = {"x": jnp.arange(10.0)[:, None] * jnp.ones(3), "y": jnp.arange(10),
           "key": jax.random.PRNGKey(3)}
  cut = statistics_examples.cut(batch, 4, jax.random.PRNGKey(1))
  assert cut["x"].shape == (4, 3) and cut["y"].shape == (4,)
  np.testing.assert_array_equal(cut["x"][:, 0], cut["y"])
  np.testing.assert_array_equal(cut["x"], cut["x"][:, :1] * np.ones(3))
  assert len(set(np.asarray(cut["y"]).tolist())) == 4
  np.testing.assert_array_equal(cut["key"], batch["key"])
  assert statistics_examples.cut(batch, 10, jax.random.PRNGKey(1)) is batch


def test_cut_statistics_are_the_uncut_statistics_of_the_rows_kept():
  batch = _batch()
  cut = _statistics(_loss, batch, max_statistics_examples=CUT)
  # The first layer's inputs are basis vectors (with the bias's trailing 1): its A is
  # the mean over the rows read, so its diagonal shows which rows, each with 1/CUT.
  first = np.asarray(cut["hidden"]["A"])
  kept = np.nonzero(np.diag(first)[:D] > 0)[0]
  assert len(kept) == CUT
  np.testing.assert_allclose(np.diag(first)[kept], first[-1, -1] / CUT, rtol=1e-6)
  rows = {key: value[kept] for key, value in batch.items()}
  expected = _statistics(_loss, rows)
  for layer in expected:
    for factor in expected[layer]:
      np.testing.assert_allclose(cut[layer][factor], expected[layer][factor], rtol=1e-5,
                                 atol=1e-8, err_msg=f"{layer} {factor}")


def test_a_batch_no_larger_than_the_cut_is_read_whole():
  batch = _batch()
  whole = _statistics(_loss, batch)
  same = _statistics(_loss, batch, max_statistics_examples=N)
  jax.tree_util.tree_map(np.testing.assert_array_equal, same, whole)


class _NetWithContext(nn.Module):
  """`_Net` plus a layer on the batch's mean input: one row, cut or not."""

  @nn.compact
  def __call__(self, x):
    context = nn.Dense(3, name="context")(x.mean(0, keepdims=True))
    return _Net(name="net")(x) + context


def _loss_with_a_batch_wide_layer(params, batch):
  logits = _NetWithContext().apply({"params": params}, batch["x"])
  jkfac.register_softmax_cross_entropy(logits, batch["y"])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


def test_a_cut_that_would_change_a_layer_warns_and_reads_every_example():
  batch, loss_fn = _batch(), _loss_with_a_batch_wide_layer
  params = _NetWithContext().init(jax.random.PRNGKey(0), jnp.zeros((1, D)))["params"]
  reason = statistics_examples.why_not_cut(loss_fn, params, batch, CUT, True)
  assert reason is not None and "layer 'context/kernel'" in reason
  with pytest.warns(UserWarning, match="max_statistics_examples=4"):
    cut = _statistics(loss_fn, batch, params, max_statistics_examples=CUT)
  whole = _statistics(loss_fn, batch, params)
  jax.tree_util.tree_map(np.testing.assert_array_equal, cut, whole)


def test_a_loss_that_fails_on_fewer_examples_is_named():
  def fixed_size_loss(params, batch):
    logits = _Net().apply({"params": params}, batch["x"].reshape(N, D))
    jkfac.register_softmax_cross_entropy(logits, batch["y"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

  reason = statistics_examples.why_not_cut(fixed_size_loss, _params(), _batch(), CUT, True)
  assert reason is not None and "fails on 4 of the batch's 16 examples" in reason


@pytest.mark.parametrize("bad", [0, -3, 2.5, "512"])
def test_bad_max_statistics_examples_raise(bad):
  with pytest.raises(ValueError, match="max_statistics_examples"):
    jkfac.precondition(_loss, _batch(), damping=1e-3, max_statistics_examples=bad)


def test_kfac_reads_at_most_512_examples_by_default():
  assert inspect.signature(jkfac.kfac).parameters["max_statistics_examples"].default == "auto"
  assert statistics_examples.AUTO_EXAMPLES == 512
  assert inspect.signature(
      jkfac.precondition).parameters["max_statistics_examples"].default is None


def test_auto_reads_512_examples_of_a_larger_batch():
  batch = {"x": jnp.tile(jnp.eye(N, D), (64, 1)), "y": jnp.arange(64 * N) % 3}
  config = jkfac.PreconditionConfig(_loss, batch, damping=1e-3,
                                    max_statistics_examples="auto")
  assert config.examples_bound == 512
  # Every basis vector is 64 of the 1024 rows: read whole, the first layer's A has equal
  # diagonal entries; 512 random rows make them unequal.
  cut = np.diag(np.asarray(_statistics(_loss, batch, max_statistics_examples="auto")
                           ["hidden"]["A"]))[:D]
  whole = np.diag(np.asarray(_statistics(_loss, batch)["hidden"]["A"]))[:D]
  np.testing.assert_allclose(whole, whole[0], rtol=1e-5)
  assert np.ptp(cut) > 0.1 * cut.mean()


def test_random_subsets_are_distinct_uniform_draws():
  """`sampling.random_subset`: distinct indices in range; over many keys each index is
  drawn with probability count/total (within 5 standard errors), and each of the
  C(5, 2) = 10 pairs of a 2-of-5 draw with probability 1/10."""
  total, count, draws = 40, 7, 4000
  subsets = np.asarray(jax.jit(jax.vmap(lambda k: sampling.random_subset(k, total, count)))(
      jax.random.split(jax.random.PRNGKey(0), draws)))
  assert subsets.shape == (draws, count) and subsets.min() >= 0 and subsets.max() < total
  assert all(len(set(row)) == count for row in subsets)
  p = count / total
  frequency = np.bincount(subsets.ravel(), minlength=total) / draws
  assert np.abs(frequency - p).max() <= 5 * np.sqrt(p * (1 - p) / draws)
  pairs = np.sort(np.asarray(jax.vmap(lambda k: sampling.random_subset(k, 5, 2))(
      jax.random.split(jax.random.PRNGKey(1), draws))), axis=1)
  counts = collections.Counter(map(tuple, pairs))
  assert len(counts) == 10
  assert max(abs(c / draws - 0.1) for c in counts.values()) <= 5 * np.sqrt(0.09 / draws)
