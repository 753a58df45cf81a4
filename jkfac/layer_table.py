"""The static layer table: every layer of a loss function, its approximation, checked.

`trace_layers` walks the jaxpr of `loss_fn(params, batch)` once, at trace time (after
`patterns.register_layers` has tagged the untagged layers), and returns a `Trace`:
the tagged layers with their kinds and parameter paths, the registered losses, and
the generic parameters that no layer covers. Tags of one weight make one multi-use
layer; `trace_with_approximations` also applies the user's approximation patterns.
"""

from __future__ import annotations

import collections
import dataclasses
import fnmatch
import warnings
from typing import Any, Callable, Mapping, Sequence

import jax
from jax.extend import core as jcore

from jkfac import blocks, jaxprs, patterns, tags
from jkfac.layer_info import LayerInfo, LossInfo, Trace, matrix_axes
from jkfac.validation import check

PyTree = Any
LossFn = Callable[..., Any]


def path_str(path: tuple) -> str:
  """A `tree_flatten_with_path` key path as "a/b/c"."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                  for k in path)


def make_jaxpr(loss_fn: LossFn, params: PyTree, batch: PyTree, auto_register: bool = True):
  """The jaxpr of `loss_fn(params, batch)` (inputs: the params then batch leaves) and
  the shape of its output; with `auto_register`, untagged layers get tags too."""
  try:
    closed, out_shape = jax.make_jaxpr(loss_fn, return_shape=True)(params, batch)
  except NameError as error:
    if "unbound axis name" not in str(error):
      raise
    raise ValueError(
        f"loss_fn uses a collective over an axis that is not bound where jkfac traced it "
        f"({error}). jkfac traces loss_fn in tx.init, tx.update and jkfac.describe: call "
        "them inside the same jax.pmap or jax.shard_map as the train step, with jkfac's "
        "axis_name= equal to the model's (e.g. BatchNorm(axis_name=...)), or describe a "
        "copy of the model without the collective.") from error
  first = jax.tree_util.tree_leaves(out_shape)
  check(bool(first) and first[0].shape == (), "loss_fn must return a scalar loss (the mean "
        "over the batch of per-example losses), or (loss, aux); its first output has shape "
        f"{first[0].shape if first else None}.")
  if auto_register:
    num_params = len(jax.tree_util.tree_leaves(params))
    claimed = {origin[0] for site in jaxprs.find_tags(closed.jaxpr,
                                                      jaxprs.leaf_origin(closed, num_params))
               if site.eqn.primitive is tags.layer_tag_p
               for origin in site.claimed if origin is not None}
    closed = patterns.register_layers(closed, num_params, claimed)
  if jaxprs.tags_under_custom_rule(closed.jaxpr):
    warnings.warn(jaxprs.CUSTOM_RULE_TAGS, UserWarning, stacklevel=3)
  return closed, out_shape


def trace_layers(loss_fn: LossFn, params: PyTree, batch: PyTree,
                 approx_for: Callable[[str, str], str | None] | None = None,
                 auto_register: bool = True) -> Trace:
  """The table of tagged layers and registered losses of `loss_fn`.

  Tags of the same weight make one multi-use layer (an embedding's lookups and output
  projections, one "tied_embedding" layer). `approx_for(layer_name, kind)` may choose
  the approximation of a layer whose tags name none, else the kind's default applies
  (see `blocks.resolve`). Parameters in a `register_generic` tag are generic. Raises
  `ValueError` for missing losses, weights that are not in `params`, tags of one
  weight that disagree, and parameters claimed by two tags.
  """
  closed, _ = make_jaxpr(loss_fn, params, batch, auto_register)
  leaves_with_paths, _ = jax.tree_util.tree_flatten_with_path(params)
  param_paths = tuple(path_str(p) for p, _ in leaves_with_paths)
  sites = jaxprs.find_tags(closed.jaxpr, jaxprs.leaf_origin(closed, len(param_paths)))
  losses = _losses(sites)
  marked = {_generic_leaf(site) for site in sites if jaxprs.is_generic_tag(site.eqn)}
  uses: dict[int, list] = {}  # weight leaf -> [(tag index, site)], in evaluation order
  for index, site in enumerate(site for site in sites if site.is_layer):
    uses.setdefault(_check_weights(site, param_paths), []).append((index, site))
  layers = [_layer_info(weight_uses, param_paths, approx_for) for weight_uses in uses.values()]
  owner = _owners(layers, param_paths)
  if both := sorted(marked & set(owner)):
    raise ValueError(f"Parameter {param_paths[both[0]]!r} is marked by register_generic and "
                     f"used by the K-FAC layer {owner[both[0]]!r}; tag it once.")
  layers = _unique_names(layers, param_paths)
  generic = tuple(
      LayerInfo(name=param_paths[i], kind="generic", approx="diagonal", weight=i, bias=None,
                input_shape=(), output_shape=(), weight_shape=tuple(v.aval.shape), conv=None,
                tags=(), scans=())
      for i, v in enumerate(closed.jaxpr.invars[:len(param_paths)]) if i not in owner)
  num_tags = sum(len(layer.tags) for layer in layers)
  return Trace(tuple(layers), losses, param_paths, generic, num_tags, frozenset(marked))


def _unique_names(layers: list[LayerInfo], param_paths: Sequence[str]) -> list[LayerInfo]:
  """`layers`, those that share a name (weights of one module, e.g. an Equinox
  `LSTMCell`'s `weight_ih` and `weight_hh`) named by their weight's path instead."""
  counts = collections.Counter(layer.name for layer in layers)
  return [dataclasses.replace(layer, name=param_paths[layer.weight]) if counts[layer.name] > 1
          else layer for layer in layers]


class GenericBlockWarning(UserWarning):
  """A parameter with two or more dimensions got a generic (diagonal) block."""


def weak_blocks(trace: Trace) -> list[str]:
  """The paths of parameters with two or more dimensions that no layer covers (and that
  `register_generic` did not ask for): a weaker block than their structure allows."""
  return [layer.name for layer in trace.generic
          if len(layer.weight_shape) >= 2 and layer.weight not in trace.marked]


def check_coverage(trace: Trace, strict: bool,
                   consequence: str = "generic diagonal blocks") -> None:
  """Warns once (or with `strict`, raises `ValueError`) naming the `weak_blocks`, which
  get `consequence` instead of a layer's block."""
  paths = weak_blocks(trace)
  if not paths:
    return
  message = (f"jkfac found no dense, conv, embedding or norm layer using the parameters "
             f"{paths}, so they get {consequence} (as does a parameter whose layer was "
             "found but which also acts on the loss through a use that is no layer, e.g. "
             "w / sigma, or both x @ w and h @ w.T). Tag their layers (e.g. "
             "jkfac.register_dense), mark them with jkfac.register_generic to accept that, "
             "or see jkfac.describe for what was recognised (layers inside lax.cond, "
             "lax.while_loop or jax.custom_vjp / custom_jvp functions are not recognised).")
  if strict:
    raise ValueError(message)
  warnings.warn(message, GenericBlockWarning, stacklevel=4)


def _losses(sites: Sequence[jaxprs.TagSite]) -> tuple[LossInfo, ...]:
  loss_sites = [site for site in sites if site.eqn.primitive is tags.loss_tag_p]
  if any(site.scan_lengths for site in loss_sites):
    raise NotImplementedError(jaxprs.LOSS_IN_SCAN)
  if not loss_sites:
    raise ValueError("No loss is registered in loss_fn: call e.g. "
                     "jkfac.register_softmax_cross_entropy(logits, labels) inside it.")
  return tuple(loss_info(site) for site in loss_sites)


def loss_info(site: jaxprs.TagSite) -> LossInfo:
  """The record of a loss tag."""
  params = site.eqn.params
  return LossInfo(params["kind"], params["weight"], params.get("has_mask", False),
                  params.get("has_row_weights", False))


def _owners(layers: Sequence[LayerInfo], param_paths: Sequence[str]) -> dict[int, str]:
  """The layer name of every parameter leaf a layer holds; a bias may have one layer."""
  owner = {layer.weight: layer.name for layer in layers}
  for layer in layers:
    if layer.bias is not None:
      if layer.bias in owner:
        raise ValueError(f"Parameter {param_paths[layer.bias]!r} is used by two K-FAC layers "
                         f"({owner[layer.bias]!r} and {layer.name!r}); a parameter may belong "
                         "to one layer.")
      owner[layer.bias] = layer.name
  return owner


def _generic_leaf(site: jaxprs.TagSite) -> int:
  if site.origin[0] is None:
    raise ValueError(f"register_generic got an array of shape {site.eqn.invars[0].aval.shape} "
                     "that is not a leaf of `params`: pass the parameter itself.")
  return site.origin[0][0]


def _check_weights(site: jaxprs.TagSite, param_paths: Sequence[str]) -> int:
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


def _stack(site: jaxprs.TagSite) -> tuple[int, ...]:
  """The lengths of the enclosing scans that stack (slice) the tag's weight."""
  _, scans = site.origin[2]
  return tuple(n for n, kind in zip(site.scan_lengths, scans) if kind == "stack")


def _agreement(site: jaxprs.TagSite) -> tuple:
  """What the tags of one weight must share: settings, weight shape, bias and stacking. An
  embedding's lookups and output projections agree with each other (a tied table)."""
  bias = site.origin[3][0] if site.eqn.params["has_bias"] else None
  params = dict(site.eqn.params)
  if params["kind"] in tags.TIED_EMBEDDING_ROLES:
    params["kind"] = "embedding"
  return (tuple(sorted(params.items())), site.eqn.invars[2].aval.shape, bias, _stack(site))


def _layer_kind(roles: tuple[str, ...]) -> str:
  """The kind of a layer whose uses are tags of `roles`."""
  return "tied_embedding" if "embedding_projection" in roles else roles[0]


def _layer_name(path: str) -> str:
  """A layer's name: its weight's parent path (flax.nnx.Param leaves end in "value")."""
  parts = path.split("/")
  if parts[-1] == "value" and len(parts) > 1:
    parts = parts[:-1]
  return "/".join(parts[:-1] or parts)


def _matrix_shape(shape: tuple[int, ...], transposed: bool) -> tuple[int, ...]:
  """A tag's weight shape in the layer's matrix view (HWIO for an OIHW conv weight)."""
  return tuple(shape[i] for i in matrix_axes(len(shape))) if transposed else tuple(shape)


def _layer_info(weight_uses: list, param_paths: Sequence[str], approx_for) -> LayerInfo:
  """One layer from the tags of its weight, checked to agree with each other."""
  _, site = weight_uses[0]
  eqn = site.eqn
  weight, _ = site.origin[2]
  first = _agreement(site)
  if any(_agreement(other) != first for _, other in weight_uses[1:]):
    raise ValueError(f"The weight {param_paths[weight]!r} is tagged several times with "
                     "different kinds, settings, biases or stacking; its tags must agree.")
  roles = tuple(s.eqn.params["kind"] for _, s in weight_uses)
  transposed = eqn.params.get("transposed", False)
  layer = LayerInfo(
      name=_layer_name(param_paths[weight]), kind=_layer_kind(roles), approx="", weight=weight,
      bias=site.origin[3][0] if eqn.params["has_bias"] else None,
      input_shape=tuple(eqn.invars[1].aval.shape), output_shape=tuple(eqn.invars[0].aval.shape),
      weight_shape=_matrix_shape(eqn.invars[2].aval.shape, transposed),
      conv=eqn.params["conv"], transposed=transposed,
      in_axes=eqn.params.get("in_axes", 1), tags=tuple(i for i, _ in weight_uses),
      scans=tuple(s.origin[2][1] for _, s in weight_uses), stack=_stack(site), roles=roles)
  approx = eqn.params["approx"] or (approx_for and approx_for(layer.name, layer.kind))
  return dataclasses.replace(layer, approx=blocks.resolve(layer.kind, approx, layer.multi_use))


# --- approximation patterns ----------------------------------------------------------


def trace_with_approximations(loss_fn: LossFn, params: PyTree, batch: PyTree, *,
                              approximations: Mapping[str, str] | None = None,
                              auto_register: bool = True) -> Trace:
  """The layer table of `loss_fn`, each layer with its approximation, checked."""
  trace = trace_layers(loss_fn, params, batch,
                       approx_for=lambda name, kind: _match(approximations, name),
                       auto_register=auto_register)
  _check_approximations(trace, approximations)
  return trace


def pattern_matches(pattern: str, name: str) -> bool:
  """Whether a glob `pattern` matches layer `name` or a suffix of it that starts after a
  "/" (so "Conv_0" matches "params/Conv_0" when the whole variables dict is passed)."""
  parts = name.split("/")
  return any(fnmatch.fnmatchcase("/".join(parts[i:]), pattern) for i in range(len(parts)))


def _matches(approximations: Mapping[str, str] | None, name: str) -> dict[str, str]:
  """The `approximations` entries whose pattern matches layer `name`."""
  return {pattern: approx for pattern, approx in (approximations or {}).items()
          if pattern_matches(pattern, name)}


def _match(approximations: Mapping[str, str] | None, name: str) -> str | None:
  return next(iter(_matches(approximations, name).values()), None)


def _check_approximations(trace: Trace, approximations: Mapping[str, str] | None) -> None:
  """Every pattern matches a layer, overlapping patterns agree, and every layer supports
  its approximation; errors name the layer's parameters."""
  names = [layer.name for layer in trace.layers]
  for pattern in approximations or {}:
    if not any(pattern_matches(pattern, n) for n in names):
      raise ValueError(f"The approximation pattern {pattern!r} matches no layer; layers: "
                       f"{names}.")
  for layer in trace.layers:
    paths = [trace.param_paths[i] for i in (layer.weight, layer.bias) if i is not None]
    matches = _matches(approximations, layer.name)
    if len(set(matches.values())) > 1:
      raise ValueError(f"Layer {layer.name!r} (parameters {paths}) is matched by approximation "
                       f"patterns that disagree: {matches}; make the patterns disjoint.")
    if (layer.kind, layer.approx) not in blocks.REGISTRY:
      raise ValueError(f"Layer {layer.name!r} ({layer.kind}, parameters {paths}) does not "
                       f"support the {layer.approx!r} approximation; supported: "
                       f"{blocks.supported(layer.kind)}.")
