"""jkfac is never silently wrong: each case of docs/reliability.md against an oracle.

Batch-axis conventions of registered losses, the exact curvature of sequence models
(float64 Jacobians), skipped non-finite batches, inversion fallbacks, the damping floor,
states from other models, remat, schedules, dtypes, momentum recurrences, unbiased
sampling, and stress rows. Models are tiny plain-JAX MLPs tagged with
`jkfac.register_dense` (flax only for remat); every loop runs one jitted step.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jkfac
from jkfac import blocks, layer_table, inverses, linalg, statistics

from tests import _asserts, _nets

SIZES = (5, 4, 3)  # input, hidden, classes
BATCH = 8

# Every program here is tiny and runs a few times: LLVM's optimisations cost more compile
# time than they save (about 45% of this file's time on CPU). XLA's graph passes still run.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


# --- a tiny tagged MLP ------------------------------------------------------------------------


def mlp_params(sizes=SIZES, **kwargs):
  return _nets.mlp_params(sizes, **kwargs)


mlp_apply = _nets.mlp_apply


def classifier_loss(params, batch, activation=jnp.tanh):
  logits = jkfac.register_softmax_cross_entropy(mlp_apply(params, batch["x"], activation),
                                                batch["y"])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


def make_batch(step=0, n=BATCH, dtype=jnp.float32, d_in=SIZES[0], classes=SIZES[-1]):
  rng = np.random.default_rng(100 + step)
  return {"x": jnp.asarray(rng.standard_normal((n, d_in)), dtype),
          "y": jnp.asarray(rng.integers(0, classes, n), jnp.int32)}


def precondition_state(opt_state) -> jkfac.PreconditionState:
  """The `PreconditionState` inside an optimizer state (e.g. of `kfac`'s chain)."""
  found = [s for s in jax.tree_util.tree_leaves(
      opt_state, is_leaf=lambda s: isinstance(s, jkfac.PreconditionState))
           if isinstance(s, jkfac.PreconditionState)]
  assert len(found) == 1, opt_state
  return found[0]


def with_skip_counter(opt_state, value):
  """`opt_state` with its `PreconditionState.skipped_steps` set to `value`."""
  return jax.tree_util.tree_map(
      lambda s: s._replace(skipped_steps=jnp.asarray(value, s.skipped_steps.dtype))
      if isinstance(s, jkfac.PreconditionState) else s,
      opt_state, is_leaf=lambda s: isinstance(s, jkfac.PreconditionState))


def kfac(**kwargs):
  kwargs = {"learning_rate": 0.1, "damping": 1e-2, "cov_update_every": 1, "invert_every": 2,
            **kwargs}
  return jkfac.kfac(classifier_loss, make_batch(), **kwargs)


def precondition(**kwargs):
  kwargs = {"damping": 1e-2, "invert_every": 2, **kwargs}
  return jkfac.precondition(classifier_loss, make_batch(), **kwargs)


@functools.lru_cache(maxsize=None)
def grad_fn(loss_fn=classifier_loss):
  return jit(jax.grad(loss_fn))


_apply_updates = jit(optax.apply_updates)


def jit_update(tx):
  """`tx.update` jitted as `(grads, state, params, batch) -> (updates, state)`."""
  return jit(lambda grads, state, params, batch: tx.update(grads, state, params, batch=batch))


def cached(factory, **kwargs):
  """`(tx, jitted update)` of `kfac(**kwargs)` or `precondition(**kwargs)`, built once per
  setting, so that the tests sharing a setting share one compilation."""
  return _cached(factory, tuple(sorted(kwargs.items())))


@functools.lru_cache(maxsize=None)
def _cached(factory, kwargs):
  tx = (kfac if factory == "kfac" else precondition)(**dict(kwargs))
  return tx, jit_update(tx)


@functools.lru_cache(maxsize=None)
def _jit_init(tx):
  return jit(tx.init)


def init(tx, params):
  """`tx.init(params)`, jitted (once per transformation): eager, it dispatches op by op."""
  return _jit_init(tx)(params)


def train_step(update, params, state, batch, poison=None, apply=True, loss_fn=classifier_loss):
  """`(params, state, updates)` after one step; `poison` (NaN, Inf) is added to one
  gradient entry; with `apply` the updates are applied to the parameters."""
  grads = grad_fn(loss_fn)(params, batch)
  if poison is not None:
    grads = {**grads, "dense0": {**grads["dense0"],
                                 "kernel": grads["dense0"]["kernel"].at[0, 0].add(poison)}}
  updates, state = update(grads, state, params, batch)
  return (_apply_updates(params, updates) if apply else params), state, updates


# --- 1. axis 0 is the batch: (N,) predictions ----------------------------------------------------


def _one_output_loss(kind, flat):
  """A regression / binary classifier with one output, registered as `(N,)` if `flat`."""
  def loss_fn(params, batch):
    y, t = mlp_apply(params, batch["x"]), batch["t"]           # (N, 1), (N,)
    if flat:
      y = (jkfac.register_squared_error if kind == "squared_error"
           else jkfac.register_sigmoid_cross_entropy)(y[:, 0], t)
    else:
      y = (jkfac.register_squared_error if kind == "squared_error"
           else jkfac.register_sigmoid_cross_entropy)(y, t[:, None])[:, 0]
    if kind == "squared_error":
      return 0.5 * jnp.mean((y - t) ** 2)
    return optax.sigmoid_binary_cross_entropy(y, t).mean()
  return loss_fn


@pytest.mark.parametrize("estimation", ["fisher", "exact"])
@pytest.mark.parametrize("kind", ["squared_error", "sigmoid_cross_entropy"])
def test_one_dimensional_prediction_is_a_batch_of_single_outputs(kind, estimation):
  params = mlp_params((3, 4, 1))
  rng = np.random.default_rng(0)
  batch = {"x": jnp.asarray(rng.standard_normal((6, 3)), jnp.float32),
           "t": jnp.asarray(rng.integers(0, 2, 6), jnp.float32)}

  @jit
  def run(params, batch):
    results = {}
    for flat in (False, True):
      loss_fn = _one_output_loss(kind, flat)
      tx = jkfac.precondition(loss_fn, batch, damping=1e-2, estimation=estimation)
      grads = jax.grad(loss_fn)(params, batch)
      updates, state = tx.update(grads, tx.init(params), params, batch=batch)
      results[flat] = grads, updates, state.statistics
    return results

  results = run(params, batch)
  _asserts.assert_trees_close(results[True], results[False], rtol=1e-5, atol=1e-7)
  grads, updates, _ = results[False]
  assert not np.allclose(updates["dense0"]["kernel"], grads["dense0"]["kernel"], rtol=0.05)


def test_softmax_with_one_dimensional_logits_raises():
  with pytest.raises(ValueError, match="class axis"):
    jkfac.register_softmax_cross_entropy(jnp.zeros(4), jnp.zeros(4, jnp.int32))


# --- 2. "exact" with several rows per example: the GGN of a sequence model ----------------------


def _sequence_problem(kind):
  """x `(N, T, d)` -> dense0 -> tanh -> a fixed T x T mixing over positions -> dense1 ->
  `(N, T, C)`; the loss is the mean over the N*T rows (float64)."""
  n, t, d, h, c = 3, 4, 3, 4, 3
  rng = np.random.default_rng(7)
  params = {"dense0": {"kernel": rng.standard_normal((d, h)) / math.sqrt(d),
                       "bias": 0.3 * rng.standard_normal(h)},
            "dense1": {"kernel": rng.standard_normal((h, c)) / math.sqrt(h),
                       "bias": 0.3 * rng.standard_normal(c)}}
  params = jax.tree_util.tree_map(lambda p: jnp.asarray(p, jnp.float64), params)
  mix = jnp.asarray(rng.standard_normal((t, t)) / math.sqrt(t), jnp.float64)
  x = jnp.asarray(rng.standard_normal((n, t, d)), jnp.float64)
  targets = (jnp.asarray(rng.integers(0, c, (n, t)), jnp.int32) if kind == "softmax_cross_entropy"
             else jnp.asarray(rng.standard_normal((n, t, c)), jnp.float64))

  def logits_fn(params, x, tag=True):
    def dense(p, x):
      y = x @ p["kernel"] + p["bias"]
      return jkfac.register_dense(y, x, p["kernel"], p["bias"]) if tag else y
    h = jnp.einsum("st,nth->nsh", mix, jnp.tanh(dense(params["dense0"], x)))
    return dense(params["dense1"], h)

  def loss_fn(params, batch):
    x, targets = batch
    y = logits_fn(params, x)
    if kind == "softmax_cross_entropy":
      y = jkfac.register_softmax_cross_entropy(y, targets)
      return optax.softmax_cross_entropy_with_integer_labels(y, targets).mean()
    y = jkfac.register_squared_error(y, targets)
    return 0.5 * jnp.sum((y - targets) ** 2) / (n * t)

  return params, (x, targets), loss_fn, logits_fn


@pytest.mark.parametrize("kind,approximations", [
    ("softmax_cross_entropy", {"dense0": "full", "dense1": "diagonal"}),
    ("squared_error", {"dense0": "diagonal", "dense1": "full"}),
])
def test_exact_curvature_of_a_sequence_model_is_the_ggn(kind, approximations):
  with jax.enable_x64(True):
    params, batch, loss_fn, logits_fn = _sequence_problem(kind)
    tx = jkfac.precondition(loss_fn, batch, damping=1e-3, cov_ema_decay=0.0,
                            estimation="exact", approximations=approximations)

    @jit
    def run(params, batch):
      grads = jax.grad(loss_fn)(params, batch)
      return tx.update(grads, tx.init(params), params, batch=batch)[1]

    state = run(params, batch)
    assert float(state.ema_weight) == 1.0
    for name, approx in approximations.items():
      ggn = np.asarray(_nets.row_scaled_ggn(logits_fn, params, batch[0], name, kind))
      got = jax.tree_util.tree_map(lambda s: s / state.ema_weight, state.statistics[name])
      if approx == "full":
        _asserts.assert_trees_close(got, {"F": ggn}, rtol=1e-6, atol=1e-12)
      else:
        d_out = params[name]["kernel"].shape[1]
        _asserts.assert_trees_close(got, {"diagonal": np.diag(ggn).reshape(-1, d_out)},
                                    rtol=1e-6, atol=1e-12)


# --- 3. a non-finite batch is skipped ------------------------------------------------------------


def _bad(batch, kind):
  """`(batch, poison)` of a bad step: NaN in the input, or a NaN / Inf gradient entry."""
  if kind == "nan_input":
    return {**batch, "x": batch["x"].at[0, 0].set(jnp.nan)}, None
  return batch, {"nan_grad": jnp.nan, "inf_grad": jnp.inf}[kind]


@pytest.mark.parametrize("bad", ["nan_input", "nan_grad", "inf_grad"])
@pytest.mark.parametrize("factory", ["precondition", "kfac"])
def test_nonfinite_batch_changes_nothing_but_the_skip_counter(factory, bad):
  # invert_every=1: the bad step would have refreshed statistics and inverses.
  tx, update = (cached("kfac", momentum=0.9, invert_every=1) if factory == "kfac"
                else cached("precondition", invert_every=1))
  params = mlp_params()
  p1, s1, _ = train_step(update, params, init(tx, params), make_batch(1))
  bad_batch, poison = _bad(make_batch(1), bad)
  p_bad, s_bad, u_bad = train_step(update, p1, s1, bad_batch, poison)
  _asserts.assert_trees_equal(p_bad, p1)
  _asserts.assert_trees_equal(s_bad, with_skip_counter(s1, 1))
  _asserts.assert_trees_equal(u_bad, jax.tree_util.tree_map(jnp.zeros_like, u_bad))
  # [b1, bad, b2] trains exactly as [b1, b2].
  after_bad = train_step(update, p_bad, s_bad, make_batch(2))
  without = train_step(update, p1, s1, make_batch(2))
  assert int(precondition_state(after_bad[1]).skipped_steps) == 1
  _asserts.assert_trees_equal((after_bad[0], with_skip_counter(after_bad[1], 0), after_bad[2]),
                              without)
  assert not np.allclose(without[2]["dense0"]["kernel"], 0.0)


# --- 4. inversion fallbacks --------------------------------------------------------------------


def test_failed_cholesky_is_retried_with_eigh():
  factor, damping = jnp.diag(jnp.array([1.0, -1.0])), jnp.asarray(0.1)  # indefinite, finite
  block = blocks.REGISTRY["dense", "kron"]
  assert not np.all(np.isfinite(block.invert(factor, damping, "cholesky")))
  inverse = jit(functools.partial(inverses.invert_factor, block, "cholesky"))(factor,
                                                                                    damping)
  _asserts.assert_trees_close(inverse, linalg.damped_inverse(factor, damping, "eigh"), rtol=1e-6)
  _asserts.assert_trees_close(inverse, np.diag([1 / 1.1, 1 / 0.1]), rtol=1e-6)  # -1 clipped to 0


def test_layer_with_a_nonfinite_inverse_keeps_all_its_previous_inverses(monkeypatch):
  (tx, update), params = cached("precondition", invert_every=1), mlp_params()
  _, s1, _ = train_step(update, params, init(tx, params), make_batch(1), apply=False)
  _, reference, reference_updates = train_step(update, params, s1, make_batch(2), apply=False)

  original = inverses.invert_factor

  def failing(block, method, factor, damping):  # dense0's G (the only 4 x 4 factor) fails
    inverse = original(block, method, factor, damping)
    return jnp.full_like(inverse, jnp.nan) if factor.shape == (4, 4) else inverse

  monkeypatch.setattr(inverses, "invert_factor", failing)
  _, s2, updates = train_step(jit_update(tx), params, s1, make_batch(2), apply=False)  # traced now
  monkeypatch.undo()
  assert int(reference.inverse_fallbacks) == 0 and int(s2.inverse_fallbacks) == 1
  _asserts.assert_trees_equal(s2.inverses["dense0"], s1.inverses["dense0"])  # A too: no mix
  assert not np.allclose(reference.inverses["dense0"]["A"], s1.inverses["dense0"]["A"], rtol=1e-3)
  _asserts.assert_trees_close(s2.inverses["dense1"], reference.inverses["dense1"], rtol=1e-6)
  _asserts.assert_trees_close(s2.statistics, reference.statistics, rtol=1e-6)
  _asserts.assert_all_finite(updates)
  _asserts.assert_trees_close(updates["dense1"], reference_updates["dense1"], rtol=1e-6)


# --- 5. the damping floor ---------------------------------------------------------------------


def _assert_floor_inverses(state):
  assert float(state.damping) == np.float32(jkfac.MIN_DAMPING)
  _asserts.assert_all_finite(state.inverses)
  assert int(state.inverse_fallbacks) == 0
  for name, factors in state.inverses.items():
    for factor, inverse in factors.items():
      assert not np.allclose(inverse, np.eye(len(inverse)), atol=1e-3), (name, factor)


def test_scheduled_damping_at_or_below_zero_is_raised_to_the_floor():
  damping = lambda count: jnp.where(count == 0, 0.0, -1.0)  # zero, then negative
  tx, params = precondition(damping=damping, invert_every=1), mlp_params()
  state, update = init(tx, params), jit_update(tx)
  for step in range(2):
    _, state, updates = train_step(update, params, state, make_batch(step), apply=False)
    _assert_floor_inverses(state)
    _asserts.assert_all_finite(updates)


def test_injected_zero_damping_is_raised_to_the_floor():
  tx = optax.inject_hyperparams(jkfac.kfac, static_args=("loss_fn", "example_batch"))(
      loss_fn=classifier_loss, example_batch=make_batch(), learning_rate=0.1, damping=1e-2,
      invert_every=1, warm_start=False)
  params = mlp_params()
  state = init(tx, params)
  state = state._replace(hyperparams={**state.hyperparams,
                                      "damping": jnp.zeros_like(state.hyperparams["damping"])})
  _, state, updates = train_step(jit_update(tx), params, state, make_batch())
  assert float(state.hyperparams["damping"]) == 0.0
  _assert_floor_inverses(precondition_state(state))
  _asserts.assert_all_finite(updates)


@pytest.mark.parametrize("factory", [precondition, kfac], ids=["precondition", "kfac"])
def test_float_damping_below_the_floor_warns(factory):
  with pytest.warns(UserWarning, match="MIN_DAMPING"):
    factory(damping=1e-12)


# --- 6. a state from another model --------------------------------------------------------------


@pytest.mark.parametrize("other_sizes,message", [
    ((5, 6, 3), r"layer 'dense0' factor 'G' has shape \(6, 6\) in the state but \(4, 4\)"),
    ((5, 4, 4, 3), r"layers of another model \['dense2'\]"),
])
def test_state_of_another_model_raises_naming_the_layer(other_sizes, message):
  params, batch = mlp_params(), make_batch()
  tx, tx2 = precondition(), precondition()
  state = init(tx2, mlp_params(other_sizes))
  grads = grad_fn()(params, batch)
  with pytest.raises(ValueError, match=message):
    jit_update(tx)(grads, state, params, batch)


# --- 7. nn.remat ----------------------------------------------------------------------------------


class _RematMLP(nn.Module):
  remat: bool

  @nn.compact
  def __call__(self, x):
    dense = nn.remat(nn.Dense) if self.remat else nn.Dense
    return nn.Dense(SIZES[2], name="out")(jnp.tanh(dense(SIZES[1], name="hidden")(x)))


def _remat_loss(remat):
  def loss_fn(params, batch):
    logits = _RematMLP(remat).apply({"params": params}, batch["x"])
    logits = jkfac.register_softmax_cross_entropy(logits, batch["y"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
  return loss_fn


def _primitive_names(jaxpr) -> set[str]:
  """The primitive names of every equation of `jaxpr`, sub-jaxprs included."""
  names = set()
  for eqn in jaxpr.eqns:
    names.add(eqn.primitive.name)
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's jaxpr
        if hasattr(sub, "eqns"):
          names |= _primitive_names(sub)
  return names


def test_remat_is_kept_and_changes_no_statistics():
  batch = make_batch()
  shapes = jax.eval_shape(_RematMLP(False).init, jax.random.PRNGKey(0), batch["x"])["params"]
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(
      lambda s: jnp.asarray(rng.standard_normal(s.shape) / math.sqrt(s.shape[0]), s.dtype), shapes)
  remat_names = {"checkpoint", "remat", "remat2"}
  assert _primitive_names(jax.make_jaxpr(_remat_loss(True))(params, batch).jaxpr) & remat_names
  closed = jax.make_jaxpr(jkfac.value_and_grad(_remat_loss(True)))(params, batch)
  assert _primitive_names(closed.jaxpr) & remat_names

  @functools.partial(jit, static_argnums=2)
  def run(params, batch, remat):
    loss_fn = _remat_loss(remat)
    tx = jkfac.precondition(loss_fn, batch, damping=1e-2)
    loss, grads, curvature = jkfac.value_and_grad(loss_fn)(params, batch)
    updates, state = tx.update(grads, tx.init(params), params, batch=batch, curvature=curvature)
    return loss, grads, updates, state.statistics

  with_remat, without = run(params, batch, True), run(params, batch, False)
  assert set(with_remat[3]) == {"hidden", "out"}
  _asserts.assert_trees_close(with_remat, without, rtol=1e-5, atol=1e-7)


# --- 8. schedules ------------------------------------------------------------------------------


def _run(tx, update, steps=3, params=None):
  """`[(updates, state)]` of `steps` updates at fixed parameters, batch k at step k."""
  params, outputs = params or mlp_params(), []
  state = init(tx, params)
  for k in range(steps):
    _, state, updates = train_step(update, params, state, make_batch(k), apply=False)
    outputs.append((updates, state))
  return outputs


def test_constant_ema_schedule_equals_the_constant():
  constant = _run(*cached("precondition", invert_every=1))  # cov_ema_decay=0.95
  tx = precondition(invert_every=1, cov_ema_decay=lambda count: jnp.full((), 0.95))
  _asserts.assert_trees_close(_run(tx, jit_update(tx)), constant, rtol=1e-6)


def test_python_float_ema_schedule_equals_the_constant():
  constant = _run(*cached("precondition", invert_every=1))
  tx = precondition(invert_every=1, cov_ema_decay=optax.constant_schedule(0.95))
  _asserts.assert_trees_close(_run(tx, jit_update(tx)), constant, rtol=1e-6)


def test_varying_ema_schedule_matches_a_hand_ema():
  decays = (0.3, 0.6, 0.9)
  schedule = lambda count: jnp.asarray(decays)[jnp.minimum(count, 2)]
  tx = precondition(invert_every=1, estimation="empirical", cov_ema_decay=schedule)
  params, update = mlp_params(), jit_update(tx)
  ema = weight = 0.0
  for k, (_, state) in enumerate(_run(tx, update, params=params)):
    # Batch k's statistics alone: one step from a fresh state, `(1 - d_0) x_k`, over its weight.
    _, fresh, _ = train_step(update, params, init(tx, params), make_batch(k), apply=False)
    x = jax.tree_util.tree_map(lambda s: np.asarray(s, np.float64) / (1 - decays[0]),
                               fresh.statistics)
    np.testing.assert_allclose(float(fresh.ema_weight), 1 - decays[0], rtol=1e-6)
    ema = jax.tree_util.tree_map(lambda s, x: decays[k] * s + (1 - decays[k]) * x, ema, x) \
        if k else jax.tree_util.tree_map(lambda x: (1 - decays[0]) * x, x)
    weight = decays[k] * weight + (1 - decays[k])
    np.testing.assert_allclose(float(state.ema_weight), weight, rtol=1e-6)
    _asserts.assert_trees_close(state.statistics, ema, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,build", [
    ("cov_ema_decay", lambda: precondition(cov_ema_decay="0.9")),
    ("momentum", lambda: kfac(momentum="0.9")),
    ("damping", lambda: precondition(damping="0.01")),
])
def test_non_number_non_schedule_hyperparameter_raises_at_construction(name, build):
  with pytest.raises(ValueError, match=name):
    build()


# --- 9. dtypes -----------------------------------------------------------------------------


@pytest.mark.parametrize("param_dtype,x64,state_dtype", [
    (jnp.bfloat16, False, jnp.float32),
    (jnp.float16, False, jnp.float32),
    (jnp.float32, False, jnp.float32),
    (jnp.float64, True, jnp.float64),
    (jnp.float32, True, jnp.float32),
], ids=["bfloat16", "float16", "float32", "float64-x64", "float32-x64"])
def test_state_dtype_follows_params(param_dtype, x64, state_dtype):
  with jax.enable_x64(x64):
    params = mlp_params(dtype=param_dtype)
    tx, update = cached("kfac", momentum=0.9, invert_every=1)
    state = init(tx, params)
    for k in range(3):  # training steps
      kstate = precondition_state(state)
      _asserts.assert_dtypes((kstate.statistics, kstate.inverses, kstate.ema_weight,
                              kstate.damping), state_dtype)
      params, state, updates = train_step(update, params, state, make_batch(k, dtype=param_dtype))
      _asserts.assert_dtypes((updates, params), param_dtype)
      _asserts.assert_all_finite((updates, params, state))
    assert int(precondition_state(state).skipped_steps) == 0
    assert not np.allclose(np.asarray(updates["dense0"]["kernel"], np.float32), 0.0)


# --- 10. momentum --------------------------------------------------------------------------


def _momentum_schedule(count):
  return 0.5 + 0.1 * count


@pytest.mark.parametrize("momentum_type,momentum", [
    ("regular", 0.9), ("adam", 0.9), ("regular", _momentum_schedule)],
    ids=["regular", "adam", "regular-schedule"])
def test_momentum_matches_the_hand_recurrence(momentum_type, momentum):
  """regular: v <- mu v + F^-1 g, step -lr v; adam: v <- mu v + g, step -lr F^-1 v; F^-1 from
  a `precondition` with the same settings run alongside."""
  lr = 0.1  # kfac()'s default here
  ktx, kupdate = cached("kfac", invert_every=1, momentum=momentum, warm_start=False,
                        **({"momentum_type": "adam"} if momentum_type == "adam" else {}))
  ptx, pupdate = cached("precondition", invert_every=1)
  params = mlp_params()
  kstate, pstate = init(ktx, params), init(ptx, params)
  velocity = jax.tree_util.tree_map(lambda p: np.zeros(p.shape), params)
  for k in range(3):
    mu = momentum(k) if callable(momentum) else momentum
    batch = make_batch(k)
    grads = grad_fn()(params, batch)
    updates, kstate = kupdate(grads, kstate, params, batch)
    if momentum_type == "regular":
      preconditioned, pstate = pupdate(grads, pstate, params, batch)
      velocity = jax.tree_util.tree_map(lambda v, u: mu * v + np.asarray(u), velocity,
                                        preconditioned)
      expected = jax.tree_util.tree_map(lambda v: -lr * v, velocity)
    else:
      velocity = jax.tree_util.tree_map(lambda v, g: mu * v + np.asarray(g), velocity, grads)
      preconditioned, pstate = pupdate(
          jax.tree_util.tree_map(lambda v: jnp.asarray(v, jnp.float32), velocity),
          pstate, params, batch)
      expected = jax.tree_util.tree_map(lambda u: -lr * np.asarray(u), preconditioned)
    _asserts.assert_trees_close(updates, expected, rtol=2e-5, atol=1e-7)
    params = _apply_updates(params, updates)
  assert not np.allclose(velocity["dense0"]["kernel"], 0.0)


# --- 11. unbiased sampling -------------------------------------------------------------------


NUM_KEYS = 2000


def _assert_unbiased(samples, expected, label):
  """`mean(samples)` equals `expected` within 5 standard errors of the mean, entrywise."""
  samples, expected = np.asarray(samples), np.asarray(expected)
  error = np.std(samples, axis=0, ddof=1) / math.sqrt(len(samples))
  assert error.max() > 0, f"{label}: the samples do not vary"
  deviation = np.abs(samples.mean(axis=0) - expected)
  assert np.all(deviation <= 5 * error + 1e-12 * np.abs(expected).max()), (
      label, deviation.max(), (deviation / np.maximum(error, 1e-300)).max())


def _loss_of_kind(kind):
  def loss_fn(params, batch):
    y, t = mlp_apply(params, batch["x"]), batch["t"]
    if kind == "softmax_cross_entropy":
      y = jkfac.register_softmax_cross_entropy(y, t)
      return optax.softmax_cross_entropy_with_integer_labels(y, t).mean()
    if kind == "sigmoid_cross_entropy":
      y = jkfac.register_sigmoid_cross_entropy(y, t)
      return optax.sigmoid_binary_cross_entropy(y, t).mean()
    y = jkfac.register_squared_error(y, t)
    return 0.5 * jnp.mean(jnp.sum((y - t) ** 2, axis=-1))
  return loss_fn


@pytest.mark.parametrize("kind", ["softmax_cross_entropy", "sigmoid_cross_entropy",
                                  "squared_error"])
def test_sampled_fisher_is_unbiased(kind):
  with jax.enable_x64(True):
    rng = np.random.default_rng(5)
    params = mlp_params(dtype=jnp.float64, bias=0.5)
    x = jnp.asarray(rng.standard_normal((4, SIZES[0])))
    t = {"softmax_cross_entropy": jnp.asarray(rng.integers(0, SIZES[-1], 4)),
         "sigmoid_cross_entropy": jnp.asarray(rng.integers(0, 2, (4, SIZES[-1])), jnp.float64),
         "squared_error": jnp.asarray(rng.standard_normal((4, SIZES[-1])))}[kind]
    batch, loss_fn = {"x": x, "t": t}, _loss_of_kind(kind)
    trace = layer_table.trace_with_approximations(loss_fn, params, batch)

    def output_factors(key, estimation):
      found = _nets.collect_statistics(loss_fn, trace, params, batch, key, estimation)
      return {layer.name: statistics.block_statistics(layer, found[layer.name])["G"]
              for layer in trace.layers}

    @jit
    def sampled_and_exact(keys):
      return jax.vmap(lambda key: output_factors(key, "fisher"))(keys), output_factors(keys[0],
                                                                                       "exact")

    sampled, exact = sampled_and_exact(jax.random.split(jax.random.PRNGKey(0), NUM_KEYS))
    assert set(exact) == {"dense0", "dense1"}
    for name in exact:
      _assert_unbiased(sampled[name], exact[name], f"{kind} {name} G")


def _conv_loss(params, batch):
  p, q = params["conv"], params["dense0"]
  x = batch["x"]
  y = jax.lax.conv_general_dilated(x, p["kernel"], (1, 1), "VALID",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC")) + p["bias"]
  y = jkfac.register_conv2d(y, x, p["kernel"], p["bias"], padding="VALID")
  h = jnp.tanh(y).reshape(x.shape[0], -1)
  logits = jkfac.register_dense(h @ q["kernel"] + q["bias"], h, q["kernel"], q["bias"])
  logits = jkfac.register_softmax_cross_entropy(logits, batch["y"])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


def test_sub_sampled_patches_give_an_unbiased_input_factor():
  with jax.enable_x64(True):
    rng = np.random.default_rng(6)
    # 2 examples x 3 x 3 output positions = 18 patch rows of 2 * 2 * 2 = 8 features.
    params = {"conv": {"kernel": jnp.asarray(rng.standard_normal((2, 2, 2, 3)) / 3),
                       "bias": jnp.asarray(0.3 * rng.standard_normal(3))},
              "dense0": {"kernel": jnp.asarray(rng.standard_normal((27, 3)) / 5),
                         "bias": jnp.zeros(3)}}
    batch = {"x": jnp.asarray(rng.standard_normal((2, 4, 4, 2))),
             "y": jnp.asarray(rng.integers(0, 3, 2))}
    trace = layer_table.trace_with_approximations(_conv_loss, params, batch)
    [conv] = [layer for layer in trace.layers if layer.name == "conv"]

    @jit
    def full_and_sampled(keys):
      found = _nets.collect_statistics(_conv_loss, trace, params, batch, keys[0],
                                            "exact")["conv"]
      full = statistics.block_statistics(conv, found)["A"]
      # 8 of the 18 patch rows for each key
      sampled = jax.vmap(lambda key: statistics.block_statistics(conv, found, 1.0, key)["A"])
      return full, sampled(keys)

    full, sampled = full_and_sampled(jax.random.split(jax.random.PRNGKey(1), NUM_KEYS))
    assert full.shape == sampled.shape[1:] == (9, 9)
    _assert_unbiased(sampled, full, "conv A")


# --- 12. stress rows -----------------------------------------------------------------------


def relu_loss(params, batch):
  return classifier_loss(params, batch, activation=jax.nn.relu)


def test_stress_dead_relu_layer():
  params = mlp_params()
  params["dense0"]["bias"] = jnp.full_like(params["dense0"]["bias"], -100.0)  # all ReLUs off
  tx = jkfac.kfac(relu_loss, make_batch(), learning_rate=0.1, damping=1e-2, invert_every=1)
  update, state = jit_update(tx), init(tx, params)
  for k in range(2):
    params, state, updates = train_step(update, params, state, make_batch(k), loss_fn=relu_loss)
    _asserts.assert_all_finite((updates, params, state))
  kstate = precondition_state(state)
  assert np.all(np.asarray(kstate.statistics["dense0"]["G"]) == 0)
  assert all(np.all(np.asarray(u) == 0) for u in jax.tree_util.tree_leaves(updates["dense0"]))
  assert not np.allclose(updates["dense1"]["bias"], 0.0)
  assert int(kstate.skipped_steps) == 0 and int(kstate.inverse_fallbacks) == 0


def test_stress_batch_smaller_than_the_input_factor():
  tx = jkfac.kfac(classifier_loss, make_batch(n=2), learning_rate=0.1, damping=1e-4,
                  invert_every=1)
  params = mlp_params()
  update, state = jit_update(tx), init(tx, params)
  for k in range(3):
    params, state, updates = train_step(update, params, state, make_batch(k, n=2))
    _asserts.assert_all_finite((updates, params, state))
    if k == 0:  # the first batch's input factor: 2 rows for a 6 x 6 matrix
      kstate = precondition_state(state)
      a = np.asarray(kstate.statistics["dense0"]["A"]) / float(kstate.ema_weight)
      assert np.linalg.matrix_rank(a, tol=1e-5) == 2
  assert int(precondition_state(state).skipped_steps) == 0
  assert int(precondition_state(state).inverse_fallbacks) == 0


def _linear_regression():
  """One dense layer, squared error, centred inputs: K-FAC with "exact" estimation is the
  Gauss-Newton (here Newton) matrix itself, so the undamped update is the Newton step."""
  rng = np.random.default_rng(3)
  x = rng.standard_normal((16, 3))
  x -= x.mean(axis=0)
  t, w, b = rng.standard_normal((16, 2)), rng.standard_normal((3, 2)), rng.standard_normal(2)

  def loss_fn(params, batch):
    x, t = batch
    p = params["dense0"]
    y = jkfac.register_dense(x @ p["kernel"] + p["bias"], x, p["kernel"], p["bias"])
    y = jkfac.register_squared_error(y, t)
    return 0.5 * jnp.mean(jnp.sum((y - t) ** 2, axis=-1))

  rows = np.concatenate([x, np.ones((16, 1))], axis=1)
  newton = np.concatenate([w, b[None]]) - np.linalg.lstsq(rows, t, rcond=None)[0]  # F^-1 g
  return x, t, w, b, loss_fn, newton


def test_stress_input_scale():
  x, t, w, b, loss_fn, newton = _linear_regression()
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  tx = jkfac.precondition(loss_fn, (f32(x), f32(t)), damping=1e-6, estimation="exact")

  @jit
  def preconditioned(params, batch):
    return tx.update(jax.grad(loss_fn)(params, batch), tx.init(params), params, batch=batch)[0]

  # Scale the inputs by s and the weights by 1/s: the same function, the same residuals.
  steps = {s: preconditioned({"dense0": {"kernel": f32(w / s), "bias": f32(b)}},
                             (f32(s * x), f32(t)))["dense0"] for s in (1.0, 1e-6, 1e6)}
  _asserts.assert_all_finite(steps)
  _asserts.assert_trees_close(steps[1.0], {"bias": newton[-1], "kernel": newton[:-1]}, rtol=1e-2)
  # Large inputs: the curvature dominates the damping, the weight step scales as 1/s.
  np.testing.assert_allclose(1e6 * np.asarray(steps[1e6]["kernel"]), newton[:-1], rtol=1e-2)
  # Tiny inputs: the bias step is unchanged, and damping caps the weight step.
  np.testing.assert_allclose(steps[1e-6]["bias"], newton[-1], rtol=1e-2)
  assert np.abs(steps[1e-6]["kernel"]).max() <= np.abs(steps[1.0]["kernel"]).max()


def test_stress_tiny_damping_warns_and_stays_finite():
  with pytest.warns(UserWarning, match="MIN_DAMPING"):
    tx = kfac(damping=1e-12, invert_every=1)
  params = mlp_params()
  update, state = jit_update(tx), init(tx, params)
  for k in range(3):
    params, state, updates = train_step(update, params, state, make_batch(k))
    _asserts.assert_all_finite((updates, params, state))
  kstate = precondition_state(state)
  assert float(kstate.damping) == np.float32(jkfac.MIN_DAMPING)
  assert int(kstate.skipped_steps) == 0
