"""The Laplace posterior on a fitted curvature: evidence, prior precision, predictive.

With `F` the mean per-example curvature of the negative log-likelihood over `N`
examples (`fit`), a prior `N(0, τ⁻¹ I)` on the covered parameters and `θ` the trained
parameters, the posterior is approximated by `N(θ, (N F + τ I)⁻¹)`, and the log marginal
likelihood (evidence) by

    log p(D | τ) ≈ -N L(θ) - τ/2 ||θ||² + D/2 log τ - 1/2 log det(N F + τ I)

(MacKay 1992; Immer et al. 2021), `L` the mean negative log-likelihood with its
normalising constants and `D` the number of covered parameters.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jkfac.curvature import algebra
from jkfac.curvature.fitting import FittedCurvature
from jkfac.validation import check

Array = jax.Array
PyTree = Any

PREDICTIVE_METHODS = ("linearized", "mc")
LIKELIHOODS = ("classification", "regression")


def _squared_norm(curvature: FittedCurvature, params: PyTree) -> Array:
  """`||θ||²` over the parameters the curvature covers."""
  covered = algebra.restrict(curvature, params)
  return sum(jnp.sum(x.astype(curvature.num_examples.dtype) ** 2)
             for x in jax.tree_util.tree_leaves(covered))


def _evidence(values: Array, num_examples: Array, loss: Array, squared_norm: Array,
              prior_precision: Array) -> Array:
  """The Laplace log evidence from `F`'s eigenvalues (see the module docstring)."""
  # `D/2 log τ − ½ Σ log(N s + τ)` as one sum of `log1p`: in float32 the two terms
  # cancel to a few digits at large τ.
  return (-num_examples * loss - 0.5 * prior_precision * squared_norm
          - 0.5 * jnp.sum(jnp.log1p(num_examples * values / prior_precision)))


@jax.jit
def log_marginal_likelihood(curvature: FittedCurvature, params: PyTree, loss: float | Array,
                            prior_precision: float | Array) -> Array:
  """The Laplace approximation of `log p(D | τ)`.

  Args:
    curvature: `fit` of the negative log-likelihood over the `N` examples of `D`.
    params: the trained parameters `θ` (ideally the posterior mode for this prior).
    loss: the mean negative log-likelihood `L(θ)` over the same `N` examples, with its
      normalising constants (e.g. `+ 0.5 log 2π` per output for unit-variance squared error).
    prior_precision: `τ` > 0, of the prior `N(0, τ⁻¹ I)` on the covered parameters.
  """
  return _evidence(algebra.eigenvalues(curvature), curvature.num_examples, loss,
                   _squared_norm(curvature, params), jnp.asarray(prior_precision))


def optimize_prior_precision(curvature: FittedCurvature, params: PyTree, loss: float | Array,
                             bounds: tuple[float, float] = (1e-4, 1e6),
                             grid_size: int = 81, refine_steps: int = 40) -> Array:
  """The prior precision `τ` in `bounds` that maximises `log_marginal_likelihood` (with `θ`
  held fixed, as laplace-torch's post-hoc tuning does): the best of a log-spaced grid,
  then a golden-section search between its neighbours. Warns when the maximum is at a
  bound (widen `bounds`)."""
  check(0 < bounds[0] < bounds[1], f"bounds must be 0 < low < high, got {bounds}.")
  values, n = algebra.eigenvalues(curvature), curvature.num_examples
  norm = _squared_norm(curvature, params)
  evidence = jax.jit(jax.vmap(lambda log_tau: _evidence(values, n, loss, norm,
                                                        jnp.exp(log_tau))))
  grid = np.linspace(np.log(bounds[0]), np.log(bounds[1]), grid_size)
  found = np.asarray(evidence(jnp.asarray(grid, values.dtype)))
  check(bool(np.all(np.isfinite(found))), "The log marginal likelihood is not finite on the "
        "grid of prior precisions: check loss and the curvature.")
  best = int(np.argmax(found))
  if best in (0, grid_size - 1):
    warnings.warn(f"The marginal likelihood is largest at the bound tau={np.exp(grid[best]):.3g} "
                  f"of {bounds}; widen bounds.", stacklevel=2)
  low, high = grid[max(best - 1, 0)], grid[min(best + 1, grid_size - 1)]
  ratio = (np.sqrt(5) - 1) / 2
  for _ in range(refine_steps):  # golden section on log tau
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    fa, fb = np.asarray(evidence(jnp.asarray([a, b], values.dtype)))
    low, high = (low, b) if fa > fb else (a, high)
  return jnp.exp(jnp.asarray((low + high) / 2, values.dtype))


def predictive_samples(curvature: FittedCurvature, apply_fn: Callable[[PyTree, Any], Array],
                       params: PyTree, inputs: Any, key: Array,
                       prior_precision: float | Array, num_samples: int = 100,
                       method: str = "linearized") -> Array:
  """`num_samples` model outputs `(num_samples, *apply_fn(params, inputs).shape)` under the
  Laplace posterior: `f(θ) + J (θ_s - θ)` ("linearized", the GLM predictive) or
  `f(θ_s)` ("mc"), with `θ_s` drawn by `sample`. Samples are mapped one at a time, so
  memory is that of one forward pass (and its `jvp`)."""
  check(method in PREDICTIVE_METHODS, f"Unknown method {method!r}; expected one of "
        f"{PREDICTIVE_METHODS}.")
  draws = algebra.sample(curvature, params, key, prior_precision, num_samples)
  if method == "mc":
    return jax.lax.map(lambda p: apply_fn(p, inputs), draws)
  mean = apply_fn(params, inputs)

  def linear(draw: PyTree) -> Array:
    delta = jax.tree_util.tree_map(jnp.subtract, draw, params)
    return mean + jax.jvp(lambda p: apply_fn(p, inputs), (params,), (delta,))[1]

  return jax.lax.map(linear, draws)


def predictive(curvature: FittedCurvature, apply_fn: Callable[[PyTree, Any], Array],
               params: PyTree, inputs: Any, key: Array, prior_precision: float | Array,
               num_samples: int = 100, method: str = "linearized",
               likelihood: str = "classification") -> Array | tuple[Array, Array]:
  """The Laplace posterior predictive at `inputs`, by Monte Carlo over `predictive_samples`.

  "classification": the mean of the softmax of the sampled logits, `(..., classes)`.
  "regression": the mean and variance of the sampled outputs (the model's uncertainty
  only: add the observation noise's variance for that of a new target).
  """
  check(likelihood in LIKELIHOODS, f"Unknown likelihood {likelihood!r}; expected one of "
        f"{LIKELIHOODS}.")
  outputs = predictive_samples(curvature, apply_fn, params, inputs, key, prior_precision,
                               num_samples, method)
  if likelihood == "classification":
    return jnp.mean(jax.nn.softmax(outputs, axis=-1), axis=0)
  return jnp.mean(outputs, axis=0), jnp.var(outputs, axis=0)

