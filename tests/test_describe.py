"""`jkfac.describe`, generic parameters (a diagonal block for leaves no layer covers) and
`auto_register=False`."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jkfac
from jkfac import layer_table, statistics, interpreter
from jkfac.blocks import diagonal
from tests import _nets
from tests._asserts import assert_all_finite

KEY = jax.random.PRNGKey(0)
NUM_CLASSES = 3


def _batch(input_shape, n=8, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((n,) + tuple(input_shape)), jnp.float32)
  return x, jnp.asarray(rng.integers(0, NUM_CLASSES, n), jnp.int32)


def _init(module, batch, seed=1):
  """Random parameter values (nonzero biases) with the shapes `module.init` gives."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(module.init, KEY, batch[0])["params"]
  scale = lambda shape: 0.3 if len(shape) <= 1 else 1 / np.sqrt(np.prod(shape[:-1]))
  return jax.tree_util.tree_map(
      lambda p: jnp.asarray(scale(p.shape) * rng.standard_normal(p.shape), p.dtype), shapes)


def _loss(module):
  def loss_fn(params, batch):
    x, labels = batch
    logits = module.apply({"params": params}, x)
    logits = jkfac.register_softmax_cross_entropy(logits, labels)
    return _nets.cross_entropy(logits, labels)
  return loss_fn


def _batch_stats_loss(model, inputs: str):
  """A loss over `batch[inputs]` and labels `batch["y"]` for a model with mutable
  `batch_stats` (passed in the batch), returning `(loss, updated batch_stats)`."""
  def loss_fn(params, batch):
    logits, updates = model.apply({"params": params, "batch_stats": batch["batch_stats"]},
                                  batch[inputs], mutable=["batch_stats"])
    jkfac.register_softmax_cross_entropy(logits, batch["y"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean(), updates
  return loss_fn


def _rows(description):
  return {p.path: p for p in description.parameters}


def _state_bytes(state):
  """Bytes of the covariances and inverses in a `tx.init` state, per layer."""
  precondition_state = jkfac.preconditioner_state(state)
  return {name: sum(x.nbytes for x in jax.tree_util.tree_leaves(
      (precondition_state.statistics[name], precondition_state.inverses[name])))
          for name in precondition_state.statistics}


class ConvNet(nn.Module):
  """Untagged linen layers and a LayerNorm (auto-registered), a jkfac.flax layer and a
  scalar."""
  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Conv(4, (3, 3), strides=2, padding="VALID")(x))         # 7x7x2 -> 3x3x4
    x = jnp.tanh(nn.Conv(2, (2, 2), padding="SAME", use_bias=False)(x))     # -> 3x3x2
    x = x.reshape(x.shape[0], -1)
    x = nn.LayerNorm()(jnp.tanh(nn.Dense(5)(x)))
    x = jnp.tanh(jkfac.flax.Dense(6, approximation="diagonal")(x))
    return nn.Dense(NUM_CLASSES)(x) * self.param("temp", nn.initializers.ones, ())


def _convnet_problem():
  model, batch = ConvNet(), _batch((7, 7, 2))
  return _loss(model), _init(model, batch), batch


# (path, shape, layer, kind, approx, factors) of every leaf, in `tree_leaves` order.
CONVNET_ROWS = [
    ("Conv_0/bias", (4,), "Conv_0", "conv2d", "kron", "A 19x19, G 4x4"),
    ("Conv_0/kernel", (3, 3, 2, 4), "Conv_0", "conv2d", "kron", "A 19x19, G 4x4"),
    ("Conv_1/kernel", (2, 2, 4, 2), "Conv_1", "conv2d", "kron", "A 16x16, G 2x2"),
    ("Dense_0/bias", (5,), "Dense_0", "dense", "kron", "A 19x19, G 5x5"),
    ("Dense_0/kernel", (18, 5), "Dense_0", "dense", "kron", "A 19x19, G 5x5"),
    ("Dense_1/bias", (6,), "Dense_1", "dense", "diagonal", "diagonal 6x6"),
    ("Dense_1/kernel", (5, 6), "Dense_1", "dense", "diagonal", "diagonal 6x6"),
    ("Dense_2/bias", (3,), "Dense_2", "dense", "kron", "A 7x7, G 3x3"),
    ("Dense_2/kernel", (6, 3), "Dense_2", "dense", "kron", "A 7x7, G 3x3"),
    ("LayerNorm_0/bias", (5,), "LayerNorm_0", "scale_and_shift", "diagonal", "diagonal 2x5"),
    ("LayerNorm_0/scale", (5,), "LayerNorm_0", "scale_and_shift", "diagonal", "diagonal 2x5"),
    ("temp", (), "temp", "generic", "diagonal", "diagonal 1x1"),
]


def test_describe_has_a_row_for_every_parameter():
  loss_fn, params, batch = _convnet_problem()
  description = jkfac.describe(loss_fn, params, batch)
  paths = [layer_table.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  assert [p.path for p in description.parameters] == paths
  assert [(p.path, p.shape, p.layer, p.kind, p.approximation, p.factors)
          for p in description.parameters] == CONVNET_ROWS


def test_describe_state_bytes_are_the_state_of_the_transform():
  loss_fn, params, batch = _convnet_problem()
  for approximations in (None, {"Dense_2": "full", "Conv_*": "diagonal"}):
    description = jkfac.describe(loss_fn, params, batch, approximations=approximations)
    tx = jkfac.kfac(loss_fn, batch, learning_rate=0.1, damping=1e-2,
                    approximations=approximations)
    state = tx.init(params)
    inverses = jkfac.preconditioner_state(state).inverses
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(inverses))
    actual = _state_bytes(state)
    assert description.state_bytes == sum(actual.values())
    rows = _rows(description)
    for layer, num_bytes in actual.items():   # on the layer's first (weight) leaf
      weight = layer if layer in rows else next(
          path for path in (f"{layer}/kernel", f"{layer}/scale") if path in rows)
      assert rows[weight].state_bytes == num_bytes > 0
    for row in description.parameters:
      if row.path.endswith("/bias") and row.kind != "generic":
        assert row.state_bytes == 0
  # Kron: 2 * 4 bytes * (A + G) entries, covariances and inverses.
  assert rows["Dense_2/kernel"].state_bytes == 2 * 4 * 21 ** 2
  assert rows["Conv_0/kernel"].state_bytes == 2 * 4 * 19 * 4


def test_describe_state_bytes_follow_the_state_dtype_with_x64_on():
  """float32 parameters keep a float32 state with `jax_enable_x64` on; float64 ones a
  float64 state. Oracle: the bytes of `tx.init`'s state."""
  with jax.enable_x64(True):
    loss_fn, params, batch = _convnet_problem()
    for dtype in (jnp.float32, jnp.float64):
      params = jax.tree_util.tree_map(lambda x: x.astype(dtype), params)
      description = jkfac.describe(loss_fn, params, batch)
      state = jkfac.kfac(loss_fn, batch, learning_rate=0.1, damping=1e-2).init(params)
      assert description.state_bytes == sum(_state_bytes(state).values())


def test_describe_approximations():
  loss_fn, params, batch = _convnet_problem()
  rows = _rows(jkfac.describe(loss_fn, params, batch,
                              approximations={"Dense_2": "full", "Conv_1": "diagonal"}))
  pick = lambda path: (rows[path].approximation, rows[path].factors)
  assert pick("Dense_2/kernel") == ("full", "F 21x21")
  assert pick("Dense_2/bias") == ("full", "F 21x21")
  assert pick("Conv_1/kernel") == ("diagonal", "diagonal 16x2")
  assert rows["Conv_0/kernel"].approximation == "kron"
  # A hand tag's approximation wins over a pattern.
  rows = _rows(jkfac.describe(loss_fn, params, batch, approximations={"Dense_*": "full"}))
  assert [rows[f"Dense_{i}/kernel"].approximation for i in range(3)] == ["full", "diagonal", "full"]
  with pytest.raises(ValueError, match="Nope_7"):
    jkfac.describe(loss_fn, params, batch, approximations={"Nope_7": "full"})
  with pytest.raises(ValueError, match="temp"):   # generic parameters are not layers
    jkfac.describe(loss_fn, params, batch, approximations={"temp": "full"})
  with pytest.raises(ValueError, match="blockwise"):
    jkfac.describe(loss_fn, params, batch, approximations={"Dense_0": "blockwise"})


def _size(num_bytes):
  return f"{num_bytes} B" if num_bytes < 1024 else f"{num_bytes / 1024:.1f} KiB"


def test_describe_str_is_a_table():
  loss_fn, params, batch = _convnet_problem()
  description = jkfac.describe(loss_fn, params, batch, approximations={"Dense_2": "full"})
  lines = str(description).splitlines()
  assert lines[0].split() == ["parameter", "shape", "layer", "kind", "approximation", "factors",
                              "state"]
  assert set(lines[1].replace(" ", "")) == {"-"}
  assert len(lines) == 2 + len(CONVNET_ROWS) + 2
  assert lines[-2] == f"K-FAC state: {_size(description.state_bytes)}"
  assert lines[-1].startswith("Coverage: ")
  assert description.state_bytes > 1024   # so the line reads KiB
  body = {line.split()[0]: line.split() for line in lines[2:-2]}
  assert body["Dense_2/kernel"][:5] == ["Dense_2/kernel", "6x3", "Dense_2", "dense", "full"]
  assert body["Dense_2/kernel"][5:7] == ["F", "21x21"]
  assert body["Conv_0/kernel"][:5] == ["Conv_0/kernel", "3x3x2x4", "Conv_0", "conv2d", "kron"]
  assert body["temp"][:5] == ["temp", "scalar", "temp", "generic", "diagonal"]
  assert " ".join(body["Dense_2/kernel"][-2:]) == _size(2 * 4 * 21 ** 2)
  assert len(body["Dense_2/bias"]) == 7   # no state column on a bias row


# --- generic parameters ------------------------------------------------------------------


def _generic_problem(n=16):
  model, batch = _nets.WithGeneric(NUM_CLASSES), _batch((5,), n=n)
  params = _init(model, batch)
  params["temp"] = jnp.asarray(1.3, jnp.float32)
  return model, params, batch


GENERIC = {"LayerNorm_0/bias": (6,), "LayerNorm_0/scale": (6,), "temp": ()}


def test_generic_parameters_get_a_diagonal_block():
  model, params, batch = _generic_problem()
  loss_fn = _loss(model)
  rows = _rows(jkfac.describe(loss_fn, params, batch))
  for path, shape in GENERIC.items():
    size = math.prod(shape)
    assert (rows[path].layer, rows[path].kind, rows[path].approximation, rows[path].shape,
            rows[path].factors) == (path, "generic", "diagonal", shape, f"diagonal {size}x1")
    assert rows[path].state_bytes == 2 * 4 * size
  assert rows["Dense_0/kernel"].kind == rows["Dense_1/bias"].kind == "dense"

  tx = jkfac.kfac(loss_fn, batch, learning_rate=0.1, damping=1e-1, invert_every=1,
                  warm_start=False)
  state = tx.init(params)
  for path, shape in GENERIC.items():
    pre = jkfac.preconditioner_state(state)
    assert pre.statistics[path]["diagonal"].shape == (math.prod(shape), 1)
    assert pre.inverses[path]["diagonal"].shape == (math.prod(shape), 1)
  grads = jax.grad(loss_fn)(params, batch)
  updates, state = jax.jit(lambda g, s: tx.update(g, s, params, batch=batch))(grads, state)
  # The generic leaves are preconditioned by their diagonal: (F_ii / w + damping)^-1 g_i.
  damping = 1e-1
  for path, get in (("temp", lambda t: t["temp"]),
                    ("LayerNorm_0/scale", lambda t: t["LayerNorm_0"]["scale"])):
    pre = jkfac.preconditioner_state(state)
    cov = pre.statistics[path]["diagonal"][:, 0] / pre.ema_weight
    assert float(cov.min()) > 0
    expected = -0.1 * get(grads).reshape(-1) / (cov + damping)
    np.testing.assert_allclose(get(updates).reshape(-1), expected, rtol=1e-5)


def _exact_diagonal_fisher(model, params, batch):
  """The diagonal of the Fisher of the mean loss in each generic leaf, by hand:
  `1/N sum_n diag(J_n^T (diag(p_n) - p_n p_n^T) J_n)`."""
  x, _ = batch

  def logits(generic):
    p = dict(params, temp=generic["temp"], LayerNorm_0=generic["LayerNorm_0"])
    return model.apply({"params": p}, x)

  generic = {"temp": params["temp"], "LayerNorm_0": params["LayerNorm_0"]}
  jac = jax.jacrev(logits)(generic)
  fisher = _nets.softmax_fisher(logits(generic))
  n = x.shape[0]
  diag = lambda j: jnp.einsum("ncj,ncd,ndj->j", j.reshape(n, NUM_CLASSES, -1), fisher,
                              j.reshape(n, NUM_CLASSES, -1)) / n
  return {"temp": diag(jac["temp"]), "LayerNorm_0/bias": diag(jac["LayerNorm_0"]["bias"]),
          "LayerNorm_0/scale": diag(jac["LayerNorm_0"]["scale"])}


def _generic_diagonals(trace, curvature, key, estimation):
  stats = statistics.layer_statistics(trace, curvature, key, estimation)
  return {path: diagonal.generic_statistics(stats[path].output_grads[0])["diagonal"][:, 0]
          for path in GENERIC}


def _assert_unbiased(estimation, reference_fn, num_keys=1000):
  """The generic diagonal averaged over sampling keys equals `reference_fn`'s diagonal."""
  model, params, batch = _generic_problem()
  loss_fn = _loss(model)
  trace = layer_table.trace_layers(loss_fn, params, batch)
  assert sorted(layer.name for layer in trace.generic) == sorted(GENERIC)
  curvature = interpreter.linearize(loss_fn, params, batch)
  samples = jax.jit(jax.vmap(lambda key: _generic_diagonals(trace, curvature, key, estimation)))(
      jax.random.split(jax.random.PRNGKey(3), num_keys))
  reference = reference_fn(model, params, batch)
  for path in GENERIC:
    mean = np.asarray(samples[path].mean(axis=0), np.float64)
    standard_error = np.asarray(samples[path].std(axis=0), np.float64) / np.sqrt(num_keys)
    assert float(reference[path].min()) > 0
    assert np.all(standard_error < 0.2 * np.asarray(reference[path]))   # the test can resolve it
    np.testing.assert_array_less(np.abs(mean - reference[path]), 5 * standard_error + 1e-7,
                                 err_msg=path)


def test_generic_diagonal_estimate_averages_to_the_exact_fisher():
  _assert_unbiased("fisher", _exact_diagonal_fisher)


def _empirical_diagonal_fisher(model, params, batch):
  """`1/N sum_n g_n^2`, with `g_n` example n's loss gradient in each generic leaf: the
  empirical Fisher, as "empirical" estimates it for tagged layers (per example)."""
  def per_example(params, x, label):
    logits = model.apply({"params": params}, x[None])
    return _nets.cross_entropy(logits, label[None])

  grads = jax.vmap(jax.grad(per_example), in_axes=(None, 0, 0))(params, *batch)
  square = lambda g: jnp.mean(g.reshape(g.shape[0], -1) ** 2, axis=0)
  return {"temp": square(grads["temp"]),
          "LayerNorm_0/bias": square(grads["LayerNorm_0"]["bias"]),
          "LayerNorm_0/scale": square(grads["LayerNorm_0"]["scale"])}


@pytest.mark.parametrize("estimation", ["exact", "empirical"])
def test_generic_diagonal_with_deterministic_estimation(estimation):
  """"exact" promises the diagonal of the Fisher, "empirical" that of the empirical Fisher.

  A generic leaf squares a gradient summed over the batch; random signs per example
  make the cross terms between examples vanish in expectation, so the estimate must
  average to the per-example reference (without them it is about N times too big).
  """
  _assert_unbiased(estimation, _exact_diagonal_fisher if estimation == "exact"
                   else _empirical_diagonal_fisher)


# --- auto_register=False ---------------------------------------------------------------------


class MixedTagging(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Dense(5)(x))
    x = jnp.tanh(jkfac.flax.Dense(4)(x))
    return nn.Dense(NUM_CLASSES, use_bias=False)(x)


def test_without_auto_register_untagged_layers_are_generic():
  model, batch = MixedTagging(), _batch((6,))
  params, loss_fn = _init(model, batch), _loss(model)
  rows = _rows(jkfac.describe(loss_fn, params, batch, auto_register=False))
  assert {path: (row.layer, row.kind, row.approximation, row.factors)
          for path, row in rows.items()} == {
      "Dense_0/bias": ("Dense_0/bias", "generic", "diagonal", "diagonal 5x1"),
      "Dense_0/kernel": ("Dense_0/kernel", "generic", "diagonal", "diagonal 30x1"),
      "Dense_1/bias": ("Dense_1", "dense", "kron", "A 6x6, G 4x4"),
      "Dense_1/kernel": ("Dense_1", "dense", "kron", "A 6x6, G 4x4"),
      "Dense_2/kernel": ("Dense_2/kernel", "generic", "diagonal", "diagonal 12x1")}
  with pytest.raises(ValueError, match="Dense_0"):   # not a layer without auto_register
    jkfac.describe(loss_fn, params, batch, approximations={"Dense_0": "full"},
                   auto_register=False)
  rows = _rows(jkfac.describe(loss_fn, params, batch))   # the default registers them
  assert [rows[p].kind for p in ("Dense_0/kernel", "Dense_1/kernel", "Dense_2/kernel")] == [
      "dense"] * 3

  tx = jkfac.kfac(loss_fn, batch, learning_rate=0.1, damping=1e-1, auto_register=False)
  state = tx.init(params)
  assert sorted(jkfac.preconditioner_state(state).statistics) == [
      "Dense_0/bias", "Dense_0/kernel", "Dense_1", "Dense_2/kernel"]
  assert jkfac.preconditioner_state(state).statistics["Dense_0/kernel"]["diagonal"].shape == (30, 1)
  grads = jax.grad(loss_fn)(params, batch)
  updates, state = jax.jit(lambda g, s: tx.update(g, s, params, batch=batch))(grads, state)
  assert all(np.isfinite(u).all() for u in jax.tree_util.tree_leaves(updates))
  found = jkfac.preconditioner_state(state).statistics
  assert float(jnp.abs(found["Dense_2/kernel"]["diagonal"]).max()) > 0


# --- BatchNorm with mutable state ------------------------------------------------------------


class ConvBatchNorm(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.BatchNorm(use_running_average=False)(nn.Conv(4, (3, 3))(x))
    return nn.Dense(NUM_CLASSES)(nn.relu(x).reshape(x.shape[0], -1))


def _first_step(loss_fn, params, batch, **kwargs):
  """`(grads, updates, state)` of one jitted `jkfac.kfac` step of a `loss_fn` that
  returns `(loss, batch_stats updates)`, inverting at once, with the true targets and
  every conv patch row."""
  tx = jkfac.kfac(loss_fn, batch, **{**dict(estimation="empirical", invert_every=1,
                                             warm_start=False, sub_sample_patches=None),
                                      **kwargs})
  grads = jax.jit(jax.grad(loss_fn, has_aux=True))(params, batch)[0]
  updates, state = jax.jit(lambda g: tx.update(g, tx.init(params), params, batch=batch))(grads)
  return grads, updates, state


def test_batch_norm_with_mutable_state_is_matched_and_takes_the_block_solve_step():
  """The running statistics travel in the batch; conv, dense and the norm's scale and
  shift are recognised, and the first K-FAC step (float64) is `-lr` times the Kronecker
  solves of the conv and the dense layer and the norm's diagonal solve, from the layers'
  inputs (conv patches by hand, x̂ from the batch mean and variance) and output
  gradients captured from the flax modules."""
  lr, damping = 0.05, 1e-2
  model = ConvBatchNorm()
  with jax.enable_x64(True):
    x, labels = _batch((5, 5, 2), n=8)
    x = x.astype(jnp.float64)
    variables = jax.tree_util.tree_map(lambda v: v.astype(jnp.float64), model.init(KEY, x))

    loss_fn = _batch_stats_loss(model, "x")

    batch = {"x": x, "y": labels, "batch_stats": variables["batch_stats"]}
    params = variables["params"]
    rows = {p.path: (p.layer, p.kind, p.approximation)
            for p in jkfac.describe(loss_fn, params, batch).parameters}
    assert rows == {"BatchNorm_0/bias": ("BatchNorm_0", "scale_and_shift", "diagonal"),
                    "BatchNorm_0/scale": ("BatchNorm_0", "scale_and_shift", "diagonal"),
                    "Conv_0/bias": ("Conv_0", "conv2d", "kron"),
                    "Conv_0/kernel": ("Conv_0", "conv2d", "kron"),
                    "Dense_0/bias": ("Dense_0", "dense", "kron"),
                    "Dense_0/kernel": ("Dense_0", "dense", "kron")}
    grads, updates, _ = _first_step(loss_fn, params, batch, learning_rate=lr, damping=damping)

    calls = _nets.linen_layer_calls(
        lambda x: model.apply(variables, x, mutable=["batch_stats"])[0], x,
        lambda logits: optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(),
        (nn.Conv, nn.BatchNorm, nn.Dense))
    n = x.shape[0]
    patches = _nets.patches_by_loops(x, (3, 3), (1, 1), [_nets.same_pads(5, 3, 1)] * 2)
    for name, inputs in (("Conv_0", patches), ("Dense_0", calls["Dense_0"][0][0])):
      A, G = _nets.empirical_kron_factors(inputs, calls[name][0][1])
      expected = -lr * _nets.kron_solve(A, G, _nets.layer_matrix(grads, name), damping)
      np.testing.assert_allclose(_nets.layer_matrix(updates, name), expected, rtol=1e-7,
                                 atol=1e-10, err_msg=name)
    # The norm: per example, g summed over positions (scale: weighted by x̂), squared, mean.
    h, g = (np.asarray(v, np.float64) for v in calls["BatchNorm_0"][0])
    x_hat = (h - h.mean(axis=(0, 1, 2))) / np.sqrt(h.var(axis=(0, 1, 2)) + 1e-5)
    per_example = n * np.stack([np.sum(g * x_hat, axis=(1, 2)), np.sum(g, axis=(1, 2))])
    diagonal = np.mean(per_example ** 2, axis=1)
    for i, leaf in enumerate(("scale", "bias")):
      expected = -lr * np.asarray(grads["BatchNorm_0"][leaf]) / (diagonal[i] + damping)
      np.testing.assert_allclose(updates["BatchNorm_0"][leaf], expected, rtol=1e-7, atol=1e-10,
                                 err_msg=leaf)


# --- one model with everything -----------------------------------------------------------------


class _Cell(nn.Module):
  @nn.compact
  def __call__(self, h, x):
    return jnp.tanh(nn.Dense(6, name="hh")(h) + x), None


class _Block(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return jnp.tanh(nn.Dense(6)(x)), None


class Everything(nn.Module):
  """A tied embedding, a remat Dense, BatchNorm, a scan over time (one weight, many uses),
  an `nn.scan` over stacked layers, a grouped conv and a free scalar."""

  @nn.compact
  def __call__(self, ids):                                  # ids: (batch, time)
    embed = nn.Embed(11, 6)
    x = nn.remat(nn.Dense)(6)(embed(ids))                   # (batch, time, 6)
    x = nn.BatchNorm(use_running_average=False)(x)
    x = nn.Conv(6, (3,), feature_group_count=2)(x)
    cell = nn.scan(_Cell, variable_broadcast="params", split_rngs={"params": False}, in_axes=1)
    h, _ = cell()(jnp.zeros((x.shape[0], 6), x.dtype), x)
    h, _ = nn.scan(_Block, variable_axes={"params": 0}, split_rngs={"params": True},
                   length=2)()(h, None)
    return embed.attend(h) * self.param("temp", nn.initializers.ones, ())


@pytest.mark.parametrize("x64", [False, True])
def test_every_parameter_of_a_mixed_model_gets_its_block(x64):
  """Each parameter's layer, kind, block and factors; one K-FAC step is finite, its state
  of the parameters' dtype. Each kind's step has its oracle elsewhere: the tied table
  (test_tied_embedding), BatchNorm (test_batch_norm_with_mutable_state_is_matched_and_
  takes_the_block_solve_step), the grouped conv (test_conv_nd), the scans over time and
  over layers (test_scan), remat (test_reliability), the generic scalar (this file's
  test_generic_diagonal_*)."""
  with jax.enable_x64(x64):
    model = Everything()
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 11, (8, 5)), jnp.int32)
    labels = jnp.asarray(np.random.default_rng(1).integers(0, 11, 8), jnp.int32)
    variables = model.init(KEY, ids)
    if x64:
      variables = jax.tree_util.tree_map(lambda v: v.astype(jnp.float64), variables)

    loss_fn = _batch_stats_loss(model, "ids")

    batch = {"ids": ids, "y": labels, "batch_stats": variables["batch_stats"]}
    rows = {p.path: (p.layer, p.kind, p.approximation, p.factors)
            for p in jkfac.describe(loss_fn, variables["params"], batch).parameters}
    scan = "Scan_Cell_0/hh"
    assert rows == {
        "BatchNorm_0/bias": ("BatchNorm_0", "scale_and_shift", "diagonal", "diagonal 2x6"),
        "BatchNorm_0/scale": ("BatchNorm_0", "scale_and_shift", "diagonal", "diagonal 2x6"),
        "CheckpointDense_0/bias": ("CheckpointDense_0", "dense", "kron", "A 7x7, G 6x6"),
        "CheckpointDense_0/kernel": ("CheckpointDense_0", "dense", "kron", "A 7x7, G 6x6"),
        "Conv_0/bias": ("Conv_0", "conv1d", "kron", "A 2x10x10, G 2x3x3"),
        "Conv_0/kernel": ("Conv_0", "conv1d", "kron", "A 2x10x10, G 2x3x3"),
        "Embed_0/embedding": ("Embed_0", "tied_embedding", "kron_indep",
                              "A2 6x6, D1 11, D2 11, G1 6x6"),
        f"{scan}/bias": (scan, "dense", "kron_indep", "A 7x7, G 6x6"),
        f"{scan}/kernel": (scan, "dense", "kron_indep", "A 7x7, G 6x6"),
        "Scan_Block_0/Dense_0/bias": ("Scan_Block_0/Dense_0", "dense", "kron", "A 2x7x7, G 2x6x6"),
        "Scan_Block_0/Dense_0/kernel": ("Scan_Block_0/Dense_0", "dense", "kron",
                                       "A 2x7x7, G 2x6x6"),
        "temp": ("temp", "generic", "diagonal", "diagonal 1x1")}

    _, updates, state = _first_step(loss_fn, variables["params"], batch, learning_rate=0.05,
                                    damping=1e-2)
    assert_all_finite((updates, state))
    dtype = jnp.float64 if x64 else jnp.float32
    found = jkfac.preconditioner_state(state).statistics
    assert all(x.dtype == dtype for x in jax.tree_util.tree_leaves(found))
