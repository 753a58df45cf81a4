"""Loss masks and per-row weights on registered losses; the loss-scale check.

Oracles: a padded batch with a mask gives the statistics and the update of the same
batch with the padded rows removed (tokens of a per-token model under "exact", whose
statistics do not depend on how rows group into examples); per-row weights give the
dense float64 GGN of `mean_r w_r NLL_r` (`jax.jacfwd`); K-FAC-reduce and the masked
input factor of a model that mixes positions match hand formulas.
"""

from __future__ import annotations

import functools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jkfac
from jkfac import adaptive

from tests import _asserts, _nets

jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})

N, T, D, H, C = 3, 4, 5, 4, 3


@pytest.fixture(autouse=True)
def _x64():
  """Float64 throughout: the oracles compare preconditioned updates, which amplify round-off."""
  with jax.enable_x64(True):
    yield


def _params(sizes=(D, H, C), seed=0, dtype=jnp.float64):
  rng = np.random.default_rng(seed)
  return {f"dense{i}": {"kernel": jnp.asarray(rng.standard_normal((a, b)) / math.sqrt(a), dtype),
                        "bias": jnp.asarray(0.3 * rng.standard_normal(b), dtype)}
          for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))}


def _dense(p, x, tag=True):
  y = x @ p["kernel"] + p["bias"]
  return jkfac.register_dense(y, x, p["kernel"], p["bias"]) if tag else y


def _logits(params, x, tag=True):
  return _dense(params["dense1"], jnp.tanh(_dense(params["dense0"], x, tag)), tag)


def _masked_mean(values, mask):
  mask = jnp.ones(values.shape) if mask is None else mask.astype(values.dtype)
  return jnp.sum(mask * values) / jnp.sum(mask)


def _classifier_loss(params, batch):
  """Softmax cross-entropy on `(N, [T,] C)` logits, the masked mean over rows."""
  mask = batch.get("mask")
  logits = jkfac.register_softmax_cross_entropy(_logits(params, batch["x"]), batch["y"],
                                                mask=mask)
  return _masked_mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]), mask)


def _padded(shape, seed=0):
  """A batch of rows `shape` whose padded rows hold large garbage, its mask, and the batch of
  its real rows alone."""
  rng = np.random.default_rng(seed)
  mask = rng.random(shape) < 0.6
  mask.flat[0] = True
  x = rng.standard_normal(shape + (D,))
  x[~mask] = 10 * rng.standard_normal((int((~mask).sum()), D))
  y = rng.integers(0, C, shape)
  padded = {"x": jnp.asarray(x), "y": jnp.asarray(y, jnp.int32), "mask": jnp.asarray(mask)}
  real = {"x": jnp.asarray(x[mask]), "y": jnp.asarray(y[mask], jnp.int32)}
  return padded, real


def _step(loss_fn, params, batch, estimation, approximations):
  """`(gradients, updates, statistics)` of one `precondition` step from a fresh state."""
  tx = jkfac.precondition(loss_fn, batch, damping=1e-3, cov_ema_decay=0.0,
                          estimation=estimation, approximations=approximations)

  @jit
  def run(params, batch):
    grads = jax.grad(loss_fn)(params, batch)
    updates, state = tx.update(grads, tx.init(params), params, batch=batch)
    return grads, updates, state.statistics

  return run(params, batch)


_APPROXIMATIONS = [{"dense0": "kron", "dense1": "full"},
                   {"dense0": "kron_in_diag", "dense1": "kron_out_diag"},
                   {"dense0": "diagonal", "dense1": "kron"}]


# Sequence rows under every block; classifier rows under two of the block sets.
@pytest.mark.parametrize("rows,estimation,approximations", [
    *[((N, T), "exact", approximations) for approximations in _APPROXIMATIONS],
    ((2 * N,), "exact", _APPROXIMATIONS[0]), ((2 * N,), "empirical", _APPROXIMATIONS[2])])
def test_masked_rows_are_as_if_removed(rows, estimation, approximations):
  params = _params()
  padded, real = _padded(rows)
  got = _step(_classifier_loss, params, padded, estimation, approximations)
  want = _step(_classifier_loss, params, real, estimation, approximations)
  _asserts.assert_trees_close(got, want, rtol=2e-5, atol=1e-6)


def test_masked_classifier_differs_from_the_padded_batch_without_a_mask():
  params = _params()
  padded, _ = _padded((2 * N,))
  masked = _step(_classifier_loss, params, padded, "exact", _APPROXIMATIONS[0])[2]
  unmasked = _step(_classifier_loss, params, {**padded, "mask": jnp.ones(2 * N, bool)}, "exact",
                   _APPROXIMATIONS[0])[2]
  assert not np.allclose(masked["dense0"]["A"], unmasked["dense0"]["A"], rtol=0.05)


def test_masked_kron_reduce_averages_the_real_positions():
  """A = mean over sequences with a real token of the masked mean input; G = sum_n of the
  sequences' summed output gradients (the cotangents of padded rows are zero)."""
  params = _params()
  padded, _ = _padded((N, T), seed=1)
  mask = np.asarray(padded["mask"]).copy()
  mask[1] = False  # a sequence of padding only: it counts in neither factor
  padded["mask"] = jnp.asarray(mask)
  stats = _step(_classifier_loss, params, padded, "empirical", {"*": "kron_reduce"})[2]
  x = np.asarray(padded["x"], np.float64)
  a = np.concatenate([x, np.ones((N, T, 1))], axis=-1)
  real = mask.sum(axis=1) > 0
  a_bar = np.einsum("nt,ntd->nd", mask, a)[real] / mask.sum(axis=1)[real, None]
  hidden = jnp.tanh(_dense(params["dense0"], padded["x"], tag=False))
  logits = _dense(params["dense1"], hidden, tag=False)
  g = np.asarray(jax.grad(lambda y: _masked_mean(
      optax.softmax_cross_entropy_with_integer_labels(y, padded["y"]), padded["mask"]))(
          logits)) * np.sqrt(mask.sum())
  g_sum = g.sum(axis=1)
  h = np.concatenate([np.asarray(hidden, np.float64), np.ones((N, T, 1))], axis=-1)
  h_bar = np.einsum("nt,ntd->nd", mask, h)[real] / mask.sum(axis=1)[real, None]
  np.testing.assert_allclose(stats["dense0"]["A"], a_bar.T @ a_bar / real.sum(), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(stats["dense1"]["A"], h_bar.T @ h_bar / real.sum(), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(stats["dense1"]["G"], g_sum.T @ g_sum, rtol=1e-5, atol=1e-6)


# --- layers that mix positions, per-row weights: the dense GGN -------------------------------


def _mixing_problem(kind, mask, weights):
  """x `(N, T, D)` -> dense0 -> tanh -> a T x T mixing -> dense1 -> `(N, T, C)`, float64; the
  loss is `sum_r m_r w_r NLL_r / sum_r m_r` (`/ N T` without a mask)."""
  rng = np.random.default_rng(3)
  params = _params(seed=3)
  mix = jnp.asarray(rng.standard_normal((T, T)) / math.sqrt(T), jnp.float64)
  x = jnp.asarray(rng.standard_normal((N, T, D)), jnp.float64)
  targets = (jnp.asarray(rng.integers(0, C, (N, T)), jnp.int32) if kind == "softmax_cross_entropy"
             else jnp.asarray(rng.standard_normal((N, T, C)), jnp.float64))

  def logits_fn(params, x, tag=True):
    h = jnp.einsum("st,nth->nsh", mix, jnp.tanh(_dense(params["dense0"], x, tag)))
    return _dense(params["dense1"], h, tag)

  def loss_fn(params, batch):
    x, targets = batch
    y = logits_fn(params, x)
    weight = 1.0 if weights is None else weights
    if kind == "softmax_cross_entropy":
      y = jkfac.register_softmax_cross_entropy(y, targets, weight=weight, mask=mask)
      per_row = optax.softmax_cross_entropy_with_integer_labels(y, targets)
    else:
      y = jkfac.register_squared_error(y, targets, weight=weight, mask=mask)
      per_row = 0.5 * jnp.sum((y - targets) ** 2, axis=-1)
    return _masked_mean(weight * per_row, mask)

  return params, (x, targets), loss_fn, logits_fn


@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("kind", ["softmax_cross_entropy", "squared_error"])
def test_row_weights_give_the_weighted_ggn(kind, with_mask):
  rng = np.random.default_rng(4)
  weights = jnp.asarray(rng.uniform(0.2, 2.0, (N, T)), jnp.float64)
  mask = jnp.asarray(rng.random((N, T)) < 0.7).at[0, 0].set(True) if with_mask else None
  approximations = {"dense0": "full", "dense1": "diagonal"}
  params, batch, loss_fn, logits_fn = _mixing_problem(kind, mask, weights)
  _, _, stats = _step(loss_fn, params, batch, "exact", approximations)
  m = np.ones((N, T)) if mask is None else np.asarray(mask, np.float64)
  scale = jnp.asarray(np.asarray(weights) * m / m.sum())
  for name, approx in approximations.items():
    ggn = np.asarray(_nets.row_scaled_ggn(logits_fn, params, batch[0], name, kind, scale))
    want = {"F": ggn} if approx == "full" else {
        "diagonal": np.diag(ggn).reshape(-1, params[name]["kernel"].shape[1])}
    _asserts.assert_trees_close(stats[name], want, rtol=1e-6, atol=1e-12)


def test_masked_input_factor_of_a_model_that_mixes_positions():
  """dense0's inputs `(N, T, D)` line up with the `(N, T)` mask: A is their masked mean;
  dense1's inputs (mixed positions) line up too."""
  rng = np.random.default_rng(5)
  mask = jnp.asarray(rng.random((N, T)) < 0.6).at[0, 0].set(True)
  params, batch, loss_fn, _ = _mixing_problem("softmax_cross_entropy", mask, None)
  stats = _step(loss_fn, params, batch, "fisher", {"*": "kron"})[2]
  m = np.asarray(mask, np.float64)
  a = np.concatenate([np.asarray(batch[0]), np.ones((N, T, 1))], axis=-1)
  want = np.einsum("nt,ntd,nte->de", m, a, a) / m.sum()
  np.testing.assert_allclose(stats["dense0"]["A"], want, rtol=1e-5, atol=1e-6)


def test_a_layer_inside_a_scan_over_time_keeps_every_row():
  """dense0 runs per step on `(N, D)` inputs, which are not the loss's `(N, T)` rows: its A
  averages every row; dense1, on the stacked `(N, T, H)` outputs, averages the real ones."""
  params = _params()
  padded, _ = _padded((N, T), seed=11)

  def loss_fn(params, batch):
    def step(carry, x):
      return carry, jnp.tanh(_dense(params["dense0"], x))
    _, hidden = jax.lax.scan(step, None, jnp.swapaxes(batch["x"], 0, 1))   # (T, N, H)
    hidden = jnp.swapaxes(hidden, 0, 1)
    logits = jkfac.register_softmax_cross_entropy(_dense(params["dense1"], hidden), batch["y"],
                                                  mask=batch["mask"])
    return _masked_mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]),
                        batch["mask"])

  stats = _step(loss_fn, params, padded, "fisher", {"*": "kron"})[2]
  m = np.asarray(padded["mask"], np.float64)
  a = np.concatenate([np.asarray(padded["x"]), np.ones((N, T, 1))], axis=-1)
  np.testing.assert_allclose(stats["dense0"]["A"], np.einsum("ntd,nte->de", a, a) / (N * T),
                             rtol=1e-6)
  h = np.tanh(np.asarray(_dense(params["dense0"], padded["x"], tag=False)))
  h = np.concatenate([h, np.ones((N, T, 1))], axis=-1)
  np.testing.assert_allclose(stats["dense1"]["A"], np.einsum("nt,ntd,nte->de", m, h, h) / m.sum(),
                             rtol=1e-6)


@pytest.mark.parametrize("second_masked", [True, False])
def test_several_lined_up_losses_count_a_row_if_any_counts_it(second_masked):
  params = _params()
  padded, _ = _padded((N, T), seed=12)
  other = jnp.asarray(np.random.default_rng(13).random((N, T)) < 0.5)

  def loss_fn(params, batch):
    logits = _logits(params, batch["x"])
    first = jkfac.register_softmax_cross_entropy(logits, batch["y"], mask=batch["mask"])
    second = jkfac.register_squared_error(logits, jnp.zeros_like(logits),
                                          mask=other if second_masked else None)
    return (_masked_mean(optax.softmax_cross_entropy_with_integer_labels(first, batch["y"]),
                         batch["mask"])
            + _masked_mean(0.5 * jnp.sum(second ** 2, -1), other if second_masked else None))

  stats = _step(loss_fn, params, padded, "fisher", {"*": "kron"})[2]
  m = (np.maximum(np.asarray(padded["mask"]), np.asarray(other)) if second_masked
       else np.ones((N, T))).astype(np.float64)
  a = np.concatenate([np.asarray(padded["x"]), np.ones((N, T, 1))], axis=-1)
  np.testing.assert_allclose(stats["dense0"]["A"], np.einsum("nt,ntd,nte->de", m, a, a) / m.sum(),
                             rtol=1e-6)


def test_one_dimensional_predictions_take_per_example_weights():
  params = _params((D, H, 1))
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.standard_normal((2 * N, D)))
  t = jnp.asarray(rng.standard_normal(2 * N))
  w = jnp.asarray(rng.uniform(0.5, 2.0, 2 * N))

  def loss(flat):
    def loss_fn(params, batch):
      y = _logits(params, batch["x"])
      if flat:
        y = jkfac.register_squared_error(y[:, 0], batch["t"], weight=batch["w"])
      else:
        y = jkfac.register_squared_error(y, batch["t"][:, None], weight=batch["w"])[:, 0]
      return jnp.mean(batch["w"] * 0.5 * (y - batch["t"]) ** 2)
    return loss_fn

  batch = {"x": x, "t": t, "w": w}
  got = _step(loss(True), params, batch, "exact", {"*": "kron"})
  want = _step(loss(False), params, batch, "exact", {"*": "kron"})
  _asserts.assert_trees_close(got, want, rtol=1e-5, atol=1e-7)


# --- embeddings: masked id counts --------------------------------------------------------------


VOCAB = 7


def _lm_loss(tied):
  """ids -> embedding -> dense (tanh) -> logits by the tied table (or a dense layer)."""
  def loss_fn(params, batch):
    ids, mask = batch["ids"], batch.get("mask")
    table = params["embed"]
    e = jkfac.register_embedding(table[ids], ids, table)
    h = jnp.tanh(_dense(params["dense0"], e))
    if tied:
      logits = jkfac.register_embedding_projection(h @ table.T, h, table)
    else:
      logits = _dense(params["dense1"], h)
    logits = jkfac.register_softmax_cross_entropy(logits, batch["y"], mask=mask)
    return _masked_mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]), mask)
  return loss_fn


@pytest.mark.parametrize("tied", [False, True])
def test_masked_tokens_leave_the_embedding_counts(tied):
  rng = np.random.default_rng(8)
  params = {"embed": jnp.asarray(rng.standard_normal((VOCAB, D))),
            **_params((D, D, VOCAB), seed=8)}
  if tied:
    params.pop("dense1")
  mask = rng.random((N, T)) < 0.6
  mask[0, 0] = True
  ids = rng.integers(0, VOCAB, (N, T))
  ids[~mask] = 0  # padding id: its count comes from real tokens only
  y = rng.integers(0, VOCAB, (N, T))
  padded = {"ids": jnp.asarray(ids), "y": jnp.asarray(y), "mask": jnp.asarray(mask)}
  real = {"ids": jnp.asarray(ids[mask][:, None]), "y": jnp.asarray(y[mask][:, None])}
  got = _step(_lm_loss(tied), params, padded, "exact", None)
  want = _step(_lm_loss(tied), params, real, "exact", None)
  _asserts.assert_trees_close(got, want, rtol=2e-5, atol=1e-6)


# --- the quadratic model -------------------------------------------------------------------------


def _gram(loss_fn, params, batch):
  """`(L, [v_i^T G v_j])` of the quadratic model for two fixed directions."""
  rng = np.random.default_rng(9)
  vectors = [jax.tree_util.tree_map(lambda p: jnp.asarray(rng.standard_normal(p.shape),
                                                          p.dtype), params) for _ in range(2)]
  problem = adaptive.Problem(params, params, lambda v: v, adaptive.model(loss_fn, params, batch),
                              adaptive.l2_mask(params, None), None, None)
  return jit(lambda: adaptive.curvature_products(problem, vectors))()


@pytest.mark.parametrize("rows", [(N, T), (2 * N,)])
def test_qmodel_gram_with_a_mask_is_that_of_the_real_rows(rows):
  params = _params()
  padded, real = _padded(rows, seed=2)
  _asserts.assert_trees_close(_gram(_classifier_loss, params, padded),
                              _gram(_classifier_loss, params, real), rtol=1e-5, atol=1e-7)


def test_qmodel_gram_with_row_weights_is_the_weighted_ggn():
  rng = np.random.default_rng(10)
  weights = jnp.asarray(rng.uniform(0.2, 2.0, (N, T)), jnp.float64)
  params, batch, loss_fn, logits_fn = _mixing_problem("softmax_cross_entropy", None, weights)
  _, gram = _gram(loss_fn, params, batch)
  rng = np.random.default_rng(9)  # `_gram`'s directions
  vectors = [jax.tree_util.tree_map(lambda p: jnp.asarray(rng.standard_normal(p.shape)), params)
             for _ in range(2)]
  logits = lambda p: logits_fn(p, batch[0], tag=False)
  p = jax.nn.softmax(logits(params))
  scale = np.asarray(weights) / (N * T)
  jv = [jax.jvp(logits, (params,), (v,))[1] for v in vectors]
  hv = [p * u - p * jnp.sum(p * u, -1, keepdims=True) for u in jv]
  want = np.array([[np.sum(scale[..., None] * u * h) for h in hv] for u in jv])
  np.testing.assert_allclose(gram, want, rtol=1e-5)


# --- registration errors ---------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,match", [
    ({"mask": jnp.ones((N,))}, r"mask of shape \(3,\) must have one entry per row, shape \(3, 4\)"),
    ({"weight": jnp.ones((N, T, C))}, "weight of shape"),
    ({"weight": -jnp.ones((N, T))}, "weight must be non-negative"),
    ({"mask": -jnp.ones((N, T))}, "mask must be non-negative"),
    ({"weight": 0.0}, "weight must be positive"),
])
def test_bad_masks_and_weights_raise(kwargs, match):
  with pytest.raises(ValueError, match="softmax_cross_entropy loss: " + match):
    jkfac.register_softmax_cross_entropy(jnp.zeros((N, T, C)), jnp.zeros((N, T), jnp.int32),
                                         **kwargs)
  with pytest.raises(ValueError, match="squared_error loss"):
    jkfac.register_squared_error(jnp.zeros(N), jnp.zeros(N), mask=jnp.ones((N, 1)))


# --- the loss-scale check ------------------------------------------------------------------------


def _token_loss(reduce, has_aux=False, masked=True):
  """The masked LM-style loss with its per-token losses reduced by `reduce(losses, mask)`."""
  def loss_fn(params, batch):
    mask = batch["mask"] if masked else None
    logits = jkfac.register_softmax_cross_entropy(_logits(params, batch["x"]), batch["y"],
                                                  mask=mask)
    loss = reduce(optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]),
                  jnp.ones(batch["y"].shape, bool) if mask is None else mask)
    return (loss, {"logits": logits}) if has_aux else loss
  return loss_fn


_MEAN = lambda losses, mask: jnp.sum(mask * losses) / jnp.sum(mask)
_PER_SEQUENCE_SUM = lambda losses, mask: jnp.mean(jnp.sum(mask * losses, axis=1))


def _scale_warnings(tx, params):
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    tx.init(params)
  return [w for w in caught if issubclass(w.category, jkfac.LossScaleWarning)]


@pytest.mark.parametrize("masked", [False, True])
def test_a_per_sequence_sum_warns_at_init_and_strict_raises(masked):
  params, (batch, _) = _params(), _padded((N, T))
  loss_fn = _token_loss(_PER_SEQUENCE_SUM, masked=masked)
  with pytest.warns(jkfac.LossScaleWarning, match="looks like a per-sequence sum"):
    jkfac.kfac(loss_fn, batch, learning_rate=0.1, damping=1e-2).init(params)
  with pytest.raises(ValueError, match="per-sequence sum: use the mean over all rows"):
    jkfac.precondition(loss_fn, batch, damping=1e-2, strict=True).init(params)
  loss, registered = jkfac.check_loss_scale(_token_loss(_MEAN, masked=masked), params, batch)
  counted = float(np.asarray(batch["mask"]).sum()) if masked else N * T
  with pytest.warns(jkfac.LossScaleWarning):
    summed, _ = jkfac.check_loss_scale(loss_fn, params, batch)
  np.testing.assert_allclose(summed, loss * counted / N, rtol=1e-6)
  np.testing.assert_allclose(registered, loss, rtol=1e-6)


def test_an_image_loss_summed_over_pixels_is_told_to_register_rows_of_pixels():
  """A reconstruction summed over pixels, its `(N, H, W, C)` prediction registered as is:
  the hint says how to register that sum (one row per example), and doing so is silent."""
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  params = {"w": 0.1 * jax.random.normal(k1, (3, 3))}
  batch = {"x": jax.random.normal(k2, (N, 4, 4, 3))}

  def summed_loss(flatten):
    def loss_fn(params, batch):
      out = batch["x"] @ params["w"]
      if flatten:
        jkfac.register_squared_error(out.reshape(N, -1), batch["x"].reshape(N, -1))
      else:
        jkfac.register_squared_error(out, batch["x"])
      return 0.5 * jnp.mean(jnp.sum((out - batch["x"]) ** 2, axis=(1, 2, 3)))
    return loss_fn

  with pytest.warns(jkfac.LossScaleWarning, match=r"reshaped to \(batch, -1\)"):
    jkfac.check_loss_scale(summed_loss(False), params, batch)
  loss, registered = jkfac.check_loss_scale(summed_loss(True), params, batch)
  np.testing.assert_allclose(registered, loss, rtol=1e-6)


def test_the_mean_over_rows_does_not_warn_also_with_aux():
  params, (batch, _) = _params(), _padded((N, T))
  for loss_fn in (_token_loss(_MEAN), _token_loss(_MEAN, has_aux=True)):
    assert not _scale_warnings(jkfac.kfac(loss_fn, batch, learning_rate=0.1, damping=1e-2),
                               params)
  with pytest.warns(jkfac.LossScaleWarning):
    jkfac.check_loss_scale(_token_loss(_PER_SEQUENCE_SUM, has_aux=True), params, batch)


def test_a_mask_normalised_by_all_rows_warns():
  params, (batch, _) = _params(), _padded((N, T))
  counted = float(np.asarray(batch["mask"]).sum())
  assert counted / (N * T) < 1 / 1.5
  loss_fn = _token_loss(lambda losses, mask: jnp.mean(mask * losses))
  with pytest.warns(jkfac.LossScaleWarning,
                    match=f"mean over all {N * T} rows, padded ones included, while the "
                          f"registered mask counts {counted:.0f}"):
    jkfac.check_loss_scale(loss_fn, params, batch)


def test_the_check_needs_concrete_values():
  """Under jit, or with an example batch of shapes, `init` has no values to compare."""
  params, (batch, _) = _params(), _padded((N, T))
  loss_fn = _token_loss(_PER_SEQUENCE_SUM)
  tx = jkfac.precondition(loss_fn, batch, damping=1e-2, strict=True)
  jax.eval_shape(tx.init, params)
  shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch)
  jkfac.precondition(loss_fn, shapes, damping=1e-2, strict=True).init(params)
