"""Data parallelism: averaging over a device axis and spreading inverse work.

Under `jax.pmap(..., axis_name=...)` every device runs the same step on its own
shard of the batch; `pmean` makes gradients and statistics those of the whole
batch, so the state stays identical everywhere. Inverses are the expensive part
that every device would otherwise repeat: with round-robin placement each factor
is inverted by one device, chosen to balance the cubic cost, and shared by `psum`
(the other devices contribute zeros, so the sum is the owner's result exactly).

Under `jax.jit` with a batch sharded over a `Mesh`, arrays are global and XLA
averages by itself; the same placement runs inside `jax.shard_map` over the mesh axis.
On a mesh with `Explicit` axes (`jax.make_mesh`'s default) the step runs with those
axes made `Auto` (`on_auto_axes`), so XLA chooses how the batch contractions of the
statistics are sharded, and the results keep their input shardings.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

PLACEMENTS = ("round_robin", "replicated")


def assign_round_robin(costs: Sequence[float], num_devices: int) -> tuple[int, ...]:
  """The device of each task: largest first, each to the least loaded device."""
  load = [0.0] * num_devices
  owners = [0] * len(costs)
  for task in sorted(range(len(costs)), key=lambda t: -costs[t]):
    device = min(range(num_devices), key=lambda d: load[d])
    owners[task] = device
    load[device] += costs[task]
  return tuple(owners)


def check_axis(axis_name: str) -> None:
  """Raises a clear error when `axis_name` is not bound by pmap/shard_map."""
  try:
    jax.lax.axis_index(axis_name)
  except NameError as error:
    raise ValueError(
        f"jkfac was given axis_name={axis_name!r}, but no such axis is bound: run the train "
        f"step under jax.pmap(..., axis_name={axis_name!r}), or pass mesh= for jax.jit with "
        "a sharded batch.") from error


def pmean(tree: Any, axis_name: str | None) -> Any:
  return tree if axis_name is None else jax.lax.pmean(tree, axis_name)


Task = tuple[Callable[..., Any], tuple]  # a function and its array arguments


def _owned(tasks: Sequence[Task], owners: Sequence[int], axis_name: str) -> list:
  """Runs task i only on device owners[i]; every device receives every result."""
  index = jax.lax.axis_index(axis_name)
  results = []
  for (fn, args), owner in zip(tasks, owners):
    zeros = lambda *args, fn=fn: jax.tree_util.tree_map(
        lambda x: jnp.zeros(x.shape, x.dtype), jax.eval_shape(fn, *args))
    results.append(jax.lax.cond(index == owner, fn, zeros, *args))
  return jax.lax.psum(results, axis_name)


def run_tasks(tasks: Sequence[Task], costs: Sequence[float], *, axis_name: str | None,
              placement: str, mesh: Mesh | None = None) -> list:
  """`[fn(*args) for fn, args in tasks]`, each computed once per device group.

  "replicated" (or no axis): every device computes every task. "round_robin":
  each task runs on one device of `axis_name` (a pmap axis, or an axis of `mesh`).
  """
  if axis_name is None or placement == "replicated":
    return [fn(*args) for fn, args in tasks]
  if mesh is None:
    owners = assign_round_robin(costs, jax.lax.axis_size(axis_name))
    return _owned(tasks, owners, axis_name)
  owners = assign_round_robin(costs, mesh.shape[axis_name])
  context = jax.sharding.get_abstract_mesh()
  if not context.empty and context.shape_tuple == mesh.shape_tuple:
    mesh = context  # `mesh` with its axes made Auto by `on_auto_axes`
  functions = [fn for fn, _ in tasks]
  arguments = [args for _, args in tasks]

  def on_each_device(arguments):
    return _owned(list(zip(functions, arguments)), owners, axis_name)

  return jax.shard_map(on_each_device, mesh=mesh, in_specs=PartitionSpec(),
                       out_specs=PartitionSpec())(arguments)


def _abstract_mesh(x: Any) -> AbstractMesh | None:
  """The (abstract) mesh of `x`'s sharding type, if it has one."""
  mesh = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
  return getattr(mesh, "abstract_mesh", mesh)


def _explicit_mesh(tree: Any) -> AbstractMesh | None:
  """The mesh of the context or of any leaf's sharding type, if it has Explicit axes."""
  meshes = [jax.sharding.get_abstract_mesh()] + [
      _abstract_mesh(leaf) for leaf in jax.tree_util.tree_leaves(tree)]
  return next((m for m in meshes if m is not None and not m.empty and m.explicit_axes), None)


def _call_on_auto_axes(fn: Callable[..., Any], arguments: tuple, mesh: AbstractMesh,
                       out_sharding: Any) -> Any:
  """`fn(*arguments)` with `mesh`'s axes made Auto; outputs resharded to `out_sharding`
  (a tree prefix of them). Leaves that are not arrays are passed through as they are."""
  leaves, tree = jax.tree_util.tree_flatten(arguments)
  is_array = [isinstance(x, jax.Array) for x in leaves]

  def run(arrays):
    arrays = iter(arrays)
    return fn(*jax.tree_util.tree_unflatten(
        tree, [next(arrays) if a else x for x, a in zip(leaves, is_array)]))

  arrays = [x for x, a in zip(leaves, is_array) if a]
  return jax.sharding.auto_axes(run, out_sharding=out_sharding)(arrays)


def on_auto_axes(update_fn: Callable[..., Any]) -> Callable[..., Any]:
  """An optax `update_fn` that runs with a mesh's Explicit axes made Auto.

  With Explicit axes every contraction over the sharded batch axis (a covariance
  `a.T @ a`) would need its output sharding spelled out; with Auto axes XLA propagates
  it. Updates and state come back with the shardings of `updates` and `state` (a leaf
  on no mesh comes back replicated). Without Explicit axes, `update_fn` unchanged.
  `curvature=` from `jkfac.value_and_grad` is refused there: its pullback was built
  for the Explicit axes.
  """

  @functools.wraps(update_fn)
  def wrapped(updates, state, params=None, **extra_args):
    mesh = _explicit_mesh((updates, state, params, extra_args))
    if mesh is None:
      return update_fn(updates, state, params, **extra_args)
    if extra_args.get("curvature") is not None:
      raise ValueError(
          "On a mesh with Explicit axes, jkfac cannot reuse jkfac.value_and_grad's "
          "curvature= (its pullback was built for the Explicit axes): leave out "
          "curvature= (K-FAC then runs its own forward pass), or build the mesh with "
          "axis_types=(jax.sharding.AxisType.Auto,).")

    def same_sharding(x):
      on_mesh = _abstract_mesh(x) == mesh
      return NamedSharding(mesh, jax.typeof(x).sharding.spec if on_mesh else PartitionSpec())

    out_sharding = jax.tree_util.tree_map(same_sharding, (updates, state))
    return _call_on_auto_axes(lambda u, s, p, kw: update_fn(u, s, p, **kw),
                              (updates, state, params, extra_args), mesh, out_sharding)

  return wrapped


def replicated_on_auto_axes(fn: Callable[..., Any]) -> Callable[..., Any]:
  """`fn`, whose outputs are replicated (statistics of a batch), run with a mesh's
  Explicit axes made Auto, as `on_auto_axes`; unchanged without Explicit axes."""

  @functools.wraps(fn)
  def wrapped(*arguments):
    mesh = _explicit_mesh(arguments)
    if mesh is None:
      return fn(*arguments)
    return _call_on_auto_axes(fn, arguments, mesh, NamedSharding(mesh, PartitionSpec()))

  return wrapped


def split_batch(batch: Any, num_devices: int) -> Any:
  """Reshapes every leaf `(n, ...)` to `(num_devices, n // num_devices, ...)` for `jax.pmap`."""
  def split(x):
    if x.shape[0] % num_devices:
      raise ValueError(f"batch size {x.shape[0]} is not divisible by {num_devices} devices; "
                       "choose a batch size that is a multiple of the device count.")
    return x.reshape(num_devices, x.shape[0] // num_devices, *x.shape[1:])
  return jax.tree_util.tree_map(split, batch)
