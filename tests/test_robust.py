"""The one-call default `jkfac.kfac(loss_fn, batch)`: what keeps it from diverging.

Oracles: the first step with `warm_start` is the quadratic model's step along the raw
gradient (α from the dense `jax.jacfwd` GGN); the calibrated damping is the closed-form
mean eigenvalue of the K-FAC curvature of a linear model; a rejected step leaves the
state exactly as it was (but the damping, ×4); grafted updates have `optax.adam`'s
per-leaf norms and K-FAC's directions; μ clipped to its bounds with α re-solved equals a
brute-force minimisation of the 2×2 model.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jkfac
from jkfac import preconditioner as precondition_lib
from jkfac.adaptive import config as adaptive_config
from jkfac.adaptive.qmodel import solve_quadratic_model
from test_adaptive import (D_IN, dense_ggn, flat, jitted_step, linear_batch, linear_loss,
                           linear_params, mlp_batch, mlp_loss, mlp_params)


def _step(tx, loss_fn, params, state, batch):
  return jitted_step(tx, loss_fn)(params, state, batch)


# --- the first step: no inverse from one batch, damping from the curvature's scale ---------


def test_first_step_is_the_model_step_along_the_gradient_with_calibrated_damping():
  params, batch = linear_params(), linear_batch(0)
  tx = jkfac.kfac(linear_loss, batch, estimation="exact")
  _, state, updates, _ = _step(tx, linear_loss, params, tx.init(params), batch)
  # K-FAC of one dense layer under squared error (exact): A = E[x̃ x̃ᵀ] over inputs with
  # a trailing 1, G = I (`G` sums the 1/N-scaled cotangents), so the mean eigenvalue of
  # A ⊗ G is mean‖x̃‖² / (d_in + 1).
  x = np.asarray(batch["x"], np.float64)
  scale = np.mean(np.sum(x ** 2, axis=1) + 1.0) / (D_IN + 1)
  damping = adaptive_config.CALIBRATED_DAMPING * scale
  found = jkfac.diagnostics(state)
  np.testing.assert_allclose(found["damping"], damping, rtol=1e-5)
  # Step 0 uses identity inverses: Δ = g, and α minimises gᵀ(αg) + ½α² gᵀ(G + λI)g.
  g = flat(jax.grad(linear_loss)(params, batch))
  ggn = dense_ggn(params, batch)
  alpha = -(g @ g) / (g @ ggn @ g + damping * g @ g)
  np.testing.assert_allclose(found["alpha"], alpha, rtol=1e-4)
  np.testing.assert_allclose(flat(updates), alpha * g, rtol=1e-4, atol=1e-7)
  assert int(found["rejected_steps"]) == 0  # an exact quadratic: the step is accepted


@pytest.mark.parametrize("settings", [{}, {"learning_rate": 1e-2, "graft": "adam"}],
                         ids=["adaptive", "graft"])
def test_first_inverses_without_warm_start_use_the_calibrated_damping(settings):
  """With `warm_start=False` step 0 inverts: with the damping calibrated to the statistics
  it has just measured (before: the previous state's scale, 0, so 1e-8). Oracle: the
  closed-form mean eigenvalue of the linear model's K-FAC curvature, as above."""
  params, batch = linear_params(), linear_batch(0)
  tx = jkfac.kfac(linear_loss, batch, estimation="exact", warm_start=False, **settings)
  _, state, _, _ = _step(tx, linear_loss, params, tx.init(params), batch)
  x = np.asarray(batch["x"], np.float64)
  scale = np.mean(np.sum(x ** 2, axis=1) + 1.0) / (D_IN + 1)
  inverted_with = jkfac.preconditioner_state(state).damping
  np.testing.assert_allclose(inverted_with, adaptive_config.CALIBRATED_DAMPING * scale,
                             rtol=1e-5)


def test_the_old_untuned_first_step_uses_one_batch_inverses_and_the_default_does_not():
  """The blow-up's cause, reproduced: with inverses from one batch and a damping far
  below the curvature's scale, the first update is many times longer than the default's
  (which steps along the gradient, sized by the model at a calibrated damping)."""
  params, batch = mlp_params(), mlp_batch(0)
  old = jkfac.kfac(mlp_loss, batch, damping=1e-3, adapt_damping=True, reject_steps=False,
                   warm_start=False, min_damping=1e-4, damping_adaptation_interval=5)
  new = jkfac.kfac(mlp_loss, batch)
  norms = {}
  for name, tx in (("old", old), ("new", new)):
    _, state, updates, _ = _step(tx, mlp_loss, params, tx.init(params), batch)
    norms[name] = float(optax.global_norm(updates))
    assert np.isfinite(norms[name])
  pre = jkfac.precondition(mlp_loss, batch, damping=1e-3)
  one_batch, _ = jax.jit(lambda: pre.update(jax.grad(mlp_loss)(params, batch),
                                            pre.init(params), params, batch=batch))()
  grads = jax.grad(mlp_loss)(params, batch)
  # The old first step is along the one-batch F̂⁻¹g, which is far longer than g.
  assert float(optax.global_norm(one_batch)) > 10 * float(optax.global_norm(grads))
  assert norms["old"] > 3 * norms["new"], norms


@pytest.mark.parametrize("warm", [True, False])
def test_warm_start_schedule(warm):
  config = jkfac.PreconditionConfig(linear_loss, linear_batch(), damping=1.0,
                                    cov_update_every=3, invert_every=16, warm_start=warm)
  counts = jnp.arange(40)
  stats = [int(c) for c in counts if precondition_lib.statistics_due(config, c)]
  inverts = [int(c) for c in counts if precondition_lib.inverses_due(config, c)]
  if warm:
    # every step below WARM_START_STATISTICS (10), then every 3
    assert stats == list(range(10)) + [12, 15, 18, 21, 24, 27, 30, 33, 36, 39]
    assert inverts == [1, 2, 4, 8, 16, 32]
  else:
    assert stats == list(range(0, 40, 3))
    assert inverts == [0, 16, 32]


# --- step rejection --------------------------------------------------------------------


def test_a_rejected_step_restores_the_state_exactly_and_raises_the_damping():
  params, batch = mlp_params(), mlp_batch(0)
  # A learning rate far too large: the step raises the batch loss.
  tx = jkfac.kfac(mlp_loss, batch, learning_rate=1e3, damping=0.5, adapt_damping=True)
  state = tx.init(params)
  new_params, new_state, updates, loss = _step(tx, mlp_loss, params, state, batch)
  assert not np.any(flat(updates))
  np.testing.assert_array_equal(flat(new_params), flat(params))
  assert int(new_state.rejected_steps) == 1
  np.testing.assert_allclose(new_state.damping, 0.5 * adaptive_config.REJECTION_BOOST)
  for field in ("count", "velocity", "preconditioner", "graft"):
    jax.tree_util.tree_map(np.testing.assert_array_equal, getattr(new_state, field),
                           getattr(state, field))
  assert float(jkfac.diagnostics(new_state)["update_norm"]) > 0  # what was tried


def test_accepted_steps_never_raise_their_batch_loss():
  """With rejection, every step either lowers its own batch's loss or changes nothing."""
  tx = jkfac.kfac(mlp_loss, mlp_batch(), cov_update_every=1, invert_every=4)
  params, step = mlp_params(), jitted_step(tx, mlp_loss)
  state = tx.init(params)
  for i in range(12):
    batch = mlp_batch(i)
    new_params, state, _, loss = step(params, state, batch)
    assert float(mlp_loss(new_params, batch)) <= float(loss)
    params = new_params
  assert np.all(np.isfinite(flat(params)))


# --- the quadratic model's bounds ---------------------------------------------------------


@pytest.mark.parametrize("b1,expected_mu", [(-3.0, 0.99), (2.0, 0.0)])
def test_mu_is_clipped_and_alpha_re_solved(b1, expected_mu):
  curvature = jnp.asarray([[2.0, 0.5], [0.5, 1.0]])
  gram = jnp.asarray([[1.0, 0.2], [0.2, 1.0]])
  b = jnp.asarray([1.0, b1])
  alpha, mu = solve_quadratic_model(curvature, gram, b, jnp.asarray(0.1), max_mu=0.99)
  h = np.asarray(curvature + 0.1 * gram, np.float64)
  # Brute force over μ in [0, 0.99], α minimised exactly for each μ.
  mus = np.linspace(0, 0.99, 9901)
  alphas = -(1.0 + mus * h[0, 1]) / h[0, 0]
  values = alphas * 1.0 + mus * b1 + 0.5 * (h[0, 0] * alphas ** 2 + 2 * h[0, 1] * alphas * mus
                                            + h[1, 1] * mus ** 2)
  best = np.argmin(values)
  assert float(mu) == pytest.approx(expected_mu) == pytest.approx(mus[best], abs=1e-3)
  assert float(alpha) == pytest.approx(alphas[best], rel=1e-3)


# --- grafting ---------------------------------------------------------------------------


def test_graft_adam_takes_adams_norms_and_kfacs_directions():
  params, batch = mlp_params(), mlp_batch(0)
  grads = jax.grad(mlp_loss)(params, batch)
  kw = dict(learning_rate=1e-2, damping=1e-2, momentum=None, warm_start=False)
  grafted = jkfac.kfac(mlp_loss, batch, graft="adam", **kw)
  plain = jkfac.kfac(mlp_loss, batch, **kw)
  run = lambda tx: jax.jit(lambda: tx.update(grads, tx.init(params), params, batch=batch))()
  (updates, _), (direction, _) = run(grafted), run(plain)
  adam, _ = optax.adam(1e-2).update(grads, optax.adam(1e-2).init(params), params)
  for u, a, d in zip(*(jax.tree_util.tree_leaves(t) for t in (updates, adam, direction))):
    np.testing.assert_allclose(np.linalg.norm(u), np.linalg.norm(a), rtol=1e-5)
    cosine = np.vdot(u, d) / (np.linalg.norm(u) * np.linalg.norm(d))
    np.testing.assert_allclose(cosine, 1.0, rtol=1e-5)


# --- never silently: skips, huge factors, integer leaves ------------------------------------


def test_skipped_steps_warn_from_inside_the_compiled_step():
  params = mlp_params()
  tx = jkfac.kfac(mlp_loss, mlp_batch(), learning_rate=0.1, damping=1e-2)
  bad = dict(mlp_batch(1), x=mlp_batch(1)["x"].at[0, 0].set(jnp.nan))
  step = jitted_step(tx, mlp_loss)
  with pytest.warns(RuntimeWarning, match="skipped 1 steps"):
    _, state, _, _ = step(params, tx.init(params), bad)
    jax.effects_barrier()
  assert int(jkfac.diagnostics(state)["skipped_steps"]) == 1


def test_rejected_steps_warn_from_inside_the_compiled_step_from_the_tenth_on():
  """A rejection is part of adapting the damping: the first nine pass without a word,
  the tenth warns (a step this large is rejected every time)."""
  params, batch = mlp_params(), mlp_batch(0)
  tx = jkfac.kfac(mlp_loss, batch, learning_rate=1e12, damping=0.5, adapt_damping=True)
  step, state = jitted_step(tx, mlp_loss), tx.init(params)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for _ in range(9):
      _, state, _, _ = step(params, state, batch)
      jax.effects_barrier()
  assert int(state.rejected_steps) == 9
  assert not [w for w in caught if "rejected" in str(w.message)]
  with pytest.warns(RuntimeWarning, match="rejected 10 steps"):
    _, state, _, _ = step(params, state, batch)
    jax.effects_barrier()
  assert int(state.rejected_steps) == 10


def test_the_compiled_step_has_no_effects():
  """The warnings are pure callbacks: an effect (jax.debug.callback) would turn off jit's
  C++ dispatch path, 1.8 ms a step on a 784-512-256-10 MLP."""
  params, batch = mlp_params(), mlp_batch()
  for tx in (jkfac.kfac(mlp_loss, batch), jkfac.kfac(mlp_loss, batch, learning_rate=0.1,
                                                        damping=1e-2)):
    step = jitted_step(tx, mlp_loss)
    assert jax.make_jaxpr(step)(params, tx.init(params), batch).effects == set()


def test_under_vmap_only_the_skipped_copy_warns():
  """vmap turns the warning's `lax.cond` into a select: the callback checks again."""
  params = mlp_params()
  tx = jkfac.kfac(mlp_loss, mlp_batch(), learning_rate=0.1, damping=1e-2)
  good, bad = mlp_batch(1), dict(mlp_batch(1), x=mlp_batch(1)["x"].at[0, 0].set(jnp.nan))
  stack = lambda *trees: jax.tree_util.tree_map(lambda *x: jnp.stack(x), *trees)
  step = jax.vmap(jitted_step(tx, mlp_loss), in_axes=(None, 0, 0))
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    _, state, _, _ = step(params, stack(tx.init(params), tx.init(params)), stack(good, bad))
    jax.effects_barrier()
  assert [str(w.message)[:24] for w in caught if w.category is RuntimeWarning] == [
      "jkfac skipped 1 steps so"]
  np.testing.assert_array_equal(jkfac.diagnostics(state)["skipped_steps"], [0, 1])


def test_a_factor_wider_than_max_factor_dim_is_kept_diagonal_with_a_warning():
  params = {"w": jnp.ones((3, 40)) * 0.1, "b": jnp.zeros(40)}
  batch = {"x": jnp.ones((4, 3)), "t": jnp.zeros((4, 40))}

  def loss_fn(params, batch):
    y = jkfac.register_dense(batch["x"] @ params["w"] + params["b"], batch["x"], params["w"],
                             params["b"])
    y = jkfac.register_squared_error(y, batch["t"])
    return 0.5 * jnp.mean(jnp.sum((y - batch["t"]) ** 2, axis=-1))

  tx = jkfac.precondition(loss_fn, batch, damping=1e-2, max_factor_dim=16)
  with pytest.warns(jkfac.LargeFactorWarning, match="kron -> kron_out_diag"):
    state = tx.init(params)
  statistics = next(iter(state.statistics.values()))
  assert statistics["A"].shape == (4, 4) and statistics["G"].shape == (40,)
  rows = jkfac.describe(loss_fn, params, batch, max_factor_dim=16).parameters
  assert {row.approximation for row in rows} == {"kron_out_diag"}
  with warnings.catch_warnings():
    warnings.simplefilter("error", jkfac.LargeFactorWarning)
    jkfac.precondition(loss_fn, batch, damping=1e-2).init(params)  # 40 < 4096: quiet


def test_an_integer_parameter_leaf_is_named_in_a_value_error():
  params = dict(mlp_params(), step=jnp.zeros([], jnp.int32))

  def loss_fn(params, batch):
    return mlp_loss({k: v for k, v in params.items() if k != "step"}, batch)

  tx = jkfac.kfac(loss_fn, mlp_batch())
  with pytest.raises(ValueError, match=r"\['step'\] is int32"):
    tx.init(params)
