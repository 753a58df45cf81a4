"""Times the pmapped K-FAC step on 1, 2, 4 and 8 host devices, and its inverse work.

    python -m benchmarks.parallel [--model mlp|convnet|tiny] [--batch 256] [--rounds 5]
        [--devices 1,2,4,8] [--placements round_robin,replicated]

Sets `XLA_FLAGS=--xla_force_host_platform_device_count=8` (and `JAX_PLATFORMS=cpu`
unless set) before importing JAX, so one process sees 8 CPU "devices". For each
device count `n` the same global batch (default 256) is split `n` ways and the step
`grad -> pmean -> tx.update` runs under `jax.pmap`, with

  * `invert_every=1`: every step recomputes every factor inverse, and
  * `invert_every=10**9`: no step after the first inverts (statistics still every step),

for `placement="round_robin"` (each factor inverted by one device, shared by psum)
and `placement="replicated"` (every device inverts every factor). Their difference
is the time the inverses add to a step: the figure to compare between placements.

What the numbers mean. The 8 "devices" are threads of one process sharing this
machine's cores (`os.cpu_count()` is printed). Replicated placement multiplies the
inverse work by `n`; round robin keeps it at one copy per factor whatever `n`, so
the gap between the two columns is the work round robin saves, which is what a
real multi-accelerator run saves too. The wall-clock gain from *spreading* the
inverses is bounded twice: by the cores (on 2 cores at most ~2x, less when XLA's
own intra-op threads already use them), and by the largest single factor, since
a factor is never split -- `ideal` in the second table is total cost / the most
loaded device's cost, from `assign_round_robin`'s n^3 cost model and from measured
one-factor inverse times. The forward/backward part of the step does not shrink
with `n` here either: all devices share the same cores. On real accelerators each
device has its own compute, and the step time, not just the inverse share, drops.
Round robin also adds communication: the `psum` that shares the inverses is an
all-reduce of every inverse (1.2M floats for the MLP, ~15 ms on 8 host devices),
and the statistics' `pmean` is one of the same size on every step (in `no-inv`).
On a 2-core host, expect round robin's inverse time to stay near the 1-device
figure while replicated's grows faster than `n` (8 device threads each running
multi-threaded factorizations on 2 cores); CPU time shows the work saved.

Rounds interleave the configurations and figures are medians over rounds; run it on
an idle machine, as other processes on the cores skew every column.
"""

from __future__ import annotations

import os
import sys

DEVICES = 8
if "jax" in sys.modules:
  raise RuntimeError("benchmarks/parallel.py must set XLA_FLAGS before JAX is imported.")
os.environ["XLA_FLAGS"] = " ".join(
    [f for f in os.environ.get("XLA_FLAGS", "").split()
     if not f.startswith("--xla_force_host_platform_device_count")]
    + [f"--xla_force_host_platform_device_count={DEVICES}"])
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import flax.jax_utils  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jkfac  # noqa: E402
from jkfac.blocks import REGISTRY  # noqa: E402
from benchmarks.step_breakdown import MODELS  # noqa: E402  (MLP, convnet, tiny MLP)
from benchmarks.step_time import make_loss  # noqa: E402

AXIS = "batch"
NO_INVERSION = 10 ** 9
PLACEMENTS = ("round_robin", "replicated")
# The block of each factor name in `state.inverses[layer]`.
FACTOR_BLOCKS = {"A": "kron", "G": "kron", "F": "full", "diagonal": "diagonal"}


def make_step(loss_fn, tx):
  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    grads = jax.lax.pmean(grads, AXIS)   # jkfac would pmean them too; Adam would need it
    updates, opt_state = tx.update(grads, opt_state, params, batch=batch)
    return optax.apply_updates(params, updates), opt_state, jax.lax.pmean(loss, AXIS)
  return step


def factor_list(state) -> list[tuple[str, str, tuple[int, ...]]]:
  """`(layer, factor, shape)` of every inverse, in jkfac's task order."""
  inverses = jkfac.preconditioner_state(state).inverses
  return [(layer, factor, inverses[layer][factor].shape)
          for layer in inverses for factor in inverses[layer]]


def model_cost(factor: str, shape) -> float:
  """jkfac's cost model: n^3 for a matrix, the size for an entrywise block."""
  return float(np.prod(shape)) if REGISTRY["dense", FACTOR_BLOCKS[factor]].entrywise else float(shape[0]) ** 3


def measured_costs(factors, reduce, repeats: int) -> list[float]:
  """Seconds to invert each factor alone, jitted on one device.

  The factors are timed in turn, `repeats` times, so that a burst of load from other
  processes hits every factor alike rather than one.
  """
  jobs = []
  for _, factor, shape in factors:
    block = REGISTRY["dense", FACTOR_BLOCKS[factor]]
    rng = np.random.default_rng(0)
    if block.entrywise:
      matrix = np.abs(rng.standard_normal(shape))
    else:
      x = rng.standard_normal((shape[0], 2 * shape[0]))
      matrix = x @ x.T / x.shape[1]
    invert = jax.jit(lambda m, block=block: block.invert(m, jnp.float32(1e-2)))
    matrix = jnp.asarray(matrix, jnp.float32)
    invert(matrix).block_until_ready()
    jobs.append((invert, matrix, []))
  for _ in range(repeats):
    for invert, matrix, samples in jobs:
      start = time.perf_counter()
      invert(matrix).block_until_ready()
      samples.append(time.perf_counter() - start)
  return [reduce(samples) for _, _, samples in jobs]


def device_loads(costs, num_devices):
  owners = jkfac.parallel.assign_round_robin(costs, num_devices)
  loads = [0.0] * num_devices
  for cost, owner in zip(costs, owners):
    loads[owner] += cost
  return owners, loads


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", choices=tuple(MODELS), default="mlp")
  parser.add_argument("--batch", type=int, default=256, help="global batch, split over devices")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--steps", type=int, default=5, help="steps timed per round")
  parser.add_argument("--devices", default="1,2,4,8")
  parser.add_argument("--placements", default=",".join(PLACEMENTS))
  parser.add_argument("--repeats", type=int, default=20,
                      help="timings of each factor's inverse alone (default: 20)")
  parser.add_argument("--stat", choices=("min", "median"), default="min",
                      help="over rounds: min (least disturbed round; for shared machines) or median")
  args = parser.parse_args(argv)
  counts = [int(n) for n in args.devices.split(",")]
  placements = tuple(p for p in args.placements.split(",") if p)
  if not placements or set(placements) - set(PLACEMENTS):
    parser.error(f"--placements: choose from {','.join(PLACEMENTS)}")
  assert jax.device_count() >= max(counts), jax.devices()

  model = MODELS[args.model]()
  key = jax.random.PRNGKey(0)
  batch = {"image": jax.random.uniform(key, (args.batch, 28, 28, 1)),
           "label": jax.random.randint(key, (args.batch,), 0, 10)}
  params = model.init(key, batch["image"])["params"]
  loss_fn = make_loss(model)

  load_before = os.getloadavg()[0]
  runs = {}
  for n in counts:
    print(f"compiling for {n} devices", file=sys.stderr, flush=True)
    devices = jax.devices()[:n]
    local_batch = jkfac.parallel.split_batch(batch, n)
    for placement in placements:
      for invert_every in (1, NO_INVERSION):
        tx = jkfac.kfac(loss_fn, jax.tree_util.tree_map(lambda x: x[0], local_batch),
                        learning_rate=1e-3, damping=1e-1, invert_every=invert_every,
                        axis_name=AXIS, placement=placement)
        step = jax.pmap(make_step(loss_fn, tx), axis_name=AXIS, devices=devices)
        state = flax.jax_utils.replicate((params, tx.init(params)), devices, axis_name=AXIS)
        start = time.perf_counter()
        p, s, loss = step(*state, local_batch)   # compiles; inverts once in both settings
        p, s, loss = step(p, s, local_batch)
        jax.block_until_ready(loss)
        runs[n, placement, invert_every] = dict(
            step=step, state=(p, s), batch=local_batch, times=[], cpu=[],
            compile=time.perf_counter() - start)
  # x[0], not flax.jax_utils.unreplicate: on a 1-device pmap among 8 devices the latter
  # sees a "fully replicated" sharding and keeps the leading axis.
  first_state = jax.tree_util.tree_map(lambda x: x[0], runs[counts[0], placements[0], 1]["state"][1])
  factors = factor_list(first_state)

  for round_ in range(args.rounds):
    print(f"round {round_ + 1}/{args.rounds}", file=sys.stderr, flush=True)
    for run in runs.values():
      p, s = run["state"]
      start, start_cpu = time.perf_counter(), time.process_time()
      for _ in range(args.steps):
        p, s, loss = run["step"](p, s, run["batch"])
      jax.block_until_ready(loss)
      run["times"].append((time.perf_counter() - start) / args.steps)
      run["cpu"].append((time.process_time() - start_cpu) / args.steps)
      run["state"] = (p, s)
  reduce = min if args.stat == "min" else statistics.median
  ms = {config: 1e3 * reduce(run["times"]) for config, run in runs.items()}
  cpu_ms = {config: 1e3 * reduce(run["cpu"]) for config, run in runs.items()}

  name = {"mlp": "MLP 784-512-256-10", "convnet": "convnet", "tiny": "MLP 784-32-10"}[args.model]
  print(f"\n{name}, global batch {args.batch}, {len(jax.devices())} host devices on "
        f"{os.cpu_count()} CPU cores, {args.stat} of {args.rounds} rounds x {args.steps} steps; "
        f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
  print("ms per step. step: inverting every step; no-inv: no inversion; inv = step - no-inv,"
        "\nthe inverse time; x1: inv over inv on 1 device, same placement. wall: wall-clock;"
        "\ncpu: CPU time of the process (all its threads), the work done whatever the load.")
  for label, table in (("wall", ms), ("cpu", cpu_ms)):
    header = f"{label:>4s} {'devices':>7s} {'per-dev':>7s}"
    for placement in placements:
      header += f" | {placement + ' step':>16s} {'no-inv':>7s} {'inv':>7s} {'x1':>5s}"
    print(header)
    for n in counts:
      line = f"{'':4s} {n:7d} {args.batch // n:7d}"
      for placement in placements:
        step_ms, base_ms = table[n, placement, 1], table[n, placement, NO_INVERSION]
        inverse_ms = step_ms - base_ms
        first = table[counts[0], placement, 1] - table[counts[0], placement, NO_INVERSION]
        line += f" | {step_ms:16.1f} {base_ms:7.1f} {inverse_ms:7.1f} {inverse_ms / first:5.2f}"
      print(line)

  model_costs = [model_cost(factor, shape) for _, factor, shape in factors]
  seconds = measured_costs(factors, reduce, args.repeats)
  print(f"\nfactors ({len(factors)}), in task order, with the single-device inverse time:")
  for (layer, factor, shape), cost, sec in zip(factors, model_costs, seconds):
    print(f"  {layer}/{factor:8s} {str(shape):12s} cost {cost:10.3g}   {1e3 * sec:7.2f} ms")
  print(f"  total {1e3 * sum(seconds):.2f} ms for one copy of every inverse")
  print("\nround robin: how the inverses divide (owner of each factor, in the order above);"
        "\nideal = total / most loaded device, by jkfac's cost model and by measured time")
  print(f"{'devices':>7s} {'owners':>24s} {'ideal (model)':>14s} {'ideal (measured)':>17s}"
        f" {'max device ms':>14s}")
  for n in counts:
    owners, loads = device_loads(model_costs, n)
    measured = [0.0] * n
    for sec, owner in zip(seconds, owners):
      measured[owner] += sec
    print(f"{n:7d} {str(list(owners)):>24s} {sum(loads) / max(loads):14.2f} "
          f"{sum(measured) / max(measured):17.2f} {1e3 * max(measured):14.2f}")
  compile_s = sum(run["compile"] for run in runs.values())
  print(f"\n(compiling {len(runs)} steps took {compile_s:.0f} s)")


if __name__ == "__main__":
  main()
