"""K-FAC for part of a model: `optax.masked` and `optax.multi_transform` around jkfac.

Oracle: blocks are per layer, so the K-FAC update of the labelled layers equals the
update that jkfac computes for the same layers on the whole model; the other labels
get their own optimizer's update.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jkfac


class _Net(nn.Module):
  @nn.compact
  def __call__(self, ids):
    x = nn.Embed(7, 4)(ids).reshape(ids.shape[0], -1)
    return nn.Dense(3)(jnp.tanh(nn.Dense(5)(x)))


_MODEL = _Net()
_BATCH = {"ids": jax.random.randint(jax.random.PRNGKey(1), (8, 2), 0, 7),
          "y": jnp.arange(8) % 3}
_PARAMS = _MODEL.init(jax.random.PRNGKey(0), _BATCH["ids"])["params"]
_LABELS = {"Embed_0": "adam", "Dense_0": "kfac", "Dense_1": "kfac"}


def _loss(params, batch):
  logits = _MODEL.apply({"params": params}, batch["ids"])
  jkfac.register_softmax_cross_entropy(logits, batch["y"])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


def _kfac(**kwargs):
  return jkfac.kfac(_loss, _BATCH, learning_rate=0.1, damping=1e-2, invert_every=1,
                    estimation="empirical", **kwargs)


def _run(tx, steps: int = 2, **extra):
  @jax.jit
  def run(params):
    state, updates = tx.init(params), []
    for _ in range(steps):
      grads = jax.grad(_loss)(params, _BATCH)
      update, state = tx.update(grads, state, params, batch=_BATCH, **extra)
      params = optax.apply_updates(params, update)
      updates.append(update)
    return updates, state
  return run(_PARAMS)


def _assert_close(a, b):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_multi_transform_kfac_for_the_body_adam_for_the_embeddings():
  tx = optax.multi_transform({"kfac": _kfac(example_params=_PARAMS), "adam": optax.adam(1e-2)},
                             _LABELS)
  updates, state = _run(tx, model_params=_PARAMS)
  kfac_state = jkfac.preconditioner_state(state.inner_states["kfac"].inner_state)
  assert set(kfac_state.statistics) == {"Dense_0", "Dense_1"}  # no block for the table
  # At the first step (same parameters), the body's updates equal jkfac on the whole
  # model (blocks are per layer) and the table's equal Adam's.
  whole, _ = _run(_kfac())
  adam, _ = _run(optax.adam(1e-2))
  for name in ("Dense_0", "Dense_1"):
    for leaf in ("kernel", "bias"):
      _assert_close(updates[0][name][leaf], whole[0][name][leaf])
  assert all(np.isfinite(u).all() for u in jax.tree_util.tree_leaves(updates[1]))
  _assert_close(updates[0]["Embed_0"]["embedding"], adam[0]["Embed_0"]["embedding"])


def test_masked_kfac_leaves_the_other_parameters_to_the_chain():
  mask = {name: label == "kfac" for name, label in _LABELS.items()}
  tx = optax.masked(_kfac(example_params=_PARAMS), mask)
  updates, _ = _run(tx, steps=1, model_params=_PARAMS)
  whole, _ = _run(_kfac(), steps=1)
  _assert_close(updates[0]["Dense_1"]["kernel"], whole[0]["Dense_1"]["kernel"])
  grads = jax.grad(_loss)(_PARAMS, _BATCH)  # masked-out leaves pass through unchanged
  _assert_close(updates[0]["Embed_0"]["embedding"], grads["Embed_0"]["embedding"])


def test_masked_kfac_says_what_it_needs():
  mask = {name: label == "kfac" for name, label in _LABELS.items()}
  with pytest.raises(ValueError, match="example_params"):
    optax.masked(_kfac(), mask).init(_PARAMS)
  tx = optax.masked(_kfac(example_params=_PARAMS), mask)
  state = tx.init(_PARAMS)
  with pytest.raises(ValueError, match="model_params"):
    tx.update(jax.grad(_loss)(_PARAMS, _BATCH), state, _PARAMS, batch=_BATCH)
  split = {"Embed_0": True, "Dense_0": {"kernel": True, "bias": False}, "Dense_1": True}
  with pytest.raises(ValueError, match="splits the K-FAC layer 'Dense_0'"):
    optax.masked(_kfac(example_params=_PARAMS), split).init(_PARAMS)
