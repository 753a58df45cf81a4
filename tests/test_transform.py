"""`jkfac.precondition` and `jkfac.kfac` as optax transformations.

Most tests use a tiny two-layer MLP written in plain JAX (`_nets.mlp_params`, tagged with
`jkfac.register_dense`) so that reference statistics can be computed
independently of the tracer from per-example gradients.
"""

import functools
import math
import os
import pathlib
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jkfac
from tests import _nets
from tests._asserts import assert_trees_close
from examples import mnist_data

SIZES = (5, 4, 3)  # input, hidden, classes
BATCH = 8
LAYERS = ("dense0", "dense1")
MNIST_DIR = mnist_data.BUNDLED_DIR


# --- a tiny tagged MLP and its data ----------------------------------------------------------


def mlp_params(seed=0, dtype=jnp.float32):
  return _nets.mlp_params(SIZES, seed, dtype)


def mlp_forward(params, x, tag=True):
  """Logits, and the input of each layer."""
  return _nets.mlp_apply(params, x, tag=tag, with_inputs=True)


def loss_fn(params, batch):
  logits, _ = mlp_forward(params, batch["x"])
  logits = jkfac.register_softmax_cross_entropy(logits, batch["y"])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


def make_batch(step=0, dtype=jnp.float32):
  kx, ky = jax.random.split(jax.random.PRNGKey(100 + step))
  return {"x": jax.random.normal(kx, (BATCH, SIZES[0]), dtype),
          "y": jax.random.randint(ky, (BATCH,), 0, SIZES[-1])}


def perturbed(params, step):
  """Different parameters for each step (for tests that feed params by hand)."""
  leaves, treedef = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(1000 + step), len(leaves))
  return jax.tree_util.tree_unflatten(
      treedef, [p + 0.3 * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)])


def precondition_state(opt_state):
  """The `PreconditionState` inside an optimizer state (e.g. of `kfac`'s chain)."""
  found = [s for s in jax.tree_util.tree_leaves(
      opt_state, is_leaf=lambda s: isinstance(s, jkfac.PreconditionState))
           if isinstance(s, jkfac.PreconditionState)]
  assert len(found) == 1, opt_state
  return found[0]


def update_step(tx):
  """`(params, opt_state, batch) -> (updates, opt_state)` with the gradients of `loss_fn`."""
  def step(params, opt_state, batch):
    grads = jax.grad(loss_fn)(params, batch)
    return tx.update(grads, opt_state, params, batch=batch)
  return step


def train(tx, steps, *, jit=True, params=None, feed_params=False):
  """Runs `steps` updates; yields (step, params, updates, opt_state) after each.

  With `feed_params`, step i uses `perturbed(params, i)` instead of the trained ones.
  """
  params = mlp_params() if params is None else params
  step_fn = update_step(tx)
  step_fn = jax.jit(step_fn) if jit else step_fn
  opt_state = tx.init(params)
  for i in range(steps):
    p = perturbed(params, i) if feed_params else params
    updates, opt_state = step_fn(p, opt_state, make_batch(i))
    yield i, p, updates, opt_state
    if not feed_params:
      params = optax.apply_updates(params, updates)


def trees_equal(a, b):
  return all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(
      lambda x, y: bool(np.array_equal(np.asarray(x), np.asarray(y))), a, b)))


# --- reference statistics from per-example gradients -----------------------------------------


@functools.partial(jax.jit, static_argnums=2)
def reference_statistics(params, batch, estimation):
  """Per layer: the batch's K-FAC factors A, G, its diagonal and full Fisher blocks.

  Built from per-example, per-column gradients `d (u . logits_n) / d theta` with
  `u` the loss cotangent of the estimator (empirical: softmax - onehot; exact: the
  columns sqrt(p_k) (e_k - p) of a square root of the softmax Fisher).
  """
  x, labels = batch["x"], batch["y"]
  n = x.shape[0]
  logits, inputs = mlp_forward(params, x, tag=False)
  p = jax.nn.softmax(logits)
  eye = jnp.eye(p.shape[-1])
  if estimation == "empirical":
    cols = (p - jax.nn.one_hot(labels, p.shape[-1]))[None]            # (1, n, C)
  elif estimation == "exact":
    cols = jnp.sqrt(p).T[:, :, None] * (eye[:, None, :] - p[None])    # (C, n, C)
  else:
    raise ValueError(estimation)

  def column_grad(u, x_n):
    return jax.grad(lambda q: jnp.dot(u, mlp_forward(q, x_n[None], tag=False)[0][0]))(params)

  grads = jax.vmap(jax.vmap(column_grad, in_axes=(0, 0)), in_axes=(0, None))(cols, x)
  stats = {}
  for name in LAYERS:
    kernel, bias = grads[name]["kernel"], grads[name]["bias"]        # (K, n, ...)
    matrix = jnp.concatenate([kernel, bias[:, :, None, :]], axis=2)  # (K, n, d_in + 1, d_out)
    a = jnp.concatenate([inputs[name], jnp.ones((n, 1))], axis=1)
    vec = matrix.reshape(-1, matrix.shape[2] * matrix.shape[3])
    g = bias.reshape(-1, bias.shape[-1])
    stats[name] = {"A": a.T @ a / n, "G": g.T @ g / n,
                   "diagonal": jnp.sum(matrix ** 2, axis=(0, 1)) / n, "F": vec.T @ vec / n}
  return stats


# --- jit == eager ------------------------------------------------------------------------------


@pytest.mark.parametrize("cov_update_every,invert_every,steps", [
    (1, 2, 3),  # steps 0, 2 invert; step 1 only updates statistics
    (3, 2, 4),  # step 0 both, 1 neither, 2 only inverts, 3 only updates statistics
])
def test_jit_matches_eager(cov_update_every, invert_every, steps):
  tx = jkfac.kfac(loss_fn, make_batch(), learning_rate=0.3, damping=1e-2, momentum=0.5,
                  cov_update_every=cov_update_every, invert_every=invert_every,
                  estimation="fisher", approximations={"dense1": "diagonal"}, warm_start=False)
  eager = list(train(tx, steps, jit=False))
  jitted = list(train(tx, steps, jit=True))
  for (i, p_e, u_e, s_e), (_, p_j, u_j, s_j) in zip(eager, jitted):
    assert_trees_close(u_e, u_j, rtol=1e-4, atol=1e-5)
    assert_trees_close(s_e, s_j, rtol=1e-4, atol=1e-5)
    assert_trees_close(p_e, p_j, rtol=1e-4, atol=1e-5)
  # The updates are preconditioned, not the raw gradients (else the test compares little).
  grads = jax.grad(loss_fn)(mlp_params(), make_batch(0))
  assert not np.allclose(eager[0][2]["dense0"]["kernel"], -0.3 * grads["dense0"]["kernel"],
                         rtol=1e-2)


# --- the state ---------------------------------------------------------------------------------


def test_precondition_state_fields():
  assert jkfac.PreconditionState._fields == (
      "count", "key", "ema_weight", "damping", "statistics", "inverses", "skipped_steps",
      "inverse_fallbacks", "curvature_scale")
  tx = jkfac.precondition(loss_fn, make_batch(), damping=1e-2,
                          approximations={"dense0": "full", "dense1": "diagonal"})
  state = tx.init(mlp_params())
  assert isinstance(state, jkfac.PreconditionState)
  assert int(state.count) == 0
  assert float(state.ema_weight) == 0.0
  shapes = jax.tree_util.tree_map(lambda x: x.shape, (state.statistics, state.inverses))
  expected = {"dense0": {"F": (24, 24)}, "dense1": {"diagonal": (5, 3)}}
  assert shapes == (expected, expected)
  kron_state = jkfac.precondition(loss_fn, make_batch(), damping=1e-2).init(mlp_params())
  assert jax.tree_util.tree_map(lambda x: x.shape, kron_state.statistics) == {
      "dense0": {"A": (6, 6), "G": (4, 4)}, "dense1": {"A": (5, 5), "G": (3, 3)}}


@pytest.mark.parametrize("make_tx", [
    lambda: jkfac.precondition(loss_fn, make_batch(), damping=1e-2),
    lambda: jkfac.kfac(loss_fn, make_batch(), learning_rate=0.1, damping=1e-2),
], ids=["precondition", "kfac"])
def test_state_is_a_pytree_of_arrays(make_tx):
  tx = make_tx()
  init_state = tx.init(mlp_params())
  *_, (_, _, _, stepped_state) = train(tx, 2)
  for state in (init_state, stepped_state):
    leaves, treedef = jax.tree_util.tree_flatten(state)
    assert leaves and all(isinstance(leaf, jax.Array) for leaf in leaves), [
        type(leaf) for leaf in leaves]
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert type(rebuilt) is type(state)
    assert jax.tree_util.tree_structure(rebuilt) == treedef
    assert trees_equal(rebuilt, state)
    moved = jax.device_put(state, jax.devices()[0])
    assert jax.tree_util.tree_structure(moved) == treedef
    assert trees_equal(moved, state)
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree_util.tree_leaves(moved))
  assert int(precondition_state(stepped_state).count) == 2


# --- compiled once -------------------------------------------------------------------------------


def test_jitted_train_step_is_traced_once():
  tx = jkfac.kfac(loss_fn, make_batch(), learning_rate=0.1, damping=1e-2, invert_every=3,
                  cov_update_every=2, warm_start=False)
  traces = []

  @jax.jit
  def train_step(params, opt_state, batch):
    traces.append(1)  # Python side effect: runs once per trace.
    grads = jax.grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params, batch=batch)
    return optax.apply_updates(params, updates), opt_state

  params = mlp_params()
  opt_state = tx.init(params)
  inverses = []
  for i in range(12):
    params, opt_state = train_step(params, opt_state, make_batch(i))
    inverses.append(precondition_state(opt_state).inverses)
  assert len(traces) == 1
  assert train_step._cache_size() == 1
  assert int(precondition_state(opt_state).count) == 12
  # The compiled step did recompute the inverses on the steps after step 0.
  assert not trees_equal(inverses[2], inverses[3])
  assert trees_equal(inverses[3], inverses[4])


@pytest.mark.parametrize("make_tx", [
    lambda: jkfac.precondition(loss_fn, make_batch(), damping=1e-2),
    lambda: jkfac.kfac(loss_fn, make_batch()),
    lambda: jkfac.kfac(loss_fn, make_batch(), learning_rate=1e-2, graft="adam"),
    lambda: jkfac.eigen_adam(loss_fn, make_batch(), learning_rate=1e-2),
    lambda: optax.inject_hyperparams(jkfac.kfac, static_args=("loss_fn", "example_batch"))(
        loss_fn=loss_fn, example_batch=make_batch(), damping=1e-2),
], ids=["precondition", "kfac", "graft", "eigen_adam", "inject_hyperparams"])
def test_a_donated_state_steps_as_a_kept_one(make_tx):
  """`jax.jit(step, donate_argnums=...)`, as Flax training loops write it: every leaf of
  the state has a buffer of its own (before: "Attempt to donate the same buffer twice"
  at the first step, from counters and zeros shared by several leaves, and from an
  injected damping kept as it was given), and donating changes no value."""
  tx = make_tx()

  def step(params, opt_state, batch):
    grads = jax.grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params, batch=batch)
    return optax.apply_updates(params, updates), opt_state

  donated, kept = jax.jit(step, donate_argnums=(0, 1)), jax.jit(step)
  params = mlp_params()
  ours = (jax.tree_util.tree_map(jnp.copy, params), tx.init(params))
  theirs = (params, tx.init(params))
  for i in range(3):
    ours = donated(*ours, make_batch(i))
    theirs = kept(*theirs, make_batch(i))
  assert trees_equal(ours, theirs)


# --- periodic updates ------------------------------------------------------------------------


def test_covariances_change_only_every_cov_update_every():
  tx = jkfac.precondition(loss_fn, make_batch(), damping=1e-2, cov_update_every=5,
                          invert_every=1)
  previous = tx.init(mlp_params())
  for i, _, _, state in train(tx, 11, feed_params=True):
    assert int(state.count) == i + 1
    changed = not trees_equal(state.statistics, previous.statistics)
    assert changed == (i % 5 == 0), i
    assert (not trees_equal(state.key, previous.key)) == (i % 5 == 0), i
    assert (float(state.ema_weight) != float(previous.ema_weight)) == (i % 5 == 0), i
    previous = state


def test_cov_update_every_raises_the_decay_to_its_power():
  # Statistics every 5 steps forget as much per step as every step: after k updates the
  # EMA weight is 1 - decay^(5k), and the newest batch weighs 1 - decay^5.
  decay, every = 0.9, 5
  tx = jkfac.precondition(loss_fn, make_batch(), damping=1e-2, cov_ema_decay=decay,
                          cov_update_every=every, invert_every=1)
  for i, _, _, state in train(tx, 11, feed_params=True):
    updates = i // every + 1
    np.testing.assert_allclose(float(state.ema_weight), 1 - decay ** (every * updates),
                               rtol=1e-6)


def test_inverses_change_only_every_invert_every_with_damping_schedule():
  damping = lambda count: 0.1 + 0.01 * count
  tx = jkfac.precondition(loss_fn, make_batch(), damping=damping, cov_update_every=1,
                          invert_every=3, estimation="empirical")
  previous = tx.init(mlp_params())
  for i, _, _, state in train(tx, 10, feed_params=True):
    assert int(state.count) == i + 1
    changed = not trees_equal(state.inverses, previous.inverses)
    assert changed == (i % 3 == 0), i
    last_inversion = 3 * (i // 3)
    np.testing.assert_allclose(float(state.damping), damping(last_inversion), rtol=1e-6)
    if i % 3 == 0:  # the inverses are the damped inverses of the bias-corrected factors
      for name in LAYERS:
        a, g = (np.asarray(state.statistics[name][f], np.float64) / float(state.ema_weight)
                for f in ("A", "G"))
        pi = math.sqrt((np.trace(a) / len(a)) / (np.trace(g) / len(g)))
        root = math.sqrt(damping(i))
        np.testing.assert_allclose(state.inverses[name]["A"],
                                   np.linalg.inv(a + pi * root * np.eye(len(a))),
                                   rtol=2e-3, atol=1e-5)
        np.testing.assert_allclose(state.inverses[name]["G"],
                                   np.linalg.inv(g + root / pi * np.eye(len(g))),
                                   rtol=2e-3, atol=1e-5)
    previous = state


# --- EMA and bias correction -----------------------------------------------------------------


def _check_covariances(covariances, scale, expected, approximations):
  """`covariances[layer] / scale` equals `expected[layer]` for the approximation's arrays."""
  for name in LAYERS:
    keys = {"kron": ("A", "G"), "diagonal": ("diagonal",), "full": ("F",)}[
        approximations.get(name, "kron")]
    assert set(covariances[name]) == set(keys)
    for key in keys:
      np.testing.assert_allclose(np.asarray(covariances[name][key]) / scale,
                                 expected[name][key], rtol=2e-4, atol=1e-6,
                                 err_msg=f"{name}/{key}")


@pytest.mark.parametrize("decay,estimation,approximations", [
    (0.0, "empirical", {"dense1": "diagonal"}),
    (0.5, "empirical", {"dense1": "diagonal"}),
    (0.95, "empirical", {"dense0": "full"}),
    (0.95, "exact", {"dense1": "diagonal"}),
    (0.9, "exact", {"dense0": "full"}),
])
def test_first_step_uses_batch_statistics(decay, estimation, approximations):
  tx = jkfac.precondition(loss_fn, make_batch(), damping=1e-2, cov_ema_decay=decay,
                          estimation=estimation, approximations=approximations)
  (_, params, _, state), = train(tx, 1, feed_params=True)
  np.testing.assert_allclose(float(state.ema_weight), 1 - decay, rtol=1e-6)
  expected = reference_statistics(params, make_batch(0), estimation)
  _check_covariances(state.statistics, float(state.ema_weight), expected, approximations)


def test_covariances_follow_the_ema():
  decay, approximations = 0.8, {"dense1": "diagonal"}
  tx = jkfac.precondition(loss_fn, make_batch(), damping=1e-2, cov_ema_decay=decay,
                          estimation="empirical", approximations=approximations)
  ema = None
  for i, params, _, state in train(tx, 4, feed_params=True):
    stats = reference_statistics(params, make_batch(i), "empirical")
    ema = jax.tree_util.tree_map(lambda s: (1 - decay) * s, stats) if ema is None else (
        jax.tree_util.tree_map(lambda old, s: decay * old + (1 - decay) * s, ema, stats))
    np.testing.assert_allclose(float(state.ema_weight), 1 - decay ** (i + 1), rtol=1e-6)
    # Raw (not bias-corrected) EMAs: S <- d S + (1 - d) stat.
    _check_covariances(state.statistics, 1.0, ema, approximations)


# --- hyperparameter validation -----------------------------------------------------------------


@pytest.mark.parametrize("kwargs,name", [
    (dict(damping=0.0), "damping"),
    (dict(damping=-1e-3), "damping"),
    (dict(cov_ema_decay=-0.1), "cov_ema_decay"),
    (dict(cov_ema_decay=1.0), "cov_ema_decay"),
    (dict(cov_ema_decay=1.5), "cov_ema_decay"),
    (dict(invert_every=0), "invert_every"),
    (dict(invert_every=-2), "invert_every"),
    (dict(invert_every=2.5), "invert_every"),
    (dict(invert_every=2.0), "invert_every"),
    (dict(invert_every="3"), "invert_every"),
    (dict(cov_update_every=0), "cov_update_every"),
    (dict(cov_update_every=1.5), "cov_update_every"),
    (dict(estimation="mc"), "estimation"),
    (dict(inverse_method="qr"), "inverse_method"),
    (dict(approximations={"dense0": "kronecker"}), "approximation"),
], ids=lambda v: repr(v) if isinstance(v, dict) else None)
@pytest.mark.parametrize("factory", ["precondition", "kfac"])
def test_invalid_hyperparameters_raise(factory, kwargs, name):
  kwargs = dict(dict(damping=1e-2), **kwargs)
  with pytest.raises(ValueError, match=name):
    if factory == "precondition":
      jkfac.precondition(loss_fn, make_batch(), **kwargs)
    else:
      jkfac.kfac(loss_fn, make_batch(), learning_rate=0.1, **kwargs)


@pytest.mark.parametrize("kwargs,name", [
    (dict(momentum_type="nesterov"), "momentum_type"),
    (dict(momentum=1.0), "momentum"),
    (dict(momentum=-0.5), "momentum"),
])
def test_invalid_kfac_hyperparameters_raise(kwargs, name):
  with pytest.raises(ValueError, match=name):
    jkfac.kfac(loss_fn, make_batch(), learning_rate=0.1, damping=1e-2, **kwargs)


def test_valid_hyperparameters_are_accepted():
  for kwargs in (dict(cov_ema_decay=0.0), dict(invert_every=1, cov_update_every=1),
                 dict(estimation="exact", inverse_method="eigh"),
                 dict(approximations={"dense*": "diagonal"})):
    jkfac.precondition(loss_fn, make_batch(), damping=1e-2, **kwargs).init(mlp_params())
  jkfac.kfac(loss_fn, make_batch(), learning_rate=0.1, damping=1e-2, momentum=None,
             momentum_type="adam")


def test_approximation_pattern_matching_no_layer_raises_at_init():
  tx = jkfac.precondition(loss_fn, make_batch(), damping=1e-2,
                          approximations={"conv*": "diagonal"})
  with pytest.raises(ValueError, match="conv\\*"):
    tx.init(mlp_params())
  # A pattern that matches is fine and applies.
  tx = jkfac.precondition(loss_fn, make_batch(), damping=1e-2,
                          approximations={"*1": "diagonal"})
  assert set(tx.init(mlp_params()).statistics["dense1"]) == {"diagonal"}


def test_overlapping_approximation_patterns_must_agree():
  """Patterns may overlap (a default and an override) only where they agree."""
  disagree = jkfac.precondition(loss_fn, make_batch(), damping=1e-2,
                                approximations={"dense*": "diagonal", "*1": "full"})
  with pytest.raises(ValueError, match=r"'dense1' \(parameters \['dense1/kernel', "
                                       r"'dense1/bias'\]\) is matched by .*'dense\*': 'diagonal'"):
    disagree.init(mlp_params())
  agree = jkfac.precondition(loss_fn, make_batch(), damping=1e-2,
                             approximations={"dense*": "diagonal", "*1": "diagonal"})
  assert set(agree.init(mlp_params()).statistics["dense1"]) == {"diagonal"}


# --- optax integration -------------------------------------------------------------------------


def test_inject_hyperparams_learning_rate_schedule_under_jit():
  schedule = optax.linear_schedule(0.5, 0.1, transition_steps=4)
  tx = optax.inject_hyperparams(jkfac.kfac, static_args=("loss_fn", "example_batch"))(
      loss_fn=loss_fn, example_batch=make_batch(), learning_rate=schedule, damping=1e-2)
  reference = jkfac.kfac(loss_fn, make_batch(), learning_rate=schedule, damping=1e-2)
  for (i, _, updates, state), (_, _, ref_updates, _) in zip(train(tx, 4), train(reference, 4)):
    np.testing.assert_allclose(float(state.hyperparams["learning_rate"]), schedule(i),
                               rtol=1e-6)
    np.testing.assert_allclose(float(state.hyperparams["damping"]), 1e-2, rtol=1e-6)
    assert_trees_close(updates, ref_updates, rtol=1e-4)
  assert int(state.count) == 4


def test_inject_hyperparams_damping_schedule_under_jit():
  damping = optax.linear_schedule(1e-1, 1e-2, transition_steps=6)
  tx = optax.inject_hyperparams(jkfac.kfac, static_args=("loss_fn", "example_batch"))(
      loss_fn=loss_fn, example_batch=make_batch(), learning_rate=0.1, damping=damping,
      invert_every=2, warm_start=False)
  for i, _, _, state in train(tx, 5):
    np.testing.assert_allclose(float(state.hyperparams["damping"]), damping(i), rtol=1e-6)
    np.testing.assert_allclose(float(precondition_state(state).damping),
                               damping(2 * (i // 2)), rtol=1e-6)


def test_kfac_damping_schedule():
  damping = lambda count: 1.0 / (count + 1.0)
  tx = jkfac.kfac(loss_fn, make_batch(), learning_rate=0.1, damping=damping, invert_every=4,
                  warm_start=False)
  for i, _, _, state in train(tx, 6):
    np.testing.assert_allclose(float(precondition_state(state).damping),
                               damping(4 * (i // 4)), rtol=1e-6)


def test_chain_precondition_with_sgd_forwards_the_batch():
  kwargs = dict(damping=1e-2, estimation="empirical", invert_every=2)
  tx = optax.chain(jkfac.precondition(loss_fn, make_batch(), **kwargs), optax.sgd(0.1))
  alone = jkfac.precondition(loss_fn, make_batch(), **kwargs)
  params = mlp_params()
  chain_state, alone_state = tx.init(params), alone.init(params)
  chain_step, alone_step = jax.jit(update_step(tx)), jax.jit(update_step(alone))
  for i in range(3):
    batch = make_batch(i)
    updates, chain_state = chain_step(params, chain_state, batch)
    preconditioned, alone_state = alone_step(params, alone_state, batch)
    assert_trees_close(updates, jax.tree_util.tree_map(lambda u: -0.1 * u, preconditioned))
    assert_trees_close(chain_state[0], alone_state)
    # Preconditioned: not plain SGD's step.
    grads = jax.grad(loss_fn)(params, batch)
    assert not np.allclose(updates["dense0"]["kernel"], -0.1 * grads["dense0"]["kernel"],
                           rtol=1e-2)
    params = optax.apply_updates(params, updates)
  assert int(chain_state[0].count) == 3


@pytest.mark.parametrize("make_tx", [
    lambda: jkfac.precondition(loss_fn, make_batch(), damping=1e-2),
    lambda: jkfac.kfac(loss_fn, make_batch(), learning_rate=0.1, damping=1e-2),
    lambda: optax.chain(jkfac.precondition(loss_fn, make_batch(), damping=1e-2),
                        optax.sgd(0.1)),
], ids=["precondition", "kfac", "chain"])
def test_update_without_batch_or_params_raises(make_tx):
  tx, params, batch = make_tx(), mlp_params(), make_batch()
  state, grads = tx.init(params), jax.grad(loss_fn)(params, batch)
  with pytest.raises(ValueError, match="batch"):
    tx.update(grads, state, params)
  with pytest.raises(ValueError, match="batch"):
    tx.update(grads, state, batch=batch)
  with pytest.raises(ValueError, match="batch"):
    tx.update(grads, state)
  tx.update(grads, state, params, batch=batch)  # and the proper call works


def test_mismatched_grads_and_params_raise():
  tx, params, batch = (jkfac.kfac(loss_fn, make_batch(), learning_rate=0.1, damping=1e-2),
                       mlp_params(), make_batch())
  state, grads = tx.init(params), jax.grad(loss_fn)(params, batch)
  bad_grads = [
      {"dense0": grads["dense0"]},                                            # missing a layer
      {**grads, "extra": jnp.zeros(3)},                                       # an extra leaf
      {**grads, "dense1": {"kernel": grads["dense1"]["kernel"]}},             # missing bias
      (grads["dense0"], grads["dense1"]),                                     # another container
  ]
  for bad in bad_grads:
    with pytest.raises(ValueError, match="tree structure"):
      tx.update(bad, state, params, batch=batch)


# --- float64 -------------------------------------------------------------------------------


@pytest.mark.parametrize("x64", [False, True])
def test_state_dtype_follows_params(x64):
  with jax.enable_x64(x64):
    dtype = jnp.float64 if x64 else jnp.float32
    params = mlp_params(dtype=dtype)
    assert params["dense0"]["kernel"].dtype == dtype
    tx = jkfac.kfac(loss_fn, make_batch(dtype=dtype), learning_rate=0.1, damping=1e-2,
                    approximations={"dense1": "diagonal"})
    step = jax.jit(update_step(tx))
    state = tx.init(params)
    for s in (state, step(params, state, make_batch(dtype=dtype))[1]):
      kstate = precondition_state(s)
      for leaf in jax.tree_util.tree_leaves((kstate.statistics, kstate.inverses)):
        assert leaf.dtype == dtype
    updates, state = step(params, state, make_batch(dtype=dtype))
    assert all(u.dtype == dtype for u in jax.tree_util.tree_leaves(updates))
    kstate = precondition_state(state)
    assert all(np.isfinite(np.asarray(leaf)).all()
               for leaf in jax.tree_util.tree_leaves(kstate.inverses))


# --- K-FAC beats SGD on real digits ------------------------------------------------------------


def _mnist_test_subset(n):
  images_path = os.path.join(MNIST_DIR, "t10k-images-idx3-ubyte.gz")
  labels_path = os.path.join(MNIST_DIR, "t10k-labels-idx1-ubyte.gz")
  images, labels = mnist_data.read_idx(images_path), mnist_data.read_idx(labels_path)
  assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
  return {"image": jnp.asarray(images[:n].reshape(n, -1), jnp.float32) / 255.0,
          "label": jnp.asarray(labels[:n], jnp.int32)}


class _DigitsMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return jkfac.flax.Dense(10)(jnp.tanh(jkfac.flax.Dense(64)(x)))


def _digits_loss(params, batch):
  logits = _DigitsMLP().apply({"params": params}, batch["image"])
  logits = jkfac.register_softmax_cross_entropy(logits, batch["label"])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()


def _final_loss(tx, params, batch, steps):
  @jax.jit  # the batch is an argument: closed over, XLA would constant-fold its statistics
  def step(params, opt_state, batch):
    grads = jax.grad(_digits_loss)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params, batch=batch)
    return optax.apply_updates(params, updates), opt_state

  opt_state = tx.init(params)
  for _ in range(steps):
    params, opt_state = step(params, opt_state, batch)
  return float(_digits_loss(params, batch))


@pytest.mark.slow  # a benchmark as a test; run with -m slow
def test_kfac_beats_sgd_per_step_on_mnist_digits():
  start = time.time()
  batch = _mnist_test_subset(1000)
  params = _DigitsMLP().init(jax.random.PRNGKey(0), batch["image"][:1])["params"]
  initial = float(_digits_loss(params, batch))
  lr, steps = 0.1, 20  # full batch, same learning rate, no momentum for either
  sgd = _final_loss(optax.sgd(lr), params, batch, steps)
  kfac = _final_loss(jkfac.kfac(_digits_loss, batch, learning_rate=lr, damping=1e-2,
                                momentum=None, invert_every=5), params, batch, steps)
  print(f"MNIST loss after {steps} steps: initial {initial:.3f}, SGD {sgd:.3f}, "
        f"K-FAC {kfac:.3f} ({time.time() - start:.1f} s)")
  assert sgd < initial  # a fair race: SGD at this learning rate does learn
  assert kfac < 0.5 * sgd and kfac < sgd - 0.4, (initial, sgd, kfac)
