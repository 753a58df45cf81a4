"""Walking jaxprs: sub-jaxprs of calls and scans, parameter tracking, tag discovery.

Shared by the pattern matcher (`patterns/`), the layer table (`layer_table.py`) and
the interpreter (`interpreter.py`). `find_tags` lists the tag equations of a jaxpr in
evaluation order, through `jit`, `remat`, `custom_jvp` and `scan`, with the `params`
leaf each operand comes from.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

from jax.extend import core as jcore

from jkfac import tags

# Call-like primitives whose sub-jaxpr takes the equation's operands one to one.
CALL_PRIMITIVES = frozenset({"jit", "pjit", "closed_call", "core_call", "custom_jvp_call",
                             "custom_vjp_call", "custom_vjp_call_jaxpr", "remat2",
                             "checkpoint"})
# Call-like primitives of `jax.checkpoint` / `nn.remat`, whose boundary the interpreter keeps.
REMAT_PRIMITIVES = frozenset({"remat2", "checkpoint"})
# Calls of `jax.custom_jvp` / `jax.custom_vjp` functions: their derivative is the user's
# rule, not their primal code's, so layers inside are not recognised (`patterns.rewrite`).
CUSTOM_RULE_PRIMITIVES = frozenset({"custom_jvp_call", "custom_vjp_call",
                                    "custom_vjp_call_jaxpr"})
_CALL_JAXPR_PARAMS = ("jaxpr", "call_jaxpr", "fun_jaxpr")
# Primitives through which a parameter keeps its identity (dtype casts, copies).
TRANSPARENT_PRIMITIVES = frozenset({"convert_element_type", "copy", "copy_p"})


def is_var(atom: Any) -> bool:
  return not isinstance(atom, jcore.Literal)


def call_jaxpr(eqn: jcore.JaxprEqn) -> tuple[str, Any, jcore.Jaxpr] | None:
  """`(param name, sub-jaxpr as stored, its open Jaxpr)` of a call-like or scan equation.

  A scan's body also takes the equation's operands one to one (consts, carry, xs),
  but runs once per step: see `scan_operands`.
  """
  if eqn.primitive.name not in CALL_PRIMITIVES and eqn.primitive.name != "scan":
    return None
  for name in _CALL_JAXPR_PARAMS:
    sub = eqn.params.get(name)
    inner = sub.jaxpr if isinstance(sub, jcore.ClosedJaxpr) else sub
    if isinstance(inner, jcore.Jaxpr) and len(inner.invars) == len(eqn.invars):
      return name, sub, inner
  return None


def scan_operands(eqn: jcore.JaxprEqn) -> tuple[int, int]:
  """`(num_consts, num_carry)` of a scan equation; the rest of its operands are xs."""
  return eqn.params["num_consts"], eqn.params["num_carry"]


def track_parameters(eqn: jcore.JaxprEqn, origin: dict) -> None:
  """Extends `origin` (var -> params leaf index) through casts and copies."""
  if (eqn.primitive.name in TRANSPARENT_PRIMITIVES and is_var(eqn.invars[0])
      and eqn.invars[0] in origin):
    origin[eqn.outvars[0]] = origin[eqn.invars[0]]


def inner_origin(eqn: jcore.JaxprEqn, inner: jcore.Jaxpr, origin: dict,
                 enter_scan: Callable[[Any, bool], Any] = lambda value, sliced: value) -> dict:
  """`origin` seen from inside a call-like or scan equation's sub-jaxpr.

  Inside a scan, a parameter passed as a const is the whole parameter at every step
  and one passed as xs is a slice of it (`enter_scan(value, sliced)` says which to
  the caller); one passed as a carry changes between steps, so it is dropped.
  """
  if eqn.primitive.name != "scan":
    return {s: origin[v] for s, v in zip(inner.invars, eqn.invars) if is_var(v) and v in origin}
  num_consts, num_carry = scan_operands(eqn)
  inside = {}
  for position, (s, v) in enumerate(zip(inner.invars, eqn.invars)):
    if is_var(v) and v in origin and not num_consts <= position < num_consts + num_carry:
      inside[s] = enter_scan(origin[v], position >= num_consts + num_carry)
  return inside


# --- tag discovery -----------------------------------------------------------------

LOSS_IN_SCAN = ("jkfac found a registered loss inside a scan; register the loss on the "
                "scan's stacked outputs instead.")


def is_tag(eqn: jcore.JaxprEqn) -> bool:
  return eqn.primitive in (tags.layer_tag_p, tags.loss_tag_p)


def is_generic_tag(eqn: jcore.JaxprEqn) -> bool:
  """A `jkfac.register_generic` tag: it claims its parameter and is no layer."""
  return eqn.primitive is tags.layer_tag_p and eqn.params["kind"] == "generic"


def has_tags(jaxpr: jcore.Jaxpr) -> bool:
  """Whether `jaxpr` or any of its sub-jaxprs holds a tag."""
  for eqn in jaxpr.eqns:
    if is_tag(eqn) or any(has_tags(sub) for sub in jcore.jaxprs_in_params(eqn.params)):
      return True
  return False


def tags_under_custom_rule(jaxpr: jcore.Jaxpr) -> bool:
  """Whether a tag of `jaxpr` lies inside a `jax.custom_jvp` / `jax.custom_vjp` call: the
  interpreter differentiates through its primal code there, not through its rule."""
  for eqn in jaxpr.eqns:
    subs = jcore.jaxprs_in_params(eqn.params)
    if eqn.primitive.name in CUSTOM_RULE_PRIMITIVES and any(has_tags(sub) for sub in subs):
      return True
    if any(tags_under_custom_rule(sub) for sub in subs):
      return True
  return False


CUSTOM_RULE_TAGS = (
    "jkfac found K-FAC tags (jkfac.register_* calls) inside a jax.custom_vjp / "
    "jax.custom_jvp function: jkfac differentiates through that function's primal code, "
    "not through its custom rule, so jkfac.value_and_grad's gradients and K-FAC's "
    "statistics there ignore the rule (e.g. a straight-through estimator's). Register "
    "the layers and losses outside the custom-derivative function; jkfac does not "
    "recognise untagged layers inside one, and leaves their parameters generic.")


def tagged_sub_jaxpr(eqn: jcore.JaxprEqn) -> jcore.ClosedJaxpr | None:
  """The sub-jaxpr (of a call or a scan) to walk into, or None for one without tags."""
  if not any(has_tags(sub) for sub in jcore.jaxprs_in_params(eqn.params)):
    return None
  call = call_jaxpr(eqn)
  if call is None:
    raise NotImplementedError(_UNSUPPORTED.get(eqn.primitive.name, (
        f"jkfac found K-FAC tags inside a `{eqn.primitive.name}` equation, which it cannot "
        "follow; tag the layers outside it.")))
  _, sub, inner = call
  return sub if isinstance(sub, jcore.ClosedJaxpr) else jcore.ClosedJaxpr(inner, ())


_UNSUPPORTED = {
    "cond": ("jkfac found K-FAC tags inside lax.cond / lax.switch: a layer that runs in some "
             "branches only has no fixed statistics, so tags there are not supported. Move "
             "the layer out of the branch (e.g. compute both and select with jnp.where)."),
    "while": ("jkfac found K-FAC tags inside lax.while_loop (or a fori_loop with traced "
              "bounds): the number of uses is not known at trace time, so tags there are not "
              "supported. Use lax.scan, or a fori_loop with Python int bounds (a scan)."),
}


def read(env: dict, atom: Any) -> Any:
  """The value of a variable in `env`, or a literal's value."""
  return env[atom] if is_var(atom) else atom.val


class TagSite(NamedTuple):
  """A tag equation; `origin` per operand: `(params leaf, scans)` or None (not a
  parameter), with `scans` what each enclosing scan does with it ("repeat"/"stack")."""
  eqn: jcore.JaxprEqn
  origin: list
  scan_lengths: tuple[int, ...]

  @property
  def is_layer(self) -> bool:
    """A layer tag (not a loss, not `register_generic`): it gets a perturbation."""
    return self.eqn.primitive is tags.layer_tag_p and not is_generic_tag(self.eqn)

  @property
  def claimed(self) -> list:
    """The origins of the parameters the tag claims: its parameter operands (a generic
    tag's own)."""
    return self.origin[:1] if is_generic_tag(self.eqn) else self.origin[2:]


def _enter_scan(value: tuple[int, tuple[str, ...]], sliced: bool) -> tuple[int, tuple[str, ...]]:
  leaf, scans = value
  return leaf, scans + ("stack" if sliced else "repeat",)


def leaf_origin(closed: jcore.ClosedJaxpr, num_params: int) -> dict:
  """`find_tags`'s start: the first `num_params` inputs are the `params` leaves."""
  return {v: (i, ()) for i, v in enumerate(closed.jaxpr.invars[:num_params])}


def find_tags(jaxpr: jcore.Jaxpr, origin: dict,
              scan_lengths: tuple[int, ...] = ()) -> list[TagSite]:
  """Tag equations in evaluation order, with the params-leaf origin of their operands.

  `origin` maps variables to `(params leaf index, scans)` (up to casts).
  """
  found = []
  for eqn in jaxpr.eqns:
    if is_tag(eqn):
      found.append(TagSite(eqn, [origin.get(v) if is_var(v) else None for v in eqn.invars],
                           scan_lengths))
    elif (sub := tagged_sub_jaxpr(eqn)) is not None:
      inner = inner_origin(eqn, sub.jaxpr, origin, _enter_scan)
      lengths = scan_lengths + ((eqn.params["length"],) if eqn.primitive.name == "scan" else ())
      found += find_tags(sub.jaxpr, inner, lengths)
    else:
      track_parameters(eqn, origin)
  return found


def layer_sites(jaxpr: jcore.Jaxpr) -> list[TagSite]:
  """The layer tags of `jaxpr` (those that get a perturbation), in evaluation order."""
  return [site for site in find_tags(jaxpr, {}) if site.is_layer]
