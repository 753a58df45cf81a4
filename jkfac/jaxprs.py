"""Small helpers for walking jaxprs, shared by the tracer and the pattern matcher."""

from __future__ import annotations

from typing import Any, Callable

from jax.extend import core as jcore

# Call-like primitives whose sub-jaxpr takes the equation's operands one to one.
CALL_PRIMITIVES = frozenset({"jit", "pjit", "closed_call", "core_call", "custom_jvp_call",
                             "custom_vjp_call", "custom_vjp_call_jaxpr", "remat2",
                             "checkpoint"})
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
