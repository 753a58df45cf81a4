"""K-FAC across hosts: one process per host, `jax.distributed`, `jax.jit` over a global mesh.

Start the same command on every host, each with its own `--process-id`; process 0's
host is the coordinator:

    python examples/multihost.py --num-processes 2 --process-id 0 --coordinator HOST0:1234
    python examples/multihost.py --num-processes 2 --process-id 1 --coordinator HOST0:1234

On one machine, for a try, run both on CPU with 2 host devices each (`--cpu-devices 2`)
and `--coordinator 127.0.0.1:PORT`. With `--coordinator auto`,
`jax.distributed.initialize()` finds all three settings itself where it can (SLURM,
Open MPI, TPU pods). Without any of the flags it runs in one process.

Every process builds a mesh of all devices of all processes; it loads only its own rows
of each global batch (here: draws them) and `jax.make_array_from_process_local_data`
joins them into one global array, so a batch never crosses hosts. The train step is
jitted once for the whole mesh; `jkfac.kfac(..., mesh=mesh, axis_name="data")` inverts
each Kronecker factor on one device (round robin, across hosts) and shares the result.
The model is a small MLP on a synthetic task (labels of a random linear teacher).
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

import jkfac
import jkfac.checkpoint

AXIS = "data"
FEATURES, CLASSES = 32, 10


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.tanh(nn.Dense(64)(x))
    x = jnp.tanh(nn.Dense(64)(x))
    return nn.Dense(CLASSES)(x)


def loss_fn(params: Any, batch: dict[str, jax.Array]) -> jax.Array:
  logits = MLP().apply({"params": params}, batch["x"])
  logits = jkfac.register_softmax_cross_entropy(logits, batch["y"])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


def process_batch(step: int, rows: int, seed: int) -> dict[str, np.ndarray]:
  """This process's rows of the global batch of `step`: each process draws its own."""
  teacher = np.random.default_rng(seed).standard_normal((FEATURES, CLASSES))
  rng = np.random.default_rng([seed, step, jax.process_index()])
  x = rng.standard_normal((rows, FEATURES)).astype(np.float32)
  return {"x": x, "y": np.argmax(x @ teacher, axis=1).astype(np.int32)}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--num-processes", type=int, default=None,
                      help="processes in the job, one per host")
  parser.add_argument("--process-id", type=int, default=None,
                      help="this process's index, 0 .. num-processes - 1")
  parser.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                      help="process 0's address, the same for every process; 'auto': let "
                           "jax.distributed.initialize() detect the job (SLURM, Open MPI, TPU)")
  parser.add_argument("--cpu-devices", type=int, default=None, metavar="N",
                      help="run on CPU with N host devices per process (a try on one machine)")
  parser.add_argument("--steps", type=int, default=200,
                      help="(default: 200; at most 3 with JKFAC_SMOKE=1, a quick check)")
  parser.add_argument("--batch-size", type=int, default=256,
                      help="the global batch, split over all devices (default: 256)")
  parser.add_argument("--log-every", type=int, default=20, help="(default: 20)")
  parser.add_argument("--learning-rate", type=float, default=0.05, help="(default: 0.05)")
  parser.add_argument("--damping", type=float, default=0.1, help="(default: 0.1)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--checkpoint-dir", default=None, metavar="DIR",
                      help="save parameters and K-FAC state to DIR at the end (every process "
                           "calls save; orbax writes each array once)")
  args = parser.parse_args(argv)
  if os.environ.get("JKFAC_SMOKE"):
    args.steps = min(args.steps, 3)
  for flag in ("steps", "batch_size", "log_every"):
    if getattr(args, flag) < 1:
      parser.error(f"--{flag.replace('_', '-')} must be at least 1")
  given = [args.num_processes is not None, args.process_id is not None,
           args.coordinator not in (None, "auto")]
  if any(given) and not all(given):
    parser.error("give --num-processes, --process-id and --coordinator HOST:PORT together "
                 "(or --coordinator auto alone)")
  if args.coordinator == "auto" and any(given[:2]):
    parser.error("--coordinator auto detects --num-processes and --process-id")
  if args.num_processes is not None and not 0 <= args.process_id < args.num_processes:
    parser.error(f"--process-id {args.process_id} is not in 0 .. {args.num_processes - 1}")
  return args


def initialize(args: argparse.Namespace) -> None:
  """Connects this process to the others; must run before JAX uses any device."""
  if args.cpu_devices is not None:
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU across processes
  if args.coordinator == "auto":
    jax.distributed.initialize()
  elif args.coordinator is not None:
    jax.distributed.initialize(coordinator_address=args.coordinator,
                               num_processes=args.num_processes, process_id=args.process_id)


def main(argv: Sequence[str] | None = None) -> float:
  args = parse_args(argv)
  initialize(args)
  if args.batch_size % jax.device_count():
    raise SystemExit(f"--batch-size {args.batch_size} is not divisible by the "
                     f"{jax.device_count()} devices of the job")
  lead = jax.process_index() == 0
  if lead:
    print(f"{jax.process_count()} processes, {jax.device_count()} devices "
          f"({jax.local_device_count()} per process), jax {jax.__version__}", flush=True)

  mesh = jax.make_mesh((jax.device_count(),), (AXIS,))   # Explicit axes, JAX's default
  replicated, rows = NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec(AXIS))
  local_rows = args.batch_size // jax.process_count()

  def global_batch(step: int) -> dict[str, jax.Array]:
    local = process_batch(step, local_rows, args.seed)
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_process_local_data(rows, x), local)

  example = {"x": np.zeros((args.batch_size, FEATURES), np.float32),
             "y": np.zeros((args.batch_size,), np.int32)}
  params = MLP().init(jax.random.PRNGKey(args.seed), example["x"])["params"]
  tx = jkfac.kfac(loss_fn, example, learning_rate=args.learning_rate, damping=args.damping,
                  mesh=mesh, axis_name=AXIS)   # round-robin inverses over all devices
  # Every process computed the same initial values: make them global, replicated arrays.
  params, opt_state = jax.tree_util.tree_map(
      lambda x: jax.make_array_from_process_local_data(replicated, np.asarray(x)),
      (params, tx.init(params)))

  @jax.jit
  def train_step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params, batch=batch)
    return optax.apply_updates(params, updates), opt_state, loss

  for step in range(args.steps):
    params, opt_state, loss = train_step(params, opt_state, global_batch(step))
    if lead and (step % args.log_every == 0 or step == args.steps - 1):
      # The loss is replicated: any process can read it, without a collective.
      print(f"step {step:4d}  loss {float(loss.addressable_data(0)):.4f}", flush=True)
  if args.checkpoint_dir:
    jkfac.checkpoint.save(args.checkpoint_dir, {"params": params, "opt_state": opt_state},
                          force=True)
    if lead:
      print(f"saved to {args.checkpoint_dir}", flush=True)
  return float(loss.addressable_data(0))


if __name__ == "__main__":
  main()
