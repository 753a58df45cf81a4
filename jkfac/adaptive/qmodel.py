"""The quadratic model's maths: (α, μ), the model change, ρ and the LM damping rule.

Pure functions of small arrays; docs/concepts.md has the derivations.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

LOWER_RHO, UPPER_RHO = 0.25, 0.75  # Martens & Grosse (2015), §6.5


def solve_quadratic_model(curvature: Array, gram: Array, b: Array, damping: Array,
                          fixed_mu: Array | None = None,
                          max_mu: float | None = None) -> tuple[Array, Array]:
  """`(α, μ)` minimising `bᵀc + ½ cᵀ(C + λS)c` over `c = (α, μ)` (`curvature` C, `gram`
  S, both 2×2 over (Δ, v)); μ is `fixed_mu` if given. When v is zero (the first step)
  or parallel to Δ, the 1-D minimiser along Δ with μ = 0.

  With `max_mu`, μ is kept in `[0, max_mu]`: the model restricted to that interval is a
  convex quadratic in μ once α is minimised out, so the constrained minimiser is the
  clipped μ with its best α. A step whose α would then ascend along Δ (α > 0) falls back
  to the 1-D minimiser.
  """
  h = curvature + damping * gram
  alpha_1d = line_minimiser(b[0], h[0, 0])
  if fixed_mu is not None:
    mu_2d = fixed_mu
    usable = gram[1, 1] > 0
  else:
    det = h[0, 0] * h[1, 1] - h[0, 1] * h[1, 0]
    mu_2d = (-b[1] * h[0, 0] + b[0] * h[1, 0]) / det
    usable = (gram[1, 1] > 0) & (det > 1e-6 * h[0, 0] * h[1, 1])
  if max_mu is not None:
    mu_2d = jnp.clip(mu_2d, 0.0, max_mu)
  alpha_2d = -(b[0] + mu_2d * h[0, 1]) / h[0, 0]  # the best α for this μ
  usable = usable & (h[0, 0] > 0)
  if max_mu is not None:
    usable = usable & (alpha_2d <= 0)
  alpha = jnp.where(usable, alpha_2d, alpha_1d)
  return alpha.astype(jnp.float32), jnp.where(usable, mu_2d, 0.0).astype(jnp.float32)


def line_minimiser(slope: Array, curvature: Array) -> Array:
  """`α` minimising `slope·α + ½ curvature·α²`; 0 where the curvature is not positive."""
  return jnp.where(curvature > 0, -slope / curvature, 0.0)


def quadratic_change(coefficients: Array, curvature: Array, b: Array) -> Array:
  """`M(c) = bᵀc + ½ cᵀCc`: the model change of the step with coefficients `c`."""
  return coefficients @ b + 0.5 * coefficients @ curvature @ coefficients



def adapted_damping(damping: Array, rho: Array, decay: float | Array, interval: int | Array,
                    min_damping: float | Array, max_damping: float | Array) -> Array:
  """Levenberg–Marquardt: `λω` if ρ > 3/4, `λ/ω` if ρ < 1/4 (ω = decay ** interval),
  else λ (also for a ρ that is NaN), clipped to [min_damping, max_damping]."""
  omega = jnp.asarray(decay, damping.dtype) ** jnp.asarray(interval, damping.dtype)
  new = jnp.where(rho > UPPER_RHO, damping * omega,
                  jnp.where(rho < LOWER_RHO, damping / omega, damping))
  return jnp.clip(new, min_damping, max_damping).astype(damping.dtype)


def reduction_ratio(loss_change: Array, quad_change: Array) -> Array:
  """ρ; a loss that is not finite after the step gives −∞ (the damping then rises)."""
  return jnp.where(jnp.isfinite(loss_change), loss_change / quad_change, -jnp.inf)


def norm_scale(constraint: Array | float | None, learning_rate: Array,
               g_dot_delta: Array) -> Array:
  """`min(1, sqrt(C / (lr² gᵀΔ)))`, so that the step's squared F̂-norm is at most C."""
  if constraint is None:
    return jnp.ones([], jnp.float32)
  squared = learning_rate ** 2 * jnp.maximum(g_dot_delta, jnp.finfo(jnp.float32).tiny)
  return jnp.minimum(1.0, jnp.sqrt(constraint / squared)).astype(jnp.float32)

