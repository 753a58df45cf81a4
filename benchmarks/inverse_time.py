"""Damped Cholesky inverses: jkfac's (matrix products and small XLA loops) against
jaxlib's LAPACK Cholesky and triangular solve, in one process.

    python -m benchmarks.inverse_time [--sizes 257,513,785] [--rounds 7]

Run it as users run code, without thread variables, then with OPENBLAS_NUM_THREADS=1:
jaxlib's CPU Cholesky runs in OpenBLAS, whose threads compete with XLA's own, so the
LAPACK route depends on that variable and jkfac's does not.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from jkfac import linalg


def lapack_inverse(matrix: jax.Array, damping: float) -> jax.Array:
  eye = jnp.eye(matrix.shape[0], dtype=matrix.dtype)
  inverse_factor = jax.scipy.linalg.solve_triangular(
      jnp.linalg.cholesky(matrix + damping * eye), eye, lower=True)
  return inverse_factor.T @ inverse_factor


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--sizes", default="257,513,785")
  parser.add_argument("--rounds", type=int, default=7)
  args = parser.parse_args()
  routes = {"lapack": jax.jit(lambda a: lapack_inverse(a, 1e-3)),
            "jkfac": jax.jit(lambda a: linalg.damped_inverse(a, 1e-3))}
  rng = np.random.default_rng(0)
  for n in map(int, args.sizes.split(",")):
    x = rng.standard_normal((4 * n, n)).astype(np.float32)
    matrix = jnp.asarray(x.T @ x / (4 * n))
    results = {name: route(matrix) for name, route in routes.items()}  # compile
    error = float(jnp.max(jnp.abs(results["jkfac"] - results["lapack"]))
                  / jnp.max(jnp.abs(results["lapack"])))
    times = {name: [] for name in routes}
    for _ in range(args.rounds):
      for name, route in routes.items():
        start = time.perf_counter()
        route(matrix).block_until_ready()
        times[name].append(time.perf_counter() - start)
    medians = {name: 1e3 * float(np.median(t)) for name, t in times.items()}
    print(f"{n:5d}x{n:<5d} lapack {medians['lapack']:8.1f} ms   jkfac {medians['jkfac']:8.1f} ms"
          f"   ratio {medians['lapack'] / medians['jkfac']:5.2f}   max rel. difference {error:.1e}")


if __name__ == "__main__":
  main()
