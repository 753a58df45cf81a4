"""The loss table: every row of `losses.LOSSES` against its own NLL by automatic
differentiation, so a new loss kind is tested by adding its row."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jkfac
from jkfac import losses


ROWS, CLASSES = 3, 4
KEY = jax.random.PRNGKey(0)


@pytest.fixture(autouse=True)
def _x64():
  with jax.enable_x64(True):
    yield


def _prediction_and_targets(kind: str):
  rng = np.random.default_rng(0)
  z = jnp.asarray(rng.standard_normal((ROWS, CLASSES)))
  key = jax.random.PRNGKey(1)
  return z, losses.LOSSES[kind].sample(z, key)


@pytest.mark.parametrize("kind", list(losses.LOSSES))
def test_every_loss_kind_has_a_register_function(kind):
  assert callable(getattr(jkfac, f"register_{kind}"))


@pytest.mark.parametrize("kind", list(losses.LOSSES))
def test_row_grad_is_the_nll_gradient(kind):
  z, t = _prediction_and_targets(kind)
  loss = losses.LOSSES[kind]
  expected = jax.grad(lambda z: jnp.sum(loss.nll(z, t)))(z)
  np.testing.assert_allclose(loss.grad(z, t), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", list(losses.LOSSES))
def test_row_fisher_is_the_nll_hessian(kind):
  """For these losses (canonical links) the Fisher is the NLL's Hessian in the prediction:
  the square-root columns and the Fisher product give the same matrix per row."""
  z, t = _prediction_and_targets(kind)
  loss = losses.LOSSES[kind]
  hessians = jax.vmap(jax.hessian(lambda zr, tr: loss.nll(zr[None], tr[None])[0]))(z, t)
  cols = loss.sqrt_fisher(z)                                   # (C, rows, C)
  np.testing.assert_allclose(jnp.einsum("kri,krj->rij", cols, cols), hessians,
                             rtol=1e-10, atol=1e-12)
  eye = jnp.broadcast_to(jnp.eye(CLASSES), (ROWS, CLASSES, CLASSES))
  products = jax.vmap(loss.fisher_product, in_axes=(None, 2), out_axes=2)(z, eye)
  np.testing.assert_allclose(products, hessians, rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(losses.output_curvature(kind, z, eye[:, 0]), hessians[:, 0],
                             rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", list(losses.LOSSES))
def test_sampled_gradients_average_to_the_fisher(kind):
  """E_t[g gᵀ] over targets drawn by `sample` is the Fisher (Monte Carlo, 20000 draws)."""
  z = jnp.asarray(np.random.default_rng(1).standard_normal((1, CLASSES)))
  loss = losses.LOSSES[kind]
  keys = jax.random.split(KEY, 20000)
  g = jax.vmap(lambda key: loss.grad(z, loss.sample(z, key))[0])(keys)
  cols = loss.sqrt_fisher(z)[:, 0]
  np.testing.assert_allclose(g.T @ g / len(keys), cols.T @ cols, atol=0.03)


def test_unknown_kind_names_the_known_ones():
  with pytest.raises(ValueError, match="softmax_cross_entropy"):
    losses.loss_kind("hinge")
