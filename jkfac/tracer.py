"""Find the tags in a loss function's jaxpr and collect per-layer statistics.

`trace_layers` walks the jaxpr of `loss_fn(params, batch)` once, at trace time, and
returns a static table: every tagged layer (its kind, approximation and the paths
of its parameters in `params`), every registered loss, and the "generic" parameters
no layer covers. With `auto_register`, untagged layers are tagged first
(`jkfac/patterns.py`).

Tags inside `jit`, `remat` and `scan` are found; several tags of one weight, or a
tag inside a scan over time, make one multi-use layer, and a tag inside a scan
over stacked parameters (`nn.scan` over layers) a stacked layer (see `LayerInfo`).

`linearize` evaluates the same jaxpr with a small interpreter that, at each layer
tag, records the layer's inputs and adds a zero "perturbation" to its output (in a
scan, one per step: the scan runs the interpreter on its body);
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

  A layer may have several uses (tags of the same weight, or a tag inside a `scan`):
  `tags` are their indices among all layer tags, in evaluation order, and `scans` say,
  per use, what each enclosing scan does with the weight: "repeat" (the whole weight
  at every step, e.g. a scan over time) or "stack" (one slice per step, e.g.
  `nn.scan` over layers). A stacked layer is `stack` independent layers: the params
  leaves have shape `stack + weight_shape`. Shapes are those of one step's tag.

  `in_axes` is a dense layer's number of contracted input axes (> 1 for `DenseGeneral`).
  `roles` is each use's tag kind: a "tied_embedding" layer (a table used as lookup
  and as output projection) has "embedding" and "embedding_projection" uses.
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
  in_axes: int = 1
  tags: tuple[int, ...] = (0,)
  scans: tuple[tuple[str, ...], ...] = ((),)
  stack: tuple[int, ...] = ()
  roles: tuple[str, ...] = ()

  @property
  def multi_use(self) -> bool:
    """Whether the weight is applied more than once per example."""
    return len(self.tags) > 1 or any("repeat" in kinds for kinds in self.scans)


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
  """What one layer's curvature block is built from, for one batch; per use of the layer
  (see `LayerInfo.tags`), so a layer of one use has tuples of one array.

  inputs:       the input `x` of each use as tagged, `(*scan lengths, batch, ...)`;
                empty for a generic parameter.
  output_grads: backpropagated loss cotangents at each use's output, with a leading
                axis of estimator columns: `(columns, *scan lengths, *output_shape)`;
                for a generic parameter, one array at the parameter itself:
                `(columns, *param_shape)`.
  """
  inputs: tuple[Array, ...]
  output_grads: tuple[Array, ...]


# --- walking the jaxpr -------------------------------------------------------------


def _is_tag(eqn: jcore.JaxprEqn) -> bool:
  return eqn.primitive in (tags.layer_tag_p, tags.loss_tag_p)


def _is_generic_tag(eqn: jcore.JaxprEqn) -> bool:
  """A `jkfac.register_generic` tag: it claims its parameter and is no layer."""
  return eqn.primitive is tags.layer_tag_p and eqn.params["kind"] == "generic"


def _claimed(site: "_TagSite") -> list:
  """The origins of the parameters a layer tag claims: its parameter operands (a generic
  tag's own)."""
  return site.origin[:1] if _is_generic_tag(site.eqn) else site.origin[2:]


def _has_tags(jaxpr: jcore.Jaxpr) -> bool:
  for eqn in jaxpr.eqns:
    if _is_tag(eqn):
      return True
    for sub in jcore.jaxprs_in_params(eqn.params):
      if _has_tags(sub):
        return True
  return False


def _inlined(eqn: jcore.JaxprEqn) -> jcore.ClosedJaxpr | None:
  """The sub-jaxpr (of a call or a scan) to walk into, or None for one without tags."""
  if not any(_has_tags(sub) for sub in jcore.jaxprs_in_params(eqn.params)):
    return None
  call = jaxprs.call_jaxpr(eqn)
  if call is None:
    raise NotImplementedError(
        f"jkfac found K-FAC tags inside a `{eqn.primitive.name}` equation; tags inside "
        "while loops and conditionals are not supported (scan is). Tag the layers outside it.")
  _, sub, inner = call
  return sub if isinstance(sub, jcore.ClosedJaxpr) else jcore.ClosedJaxpr(inner, ())


def _read(env: dict, var: Any) -> Any:
  return env[var] if jaxprs.is_var(var) else var.val


_LOSS_IN_SCAN = ("jkfac found a registered loss inside a scan; register the loss on the "
                 "scan's stacked outputs instead.")


class _TagSite(NamedTuple):
  """A tag equation; `origin` per operand: `(params leaf, scans)` or None (not a
  parameter), with `scans` what each enclosing scan does with it ("repeat"/"stack")."""
  eqn: jcore.JaxprEqn
  origin: list
  scan_lengths: tuple[int, ...]


def _enter_scan(value: tuple[int, tuple[str, ...]], sliced: bool) -> tuple[int, tuple[str, ...]]:
  leaf, scans = value
  return leaf, scans + ("stack" if sliced else "repeat",)


def _find_tags(jaxpr: jcore.Jaxpr, origin: dict,
               scan_lengths: tuple[int, ...] = ()) -> list[_TagSite]:
  """Tag equations in evaluation order, with the params-leaf origin of their operands.

  `origin` maps variables to `(params leaf index, scans)` (up to casts).
  """
  found = []
  for eqn in jaxpr.eqns:
    if _is_tag(eqn):
      found.append(_TagSite(eqn, [origin.get(v) if jaxprs.is_var(v) else None
                                  for v in eqn.invars], scan_lengths))
    elif (sub := _inlined(eqn)) is not None:
      inner = jaxprs.inner_origin(eqn, sub.jaxpr, origin, _enter_scan)
      lengths = scan_lengths + ((eqn.params["length"],) if eqn.primitive.name == "scan" else ())
      found += _find_tags(sub.jaxpr, inner, lengths)
    else:
      jaxprs.track_parameters(eqn, origin)
  return found


def _is_layer(site: _TagSite) -> bool:
  """A layer tag (not a loss, not `register_generic`): it gets a perturbation."""
  return site.eqn.primitive is tags.layer_tag_p and not _is_generic_tag(site.eqn)


def _layer_sites(jaxpr: jcore.Jaxpr) -> list[_TagSite]:
  return [site for site in _find_tags(jaxpr, {}) if _is_layer(site)]


class _Recorded(NamedTuple):
  """What a forward pass saw at the tags: each layer tag's input (stacked over the
  steps of enclosing scans) and each loss's prediction and targets."""
  inputs: list[Array]
  predictions: list[Array]
  targets: list[Array]


def _evaluate(jaxpr: jcore.Jaxpr, consts: Sequence[Any], args: Sequence[Any],
              perturbations: Sequence[Array]) -> tuple[list[Any], _Recorded]:
  """`jax.core.eval_jaxpr` that adds `perturbations` at the layer tags' outputs (in tag
  order, also in sub-jaxprs) and records what the tags see."""
  env: dict = {}
  env.update(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  recorded = _Recorded([], [], [])
  perturbations = iter(perturbations)
  for eqn in jaxpr.eqns:
    invals = [_read(env, v) for v in eqn.invars]
    if eqn.primitive is tags.loss_tag_p:
      recorded.predictions.append(invals[0])
      recorded.targets.append(invals[1])
      outvals = [invals[0]]
    elif _is_generic_tag(eqn):
      outvals = [invals[0]]
    elif eqn.primitive is tags.layer_tag_p:
      recorded.inputs.append(jax.lax.stop_gradient(invals[1]))
      outvals = [invals[0] + next(perturbations)]
    elif (sub := _inlined(eqn)) is not None:
      inner_perturbations = [next(perturbations) for _ in _layer_sites(sub.jaxpr)]
      if eqn.primitive.name == "scan":
        outvals, inner = _evaluate_scan(sub.jaxpr, sub.consts, invals, inner_perturbations, eqn)
      else:
        outvals, inner = _evaluate(sub.jaxpr, sub.consts, invals, inner_perturbations)
      for mine, theirs in zip(recorded, inner):
        mine.extend(theirs)
    else:
      out = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
      outvals = out if eqn.primitive.multiple_results else [out]
    env.update(zip(eqn.outvars, outvals))
  return [_read(env, v) for v in jaxpr.outvars], recorded


def _evaluate_scan(body: jcore.Jaxpr, body_consts: Sequence[Any], args: Sequence[Any],
                   perturbations: Sequence[Array], eqn: jcore.JaxprEqn
                   ) -> tuple[list[Any], _Recorded]:
  """A scan equation whose body has layer tags, as `jax.lax.scan` over `_evaluate`.

  Each step takes its slice of the perturbations and returns the inputs its tags
  saw, which come out stacked along a leading axis of the scan's length.
  """
  num_consts, num_carry = jaxprs.scan_operands(eqn)
  consts, carry, xs = (list(args[:num_consts]), list(args[num_consts:num_consts + num_carry]),
                       list(args[num_consts + num_carry:]))

  def step(carry, step_xs):
    xs_now, perturbations_now = step_xs
    outs, recorded = _evaluate(body, body_consts, consts + list(carry) + list(xs_now),
                               perturbations_now)
    if recorded.predictions:
      raise NotImplementedError(_LOSS_IN_SCAN)
    return outs[:num_carry], (outs[num_carry:], recorded.inputs)

  carry, (ys, inputs) = jax.lax.scan(step, carry, (xs, list(perturbations)),
                                     length=eqn.params["length"], reverse=eqn.params["reverse"],
                                     unroll=eqn.params["unroll"])
  return list(carry) + list(ys), _Recorded(list(inputs), [], [])


# --- the static layer table ----------------------------------------------------------


def _path_str(path: tuple) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                  for k in path)


def _leaf_origin(closed: jcore.ClosedJaxpr, num_params: int) -> dict:
  return {v: (i, ()) for i, v in enumerate(closed.jaxpr.invars[:num_params])}


def make_jaxpr(loss_fn: LossFn, params: PyTree, batch: PyTree, auto_register: bool = True):
  """The jaxpr of `loss_fn(params, batch)` (inputs: the params then batch leaves) and
  the shape of its output; with `auto_register`, untagged layers get tags too."""
  closed, out_shape = jax.make_jaxpr(loss_fn, return_shape=True)(params, batch)
  if auto_register:
    num_params = len(jax.tree_util.tree_leaves(params))
    claimed = {origin[0] for site in _find_tags(closed.jaxpr, _leaf_origin(closed, num_params))
               if site.eqn.primitive is tags.layer_tag_p
               for origin in _claimed(site) if origin is not None}
    closed = patterns.register_layers(closed, num_params, claimed)
  return closed, out_shape


def trace_layers(loss_fn: LossFn, params: PyTree, batch: PyTree,
                 default_approx: str | None = None,
                 approx_for: Callable[[str, str], str | None] | None = None,
                 auto_register: bool = True) -> Trace:
  """The table of tagged layers and registered losses of `loss_fn`.

  Tags of the same weight make one multi-use layer (an embedding's lookups and output
  projections, one "tied_embedding" layer). `approx_for(layer_name, kind)`
  may override the approximation of a layer whose tags name none; then
  `default_approx`, else `tags.DEFAULT_APPROX[kind]`; "kron" on a multi-use layer is
  "kron_indep". Parameters in a `register_generic` tag are generic. Raises
  `ValueError` for missing losses, weights that are not in `params`, tags of one
  weight that disagree, and parameters claimed by two tags.
  """
  closed, _ = make_jaxpr(loss_fn, params, batch, auto_register)
  leaves_with_paths, _ = jax.tree_util.tree_flatten_with_path(params)
  param_paths = tuple(_path_str(p) for p, _ in leaves_with_paths)
  sites = _find_tags(closed.jaxpr, _leaf_origin(closed, len(param_paths)))
  loss_sites = [site for site in sites if site.eqn.primitive is tags.loss_tag_p]
  if any(site.scan_lengths for site in loss_sites):
    raise NotImplementedError(_LOSS_IN_SCAN)
  loss_infos = [LossInfo(site.eqn.params["kind"], site.eqn.params["weight"])
                for site in loss_sites]
  if not loss_infos:
    raise ValueError("No loss is registered in loss_fn: call e.g. "
                     "jkfac.register_softmax_cross_entropy(logits, labels) inside it.")
  marked = {_generic_leaf(site) for site in sites if _is_generic_tag(site.eqn)}
  uses: dict[int, list] = {}  # weight leaf -> [(tag index, site)], in evaluation order
  for index, site in enumerate(site for site in sites if _is_layer(site)):
    weight = _check_weights(site, param_paths)
    uses.setdefault(weight, []).append((index, site))
  layers = [_layer_info(weight_uses, param_paths, default_approx, approx_for)
            for weight_uses in uses.values()]
  owner: dict[int, str] = {layer.weight: layer.name for layer in layers}
  for layer in layers:
    if layer.bias is not None:
      if layer.bias in owner:
        raise ValueError(f"Parameter {param_paths[layer.bias]!r} is used by two K-FAC layers "
                         f"({owner[layer.bias]!r} and {layer.name!r}); a parameter may belong "
                         "to one layer.")
      owner[layer.bias] = layer.name
  if both := sorted(marked & set(owner)):
    raise ValueError(f"Parameter {param_paths[both[0]]!r} is marked by register_generic and "
                     f"used by the K-FAC layer {owner[both[0]]!r}; tag it once.")
  names = [layer.name for layer in layers]
  if len(set(names)) != len(names):
    raise ValueError(f"Two tagged layers share a parameter path prefix: {names}.")
  generic = tuple(
      LayerInfo(name=param_paths[i], kind="generic", approx="diagonal", weight=i, bias=None,
                input_shape=(), output_shape=(), weight_shape=tuple(v.aval.shape), conv=None,
                tags=(), scans=())
      for i, v in enumerate(closed.jaxpr.invars[:len(param_paths)]) if i not in owner)
  return Trace(tuple(layers), tuple(loss_infos), param_paths, generic)


def _generic_leaf(site: _TagSite) -> int:
  if site.origin[0] is None:
    raise ValueError(f"register_generic got an array of shape {site.eqn.invars[0].aval.shape} "
                     "that is not a leaf of `params`: pass the parameter itself.")
  return site.origin[0][0]


def _check_weights(site: _TagSite, param_paths: Sequence[str]) -> int:
  """The weight's params leaf of a layer tag, after checking weight and bias are leaves."""
  has_bias = site.eqn.params["has_bias"]
  if site.origin[2] is None or (has_bias and site.origin[3] is None):
    raise ValueError(
        f"A {site.eqn.params['kind']} layer tag's weights (shape "
        f"{site.eqn.invars[2].aval.shape}) are not leaves of `params`: pass the parameters "
        "themselves (not arrays computed from them) to the tag.")
  if has_bias and site.origin[3][1] != site.origin[2][1]:
    raise ValueError(f"The weight and bias of layer {param_paths[site.origin[2][0]]!r} enter "
                     "the enclosing scans differently (one stacked, one repeated).")
  return site.origin[2][0]




def _agreement(site: _TagSite) -> tuple:
  """What the tags of one weight must share: settings, weight shape, bias and stacking. An
  embedding's lookups and output projections agree with each other (a tied table)."""
  _, scans = site.origin[2]
  bias = site.origin[3][0] if site.eqn.params["has_bias"] else None
  stack = tuple(n for n, kind in zip(site.scan_lengths, scans) if kind == "stack")
  params = dict(site.eqn.params)
  if params["kind"] in tags.TIED_EMBEDDING_ROLES:
    params["kind"] = "embedding"
  return (tuple(sorted(params.items())), site.eqn.invars[2].aval.shape, bias, stack)


def _layer_kind(roles: tuple[str, ...]) -> str:
  """The kind of a layer whose uses are tags of `roles`."""
  return "tied_embedding" if "embedding_projection" in roles else roles[0]


def _layer_info(weight_uses: list, param_paths: Sequence[str], default_approx: str,
                approx_for) -> LayerInfo:
  """One layer from the tags of its weight, checked to agree with each other."""
  index, site = weight_uses[0]
  eqn = site.eqn
  weight, scans = site.origin[2]
  parts = param_paths[weight].split("/")
  if parts[-1] == "value" and len(parts) > 1:  # flax.nnx.Param leaves end in .value
    parts = parts[:-1]
  name = "/".join(parts[:-1] or parts)
  first = _agreement(site)
  for _, other in weight_uses[1:]:
    if _agreement(other) != first:
      raise ValueError(f"The weight {param_paths[weight]!r} is tagged several times with "
                       "different kinds, settings, biases or stacking; its tags must agree.")
  roles = tuple(s.eqn.params["kind"] for _, s in weight_uses)
  layer = LayerInfo(
      name=name, kind=_layer_kind(roles), approx="", weight=weight,
      bias=site.origin[3][0] if eqn.params["has_bias"] else None,
      input_shape=tuple(eqn.invars[1].aval.shape), output_shape=tuple(eqn.invars[0].aval.shape),
      weight_shape=tuple(eqn.invars[2].aval.shape), conv=eqn.params["conv"],
      in_axes=eqn.params.get("in_axes", 1), tags=tuple(i for i, _ in weight_uses),
      scans=tuple(s.origin[2][1] for _, s in weight_uses),
      stack=tuple(n for n, kind in zip(site.scan_lengths, scans) if kind == "stack"),
      roles=roles)
  approx = eqn.params["approx"] or (approx_for and approx_for(name, layer.kind)) or (
      default_approx or tags.DEFAULT_APPROX[layer.kind])
  if approx == tags.APPROX_KRONECKER_NAME and (layer.multi_use
                                               or layer.kind == "tied_embedding"):
    approx = tags.APPROX_KRON_INDEP_NAME
  return dataclasses.replace(layer, approx=approx)


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
  outputs, recorded = _evaluate(closed.jaxpr, closed.consts, args, perturbations)
  return outputs, recorded.predictions, recorded.inputs, recorded.targets


def _zero_perturbations(closed: jcore.ClosedJaxpr) -> list[Array]:
  """Zeros shaped as each layer tag's output (stacked over enclosing scans), in tag order."""
  return [jnp.zeros(site.scan_lengths + site.eqn.invars[0].aval.shape,
                    site.eqn.invars[0].aval.dtype) for site in _layer_sites(closed.jaxpr)]


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
  num_tags = sum(len(layer.tags) for layer in trace.layers)
  if len(curvature.inputs) != num_tags:
    raise ValueError(f"The curvature has {len(curvature.inputs)} layer tags but the transform "
                     f"traced {num_tags}: use the same auto_register setting in "
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
  layer_statistics = {layer.name: LayerStatistics(tuple(curvature.inputs[i] for i in layer.tags),
                                                   tuple(output_grads[i] for i in layer.tags))
                      for layer in trace.layers}
  layer_statistics.update({layer.name: LayerStatistics((), (param_grads[layer.weight],))
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
