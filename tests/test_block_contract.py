"""Every row of the block registry against a dense float64 reference.

For each `(kind, approximation)` of `jkfac.blocks.REGISTRY`, a small network with one
layer of that kind is preconditioned by `jkfac.precondition` (exact estimation, no EMA,
damping λ) and the update of a random vector `v` is compared with the approximation's
definition applied to matrices built with `jax.jacfwd`, in the layer's matrix view `M`
(`(d_in [+1], d_out)`, bias as the last row), vectorised row-major:

- F = Jᵀ H J, the exact Fisher (GGN) of the layer, `J = ∂logits/∂M`, `H` the loss's
  Hessian in the logits; "full" is F, "diagonal" diag(F);
- kron: A = mean over examples and positions of `a aᵀ` (`a = ∂z_t[j]/∂M[:, j]`, the
  input of position t), G = Σ over examples and positions of `Jzᵀ H Jz` (`Jz =
  ∂logits/∂z_t`); "kron_reduce" the same of inputs averaged and `Jz` summed over
  positions; "kron_in_diag"/"kron_out_diag" with diag(A)/diag(G); all with factored
  damping `(A + π√λ I) ⊗ (G + √λ/π I)`;
- "ekfac": the eigenbases Q of A and G with the scaling diag(Qᵀ F Q), damped `s + λ`;
- a tied embedding: `D1 ⊗ G1 + (D2 + π√λ) ⊗ (A2 + √λ/π I)` of the lookup's counts and
  output factor and the projection's logits diagonal and input factor.

A new row fails here until its kind has a network in `_CASES` and its approximation a
reference in `_REFERENCES`.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jkfac
from jkfac import blocks

N, T, C = 6, 2, 3            # examples, positions, classes
DAMPING = 1e-3


@pytest.fixture(autouse=True)
def _x64():
  with jax.enable_x64(True):
    yield


class Case(NamedTuple):
  """A network with one layer under test; `M` is the layer's matrix view."""
  params: dict
  batch: tuple
  loss_fn: Callable[[str], Callable]          # approximation -> loss_fn(params, batch)
  matrix: Callable[[dict], jax.Array]         # params-shaped tree -> M
  layer_output: Callable[[jax.Array], jax.Array] | None  # M -> z (N, T, d_out)
  head: Callable[[jax.Array], jax.Array] | None          # z -> logits (N, C)
  logits: Callable[[jax.Array], jax.Array]    # M -> logits


def _cross_entropy(logits, labels):
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))


def _layer_case(rng, params, x, layer, tag, to_params, matrix, classes=C) -> Case:
  """A case `logits = mean_t tanh(layer(params, x)) @ K` (K fixed)."""
  labels = jnp.asarray(rng.integers(0, classes, N))
  d_out = jax.eval_shape(layer, params, x).shape[-1]
  k = jnp.asarray(rng.standard_normal((d_out, classes)))

  def head(z):
    return jnp.mean(jnp.tanh(z).reshape(z.shape[0], -1, z.shape[-1]), axis=1) @ k

  def loss_fn(approximation):
    def fn(params, batch):
      x, labels = batch
      z = tag(layer(params, x), params, x, approximation)
      logits = jkfac.register_softmax_cross_entropy(head(z), labels)
      return _cross_entropy(logits, labels)
    return fn

  layer_output = lambda m: layer(to_params(m), x).reshape(N, -1, d_out)
  return Case(params, (x, labels), loss_fn, matrix, layer_output, head,
              lambda m: head(layer(to_params(m), x)))


def _with_bias(tree, key="w"):
  w = tree[key]
  return jnp.concatenate([w.reshape(-1, w.shape[-1]), tree["b"][None]], axis=0)


def _dense(rng) -> Case:
  params = {"w": jnp.asarray(rng.standard_normal((3, 2))), "b": jnp.asarray(rng.normal(size=2))}
  x = jnp.asarray(rng.standard_normal((N, T, 3)))
  return _layer_case(
      rng, params, x, lambda p, x: x @ p["w"] + p["b"],
      lambda z, p, x, approx: jkfac.register_dense(z, x, p["w"], p["b"], approximation=approx),
      lambda m: {"w": m[:-1], "b": m[-1]}, _with_bias)


def _conv(rank: int) -> Callable[[np.random.Generator], Case]:
  spatial, kernel = {1: ((5,), (2,)), 2: ((3, 3), (2, 2)), 3: ((3, 2, 3), (2, 1, 2))}[rank]
  register = {1: jkfac.register_conv1d, 2: jkfac.register_conv2d, 3: jkfac.register_conv3d}[rank]
  letters = "DHW"[-rank:] if rank > 1 else "W"
  numbers = ("N" + letters + "C", letters + "IO", "N" + letters + "C")

  def case(rng) -> Case:
    w_shape = kernel + (2, 3)
    params = {"w": jnp.asarray(rng.standard_normal(w_shape) / 2),
              "b": jnp.asarray(rng.normal(size=3))}
    x = jnp.asarray(rng.standard_normal((N,) + spatial + (2,)))

    def layer(p, x):
      return jax.lax.conv_general_dilated(x, p["w"], (1,) * rank, "VALID",
                                          dimension_numbers=numbers) + p["b"]

    def tag(z, p, x, approx):
      return register(z, x, p["w"], p["b"], window_strides=(1,) * rank, padding="VALID",
                      approximation=approx)

    to_params = lambda m: {"w": m[:-1].reshape(w_shape), "b": m[-1]}
    return _layer_case(rng, params, x, layer, tag, to_params, _with_bias)
  return case


def _embedding(rng) -> Case:
  params = {"table": jnp.asarray(rng.standard_normal((5, 3)))}
  ids = jnp.asarray(rng.integers(0, 4, (N, T)))   # id 4 never occurs
  return _layer_case(
      rng, params, ids, lambda p, ids: p["table"][ids],
      lambda z, p, ids, approx: jkfac.register_embedding(z, ids, p["table"],
                                                         approximation=approx),
      lambda m: {"table": m}, lambda tree: tree["table"])


def _scale_and_shift(rng) -> Case:
  params = {"scale": jnp.asarray(rng.normal(size=3)), "shift": jnp.asarray(rng.normal(size=3))}
  x = jnp.asarray(rng.standard_normal((N, T, 3)))
  return _layer_case(
      rng, params, x, lambda p, x: x * p["scale"] + p["shift"],
      lambda z, p, x, approx: jkfac.register_scale_and_shift(z, x, p["scale"], p["shift"],
                                                             approximation=approx),
      lambda m: {"scale": m[0], "shift": m[1]},
      lambda tree: jnp.stack([tree["scale"], tree["shift"]]))


def _generic(rng) -> Case:
  """One example: a generic block's gradients carry random signs per example, which
  leave one example's squares exact."""
  params = {"p": jnp.asarray(rng.standard_normal((3, C)))}
  x = jnp.asarray(rng.standard_normal((1, 3)))
  labels = jnp.asarray(rng.integers(0, C, 1))

  def loss_fn(approximation):
    def fn(params, batch):
      x, labels = batch
      p = jkfac.register_generic(params["p"], approximation=approximation)
      logits = jkfac.register_softmax_cross_entropy(jnp.tanh(x @ p), labels)
      return _cross_entropy(logits, labels)
    return fn

  return Case(params, (x, labels), loss_fn, lambda tree: tree["p"].reshape(-1, 1), None, None,
              lambda m: jnp.tanh(x @ m.reshape(3, C)))


def _tied_embedding(rng) -> Case:
  """`logits = mean_t tanh(W[ids]) @ Wᵀ` with one `(vocab, d)` table W."""
  vocab, d = 4, 3
  params = {"table": jnp.asarray(rng.standard_normal((vocab, d)))}
  ids = jnp.asarray(rng.integers(0, vocab, (N, T)))
  labels = jnp.asarray(rng.integers(0, vocab, N))

  def loss_fn(approximation):
    def fn(params, batch):
      ids, labels = batch
      table = params["table"]
      z = jkfac.register_embedding(table[ids], ids, table, approximation=approximation)
      h = jnp.mean(jnp.tanh(z), axis=1)
      logits = jkfac.register_embedding_projection(h @ table.T, h, table,
                                                   approximation=approximation)
      logits = jkfac.register_softmax_cross_entropy(logits, labels)
      return _cross_entropy(logits, labels)
    return fn

  head = lambda z, m: jnp.mean(jnp.tanh(z), axis=1) @ m.T
  return Case(params, (ids, labels), loss_fn, lambda tree: tree["table"],
              lambda m: m[ids], head, lambda m: head(m[ids], m))


_CASES: dict[str, Callable[[np.random.Generator], Case]] = {
    "dense": _dense, "conv1d": _conv(1), "conv2d": _conv(2), "conv3d": _conv(3),
    "embedding": _embedding, "scale_and_shift": _scale_and_shift, "generic": _generic,
    "tied_embedding": _tied_embedding,
}


# --- dense references ----------------------------------------------------------------------


def _hessian(case: Case, m):
  """The loss's Hessian in the logits, `(N, C, N, C)`."""
  labels = case.batch[1]
  return jax.hessian(lambda z: _cross_entropy(z, labels))(case.logits(m))


def _fisher(case: Case, m):
  """The exact Fisher (GGN) of the layer in its row-major matrix view."""
  jac = jax.jacfwd(case.logits)(m)
  jac = jac.reshape(jac.shape[:2] + (-1,))
  return jnp.einsum("ncp,ncmd,mdq->pq", jac, _hessian(case, m), jac)


def _factors(case: Case, m, reduce: bool = False):
  """K-FAC's A and G from the layer's inputs and output Jacobians (see module doc)."""
  a = jax.jacfwd(case.layer_output)(m)[:, :, 0, :, 0]          # (N, T, d_in)
  z = case.layer_output(m)
  jz = jax.jacfwd(case.head)(z)                                  # (N, C, N, T, d_out)
  h = _hessian(case, m)
  if reduce:
    a, jz = a.mean(axis=1, keepdims=True), jz.sum(axis=3, keepdims=True)
  cov_a = jnp.einsum("nti,ntj->ij", a, a) / (a.shape[0] * a.shape[1])
  cov_g = jnp.einsum("mcntd,mcMC,MCnte->de", jz, h, jz)
  return cov_a, cov_g


def _kron_solve(a, g, v):
  pi = np.sqrt((np.trace(a) / len(a)) / (np.trace(g) / len(g)))
  root = np.sqrt(DAMPING)
  return np.linalg.solve(a + pi * root * np.eye(len(a)), v) @ np.linalg.inv(
      g + root / pi * np.eye(len(g)))


def _kron(reduce=False, diagonal_a=False, diagonal_g=False):
  def reference(case, m, v):
    a, g = map(np.asarray, _factors(case, m, reduce))
    a = np.diag(np.diag(a)) if diagonal_a else a
    g = np.diag(np.diag(g)) if diagonal_g else g
    return _kron_solve(a, g, v)
  return reference


def _full(case, m, v):
  f = np.asarray(_fisher(case, m))
  return np.linalg.solve(f + DAMPING * np.eye(len(f)), v.reshape(-1)).reshape(v.shape)


def _diagonal(case, m, v):
  return v / (np.diag(np.asarray(_fisher(case, m))).reshape(v.shape) + DAMPING)


def _ekfac(case, m, v):
  a, g = map(np.asarray, _factors(case, m))
  q = np.kron(np.linalg.eigh(a)[1], np.linalg.eigh(g)[1])
  s = np.diag(q.T @ np.asarray(_fisher(case, m)) @ q)
  return (q @ ((q.T @ v.reshape(-1)) / (s + DAMPING))).reshape(v.shape)


def _tied(case, m, v):
  ids, labels = case.batch
  vocab, d = m.shape
  z = m[ids]
  jz = jax.jacfwd(lambda z: case.head(z, m))(z)                 # (N, V, N, T, d)
  h = np.asarray(_hessian(case, m))
  d1 = np.bincount(np.asarray(ids).ravel(), minlength=vocab) / ids.size
  g1 = np.asarray(jnp.einsum("mcntd,mcMC,MCnte->de", jz, h, jz))
  d2 = np.einsum("ncnc->c", h)
  x = np.asarray(jnp.mean(jnp.tanh(z), axis=1))
  a2 = x.T @ x / len(x)
  pi = np.sqrt(np.mean(d2) / (np.trace(a2) / d))
  root = np.sqrt(DAMPING)
  block = np.kron(np.diag(d1), g1) + np.kron(np.diag(d2 + pi * root),
                                             a2 + root / pi * np.eye(d))
  return np.linalg.solve(block, v.reshape(-1)).reshape(v.shape)


_REFERENCES = {
    "kron": _kron(), "kron_indep": _kron(), "kron_reduce": _kron(reduce=True),
    "kron_in_diag": _kron(diagonal_a=True), "kron_out_diag": _kron(diagonal_g=True),
    "diagonal": _diagonal, "full": _full, "ekfac": _ekfac,
}


def _reference(kind: str, approximation: str):
  if kind == "tied_embedding":
    return _tied if approximation == "kron_indep" else None
  return _REFERENCES.get(approximation)


# --- the contract --------------------------------------------------------------------------


@pytest.mark.parametrize("kind,approximation", sorted(blocks.REGISTRY))
def test_block_matches_its_dense_definition(kind, approximation):
  if kind not in _CASES or _reference(kind, approximation) is None:
    pytest.fail(f"registry row ({kind!r}, {approximation!r}) has no dense reference here")
  rng = np.random.default_rng(0)
  case = _CASES[kind](rng)
  tx = jkfac.precondition(case.loss_fn(approximation), case.batch, damping=DAMPING,
                          cov_ema_decay=0.0, invert_every=2, estimation="exact",
                          auto_register=False)
  vector = jax.tree_util.tree_map(lambda p: jnp.asarray(rng.standard_normal(p.shape)),
                                  case.params)

  @jax.jit
  def two_steps(params, batch, vector):
    # Step 0 inverts; step 1 preconditions with those inverses after its own statistics
    # (EKFAC's scaling is measured in step 0's basis).
    state = tx.init(params)
    _, state = tx.update(vector, state, params, batch=batch)
    return tx.update(vector, state, params, batch=batch)[0]

  found = case.matrix(two_steps(case.params, case.batch, vector))
  m = case.matrix(case.params)
  expected = _reference(kind, approximation)(case, m, np.asarray(case.matrix(vector)))
  np.testing.assert_allclose(np.asarray(found), expected, rtol=1e-7, atol=1e-10)
