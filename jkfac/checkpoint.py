"""Checkpoints of training state (parameters, optimizer state) with orbax-checkpoint.

jkfac's optimizer state is a pytree of arrays, so `orbax.checkpoint.StandardCheckpointer`
saves and restores it as it is, into a target such as `tx.init(params)` (without one,
orbax returns dicts and lists instead of NamedTuples), and a resumed run is
bit-identical. This module adds relative paths and state replicated by `jax.pmap`:
`save(..., replicated=True)` writes one replica and `restore(..., devices=...)`
replicates it onto any number of devices.

Examples:
  >>> jkfac.checkpoint.save(path, {"params": params, "opt_state": opt_state})
  >>> tree = jkfac.checkpoint.restore(path, {"params": params, "opt_state": opt_state})
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

PyTree = Any


def unreplicate(tree: PyTree) -> PyTree:
  """The first replica of a tree replicated along axis 0 of every leaf (pmap's layout)."""
  return jax.tree_util.tree_map(lambda x: x[0], tree)


def replicate(tree: PyTree, devices: Sequence[jax.Device], axis_name: str = "devices") -> PyTree:
  """One copy of `tree` per device, stacked along a new axis 0, to pass to `jax.pmap`.

  The arrays get the sharding of the outputs of `jax.pmap(..., axis_name=axis_name)` over
  `devices`, so the step is not traced again on its second call.
  """
  devices = list(devices)
  mesh = jax.sharding.Mesh(np.asarray(devices), (axis_name,))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axis_name))

  def copies(x: Any) -> jax.Array:
    x = x if isinstance(x, jax.Array) else np.asarray(x)
    shards = [jax.device_put(x[None], device) for device in devices]
    return jax.make_array_from_single_device_arrays((len(devices),) + x.shape, sharding, shards)

  return jax.tree_util.tree_map(copies, tree)


def process_global(tree: PyTree) -> PyTree:
  """One process's copy of a tree as arrays replicated over every process's devices.

  Under `jax.distributed` pmap's outputs are process-local arrays, which orbax cannot
  write; every process holds the same values (pmap averaged them), so they make one
  global, fully replicated array that orbax writes once. A no-op with one process.
  """
  if jax.process_count() == 1:
    return tree
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("devices",))
  everywhere = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_process_local_data(everywhere, np.asarray(x)), tree)


def save(path: str | os.PathLike, tree: PyTree, *, replicated: bool = False,
         force: bool = False) -> None:
  """Writes `tree` to the folder `path` and returns once the checkpoint is complete.

  Args:
    path: a folder that must not exist yet (unless `force`); relative to the working folder.
    tree: a pytree of arrays, e.g. `{"params": params, "opt_state": opt_state, "step": step}`.
    replicated: `tree` is replicated by `jax.pmap` (devices on axis 0): write one replica.
      Every process of a `jax.distributed` run calls `save`; orbax writes each array once.
    force: overwrite an existing checkpoint at `path`.
  """
  if replicated:
    tree = process_global(unreplicate(tree))
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.abspath(path), tree, force=force)


def _target(leaf: Any) -> Any:
  """`leaf` if it says where to restore to; else its shape on this process's first device.

  Without a sharding orbax would reuse the saved one, whose devices may belong to other
  processes (a checkpoint of a `jax.distributed` run) or not exist at all (restored on
  another topology).
  """
  if getattr(leaf, "sharding", None) is not None or not hasattr(leaf, "dtype"):
    return leaf  # placed already, or a Python scalar (restored as saved)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype, sharding=device)


def restore(path: str | os.PathLike, like: PyTree, *,
            devices: Sequence[jax.Device] | None = None, axis_name: str = "devices") -> PyTree:
  """The checkpoint at `path`, with the structure, shapes and dtypes of `like`.

  Args:
    path: a folder written by `save` (or by `StandardCheckpointer.save` of one replica).
    like: an unreplicated tree of arrays or `jax.ShapeDtypeStruct`s, e.g.
      `{"params": params, "opt_state": tx.init(params)}` or its `jax.eval_shape`. Arrays are
      restored onto the sharding of `like`'s leaves, or, where a leaf has none, onto this
      process's first device (`jax.local_devices()[0]`), whatever the saving run's topology.
      A leaf whose shape differs from the saved one raises a `ValueError` (`SHAPE_HINT`
      says why a K-FAC state can differ).
    devices: replicate the restored tree onto these devices for `jax.pmap` (any number,
      whatever the run that saved it used); `None` leaves it unreplicated.
    axis_name: the pmap axis name, with `devices` (see `replicate`).
  """
  with ocp.StandardCheckpointer() as checkpointer:
    try:
      tree = checkpointer.restore(os.path.abspath(path), jax.tree_util.tree_map(_target, like))
    except ValueError as error:
      if "stored shape" not in str(error):
        raise
      raise ValueError(f"{error}\n{SHAPE_HINT}") from error
  return tree if devices is None else replicate(tree, devices, axis_name)


# Why a K-FAC state may not fit the `like` of another run (appended to orbax's error).
SHAPE_HINT = (
    "The checkpoint's arrays have other shapes than `like`'s. With jkfac.kfac or "
    "jkfac.precondition, factor_block_size='auto' (the default) chooses the Kronecker "
    "factors' blocks from the batch size, so a state saved at one batch size has other "
    "shapes at another: restore with the batch size it was saved with, or set "
    "factor_block_size to the same value in both runs (jkfac.describe shows the blocks).")
