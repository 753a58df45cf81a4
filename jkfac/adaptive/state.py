"""Adaptive K-FAC's state, a plain pytree of arrays, and reading its diagnostics from any
optax state that holds it."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax

from jkfac.state import PreconditionState
from jkfac.validation import check

Array = jax.Array
PyTree = Any


class Diagnostics(NamedTuple):
  """What the last step did (see `diagnostics`).

  damping:     the λ of the last step (the state's `damping` is the next step's).
  rho:         the last reduction ratio ρ (updated on adaptation steps only; 0 before).
  alpha, mu:   the step's coefficients: `δ = α Δ + μ v` (fixed learning rate: α = −lr
               times the norm-constraint scale, μ the momentum).
  quad_change: M(δ), the undamped quadratic-model change of the step (every step with
               "qmodel*", else on adaptation steps only).
  update_norm: ‖δ‖₂.
  norm_scale:  the `norm_constraint` factor applied to Δ (1 when not clipped).
  """
  damping: Array
  rho: Array
  alpha: Array
  mu: Array
  quad_change: Array
  update_norm: Array
  norm_scale: Array


class AdaptiveState(NamedTuple):
  """The state of `adaptive`: a plain pytree of arrays.

  Attributes:
    count: steps taken, burn-in included (a skipped batch does not count).
    damping: the damping λ of the next step.
    velocity: "regular": the trace of Δ; "adam": the trace of g; "qmodel*": the
      previous update.
    preconditioner: the state of `jkfac.precondition` (its `damping` field is the damping
      the inverses were computed with, λ + l2_reg).
    diagnostics: what the last step did.
    rejected_steps: steps rejected because they raised the batch loss (or made it not
      finite); such a step leaves every other state as it was and raises λ.
    graft: with `graft="adam"`, the state of `optax.scale_by_adam` whose step
      lengths the updates take; else `optax.EmptyState()`.
  """
  count: Array
  damping: Array
  velocity: PyTree
  preconditioner: PreconditionState
  diagnostics: Diagnostics
  rejected_steps: Array
  graft: PyTree


DIAGNOSTICS = ("damping", "rho", "alpha", "mu", "quad_change", "update_norm", "norm_scale",
               "rejected_steps", "skipped_steps", "inverse_fallbacks")


def _find(tree: PyTree, kind: type) -> list:
  leaves = jax.tree_util.tree_leaves(tree, is_leaf=lambda s: isinstance(s, kind))
  return [leaf for leaf in leaves if isinstance(leaf, kind)]


def diagnostics(opt_state: PyTree) -> dict[str, Array]:
  """The last step's diagnostics of the one jkfac optimizer in `opt_state` (any nesting
  of optax states: chains, `inject_hyperparams`, `masked`).

  Keys `DIAGNOSTICS`: damping, rho, alpha, mu, quad_change, update_norm, norm_scale (see
  `Diagnostics`), rejected_steps (see `AdaptiveState`), skipped_steps, inverse_fallbacks
  (the preconditioner's counters). For a bare `jkfac.precondition` (or
  `jkfac.eigen_adam`): only damping (of the inverses), skipped_steps and
  inverse_fallbacks.

  Examples:
    >>> updates, opt_state = tx.update(grads, opt_state, params, batch=batch)
    >>> print({k: float(v) for k, v in jkfac.diagnostics(opt_state).items()})
  """
  found = _find(opt_state, AdaptiveState)
  if found:
    check(len(found) == 1, f"opt_state holds {len(found)} adaptive jkfac states; pass one.")
    state = found[0]
    counters = state.preconditioner
    return {**state.diagnostics._asdict(), "rejected_steps": state.rejected_steps,
            "skipped_steps": counters.skipped_steps,
            "inverse_fallbacks": counters.inverse_fallbacks}
  found = _find(opt_state, PreconditionState)
  check(len(found) == 1, f"opt_state holds {len(found)} jkfac preconditioner states; "
         "diagnostics needs exactly one.")
  return {"damping": found[0].damping, "skipped_steps": found[0].skipped_steps,
          "inverse_fallbacks": found[0].inverse_fallbacks}



def preconditioner_state(opt_state: PyTree) -> PreconditionState:
  """The state of the one `jkfac.precondition` in `opt_state` (any nesting of optax
  states: `jkfac.kfac`'s, chains, `inject_hyperparams`, `masked`), e.g. to read its
  statistics or counters.

  Examples:
    >>> jkfac.preconditioner_state(opt_state).skipped_steps
  """
  found = _find(opt_state, PreconditionState)
  check(len(found) == 1, f"opt_state holds {len(found)} jkfac preconditioner states; "
        "preconditioner_state needs exactly one.")
  return found[0]
