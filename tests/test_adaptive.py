"""Adaptive K-FAC (`jkfac.adaptive`): quadratic model, LM damping, norm constraint, l2.

Oracles: on a linear model with squared error the loss is exactly quadratic and the GGN
is its Hessian, so (α, μ) must solve the 2×2 system built by hand from the dense GGN
(`jax.jacfwd`) and ρ must be 1; `jkfac.precondition` alone gives the preconditioned
gradient Δ. The multi-device check runs this file in a subprocess with 2 host devices
(`python tests/test_adaptive.py pmap`), as the XLA flag must be set before JAX starts.
"""

import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jkfac
from jkfac import adaptive
from jkfac.adaptive import config as adaptive_config
from tests import _nets

D_IN, D_OUT, N = 4, 2, 16


# --- a linear model with squared error: an exactly quadratic loss ------------------------


def linear_params(seed=0):
  kw, kb = jax.random.split(jax.random.PRNGKey(seed))
  return {"w": jax.random.normal(kw, (D_IN, D_OUT)), "b": 0.1 * jax.random.normal(kb, (D_OUT,))}


def linear_predictions(params, x):
  y = x @ params["w"] + params["b"]
  return jkfac.register_dense(y, x, params["w"], params["b"])


def linear_loss(params, batch):
  y = jkfac.register_squared_error(linear_predictions(params, batch["x"]), batch["t"])
  return 0.5 * jnp.sum((y - batch["t"]) ** 2) / y.shape[0]


def linear_batch(step=0):
  kx, kt = jax.random.split(jax.random.PRNGKey(10 + step))
  return {"x": jax.random.normal(kx, (N, D_IN)), "t": jax.random.normal(kt, (N, D_OUT))}


def flat(tree):
  return np.concatenate([np.ravel(np.asarray(x, np.float64))
                         for x in jax.tree_util.tree_leaves(tree)])


def dense_ggn(params, batch):
  """`JᵀJ / N`, the GGN (= Hessian) of `linear_loss`, over the flattened leaves."""
  leaves, treedef = jax.tree_util.tree_flatten(params)
  sizes = [x.size for x in leaves]

  def predictions(vector):
    parts = np.split(np.arange(sum(sizes)), np.cumsum(sizes)[:-1])
    tree = jax.tree_util.tree_unflatten(
        treedef, [vector[p].reshape(x.shape) for p, x in zip(parts, leaves)])
    return linear_predictions(tree, batch["x"]).ravel()

  jac = np.asarray(jax.jacfwd(predictions)(jnp.asarray(flat(params), jnp.float32)), np.float64)
  return jac.T @ jac / N


# --- a small classifier that can learn (teacher labels) -----------------------------------


SIZES = (5, 8, 3)


def mlp_params(seed=0, dtype=jnp.float32):
  return _nets.mlp_params(SIZES, seed, dtype, bias=0.0)


def mlp_loss(params, batch):
  logits = jkfac.register_softmax_cross_entropy(_nets.mlp_apply(params, batch["x"]), batch["y"])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


def mlp_batch(step=0, size=32):
  x = jax.random.normal(jax.random.PRNGKey(200 + step), (size, SIZES[0]))
  teacher = jax.random.normal(jax.random.PRNGKey(7), (SIZES[0], SIZES[-1]))
  return {"x": x, "y": jnp.argmax(x @ teacher, axis=-1)}


def jitted_update(tx, grads, params, batch):
  """`tx.update` of a fresh state, jitted (eager steps dispatch op by op: slow)."""
  return jax.jit(lambda: tx.update(grads, tx.init(params), params, batch=batch))()


def jitted_step(tx, loss_fn):
  @jax.jit
  def step(params, state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, state = tx.update(grads, state, params, batch=batch)
    return optax.apply_updates(params, updates), state, updates, loss
  return step


# --- the quadratic model and ρ on an exact quadratic -------------------------------------


def fused_update(tx, loss_fn):
  """`tx.update` with the curvature of `jkfac.value_and_grad`'s pass, jitted."""
  def update(params, state, batch, grads):
    _, _, curvature = jkfac.value_and_grad(loss_fn)(params, batch)
    return tx.update(grads, state, params, batch=batch, curvature=curvature)
  return jax.jit(update)


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
@pytest.mark.parametrize("l2_reg", [None, 0.3], ids=["no_l2", "l2_except_bias"])
def test_qmodel_solves_the_2x2_system_and_rho_is_one(l2_reg, fused):
  """Fused: the step gets `jkfac.value_and_grad`'s pass as `curvature=`."""
  extra = {} if l2_reg is None else dict(l2_reg=l2_reg, l2_reg_exclude=("b",))
  settings = dict(estimation="exact", cov_update_every=1, invert_every=1)
  tx = jkfac.kfac(linear_loss, linear_batch(), momentum_type="qmodel", damping=0.05,
                  adapt_damping=True, reject_steps=False, damping_adaptation_interval=1,
                  warm_start=False, **settings, **extra)
  pre = jkfac.precondition(linear_loss, linear_batch(), damping=1.0, **settings)
  params = linear_params()
  state, pre_state = tx.init(params), pre.init(params)
  step = (fused_update(tx, linear_loss) if fused
          else jax.jit(lambda p, s, b, g: tx.update(g, s, p, batch=b)))
  # The leaves are b, then w; l2 leaves out b.
  keep = np.concatenate([np.full(D_OUT, l2_reg is None), np.full(D_IN * D_OUT, True)])
  l2 = 0.0 if l2_reg is None else l2_reg
  previous = np.zeros(D_IN * D_OUT + D_OUT)
  for i in range(3):
    batch = linear_batch(i)
    grads = jax.grad(linear_loss)(params, batch)
    damping = float(state.damping)
    g = flat(grads) + l2 * keep * flat(params)
    grads_l2 = grads if l2_reg is None else jax.tree_util.tree_map(
        lambda x, p, m: x + m * l2 * p, grads, params, {"b": 0.0, "w": 1.0})
    delta, pre_state = pre.update(grads_l2, pre_state, params, batch=batch,
                                  damping=jnp.asarray(damping + l2))
    delta = flat(delta)
    updates, state = step(params, state, batch, grads)
    vectors = np.stack([delta, previous], axis=1)
    curvature = vectors.T @ (dense_ggn(params, batch) + l2 * np.diag(keep)) @ vectors
    system = curvature + damping * vectors.T @ vectors
    b = vectors.T @ g
    if i == 0:
      expected = np.array([-b[0] / system[0, 0], 0.0])
    else:
      expected = np.linalg.solve(system, -b)
    found = jkfac.diagnostics(state)
    np.testing.assert_allclose([found["alpha"], found["mu"]], expected, rtol=2e-3, atol=1e-6)
    np.testing.assert_allclose(flat(updates), vectors @ expected, rtol=2e-3, atol=1e-5)
    quad = expected @ b + 0.5 * expected @ curvature @ expected
    np.testing.assert_allclose(found["quad_change"], quad, rtol=2e-3)
    np.testing.assert_allclose(found["rho"], 1.0, rtol=2e-3)
    assert float(found["damping"]) == pytest.approx(damping)
    assert float(state.damping) < damping  # ρ = 1 > 3/4: the damping falls
    params = optax.apply_updates(params, updates)
    previous = flat(updates)


def test_qmodel_fixedmu_solves_for_alpha_with_the_given_momentum():
  """With μ fixed, α minimises the model along Δ given μ v: checked against the closed
  form from the same Δ (the update minus μ v)."""
  tx = jkfac.kfac(linear_loss, linear_batch(), momentum_type="qmodel_fixedmu", momentum=0.5,
                  damping=0.05, estimation="exact", invert_every=1, warm_start=False)
  params, step = linear_params(), jitted_step(tx, linear_loss)
  state = tx.init(params)
  params, state, previous, _ = step(params, state, linear_batch(0))
  batch = linear_batch(1)
  grads = flat(jax.grad(linear_loss)(params, batch))
  new_params, state, updates, _ = step(params, state, batch)
  found = jkfac.diagnostics(state)
  assert float(found["mu"]) == pytest.approx(0.5)
  delta = (flat(updates) - 0.5 * flat(previous)) / float(found["alpha"])
  system = dense_ggn(params, batch) + 0.05 * np.eye(delta.size)
  alpha = -(grads @ delta + 0.5 * delta @ system @ flat(previous)) / (delta @ system @ delta)
  np.testing.assert_allclose(found["alpha"], alpha, rtol=2e-3)


def test_qmodel_trace_steps_along_the_trace_by_the_exact_model():
  """"qmodel_trace": u = F̂⁻¹g + 0.5 u_prev, α minimising the exact model along u.
  Oracles: F̂⁻¹g from `jkfac.precondition` with the same settings on the same steps, α
  from the dense `jax.jacfwd` GGN."""
  settings = dict(damping=0.05, estimation="exact", invert_every=1, cov_update_every=1,
                  warm_start=False)
  tx = jkfac.kfac(linear_loss, linear_batch(), momentum_type="qmodel_trace", **settings)
  pre = jkfac.precondition(linear_loss, linear_batch(), **settings)
  params, step = linear_params(), jitted_step(tx, linear_loss)
  state, pre_state, trace = tx.init(params), pre.init(params), np.zeros(flat(params).size)
  for index in range(3):
    batch = linear_batch(index)
    grads = jax.grad(linear_loss)(params, batch)
    delta, pre_state = jitted_update_with(pre, grads, pre_state, params, batch)
    trace = flat(delta) + adaptive_config.TRACE_DECAY * trace
    g = flat(grads)
    system = dense_ggn(params, batch) + 0.05 * np.eye(g.size)
    alpha = -(g @ trace) / (trace @ system @ trace)
    params, state, updates, _ = step(params, state, batch)
    found = jkfac.diagnostics(state)
    np.testing.assert_allclose(found["alpha"], alpha, rtol=2e-3)
    np.testing.assert_allclose(flat(updates), alpha * trace, rtol=2e-3, atol=1e-7)
    assert float(found["mu"]) == pytest.approx(adaptive_config.TRACE_DECAY)


def jitted_update_with(tx, grads, state, params, batch):
  return jax.jit(lambda: tx.update(grads, state, params, batch=batch))()


# --- Levenberg–Marquardt damping -----------------------------------------------------


def test_adapted_damping_rule():
  rule = lambda damping, rho: float(adaptive.adapted_damping(
      jnp.asarray(damping), jnp.asarray(rho), decay=0.5, interval=2, min_damping=0.1,
      max_damping=3.0))
  assert rule(1.0, 0.9) == pytest.approx(0.25)     # ω = 0.5 ** 2
  assert rule(1.0, 0.1) == pytest.approx(3.0)      # 4, clipped to max_damping
  assert rule(0.5, -2.0) == pytest.approx(2.0)
  assert rule(0.2, 0.8) == pytest.approx(0.1)      # 0.05, clipped to min_damping
  assert rule(1.0, 0.5) == rule(1.0, float("nan")) == 1.0
  assert rule(1.0, -float("inf")) == pytest.approx(3.0)  # a non-finite loss: rises


def test_damping_rises_when_rho_is_small_and_falls_when_it_is_large():
  kw = dict(damping=1e-2, momentum=None, adapt_damping=True, damping_adaptation_interval=1,
            reject_steps=False, warm_start=False)
  # A step far too long for a nonlinear net: the model is a poor fit, ρ is small.
  tx = jkfac.kfac(mlp_loss, mlp_batch(), learning_rate=3.0, **kw)
  _, state, _, _ = jitted_step(tx, mlp_loss)(mlp_params(), tx.init(mlp_params()), mlp_batch())
  assert float(jkfac.diagnostics(state)["rho"]) < 0.25
  np.testing.assert_allclose(state.damping, 1e-2 / 0.95, rtol=1e-5)
  # The exactly quadratic loss: ρ = 1.
  tx = jkfac.kfac(linear_loss, linear_batch(), learning_rate=0.3, **kw)
  _, state, _, _ = jitted_step(tx, linear_loss)(linear_params(), tx.init(linear_params()),
                                                linear_batch())
  np.testing.assert_allclose(jkfac.diagnostics(state)["rho"], 1.0, rtol=1e-3)
  np.testing.assert_allclose(state.damping, 1e-2 * 0.95, rtol=1e-5)


def test_adaptive_step_compiles_once_and_adapts_every_interval():
  tx = jkfac.kfac(mlp_loss, mlp_batch(), momentum_type="qmodel", adapt_damping=True,
                  damping=1e-3, reject_steps=False, damping_adaptation_interval=3,
                  num_burnin_steps=2,
                  l2_reg=1e-4, l2_reg_exclude=("*bias*",), invert_every=2)
  traces = []

  @jax.jit
  def train_step(params, state, batch):
    traces.append(1)  # a Python side effect: runs once per trace
    grads = jax.grad(mlp_loss)(params, batch)
    updates, state = tx.update(grads, state, params, batch=batch)
    return optax.apply_updates(params, updates), state, updates

  params = mlp_params()
  state = tx.init(params)
  dampings = [float(state.damping)]
  for i in range(9):
    params, state, updates = train_step(params, state, mlp_batch(i))
    dampings.append(float(state.damping))
    norm = float(jkfac.diagnostics(state)["update_norm"])
    assert (norm == 0) == (i < 2), (i, norm)  # burn-in: statistics only
  assert len(traces) == 1 and train_step._cache_size() == 1
  changed = [i for i in range(9) if dampings[i + 1] != dampings[i]]
  assert set(changed) <= {2, 5, 8} and changed, dampings  # steps 0, 3, 6 after burn-in
  assert jkfac.diagnostics(state)["skipped_steps"] == 0
  assert all(np.isfinite(flat(params)))


REPO = Path(__file__).resolve().parents[1]


@pytest.mark.multidevice
def test_pmap_on_two_devices_matches_one_device():
  """In a subprocess with 2 host devices: the pmapped adaptive step (qmodel, LM damping,
  l2) on a split batch, and the jitted one on a batch sharded over a mesh, equal the
  jitted step on the whole batch, each traced once."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([str(REPO)] + [p for p in [os.environ.get(
                 "PYTHONPATH")] if p]))
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags + ["--xla_force_host_platform_device_count=2"])
  result = subprocess.run([sys.executable, __file__, "pmap"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stdout + result.stderr[-8000:]
  assert "ok pmap" in result.stdout and "ok sharded jit" in result.stdout


def _counted_step(tx, traces: list):
  """A train step of `tx` on the MLP that appends to `traces` each time it is traced."""
  def step(params, state, batch):
    traces.append(1)
    grads = jax.grad(mlp_loss)(params, batch)
    updates, state = tx.update(grads, state, params, batch=batch)
    return optax.apply_updates(params, updates), state
  return step


def _pmap_check() -> None:
  import flax.jax_utils

  assert jax.device_count() == 2, jax.devices()
  kw = dict(momentum_type="qmodel", adapt_damping=True, damping_adaptation_interval=2,
            estimation="empirical", invert_every=2, l2_reg=1e-3)
  batches = [mlp_batch(i) for i in range(4)]
  split = lambda batch: jax.tree_util.tree_map(lambda x: x.reshape(2, -1, *x.shape[1:]), batch)
  single = jkfac.kfac(mlp_loss, batches[0], **kw)
  multi = jkfac.kfac(mlp_loss, jax.tree_util.tree_map(lambda x: x[0], split(batches[0])),
                     axis_name="data", **kw)
  traces = []
  multi_step = jax.pmap(_counted_step(multi, traces), axis_name="data")
  single_step = jitted_step(single, mlp_loss)
  params = mlp_params()
  state = single.init(params)
  # With pmap's axis name, the replicas have the sharding of its outputs (no retrace).
  replicate = lambda tree: flax.jax_utils.replicate(tree, axis_name="data")
  params_m, state_m = replicate(params), replicate(multi.init(params))
  for batch in batches:
    params, state, _, _ = single_step(params, state, batch)
    params_m, state_m = multi_step(params_m, state_m, split(batch))
  for got in (jax.tree_util.tree_map(lambda x: x[0], (params_m, state_m)),
              jax.tree_util.tree_map(lambda x: x[1], (params_m, state_m))):
    np.testing.assert_allclose(flat(got[0]), flat(params), rtol=1e-4, atol=1e-5)
    for key, value in jkfac.diagnostics(got[1]).items():
      np.testing.assert_allclose(value, jkfac.diagnostics(state)[key], rtol=1e-3, atol=1e-6,
                                 err_msg=key)
  assert len(traces) == 1
  print("ok pmap")
  _sharded_jit_check(kw, batches)


def _sharded_jit_check(kw, batches) -> None:
  """The adaptive step under `jax.jit` on a batch sharded over a 2-device mesh (`mesh=`,
  round-robin inverses) equals the single-device step, traced once."""
  from jax.sharding import NamedSharding, PartitionSpec as P

  mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  single = jkfac.kfac(mlp_loss, batches[0], **kw)
  sharded = jkfac.kfac(mlp_loss, batches[0], mesh=mesh, axis_name="data", **kw)
  traces = []
  sharded_step = jax.jit(_counted_step(sharded, traces))
  single_step = jitted_step(single, mlp_loss)
  params = mlp_params()
  state = single.init(params)
  params_s, state_s = jax.device_put((params, sharded.init(params)), NamedSharding(mesh, P()))
  for batch in batches:
    params, state, _, _ = single_step(params, state, batch)
    params_s, state_s = sharded_step(params_s, state_s,
                                     jax.device_put(batch, NamedSharding(mesh, P("data"))))
  np.testing.assert_allclose(flat(params_s), flat(params), rtol=1e-4, atol=1e-5)
  for key, value in jkfac.diagnostics(state_s).items():
    np.testing.assert_allclose(value, jkfac.diagnostics(state)[key], rtol=1e-3, atol=1e-6,
                               err_msg=key)
  assert len(traces) == 1
  print("ok sharded jit")


# --- norm constraint --------------------------------------------------------------------


def test_norm_constraint_bounds_the_step():
  """`lr² gᵀΔ` of the scaled Δ is C: the scale is `sqrt(C / (lr² gᵀΔ))`, with Δ from
  `jkfac.precondition`; a constraint that does not bind changes nothing."""
  kw = dict(damping=1e-2, momentum=None, estimation="exact", cov_update_every=1,
            invert_every=10, warm_start=False)
  params, batch = mlp_params(), mlp_batch()
  grads = jax.grad(mlp_loss)(params, batch)
  pre = jkfac.precondition(mlp_loss, batch, damping=1e-2, estimation="exact")
  delta, _ = jitted_update(pre, grads, params, batch)
  g_delta = flat(grads) @ flat(delta)
  for constraint in (1e-3, 1e6):
    tx = jkfac.kfac(mlp_loss, batch, learning_rate=2.0, norm_constraint=constraint, **kw)
    updates, state = jitted_update(tx, grads, params, batch)
    scale = min(1.0, math.sqrt(constraint / (4.0 * g_delta)))
    np.testing.assert_allclose(jkfac.diagnostics(state)["norm_scale"], scale, rtol=1e-4)
    np.testing.assert_allclose(flat(updates), -2.0 * scale * flat(delta), rtol=1e-4,
                               atol=1e-7)
    # The step's squared F̂-norm, lr² (sΔ)ᵀ F̂ (sΔ) = lr² s² gᵀΔ, is at most C.
    assert 4.0 * scale ** 2 * g_delta <= constraint * (1 + 1e-4)
  assert scale == 1.0  # the last constraint does not bind: plain K-FAC's step
  plain = jkfac.kfac(mlp_loss, batch, learning_rate=2.0, **kw)
  np.testing.assert_allclose(flat(jitted_update(plain, grads, params, batch)[0]),
                             flat(updates), rtol=1e-5)


def test_norm_constraint_holds_at_every_step_of_a_too_large_learning_rate():
  """lr 3.0 (10x what trains this MLP), momentum μ: at each of 30 steps the scaled
  `sΔ = -(u_k - μ u_{k-1}) / lr` has `lr² s² gᵀΔ` at most C, equal to C where `s < 1`
  (the closed form of `norm_scale`), and the run stays finite; unconstrained, lr 3.0
  gives a step far longer than C allows (s stays well below 1)."""
  constraint, lr = 1e-3, 3.0
  tx = jkfac.kfac(mlp_loss, mlp_batch(), learning_rate=lr, damping=1e-2,
                  norm_constraint=constraint)
  params, step = mlp_params(), jitted_step(tx, mlp_loss)
  grad = jax.jit(jax.grad(mlp_loss))
  state, scales, previous = tx.init(params), [], 0.0
  for i in range(30):
    grads = flat(grad(params, mlp_batch(i)))
    params, state, updates, loss = step(params, state, mlp_batch(i))
    found = jkfac.diagnostics(state)
    scale, mu = float(found["norm_scale"]), float(found["mu"])
    norm = -lr * scale * grads @ (flat(updates) - mu * previous)   # lr² s² gᵀΔ
    previous = flat(updates)
    assert np.isfinite(float(loss)) and 0 < scale <= 1, (i, loss, scale)
    assert norm <= constraint * (1 + 1e-4), (i, norm)
    if scale < 1:
      np.testing.assert_allclose(norm, constraint, rtol=1e-3, err_msg=str(i))
    scales.append(scale)
  assert max(scales) < 0.5, scales   # the constraint binds: lr alone is too large


@pytest.mark.parametrize("momentum_type", ["regular", "adam"])
def test_without_adaptation_the_adaptive_path_is_plain_kfac(momentum_type):
  """`l2_reg=0` and a constraint that never binds take the adaptive path; its steps are
  plain K-FAC's (momentum and a learning-rate schedule included)."""
  kw = dict(learning_rate=optax.linear_schedule(0.5, 0.1, 3), damping=1e-2, momentum=0.8,
            momentum_type=momentum_type, invert_every=2, estimation="empirical")
  plain = jkfac.kfac(mlp_loss, mlp_batch(), **kw)
  wrapped = jkfac.kfac(mlp_loss, mlp_batch(), l2_reg=0.0, norm_constraint=1e9, **kw)
  runs = []
  for tx in (plain, wrapped):
    params, step = mlp_params(), jitted_step(tx, mlp_loss)
    state = tx.init(params)
    for i in range(4):
      params, state, _, _ = step(params, state, mlp_batch(i))
    runs.append(flat(params))
  np.testing.assert_allclose(runs[1], runs[0], rtol=1e-5, atol=1e-6)


def test_qmodel_on_part_of_the_model_under_multi_transform():
  """qmodel K-FAC for dense0 only (sgd for dense1): its curvature products and loss use
  the whole model's parameters (`model_params`), its update only dense0's leaves."""
  params, batch = mlp_params(), mlp_batch()
  labels = {"dense0": "kfac", "dense1": "sgd"}
  kfac = jkfac.kfac(mlp_loss, batch, momentum_type="qmodel", adapt_damping=True,
                    damping_adaptation_interval=1, example_params=params)
  tx = optax.multi_transform({"kfac": kfac, "sgd": optax.sgd(0.1)}, labels)

  @jax.jit
  def step(params, state):
    grads = jax.grad(mlp_loss)(params, batch)
    updates, state = tx.update(grads, state, params, batch=batch, model_params=params)
    return optax.apply_updates(params, updates), state, updates

  state = tx.init(params)
  for _ in range(3):
    new_params, state, updates = step(params, state)
    found = jkfac.diagnostics(state)
    assert float(found["alpha"]) < 0
    np.testing.assert_allclose(flat(updates["dense1"]),
                               -0.1 * flat(jax.grad(mlp_loss)(params, batch)["dense1"]),
                               rtol=1e-5, atol=1e-7)
    # ρ is the loss change of K-FAC's own step (dense0 only, at the whole model's
    # parameters) over the model's predicted change.
    own = {**params, "dense0": new_params["dense0"]}
    change = float(mlp_loss(own, batch)) - float(mlp_loss(params, batch))
    np.testing.assert_allclose(found["rho"], change / float(found["quad_change"]), rtol=2e-3)
    params = new_params


# --- l2, burn-in, skipped batches ------------------------------------------------------------


def test_l2_reg_adds_weight_decay_except_excluded_paths():
  """In float64: in float32, rounding (about 1e-7 of the largest entry) exceeds atol on
  the smallest entries of these weights."""
  params, batch = mlp_params(), mlp_batch()
  assert adaptive.l2_mask(params, ("*bias*",)) == (False, True, False, True)
  assert adaptive.l2_mask(params, lambda path: path.startswith("dense1")) == (
      True, True, False, False)
  with jax.enable_x64(True):
    params, batch = mlp_params(dtype=jnp.float64), mlp_batch()
    grads = jax.grad(mlp_loss)(params, batch)
    tx = jkfac.kfac(mlp_loss, batch, learning_rate=0.5, damping=1e-2, l2_reg=0.1,
                    l2_reg_exclude="*bias*", momentum=None, estimation="exact",
                    warm_start=False)
    updates, _ = jitted_update(tx, grads, params, batch)
    decayed = jax.tree_util.tree_map_with_path(
        lambda path, g, p: g if "bias" in jax.tree_util.keystr(path) else g + 0.1 * p,
        grads, params)
    pre = jkfac.precondition(mlp_loss, batch, damping=1e-2 + 0.1, estimation="exact")
    expected, _ = jitted_update(pre, decayed, params, batch)
    assert {u.dtype for u in jax.tree_util.tree_leaves(updates)} == {jnp.dtype("float64")}
    np.testing.assert_allclose(flat(updates), -0.5 * flat(expected), rtol=1e-5, atol=1e-12)


def test_skipped_batch_changes_nothing_but_the_counter():
  tx = jkfac.kfac(mlp_loss, mlp_batch(), momentum_type="qmodel", adapt_damping=True,
                  damping_adaptation_interval=1)
  params, step = mlp_params(), jitted_step(tx, mlp_loss)
  params, state, _, _ = step(params, tx.init(params), mlp_batch(0))
  bad = dict(mlp_batch(1), x=mlp_batch(1)["x"].at[0, 0].set(jnp.nan))
  new_params, new_state, updates, _ = step(params, state, bad)
  assert not np.any(flat(updates)) and np.all(flat(new_params) == flat(params))
  assert int(jkfac.diagnostics(new_state)["skipped_steps"]) == 1
  for field in ("count", "damping", "velocity", "diagnostics"):
    np.testing.assert_array_equal(flat(getattr(new_state, field)), flat(getattr(state, field)))


# --- diagnostics and settings -----------------------------------------------------------


def test_diagnostics_keys_in_nested_optax_states():
  params, batch = mlp_params(), mlp_batch()
  grads = jax.grad(mlp_loss)(params, batch)
  inject = optax.inject_hyperparams(jkfac.kfac, static_args=("loss_fn", "example_batch"))
  tx = optax.chain(
      optax.clip_by_global_norm(10.0),
      optax.masked(inject(loss_fn=mlp_loss, example_batch=batch, momentum_type="qmodel",
                          adapt_damping=True, damping_adaptation_interval=1),
                   jax.tree_util.tree_map(lambda _: True, params)))
  updates, state = jax.jit(lambda s: tx.update(grads, s, params, batch=batch))(tx.init(params))
  found = jkfac.diagnostics(state)
  assert set(found) == set(adaptive.DIAGNOSTICS)
  assert all(np.isfinite(float(v)) for v in found.values())
  assert float(found["update_norm"]) > 0 and float(found["alpha"]) < 0
  plain = jkfac.precondition(mlp_loss, batch, damping=1e-2)
  assert set(jkfac.diagnostics(plain.init(params))) == {
      "damping", "skipped_steps", "inverse_fallbacks"}
  with pytest.raises(ValueError, match="exactly one"):
    jkfac.diagnostics(optax.sgd(0.1).init(params))


def test_untuned_qmodel_steps_follow_the_measured_reduction_ratio():
  """The defaults (qmodel, LM damping, rejection) on 20 batches: each step's ρ is the
  batch loss change of its update over `quad_change`, by hand; a step is taken iff the
  loss does not rise, and the damping moves as the LM rule says (up on a rejection; step 0
  sets it from the curvature)."""
  tx = jkfac.kfac(mlp_loss, mlp_batch(), momentum_type="qmodel", adapt_damping=True)
  params, step = mlp_params(), jitted_step(tx, mlp_loss)
  loss_at = jax.jit(mlp_loss)
  state, taken = tx.init(params), 0
  for i in range(20):
    batch, damping = mlp_batch(i), float(state.damping)
    new_params, state, updates, loss = step(params, state, batch)
    found = jkfac.diagnostics(state)
    if not np.any(flat(updates)):   # rejected: the damping rises
      assert float(state.damping) > damping, (i, damping, float(state.damping))
    else:
      taken += 1
      change = float(loss_at(new_params, batch)) - float(loss)
      assert change <= 1e-6, (i, change)
      np.testing.assert_allclose(found["rho"], change / float(found["quad_change"]),
                                 rtol=5e-3, atol=1e-4, err_msg=str(i))
      rho, new = float(found["rho"]), float(state.damping)
      if i > 0:   # step 0 sets the damping from the curvature's scale
        expected = (new < damping) if rho > 0.75 else (new > damping) if rho < 0.25 else (
            new == pytest.approx(damping))
        assert expected, (i, rho, damping, new)
    assert np.isfinite(float(loss)) and np.all(np.isfinite(flat(new_params)))
    params = new_params
  assert taken >= 15, taken


@pytest.mark.parametrize("kwargs,name", [
    (dict(norm_constraint=-1.0), "norm_constraint"),
    (dict(norm_constraint=0.0), "norm_constraint"),
    (dict(momentum_type="qmodel", norm_constraint=1.0), "norm_constraint"),
    (dict(adapt_damping=True, damping_adaptation_interval=0), "damping_adaptation_interval"),
    (dict(adapt_damping=True, damping_adaptation_interval=2.5), "damping_adaptation_interval"),
    (dict(adapt_damping=True, damping_adaptation_decay=1.0), "damping_adaptation_decay"),
    (dict(adapt_damping=True, min_damping=1.0, max_damping=0.1), "min_damping"),
    (dict(adapt_damping=True, min_damping=0.0), "min_damping"),
    (dict(adapt_damping=True, damping=10.0, max_damping=1.0), "damping"),
    (dict(adapt_damping=True, damping=lambda count: 1e-2), "schedule"),
    (dict(adapt_damping=True, damping=None, max_damping=0.0), "max_damping"),
    (dict(damping=math.inf), "finite"),
    (dict(l2_reg=-1.0), "l2_reg"),
    (dict(l2_reg_exclude=("*bias*",)), "l2_reg_exclude"),
    (dict(num_burnin_steps=-1), "num_burnin_steps"),
    (dict(momentum_type="qmodel_fixedmu", momentum=None), "momentum"),
    (dict(momentum_type="sgd"), "momentum_type"),
    (dict(learning_rate=None, momentum_type="regular"), "learning_rate"),
    (dict(damping=None, adapt_damping=False), "damping"),
    (dict(graft="sgd"), "graft"),
    (dict(learning_rate=None, graft="adam"), "graft"),
    (dict(reject_steps=True), "reject_steps"),
    (dict(max_factor_dim=0), "max_factor_dim"),
], ids=lambda v: (("schedule" if "<function" in repr(v) else repr(v))
                  if isinstance(v, dict) else None))
def test_bad_settings_raise(kwargs, name):
  kwargs = dict(dict(learning_rate=0.1, damping=1e-2), **kwargs)
  with pytest.raises(ValueError, match=name):
    jkfac.kfac(mlp_loss, mlp_batch(), **kwargs)


def test_qmodel_without_a_registered_loss_raises_at_init():
  def unregistered(params, batch):
    h = batch["x"] @ params["dense0"]["kernel"]
    return jnp.mean(h ** 2)

  for kwargs in (dict(momentum_type="qmodel", damping=1e-2),
                 dict(learning_rate=0.1, adapt_damping=True)):
    tx = jkfac.kfac(unregistered, mlp_batch(), **kwargs)
    with pytest.raises(ValueError, match="no loss is registered"):
      tx.init(mlp_params())


if __name__ == "__main__":
  if sys.argv[1:] == ["pmap"]:
    _pmap_check()
