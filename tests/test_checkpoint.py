"""Checkpoints: a run stopped at step K and resumed equals an uninterrupted run.

The optimizer state is treated as an opaque pytree: every leaf is compared, whatever the
state's fields are. The multi-device test runs this file as a script in a subprocess with
`XLA_FLAGS=--xla_force_host_platform_device_count=8` (the flag must be set before JAX starts):

    XLA_FLAGS=--xla_force_host_platform_device_count=8 PYTHONPATH=. \
        python tests/test_checkpoint.py /tmp/folder
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import jkfac
import jkfac.checkpoint

REPO = pathlib.Path(__file__).resolve().parents[1]
AXIS = "data"
K, M = 3, 3               # save after K steps, then M more
GLOBAL_BATCH = 8          # divisible by 4, 2 and 1 devices
# Inverses at counts 0, 2 and 4: before the save and after the restore.
KW = dict(learning_rate=0.05, damping=1e-2, momentum=0.9, invert_every=2)
# pmap over 4 devices against 2 (or 1): the same math, averaged in another order. Measured
# 3 steps after the restore: within 0.7 x (1e-6 + 1e-5 |expected|); these bounds are 5x that.
RTOL, ATOL = 5e-5, 5e-6

PyTree = Any


class Net(nn.Module):
  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return jkfac.flax.Dense(3)(jnp.tanh(jkfac.flax.Dense(5)(x)))


def loss_fn(params: PyTree, batch: dict[str, jax.Array]) -> jax.Array:
  logits = Net().apply({"params": params}, batch["x"])
  logits = jkfac.register_softmax_cross_entropy(logits, batch["y"])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


def make_batch(seed: int, size: int = GLOBAL_BATCH) -> dict[str, jax.Array]:
  rng = np.random.default_rng(seed)
  return {"x": jnp.asarray(rng.standard_normal((size, 6)), jnp.float32),
          "y": jnp.asarray(rng.integers(0, 3, size), jnp.int32)}


BATCHES = [make_batch(seed) for seed in range(K + M)]
PARAMS = Net().init(jax.random.PRNGKey(0), BATCHES[0]["x"])["params"]


def make_step(tx: optax.GradientTransformationExtraArgs) -> Callable[..., tuple[PyTree, PyTree]]:
  def step(params, opt_state, batch):
    grads = jax.grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params, batch=batch)
    return optax.apply_updates(params, updates), opt_state
  return step


def run(step: Callable, tree: dict[str, PyTree], batches: list) -> dict[str, PyTree]:
  params, opt_state = tree["params"], tree["opt_state"]
  for batch in batches:
    params, opt_state = step(params, opt_state, batch)
  return {"params": params, "opt_state": opt_state}


def leaves_with_paths(tree: PyTree) -> list[tuple[str, np.ndarray]]:
  return [(jax.tree_util.keystr(path), np.asarray(leaf))
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def assert_trees_equal(actual: PyTree, expected: PyTree, rtol: float = 0.0,
                       atol: float = 0.0) -> None:
  """Same structure (NamedTuple types included) and every leaf equal (bit for bit by default)."""
  assert jax.tree_util.tree_structure(actual) == jax.tree_util.tree_structure(expected)
  for (path, a), (_, e) in zip(leaves_with_paths(actual), leaves_with_paths(expected)):
    assert a.dtype == e.dtype and a.shape == e.shape, path
    if rtol or atol:
      np.testing.assert_allclose(a, e, rtol=rtol, atol=atol, err_msg=path)
    else:
      np.testing.assert_array_equal(a, e, err_msg=path)


def initial(tx: optax.GradientTransformation) -> dict[str, PyTree]:
  return {"params": PARAMS, "opt_state": tx.init(PARAMS)}


@pytest.fixture(scope="module")
def kfac_run():
  """K-FAC (MC Fisher: the PRNG key matters) and its uninterrupted K+M steps."""
  tx = jkfac.kfac(loss_fn, BATCHES[0], **KW)
  step = jax.jit(make_step(tx))
  return tx, step, run(step, initial(tx), BATCHES)


def test_plain_orbax_resume_is_bit_identical(kfac_run, tmp_path):
  tx, step, expected = kfac_run
  stopped = run(step, initial(tx), BATCHES[:K])
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / "ckpt", stopped)
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(tmp_path / "ckpt", initial(tx))
  assert_trees_equal(restored, stopped)
  assert_trees_equal(run(step, restored, BATCHES[K:]), expected)
  moved = [path for (path, a), (_, b) in zip(leaves_with_paths(stopped["opt_state"]),
                                             leaves_with_paths(initial(tx)["opt_state"]))
           if not np.array_equal(a, b)]
  assert len(moved) > len(jax.tree_util.tree_leaves(stopped["opt_state"])) // 2, moved


def test_helpers_restore_into_an_abstract_tree_from_a_relative_path(kfac_run, tmp_path,
                                                                    monkeypatch):
  tx, step, expected = kfac_run
  stopped = run(step, initial(tx), BATCHES[:K])
  monkeypatch.chdir(tmp_path)  # orbax alone wants absolute paths
  jkfac.checkpoint.save("ckpt", stopped)
  with pytest.raises(ValueError):
    jkfac.checkpoint.save("ckpt", stopped)  # an existing checkpoint is kept...
  jkfac.checkpoint.save("ckpt", stopped, force=True)  # ...unless forced
  restored = jkfac.checkpoint.restore("ckpt", jax.eval_shape(lambda: initial(tx)))
  assert_trees_equal(run(step, restored, BATCHES[K:]), expected)


def test_restore_passes_python_scalars_through(tmp_path):
  """`save`'s example tree holds `"step": step`; `restore` gives it back as saved."""
  tree = {"params": {"w": jnp.arange(3.0)}, "step": 5}
  jkfac.checkpoint.save(tmp_path / "ckpt", tree)
  restored = jkfac.checkpoint.restore(tmp_path / "ckpt", tree)
  assert restored["step"] == 5
  np.testing.assert_array_equal(restored["params"]["w"], tree["params"]["w"])


def test_state_of_other_blocks_raises_naming_factor_block_size(tmp_path):
  """The state of blocked factors (as "auto" picks at a small batch) does not restore into
  whole factors (as at a large batch): the error says why."""
  def state(block_size):
    tx = jkfac.kfac(loss_fn, BATCHES[0], factor_block_size=block_size, **KW)
    return {"opt_state": tx.init(PARAMS)}

  blocked = state(2)
  assert any(leaf.ndim == 3 for leaf in jax.tree_util.tree_leaves(blocked))
  jkfac.checkpoint.save(tmp_path / "ckpt", blocked)
  with pytest.raises(ValueError, match="factor_block_size='auto'.*batch size"):
    jkfac.checkpoint.restore(tmp_path / "ckpt", state(None))
  assert_trees_equal(jkfac.checkpoint.restore(tmp_path / "ckpt", state(2)), blocked)


def test_replicate_and_unreplicate_round_trip():
  tree = initial(jkfac.kfac(loss_fn, BATCHES[0], **KW))
  replicated = jkfac.checkpoint.replicate(tree, jax.devices()[:1], axis_name=AXIS)
  assert all(leaf.shape[0] == 1 for leaf in jax.tree_util.tree_leaves(replicated))
  assert_trees_equal(jkfac.checkpoint.unreplicate(replicated), tree)


# --- multi-device, in a subprocess -----------------------------------------------------------


@pytest.mark.multidevice
def test_pmap_state_restores_onto_other_device_counts(tmp_path):
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags + ["--xla_force_host_platform_device_count=8"])
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
  result = subprocess.run([sys.executable, __file__, str(tmp_path)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, f"{result.stdout}\n{result.stderr[-10000:]}"
  for line in ("ok 4 -> 4 devices", "ok 4 -> 2 devices", "ok 4 -> 1 device"):
    assert line in result.stdout, result.stdout


def pmap_step(num_devices: int) -> tuple[optax.GradientTransformation, Callable]:
  """K-FAC pmapped over the first `num_devices` devices, statistics averaged over them.

  Empirical Fisher: MC samples are drawn per device, so they would differ between counts.
  """
  local = jax.tree_util.tree_map(lambda x: x[:GLOBAL_BATCH // num_devices], BATCHES[0])
  tx = jkfac.kfac(loss_fn, local, axis_name=AXIS, estimation="empirical", **KW)
  return tx, jax.pmap(make_step(tx), axis_name=AXIS, devices=jax.devices()[:num_devices])


def split(batches: list, num_devices: int) -> list:
  return [jkfac.parallel.split_batch(batch, num_devices) for batch in batches]


def tolerance_used(actual: PyTree, expected: PyTree) -> float:
  """The largest |actual - expected| / (ATOL + RTOL |expected|) over all leaves (at most 1)."""
  return max(float(np.max(np.abs(a.astype(np.float64) - e) / (ATOL + RTOL * np.abs(e))))
             for (_, a), (_, e) in zip(leaves_with_paths(actual), leaves_with_paths(expected)))


def multidevice_main(folder: pathlib.Path) -> None:
  """Saves pmap state of 4 devices after K steps; resumes it on 4, 2 and 1 device(s)."""
  assert jax.device_count() >= 4, f"needs 4 devices, got {jax.device_count()}"
  devices = jax.devices()
  tx, step = pmap_step(4)
  tree = jkfac.checkpoint.replicate(initial(tx), devices[:4], axis_name=AXIS)
  stopped = run(step, tree, split(BATCHES[:K], 4))
  jkfac.checkpoint.save(folder / "ckpt", stopped, replicated=True)
  expected = jkfac.checkpoint.unreplicate(run(step, stopped, split(BATCHES[K:], 4)))

  for num_devices in (4, 2):
    tx, step = pmap_step(num_devices)
    tree = jkfac.checkpoint.restore(folder / "ckpt", initial(tx), devices=devices[:num_devices],
                                    axis_name=AXIS)
    replicated = run(step, tree, split(BATCHES[K:], num_devices))
    for d in range(num_devices):  # every device holds the same state
      assert_trees_equal(jax.tree_util.tree_map(lambda x: x[d], replicated),
                         jkfac.checkpoint.unreplicate(replicated))
    actual = jkfac.checkpoint.unreplicate(replicated)
    if num_devices == 4:
      assert_trees_equal(actual, expected)
    else:
      assert_trees_equal(actual, expected, RTOL, ATOL)
    print(f"ok 4 -> {num_devices} devices (difference "
          f"{tolerance_used(actual, expected):.2f} of the tolerance)")

  tx = jkfac.kfac(loss_fn, BATCHES[0], estimation="empirical", **KW)  # no device axis
  actual = run(jax.jit(make_step(tx)), jkfac.checkpoint.restore(folder / "ckpt", initial(tx)),
               BATCHES[K:])
  assert_trees_equal(actual, expected, RTOL, ATOL)
  print(f"ok 4 -> 1 device, unreplicated (difference "
        f"{tolerance_used(actual, expected):.2f} of the tolerance)")


if __name__ == "__main__":
  multidevice_main(pathlib.Path(sys.argv[1]))
