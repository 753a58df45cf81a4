"""`jkfac.scale_by_eigen_adam`: Adam in the eigenbases of K-FAC's factors (SOAP's idea).

A layer's gradient matrix `g` (inputs × outputs, as the blocks see it) is rotated into the
eigenbases of its Kronecker factors, `g̃ = Q_Aᵀ g Q_G`, where Adam keeps its two moments;
the step is rotated back, `Q_A (m̃ / (√ṽ + ε)) Q_Gᵀ`. The factors are K-FAC's (statistics
every `cov_update_every` steps, as `jkfac.precondition` estimates them), their
eigendecompositions are refreshed every `invert_every` steps, and in between the
per-coordinate second moment keeps a stale basis useful (Vyas et al. 2024, SOAP; George et
al. 2018, EKFAC). When a basis changes, the first moment is rotated into the new one
exactly, and the second moment becomes the diagonal of the old diagonal rotated. A factor
kept diagonal (`max_factor_dim`, "kron_in_diag", "kron_out_diag") is its own eigenbasis;
one kept block-diagonal (`factor_block_size`) has one eigenbasis per block.
Every parameter outside a Kronecker-factored layer (norms, embeddings, generic parameters)
gets plain Adam. See docs/usage.md.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jkfac import interpreter, layer_matrices, layers, linalg, masking, parallel, tags
from jkfac.blocks import blocked
from jkfac.config import PreconditionConfig, state_dtype, with_curvature_settings
from jkfac.layer_info import LayerInfo, Trace
from jkfac.preconditioner import count_step, inverses_due, refresh_statistics
from jkfac.skipping import keep_unless, tree_finite, zero_if
from jkfac.state import PreconditionState, check_state, init_state
from jkfac.validation import abstract, check, is_number

Array = jax.Array
PyTree = Any

# The approximations whose statistics are two Kronecker factors "A" and "G".
KRONECKER_APPROXIMATIONS = ("kron", "kron_indep", "kron_reduce", "kron_in_diag",
                            "kron_out_diag")
# Settings of `PreconditionConfig` that `scale_by_eigen_adam` does not take: it inverts
# nothing (no damping, method or placement) and sees every parameter.
UNSUPPORTED_SETTINGS = ("inverse_method", "placement", "example_params")


class Moments(NamedTuple):
  """One Adam moment: per Kronecker-factored layer in its eigenbasis (`layers`), and for
  every other parameter as optax keeps it (`others`: the parameters' tree, with
  `optax.MaskedNode()` at the leaves of those layers)."""
  layers: dict[str, Array]
  others: PyTree


class EigenAdamState(NamedTuple):
  """The state of `scale_by_eigen_adam`: a plain pytree.

  Attributes:
    preconditioner: K-FAC's statistics of the Kronecker-factored layers, as
      `jkfac.precondition` keeps them; its `inverses` hold each layer's eigenbases
      ("A": `Q_A`, "G": `Q_G`; a diagonal factor's entry is unused), its `count` the
      steps taken (Adam's bias correction) and `skipped_steps` the batches skipped as
      not finite.
    mu, nu: Adam's first and second moments.
  """
  preconditioner: PreconditionState
  mu: Moments
  nu: Moments


def eigen_layers(trace: Trace) -> Trace:
  """`trace` restricted to the layers Adam runs in the eigenbasis of: dense and conv
  layers with two Kronecker factors and one feature group (and, if stacked by a scan,
  whole factors); the rest of the parameters are left to plain Adam."""
  chosen = tuple(layer for layer in trace.layers
                 if (layer.kind == "dense" or layer.kind in tags.CONV_KINDS)
                 and layer.approx in KRONECKER_APPROXIMATIONS
                 and layers.feature_groups(layer) == 1
                 and not (layer.stack and layer.block_size is not None))
  return dataclasses.replace(trace, layers=chosen, generic=())


def _warn_if_left_to_adam(full: Trace, chosen: Trace) -> None:
  """Warns naming the dense and conv layers of `full` that `chosen` leaves to plain Adam
  (another approximation than two Kronecker factors, a grouped conv, a scanned layer
  with block-diagonal factors)."""
  kept = {layer.name for layer in chosen.layers}
  left = [f"{layer.name} ({layer.approx})" for layer in full.layers if layer.name not in kept
          and (layer.kind == "dense" or layer.kind in tags.CONV_KINDS)]
  if left:
    warnings.warn(f"jkfac.eigen_adam runs plain Adam, not Adam in an eigenbasis, on "
                  f"{', '.join(left)}: layers whose approximation is not one of "
                  f"{KRONECKER_APPROXIMATIONS} (\"ekfac\" keeps bases of its own), grouped "
                  "convs and scanned layers with block-diagonal factors "
                  "(factor_block_size=None keeps a scanned layer's factors whole).",
                  stacklevel=3)


def _covered(trace: Trace) -> frozenset[int]:
  """The parameter leaves of `trace`'s layers."""
  return frozenset(i for layer in trace.layers for i in (layer.weight, layer.bias)
                   if i is not None)


def _is_diagonal(factor: Array, layer: LayerInfo) -> bool:
  """Whether a factor is kept as its diagonal: its own eigenbasis, never rotated."""
  return factor.ndim == 1 + bool(layer.stack)


def _transpose(q: Array) -> Array:
  return jnp.swapaxes(q, -1, -2)


def _left(q: Array, x: Array, layer: LayerInfo) -> Array:
  """`q @ x` for `q` a matrix, one per slice of a stacked layer, or diagonal blocks."""
  return q @ x if layer.stack else blocked.apply_left(q, x)


def _right(x: Array, q: Array, layer: LayerInfo) -> Array:
  return x @ q if layer.stack else blocked.apply_right(x, q)


def rotate_in(bases: dict[str, Array], layer: LayerInfo, matrix: Array) -> Array:
  """`Q_Aᵀ matrix Q_G`, skipping a side whose factor is diagonal."""
  if not _is_diagonal(bases["A"], layer):
    matrix = _left(_transpose(bases["A"]), matrix, layer)
  if not _is_diagonal(bases["G"], layer):
    matrix = _right(matrix, bases["G"], layer)
  return matrix


def rotate_out(bases: dict[str, Array], layer: LayerInfo, matrix: Array) -> Array:
  """`Q_A matrix Q_Gᵀ`, skipping a side whose factor is diagonal."""
  if not _is_diagonal(bases["A"], layer):
    matrix = _left(bases["A"], matrix, layer)
  if not _is_diagonal(bases["G"], layer):
    matrix = _right(matrix, _transpose(bases["G"]), layer)
  return matrix


def _eigenvectors(factor: Array, features: int, layer: LayerInfo) -> Array:
  """The eigenvectors of a factor: of the matrix (of each slice), or of each diagonal
  block over its real features (a padded last block's padding keeps the standard basis,
  never mixed into the real features)."""
  count, side = factor.shape[0], factor.shape[-1]
  blocked = not layer.stack and factor.ndim == 3
  last = features - (count - 1) * side if blocked else side  # the last block's real features
  if last == side:
    return linalg.eigh(factor)[1]
  padded = jnp.eye(side, dtype=factor.dtype).at[:last, :last].set(
      linalg.eigh(factor[-1, :last, :last])[1])
  return jnp.concatenate([linalg.eigh(factor[:-1])[1], padded[None]], axis=0)


def eigenbases(statistics: dict[str, Array], ema_weight: Array, old: dict[str, Array],
               layer: LayerInfo) -> dict[str, Array]:
  """The eigenvectors of the layer's bias-corrected factors (a diagonal factor's entry
  kept as it is)."""
  features = dict(zip(("A", "G"), layers.matrix_shape(layer)))
  return {name: old[name] if _is_diagonal(factor, layer) else _eigenvectors(
              factor / ema_weight, features[name], layer).astype(old[name].dtype)
          for name, factor in statistics.items()}


def change_basis(old: dict[str, Array], new: dict[str, Array], layer: LayerInfo,
                 mu: Array, nu: Array) -> tuple[Array, Array]:
  """The moments of one layer moved from basis `old` to `new`: `mu` exactly (`R_A mu
  R_Gᵀ` with `R = Q_newᵀ Q_old`), `nu` as the diagonal of the rotated diagonal matrix
  (`R_A² nu R_G²ᵀ`, entrywise squares)."""
  if not _is_diagonal(new["A"], layer):
    rotation = _transpose(new["A"]) @ old["A"]
    mu, nu = _left(rotation, mu, layer), _left(rotation ** 2, nu, layer)
  if not _is_diagonal(new["G"], layer):
    rotation = _transpose(_transpose(new["G"]) @ old["G"])
    mu, nu = _right(mu, rotation, layer), _right(nu, rotation ** 2, layer)
  return mu, nu


def _refresh_bases(trace: Trace, state: EigenAdamState, preconditioner: PreconditionState
                   ) -> EigenAdamState:
  """New eigenbases from `preconditioner`'s statistics, with the moments moved into them;
  a layer whose new bases are not finite keeps its old ones (and is counted)."""
  bases, mu, nu = dict(preconditioner.inverses), dict(state.mu.layers), dict(state.nu.layers)
  fallbacks = preconditioner.inverse_fallbacks
  for layer in trace.layers:
    old = preconditioner.inverses[layer.name]
    new = eigenbases(preconditioner.statistics[layer.name], preconditioner.ema_weight, old,
                     layer)
    finite = tree_finite(new)
    new = keep_unless(~finite, new, old)
    fallbacks = fallbacks + (~finite).astype(fallbacks.dtype)
    bases[layer.name] = new
    mu[layer.name], nu[layer.name] = change_basis(old, new, layer, mu[layer.name],
                                                  nu[layer.name])
  preconditioner = preconditioner._replace(inverses=bases, inverse_fallbacks=fallbacks)
  return state._replace(preconditioner=preconditioner, mu=state.mu._replace(layers=mu),
                        nu=state.nu._replace(layers=nu))


def _others(params: PyTree, covered: frozenset[int], fill: Callable[[Array], Array]
            ) -> PyTree:
  """`params`' tree with `fill(leaf)` outside `covered` and `optax.MaskedNode()` in it."""
  leaves, treedef = jax.tree_util.tree_flatten(params)
  return treedef.unflatten([optax.MaskedNode() if i in covered else fill(x)
                            for i, x in enumerate(leaves)])


def _moments(trace: Trace, params: PyTree) -> Moments:
  """Zero moments: the layers' in the curvature's dtype (float32 for low-precision
  parameters), the others' in the parameters' (as optax's)."""
  leaves, dtype = jax.tree_util.tree_leaves(params), state_dtype(params)
  return Moments({layer.name: jnp.zeros(jnp.shape(layer_matrices.layer_matrix(layer, leaves)),
                                        dtype) for layer in trace.layers},
                 _others(params, _covered(trace), jnp.zeros_like))


def init(config: PreconditionConfig, params: PyTree) -> EigenAdamState:
  """Zero statistics and moments, the standard basis for every layer."""
  check(not masking.is_masked(params), "jkfac.scale_by_eigen_adam does not take a subset "
        "of the parameters (optax.masked / multi_transform): give it all of them.")
  preconditioner = init_state(config, params, generic_consequence="plain Adam")
  full = config.trace(abstract(params), config.example_batch)
  trace = eigen_layers(full)
  _warn_if_left_to_adam(full, trace)
  names = [layer.name for layer in trace.layers]
  preconditioner = preconditioner._replace(  # kron's identity inverses: the standard basis
      statistics={name: preconditioner.statistics[name] for name in names},
      inverses={name: preconditioner.inverses[name] for name in names})
  params = jax.tree_util.tree_map(jnp.asarray, params)
  # Two calls: a donated state (`donate_argnums`) may not hold one buffer twice.
  return EigenAdamState(preconditioner, _moments(trace, params), _moments(trace, params))


def update(config: PreconditionConfig, b1: float, b2: float, eps: float, grads: PyTree,
           state: EigenAdamState, params: PyTree, batch: PyTree,
           curvature: interpreter.Linearization | None = None
           ) -> tuple[PyTree, EigenAdamState]:
  """One step: statistics and eigenbases when due, then Adam in the bases; a batch that
  is not finite changes nothing but `skipped_steps`."""
  check(jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(params),
        "The gradients and the parameters passed to jkfac have different tree structures.")
  trace = eigen_layers(config.trace(params, batch))
  check_state(trace, state.preconditioner)
  if config.device_axis is not None:
    parallel.check_axis(config.device_axis)
    grads = parallel.pmean(grads, config.device_axis)
  old = state.preconditioner
  preconditioner, finite = refresh_statistics(config, trace, old, params, batch, curvature,
                                              tree_finite(grads))
  new = jax.lax.cond(finite & inverses_due(config, old.count),
                     functools.partial(_refresh_bases, trace),
                     lambda s, p: s._replace(preconditioner=p), state, preconditioner)
  adam = functools.partial(_adam, b1, b2, eps, optax.safe_increment(old.count))
  leaves, treedef = jax.tree_util.tree_flatten(grads)
  out, mu, nu = list(leaves), {}, {}
  for layer in trace.layers:  # in the layer's eigenbasis
    bases = new.preconditioner.inverses[layer.name]
    g = layer_matrices.layer_matrix(layer, leaves).astype(new.mu.layers[layer.name].dtype)
    direction, mu[layer.name], nu[layer.name] = adam(
        rotate_in(bases, layer, g), new.mu.layers[layer.name], new.nu.layers[layer.name])
    layer_matrices.place_matrix(layer, rotate_out(bases, layer, direction), out)
  mu_others, nu_others = (treedef.flatten_up_to(m.others) for m in (new.mu, new.nu))
  covered = _covered(trace)
  for i, g in enumerate(leaves):  # every other parameter: plain Adam
    if i not in covered:
      out[i], mu_others[i], nu_others[i] = adam(g, mu_others[i], nu_others[i])
  stepped = EigenAdamState(new.preconditioner, Moments(mu, treedef.unflatten(mu_others)),
                           Moments(nu, treedef.unflatten(nu_others)))
  kept = keep_unless(~finite, stepped, state)
  kept = kept._replace(preconditioner=count_step(kept.preconditioner, old, finite))
  return zero_if(~finite, treedef.unflatten(out)), kept


def _adam(b1: float, b2: float, eps: float, step: Array, g: Array, mu: Array, nu: Array
          ) -> tuple[Array, Array, Array]:
  """Adam's bias-corrected direction `m / (√v + ε)` at `step` (in `g`'s dtype), and the
  new moments."""
  mu = b1 * mu + (1 - b1) * g
  nu = b2 * nu + (1 - b2) * g * g
  return _adam_direction(mu, nu, b1, b2, eps, step).astype(g.dtype), mu, nu


def _adam_direction(mu: Array, nu: Array, b1: float, b2: float, eps: float, step: Array
                    ) -> Array:
  mu_hat = optax.tree_utils.tree_bias_correction(mu, b1, step)
  nu_hat = optax.tree_utils.tree_bias_correction(nu, b2, step)
  return mu_hat / (jnp.sqrt(nu_hat) + eps)


def scale_by_eigen_adam(loss_fn: Callable[..., Any], example_batch: PyTree, *,
                        b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8,
                        **settings: Any) -> optax.GradientTransformationExtraArgs:
  """Rescales updates by Adam run in the eigenbases of K-FAC's Kronecker factors.

  Args:
    loss_fn: `loss_fn(params, batch)`, with its layers tagged or recognised and its loss
      registered, as for `jkfac.precondition`.
    example_batch: a batch, or `jax.ShapeDtypeStruct`s with its shapes and dtypes.
    b1: the decay rate of Adam's first moment.
    b2: the decay rate of Adam's second moment.
    eps: the constant added to Adam's denominator.
    **settings: curvature settings of `jkfac.PreconditionConfig` (`cov_update_every`,
      `invert_every` for the eigendecompositions, `warm_start`, `estimation`,
      `approximations`, `max_factor_dim`, `axis_name`, ...), except
      `UNSUPPORTED_SETTINGS`.

  Returns:
    An optax transformation: `update(grads, state, params, batch=batch)`, optionally with
    `curvature=` from `jkfac.value_and_grad`. A batch whose gradients or statistics are
    not finite gives a zero update and changes nothing but `skipped_steps`.
  """
  for name in UNSUPPORTED_SETTINGS:
    check(name not in settings, f"jkfac.scale_by_eigen_adam does not take {name!r}.")
  # Python numbers are checked; arrays (from `optax.inject_hyperparams`) may be traced.
  check(all(0 <= b < 1 for b in (b1, b2) if is_number(b)) and not (is_number(eps) and eps < 0),
        f"b1 and b2 must be in [0, 1) and eps >= 0; got b1={b1}, b2={b2}, eps={eps}.")
  config = PreconditionConfig(loss_fn, example_batch, damping=1.0, **settings)

  @parallel.on_auto_axes
  def update_fn(updates, state, params=None, *, batch=None, curvature=None, **extra_args):
    del extra_args
    check(params is not None and batch is not None,
          "jkfac needs the parameters and the batch: "
          "tx.update(grads, state, params, batch=batch).")
    return update(config, b1, b2, eps, updates, state, params, batch, curvature)

  return optax.GradientTransformationExtraArgs(functools.partial(init, config), update_fn)


with_curvature_settings(scale_by_eigen_adam, {}, UNSUPPORTED_SETTINGS)
