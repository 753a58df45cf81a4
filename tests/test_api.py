"""The public surface: coverage warnings, `strict`, names and deprecation paths."""

import inspect
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import pytest

import jkfac
from jkfac import layer_table


def _loss(params, batch):
  """`w` is used through `sin` (no recognised layer); `dense` is a plain dense layer."""
  hidden = jnp.tanh(batch["x"] @ params["dense"]["kernel"])
  y = hidden @ jnp.sin(params["w"]).T + params["scale"]
  jkfac.register_squared_error(y, batch["y"])
  return 0.5 * jnp.mean(jnp.sum((y - batch["y"]) ** 2, -1))


_PARAMS = {"dense": {"kernel": jnp.ones((4, 3))}, "w": jnp.ones((2, 3)), "scale": jnp.ones(2)}
_BATCH = {"x": jnp.ones((5, 4)), "y": jnp.ones((5, 2))}


def test_a_2d_parameter_in_a_generic_block_warns_and_strict_raises():
  tx = jkfac.kfac(_loss, _BATCH, learning_rate=0.1, damping=1e-2)
  with pytest.warns(layer_table.GenericBlockWarning, match=r"\['w'\]"):
    tx.init(_PARAMS)   # 'scale' is 1-D: a diagonal block is all its structure allows
  strict = jkfac.kfac(_loss, _BATCH, learning_rate=0.1, damping=1e-2, strict=True)
  with pytest.raises(ValueError, match=r"parameters \['w'\]"):
    strict.init(_PARAMS)


def test_register_generic_accepts_the_diagonal_block_silently():
  def marked(params, batch):
    return _loss({**params, "w": jkfac.register_generic(params["w"])}, batch)
  with warnings.catch_warnings():
    warnings.simplefilter("error", layer_table.GenericBlockWarning)
    jkfac.kfac(marked, _BATCH, learning_rate=0.1, damping=1e-2, strict=True).init(_PARAMS)


def test_describe_ends_with_a_coverage_line():
  text = str(jkfac.describe(_loss, _PARAMS, _BATCH))
  # dense kernel: 12 entries structured; w (6) and scale (2) generic; float32 = 4 bytes each.
  assert text.splitlines()[-1] == (
      "Coverage: 12 parameters (48 B) in structured blocks, 8 (32 B) generic: 60.0% structured")


def test_approximation_patterns_match_a_suffix_after_a_slash():
  variables = {"params": _PARAMS}
  def loss(variables, batch):
    return _loss(variables["params"], batch)
  trace = layer_table.trace_with_approximations(loss, variables, _BATCH,
                                                approximations={"dense": "diagonal"})
  assert [(layer.name, layer.approx) for layer in trace.layers] == [("params/dense", "diagonal")]
  assert layer_table.pattern_matches("Conv_0", "params/Conv_0")
  assert not layer_table.pattern_matches("Conv_0", "params/Conv_01")
  assert not layer_table.pattern_matches("arams/Conv_0", "params/Conv_0")


def test_pre_release_shims_are_gone():
  tx = jkfac.precondition(_loss, _BATCH, damping=1e-2)
  assert "stats" not in inspect.signature(tx.update).parameters
  for name in ("APPROX_KRONECKER_NAME", "register_categorical_predictive_distribution",
               "register_multi_bernoulli_predictive_distribution",
               "register_normal_predictive_distribution"):
    assert not hasattr(jkfac, name)
    assert hasattr(jkfac.layer_collection, name)


def test_approx_constants_live_in_layer_collection():
  assert jkfac.layer_collection.APPROX_KRON_INDEP_NAME == "kron_indep"
  assert set(jkfac.blocks.APPROXIMATIONS) >= {
      getattr(jkfac.layer_collection, n) for n in dir(jkfac.layer_collection)
      if n.startswith("APPROX_")}


def test_import_jkfac_does_not_import_flax():
  code = "import sys, jkfac; assert 'flax' not in sys.modules; import jkfac.flax; print('ok')"
  assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        check=True).stdout.strip() == "ok"


def test_an_unbound_collective_in_the_model_says_how_to_bind_it():
  def loss(params, batch):
    hidden = batch["x"] @ params["dense"]["kernel"]
    hidden = hidden - jax.lax.pmean(hidden.mean(0), "batch")   # a collective, as BatchNorm
    return _loss({**params, "dense": {"kernel": jnp.eye(4, 3)}}, {**batch, "x": hidden @
                                                                  jnp.ones((3, 4))})
  with pytest.raises(ValueError, match="axis_name= equal to the model's"):
    jkfac.describe(loss, _PARAMS, _BATCH)


@pytest.mark.parametrize("wrap, match", [
    (lambda f, x: jax.lax.cond(True, f, f, x), "lax.cond / lax.switch"),
    (lambda f, x: jax.lax.while_loop(lambda c: c[1] < 1, lambda c: (f(c[0]), c[1] + 1),
                                     (x, 0))[0], "while_loop"),
])
def test_tags_in_cond_and_while_say_why_not(wrap, match):
  def loss(params, batch):
    layer = lambda x: jkfac.register_dense(x @ params["w"], x, params["w"])
    y = wrap(layer, batch["x"])
    jkfac.register_squared_error(y, batch["y"])
    return 0.5 * jnp.mean(jnp.sum((y - batch["y"]) ** 2, -1))
  params, batch = {"w": jnp.eye(4)}, {"x": jnp.ones((5, 4)), "y": jnp.ones((5, 4))}
  with pytest.raises(NotImplementedError, match=match):
    jkfac.describe(loss, params, batch)


def test_a_loss_that_is_not_a_scalar_is_refused_by_name():
  """A per-example loss vector (the mean forgotten) with a shapes-only example batch:
  `update` says what is wrong (before: a broadcasting `TypeError` inside the step)."""
  params, batch = _params_and_batch()

  def per_example(params, batch):
    logits = jkfac.register_softmax_cross_entropy(batch["x"] @ params["w"], batch["y"])
    return -jax.nn.log_softmax(logits)[jnp.arange(batch["y"].shape[0]), batch["y"]]

  tx = jkfac.kfac(per_example, jax.eval_shape(lambda: batch))
  with pytest.raises(ValueError, match="scalar loss"):
    tx.update(params, tx.init(params), params, batch=batch)


def test_a_python_float_parameter_steps_outside_jit():
  """A Python-float leaf (a temperature) in the parameters, the default step run eagerly."""
  params, batch = _params_and_batch()
  params = {**params, "temp": 1.0}

  def loss_fn(params, batch):
    logits = jkfac.register_softmax_cross_entropy(
        params["temp"] * (batch["x"] @ params["w"]), batch["y"])
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(batch["y"].shape[0]), batch["y"]])

  tx = jkfac.kfac(loss_fn, batch)
  updates, _ = tx.update(jax.grad(loss_fn)(params, batch), tx.init(params), params,
                         batch=batch)
  assert jnp.isfinite(updates["temp"])


def _params_and_batch():
  key = jax.random.PRNGKey(0)
  params = {"w": jax.random.normal(key, (4, 3)) * 0.3}
  batch = {"x": jax.random.normal(key, (8, 4)), "y": jnp.arange(8) % 3}
  return params, batch
