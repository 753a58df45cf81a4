"""Dense layers applied at every sequence position: K-FAC-expand and K-FAC-reduce.

Oracle (Eschenhagen et al. 2023, with jkfac's loss scaling): for logits `(N, T, C)` and
a mean over the N*T tokens, the empirical cotangent of token (n, t) is
`sqrt(N T) * dL/dy_nt`. K-FAC-expand ("kron") takes every position as a row:
`A = mean_{n,t} a a^T`, `G = sum_{n,t} g g^T`; K-FAC-reduce averages the inputs and sums
the output gradients over each sequence first: `A = mean_n a_bar a_bar^T`,
`G = sum_n (sum_t g)(sum_t g)^T`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jkfac

N, T, D, C = 3, 4, 5, 6


def _loss(params, batch):
  logits = batch["x"] @ params["w"] + params["b"]
  jkfac.register_softmax_cross_entropy(logits, batch["y"])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


def _problem():
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
  params = {"w": jax.random.normal(k1, (D, C)), "b": jnp.zeros(C)}
  batch = {"x": jax.random.normal(k2, (N, T, D)), "y": jax.random.randint(k3, (N, T), 0, C)}
  return params, batch


def _factors(approx):
  params, batch = _problem()
  tx = jkfac.precondition(_loss, batch, damping=1e-2, cov_ema_decay=0.0,
                          estimation="empirical", approximations={"*": approx})
  grads = jax.grad(_loss)(params, batch)
  _, state = jax.jit(lambda: tx.update(grads, tx.init(params), params, batch=batch))()
  return {k: np.asarray(v) for k, v in state.statistics["w"].items()}


def _by_hand():
  params, batch = _problem()
  logits = batch["x"] @ params["w"] + params["b"]
  g = jax.grad(lambda y: optax.softmax_cross_entropy_with_integer_labels(y, batch["y"]).mean())(
      logits) * np.sqrt(N * T)
  a = np.concatenate([np.asarray(batch["x"]), np.ones((N, T, 1))], axis=-1)
  return a, np.asarray(g)


@pytest.mark.parametrize("approx", ["kron", "kron_reduce"])
def test_dense_over_positions_expand_and_reduce(approx):
  a, g = _by_hand()
  if approx == "kron":
    flat_a, flat_g = a.reshape(-1, D + 1), g.reshape(-1, C)
    A, G = flat_a.T @ flat_a / (N * T), flat_g.T @ flat_g
  else:
    a_bar, g_sum = a.mean(axis=1), g.sum(axis=1)
    A, G = a_bar.T @ a_bar / N, g_sum.T @ g_sum
  factors = _factors(approx)
  np.testing.assert_allclose(factors["A"], A, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(factors["G"], G, rtol=1e-5, atol=1e-6)


def test_reduce_differs_from_expand_where_positions_differ():
  expand, reduce = _factors("kron"), _factors("kron_reduce")
  assert not np.allclose(expand["A"], reduce["A"], rtol=0.05)
