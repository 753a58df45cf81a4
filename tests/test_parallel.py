"""`jkfac.parallel` and data-parallel K-FAC: pmap, jit with a sharded batch, round robin.

The `multidevice` tests run `tests/_multidevice.py` in a subprocess with 8 host
devices (the XLA flag must be set before JAX starts); its checks are assertions, so
a non-zero exit fails the test and shows the subprocess output. The others run here.
"""

import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jkfac
from jkfac.parallel import assign_round_robin, split_batch

REPO = Path(__file__).resolve().parents[1]
HELPER = Path(__file__).resolve().parent / "_multidevice.py"


# --- multi-device, in a subprocess ---------------------------------------------------------


def run_multidevice(*groups: str) -> str:
  env = dict(os.environ)
  # tests/conftest.py's fast compilation is kept: both sides of each comparison use it.
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags + ["--xla_force_host_platform_device_count=8"])
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
  result = subprocess.run([sys.executable, str(HELPER), *groups], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=900)
  output = f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr[-20000:]}"
  assert result.returncode == 0, f"{HELPER.name} {' '.join(groups)} failed:\n{output}"
  return result.stdout


@pytest.mark.multidevice
def test_pmap_matches_single_device_and_inverts_each_factor_once():
  """pmap on 8 (and 3) devices, round robin and replicated, against one jitted device.

  Over 5 steps with inverses every 2, on a conv (kron) + dense kron / diagonal / full
  net with empirical statistics: parameters, covariances and inverses equal the
  single-device step on the whole batch; every device holds the same state bit for
  bit; each factor's inverse ran on exactly the device `assign_round_robin` chose
  (on all devices with "replicated"), recorded by a callback; the step was traced
  once; state goes through `flax.jax_utils.replicate`/`unreplicate`. With "fisher"
  the devices sample different targets but still end with identical state.
  """
  out = run_multidevice("pmap")
  for name in ("pmap-8-round_robin-empirical", "pmap-8-replicated-empirical",
               "pmap-3-default-empirical", "pmap-8-round_robin-fisher"):
    assert f"ok {name}" in out, out


@pytest.mark.multidevice
def test_jit_with_sharded_batch_matches_single_device():
  """jit on a batch sharded over an 8-device mesh equals the single-device step.

  Without an axis (XLA partitions alone), and with `mesh=`/`axis_name=` in both
  placements; with round robin each inverse runs on its one owner inside shard_map.
  Statistics from part of the sharded batch (`max_statistics_examples`) read the rows
  that one device reads. A mesh with Explicit axes (`jax.make_mesh`'s default) gives
  the same steps, without and with `mesh=`, and compiles to a program with as many
  instructions of each opcode as with Auto axes (a check that tells round robin from
  replicated inverses apart).
  """
  out = run_multidevice("mesh")
  for name in ("jit-sharded-batch", "jit-mesh-round_robin", "jit-mesh-replicated",
               "jit-mesh-statistics-examples", "jit-explicit-sharded-batch",
               "jit-explicit-mesh-round_robin"):
    assert f"ok {name}" in out, out


@pytest.mark.multidevice
def test_pmap_with_scanned_layers_matches_single_device():
  """A grouped conv, a recurrence (multi-use weights) and `nn.scan`-stacked layers under
  pmap with round robin: stacked factors are inverted as one task, and 3 steps equal one
  device's."""
  out = run_multidevice("scan")
  assert "ok pmap-scanned-layers" in out, out


@pytest.mark.multidevice
def test_eigen_adam_under_pmap_matches_single_device():
  """`jkfac.eigen_adam` with `axis_name` on 8 devices: the same parameters and statistics
  as one device on the whole batch, over 5 steps with new bases every 2."""
  out = run_multidevice("eigen_adam")
  assert "ok pmap-eigen-adam" in out, out


# --- assign_round_robin ----------------------------------------------------------------------


def _loads(costs, owners, num_devices):
  loads = [0.0] * num_devices
  for cost, owner in zip(costs, owners):
    loads[owner] += cost
  return loads


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("num_devices", [1, 2, 3, 8])
def test_round_robin_assigns_every_task_once_and_balances(seed, num_devices):
  rng = np.random.default_rng(seed)
  costs = [float(c) for c in rng.integers(1, 40, size=rng.integers(1, 20)) ** 3]
  owners = assign_round_robin(costs, num_devices)
  assert len(owners) == len(costs)                      # one owner per task
  assert all(0 <= o < num_devices and isinstance(o, int) for o in owners)
  loads = _loads(costs, owners, num_devices)
  assert sum(loads) == pytest.approx(sum(costs))        # every task counted exactly once
  # Greedy largest-first: the most loaded device exceeds the least loaded by at
  # most one task, so it is within one task of the average.
  assert max(loads) - min(loads) <= max(costs)
  assert max(loads) <= sum(costs) / num_devices + max(costs)
  if len(costs) >= num_devices:
    assert min(loads) > 0                               # no device idles


def test_round_robin_is_deterministic():
  costs = [27.0, 6859.0, 21952.0, 125.0, 24.0, 3375.0]
  first = assign_round_robin(costs, 4)
  assert all(assign_round_robin(list(costs), 4) == first for _ in range(5))
  assert assign_round_robin(tuple(costs), 4) == first
  assert isinstance(first, tuple)


def test_round_robin_spreads_the_largest_tasks():
  costs = [1.0, 1000.0, 2.0, 999.0, 3.0, 998.0, 997.0]
  owners = assign_round_robin(costs, 4)
  largest = sorted(range(len(costs)), key=lambda t: -costs[t])[:4]
  assert len({owners[t] for t in largest}) == 4        # the 4 largest on 4 devices
  # The small tasks go where the load is least, not onto the largest task's device.
  loads = _loads(costs, owners, 4)
  assert max(loads) == 1000.0


def test_round_robin_equal_costs_is_round_robin():
  owners = assign_round_robin([5.0] * 10, 4)
  assert sorted(np.bincount(owners, minlength=4)) == [2, 2, 3, 3]
  assert owners[:4] == (0, 1, 2, 3)                     # ties keep task order


def test_round_robin_edge_cases():
  assert assign_round_robin([], 3) == ()
  assert assign_round_robin([8.0, 1.0, 5.0], 1) == (0, 0, 0)
  owners = assign_round_robin([1.0, 2.0, 3.0], 8)       # more devices than tasks
  assert len(set(owners)) == 3


# --- split_batch -------------------------------------------------------------------------------


def test_split_batch_reshapes_leading_axis():
  batch = {"x": jnp.arange(24.0).reshape(12, 2), "y": jnp.arange(12)}
  split = split_batch(batch, 4)
  assert split["x"].shape == (4, 3, 2) and split["y"].shape == (4, 3)
  # Device d gets examples [3d, 3d + 3): concatenating the shards gives the batch back.
  np.testing.assert_array_equal(split["x"].reshape(12, 2), batch["x"])
  np.testing.assert_array_equal(split["y"][1], [3, 4, 5])


def test_split_batch_rejects_indivisible_batch():
  with pytest.raises(ValueError, match="batch size 10 is not divisible by 4 devices"):
    split_batch({"x": jnp.zeros((10, 3))}, 4)


# --- bad configurations, on one device ------------------------------------------------------------


class _MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return jkfac.flax.Dense(3)(jnp.tanh(jkfac.flax.Dense(4)(x)))


_model = _MLP()


def _loss_fn(params, batch):
  logits = _model.apply({"params": params}, batch["x"])
  logits = jkfac.register_softmax_cross_entropy(logits, batch["y"])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


_BATCH = {"x": jnp.ones((4, 5)), "y": jnp.array([0, 1, 2, 0])}


def _step(tx):
  def step(params, state, batch):
    grads = jax.grad(_loss_fn)(params, batch)
    updates, state = tx.update(grads, state, params, batch=batch)
    return optax.apply_updates(params, updates), state
  return step


def _params():
  return _model.init(jax.random.PRNGKey(0), _BATCH["x"])["params"]


def test_unbound_axis_under_jit_raises():
  tx = jkfac.kfac(_loss_fn, _BATCH, learning_rate=0.1, damping=1e-2, axis_name="nope")
  params = _params()
  with pytest.raises(ValueError, match="axis_name='nope'"):
    jax.jit(_step(tx))(params, tx.init(params), _BATCH)


def test_axis_name_other_than_the_pmap_axis_raises():
  tx = jkfac.kfac(_loss_fn, _BATCH, learning_rate=0.1, damping=1e-2, axis_name="nope")
  params = _params()
  stack = lambda tree: jax.tree_util.tree_map(lambda x: x[None], tree)
  with pytest.raises(ValueError, match="nope"):
    jax.pmap(_step(tx), axis_name="batch")(stack(params), stack(tx.init(params)), stack(_BATCH))


def test_mesh_axis_must_name_a_mesh_axis():
  mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  with pytest.raises(ValueError, match="'nope'"):
    jkfac.kfac(_loss_fn, _BATCH, learning_rate=0.1, damping=1e-2, axis_name="nope", mesh=mesh)


def test_unknown_placement_raises():
  with pytest.raises(ValueError, match="placement"):
    jkfac.kfac(_loss_fn, _BATCH, learning_rate=0.1, damping=1e-2, axis_name="data",
               placement="everywhere")


# --- a mesh with Explicit axes (jax.make_mesh's default), on one device ----------------------------


def _one_device_explicit_mesh():
  return jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))


def _explicit_mesh_run(tx, *, mesh, steps=3):
  """`steps` jitted steps on a random batch, sharded over `mesh` (if any) by rows."""
  x = jax.random.normal(jax.random.PRNGKey(1), (8, 5))
  batch = {"x": x, "y": jnp.arange(8) % 3}
  params = _params()
  state = tx.init(params)
  if mesh is not None:
    batch = jax.device_put(batch, NamedSharding(mesh, P("data")))
    # Specs with one entry per axis: the step's outputs have them, so no retrace.
    params, state = jax.tree_util.tree_map(
        lambda a: jax.device_put(a, NamedSharding(mesh, P(*[None] * a.ndim))), (params, state))
  step = jax.jit(_step(tx))
  for _ in range(steps):
    params, state = step(params, state, batch)
  return params, state, step


@pytest.mark.parametrize("make_tx", [
    lambda batch: jkfac.kfac(_loss_fn, batch),
    lambda batch: jkfac.eigen_adam(_loss_fn, batch, learning_rate=1e-2),
    lambda batch: optax.chain(jkfac.precondition(_loss_fn, batch, damping=1e-2),
                              optax.sgd(0.1)),
], ids=["kfac", "eigen_adam", "precondition"])
def test_explicit_mesh_axes_give_the_steps_without_a_mesh(make_tx):
  """On a mesh with Explicit axes the statistics' batch contractions (`a.T @ a` over
  the sharded rows) would need an output sharding; jkfac runs them with the axes made
  Auto. Oracle: the same steps with no mesh. Parameters come back with their input
  sharding (the step is traced once)."""
  mesh = _one_device_explicit_mesh()
  tx = make_tx(_BATCH)
  expected_params, expected_state, _ = _explicit_mesh_run(tx, mesh=None)
  params, state, step = _explicit_mesh_run(tx, mesh=mesh)
  for actual, expected in zip(jax.tree_util.tree_leaves((params, state)),
                              jax.tree_util.tree_leaves((expected_params, expected_state))):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=1e-5, atol=1e-6)
  for leaf in jax.tree_util.tree_leaves((params, state)):
    assert leaf.sharding.mesh.axis_types == (jax.sharding.AxisType.Explicit,)
    assert leaf.sharding.spec == P(*[None] * leaf.ndim)
  assert step._cache_size() == 1


def test_explicit_mesh_axes_refuse_the_fused_curvature():
  mesh = _one_device_explicit_mesh()
  tx = jkfac.kfac(_loss_fn, _BATCH)
  batch = jax.device_put(_BATCH, NamedSharding(mesh, P("data")))
  params = jax.device_put(_params(), NamedSharding(mesh, P()))

  def step(params, state, batch):
    _, grads, curvature = jkfac.value_and_grad(_loss_fn)(params, batch)
    return tx.update(grads, state, params, batch=batch, curvature=curvature)

  with pytest.raises(ValueError, match="Explicit axes.*curvature="):
    jax.jit(step)(params, tx.init(params), batch)
