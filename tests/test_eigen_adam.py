"""`jkfac.scale_by_eigen_adam` / `jkfac.eigen_adam`: Adam in K-FAC's eigenbases.

Oracle: a dense numpy Adam per layer over the vectorised gradient, rotated by
`Q = Q_A ⊗ Q_G` (the state's bases, checked to diagonalise the state's factors): the first
moment kept in the original coordinates (so a basis change needs no rule), the second
moment in the basis and, when the basis changes, replaced by the diagonal of
`Q_newᵀ Q_old diag(v) Q_oldᵀ Q_new`. Parameters outside the layers: `optax.adam`.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jkfac

import _nets

D_IN, HIDDEN, CLASSES, BATCH = 6, 4, 3, 8
B1, B2, EPS = 0.9, 0.95, 1e-8


def loss_fn(params, batch):
  x = batch["x"] * params["scale"]  # a parameter of no layer: plain Adam
  h = jkfac.register_dense(x @ params["w0"] + params["b0"], x, params["w0"], params["b0"])
  h = jnp.tanh(h)
  logits = jkfac.register_dense(h @ params["w1"] + params["b1"], h, params["w1"],
                                params["b1"])
  # Squared error: its G has full rank. (A softmax's G has a null direction, where the
  # rotated gradient is rounding noise that Adam's normalisation scales up, so float32
  # and the float64 oracle would differ there.)
  jkfac.register_squared_error(logits, batch["y"])
  return 0.5 * jnp.mean(jnp.sum((logits - batch["y"]) ** 2, axis=-1))


def make_params(seed=0):
  k = jax.random.split(jax.random.PRNGKey(seed), 4)
  return {"w0": jax.random.normal(k[0], (D_IN, HIDDEN)) / np.sqrt(D_IN),
          "b0": 0.1 * jax.random.normal(k[1], (HIDDEN,)),
          "w1": jax.random.normal(k[2], (HIDDEN, CLASSES)) / np.sqrt(HIDDEN),
          "b1": jnp.zeros((CLASSES,)), "scale": jnp.ones((D_IN,))}


def make_batch(seed):
  k1, k2 = jax.random.split(jax.random.PRNGKey(100 + seed))
  return {"x": jax.random.normal(k1, (BATCH, D_IN)),
          "y": jax.random.normal(k2, (BATCH, CLASSES))}


LAYERS = {"w0": ("w0", "b0"), "w1": ("w1", "b1")}


def _matrix(tree, layer):
  w, b = LAYERS[layer]
  return np.concatenate([np.asarray(tree[w]), np.asarray(tree[b])[None]], axis=0)


def _layer_name(state, layer):
  """The state's name for the layer of weight `layer` (Trace names)."""
  names = sorted(state.preconditioner.inverses)
  return names[["w0", "w1"].index(layer)]


def _basis(side, features):
  """The dense basis of one side: a matrix, I for a diagonal factor, or the block-diagonal
  matrix of each block's real features."""
  side = np.asarray(side, np.float64)
  if side.ndim == 1:
    return np.eye(features)
  if side.ndim == 2:
    return side
  dense, step = np.zeros((features, features)), side.shape[1]
  for k in range(side.shape[0]):
    stop = min((k + 1) * step, features)
    dense[k * step:stop, k * step:stop] = side[k, :stop - k * step, :stop - k * step]
  return dense


class DenseOracle:
  """Adam over one layer's vectorised gradient in the basis `kron(Q_A, Q_G)`."""

  def __init__(self, size):
    self.m, self.v, self.q = np.zeros(size), np.zeros(size), np.eye(size)

  def step(self, g, q, t):
    g = g.reshape(-1)
    if not np.array_equal(q, self.q):
      self.v = np.diag(q.T @ self.q @ np.diag(self.v) @ self.q.T @ q)
      self.q = q
    self.m = B1 * self.m + (1 - B1) * g
    rotated = q.T @ g
    self.v = B2 * self.v + (1 - B2) * rotated ** 2
    m_hat = (q.T @ self.m) / (1 - B1 ** t)
    v_hat = self.v / (1 - B2 ** t)
    return q @ (m_hat / (np.sqrt(v_hat) + EPS))


@pytest.mark.parametrize("max_factor_dim, block_size", [(None, None), (5, None), (None, 4)])
def test_matches_dense_adam_in_the_eigenbasis(max_factor_dim, block_size):
  # Statistics every step, eigenbases at steps 0, 2, 4: three basis changes in 6 steps.
  # max_factor_dim=5 keeps the first layer's 7-wide input factor diagonal; block_size=4
  # splits it into blocks of 4 and 3 features (padded) and the second's 5 into 3 and 2.
  tx = jkfac.scale_by_eigen_adam(loss_fn, make_batch(0), b1=B1, b2=B2, eps=EPS,
                                 cov_update_every=1, invert_every=2,
                                 max_factor_dim=max_factor_dim, factor_block_size=block_size)
  params = make_params()
  state = tx.init(params)
  step = jax.jit(lambda g, s, p, b: tx.update(g, s, p, batch=b))
  adam = optax.adam(1.0, b1=B1, b2=B2, eps=EPS)
  adam_state = adam.init({"scale": params["scale"]})
  oracles = {layer: DenseOracle(_matrix(params, layer).size) for layer in LAYERS}
  for t in range(1, 7):
    batch = make_batch(t)
    grads = jax.grad(loss_fn)(params, batch)
    updates, state = step(grads, state, params, batch)
    for layer in LAYERS:
      name = _layer_name(state, layer)
      bases = state.preconditioner.inverses[name]
      stats = state.preconditioner.statistics[name]
      for side in ("A", "G"):
        if t % 2 and np.ndim(stats[side]) >= 2:  # a new basis diagonalises the factor
          features = _matrix(params, layer).shape["AG".index(side)]
          factor = _basis(stats[side], features) / float(state.preconditioner.ema_weight)
          q = _basis(bases[side], features)
          rotated = q.T @ factor @ q
          off_diagonal = rotated - np.diag(np.diag(rotated))
          np.testing.assert_allclose(off_diagonal, 0, atol=1e-5 * np.abs(factor).max())
      rows, columns = _matrix(params, layer).shape
      q = np.kron(_basis(bases["A"], rows), _basis(bases["G"], columns))
      np.testing.assert_allclose(q.T @ q, np.eye(q.shape[0]), atol=1e-5)
      expected = oracles[layer].step(_matrix(grads, layer).astype(np.float64), q, t)
      np.testing.assert_allclose(_matrix(updates, layer).reshape(-1), expected,
                                 rtol=2e-4, atol=2e-5)
    adam_updates, adam_state = adam.update({"scale": grads["scale"]}, adam_state)
    # optax.adam scales by -lr: the direction is its negative.
    np.testing.assert_allclose(updates["scale"], -adam_updates["scale"], rtol=1e-5,
                               atol=1e-7)
  assert int(state.preconditioner.count) == 6
  if max_factor_dim == 5:
    assert np.ndim(state.preconditioner.statistics[_layer_name(state, "w0")]["A"]) == 1
  if block_size == 4:
    assert np.shape(state.preconditioner.inverses[_layer_name(state, "w0")]["A"]) == (2, 4, 4)


def test_first_step_is_adam():
  """Before the first eigendecomposition (`warm_start`: none at step 0) the bases are the
  standard ones: the step is Adam's, on every parameter."""
  batch = make_batch(0)
  tx = jkfac.scale_by_eigen_adam(loss_fn, batch, warm_start=True)
  params = make_params()
  grads = jax.grad(loss_fn)(params, batch)
  updates, _ = tx.update(grads, tx.init(params), params, batch=batch)
  expected, _ = optax.adam(-1.0, b1=0.9, b2=0.95).update(grads, optax.adam(
      -1.0, b1=0.9, b2=0.95).init(params))
  jax.tree_util.tree_map(lambda u, e: np.testing.assert_allclose(u, e, rtol=1e-5, atol=1e-7),
                         updates, expected)


def test_alias_is_adamw_chain():
  batch = make_batch(0)
  params = make_params()
  grads = jax.grad(loss_fn)(params, batch)
  tx = jkfac.eigen_adam(loss_fn, batch, learning_rate=0.1, weight_decay=0.01)
  inner = jkfac.scale_by_eigen_adam(loss_fn, batch, cov_update_every=5, invert_every=50,
                                    warm_start=True)
  updates, _ = tx.update(grads, tx.init(params), params, batch=batch)
  direction, _ = inner.update(grads, inner.init(params), params, batch=batch)
  expected = jax.tree_util.tree_map(lambda d, p: -0.1 * (d + 0.01 * p), direction, params)
  jax.tree_util.tree_map(lambda u, e: np.testing.assert_allclose(u, e, rtol=1e-6, atol=1e-8),
                         updates, expected)


def test_inject_hyperparams_learning_rate_schedule_under_jit():
  """`optax.inject_hyperparams(jkfac.eigen_adam, ...)`: the curvature settings are keywords
  of the signature (not `**curvature_settings`, which inject passed on as one setting),
  numbers become traced hyperparameters, and the steps equal eigen_adam's own."""
  schedule = optax.linear_schedule(0.1, 0.01, transition_steps=3)
  static = ("loss_fn", "example_batch", "cov_update_every", "invert_every")
  tx = optax.inject_hyperparams(jkfac.eigen_adam, static_args=static)(
      loss_fn=loss_fn, example_batch=make_batch(0), learning_rate=schedule,
      weight_decay=1e-3, cov_update_every=1, invert_every=2)
  reference = jkfac.eigen_adam(loss_fn, make_batch(0), learning_rate=schedule,
                               weight_decay=1e-3, cov_update_every=1, invert_every=2)
  step = lambda tx: jax.jit(lambda p, s, b: tx.update(jax.grad(loss_fn)(p, b), s, p, batch=b))
  ours, theirs = (make_params(), tx.init(make_params())), (make_params(),
                                                           reference.init(make_params()))
  for i in range(4):
    updates, state = step(tx)(*ours, make_batch(i))
    expected, ref_state = step(reference)(*theirs, make_batch(i))
    # b1, b2 and eps arrive as float32 arrays: bias corrections rounded differently
    jax.tree_util.tree_map(lambda u, e: np.testing.assert_allclose(u, e, rtol=1e-3, atol=1e-6),
                           updates, expected)
    np.testing.assert_allclose(float(state.hyperparams["learning_rate"]), schedule(i),
                               rtol=1e-6)
    ours = (optax.apply_updates(ours[0], updates), state)
    theirs = (optax.apply_updates(theirs[0], expected), ref_state)
  assert "inverse_method" not in inspect.signature(jkfac.eigen_adam).parameters
  assert inspect.signature(jkfac.eigen_adam).parameters["invert_every"].default == 50


def test_non_finite_batch_is_skipped():
  batch = make_batch(0)
  tx = jkfac.scale_by_eigen_adam(loss_fn, batch, cov_update_every=1, invert_every=1)
  params = make_params()
  state = tx.init(params)
  _, state = tx.update(jax.grad(loss_fn)(params, batch), state, params, batch=batch)
  bad = dict(batch, x=batch["x"].at[0, 0].set(jnp.nan))
  grads = jax.grad(loss_fn)(params, bad)
  updates, new = tx.update(grads, state, params, batch=bad)
  assert all(np.all(np.asarray(u) == 0) for u in jax.tree_util.tree_leaves(updates))
  assert int(new.preconditioner.skipped_steps) == 1
  jax.tree_util.tree_map(np.testing.assert_array_equal,
                         new._replace(preconditioner=new.preconditioner._replace(skipped_steps=0)),
                         state._replace(preconditioner=state.preconditioner._replace(skipped_steps=0)))


def test_a_skipped_batch_moves_no_parameter_and_no_schedule():
  """`eigen_adam`'s weight decay and learning-rate schedule come after the skip: on a
  batch skipped as not finite they must not move the parameters or count the step.
  Oracle: the state before the batch."""
  batch = make_batch(0)
  schedule = optax.linear_schedule(1e-3, 1e-2, 100)
  tx = jkfac.eigen_adam(loss_fn, batch, learning_rate=schedule, weight_decay=0.1,
                        cov_update_every=1, invert_every=1)
  params = make_params()
  _, state = tx.update(jax.grad(loss_fn)(params, batch), tx.init(params), params, batch=batch)
  bad = dict(batch, x=batch["x"].at[0, 0].set(jnp.nan))
  updates, new = tx.update(jax.grad(loss_fn)(params, bad), state, params, batch=bad)
  assert all(np.all(np.asarray(u) == 0) for u in jax.tree_util.tree_leaves(updates))
  assert int(jkfac.preconditioner_state(new).skipped_steps) == 1
  jax.tree_util.tree_map(np.testing.assert_array_equal, new[1:], state[1:])


@pytest.mark.parametrize("settings, match", [
    (dict(inverse_method="eigh"), "inverse_method"),
    (dict(placement="round_robin"), "placement"),
    (dict(b2=1.0), "b2"),
])
def test_bad_settings_raise(settings, match):
  with pytest.raises(ValueError, match=match):
    jkfac.scale_by_eigen_adam(loss_fn, make_batch(0), **settings)


def test_masked_parameters_raise():
  batch = make_batch(0)
  tx = optax.masked(jkfac.scale_by_eigen_adam(loss_fn, batch),
                    {"w0": True, "b0": True, "w1": False, "b1": False, "scale": False})
  with pytest.raises(ValueError, match="subset of the parameters"):
    tx.init(make_params())


def test_grouped_conv_is_named_when_left_to_adam():
  import flax.linen as nn

  class Grouped(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = jnp.tanh(nn.Conv(4, (3, 3), feature_group_count=2)(x))
      return nn.Dense(CLASSES)(x.reshape(x.shape[0], -1))

  model = Grouped()
  batch = {"x": jnp.ones((BATCH, 5, 5, 2)), "y": jnp.zeros((BATCH, CLASSES))}
  params = model.init(jax.random.PRNGKey(0), batch["x"])["params"]

  def grouped_loss(params, batch):
    out = model.apply({"params": params}, batch["x"])
    jkfac.register_squared_error(out, batch["y"])
    return 0.5 * jnp.mean(jnp.sum((out - batch["y"]) ** 2, axis=-1))

  tx = jkfac.scale_by_eigen_adam(grouped_loss, batch)
  with pytest.warns(UserWarning, match=r"plain Adam.*Conv_0"):
    state = tx.init(params)
  assert list(state.preconditioner.inverses) == ["Dense_0"]


def test_a_layer_of_another_approximation_is_named_as_left_to_adam():
  """"ekfac" (or "diagonal") is no pair of Kronecker factors to rotate into: the layer
  gets plain Adam, and `init` says so instead of running it silently."""
  _, params, batch, loss_fn = _nets.make_problem(_nets.MLP, batch=BATCH)
  tx = jkfac.scale_by_eigen_adam(loss_fn, batch, approximations={"Dense_0": "ekfac"})
  with pytest.warns(UserWarning, match=r"plain Adam.*Dense_0 \(ekfac\)"):
    state = tx.init(params)
  assert "Dense_0" not in state.preconditioner.inverses


def test_untagged_matrix_is_named_as_left_to_adam():
  """A 2-D parameter of no layer gets plain Adam here, and the warning says so (not the
  generic diagonal block that `jkfac.kfac` would give it)."""

  def mixed_loss(params, batch):
    x = jnp.sum(batch["x"][:, :, None] * params["mix"], axis=1)  # elementwise: no layer
    return loss_fn(params, {**batch, "x": x})

  params = {**make_params(), "mix": jnp.eye(D_IN)}
  tx = jkfac.scale_by_eigen_adam(mixed_loss, make_batch(0))
  with pytest.warns(jkfac.GenericBlockWarning, match=r"\['mix'\], so they get plain Adam"):
    tx.init(params)
  with pytest.raises(ValueError, match="get plain Adam"):
    jkfac.scale_by_eigen_adam(mixed_loss, make_batch(0), strict=True).init(params)
