"""`window_max.max_pool` is `lax.reduce_window_max`: values, forward and reverse
derivatives equal JAX's own rules exactly (float64, with ties: ReLU zeros and repeated
values), for tiling, overlapping, padded, 1-D and 3-D pools; and jkfac's passes use it."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jkfac
from jkfac import window_max

POOLS = {
    # name: (input shape, pool)
    "2x2 tiling, odd sizes": ((3, 9, 7, 4), lambda h: nn.max_pool(h, (2, 2), (2, 2))),
    "3x3/2 SAME (the seed convnet's)": ((2, 9, 8, 3),
                                       lambda h: nn.max_pool(h, (3, 3), (2, 2), "SAME")),
    "3x2/(1,2) uneven padding": ((2, 6, 7, 2),
                                 lambda h: nn.max_pool(h, (3, 2), (1, 2), ((1, 2), (0, 1)))),
    "1-D": ((2, 10, 3), lambda h: nn.max_pool(h, (3,), (3,))),
    "3-D": ((2, 4, 5, 4, 2), lambda h: nn.max_pool(h, (2, 2, 2), (2, 1, 2), "SAME")),
}


def _params(pool, x):
  (eqn,) = [e for e in jax.make_jaxpr(pool)(x).jaxpr.eqns
            if e.primitive is jax.lax.reduce_window_max_p]
  return eqn.params


@pytest.mark.parametrize("case", list(POOLS))
def test_max_pool_matches_lax_in_value_jvp_and_vjp(case):
  shape, pool = POOLS[case]
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    x = jnp.asarray(np.maximum(rng.standard_normal(shape), 0))  # ReLU zeros tie
    x = x.at[(0,) * (len(shape) - 1) + (slice(None),)].set(1.5)  # and repeated values
    params = _params(pool, x)
    assert window_max.supported(params)
    reference = lambda x: jax.lax.reduce_window_max_p.bind(x, **params)
    mine = lambda x: window_max.max_pool(x, **params)
    tangent = jnp.asarray(rng.standard_normal(shape))
    expected, expected_dot = jax.jvp(reference, (x,), (tangent,))
    found, found_dot = jax.jvp(mine, (x,), (tangent,))
    np.testing.assert_array_equal(found, expected)
    np.testing.assert_array_equal(found_dot, expected_dot)
    cotangent = jnp.asarray(rng.standard_normal(expected.shape))
    np.testing.assert_array_equal(jax.vjp(mine, x)[1](cotangent)[0],
                                  jax.vjp(reference, x)[1](cotangent)[0])


def test_dilated_large_and_integer_pools_keep_jaxs_rule():
  x = jnp.ones((1, 9, 9, 1))
  params = _params(lambda h: jax.lax.reduce_window(
      h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 1, 1, 1), "VALID",
      window_dilation=(1, 2, 2, 1)), x)
  assert not window_max.supported(params)
  assert not window_max.supported({**params, "window_dilation": (1,) * 4,
                                   "window_dimensions": (1, 5, 5, 1)})  # 25 > MAX_WINDOW
  ints = jnp.arange(16, dtype=jnp.int32).reshape(1, 4, 4, 1)
  params = _params(lambda h: nn.max_pool(h, (2, 2), (2, 2)), ints.astype(jnp.float32))
  pool_of_ints = lambda scale: window_max.max_pool((scale * ints).astype(jnp.int32), **params)
  value, tangent = jax.jvp(pool_of_ints, (1.0,), (1.0,))  # an integer tangent: float0
  np.testing.assert_array_equal(value, jax.lax.reduce_window_max_p.bind(ints, **params))
  assert tangent.dtype == jax.dtypes.float0


class _PoolNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(jkfac.flax.Conv(4, (3, 3))(x))
    x = nn.max_pool(x, (3, 3), (2, 2), "SAME")
    return jkfac.flax.Dense(3)(x.reshape(x.shape[0], -1))


def test_jkfac_passes_differentiate_pools_without_select_and_scatter():
  """jkfac.value_and_grad's gradient through a pool equals jax.value_and_grad's, and
  neither its pass nor the quadratic model's products use JAX's pooling rules."""
  rng = np.random.default_rng(1)
  batch = (jnp.asarray(rng.standard_normal((4, 8, 8, 2)), jnp.float32),
           jnp.asarray(rng.integers(0, 3, 4)))
  model = _PoolNet()
  params = model.init(jax.random.PRNGKey(0), batch[0])["params"]

  def loss_fn(params, batch):
    logits = jkfac.register_softmax_cross_entropy(model.apply({"params": params}, batch[0]),
                                                  batch[1])
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), batch[1][:, None], 1))

  loss, grads, _ = jkfac.value_and_grad(loss_fn)(params, batch)
  expected_loss, expected_grads = jax.value_and_grad(loss_fn)(params, batch)
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-6)
  jax.tree_util.tree_map(lambda f, e: np.testing.assert_allclose(f, e, rtol=1e-5, atol=1e-7),
                         grads, expected_grads)
  tx = jkfac.kfac(loss_fn, batch)

  def step(params, state):
    _, grads, curvature = jkfac.value_and_grad(loss_fn)(params, batch)
    return tx.update(grads, state, params, batch=batch, curvature=curvature)

  text = str(jax.make_jaxpr(step)(params, tx.init(params)))
  assert "reduce_window_max" in text
  assert "select_and_scatter_add" not in text and "select_and_gather_add" not in text
