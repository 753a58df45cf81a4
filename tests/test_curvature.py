"""jkfac.curvature against oracles: hand-written factors averaged over a whole dataset,
the dense `jax.jacfwd` GGN where K-FAC is exact, projected per-example gradients, the
Kronecker posterior's covariance, Bayesian linear regression's evidence, dense influence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from jax.sharding import NamedSharding, PartitionSpec as P

import jkfac
import jkfac.flax
from jkfac import curvature

import _nets

N = 12


def _split(batch, sizes):
  """`batch` cut into consecutive batches of `sizes`."""
  edges = np.cumsum((0,) + tuple(sizes))
  return [jax.tree_util.tree_map(lambda x: x[a:b], batch) for a, b in zip(edges, edges[1:])]


@pytest.mark.parametrize("name", ["mlp", "convnet"])
def test_fit_is_the_factors_averaged_over_all_examples(name):
  with jax.enable_x64(True):
    net = _nets.NETS[name]
    _, params, batch, loss_fn = _nets.make_problem(net, dtype=jnp.float64, batch=N)
    fitted = curvature.fit(loss_fn, params, _split(batch, (5, 4, 3)))
    want = _nets.kron_factors_by_hand(net, params, batch, "exact")
    assert float(fitted.num_examples) == N
    for layer_name, (a, g) in want.items():
      np.testing.assert_allclose(fitted.statistics[layer_name]["A"], a, rtol=1e-9, atol=1e-12)
      np.testing.assert_allclose(fitted.statistics[layer_name]["G"], g, rtol=1e-9, atol=1e-12)


def test_fit_on_a_mesh_with_explicit_axes_is_the_hand_computed_factors():
  """Batches sharded over a mesh with Explicit axes (`jax.make_mesh`'s default): the
  statistics' batch contractions run with the axes made Auto. Oracle: the factors by hand."""
  net = _nets.NETS["mlp"]
  _, params, batch, loss_fn = _nets.make_problem(net, batch=N)
  mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
  rows = NamedSharding(mesh, P("data"))
  sharded = [jax.device_put(b, rows) for b in _split(batch, (8, 4))]
  fitted = curvature.fit(loss_fn, jax.device_put(params, NamedSharding(mesh, P())), sharded)
  want = _nets.kron_factors_by_hand(net, params, batch, "exact")
  for layer_name, (a, g) in want.items():
    np.testing.assert_allclose(fitted.statistics[layer_name]["A"], a, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(fitted.statistics[layer_name]["G"], g, rtol=1e-4, atol=1e-6)


def _regression(n=N, d_in=3, d_out=2, seed=0):
  """One dense layer under squared error, where K-FAC with the exact GGN is exact."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((n, d_in)))
  y = jnp.asarray(rng.standard_normal((n, d_out)))
  module = jkfac.flax.Dense(d_out)
  params = {"Dense_0": {"kernel": jnp.asarray(rng.standard_normal((d_in, d_out))),
                        "bias": jnp.asarray(rng.standard_normal(d_out))}}

  def apply(params, x):
    return module.apply({"params": params["Dense_0"]}, x)

  def loss_fn(params, batch):
    x, y = batch
    prediction = jkfac.register_squared_error(apply(params, x), y)
    return 0.5 * jnp.mean(jnp.sum((prediction - y) ** 2, axis=-1))

  return apply, params, (x, y), loss_fn


def _dense_ggn(apply, params, x):
  """The GGN of the mean squared error, `(1/N) sum_n J_n^T J_n`, from `jax.jacfwd`."""
  flat, unravel = ravel_pytree(params)
  jac = jax.jacfwd(lambda f: apply(unravel(f), x).reshape(-1))(flat)
  return jac.T @ jac / x.shape[0], flat, unravel


def test_inverse_vector_product_and_logdet_equal_the_dense_ggn_where_kfac_is_exact():
  with jax.enable_x64(True):
    apply, params, batch, loss_fn = _regression()
    fitted = curvature.fit(loss_fn, params, _split(batch, (7, 5)))
    ggn, flat, unravel = _dense_ggn(apply, params, batch[0])
    v = jnp.asarray(np.random.default_rng(1).standard_normal(flat.shape))
    damping, scale = 0.3, 2.5
    dense = scale * ggn + damping * jnp.eye(flat.size)
    got = curvature.inverse_vector_product(fitted, unravel(v), damping, scale=scale)
    np.testing.assert_allclose(ravel_pytree(got)[0], jnp.linalg.solve(dense, v), rtol=1e-10)
    got = curvature.vector_product(fitted, unravel(v))
    np.testing.assert_allclose(ravel_pytree(got)[0], ggn @ v, rtol=1e-10)
    np.testing.assert_allclose(curvature.logdet(fitted, damping, scale=scale),
                               jnp.linalg.slogdet(dense)[1], rtol=1e-12)
    assert curvature.num_parameters(fitted) == flat.size


def test_ekfac_scaling_is_the_projected_per_example_gradients_second_moment():
  with jax.enable_x64(True):
    net = _nets.MLP
    _, params, batch, loss_fn = _nets.make_problem(net, dtype=jnp.float64, batch=N)
    fitted = curvature.fit(loss_fn, params, _split(batch, (6, 6)), approximation="ekfac",
                           estimation="empirical")
    for name in net.layer_names:
      grads = _nets.per_example_param_grads(net, params, batch, name)  # (N, (d_in+1) * d_out)
      eigen = fitted.eigen[name]
      grads = grads.reshape(N, eigen["QA"].shape[0], eigen["QG"].shape[0])
      projected = jnp.einsum("ia,nij,jb->nab", eigen["QA"], grads, eigen["QG"])
      np.testing.assert_allclose(eigen["values"], jnp.mean(projected ** 2, axis=0),
                                 rtol=1e-9, atol=1e-14)
      # the bases are K-FAC's: eigenvectors of the empirical factors
      a = fitted.statistics[name]["A"]
      np.testing.assert_allclose(eigen["QA"].T @ a @ eigen["QA"],
                                 jnp.diag(jnp.diag(eigen["QA"].T @ a @ eigen["QA"])), atol=1e-10)


def test_sample_covariance_matches_the_kronecker_posterior():
  with jax.enable_x64(True):
    net = _nets.MLP
    _, params, batch, loss_fn = _nets.make_problem(net, dtype=jnp.float64, batch=N)
    fitted = curvature.fit(loss_fn, params, [batch], layers="Dense_1")
    tau, num = 2.0, 20000
    draws = curvature.sample(fitted, params, jax.random.PRNGKey(0), tau, num)
    # the other layer stays at the point estimate
    np.testing.assert_array_equal(draws["Dense_0"]["kernel"],
                                  jnp.broadcast_to(params["Dense_0"]["kernel"],
                                                   (num,) + params["Dense_0"]["kernel"].shape))
    m = jax.vmap(lambda p: _nets.layer_matrix(p, "Dense_1").reshape(-1))(draws)
    a, g = fitted.statistics["Dense_1"]["A"], fitted.statistics["Dense_1"]["G"]
    want = jnp.linalg.inv(N * jnp.kron(a, g) + tau * jnp.eye(m.shape[1]))
    empirical = jnp.cov(m.T)
    # each covariance entry's standard error: sqrt((S_ii S_jj + S_ij^2) / num)
    se = jnp.sqrt((jnp.outer(jnp.diag(want), jnp.diag(want)) + want ** 2) / num)
    assert float(jnp.max(jnp.abs(empirical - want) / se)) < 5.0
    np.testing.assert_allclose(jnp.mean(m, 0), _nets.layer_matrix(params, "Dense_1").reshape(-1),
                               atol=5 * float(jnp.sqrt(jnp.max(jnp.diag(want)) / num)))


def _generic_scale_problem(n=10, vocab=4, d=3, seed=0):
  """An embedding, then a scalar that no layer covers (a generic parameter) times it,
  under squared error; its leaves by name and the model's outputs as a function."""
  rng = np.random.default_rng(seed)
  ids = jnp.asarray(rng.integers(0, vocab, n))
  y = jnp.asarray(rng.standard_normal((n, d)))
  params = {"emb": jnp.asarray(rng.standard_normal((vocab, d))), "s": jnp.asarray(1.3)}

  def apply(params, ids):
    h = jkfac.register_embedding(params["emb"][ids], ids, params["emb"])
    return jkfac.register_generic(params["s"]) * h

  def loss_fn(params, batch):
    ids, y = batch
    prediction = jkfac.register_squared_error(apply(params, ids), y)
    return 0.5 * jnp.mean(jnp.sum((prediction - y) ** 2, axis=-1))

  return apply, params, (ids, y), loss_fn


@pytest.mark.parametrize("estimation", ["exact", "empirical"])
def test_a_generic_parameters_block_is_its_exact_per_example_diagonal(estimation):
  """The optimizer's generic blocks square one gradient of randomly signed examples; `fit`
  averages exactly: the same for every key and batching. Oracles: the dense GGN's diagonal
  ("exact"), the mean squared per-example gradient ("empirical")."""
  with jax.enable_x64(True):
    apply, params, batch, loss_fn = _generic_scale_problem()
    if estimation == "exact":
      flat, unravel = ravel_pytree(params)
      jac = jax.jacfwd(lambda f: apply(unravel(f), batch[0]).reshape(-1))(flat)
      want = (jac[:, -1] @ jac[:, -1]) / len(batch[0])  # "s" is the last leaf
    else:
      per_example = jax.vmap(lambda i, y: jax.grad(loss_fn)(params, (i[None], y[None]))["s"])(
          *batch)
      want = jnp.mean(per_example ** 2)
    for key, sizes in ((0, (10,)), (1, (10,)), (2, (6, 4))):
      fitted = curvature.fit(loss_fn, params, _split(batch, sizes), estimation=estimation,
                             key=jax.random.PRNGKey(key))
      np.testing.assert_allclose(fitted.statistics["s"]["diagonal"].reshape(()), want,
                                 rtol=1e-10)


def test_fit_counts_examples_from_the_registered_predictions():
  """A batch whose first leaf is not indexed by example (a model state, as in the
  stateful models' docs) still counts the loss's rows. Oracle: the plain batch's fit."""
  with jax.enable_x64(True):
    _, params, batch, loss_fn = _regression()

    def with_state(params, batch):
      return loss_fn(params, batch["data"]) + 0.0 * jnp.sum(batch["a_state"])

    plain = curvature.fit(loss_fn, params, _split(batch, (8, 4)))
    stateful = curvature.fit(with_state, params, [{"a_state": jnp.zeros(32), "data": b}
                                                  for b in _split(batch, (8, 4))])
    assert float(stateful.num_examples) == float(plain.num_examples) == N
    np.testing.assert_allclose(stateful.statistics["Dense_0"]["A"],
                               plain.statistics["Dense_0"]["A"], rtol=1e-12)


def test_fit_keeps_factors_over_max_factor_dim_diagonal_and_warns():
  apply, params, batch, loss_fn = _regression(d_out=6)
  with pytest.warns(jkfac.LargeFactorWarning, match="Dense_0"):
    fitted = curvature.fit(loss_fn, params, [batch], max_factor_dim=4)
  assert fitted.statistics["Dense_0"]["G"].shape == (6,)
  assert fitted.trace.layers[0].approx == "kron_out_diag"


def test_the_evidence_in_float32_is_accurate_at_a_large_prior_precision():
  """`D/2 log τ − ½ Σ log(N s + τ)` cancels at large τ (here D = 620, θ = 0, so that the
  prior's `τ‖θ‖²` is not all there is); oracle: the float64 evidence."""
  with jax.enable_x64(True):
    _, params, batch, loss_fn = _regression(d_in=30, d_out=20)
    params = jax.tree_util.tree_map(jnp.zeros_like, params)
    loss = loss_fn(params, batch)
    fitted = curvature.fit(loss_fn, params, [batch])
    taus = jnp.array([1e3, 1e4, 1e5, 1e6])
    want = jax.vmap(lambda t: curvature.log_marginal_likelihood(fitted, params, loss, t))(taus)
  to32 = lambda tree: jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), tree)
  got = jax.vmap(lambda t: curvature.log_marginal_likelihood(
      to32(fitted), to32(params), jnp.float32(loss), t))(to32(taus))
  np.testing.assert_allclose(got - got[0], want - want[0], atol=1e-5)


def test_fit_rejects_bad_input():
  with jax.enable_x64(True):
    _, params, batch, loss_fn = _nets.make_problem(_nets.MLP, dtype=jnp.float64)
    with pytest.raises(ValueError, match="approximation"):
      curvature.fit(loss_fn, params, [batch], approximation="kronn")
    with pytest.raises(ValueError, match="matches no layer"):
      curvature.fit(loss_fn, params, [batch], layers="Conv_*")
    with pytest.raises(ValueError, match="num_batches"):
      curvature.fit(loss_fn, params, lambda i: batch)
    with pytest.raises(ValueError, match="iterator"):
      curvature.fit(loss_fn, params, iter([batch]))


def _linear_regression(n=20, tau=1.5, seed=0):
  """Bayesian linear regression, unit noise: its MAP parameters for prior precision `tau`
  and the closed-form log evidence `log N(y; 0, I + X Xᵀ / tau)` (X with a ones column)."""
  apply, params, (x, y), loss_fn = _regression(n=n, d_in=2, d_out=1, seed=seed)
  features = jnp.concatenate([x, jnp.ones((n, 1))], axis=1)
  theta = jnp.linalg.solve(features.T @ features + tau * jnp.eye(3), features.T @ y)
  params = {"Dense_0": {"kernel": theta[:2], "bias": theta[2]}}
  cov = jnp.eye(n) + features @ features.T / tau
  evidence = jax.scipy.stats.multivariate_normal.logpdf(y[:, 0], jnp.zeros(n), cov)
  loss = loss_fn(params, (x, y)) + 0.5 * jnp.log(2 * jnp.pi)  # with the Gaussian's constant
  return apply, params, (x, y), loss_fn, loss, evidence


def test_marginal_likelihood_is_bayesian_linear_regressions_evidence():
  with jax.enable_x64(True):
    tau = 1.5
    _, params, batch, loss_fn, loss, evidence = _linear_regression(tau=tau)
    fitted = curvature.fit(loss_fn, params, _split(batch, (8, 12)))
    got = curvature.log_marginal_likelihood(fitted, params, loss, tau)
    np.testing.assert_allclose(got, evidence, rtol=1e-11)
    other = curvature.log_marginal_likelihood(fitted, params, loss, 3 * tau)
    assert not np.isclose(other, evidence, rtol=1e-3)  # the prior precision enters


def test_optimized_prior_precision_meets_mackays_condition():
  with jax.enable_x64(True):
    apply, params, batch, loss_fn, loss, _ = _linear_regression()
    fitted = curvature.fit(loss_fn, params, [batch])
    tau = float(curvature.optimize_prior_precision(fitted, params, loss))
    ggn, flat, _ = _dense_ggn(apply, params, batch[0])
    s = jnp.linalg.eigvalsh(len(batch[0]) * ggn)
    # d/dtau of the evidence: -|θ|²/2 + D/(2 tau) - tr((N F + tau I)^-1)/2 = 0
    terms = (flat @ flat, flat.size / tau, jnp.sum(1 / (s + tau)))
    np.testing.assert_allclose(terms[0], terms[1] - terms[2], rtol=1e-6)


def test_linearized_predictive_of_a_linear_model_has_its_closed_form_variance():
  with jax.enable_x64(True):
    tau = 1.5
    apply, params, (x, y), loss_fn, _, _ = _linear_regression(tau=tau)
    fitted = curvature.fit(loss_fn, params, [(x, y)])
    key, num = jax.random.PRNGKey(3), 4000
    mean, var = curvature.predictive(fitted, apply, params, x[:5], key, tau, num,
                                     likelihood="regression")
    features = jnp.concatenate([x[:5], jnp.ones((5, 1))], axis=1)
    all_features = jnp.concatenate([x, jnp.ones((len(x), 1))], axis=1)
    sigma = jnp.linalg.inv(all_features.T @ all_features + tau * jnp.eye(3))
    want = jnp.einsum("ni,ij,nj->n", features, sigma, features)[:, None]
    assert float(jnp.max(jnp.abs(var / want - 1))) < 5 * np.sqrt(2 / num)
    np.testing.assert_allclose(mean, apply(params, x[:5]), atol=5 * float(jnp.sqrt(
        jnp.max(want) / num)))
    # for a linear model, sampling the model equals sampling its linearization
    mc = curvature.predictive_samples(fitted, apply, params, x[:5], key, tau, 7, method="mc")
    lin = curvature.predictive_samples(fitted, apply, params, x[:5], key, tau, 7)
    np.testing.assert_allclose(mc, lin, rtol=1e-10)


def _dense_block(eigen):
  """A fitted Kronecker block as a dense matrix on the row-major flattened layer matrix."""
  q = jnp.kron(eigen["QA"], eigen["QG"])
  return q @ jnp.diag(eigen["values"].reshape(-1)) @ q.T


@pytest.mark.parametrize("approximation", ["kron", "ekfac"])
def test_influence_equals_the_dense_score_with_the_same_curvature(approximation):
  with jax.enable_x64(True):
    net = _nets.MLP
    _, params, batch, loss_fn = _nets.make_problem(net, dtype=jnp.float64, batch=N)
    fitted = curvature.fit(loss_fn, params, _split(batch, (6, 6)), approximation=approximation)
    queries = jax.tree_util.tree_map(lambda x: x[:3], batch)
    damping = 0.05
    got = curvature.influence(fitted, loss_fn, params, _split(batch, (5, 7)), queries, damping)
    want = 0.0
    for name in net.layer_names:
      dense = _dense_block(fitted.eigen[name]) + damping * jnp.eye(
          fitted.eigen[name]["values"].size)
      train = _nets.per_example_param_grads(net, params, batch, name)
      query = _nets.per_example_param_grads(net, params, queries, name)
      want = want + train @ jnp.linalg.solve(dense, query.T)
    assert got.shape == (N, 3)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def test_a_planted_mislabelled_example_is_the_most_harmful_for_a_query_of_its_class():
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 3.0], [3.0, -2.0], [-3.0, -2.0]])
    labels = np.repeat(np.arange(3), 10)
    x = centres[labels] + rng.standard_normal((30, 2))
    planted = 4
    labels[planted] = 1  # a class-0 point labelled 1
    module = jkfac.flax.Dense(3)

    def loss_fn(params, batch):
      x, y = batch
      logits = jkfac.register_softmax_cross_entropy(module.apply({"params": params}, x), y)
      return _nets.cross_entropy(logits, y)

    params = {"kernel": jnp.zeros((2, 3)), "bias": jnp.zeros(3)}
    batch = (jnp.asarray(x), jnp.asarray(labels))
    step = jax.jit(lambda p: jax.tree_util.tree_map(
        lambda w, g: w - 0.5 * (g + 1e-2 * w), p, jax.grad(loss_fn)(p, batch)))
    for _ in range(300):
      params = step(params)
    fitted = curvature.fit(loss_fn, params, [batch])
    query = (jnp.asarray(centres[:1]), jnp.asarray([0]))
    scores = curvature.influence(fitted, loss_fn, params, [batch], query)[:, 0]
    assert int(jnp.argmin(scores)) == planted
    assert int(jnp.argmax(jnp.abs(scores))) == planted
    assert float(scores[planted]) < 0
