"""EKFAC (`"ekfac"`): eigenbases from the inverse update, a scaling re-estimated per step.

Oracles: right after an inverse update EKFAC is `(A ⊗ G + λI)^-1` (a dense float64 solve)
with the factors' eigenvalue products as its scaling; between inverse updates its
scaling is the mean of the per-example gradients' squares in the kept basis (per-example
gradients from `jax.grad`, as in tests/_nets.py), and its step divides by it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jkfac
from jkfac.blocks import ekfac

import _nets

DAMPING = 1e-2


def _orthogonal(rng, d):
  return np.linalg.qr(rng.standard_normal((d, d)))[0]


@pytest.mark.parametrize("positions", [1, 3])
def test_scaling_is_the_projected_per_example_second_moment(positions):
  rng = np.random.default_rng(0)
  columns, n, d_in, d_out = 2, 5, 4, 3
  a = rng.standard_normal((n, positions, d_in))
  g = rng.standard_normal((columns, n, positions, d_out))
  basis = {"QA": _orthogonal(rng, d_in), "QG": _orthogonal(rng, d_out)}
  expected = np.zeros((d_in, d_out))
  for k in range(columns):
    for i in range(n):
      grad = sum(np.outer(a[i, t], g[k, i, t]) for t in range(positions))
      expected += (basis["QA"].T @ grad @ basis["QG"]) ** 2
  got = ekfac.statistics(jnp.asarray(a, jnp.float32), jnp.asarray(g, jnp.float32),
                         jax.tree_util.tree_map(lambda q: jnp.asarray(q, jnp.float32), basis))
  np.testing.assert_allclose(got["scaling"], expected, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(got["G"], np.einsum("knti,kntj->ij", g, g), rtol=1e-5)


def _problem(net):
  module, params, batch, loss_fn = _nets.make_problem(net, approx="ekfac", batch=8)
  return params, batch, loss_fn


def _step(tx, params, batch, loss_fn, state):
  grads = jax.grad(loss_fn)(params, batch)
  return jax.jit(lambda g, s: tx.update(g, s, params, batch=batch))(grads, state), grads


@pytest.mark.parametrize("net", ["mlp", "convnet"])
def test_after_an_inverse_update_ekfac_is_tikhonov_damped_kfac(net):
  params, batch, loss_fn = _problem(_nets.NETS[net])
  tx = jkfac.precondition(loss_fn, batch, damping=DAMPING, invert_every=1, estimation="exact")
  (updates, state), grads = _step(tx, params, batch, loss_fn, tx.init(params))
  for name in _nets.NETS[net].layer_names:
    name = f"{name}"
    stats = jax.tree_util.tree_map(lambda s: np.asarray(s, np.float64) / float(state.ema_weight),
                                   state.statistics[name])
    a, g = stats["A"], stats["G"]
    inverses = state.inverses[name]
    # The scaling is the products of the factors' eigenvalues, in their eigenbasis...
    products = np.outer(np.linalg.eigvalsh(a), np.linalg.eigvalsh(g))
    np.testing.assert_allclose(np.sort(np.asarray(inverses["scaling"]).ravel()),
                               np.sort(products.ravel()), rtol=1e-3, atol=1e-6)
    # ... and the EMA restarts from it, in the new basis.
    np.testing.assert_allclose(stats["scaling"], inverses["scaling"], rtol=1e-5, atol=1e-8)
    # So the step is (A ⊗ G + λI)^-1 vec(grad).
    grad = np.asarray(_nets.layer_matrix(grads, name), np.float64)
    expected = np.linalg.solve(np.kron(a, g) + DAMPING * np.eye(a.shape[0] * g.shape[0]),
                               grad.ravel()).reshape(grad.shape)
    np.testing.assert_allclose(_nets.layer_matrix(updates, name), expected, rtol=2e-3,
                               atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("net", ["mlp", "convnet"])
def test_between_inverse_updates_the_scaling_is_re_estimated_in_the_kept_basis(net):
  decay = 0.8
  params, batch, loss_fn = _problem(_nets.NETS[net])
  tx = jkfac.precondition(loss_fn, batch, damping=DAMPING, invert_every=100,
                          cov_ema_decay=decay, estimation="empirical")
  (_, first), _ = _step(tx, params, batch, loss_fn, tx.init(params))
  # Another batch at other parameters; the basis stays that of the first step.
  params = jax.tree_util.tree_map(lambda p: 1.1 * p, params)
  batch = (batch[0][::-1] * 0.9, batch[1])
  (updates, second), grads = _step(tx, params, batch, loss_fn, first)
  for name in _nets.NETS[net].layer_names:
    basis = first.inverses[name]
    assert np.array_equal(second.inverses[name]["QA"], basis["QA"])
    per_example = _nets.per_example_param_grads(_nets.NETS[net], params, batch, name)
    per_example = np.asarray(per_example, np.float64).reshape(
        per_example.shape[0], *basis["scaling"].shape)
    qa, qg = np.asarray(basis["QA"], np.float64), np.asarray(basis["QG"], np.float64)
    batch_scaling = np.mean((qa.T @ per_example @ qg) ** 2, axis=0)
    raw = decay * np.asarray(first.statistics[name]["scaling"]) + (1 - decay) * batch_scaling
    np.testing.assert_allclose(second.statistics[name]["scaling"], raw, rtol=1e-3, atol=1e-7)
    scaling = raw / float(second.ema_weight)
    np.testing.assert_allclose(second.inverses[name]["scaling"], scaling, rtol=1e-3, atol=1e-7)
    grad = np.asarray(_nets.layer_matrix(grads, name), np.float64)
    expected = qa @ ((qa.T @ grad @ qg) / (scaling + DAMPING)) @ qg.T
    np.testing.assert_allclose(_nets.layer_matrix(updates, name), expected, rtol=2e-3,
                               atol=1e-5 * np.abs(expected).max())


def test_ekfac_describes_and_first_kfac_step_is_the_damped_kronecker_solve():
  """`jkfac.kfac`'s first step (inverting at once, float64) is `-lr (A ⊗ G + λI)^-1 g`
  per layer, A and G by hand from the layers' inputs and output gradients."""
  lr = 0.1
  with jax.enable_x64(True):
    _, params, batch, loss_fn = _nets.make_problem(_nets.MLP, approx="ekfac", batch=8,
                                                   dtype=jnp.float64)
    rows = {p.path: p.approximation for p in jkfac.describe(loss_fn, params, batch).parameters}
    assert rows["Dense_0/kernel"] == "ekfac"
    tx = jkfac.kfac(loss_fn, batch, learning_rate=lr, damping=DAMPING, invert_every=1,
                    estimation="empirical", warm_start=False)
    (updates, state), grads = _step(tx, params, batch, loss_fn, tx.init(params))
    factors = _nets.kron_factors_by_hand(_nets.MLP, params, batch, "empirical")
  assert int(jkfac.preconditioner_state(state).inverse_fallbacks) == 0
  for name, (a, g) in factors.items():
    grad = np.asarray(_nets.layer_matrix(grads, name), np.float64)
    expected = -lr * np.linalg.solve(np.kron(a, g) + DAMPING * np.eye(a.shape[0] * g.shape[0]),
                                     grad.ravel()).reshape(grad.shape)
    np.testing.assert_allclose(_nets.layer_matrix(updates, name), expected, rtol=1e-7,
                               atol=1e-10, err_msg=name)
