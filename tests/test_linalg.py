"""`jkfac.linalg.eigh`: `jnp.linalg.eigh`'s values, one LAPACK call per matrix."""

from __future__ import annotations

import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jkfac
from jkfac import linalg


def _matrices(shape):
  x = jax.random.normal(jax.random.PRNGKey(0), (*shape, 6, 6))
  return x @ jnp.swapaxes(x, -1, -2)


def _eigh_ranks(jaxpr_text):
  """The rank of the eigenvector output of every eigh in a printed jaxpr, nested too."""
  return [len(dims.split(",")) for dims in
          re.findall(r"\w+:f32\[([\d,]+)\] \w+:f32\[[\d,]+\] = eigh\[", jaxpr_text)]


def _eigh_operand_ranks(fn, matrices):
  return _eigh_ranks(str(jax.make_jaxpr(fn)(matrices)))


FORMS = {
    "direct": linalg.eigh,
    "vmap": jax.vmap(linalg.eigh),
    "nested vmap": jax.vmap(jax.vmap(linalg.eigh)),
    "jit of vmap": jax.jit(jax.vmap(linalg.eigh)),
}


@pytest.mark.parametrize("form", FORMS)
def test_eigh_equals_jnp_eigh(form):
  matrices = _matrices((3, 2))
  values, vectors = FORMS[form](matrices)
  expected_values, _ = jnp.linalg.eigh(matrices)
  np.testing.assert_allclose(values, expected_values, rtol=1e-5, atol=1e-5)
  rebuilt = (vectors * values[..., None, :]) @ jnp.swapaxes(vectors, -1, -2)
  np.testing.assert_allclose(rebuilt, matrices, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("form", FORMS)
def test_eigh_decomposes_one_matrix_per_call(form):
  ranks = _eigh_operand_ranks(FORMS[form], _matrices((3, 2)))
  assert ranks and set(ranks) == {2}


def test_jnp_eigh_under_vmap_is_one_batched_call():
  """The control for the test above: what `linalg.eigh` avoids."""
  assert _eigh_operand_ranks(jax.vmap(jnp.linalg.eigh), _matrices((3,))) == [3]


_SCANNED_STEPS = """
import sys
import jax, jax.numpy as jnp, optax, flax.linen as nn
import jkfac
class Body(nn.Module):
  @nn.compact
  def __call__(self, h, _):
    return jnp.tanh(nn.Dense(256)(h)), None
class Scanned(nn.Module):  # four 256-wide layers stacked by nn.scan
  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Dense(256)(x))
    x, _ = nn.scan(Body, variable_axes={"params": 0}, split_rngs={"params": True},
                   length=4)()(x, None)
    return nn.Dense(10)(x)
model, key = Scanned(), jax.random.PRNGKey(0)
batch = {"x": jax.random.normal(key, (128, 784)), "y": jnp.arange(128) % 10}
def loss_fn(params, batch):
  logits = model.apply({"params": params}, batch["x"])
  jkfac.register_softmax_cross_entropy(logits, batch["y"])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
for settings in ({"inverse_method": "eigh"}, {"approximations": {"*": "ekfac"}}):
  params = model.init(key, batch["x"])["params"]
  tx = jkfac.kfac(loss_fn, batch, **settings)
  @jax.jit
  def step(params, state):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, state = tx.update(grads, state, params, batch=batch)
    return optax.apply_updates(params, updates), state, loss
  state = tx.init(params)
  for _ in range(3):  # the first inverses come at step 1 (warm start)
    params, state, loss = step(params, state)
  print(float(loss), flush=True)
"""


def _training_step_jaxpr(model_name: str, make_tx) -> str:
  """The jaxpr of a whole training step (gradient and update) of a blocked MLP
  784-512-256-10 or of four scanned 256-wide layers, as text."""
  import flax.linen as nn
  import optax

  class Body(nn.Module):
    @nn.compact
    def __call__(self, h, _):
      return jnp.tanh(nn.Dense(256)(h)), None

  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      if model_name == "scanned":
        x = jnp.tanh(nn.Dense(256)(x))
        x, _ = nn.scan(Body, variable_axes={"params": 0}, split_rngs={"params": True},
                       length=4)()(x, None)
      else:
        for width in (512, 256):
          x = jnp.tanh(nn.Dense(width)(x))
      return nn.Dense(10)(x)

  model, key = Model(), jax.random.PRNGKey(0)
  batch = {"x": jnp.ones((128, 784)), "y": jnp.arange(128) % 10}
  params = model.init(key, batch["x"])["params"]

  def loss_fn(params, batch):
    logits = model.apply({"params": params}, batch["x"])
    jkfac.register_softmax_cross_entropy(logits, batch["y"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

  tx = make_tx(loss_fn, batch)

  def step(params, state):
    grads = jax.grad(loss_fn)(params, batch)
    return tx.update(grads, state, params, batch=batch)

  return str(jax.make_jaxpr(step)(params, tx.init(params)))


STEPS = {
    "kfac eigh": lambda loss_fn, batch: jkfac.kfac(loss_fn, batch, inverse_method="eigh"),
    "ekfac": lambda loss_fn, batch: jkfac.kfac(loss_fn, batch, approximations={"*": "ekfac"}),
    "eigen_adam": lambda loss_fn, batch: jkfac.eigen_adam(loss_fn, batch, 1e-3),
}


@pytest.mark.parametrize("model_name", ["blocked", "scanned"])
@pytest.mark.parametrize("optimizer", STEPS)
def test_no_training_step_has_a_batched_eigh(model_name, optimizer):
  ranks = _eigh_ranks(_training_step_jaxpr(model_name, STEPS[optimizer]))
  assert ranks and set(ranks) == {2}, ranks


@pytest.mark.slow
def test_eigendecompositions_of_scanned_layers_finish_in_a_compiled_step():
  """Regression: with `jnp.linalg.eigh` vmapped over the stack, step 1 hung on XLA:CPU
  (jax 0.10.2) with `inverse_method="eigh"` and with EK-FAC. End to end (compiled steps
  in a subprocess, 10 s); the default run checks the cause on the jaxpr, above."""
  result = subprocess.run([sys.executable, "-c", _SCANNED_STEPS], capture_output=True,
                          text=True, timeout=150)
  assert result.returncode == 0, result.stderr[-2000:]
  losses = [float(line) for line in result.stdout.split()]
  assert len(losses) == 2 and np.all(np.isfinite(losses))
