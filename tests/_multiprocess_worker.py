"""One process of a multi-process jkfac run, started by tests/test_multiprocess.py.

    XLA_FLAGS=--xla_force_host_platform_device_count=2 PYTHONPATH=. python \
        tests/_multiprocess_worker.py OUT --num-processes 2 --process-id 0 \
        --coordinator 127.0.0.1:PORT

runs (with the same command for `--process-id 1`) a few K-FAC steps of a small MLP on
4 devices, 2 per process, connected by `jax.distributed` with CPU collectives (gloo)
over loopback: under `jax.pmap` across all 4 devices and under `jax.jit` over a global
4-device `Mesh`, both with round-robin inverses. With `--num-processes 1` and 4 host
devices it runs the same steps in one process: the reference.

Each process writes to OUT/process_<id>/: `<run>.npz` (parameters and K-FAC state after
every step, from its own devices) and `calls.json` (where each inverse ran, recorded by a
`jax.debug.callback` in `jkfac.inverses.invert_factor`: the callback runs in the process
that owns the device). With `--checkpoint DIR` the jit run's state (global arrays) is
saved to DIR and the pmap run's (process-local replicas) to DIR_pmap with
`jkfac.checkpoint.save`, which every process calls, and restored onto the same topology.
Every check that one process can make is an assertion; the test compares the files across
processes.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import flax.jax_utils
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

import jkfac
import jkfac.checkpoint
import jkfac.inverses

AXIS = "data"
DEVICES = 4           # in all processes together
GLOBAL_BATCH = 16     # 4 rows per device
STEPS = 3             # statistics every step, inverses at steps 0 and 2
IN_FEATURES = 7
WIDTHS = (9, 5, 3)    # factors A: 8, 10, 6 (with bias); G: 9, 5, 3: all shapes differ
# The factors in the order jkfac lists its inverse tasks (layers in order, A then G).
SHAPES = [(8, 8), (9, 9), (10, 10), (5, 5), (6, 6), (3, 3)]
COSTS = [n ** 3 for n, _ in SHAPES]


def make_optimizer(example_batch, **parallel):
  """The one K-FAC configuration of these runs; `parallel` is axis_name/placement/mesh."""
  return jkfac.kfac(loss_fn, example_batch, learning_rate=0.1, damping=1e-2, invert_every=2,
                    estimation="empirical", warm_start=False, **parallel)


def mlp(params, x):
  for i, layer in enumerate(params):
    x = x @ layer["w"] + layer["b"]
    if i < len(params) - 1:
      x = jnp.tanh(x)
  return x


def loss_fn(params, batch):
  logits = jkfac.register_softmax_cross_entropy(mlp(params, batch["x"]), batch["y"])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


def make_params():
  rng = np.random.default_rng(1)
  sizes = (IN_FEATURES,) + WIDTHS
  return [{"w": (rng.standard_normal((m, n)) / np.sqrt(m)).astype(np.float32),
           "b": (0.1 * rng.standard_normal(n)).astype(np.float32)}
          for m, n in zip(sizes[:-1], sizes[1:])]


def make_batch(step):
  """The global batch of a step: the same arrays in every process."""
  rng = np.random.default_rng(100 + step)
  return {"x": rng.standard_normal((GLOBAL_BATCH, IN_FEATURES)).astype(np.float32),
          "y": rng.integers(0, WIDTHS[-1], GLOBAL_BATCH).astype(np.int32)}


def process_rows(batch):
  """This process's rows of a global batch: contiguous, in the order of the devices."""
  n = GLOBAL_BATCH // jax.process_count()
  start = jax.process_index() * n
  return jax.tree_util.tree_map(lambda x: x[start:start + n], batch)


def train_step(tx):
  def step(params, state, batch):
    grads = jax.grad(loss_fn)(params, batch)
    updates, state = tx.update(grads, state, params, batch=batch)
    return optax.apply_updates(params, updates), state
  return step


def check_restored(restored, saved, what):
  """`restored` equals `saved` bit for bit, on the same devices."""
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(restored)[0],
                          jax.tree_util.tree_leaves(saved)):
    assert a.sharding.device_set == b.sharding.device_set, (what, path, a.sharding, b.sharding)
    for x, y in zip(a.addressable_shards, b.addressable_shards):
      np.testing.assert_array_equal(x.data, y.data, err_msg=f"{what} {jax.tree_util.keystr(path)}")
  print(f"ok {what}", flush=True)


def flat(tree):
  return {jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


# --- where each inverse ran ---------------------------------------------------------------------

CALLS: list[dict] = []


def record_inverses():
  """Wraps `invert_factor` (looked up when a step is traced) to record its device and factor."""
  original = jkfac.inverses.invert_factor

  def record(shape, index):
    CALLS.append({"shape": list(shape), "axis_index": int(index), "process": jax.process_index()})

  def recording(block, method, factor, damping):
    result = original(block, method, factor, damping)
    jax.debug.callback(functools.partial(record, tuple(factor.shape)), jax.lax.axis_index(AXIS))
    return result

  jkfac.inverses.invert_factor = recording


def take_calls(run, step):
  """The calls recorded since the last take, labelled with their run and step."""
  jax.effects_barrier()
  calls = [dict(call, run=run, step=step) for call in CALLS]
  CALLS.clear()
  return calls


# --- the runs ----------------------------------------------------------------------------


def run_pmap(out, checkpoint):
  """`jax.pmap` across every device of every process; each process feeds its own devices."""
  local_devices = jax.local_devices()
  split = lambda batch: jax.tree_util.tree_map(
      lambda x: x.reshape(len(local_devices), -1, *x.shape[1:]), process_rows(batch))
  tx = make_optimizer(jax.tree_util.tree_map(lambda x: x[0], split(make_batch(0))),
                      axis_name=AXIS, placement="round_robin")
  params = flax.jax_utils.replicate(make_params(), local_devices)
  state = flax.jax_utils.replicate(tx.init(make_params()), local_devices)
  step = jax.pmap(train_step(tx), axis_name=AXIS)
  history, calls = {}, []
  for i in range(STEPS):
    params, state = step(params, state, split(make_batch(i)))
    calls += take_calls("pmap", i)
    for d in range(len(local_devices)):
      for key, value in flat((params, state)).items():
        np.testing.assert_array_equal(value[d], value[0], err_msg=f"pmap step {i} device {d} {key}")
    history.update({f"{i}:{k}": v[0] for k, v in flat((params, state)).items()})
  np.savez(os.path.join(out, "pmap.npz"), **history)
  if checkpoint:   # one replica saved; restored and replicated onto this process's devices
    tree = {"params": params, "opt_state": state}
    jkfac.checkpoint.save(checkpoint + "_pmap", tree, replicated=True)
    like = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), tree)
    restored = jkfac.checkpoint.restore(checkpoint + "_pmap", like, devices=local_devices)
    check_restored(restored, tree, "checkpoint pmap")
  return calls


def global_array(x, sharding):
  """A global array from a value every process holds, or from its own rows of a batch."""
  return jax.make_array_from_process_local_data(sharding, np.asarray(x))


def run_mesh(out, checkpoint):
  """`jax.jit` over a global mesh of every process's devices, inverses on their owners."""
  mesh = jax.make_mesh((DEVICES,), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,))
  replicated, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P(AXIS))
  tx = make_optimizer(make_batch(0), mesh=mesh, axis_name=AXIS, placement="round_robin")
  params, state = jax.tree_util.tree_map(lambda x: global_array(x, replicated),
                                         (make_params(), tx.init(make_params())))
  step = jax.jit(train_step(tx))
  history, calls = {}, []
  for i in range(STEPS):
    batch = jax.tree_util.tree_map(lambda x: global_array(x, rows), process_rows(make_batch(i)))
    params, state = step(params, state, batch)
    calls += take_calls("mesh", i)
    local = jax.tree_util.tree_map(lambda x: x.addressable_data(0), (params, state))
    history.update({f"{i}:{k}": v for k, v in flat(local).items()})
  np.savez(os.path.join(out, "mesh.npz"), **history)
  if checkpoint:   # global arrays, restored onto the same global sharding
    tree = {"params": params, "opt_state": state}
    jkfac.checkpoint.save(checkpoint, tree)
    restored = jkfac.checkpoint.restore(checkpoint, jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree))
    check_restored(restored, tree, "checkpoint")
  return calls


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("out")
  parser.add_argument("--num-processes", type=int, default=1)
  parser.add_argument("--process-id", type=int, default=0)
  parser.add_argument("--coordinator", default=None)
  parser.add_argument("--checkpoint", default=None)
  args = parser.parse_args()
  if args.num_processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=args.coordinator,
                               num_processes=args.num_processes, process_id=args.process_id)
  assert jax.process_count() == args.num_processes, jax.process_count()
  assert jax.device_count() == DEVICES, f"{jax.device_count()} devices, expected {DEVICES}"
  out = os.path.join(args.out, f"process_{jax.process_index()}")
  os.makedirs(out, exist_ok=True)
  record_inverses()
  calls = run_pmap(out, args.checkpoint) + run_mesh(out, args.checkpoint)
  devices = {"global": [d.id for d in jax.devices()],
             "local": [d.id for d in jax.local_devices()]}
  with open(os.path.join(out, "calls.json"), "w") as f:
    json.dump({"calls": calls, "devices": devices}, f)
  print(f"ok process {jax.process_index()}", flush=True)


if __name__ == "__main__":
  sys.exit(main())
