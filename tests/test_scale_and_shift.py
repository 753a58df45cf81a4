"""Scale-and-shift layers (norms) and `jkfac.register_generic`.

- automatic registration of flax.linen LayerNorm / BatchNorm / GroupNorm, nnx.LayerNorm
  and plain `x_hat * scale + shift` equals tagging by hand (`register_scale_and_shift`);
- the "diagonal" and "full" blocks against per-example gradients (`jax.vmap(jax.grad)`)
  and against the explicit Fisher built from Jacobians;
- the first `jkfac.kfac` step of an MLP with a LayerNorm against the dense layers'
  Kronecker solves and the norm's diagonal solve, by hand; `describe`, `register_generic`,
  and the errors of bad input.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jkfac
from jkfac import layer_collection, layer_table
from tests import _nets
from tests._asserts import assert_trees_close

KEY = jax.random.PRNGKey(0)
NUM_CLASSES = 3
D = 6   # channels of the norm layers

_batch = _nets.random_batch
_random_like = functools.partial(_nets.random_like, vector_mean=1.0)


def _loss(apply):
  """`loss_fn(params, batch)` from `apply(params, batch) -> logits`; batch = (x, labels, ...)."""
  def loss_fn(params, batch):
    logits = jkfac.register_softmax_cross_entropy(apply(params, batch), batch[1])
    return _nets.cross_entropy(logits, batch[1])
  return loss_fn


def _one_update(loss_fn, params, batch, **kwargs):
  """`(updates, state)` of one jitted `jkfac.kfac` step with the true targets."""
  options = dict(learning_rate=0.1, damping=1e-2, estimation="empirical", invert_every=1)
  tx = jkfac.kfac(loss_fn, batch, **{**options, **kwargs})
  return jax.jit(lambda p, b: tx.update(jax.grad(loss_fn)(p, b), tx.init(p), p, batch=b))(
      params, batch)


def _assert_auto_equals_hand(auto_loss, hand_loss, params, batch, expected, hand_batch=None):
  """Same layer table, covariances and K-FAC step for the untagged and hand-tagged models.

  `expected` lists `(name, kind, approx, has_bias)` of the layers, in order.
  """
  hand_batch = batch if hand_batch is None else hand_batch
  auto = layer_table.trace_layers(auto_loss, params, batch)
  hand = layer_table.trace_layers(hand_loss, params, hand_batch)
  assert [(l.name, l.kind, l.approx, l.bias is not None) for l in auto.layers] == expected
  assert auto.layers == hand.layers   # kinds, approx, leaf indices, x_hat and output shapes
  assert auto.generic == hand.generic == ()
  # Without auto_register, the norm's parameters of the untagged model are generic.
  plain = layer_table.trace_layers(auto_loss, params, batch, auto_register=False)
  norm = next(l for l in auto.layers if l.kind == "scale_and_shift")
  assert {norm.weight, norm.bias} - {None} <= {l.weight for l in plain.generic}

  auto_updates, auto_state = _one_update(auto_loss, params, batch)
  hand_updates, hand_state = _one_update(hand_loss, params, hand_batch)
  covariances = jkfac.preconditioner_state(auto_state).statistics[norm.name]["diagonal"]
  assert covariances.shape == (1 + (norm.bias is not None), D)
  assert float(covariances.min()) > 0
  assert_trees_close(jkfac.preconditioner_state(auto_state).statistics,
                     jkfac.preconditioner_state(hand_state).statistics, rtol=1e-4)
  assert_trees_close(auto_updates, hand_updates, rtol=1e-4)


# --- automatic registration == tagging by hand ----------------------------------------------


NORMS = {"LayerNorm": lambda **kw: nn.LayerNorm(**kw),
         "BatchNorm": lambda **kw: nn.BatchNorm(use_running_average=False, **kw),
         "GroupNorm": lambda **kw: nn.GroupNorm(num_groups=2, **kw)}


class HandNorm(nn.Module):
  """Flax's `norm` without its scale and bias (which gives x_hat), then its scale and bias
  applied and tagged by hand: the parameters of the untagged flax module."""
  norm: str

  @nn.compact
  def __call__(self, x):
    x_hat = NORMS[self.norm](use_scale=False, use_bias=False)(x)
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
    bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],))
    return jkfac.register_scale_and_shift(x_hat * scale + bias, x_hat, scale, bias)


class NormNet(nn.Module):
  """Dense -> norm -> tanh -> Dense on `(batch, positions, features)` inputs."""
  norm: str
  hand: bool

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(D)(x)
    h = (HandNorm(self.norm, name=f"{self.norm}_0") if self.hand else NORMS[self.norm]())(h)
    return nn.Dense(NUM_CLASSES)(jnp.tanh(h).reshape(h.shape[0], -1))


def _linen_loss(model):
  def apply(params, batch):
    x, _, state = batch
    return model.apply({"params": params, **state}, x, mutable=list(state))[0] if state else (
        model.apply({"params": params}, x))
  return _loss(apply)


@pytest.mark.parametrize("norm", list(NORMS))
def test_linen_norms_are_registered_as_hand_tagged(norm):
  """BatchNorm in train mode: its batch statistics travel in the batch, mutable."""
  auto_model, hand_model = NormNet(norm, False), NormNet(norm, True)
  x, labels = _batch((3, 5))
  auto_vars, hand_vars = auto_model.init(KEY, x), hand_model.init(KEY, x)
  assert jax.tree_util.tree_structure(auto_vars["params"]) == jax.tree_util.tree_structure(
      hand_vars["params"])
  params = _random_like(auto_vars["params"])
  state = lambda v: {k: c for k, c in v.items() if k != "params"}
  assert (norm == "BatchNorm") == bool(state(auto_vars))
  _assert_auto_equals_hand(
      _linen_loss(auto_model), _linen_loss(hand_model), params, (x, labels, state(auto_vars)),
      [("Dense_0", "dense", "kron", True), (f"{norm}_0", "scale_and_shift", "diagonal", True),
       ("Dense_1", "dense", "kron", True)], hand_batch=(x, labels, state(hand_vars)))


class NnxNet(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.linear = nnx.Linear(5, D, rngs=rngs)
    self.norm = nnx.LayerNorm(D, rngs=rngs)
    self.out = nnx.Linear(3 * D, NUM_CLASSES, rngs=rngs)

  def __call__(self, x):
    h = self.norm(self.linear(x))
    return self.out(jnp.tanh(h).reshape(h.shape[0], -1))


class HandNnxNet(NnxNet):
  """`NnxNet` with the norm's scale and bias applied and tagged by hand."""
  def __init__(self, rngs: nnx.Rngs):
    super().__init__(rngs)
    self.bare = nnx.LayerNorm(D, use_scale=False, use_bias=False, rngs=rngs)

  def __call__(self, x):
    h = self.linear(x)
    x_hat = self.bare(h)
    scale, bias = self.norm.scale[...], self.norm.bias[...]
    h = jkfac.register_scale_and_shift(x_hat * scale + bias, x_hat, scale, bias)
    return self.out(jnp.tanh(h).reshape(h.shape[0], -1))


def test_nnx_layer_norm_is_registered_as_hand_tagged():
  auto_def, params = nnx.split(NnxNet(nnx.Rngs(0)), nnx.Param)
  hand_def, hand_params = nnx.split(HandNnxNet(nnx.Rngs(0)), nnx.Param)
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(hand_params)
  params = _random_like(params)
  make_loss = lambda graphdef: _loss(lambda p, batch: nnx.merge(graphdef, p)(batch[0]))
  _assert_auto_equals_hand(make_loss(auto_def), make_loss(hand_def), params, _batch((3, 5)),
                           [("linear", "dense", "kron", True),
                            ("norm", "scale_and_shift", "diagonal", True),
                            ("out", "dense", "kron", True)])


def test_nnx_batch_norm_is_recognised():
  """`nnx.BatchNorm` in train mode, its batch statistics in the batch (merged as a copy)."""
  class Net(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
      self.linear = nnx.Linear(5, D, rngs=rngs)
      self.norm = nnx.BatchNorm(D, rngs=rngs)

    def __call__(self, x):
      return self.norm(self.linear(x))[..., :NUM_CLASSES]

  graphdef, params, stats = nnx.split(Net(nnx.Rngs(0)), nnx.Param, ...)
  loss_fn = _loss(lambda p, batch: nnx.merge(graphdef, p, batch[2], copy=True)(batch[0]))
  trace = layer_table.trace_layers(loss_fn, params, (*_batch((5,)), stats))
  assert [(l.name, l.kind, l.approx) for l in trace.layers] == [
      ("linear", "dense", "kron"), ("norm", "scale_and_shift", "diagonal")]
  assert trace.generic == ()


def _jnp_apply(tagged: bool):
  """dense -> `x_hat * scale + shift` (x_hat normalised by hand) -> tanh -> dense."""
  def apply(params, batch):
    h = batch[0] @ params["w"]
    mean = h.mean(axis=-1, keepdims=True)
    x_hat = (h - mean) / jnp.sqrt(((h - mean) ** 2).mean(axis=-1, keepdims=True) + 1e-5)
    scale, shift = params["norm"]["scale"], params["norm"]["shift"]
    y = x_hat * scale + shift
    if tagged:   # the seed's spelling
      y = layer_collection.register_scale_and_shift((scale, shift), x_hat, y)
    return jnp.tanh(y).reshape(y.shape[0], -1) @ params["out"]
  return apply


def test_jnp_scale_and_shift_is_registered_as_hand_tagged():
  shapes = {"w": (5, D), "norm": {"scale": (D,), "shift": (D,)}, "out": (3 * D, NUM_CLASSES)}
  params = _random_like(jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32),
                                               shapes, is_leaf=lambda s: isinstance(s, tuple)))
  _assert_auto_equals_hand(_loss(_jnp_apply(False)), _loss(_jnp_apply(True)), params,
                           _batch((3, 5)), [("w", "dense", "kron", False),
                                            ("norm", "scale_and_shift", "diagonal", True),
                                            ("out", "dense", "kron", False)])


class OtherNorms(nn.Module):
  case: str

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(D)(x)
    if self.case == "batch_eval":
      h = nn.BatchNorm(use_running_average=True)(h)
    elif self.case == "rms":
      h = nn.RMSNorm()(h)
    elif self.case == "no_scale":
      h = nn.LayerNorm(use_scale=False)(h)
    elif self.case == "nchw":   # normalised over axis 1: not the last axis
      h = nn.BatchNorm(use_running_average=False, axis=1)(h.reshape(h.shape[0], D, -1))
    elif self.case == "shared":   # one LayerNorm applied twice
      norm = nn.LayerNorm()
      h = norm(jnp.tanh(norm(h)))
    return nn.Dense(NUM_CLASSES)(jnp.tanh(h).reshape(h.shape[0], -1))


@pytest.mark.parametrize("case, kinds, generic", [
    ("batch_eval", ["dense", "scale_and_shift", "dense"], []),
    ("rms", ["dense", "scale_and_shift", "dense"], []),
    ("no_scale", ["dense", "dense"], ["LayerNorm_0/bias"]),
    ("nchw", ["dense", "dense"], ["BatchNorm_0/bias", "BatchNorm_0/scale"]),
    ("shared", ["dense", "scale_and_shift", "dense"], []),   # one norm used twice: multi-use
])
def test_which_norms_are_recognised(case, kinds, generic):
  model, (x, labels) = OtherNorms(case), _batch((3, 5))
  variables = model.init(KEY, x)
  state = {k: c for k, c in variables.items() if k != "params"}
  trace = layer_table.trace_layers(_linen_loss(model), variables["params"], (x, labels, state))
  assert [l.kind for l in trace.layers] == kinds
  assert [l.name for l in trace.generic] == generic
  if case == "rms":
    assert trace.layers[1].bias is None


@pytest.mark.parametrize("stats_in_batch", [False, True])
def test_eval_batch_norm_with_float32_statistics_on_float64_activations(stats_in_batch):
  """x64 on, `BatchNorm(use_running_average=True)` with float32 parameters and running
  statistics (as `init` makes them) on float64 activations: the float64 cast of
  `rsqrt(var + eps) * scale` comes before `centred * (...)`. Oracle: the same model with
  float64 parameters and statistics. The layer's x_hat is the `(N, T, d)` normalised
  activations, its shift in the layer, and its diagonal block the same (before: x_hat
  `rsqrt(var + eps)` of shape `(1, 1, d)` and the shift generic, or both generic)."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((6, 3, 4)))
    labels = jnp.asarray(rng.integers(0, NUM_CLASSES, 6))
    model = nn.BatchNorm(use_running_average=True)
    head = jnp.asarray(rng.standard_normal((12, NUM_CLASSES)))
    vectors = {"scale": 1 + 0.3 * rng.standard_normal(4), "bias": 0.3 * rng.standard_normal(4),
               "mean": 0.3 * rng.standard_normal(4), "var": 1 + rng.random(4)}

    def block(dtype):
      params, stats = ({k: jnp.asarray(vectors[k], dtype) for k in keys}
                       for keys in (("scale", "bias"), ("mean", "var")))

      def apply(params, batch):
        state = {"batch_stats": batch[2] if stats_in_batch else stats}
        return jnp.tanh(model.apply({"params": params, **state}, batch[0])).reshape(6, -1) @ head

      batch = (x, labels, stats)
      trace = layer_table.trace_layers(_loss(apply), params, batch)
      _, state = _one_update(_loss(apply), params, batch, estimation="exact", cov_ema_decay=0.0)
      layers = [(l.kind, l.input_shape, l.bias is not None) for l in trace.layers]
      statistics = jkfac.preconditioner_state(state).statistics
      return layers, statistics[trace.layers[0].name]["diagonal"]

    layers, diagonal = block(jnp.float32)
    expected_layers, expected = block(jnp.float64)
    assert expected_layers == [("scale_and_shift", (6, 3, 4), True)]
    assert layers == expected_layers
    np.testing.assert_allclose(diagonal, expected, rtol=1e-5)


def test_a_scaled_parameter_is_no_layer():
  """`x @ (w * g)` (weight norm): `w * g` has no examples, so `g` is no scale; `x * g` is."""
  params = {"g": jnp.ones(NUM_CLASSES), "w": jnp.ones((5, NUM_CLASSES))}
  trace = layer_table.trace_layers(_loss(lambda p, b: b[0] @ (p["w"] * p["g"])), params,
                              _batch((5,)))
  assert trace.layers == () and [l.name for l in trace.generic] == ["g", "w"]
  trace = layer_table.trace_layers(_loss(lambda p, b: (b[0] @ p["w"]) * p["g"]), params,
                              _batch((5,)))
  assert [(l.name, l.kind) for l in trace.layers] == [("w", "dense"), ("g", "scale_and_shift")]


def test_hand_scale_and_shift_tag_wins():
  """A hand tag with its own approximation; a scale tagged alone leaves the shift generic."""
  def apply(approx, with_shift):
    def f(params, batch):
      x_hat = batch[0]
      scale, shift = params["scale"], params["shift"]
      y = x_hat * scale
      y = jkfac.register_scale_and_shift(y, x_hat, scale, approximation=approx)
      return (y + shift) @ params["out"]
    return f
  params = {"scale": jnp.ones(5), "shift": jnp.zeros(5), "out": jnp.ones((5, NUM_CLASSES))}
  trace = layer_table.trace_layers(_loss(apply("full", False)), params, _batch((5,)))
  assert [(l.name, l.kind, l.approx, l.bias) for l in trace.layers] == [
      ("scale", "scale_and_shift", "full", None), ("out", "dense", "kron", None)]
  assert [l.name for l in trace.generic] == ["shift"]


# --- the blocks against oracles (float64) ---------------------------------------------------


class OracleNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm()(nn.Dense(4)(x))
    return nn.Dense(NUM_CLASSES)(jnp.tanh(h).reshape(h.shape[0], -1))


def _norm_params(params):
  """The LayerNorm's gradient (or parameters) as one vector: [scale, shift]."""
  return jnp.concatenate([params["LayerNorm_0"]["scale"], params["LayerNorm_0"]["bias"]],
                         axis=-1)


def _empirical_fisher(model, params, batch):
  """`1/N sum_n g_n g_n^T` with `g_n` example n's loss gradient in [scale, shift]."""
  def per_example(params, x, label):
    return _nets.cross_entropy(model.apply({"params": params}, x[None]), label[None])
  grads = _norm_params(jax.vmap(jax.grad(per_example), in_axes=(None, 0, 0))(params, *batch))
  return grads.T @ grads / grads.shape[0]


def _exact_fisher(model, params, batch):
  """`1/N sum_n J_n^T (diag(p_n) - p_n p_n^T) J_n`, J_n: d logits_n / d [scale, shift]."""
  x, _ = batch

  def logits(vector):
    d = vector.shape[0] // 2
    norm = {"scale": vector[:d], "bias": vector[d:]}
    return model.apply({"params": {**params, "LayerNorm_0": norm}}, x)

  vector = _norm_params(params)
  jac = jax.jacfwd(logits)(vector)          # (N, classes, 2d)
  fisher = _nets.softmax_fisher(logits(vector))
  return jnp.einsum("ncp,ncd,ndq->pq", jac, fisher, jac) / x.shape[0]


@pytest.mark.parametrize("estimation", ["empirical", "exact"])
@pytest.mark.parametrize("approx", ["diagonal", "full"])
def test_blocks_equal_the_per_example_fisher(approx, estimation):
  """The block after one update (`cov_ema_decay=0`: the batch statistic itself) is the
  Fisher of the per-example gradients; the step is its damped inverse times the gradient."""
  with jax.enable_x64(True):
    model = OracleNet()
    x, labels = _batch((3, 5), n=5, dtype=jnp.float64)
    params = jax.tree_util.tree_map(lambda p: p.astype(jnp.float64), _random_like(
        jax.eval_shape(model.init, KEY, x)["params"]))
    loss_fn = _loss(lambda p, batch: model.apply({"params": p}, batch[0]))
    damping = 1e-2
    approximations = None if approx == "diagonal" else {"LayerNorm_0": approx}
    tx = jkfac.precondition(loss_fn, (x, labels), damping=damping, cov_ema_decay=0.0,
                            estimation=estimation, invert_every=1,
                            approximations=approximations)
    grads = jax.grad(loss_fn)(params, (x, labels))
    updates, state = jax.jit(lambda g: tx.update(g, tx.init(params), params,
                                                 batch=(x, labels)))(grads)
    oracle = (_empirical_fisher if estimation == "empirical" else _exact_fisher)(
        model, params, (x, labels))
    oracle = np.asarray(oracle)
    gradient = np.asarray(_norm_params(grads))
    if approx == "diagonal":
      np.testing.assert_allclose(state.statistics["LayerNorm_0"]["diagonal"],
                                 np.diag(oracle).reshape(2, -1), rtol=1e-9, atol=1e-12)
      expected = gradient / (np.diag(oracle) + damping)
    else:
      np.testing.assert_allclose(state.statistics["LayerNorm_0"]["F"], oracle, rtol=1e-9,
                                 atol=1e-12)
      expected = np.linalg.solve(oracle + damping * np.eye(len(gradient)), gradient)
    assert np.abs(np.diag(oracle)).min() > 1e-6
    np.testing.assert_allclose(_norm_params(updates), expected, rtol=1e-7, atol=1e-10)


# --- training and describe ----------------------------------------------------------------


class LayerNormMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.LayerNorm()(nn.Dense(16)(x)))
    return nn.Dense(NUM_CLASSES)(x)


def test_first_kfac_step_of_an_mlp_with_layer_norm():
  """The first `jkfac.kfac` step (float64, inverting at once) is `-lr` times the dense
  layers' Kronecker solves (inputs and output gradients captured from flax) and the
  norm's diagonal solve with the mean of the per-example gradients' squares."""
  lr, damping = 0.1, 1e-2
  model = LayerNormMLP()
  with jax.enable_x64(True):
    x, labels = _batch((6,), n=16, dtype=jnp.float64)
    params = jax.tree_util.tree_map(lambda p: p.astype(jnp.float64), _random_like(
        jax.eval_shape(model.init, KEY, x)["params"]))
    loss_fn = _loss(lambda p, batch: model.apply({"params": p}, batch[0]))
    updates, state = _one_update(loss_fn, params, (x, labels), learning_rate=lr,
                                 damping=damping, warm_start=False)
    grads = jax.jit(jax.grad(loss_fn))(params, (x, labels))
    calls = _nets.linen_layer_calls(lambda x: model.apply({"params": params}, x), x,
                                    lambda logits: _nets.cross_entropy(logits, labels),
                                    (nn.Dense,))
    fisher = np.asarray(jax.jit(lambda p, b: _empirical_fisher(model, p, b))(params, (x, labels)))
  for name in ("Dense_0", "Dense_1"):
    A, G = _nets.empirical_kron_factors(*calls[name][0])
    expected = -lr * _nets.kron_solve(A, G, _nets.layer_matrix(grads, name), damping)
    np.testing.assert_allclose(_nets.layer_matrix(updates, name), expected, rtol=1e-7,
                               atol=1e-10, err_msg=name)
  assert np.diag(fisher).min() > 1e-6
  expected = -lr * np.asarray(_norm_params(grads)) / (np.diag(fisher) + damping)
  np.testing.assert_allclose(_norm_params(updates), expected, rtol=1e-7, atol=1e-10)
  state = jkfac.preconditioner_state(state)
  np.testing.assert_allclose(state.statistics["LayerNorm_0"]["diagonal"] / state.ema_weight,
                             np.diag(fisher).reshape(2, -1), rtol=1e-9, atol=1e-12)


def test_describe_shows_scale_and_shift():
  model, batch = LayerNormMLP(), _batch((6,))
  params = _random_like(jax.eval_shape(model.init, KEY, batch[0])["params"])
  loss_fn = _loss(lambda p, batch: model.apply({"params": p}, batch[0]))
  description = jkfac.describe(loss_fn, params, batch)
  rows = {p.path: (p.layer, p.kind, p.approximation, p.factors, p.state_bytes)
          for p in description.parameters}
  assert rows["LayerNorm_0/scale"] == ("LayerNorm_0", "scale_and_shift", "diagonal",
                                       "diagonal 2x16", 2 * 4 * 2 * 16)
  assert rows["LayerNorm_0/bias"] == ("LayerNorm_0", "scale_and_shift", "diagonal",
                                      "diagonal 2x16", 0)
  lines = {line.split()[0]: line.split() for line in str(description).splitlines()}
  assert lines["LayerNorm_0/scale"][2:6] == ["LayerNorm_0", "scale_and_shift", "diagonal",
                                             "diagonal"]
  rows = {p.path: (p.approximation, p.factors) for p in jkfac.describe(
      loss_fn, params, batch, approximations={"LayerNorm_*": "full"}).parameters}
  assert rows["LayerNorm_0/scale"] == ("full", "F 32x32")


# --- register_generic ------------------------------------------------------------------------


def _generic_dense_apply(params, batch):
  """Dense 0's kernel marked generic: Dense 0 is no layer, so its bias is generic too."""
  w = jkfac.register_generic(params["Dense_0"]["kernel"])
  h = jnp.tanh(batch[0] @ w + params["Dense_0"]["bias"])
  kernel, bias = layer_collection.register_generic(
      (params["Dense_1"]["kernel"], params["Dense_1"]["bias"]))
  h = jnp.tanh(h @ kernel + bias)
  return h @ params["Dense_2"]["kernel"] + params["Dense_2"]["bias"]


def test_register_generic_forces_a_dense_kernel_to_generic():
  shapes = {f"Dense_{i}": {"kernel": jax.ShapeDtypeStruct(s, jnp.float32),
                           "bias": jax.ShapeDtypeStruct(s[1:], jnp.float32)}
            for i, s in enumerate([(5, 4), (4, 4), (4, NUM_CLASSES)])}
  params, batch = _random_like(shapes), _batch((5,), n=8)
  loss_fn = _loss(_generic_dense_apply)
  rows = {p.path: (p.layer, p.kind, p.approximation) for p in
          jkfac.describe(loss_fn, params, batch).parameters}
  assert rows == {"Dense_0/bias": ("Dense_0/bias", "generic", "diagonal"),
                  "Dense_0/kernel": ("Dense_0/kernel", "generic", "diagonal"),
                  "Dense_1/bias": ("Dense_1/bias", "generic", "diagonal"),
                  "Dense_1/kernel": ("Dense_1/kernel", "generic", "diagonal"),
                  "Dense_2/bias": ("Dense_2", "dense", "kron"),
                  "Dense_2/kernel": ("Dense_2", "dense", "kron")}
  # Without the marks, all three are dense layers; the value is unchanged.
  unmarked = _loss(lambda p, b: jnp.tanh(jnp.tanh(b[0] @ p["Dense_0"]["kernel"]
                                                  + p["Dense_0"]["bias"])
                                         @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"])
                   @ p["Dense_2"]["kernel"] + p["Dense_2"]["bias"])
  assert [l.kind for l in layer_table.trace_layers(unmarked, params, batch).layers] == ["dense"] * 3
  np.testing.assert_allclose(loss_fn(params, batch), unmarked(params, batch), rtol=1e-6)

  updates, state = _one_update(loss_fn, params, batch)
  assert jkfac.preconditioner_state(state).statistics["Dense_0/kernel"]["diagonal"].shape == (20, 1)
  assert float(jkfac.preconditioner_state(state).statistics["Dense_0/kernel"]["diagonal"].max()) > 0
  assert all(np.isfinite(u).all() for u in jax.tree_util.tree_leaves(updates))
  # The fused path records no input for a generic tag, and takes the same step.
  assert len(jkfac.value_and_grad(loss_fn)(params, batch)[2].inputs) == 1
  tx = jkfac.kfac(loss_fn, batch, learning_rate=0.1, damping=1e-2, estimation="empirical",
                  invert_every=1)

  @jax.jit
  def fused(params, batch):
    _, grads, curvature = jkfac.value_and_grad(loss_fn)(params, batch)
    return tx.update(grads, tx.init(params), params, batch=batch, curvature=curvature)

  fused_updates, fused_state = fused(params, batch)
  assert_trees_close(fused_updates, updates)
  assert_trees_close(jkfac.preconditioner_state(fused_state).statistics,
                     jkfac.preconditioner_state(state).statistics)


def test_register_generic_keeps_a_norm_generic():
  """`tests/_nets.WithGeneric` marks its LayerNorm's scale and bias with register_generic."""
  model, batch = _nets.WithGeneric(NUM_CLASSES), _batch((5,))
  params = _random_like(jax.eval_shape(model.init, KEY, batch[0])["params"])
  trace = layer_table.trace_layers(_loss(lambda p, b: model.apply({"params": p}, b[0])), params,
                              batch)
  assert [l.kind for l in trace.layers] == ["dense", "dense"]
  assert [l.name for l in trace.generic] == ["LayerNorm_0/bias", "LayerNorm_0/scale", "temp"]


# --- bad input ---------------------------------------------------------------------------------


def test_register_scale_and_shift_checks_shapes():
  x, scale = jnp.ones((4, 3, D)), jnp.ones(D)
  jkfac.register_scale_and_shift(x * scale, x, scale, scale)
  with pytest.raises(ValueError, match="register_scale_and_shift"):
    jkfac.register_scale_and_shift(x, x, jnp.ones(D + 1))          # scale of other size
  with pytest.raises(ValueError, match="register_scale_and_shift"):
    jkfac.register_scale_and_shift(x[:, 0], x, scale)               # y not shaped as x
  with pytest.raises(ValueError, match="register_scale_and_shift"):
    jkfac.register_scale_and_shift(x, x, jnp.ones((1, D)))         # scale not 1-D
  with pytest.raises(ValueError, match="register_scale_and_shift"):
    jkfac.register_scale_and_shift(scale, scale, scale)             # no batch axis
  with pytest.raises(ValueError, match="shift"):
    jkfac.register_scale_and_shift(x, x, scale, jnp.ones(D - 1))
  with pytest.raises(ValueError, match="approximation"):
    jkfac.register_scale_and_shift(x, x, scale, approximation="kronecker")
  with pytest.raises(ValueError, match="kernel"):
    layer_collection.register_scale_and_shift((scale, scale, scale), x, x)


def test_unsupported_approximation_names_the_layer():
  model, batch = LayerNormMLP(), _batch((6,))
  params = _random_like(jax.eval_shape(model.init, KEY, batch[0])["params"])
  loss_fn = _loss(lambda p, batch: model.apply({"params": p}, batch[0]))
  with pytest.raises(ValueError, match="LayerNorm_0.*scale_and_shift.*'kron'"):
    jkfac.kfac(loss_fn, batch, learning_rate=0.1, damping=1e-2,
               approximations={"LayerNorm_0": "kron"}).init(params)
  with pytest.raises(ValueError, match="LayerNorm_0"):   # a hand tag's approx is checked too
    x_hat = jnp.ones((4, D))
    hand = _loss(lambda p, b: jkfac.register_scale_and_shift(
        x_hat * p["LayerNorm_0"]["scale"], x_hat, p["LayerNorm_0"]["scale"],
        approximation="kron_reduce")[:, :NUM_CLASSES])
    jkfac.describe(hand, {"LayerNorm_0": {"scale": jnp.ones(D)}}, batch)


def test_register_generic_errors():
  params, batch = {"w": jnp.ones((5, NUM_CLASSES))}, _batch((5,))
  with pytest.raises(ValueError, match="diagonal"):
    jkfac.register_generic(params["w"], approximation="full")
  with pytest.raises(ValueError, match="not a leaf"):   # an array computed from the parameter
    layer_table.trace_layers(_loss(lambda p, b: b[0] @ jkfac.register_generic(2 * p["w"])), params,
                        batch)
  with pytest.raises(ValueError, match="register_generic"):   # and a hand layer tag on it
    def both(p, b):
      w = jkfac.register_generic(p["w"])
      return jkfac.register_dense(b[0] @ p["w"], b[0], p["w"]) + 0 * w.sum()
    layer_table.trace_layers(_loss(both), params, batch)
