"""Multi-device checks of jkfac's data parallelism, run by tests/test_parallel.py.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 PYTHONPATH=. \
        python tests/_multidevice.py pmap mesh

Each argument names a group of checks; a failed check raises (non-zero exit). The
flag must be set before JAX starts, so the tests run this file in a subprocess.

Every configuration is compared with the same K-FAC step jitted on one device on
the whole (concatenated) batch. `jkfac.inverses.invert_factor`, the function that
every inverse task calls, is wrapped with a `jax.debug.callback` that records which
device ran it on which factor: that shows structurally where each inverse ran.
"""

from __future__ import annotations

import collections
import functools
import re
import sys

import flax.jax_utils
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

import jkfac
import jkfac.inverses

AXIS = "data"
DEVICES = 8
GLOBAL_BATCH = 48   # divisible by 8 and by 3
STEPS = 5           # inverses at steps 0, 2 and 4
INVERT_EVERY = 2
# Every patch row (sub_sample_patches=None): a device's sample of its shard's rows is not
# one device's sample of the whole batch.
KW = dict(learning_rate=0.1, damping=1e-2, invert_every=INVERT_EVERY, estimation="empirical",
          warm_start=False, sub_sample_patches=None)
RTOL, ATOL = 2e-4, 2e-5


class Net(nn.Module):
  """A small conv (kron), a kron, a diagonal and a full dense layer.

  Every factor has its own shape and its own inversion cost, so the recorded calls
  identify the factor and the round-robin assignment has no ties.
  """

  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(jkfac.flax.Conv(3, (3, 3), strides=(2, 2), padding="VALID")(x))
    x = x.reshape(x.shape[0], -1)                                       # 27 features
    x = jnp.tanh(jkfac.flax.Dense(5)(x))
    x = jnp.tanh(jkfac.flax.Dense(4, approximation="diagonal")(x))
    return jkfac.flax.Dense(3, approximation="full")(x)


# The factors in the order jkfac lists its tasks (layers in order, then factors), with
# the cost it gives them: n^3 for a matrix, the size for an entrywise (diagonal) block.
FACTORS = [((19, 19), 19 ** 3), ((3, 3), 3 ** 3),      # Conv_0 A, G
           ((28, 28), 28 ** 3), ((5, 5), 5 ** 3),      # Dense_0 A, G
           ((6, 4), 6 * 4),                             # Dense_1 diagonal
           ((15, 15), 15 ** 3)]                         # Dense_2 F
SHAPES = [shape for shape, _ in FACTORS]
COSTS = [cost for _, cost in FACTORS]
assert len(set(SHAPES)) == len(SHAPES) and len(set(COSTS)) == len(COSTS)

model = Net()


def loss_fn(params, batch):
  logits = model.apply({"params": params}, batch["x"])
  logits = jkfac.register_softmax_cross_entropy(logits, batch["y"])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


def make_batch(seed=0, size=GLOBAL_BATCH):
  rng = np.random.default_rng(seed)
  return {"x": jnp.asarray(rng.standard_normal((size, 7, 7, 2)), jnp.float32),
          "y": jnp.asarray(rng.integers(0, 3, size), jnp.int32)}


BATCH = make_batch()
PARAMS = jax.tree_util.tree_map(
    lambda p: jnp.asarray(np.random.default_rng(p.size).standard_normal(p.shape) * 0.5,
                          jnp.float32),
    jax.eval_shape(model.init, jax.random.PRNGKey(0), BATCH["x"])["params"])


# --- recording where each inverse runs ----------------------------------------------------

CALLS: list[tuple[int, tuple[int, ...]]] = []   # (device index or -1, factor shape)
_original_invert = jkfac.inverses.invert_factor


def _record(shape, device):
  CALLS.append((int(device), shape))


def _recording_invert(block, method, factor, damping):
  result = _original_invert(block, method, factor, damping)
  try:
    device = jax.lax.axis_index(AXIS)
  except NameError:   # no device axis bound: plain jit, or outside shard_map
    device = jnp.int32(-1)
  jax.debug.callback(functools.partial(_record, tuple(factor.shape)), device)
  return result


jkfac.inverses.invert_factor = _recording_invert   # looked up when a step is traced


def take_calls():
  jax.effects_barrier()
  calls = list(CALLS)
  CALLS.clear()
  return calls


def check_calls(calls, step, *, placement, num_devices):
  """The inverse tasks of one step ran where `placement` says, each factor once per group."""
  if step % INVERT_EVERY:
    assert not calls, f"step {step}: inverses ran on a step without inversion: {calls}"
    return
  if placement == "single":
    expected = [(-1, shape) for shape in SHAPES]
  elif placement == "replicated":
    expected = [(d, shape) for shape in SHAPES for d in range(num_devices)]
  else:
    owners = jkfac.parallel.assign_round_robin(COSTS, num_devices)
    expected = list(zip(owners, SHAPES))
  assert sorted(calls) == sorted(expected), (
      f"step {step}, {placement} on {num_devices} devices: inverses ran as {sorted(calls)}, "
      f"expected {sorted(expected)}")


# --- steps ------------------------------------------------------------------------------------

TRACES = collections.Counter()


def make_step(tx, name):
  def step(params, opt_state, batch):
    TRACES[name] += 1   # runs only when the step is traced
    grads = jax.grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params, batch=batch)
    return optax.apply_updates(params, updates), opt_state
  return step


def assert_close(actual, expected, what):
  leaves_a, tree_a = jax.tree_util.tree_flatten(actual)
  leaves_e, tree_e = jax.tree_util.tree_flatten(expected)
  assert tree_a == tree_e, f"{what}: tree structures differ: {tree_a} vs {tree_e}"
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(expected)[0]]
  for path, a, e in zip(paths, leaves_a, leaves_e):
    np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=RTOL, atol=ATOL,
                               err_msg=f"{what}: {path}")


def assert_same_on_every_device(tree, what):
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    leaf = np.asarray(leaf)
    for d in range(1, leaf.shape[0]):
      where = jax.tree_util.keystr(path)
      np.testing.assert_array_equal(leaf[d], leaf[0],
                                    err_msg=f"{what}: device {d} differs at {where}")


def reference(batch=BATCH, steps=STEPS, **settings):
  """Params and optimizer state after each step, jitted on one device, whole batch."""
  tx = jkfac.kfac(loss_fn, batch, **KW, **settings)
  step = jax.jit(make_step(tx, "single"))
  params, state, history = PARAMS, tx.init(PARAMS), []
  for i in range(steps):
    params, state = step(params, state, batch)
    check_calls(take_calls(), i, placement="single", num_devices=1)
    history.append((params, state))
  return history


# --- pmap ----------------------------------------------------------------------------------------


def run_pmap(num_devices, placement, history, estimation="empirical"):
  """Runs the pmapped step; checks it against `history` and where each inverse ran.

  `placement=None` leaves jkfac its default, which is round robin with an axis.
  """
  name = f"pmap-{num_devices}-{placement or 'default'}-{estimation}"
  devices = jax.devices()[:num_devices]
  batch = jkfac.parallel.split_batch(BATCH, num_devices)
  local = jax.tree_util.tree_map(lambda x: x[0], batch)
  tx = jkfac.kfac(loss_fn, local, axis_name=AXIS, placement=placement,
                  **{**KW, "estimation": estimation})
  step = jax.pmap(make_step(tx, name), axis_name=AXIS, devices=devices)
  # `axis_name=AXIS` gives the replicated arrays the sharding of pmap's outputs; with
  # flax's default name the second call sees another sharding and retraces once.
  params = flax.jax_utils.replicate(PARAMS, devices, axis_name=AXIS)
  state = flax.jax_utils.replicate(tx.init(PARAMS), devices, axis_name=AXIS)
  for i in range(STEPS):
    params, state = step(params, state, batch)
    if estimation == "empirical":
      check_calls(take_calls(), i, placement=placement or "round_robin", num_devices=num_devices)
    # pmean/psum leave every device with the same parameters and state, bit for bit.
    assert_same_on_every_device((params, state), f"{name} step {i}")
    if history is not None:
      expected_params, expected_state = history[i]
      assert_close(flax.jax_utils.unreplicate(params), expected_params, f"{name} step {i} params")
      assert_close(flax.jax_utils.unreplicate(state), expected_state, f"{name} step {i} state")
  assert TRACES[name] == 1, f"{name}: the pmapped step was traced {TRACES[name]} times"
  take_calls()
  print(f"ok {name}")
  return flax.jax_utils.unreplicate((params, state))


def group_pmap():
  history = reference()
  round_robin = run_pmap(DEVICES, "round_robin", history)
  replicated = run_pmap(DEVICES, "replicated", history)
  # Round robin shares exactly what every device would have computed.
  assert_close(round_robin, replicated, "round_robin vs replicated")
  # Fewer devices than factors, so devices own several; and the default placement.
  run_pmap(3, None, history)
  # Sampled targets differ per device, but statistics are averaged: state stays identical.
  run_pmap(DEVICES, "round_robin", None, estimation="fisher")


# --- jit with a sharded batch ---------------------------------------------------------------------


def run_mesh(history, name, *, use_mesh, axis_type=jax.sharding.AxisType.Auto, **kwargs):
  """jit on a batch sharded over an 8-device mesh; checks it against `history`.

  With `use_mesh`, `mesh=` goes to jkfac: round robin then runs each inverse on its
  owner inside shard_map, which the recorded calls show. With Explicit axes, params
  and state are placed with one spec entry per axis, the types the step returns.
  """
  mesh = jax.make_mesh((DEVICES,), (AXIS,), axis_types=(axis_type,))
  tx = jkfac.kfac(loss_fn, BATCH, **({"mesh": mesh} if use_mesh else {}), **kwargs, **KW)
  step = jax.jit(make_step(tx, name))
  batch = jax.device_put(BATCH, NamedSharding(mesh, P(AXIS)))
  assert len(batch["x"].sharding.device_set) == DEVICES
  params, state = jax.tree_util.tree_map(
      lambda x: jax.device_put(x, NamedSharding(mesh, P(*[None] * x.ndim))),
      (PARAMS, tx.init(PARAMS)))
  round_robin = use_mesh and kwargs.get("placement", "round_robin") == "round_robin"
  for i in range(STEPS):
    params, state = step(params, state, batch)
    calls = take_calls()
    if round_robin:
      check_calls(calls, i, placement="round_robin", num_devices=DEVICES)
    elif i % INVERT_EVERY == 0:   # outside shard_map: no device index, every factor inverted
      assert {shape for _, shape in calls} == set(SHAPES), calls
    expected_params, expected_state = history[i]
    assert_close(params, expected_params, f"{name} step {i} params")
    assert_close(state, expected_state, f"{name} step {i} state")
  assert TRACES[name] == 1, f"{name}: the jitted step was traced {TRACES[name]} times"
  print(f"ok {name}")
  return compiled_ops(step.lower(params, state, batch).compile().as_text())


_OPCODE = re.compile(r"= \S+ ([a-z][a-z0-9-]*)\(")


def compiled_ops(hlo: str) -> collections.Counter:
  """How many instructions of each opcode a compiled program has."""
  return collections.Counter(_OPCODE.findall(hlo))


def group_mesh():
  history = reference()
  auto = {"sharded-batch": run_mesh(history, "jit-sharded-batch", use_mesh=False),  # XLA alone
          "mesh-round_robin": run_mesh(history, "jit-mesh-round_robin", use_mesh=True,
                                       axis_name=AXIS)}
  replicated = run_mesh(history, "jit-mesh-replicated", use_mesh=True, axis_name=AXIS,
                        placement="replicated")
  assert replicated != auto["mesh-round_robin"]  # the comparison below sees placements
  # Statistics from 16 of the 48 sharded examples: the same rows as on one device.
  run_mesh(reference(max_statistics_examples=16), "jit-mesh-statistics-examples",
           use_mesh=True, axis_name=AXIS, max_statistics_examples=16)
  # Explicit axes (jax.make_mesh's default): the same steps, with the axes made Auto, and
  # the same compiled program (as many instructions of each opcode).
  explicit = jax.sharding.AxisType.Explicit
  for name, use_mesh, settings in (("sharded-batch", False, {}),
                                   ("mesh-round_robin", True, {"axis_name": AXIS})):
    ops = run_mesh(history, f"jit-explicit-{name}", use_mesh=use_mesh, axis_type=explicit,
                   **settings)
    assert ops == auto[name], f"{name}: Explicit axes compile to {ops}, Auto ones to {auto[name]}"
    print(f"same program {name}: {sum(ops.values())} instructions")


# --- scanned layers ------------------------------------------------------------------------------


class _Cell(nn.Module):
  @nn.compact
  def __call__(self, h, x):
    return jnp.tanh(nn.Dense(6, name="hh")(h) + nn.Dense(6, use_bias=False, name="xh")(x)), None


class _Block(nn.Module):
  @nn.compact
  def __call__(self, h, _):
    return jnp.tanh(nn.Dense(6)(h)), None


class ScanNet(nn.Module):
  """A grouped 1-D conv (blocks stacked over groups), a recurrence over time (multi-use
  weights), then layers stacked by `nn.scan`."""

  @nn.compact
  def __call__(self, x):
    xs = jnp.tanh(nn.Conv(14, (3,), feature_group_count=2)(x.reshape(x.shape[0], 7, 14)))
    cell = nn.scan(_Cell, variable_broadcast="params", split_rngs={"params": False},
                   in_axes=1)
    h, _ = cell()(jnp.zeros((x.shape[0], 6)), xs)
    h, _ = nn.scan(_Block, variable_axes={"params": 0}, split_rngs={"params": True},
                   length=3)()(h, None)
    return nn.Dense(3)(h)


def group_scan():
  """pmap with round robin equals one device for grouped, multi-use and stacked layers."""
  scan_model = ScanNet()

  def scan_loss(params, batch):
    logits = jkfac.register_softmax_cross_entropy(scan_model.apply({"params": params},
                                                                   batch["x"]), batch["y"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

  def step_fn(tx):
    def step(params, state, batch):
      grads = jax.grad(scan_loss)(params, batch)
      updates, state = tx.update(grads, state, params, batch=batch)
      return optax.apply_updates(params, updates), state
    return step

  params0 = scan_model.init(jax.random.PRNGKey(0), BATCH["x"])["params"]
  tx = jkfac.kfac(scan_loss, BATCH, **KW)
  step = jax.jit(step_fn(tx))
  expected = [(params0, tx.init(params0))]
  for _ in range(3):
    expected.append(step(*expected[-1], BATCH))
  batch = jkfac.parallel.split_batch(BATCH, DEVICES)
  local = jax.tree_util.tree_map(lambda x: x[0], batch)
  tx = jkfac.kfac(scan_loss, local, axis_name=AXIS, **KW)
  step = jax.pmap(step_fn(tx), axis_name=AXIS)
  params = flax.jax_utils.replicate(params0, axis_name=AXIS)
  state = flax.jax_utils.replicate(tx.init(params0), axis_name=AXIS)
  for i in range(3):
    params, state = step(params, state, batch)
    assert_same_on_every_device((params, state), f"scan step {i}")
    assert_close(flax.jax_utils.unreplicate((params, state)), expected[i + 1], f"scan step {i}")
  take_calls()
  print("ok pmap-scanned-layers")


# --- jkfac.eigen_adam --------------------------------------------------------------------------

EIGEN_KW = dict(estimation="empirical", cov_update_every=1, invert_every=INVERT_EVERY,
                warm_start=False, sub_sample_patches=None)


def group_eigen_adam():
  """`jkfac.eigen_adam` pmapped over 8 devices equals one device on the whole batch: the
  parameters and the K-FAC statistics after each step (new bases at steps 0, 2, 4). The
  bases are not compared: an eigenvector's sign may differ, which changes no update."""
  tx = jkfac.eigen_adam(loss_fn, BATCH, 0.01, **EIGEN_KW)
  step = jax.jit(make_step(tx, "eigen-single"))
  params, state, history = PARAMS, tx.init(PARAMS), []
  for _ in range(STEPS):
    params, state = step(params, state, BATCH)
    history.append((params, state[0].preconditioner.statistics))
  devices = jax.devices()[:DEVICES]
  batch = jkfac.parallel.split_batch(BATCH, DEVICES)
  local = jax.tree_util.tree_map(lambda x: x[0], batch)
  tx = jkfac.eigen_adam(loss_fn, local, 0.01, axis_name=AXIS, **EIGEN_KW)
  step = jax.pmap(make_step(tx, "eigen-pmap"), axis_name=AXIS, devices=devices)
  params = flax.jax_utils.replicate(PARAMS, devices, axis_name=AXIS)
  state = flax.jax_utils.replicate(tx.init(PARAMS), devices, axis_name=AXIS)
  for i in range(STEPS):
    params, state = step(params, state, batch)
    assert_same_on_every_device((params, state), f"eigen_adam pmap step {i}")
    expected_params, expected_statistics = history[i]
    assert_close(flax.jax_utils.unreplicate(params), expected_params,
                 f"eigen_adam pmap step {i} params")
    assert_close(flax.jax_utils.unreplicate(state[0].preconditioner.statistics),
                 expected_statistics, f"eigen_adam pmap step {i} statistics")
  take_calls()
  print("ok pmap-eigen-adam")


GROUPS = {"pmap": group_pmap, "mesh": group_mesh, "scan": group_scan,
          "eigen_adam": group_eigen_adam}

if __name__ == "__main__":
  assert jax.device_count() >= DEVICES, (
      f"needs {DEVICES} devices (XLA_FLAGS=--xla_force_host_platform_device_count={DEVICES}), "
      f"got {jax.device_count()}")
  for group in sys.argv[1:] or GROUPS:
    GROUPS[group]()
