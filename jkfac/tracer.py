"""Find the tags in a loss function's jaxpr and collect per-layer statistics.

`trace_layers` walks the jaxpr of `loss_fn(params, batch)` once, at trace time, and
returns a static table: every tagged layer (its kind, approximation and the paths
of its parameters in `params`), every registered loss, and the "generic" parameters
no layer covers. With `auto_register`, untagged layers are tagged first
(`jkfac/patterns.py`).

`linearize` evaluates the same jaxpr with a small interpreter that, at each layer
tag, records the layer's inputs and adds a zero "perturbation" to its output;
`value_and_grad` does the same inside the user's gradient pass. `statistics` pulls
the loss cotangents (see `losses.py`) back to those zeros: in one backward pass,
the output gradients that the curvature blocks need.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

from jkfac import jaxprs, losses, patterns, tags

Array = jax.Array
PyTree = Any
LossFn = Callable[..., Any]


@dataclasses.dataclass(frozen=True)
class LayerInfo:
  """A tagged layer: static facts, no arrays.

  `weight` and `bias` are indices into the flattened `params` leaves; `name` is the
  weight's parent path (e.g. "Dense_0"), which keys the layer in the state.
  """
  name: str
  kind: str
  approx: str
  weight: int
  bias: int | None
  input_shape: tuple[int, ...]
  output_shape: tuple[int, ...]
  weight_shape: tuple[int, ...]
  conv: tags.ConvParams | None


@dataclasses.dataclass(frozen=True)
class LossInfo:
  kind: str
  weight: float


@dataclasses.dataclass(frozen=True)
class Trace:
  """What `loss_fn` holds: tagged layers, losses, and the parameters of no layer.

  `generic` lists the `params` leaves that no layer tag covers (among them those
  marked by `register_generic`), each as a layer of kind "generic"; K-FAC gives them a
  diagonal block estimated from their gradients.
  """
  layers: tuple[LayerInfo, ...]
  losses: tuple[LossInfo, ...]
  param_paths: tuple[str, ...]
  generic: tuple[LayerInfo, ...] = ()


class LayerStatistics(NamedTuple):
  """What one layer's curvature block is built from, for one batch.

  inputs:       the layer's input `x` as tagged, shape `(batch, ...)`; None for a
                generic parameter.
  output_grads: backpropagated loss cotangents at the layer's output, with a leading
                axis of estimator columns: `(columns, *output_shape)`; for a generic
                parameter, at the parameter itself: `(columns, *param_shape)`.
  """
  inputs: Array
  output_grads: Array


# --- walking the jaxpr -------------------------------------------------------------


def _is_tag(eqn: jcore.JaxprEqn) -> bool:
  return eqn.primitive in (tags.layer_tag_p, tags.loss_tag_p)


def _is_generic_tag(eqn: jcore.JaxprEqn) -> bool:
  """A `jkfac.register_generic` tag: it claims its parameter and is no layer."""
  return eqn.primitive is tags.layer_tag_p and eqn.params["kind"] == "generic"


def _claimed(eqn: jcore.JaxprEqn, operand_origin: list) -> list:
  """The `params` leaves a layer tag claims: its parameter operands (a generic tag's own)."""
  return operand_origin[:1] if _is_generic_tag(eqn) else operand_origin[2:]


def _has_tags(jaxpr: jcore.Jaxpr) -> bool:
  for eqn in jaxpr.eqns:
    if _is_tag(eqn):
      return True
    for sub in jcore.jaxprs_in_params(eqn.params):
      if _has_tags(sub):
        return True
  return False


def _inlined(eqn: jcore.JaxprEqn) -> jcore.ClosedJaxpr | None:
  """The sub-jaxpr to walk into, or None for an equation without tags."""
  if not any(_has_tags(sub) for sub in jcore.jaxprs_in_params(eqn.params)):
    return None
  call = jaxprs.call_jaxpr(eqn)
  if call is None:
    raise NotImplementedError(
        f"jkfac found K-FAC tags inside a `{eqn.primitive.name}` equation; tags inside "
        "control flow (scan, while, cond) are not supported. Tag the layers outside it.")
  _, sub, inner = call
  return sub if isinstance(sub, jcore.ClosedJaxpr) else jcore.ClosedJaxpr(inner, ())


def _read(env: dict, var: Any) -> Any:
  return env[var] if jaxprs.is_var(var) else var.val


def _find_tags(jaxpr: jcore.Jaxpr, origin: dict) -> list[tuple[jcore.JaxprEqn, list]]:
  """Tag equations in evaluation order, each with the params-leaf origin of its operands.

  `origin` maps variables to the index of the `params` leaf they are (up to casts).
  """
  found = []
  for eqn in jaxpr.eqns:
    if _is_tag(eqn):
      found.append((eqn, [origin.get(v) if jaxprs.is_var(v) else None for v in eqn.invars]))
    elif (sub := _inlined(eqn)) is not None:
      found += _find_tags(sub.jaxpr, jaxprs.inner_origin(eqn, sub.jaxpr, origin))
    else:
      jaxprs.track_parameters(eqn, origin)
  return found


def _evaluate(jaxpr: jcore.Jaxpr, consts: Sequence[Any], args: Sequence[Any],
              on_tag: Callable[[jcore.JaxprEqn, list], Any]) -> list[Any]:
  """`jax.core.eval_jaxpr`, with tag equations (also in sub-jaxprs) sent to `on_tag`."""
  env: dict = {}
  env.update(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  for eqn in jaxpr.eqns:
    invals = [_read(env, v) for v in eqn.invars]
    if _is_tag(eqn):
      outvals = [on_tag(eqn, invals)]
    elif (sub := _inlined(eqn)) is not None:
      outvals = _evaluate(sub.jaxpr, sub.consts, invals, on_tag)
    else:
      out = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
      outvals = out if eqn.primitive.multiple_results else [out]
    env.update(zip(eqn.outvars, outvals))
  return [_read(env, v) for v in jaxpr.outvars]


# --- the static layer table ----------------------------------------------------------


def _path_str(path: tuple) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                  for k in path)


def make_jaxpr(loss_fn: LossFn, params: PyTree, batch: PyTree, auto_register: bool = True):
  """The jaxpr of `loss_fn(params, batch)` (inputs: the params then batch leaves) and
  the shape of its output; with `auto_register`, untagged layers get tags too."""
  closed, out_shape = jax.make_jaxpr(loss_fn, return_shape=True)(params, batch)
  if auto_register:
    num_params = len(jax.tree_util.tree_leaves(params))
    origin = {v: i for i, v in enumerate(closed.jaxpr.invars[:num_params])}
    claimed = {index for eqn, operand_origin in _find_tags(closed.jaxpr, origin)
               if eqn.primitive is tags.layer_tag_p
               for index in _claimed(eqn, operand_origin) if index is not None}
    closed = patterns.register_layers(closed, num_params, claimed)
  return closed, out_shape


def trace_layers(loss_fn: LossFn, params: PyTree, batch: PyTree,
                 default_approx: str | None = None,
                 approx_for: Callable[[str, str], str | None] | None = None,
                 auto_register: bool = True) -> Trace:
  """The table of tagged layers and registered losses of `loss_fn`.

  `approx_for(layer_name, kind)` may override the approximation of a layer whose tag
  names none; then `default_approx`, else `tags.DEFAULT_APPROX[kind]`. Parameters in a
  `register_generic` tag are generic. Raises `ValueError` for missing losses, weights
  that are not in `params`, and parameters claimed by two tags.
  """
  closed, _ = make_jaxpr(loss_fn, params, batch, auto_register)
  leaves_with_paths, _ = jax.tree_util.tree_flatten_with_path(params)
  param_paths = tuple(_path_str(p) for p, _ in leaves_with_paths)
  origin = {v: i for i, v in enumerate(closed.jaxpr.invars[:len(param_paths)])}

  layers, loss_infos, owner, marked = [], [], {}, set()
  for eqn, operand_origin in _find_tags(closed.jaxpr, origin):
    if eqn.primitive is tags.loss_tag_p:
      loss_infos.append(LossInfo(eqn.params["kind"], eqn.params["weight"]))
      continue
    if _is_generic_tag(eqn):
      marked.add(_generic_leaf(eqn, operand_origin))
      continue
    layer = _layer_info(eqn, operand_origin, param_paths, default_approx, approx_for)
    for index in (layer.weight, layer.bias):
      if index is None:
        continue
      if index in owner:
        raise ValueError(f"Parameter {param_paths[index]!r} is used by two K-FAC layer tags "
                         f"({owner[index]!r} and {layer.name!r}); a parameter may be tagged once.")
      owner[index] = layer.name
    layers.append(layer)
  if both := sorted(marked & set(owner)):
    raise ValueError(f"Parameter {param_paths[both[0]]!r} is marked by register_generic and "
                     f"used by the K-FAC layer tag {owner[both[0]]!r}; tag it once.")
  if not loss_infos:
    raise ValueError("No loss is registered in loss_fn: call e.g. "
                     "jkfac.register_softmax_cross_entropy(logits, labels) inside it.")
  names = [layer.name for layer in layers]
  if len(set(names)) != len(names):
    raise ValueError(f"Two tagged layers share a parameter path prefix: {names}.")
  generic = tuple(
      LayerInfo(name=param_paths[i], kind="generic", approx="diagonal", weight=i, bias=None,
                input_shape=(), output_shape=(), weight_shape=tuple(v.aval.shape), conv=None)
      for i, v in enumerate(closed.jaxpr.invars[:len(param_paths)]) if i not in owner)
  return Trace(tuple(layers), tuple(loss_infos), param_paths, generic)


def _generic_leaf(eqn, operand_origin) -> int:
  if operand_origin[0] is None:
    raise ValueError(f"register_generic got an array of shape {eqn.invars[0].aval.shape} that "
                     "is not a leaf of `params`: pass the parameter itself.")
  return operand_origin[0]


def _layer_info(eqn, operand_origin, param_paths, default_approx, approx_for) -> LayerInfo:
  y, x, w = eqn.invars[:3]
  weight = operand_origin[2]
  bias = operand_origin[3] if eqn.params["has_bias"] else None
  if weight is None or (eqn.params["has_bias"] and bias is None):
    raise ValueError(
        f"A {eqn.params['kind']} layer tag's weights (shape {w.aval.shape}) are not leaves of "
        "`params`: pass the parameters themselves (not arrays computed from them) to the tag.")
  parts = param_paths[weight].split("/")
  if parts[-1] == "value" and len(parts) > 1:  # flax.nnx.Param leaves end in .value
    parts = parts[:-1]
  name = "/".join(parts[:-1] or parts)
  approx = eqn.params["approx"] or (approx_for and approx_for(name, eqn.params["kind"])) or (
      default_approx or tags.DEFAULT_APPROX[eqn.params["kind"]])
  return LayerInfo(name=name, kind=eqn.params["kind"], approx=approx, weight=weight, bias=bias,
                   input_shape=tuple(x.aval.shape), output_shape=tuple(y.aval.shape),
                   weight_shape=tuple(w.aval.shape), conv=eqn.params["conv"])


# --- statistics for one batch ----------------------------------------------------------


class Curvature(NamedTuple):
  """One forward pass, linearized at the layer tags: what the statistics need.

  inputs:      each tagged layer's input, in tag order.
  predictions: each registered loss's prediction.
  targets:     each registered loss's targets.
  pullback:    maps cotangents of the predictions to `(gradients of params, gradients
               at every layer's output)` (a `jax.tree_util.Partial`, so it may cross
               into `tx.update`).
  """
  inputs: list[Array]
  predictions: list[Array]
  targets: list[Array]
  pullback: jax.tree_util.Partial


def _forward(closed: jcore.ClosedJaxpr, args: list[Any], perturbations: list[Array]):
  """Evaluates the loss jaxpr, adding `perturbations` at the layer tags' outputs."""
  layer_inputs, predictions, targets = [], [], []

  def on_tag(eqn, invals):
    if eqn.primitive is tags.loss_tag_p:
      predictions.append(invals[0])
      targets.append(invals[1])
      return invals[0]
    if _is_generic_tag(eqn):
      return invals[0]
    layer_inputs.append(jax.lax.stop_gradient(invals[1]))
    return invals[0] + perturbations[len(layer_inputs) - 1]

  outputs = _evaluate(closed.jaxpr, closed.consts, args, on_tag)
  return outputs, predictions, layer_inputs, targets


def _zero_perturbations(closed: jcore.ClosedJaxpr) -> list[Array]:
  """Zeros shaped as each layer tag's output, in tag order."""
  return [jnp.zeros(eqn.invars[0].aval.shape, eqn.invars[0].aval.dtype)
          for eqn, _ in _find_tags(closed.jaxpr, {})
          if eqn.primitive is tags.layer_tag_p and not _is_generic_tag(eqn)]


def _from_predictions(pullback, output_zeros, cotangents):
  """The pullback of the prediction cotangents alone (the loss's own cotangent is 0)."""
  return pullback((output_zeros, cotangents))


def linearize(loss_fn: LossFn, params: PyTree, batch: PyTree,
              auto_register: bool = True) -> Curvature:
  """A forward pass of `loss_fn`, linearized in the layer outputs only."""
  closed, _ = make_jaxpr(loss_fn, params, batch, auto_register)
  batch_leaves = jax.tree_util.tree_leaves(batch)

  def forward(params, perturbations):
    args = jax.tree_util.tree_leaves(params) + batch_leaves
    _, predictions, inputs, targets = _forward(closed, args, perturbations)
    return ((), predictions), (inputs, targets)

  # Gradients of params are only used for generic parameters; XLA drops the rest.
  (_, predictions), pullback, (inputs, targets) = jax.vjp(
      forward, params, _zero_perturbations(closed), has_aux=True)
  return Curvature(inputs, predictions, targets,
                   jax.tree_util.Partial(_from_predictions, pullback, ()))


def value_and_grad(loss_fn: LossFn, has_aux: bool = False,
                   auto_register: bool = True) -> Callable[..., Any]:
  """`jax.value_and_grad(loss_fn)` that also returns the `Curvature` of the same pass.

  `value, grads, curvature = jkfac.value_and_grad(loss_fn)(params, batch)`; pass
  `stats=curvature` to `tx.update` and K-FAC's statistics reuse this forward pass
  instead of running their own. `auto_register` must match the transform's.
  """

  def value_grads_and_curvature(params: PyTree, batch: PyTree):
    closed, out_shape = make_jaxpr(loss_fn, params, batch, auto_register)
    out_tree = jax.tree_util.tree_structure(out_shape)
    batch_leaves = jax.tree_util.tree_leaves(batch)
    perturbations = _zero_perturbations(closed)

    def forward(params, perturbations):
      args = jax.tree_util.tree_leaves(params) + batch_leaves
      outputs, predictions, inputs, targets = _forward(closed, args, perturbations)
      value = jax.tree_util.tree_unflatten(out_tree, outputs)
      loss, aux = value if has_aux else (value, None)
      return (loss, predictions), (aux, inputs, targets)

    (loss, predictions), pullback, (aux, inputs, targets) = jax.vjp(
        forward, params, perturbations, has_aux=True)
    zeros = [jnp.zeros_like(p) for p in predictions]
    grads, _ = pullback((jnp.ones_like(loss), zeros))
    curvature = Curvature(inputs, predictions, targets, jax.tree_util.Partial(
        _from_predictions, pullback, jnp.zeros_like(loss)))
    return ((loss, aux) if has_aux else loss), grads, curvature

  return value_grads_and_curvature


def statistics(trace: Trace, curvature: Curvature, key: Array,
               estimation: str) -> dict[str, LayerStatistics]:
  """Per-layer inputs and output gradients of the estimated Fisher."""
  if len(curvature.inputs) != len(trace.layers):
    raise ValueError(f"The curvature has {len(curvature.inputs)} layers but the transform "
                     f"traced {len(trace.layers)}: use the same auto_register setting in "
                     "jkfac.value_and_grad and the transform.")
  sign_key, *keys = jax.random.split(key, len(curvature.predictions) + 1)
  cotangents = [losses.cotangents(info.kind, p, t, info.weight, estimation, k) for info, p, t, k
                in zip(trace.losses, curvature.predictions, curvature.targets, keys)]
  if trace.generic and estimation != "fisher":
    cotangents = _random_example_signs(cotangents, sign_key)
  if len(cotangents) > 1 and any(c.shape[0] > 1 for c in cotangents):
    # Deterministic columns of several losses would cross: give each its own columns.
    # (Single sampled or empirical columns may share: their sum is the right gradient.)
    cotangents = _pad_columns(cotangents)
  if cotangents[0].shape[0] == 1:  # one column: a single backward pass, no vmap.
    param_grads, output_grads = jax.tree_util.tree_map(
        lambda g: g[None], curvature.pullback([c[0] for c in cotangents]))
  else:
    param_grads, output_grads = jax.vmap(curvature.pullback)(cotangents)
  param_grads = jax.tree_util.tree_leaves(param_grads)
  layer_statistics = {layer.name: LayerStatistics(x, g)
                      for layer, x, g in zip(trace.layers, curvature.inputs, output_grads)}
  layer_statistics.update({layer.name: LayerStatistics(None, param_grads[layer.weight])
                           for layer in trace.generic})
  return layer_statistics


def collect_statistics(loss_fn: LossFn, trace: Trace, params: PyTree, batch: PyTree,
                       key: Array, estimation: str,
                       auto_register: bool = True) -> dict[str, LayerStatistics]:
  """Per-layer inputs and output gradients of the estimated Fisher, for one batch."""
  return statistics(trace, linearize(loss_fn, params, batch, auto_register), key, estimation)


def _random_example_signs(cotangents: list[Array], key: Array) -> list[Array]:
  """Multiplies each example's cotangents by a random sign, shared across losses.

  Generic parameters square a gradient summed over the batch, whose cross terms
  between examples vanish in expectation only for sampled targets. Random signs per
  example make them vanish for "empirical" and "exact" too, and leave every layer
  statistic unchanged: those are per-example outer products, where the signs cancel.
  """
  signs = {}
  for c in cotangents:
    if c.shape[1] not in signs:
      key, sub = jax.random.split(key)
      signs[c.shape[1]] = jax.random.rademacher(sub, (c.shape[1],), c.dtype)
  return [c * signs[c.shape[1]].reshape((1, -1) + (1,) * (c.ndim - 2)) for c in cotangents]


def _pad_columns(cotangents: list[Array]) -> list[Array]:
  """Places each loss's columns in its own slots of a shared column axis."""
  total = sum(c.shape[0] for c in cotangents)
  padded, start = [], 0
  for c in cotangents:
    pad = [(start, total - start - c.shape[0])] + [(0, 0)] * (c.ndim - 1)
    padded.append(jnp.pad(c, pad))
    start += c.shape[0]
  return padded
