"""Curvature blocks against independent oracles (float64 throughout).

- kron factors A and G against sums of outer products of hand-captured activations,
  hand-built conv patches and per-example output gradients;
- exactness of A ⊗ G for linear networks with squared error (Hessian / GGN);
- two registered losses: their exact Fishers add;
- the diagonal and full blocks against the explicit Fisher built from Jacobians;
- the preconditioned gradient of `jkfac.precondition` against dense inverses;
- the damped inverses and the NaN guards.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jkfac
from jkfac import layers, linalg, layer_table

from tests import _nets

KEY = jax.random.PRNGKey(0)
RTOL, ATOL = 1e-9, 1e-12
APPROXIMATIONS = ("kron", "diagonal", "full")   # the blocks these oracles cover


@pytest.fixture(autouse=True)
def _x64():
  with jax.enable_x64(True):
    yield


def _problem(net_name, approx=None, **kwargs):
  return _nets.make_problem(_nets.NETS[net_name], approx=approx, dtype=jnp.float64, **kwargs)


def _block_statistics(loss_fn, params, batch, estimation, approx):
  """Per layer name, jkfac's block statistics of one batch (and the layer table)."""
  trace = layer_table.trace_layers(loss_fn, params, batch)

  @jax.jit
  def run(params, batch):
    stats = _nets.collect_statistics(loss_fn, trace, params, batch, KEY, estimation)
    return {layer.name: _nets.block_for(approx).statistics(
        _nets.input_rows(layer, stats[layer.name].inputs[0]),
        layers.output_rows(stats[layer.name].output_grads[0])) for layer in trace.layers}

  return run(params, batch), trace


def _run_transform(loss_fn, params, batches, grad_batches=None, **kwargs):
  """`init` and one `update` per batch of `jkfac.precondition(**kwargs)`, in one jit.

  The gradient of step i is taken on `grad_batches[i]` (default: `batches[i]`). Returns
  `[(grads, updates, state)]` per step. (One compilation: op-by-op is slow on CPU.)
  """
  tx = jkfac.precondition(loss_fn, batches[0], **kwargs)

  @jax.jit
  def run(params, batches, grad_batches):
    state, steps = tx.init(params), []
    for batch, grad_batch in zip(batches, grad_batches):
      grads = jax.grad(loss_fn)(params, grad_batch)
      updates, state = tx.update(grads, state, params, batch=batch)
      steps.append((grads, updates, state))
    return steps

  return run(params, batches, grad_batches or batches)


def _random_psd(rng, dim, rank=None):
  x = rng.standard_normal((dim, rank or dim + 2))
  return x @ x.T / x.shape[1]


def _assert_close(actual, expected, rtol=RTOL, atol=ATOL):
  np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=rtol, atol=atol)


# --- kron factors ------------------------------------------------------------------------------


@pytest.mark.parametrize("estimation", ["empirical", "exact"])
@pytest.mark.parametrize("net", list(_nets.NETS))
def test_kron_factors_match_hand_computed(net, estimation):
  _, params, batch, loss_fn = _problem(net)
  stats, _ = _block_statistics(loss_fn, params, batch, estimation, "kron")
  expected = _nets.kron_factors_by_hand(_nets.NETS[net], params, batch, estimation)
  assert list(stats) == list(expected)
  for name, (A, G) in expected.items():
    assert stats[name]["A"].shape == A.shape and stats[name]["G"].shape == G.shape
    _assert_close(stats[name]["A"], A)
    _assert_close(stats[name]["G"], G)
    assert np.abs(G).max() > 1e-4


def _two_head_problem():
  """A tanh trunk feeding two softmax heads of equal class count, in float64."""
  rng = np.random.default_rng(4)
  normal = lambda *s: jnp.asarray(rng.standard_normal(s))
  params = {"trunk": {"kernel": normal(4, 5), "bias": normal(5)},
            "h1": {"kernel": normal(5, 3), "bias": normal(3)},
            "h2": {"kernel": normal(5, 3), "bias": normal(3)}}
  batch = (normal(6, 4), jnp.asarray(rng.integers(0, 3, 6)), jnp.asarray(rng.integers(0, 3, 6)))

  def make_loss(registered):
    def loss_fn(params, batch):
      x, y1, y2 = batch
      p = params["trunk"]
      h = jnp.tanh(jkfac.register_dense(x @ p["kernel"] + p["bias"], x, p["kernel"], p["bias"]))
      total = 0.0
      for head, labels in (("h1", y1), ("h2", y2)):
        p = params[head]
        logits = jkfac.register_dense(h @ p["kernel"] + p["bias"], h, p["kernel"], p["bias"])
        if head in registered:
          logits = jkfac.register_softmax_cross_entropy(logits, labels)
        total += _nets.cross_entropy(logits, labels)
      return total
    return loss_fn

  return params, batch, make_loss


def test_two_losses_add_their_exact_fishers():
  """The Fisher of L1 + L2 (losses on different predictions) is F1 + F2: no cross terms.

  Two 3-class heads have the same number of "exact" columns; each loss still needs its
  own column slots, or G gains the cross terms between the heads.
  """
  params, batch, make_loss = _two_head_problem()
  G = {heads: _block_statistics(make_loss(heads), params, batch, "exact", "kron")[0]["trunk"]["G"]
       for heads in (("h1", "h2"), ("h1",), ("h2",))}
  assert np.abs(G[("h1",)]).max() > 1e-3 and np.abs(G[("h2",)]).max() > 1e-3
  _assert_close(G[("h1", "h2")], G[("h1",)] + G[("h2",)])


_CONV_CASES = {
    # kernel, strides, padding, rhs_dilation, lhs_dilation, bias
    "3x3_stride2_valid": ((3, 3), (2, 2), "VALID", (1, 1), (1, 1), True),
    "2x3_same": ((2, 3), (1, 1), "SAME", (1, 1), (1, 1), True),
    "3x2_stride21_explicit": ((3, 2), (2, 1), ((1, 2), (0, 1)), (1, 1), (1, 1), True),
    "3x3_dilated_same": ((3, 3), (1, 2), "SAME", (2, 1), (1, 1), True),
    "2x2_input_dilation": ((2, 2), (1, 1), ((1, 1), (0, 1)), (1, 1), (2, 2), True),
    "1x1_no_bias": ((1, 1), (1, 1), "VALID", (1, 1), (1, 1), False),
}


def _conv_layer(case):
  """A one-conv problem: its LayerInfo from the tracer, input, kernel, bias, output, pads."""
  kernel_size, strides, padding, rhs_dilation, lhs_dilation, use_bias = _CONV_CASES[case]
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((2, 6, 5, 2)))
  params = {"conv": {"kernel": jnp.asarray(rng.standard_normal(kernel_size + (2, 3)))}}
  if use_bias:
    params["conv"]["bias"] = jnp.asarray(rng.standard_normal(3))
  conv = functools.partial(jax.lax.conv_general_dilated, window_strides=strides, padding=padding,
                           lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
                           dimension_numbers=("NHWC", "HWIO", "NHWC"), precision="highest")

  def loss_fn(params, x):
    p = params["conv"]
    y = conv(x, p["kernel"]) + (p["bias"] if use_bias else 0.0)
    y = jkfac.register_conv2d(y, x, p["kernel"], p.get("bias"), window_strides=strides,
                              padding=padding, lhs_dilation=lhs_dilation,
                              rhs_dilation=rhs_dilation)
    y = jkfac.register_squared_error(y, jnp.zeros_like(y))
    return 0.5 * jnp.mean(jnp.sum(y ** 2, axis=(1, 2, 3)))

  (layer,) = layer_table.trace_layers(loss_fn, params, x).layers
  y = conv(x, params["conv"]["kernel"]) + params["conv"].get("bias", 0.0)
  if padding == "VALID":
    pads = [(0, 0), (0, 0)]
  elif padding == "SAME":
    spans = [(k - 1) * d + 1 for k, d in zip(kernel_size, rhs_dilation)]
    pads = [_nets.same_pads(s, k, st) for s, k, st in zip(x.shape[1:3], spans, strides)]
  else:
    pads = padding
  return layer, x, params["conv"], y, pads


@pytest.mark.parametrize("case", list(_CONV_CASES))
def test_conv_input_rows_reproduce_the_conv(case):
  layer, x, p, y, pads = _conv_layer(case)
  kernel_size, strides, _, rhs_dilation, lhs_dilation, use_bias = _CONV_CASES[case]
  rows = _nets.input_rows(layer, x)
  n, h_out, w_out, c_out = y.shape
  assert rows.shape == (n, h_out * w_out, kernel_size[0] * kernel_size[1] * 2 + use_bias)
  # Patches times the kernel matrix (the parameter matrix, built by hand) give the conv.
  matrix = p["kernel"].reshape(-1, c_out)
  if use_bias:
    matrix = jnp.concatenate([matrix, p["bias"][None]], axis=0)
  _assert_close(rows @ matrix, y.reshape(n, -1, c_out), rtol=1e-10, atol=1e-10)
  # And the patches equal those built by loops over the kernel offsets ...
  by_loops = _nets.patches_by_loops(x, kernel_size, strides, pads, rhs_dilation, lhs_dilation)
  _assert_close(rows[..., :by_loops.shape[-1]], by_loops.reshape(n, -1, by_loops.shape[-1]))
  if use_bias:
    _assert_close(rows[..., -1], 1.0)
  # ... which themselves reproduce the conv (the oracle is right).
  _assert_close(by_loops.reshape(n, -1, by_loops.shape[-1]) @ p["kernel"].reshape(-1, c_out),
                y.reshape(n, -1, c_out) - p.get("bias", 0.0), rtol=1e-10, atol=1e-10)


def test_conv_patches_match_lax_patches():
  """`conv_patches` against `lax.conv_general_dilated_patches`, reordered (c, i, j) -> (i, j, c)."""
  layer, x, _, _, _ = _conv_layer("3x2_stride21_explicit")
  lax_patches = jax.lax.conv_general_dilated_patches(
      x, (3, 2), (2, 1), ((1, 2), (0, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
  n, h, w, _ = lax_patches.shape
  reordered = lax_patches.reshape(n, h, w, 2, 3 * 2).swapaxes(-1, -2).reshape(n, h, w, -1)
  _assert_close(_nets.conv_patches(x, (3, 2), layer.conv), reordered)


# --- exactness for linear networks --------------------------------------------------------------


def _linear_problem(widths, batch):
  """A linear network `x -> ... ` with squared error, each layer tagged; widths d_0, ..., d_L."""
  rng = np.random.default_rng(5)
  params = {f"l{i}": {"kernel": jnp.asarray(rng.standard_normal((a, b))),
                      "bias": jnp.asarray(rng.standard_normal(b))}
            for i, (a, b) in enumerate(zip(widths[:-1], widths[1:]))}
  data = (jnp.asarray(rng.standard_normal((batch, widths[0]))),
          jnp.asarray(rng.standard_normal((batch, widths[-1]))))

  def predict(params, x, tag):
    for i in range(len(widths) - 1):
      k, b = params[f"l{i}"]["kernel"], params[f"l{i}"]["bias"]
      y = jnp.dot(x, k, precision="highest") + b
      x = jkfac.register_dense(y, x, k, b) if tag else y
    return x

  def loss_fn(params, data, tag=True):
    x, targets = data
    y = predict(params, x, tag)
    if tag:
      y = jkfac.register_squared_error(y, targets)
    return 0.5 * jnp.mean(jnp.sum((y - targets) ** 2, axis=-1))

  return params, data, loss_fn, predict


def _flat(params):
  return jnp.concatenate([_nets.layer_matrix(params, name).reshape(-1) for name in params])


def _unflat(params, flat):
  out, start = dict(params), 0
  for name in params:
    size = _nets.layer_matrix(params, name).size
    out = _nets.with_layer_matrix(out, name, flat[start:start + size])
    start += size
  return out


@pytest.mark.parametrize("batch", [1, 5])
def test_kron_is_the_exact_hessian_of_a_linear_layer_with_squared_error(batch):
  params, data, loss_fn, _ = _linear_problem((3, 2), batch)
  stats, _ = _block_statistics(loss_fn, params, data, "exact", "kron")
  A, G = stats["l0"]["A"], stats["l0"]["G"]
  hessian = jax.jit(jax.hessian(lambda flat: loss_fn(_unflat(params, flat), data, tag=False)))(
      _flat(params))
  assert hessian.shape == (8, 8)
  # vec index i * d_out + j of the (d_in + 1, d_out) matrix => kron(A, G).
  _assert_close(np.kron(A, G), hessian)
  assert np.abs(hessian - np.diag(np.diag(hessian))).max() > 1e-2   # not trivially diagonal


def test_kron_blocks_are_the_exact_ggn_blocks_of_a_deep_linear_network():
  widths = (3, 4, 2)
  params, data, loss_fn, predict = _linear_problem(widths, 1)
  stats, _ = _block_statistics(loss_fn, params, data, "exact", "kron")
  flat = _flat(params)
  jac = jax.jit(jax.jacfwd(lambda f: predict(_unflat(params, f), data[0], False)[0]))(flat)
  ggn = jac.T @ jac      # squared error: the output Hessian is I; batch 1
  hessian = jax.jit(jax.hessian(lambda f: loss_fn(_unflat(params, f), data, tag=False)))(flat)
  sizes = [_nets.layer_matrix(params, name).size for name in params]
  assert sum(sizes) == flat.size
  for name, start, size in zip(params, np.cumsum([0] + sizes), sizes):
    block = np.kron(stats[name]["A"], stats[name]["G"])
    _assert_close(block, ggn[start:start + size, start:start + size])
    # In a linear network the loss is quadratic in each layer alone: Hessian block = GGN block.
    _assert_close(block, hessian[start:start + size, start:start + size])
  assert np.abs(ggn[:sizes[0], sizes[0]:]).max() > 1e-2   # the off-diagonal block K-FAC drops


# --- diagonal and full blocks against the explicit Fisher ---------------------------------------


def _explicit_fisher(net, params, x, name):
  """F = (1/N) sum_n J_n^T (diag(p_n) - p_n p_n^T) J_n for the layer's flat matrix."""
  jac = _nets.param_jacobians(net, params, x, name)
  fisher = _nets.softmax_fisher(_nets.forward(net, params, x)[0])
  return np.einsum("ncp,ncd,ndq->pq", jac, fisher, jac) / x.shape[0]


@pytest.mark.parametrize("net", list(_nets.NETS))
def test_diagonal_and_full_blocks_equal_the_explicit_fisher(net):
  _, params, batch, loss_fn = _problem(net)
  diagonal, trace = _block_statistics(loss_fn, params, batch, "exact", "diagonal")
  full, _ = _block_statistics(loss_fn, params, batch, "exact", "full")
  for layer in trace.layers:
    fisher = _explicit_fisher(_nets.NETS[net], params, batch[0], layer.name)
    shape = layers.matrix_shape(layer)
    assert fisher.shape == (shape[0] * shape[1],) * 2
    _assert_close(full[layer.name]["F"], fisher)
    _assert_close(diagonal[layer.name]["diagonal"], np.diag(fisher).reshape(shape))
    assert np.abs(np.diag(fisher)).max() > 1e-4


# --- the preconditioned gradient of the transform ---------------------------------------------


def _expected_update(net, params, batch, grads, name, approx, damping):
  """`block^-1 @ gradient` by dense linear algebra, from hand-computed statistics."""
  m = np.asarray(_nets.layer_matrix(grads, name))
  if approx == "kron":
    A, G = _nets.kron_factors_by_hand(net, params, batch, "empirical")[name]
    pi = np.sqrt((np.trace(A) / A.shape[0]) / (np.trace(G) / G.shape[0]))
    root = np.sqrt(damping)
    return (np.linalg.inv(A + pi * root * np.eye(A.shape[0])) @ m
            @ np.linalg.inv(G + root / pi * np.eye(G.shape[0])))
  per_example = np.asarray(_nets.per_example_param_grads(net, params, batch, name))
  if approx == "diagonal":
    return m / (np.mean(per_example ** 2, axis=0).reshape(m.shape) + damping)
  fisher = per_example.T @ per_example / per_example.shape[0]
  return np.linalg.solve(fisher + damping * np.eye(m.size), m.reshape(-1)).reshape(m.shape)


def _assert_update(updates, params, name, expected):
  kernel = params[name]["kernel"]
  _assert_close(updates[name]["kernel"], expected[:-1].reshape(kernel.shape), rtol=1e-7, atol=1e-10)
  _assert_close(updates[name]["bias"], expected[-1], rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("net,approx,method", [
    (net, approx, "cholesky") for net in _nets.NETS for approx in APPROXIMATIONS] + [
    ("mlp", "kron", "eigh"), ("mlp", "full", "eigh")])
def test_precondition_matches_dense_inverse(net, approx, method):
  damping = 1e-3
  _, params, batch, loss_fn = _problem(net, approx=approx)
  [(grads, updates, _)] = _run_transform(loss_fn, params, [batch], damping=damping,
                                         cov_ema_decay=0.9, invert_every=1,
                                         estimation="empirical", inverse_method=method)
  for name in _nets.NETS[net].layer_names:
    expected = _expected_update(_nets.NETS[net], params, batch, grads, name, approx, damping)
    _assert_update(updates, params, name, expected)
    assert not np.allclose(expected, _nets.layer_matrix(grads, name), rtol=0.1)


def test_precondition_second_step_uses_the_bias_corrected_ema():
  net, damping, decay = _nets.MLP, 1e-2, 0.8
  _, params, batch, loss_fn = _problem("mlp")
  _, _, batch2, _ = _problem("mlp", seed=1)
  _, (grads, updates, _) = _run_transform(loss_fn, params, [batch, batch2], damping=damping,
                                          cov_ema_decay=decay, invert_every=1,
                                          estimation="empirical")
  first = _nets.kron_factors_by_hand(net, params, batch, "empirical")
  second = _nets.kron_factors_by_hand(net, params, batch2, "empirical")
  for name in net.layer_names:
    # EMA weights: decay * (1 - decay) for the first batch, (1 - decay) for the second.
    w1, w2 = decay * (1 - decay), 1 - decay
    A, G = ((w1 * f + w2 * s) / (w1 + w2) for f, s in zip(first[name], second[name]))
    pi = np.sqrt((np.trace(A) / A.shape[0]) / (np.trace(G) / G.shape[0]))
    m = np.asarray(_nets.layer_matrix(grads, name))
    expected = (np.linalg.inv(A + pi * np.sqrt(damping) * np.eye(A.shape[0])) @ m
                @ np.linalg.inv(G + np.sqrt(damping) / pi * np.eye(G.shape[0])))
    _assert_update(updates, params, name, expected)


# --- linalg -------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", linalg.INVERSE_METHODS)
@pytest.mark.parametrize("rank", [None, 2])
def test_damped_inverse(method, rank):
  rng = np.random.default_rng(0)
  matrix, damping = _random_psd(rng, 5, rank), 0.3
  _assert_close(linalg.damped_inverse(jnp.asarray(matrix), damping, method),
                np.linalg.inv(matrix + damping * np.eye(5)), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("n", [1, 7, linalg._LEAF, linalg._LEAF + 1, 2 * linalg._LEAF + 3,
                               4 * linalg._LEAF + 9])
def test_inverse_cholesky_factor_by_halves(n):
  # Sizes at, around and past the leaf size, odd splits, two levels of halves; float64.
  rng = np.random.default_rng(n)
  x = rng.standard_normal((2 * n, n))
  matrix = x.T @ x / (2 * n) + 0.1 * np.eye(n)
  with jax.enable_x64(True):
    got = np.asarray(jax.jit(linalg.inverse_cholesky_factor)(jnp.asarray(matrix)))
    expected = np.linalg.inv(np.linalg.cholesky(matrix))
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-10 * np.abs(expected).max())
    assert np.all(np.triu(got, 1) == 0)
    indefinite = matrix - 2 * np.eye(n)  # no Cholesky factor: NaN, never a wrong answer
    assert np.isnan(np.asarray(linalg.inverse_cholesky_factor(jnp.asarray(indefinite)))).any()


def test_damped_inverse_eigh_clips_negative_eigenvalues():
  rng = np.random.default_rng(1)
  q, _ = np.linalg.qr(rng.standard_normal((4, 4)))
  values = np.array([-1e-2, 0.0, 0.5, 2.0])
  matrix = (q * values) @ q.T
  damping = 0.1
  _assert_close(linalg.damped_inverse(jnp.asarray(matrix), damping, "eigh"),
                (q / (np.maximum(values, 0) + damping)) @ q.T, rtol=1e-9, atol=1e-11)
  _assert_close(linalg.damped_inverse(jnp.asarray(matrix), damping, "cholesky"),
                np.linalg.inv(matrix + damping * np.eye(4)), rtol=1e-9, atol=1e-11)


def test_damped_inverse_rejects_unknown_method():
  with pytest.raises(ValueError, match=r"Unknown inverse method 'lu'"):
    linalg.damped_inverse(jnp.eye(2), 1.0, "lu")


def test_pi_correction():
  rng = np.random.default_rng(2)
  a, g = _random_psd(rng, 4), 3.0 * _random_psd(rng, 2)
  _assert_close(linalg.pi_correction(jnp.asarray(a), jnp.asarray(g)),
                np.sqrt((np.trace(a) / 4) / (np.trace(g) / 2)))
  assert float(linalg.pi_correction(jnp.asarray(a), jnp.zeros((2, 2)))) == 1.0
  assert float(linalg.pi_correction(jnp.zeros((4, 4)), jnp.zeros((2, 2)))) == 1.0


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_finite_or_previous(bad):
  block = _nets.block_for("kron")
  old = {"A": jnp.ones((2, 2)), "G": jnp.ones((3, 3))}
  new = {"A": jnp.full((2, 2), 2.0), "G": jnp.full((3, 3), 2.0)}
  kept, fell_back = block.finite_or_previous(new, old)
  _assert_close(kept["A"], new["A"])
  _assert_close(kept["G"], new["G"])
  assert int(fell_back) == 0
  # A single bad entry in one factor discards every new factor of the layer, under jit too.
  poisoned = dict(new, G=new["G"].at[1, 2].set(bad))
  for run in (block.finite_or_previous, jax.jit(block.finite_or_previous)):
    kept, fell_back = run(poisoned, old)
    _assert_close(kept["A"], old["A"])
    _assert_close(kept["G"], old["G"])
    assert int(fell_back) == 1


@pytest.mark.parametrize("method", linalg.INVERSE_METHODS)
@pytest.mark.parametrize("approx", APPROXIMATIONS)
def test_block_inverses_and_preconditioning_match_dense_formulas(approx, method):
  rng = np.random.default_rng(3)
  d_in, d_out, damping = 4, 3, 0.05
  gradient = rng.standard_normal((d_in, d_out))
  if approx == "kron":
    covs = {"A": _random_psd(rng, d_in), "G": 5.0 * _random_psd(rng, d_out, rank=2)}
    pi = np.sqrt((np.trace(covs["A"]) / d_in) / (np.trace(covs["G"]) / d_out))
    expected = (np.linalg.inv(covs["A"] + pi * np.sqrt(damping) * np.eye(d_in)) @ gradient
                @ np.linalg.inv(covs["G"] + np.sqrt(damping) / pi * np.eye(d_out)))
  elif approx == "diagonal":
    covs = {"diagonal": rng.uniform(0, 2, (d_in, d_out))}
    expected = gradient / (covs["diagonal"] + damping)
  else:
    covs = {"F": _random_psd(rng, d_in * d_out, rank=5)}
    expected = np.linalg.solve(covs["F"] + damping * np.eye(d_in * d_out),
                               gradient.reshape(-1)).reshape(d_in, d_out)
  block = _nets.block_for(approx)
  covs = {k: jnp.asarray(v) for k, v in covs.items()}
  assert jax.tree_util.tree_map(jnp.shape, block.zeros(d_in, d_out)) == jax.tree_util.tree_map(
      jnp.shape, covs)
  inverses = _nets.block_inverses(block, covs, damping, method)
  _assert_close(block.precondition(inverses, jnp.asarray(gradient)), expected, rtol=1e-8,
                atol=1e-10)


@pytest.mark.parametrize("approx", APPROXIMATIONS)
def test_finite_or_previous_guards_block_inverses(approx):
  d_in, d_out = 3, 2
  block = _nets.block_for(approx)
  nan_covs = jax.tree_util.tree_map(lambda z: jnp.full_like(z, jnp.nan), block.zeros(d_in, d_out))
  # Any finite inverses.
  old = _nets.block_inverses(block, block.zeros(d_in, d_out), 0.5, "cholesky")
  for method in linalg.INVERSE_METHODS:
    raw = _nets.block_inverses(block, nan_covs, 0.1, method)
    assert not all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(raw))
    kept, fell_back = block.finite_or_previous(raw, old)
    assert int(fell_back) == 1
    for k, o in zip(jax.tree_util.tree_leaves(kept), jax.tree_util.tree_leaves(old)):
      _assert_close(k, o)


# --- the transform never emits NaN ----------------------------------------------------------------


_FIRST_COVARIANCE = {"kron": "A", "diagonal": "diagonal", "full": "F"}


@pytest.mark.parametrize("approx", APPROXIMATIONS)
def test_a_non_finite_batch_changes_nothing_but_the_skip_counter(approx):
  _, params, batch, loss_fn = _problem("mlp", approx=approx)
  nan_batch = (batch[0].at[0, 0].set(jnp.nan), batch[1])     # poisons every statistic
  (_, first, state), (_, second, state2) = _run_transform(
      loss_fn, params, [batch, nan_batch], grad_batches=[batch, batch], damping=1e-2,
      cov_ema_decay=0.9, invert_every=1, estimation="empirical")
  assert all((np.asarray(x) == 0).all() for x in jax.tree_util.tree_leaves(second))
  assert int(state2.skipped_steps) == int(state.skipped_steps) + 1 == 1
  for a, b in zip(jax.tree_util.tree_leaves(state2._replace(skipped_steps=0)),
                  jax.tree_util.tree_leaves(state._replace(skipped_steps=0))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("method", linalg.INVERSE_METHODS)
def test_zero_damping_from_a_schedule_is_raised_to_the_floor(method):
  """Zero damping on a factor with an exactly zero row (an input that is always 0)."""
  _, params, batch, loss_fn = _problem("mlp")
  batch = (batch[0].at[:, 2].set(0.0), batch[1])
  (_, _, state), (_, updates, state2) = _run_transform(
      loss_fn, params, [batch, batch], damping=lambda count: jnp.where(count == 0, 1e-2, 0.0),
      cov_ema_decay=0.9, invert_every=1, estimation="empirical", inverse_method=method)
  A = np.asarray(state2.statistics["Dense_0"]["A"]) / float(state2.ema_weight)
  assert (A[2] == 0).all() and (A[:, 2] == 0).all()
  assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(updates))
  # Damping 0 became MIN_DAMPING: the inverse is that of the floored damping, not a fallback.
  assert float(state2.damping) == pytest.approx(jkfac.MIN_DAMPING)
  assert int(state2.inverse_fallbacks) == 0
  G = np.asarray(state2.statistics["Dense_0"]["G"]) / float(state2.ema_weight)
  pi = np.sqrt((np.trace(A) / A.shape[0]) / (np.trace(G) / G.shape[0]))
  expected = np.linalg.inv(A + pi * np.sqrt(jkfac.MIN_DAMPING) * np.eye(A.shape[0]))
  _assert_close(state2.inverses["Dense_0"]["A"], expected, rtol=1e-3, atol=1e-6)


# --- Kronecker blocks with a diagonal factor -------------------------------------------------


@pytest.mark.parametrize("approx", ["kron_in_diag", "kron_out_diag"])
def test_kron_with_a_diagonal_factor_matches_dense_formula(approx):
  """The kept factor equals kron's; the other is the diagonal of kron's; the step is
  `(A' + pi sqrt(λ) I)^-1 M (G' + sqrt(λ)/pi I)^-1` with pi from the diagonals used."""
  _, params, batch, loss_fn = _problem("mlp")
  damping = 1e-2
  grads = jax.grad(loss_fn)(params, batch)

  def step(approx):
    tx = jkfac.precondition(loss_fn, batch, damping=damping, estimation="empirical",
                            invert_every=1, approximations={"*": approx})
    return jax.jit(lambda g: tx.update(g, tx.init(params), params, batch=batch))(grads)

  _, kron_state = step("kron")
  updates, state = step(approx)
  trace = layer_table.trace_layers(loss_fn, params, batch)
  leaves = jax.tree_util.tree_leaves(grads)
  out = jax.tree_util.tree_leaves(updates)
  for layer in trace.layers:
    A, G = (np.asarray(kron_state.statistics[layer.name][k] / kron_state.ema_weight)
            for k in ("A", "G"))   # bias-corrected: the batch statistics on step 1
    A, G = (np.diag(np.diag(A)), G) if approx == "kron_in_diag" else (A, np.diag(np.diag(G)))
    kept = {k: v / state.ema_weight for k, v in state.statistics[layer.name].items()}
    _assert_close(kept["A"] if kept["A"].ndim == 2 else np.diag(kept["A"]), A)
    _assert_close(kept["G"] if kept["G"].ndim == 2 else np.diag(kept["G"]), G)
    pi = np.sqrt((np.trace(A) / len(A)) / (np.trace(G) / len(G)))
    M = layers.param_matrix(layer, leaves[layer.weight], leaves[layer.bias])
    expected = (np.linalg.inv(A + pi * np.sqrt(damping) * np.eye(len(A))) @ np.asarray(M)
                @ np.linalg.inv(G + np.sqrt(damping) / pi * np.eye(len(G))))
    _assert_close(layers.param_matrix(layer, out[layer.weight], out[layer.bias]), expected,
                  rtol=1e-7, atol=1e-10)
