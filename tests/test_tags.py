"""The tag primitives: identities under jit/grad/vmap, visible in jaxprs, checked shapes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jkfac
from jkfac import tags

N, D_IN, D_OUT = 4, 3, 5
H, W, C_IN, C_OUT = 6, 7, 2, 3


def _arrays():
  rng = np.random.default_rng(0)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  return dict(x=normal(N, D_IN), w=normal(D_IN, D_OUT), b=normal(D_OUT),
              labels=jnp.asarray(rng.integers(0, D_OUT, N)), images=normal(N, H, W, C_IN),
              kernel=normal(3, 2, C_IN, C_OUT))


def _dense(x, w, b, tagged):
  y = x @ w + b
  return tags.register_dense(y, x, w, b) if tagged else y


def _conv(x, k, b, tagged, strides=(2, 1), padding="SAME"):
  y = jax.lax.conv_general_dilated(x, k, strides, padding,
                                   dimension_numbers=("NHWC", "HWIO", "NHWC")) + b
  return tags.register_conv2d(y, x, k, b, window_strides=strides, padding=padding) if tagged else y


def _dense_loss(w, b, x, labels, tagged):
  """Mean softmax cross-entropy of a tagged (or untagged) dense layer plus tanh."""
  logits = _dense(jnp.tanh(x), w, b, tagged)
  if tagged:
    logits = tags.register_softmax_cross_entropy(logits, labels)
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1))


def _conv_loss(k, b, x, tagged):
  y = _conv(x, k, b, tagged)
  if tagged:
    y = tags.register_squared_error(y, jnp.zeros_like(y))
  return 0.5 * jnp.mean(jnp.sum(jnp.tanh(y) ** 2, axis=(1, 2, 3)))


def _primitive_names(jaxpr):
  names = []
  for eqn in jaxpr.eqns:
    names.append(eqn.primitive.name)
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      names += _primitive_names(sub)
  return names


# --- identity under transformations ---------------------------------------------------


def test_tags_are_identity_eagerly_and_under_jit():
  a = _arrays()
  y = a["x"] @ a["w"] + a["b"]
  for fn in (_dense, jax.jit(_dense, static_argnums=3)):
    np.testing.assert_array_equal(fn(a["x"], a["w"], a["b"], True), y)
  logits = y + 1.0
  for fn in (tags.register_softmax_cross_entropy, jax.jit(tags.register_softmax_cross_entropy)):
    np.testing.assert_array_equal(fn(logits, a["labels"]), logits)
  conv = jax.jit(_conv, static_argnums=3)
  np.testing.assert_array_equal(conv(a["images"], a["kernel"], a["b"][:C_OUT], True),
                                _conv(a["images"], a["kernel"], a["b"][:C_OUT], False))


def test_tags_are_identity_under_grad():
  # Jitted: eager differentiation compiles every small op and is slow on CPU.
  a = _arrays()
  args = (a["w"], a["b"], a["x"], a["labels"])
  grad = jax.jit(jax.grad(_dense_loss, argnums=(0, 1, 2)), static_argnums=4)
  tagged, plain = grad(*args, True), grad(*args, False)
  for t, p in zip(tagged, plain):
    np.testing.assert_allclose(t, p, rtol=1e-5, atol=1e-7)
    assert np.abs(p).max() > 0
  conv_grad = jax.jit(jax.grad(_conv_loss, argnums=(0, 1, 2)), static_argnums=3)
  conv_args = (a["kernel"], a["b"][:C_OUT], a["images"])
  for t, p in zip(conv_grad(*conv_args, True), conv_grad(*conv_args, False)):
    np.testing.assert_allclose(t, p, rtol=1e-5, atol=1e-6)
    assert np.abs(p).max() > 0


def test_tags_are_identity_under_jvp_and_second_derivatives():
  a = _arrays()
  f = lambda w, tagged: _dense_loss(w, a["b"], a["x"], a["labels"], tagged)
  jvp = jax.jit(lambda w, t, tagged: jax.jvp(lambda v: f(v, tagged), (w,), (t,))[1],
                static_argnums=2)
  tangent = jnp.ones_like(a["w"])
  np.testing.assert_allclose(jvp(a["w"], tangent, True), jvp(a["w"], tangent, False), rtol=1e-5)
  hessian = jax.jit(jax.hessian(f), static_argnums=1)
  np.testing.assert_allclose(hessian(a["w"], True), hessian(a["w"], False), rtol=1e-5, atol=1e-6)


def test_tags_are_identity_under_vmap():
  a = _arrays()
  # A batch of dense layers: everything mapped.
  xs = jnp.stack([a["x"], 2 * a["x"]])
  ws = jnp.stack([a["w"], -a["w"]])
  bs = jnp.stack([a["b"], a["b"] + 1])
  out = jax.vmap(_dense, in_axes=(0, 0, 0, None))(xs, ws, bs, True)
  np.testing.assert_allclose(out, jnp.einsum("kni,kio->kno", xs, ws) + bs[:, None],
                             rtol=1e-6)
  # Per-example: only the inputs mapped, the parameters shared.
  out = jax.vmap(_dense, in_axes=(0, None, None, None))(a["x"], a["w"], a["b"], True)
  np.testing.assert_allclose(out, a["x"] @ a["w"] + a["b"], rtol=1e-6)
  # Mapped along a non-leading axis.
  out = jax.vmap(_dense, in_axes=(1, None, None, None), out_axes=1)(xs, a["w"], a["b"], True)
  np.testing.assert_allclose(out, xs @ a["w"] + a["b"], rtol=1e-6)
  # Per-example gradients through the tags (vmap of grad).
  per_example = lambda tagged: jax.vmap(
      jax.grad(lambda w, x, y: _dense_loss(w, a["b"], x[None], y[None], tagged)),
      in_axes=(None, 0, 0))(a["w"], a["x"], a["labels"])
  np.testing.assert_allclose(per_example(True), per_example(False), rtol=1e-5, atol=1e-7)


def test_tags_appear_in_jaxpr():
  a = _arrays()
  jaxpr = jax.make_jaxpr(_dense_loss, static_argnums=4)(a["w"], a["b"], a["x"], a["labels"], True)
  names = _primitive_names(jaxpr.jaxpr)
  assert names.count("kfac_layer_tag") == 1
  assert names.count("kfac_loss_tag") == 1
  layer_eqn = next(e for e in jaxpr.jaxpr.eqns if e.primitive is tags.layer_tag_p)
  assert layer_eqn.params["kind"] == "dense" and layer_eqn.params["has_bias"]
  assert [v.aval.shape for v in layer_eqn.invars] == [(N, D_OUT), (N, D_IN), (D_IN, D_OUT),
                                                      (D_OUT,)]
  loss_eqn = next(e for e in jaxpr.jaxpr.eqns if e.primitive is tags.loss_tag_p)
  assert loss_eqn.params["kind"] == "softmax_cross_entropy"
  assert loss_eqn.params["weight"] == 1.0
  # The untagged function has none.
  plain = jax.make_jaxpr(_dense_loss, static_argnums=4)(a["w"], a["b"], a["x"], a["labels"], False)
  assert not {"kfac_layer_tag", "kfac_loss_tag"} & set(_primitive_names(plain.jaxpr))
  # Tags survive jit: they sit inside the jit equation.
  nested = jax.make_jaxpr(jax.jit(functools.partial(_dense_loss, tagged=True)))(
      a["w"], a["b"], a["x"], a["labels"])
  assert _primitive_names(nested.jaxpr).count("kfac_layer_tag") == 1


def test_conv_tag_records_padding_pairs():
  a = _arrays()
  # SAME, stride 2 over 6 rows, 3-tall kernel: 3 outputs, (3-1)*2+3-6 = 1 padded row, the
  # low side gets the floor; stride 1 over 7 columns, 2-wide kernel: 6+2-7 = 1 padded column.
  jaxpr = jax.make_jaxpr(_conv, static_argnums=3)(a["images"], a["kernel"], a["b"][:C_OUT], True)
  eqn = next(e for e in jaxpr.jaxpr.eqns if e.primitive is tags.layer_tag_p)
  conv = eqn.params["conv"]
  assert eqn.params["kind"] == "conv2d"
  assert conv.window_strides == (2, 1)
  assert conv.padding == ((0, 1), (0, 1))
  assert conv.lhs_dilation == (1, 1) and conv.rhs_dilation == (1, 1)
  hash(conv)  # tag parameters must be hashable


@pytest.mark.parametrize("approx", ["kron", "diagonal", "full", None])
def test_register_dense_records_approx(approx):
  a = _arrays()
  f = lambda x, w: tags.register_dense(x @ w, x, w, approximation=approx)
  eqn = jax.make_jaxpr(f)(a["x"], a["w"]).jaxpr.eqns[-1]
  assert eqn.primitive is tags.layer_tag_p
  assert eqn.params["approx"] == approx and not eqn.params["has_bias"]
  assert len(eqn.invars) == 3


# --- shape checks ---------------------------------------------------------------------


@pytest.mark.parametrize("case", ["x_vs_w", "y_vs_w", "w_rank"])
def test_register_dense_rejects_mismatched_shapes(case):
  a = _arrays()
  x, w = a["x"], a["w"]
  y = x @ w
  if case == "x_vs_w":
    x = jnp.ones((N, D_IN + 1))
  elif case == "y_vs_w":
    y = jnp.ones((N, D_OUT + 1))
  else:
    w = jnp.ones((D_IN, D_OUT, 1))
  with pytest.raises(ValueError, match=r"register_dense: shapes do not match"):
    tags.register_dense(y, x, w)


def test_register_dense_rejects_wrong_bias():
  a = _arrays()
  y = a["x"] @ a["w"]
  with pytest.raises(ValueError, match=r"register_dense: bias shape \(4,\) does not match"):
    tags.register_dense(y, a["x"], a["w"], jnp.ones(D_OUT - 1))
  with pytest.raises(ValueError, match=r"bias shape"):
    tags.register_dense(y, a["x"], a["w"], jnp.ones((1, D_OUT)))


def test_register_conv2d_rejects_bad_shapes():
  a = _arrays()
  x, k = a["images"], a["kernel"]
  y = _conv(x, k, jnp.zeros(C_OUT), False)
  with pytest.raises(ValueError, match=r"register_conv2d: expected NHWC input and HWIO kernel"):
    tags.register_conv2d(y, x[0], k)  # unbatched input
  with pytest.raises(ValueError, match=r"register_conv2d: expected NHWC"):
    tags.register_conv2d(y, x, k[..., :1, :])  # kernel input channels != C_IN
  with pytest.raises(ValueError, match=r"register_conv2d: expected NHWC"):
    tags.register_conv2d(y[..., :1], x, k)  # output channels != C_OUT
  with pytest.raises(ValueError, match=r"register_conv2d: bias shape"):
    tags.register_conv2d(y, x, k, jnp.zeros(C_OUT + 1))


def test_unknown_approx_is_rejected():
  a = _arrays()
  with pytest.raises(ValueError, match=r"Unknown K-FAC approximation 'kronecker'"):
    tags.register_dense(a["x"] @ a["w"], a["x"], a["w"], approximation="kronecker")


def test_loss_registration_rejects_mismatched_targets():
  logits = jnp.zeros((N, D_OUT))
  with pytest.raises(ValueError, match=r"softmax_cross_entropy loss: targets of shape \(3,\)"):
    tags.register_softmax_cross_entropy(logits, jnp.zeros((3,), jnp.int32))
  with pytest.raises(ValueError, match=r"match neither"):
    tags.register_softmax_cross_entropy(logits, jnp.zeros((N, D_OUT + 1)))
  with pytest.raises(ValueError, match=r"sigmoid_cross_entropy loss: targets \(4,\) must have"):
    tags.register_sigmoid_cross_entropy(logits, jnp.zeros((N,)))
  with pytest.raises(ValueError, match=r"squared_error loss: targets \(4, 4\) must have"):
    tags.register_squared_error(logits, jnp.zeros((N, D_OUT - 1)))
  with pytest.raises(ValueError, match=r"weight must be positive"):
    tags.register_squared_error(logits, logits, weight=0.0)
  # Integer labels and one-hot targets are both accepted for softmax cross-entropy.
  tags.register_softmax_cross_entropy(logits, jnp.zeros((N,), jnp.int32))
  tags.register_softmax_cross_entropy(logits, jnp.zeros((N, D_OUT)))


# --- seed aliases -----------------------------------------------------------------------


def test_seed_aliases_are_the_same_functions():
  lc = jkfac.layer_collection
  assert (lc.register_categorical_predictive_distribution
          is jkfac.register_softmax_cross_entropy is tags.register_softmax_cross_entropy)
  assert (lc.register_multi_bernoulli_predictive_distribution
          is jkfac.register_sigmoid_cross_entropy is tags.register_sigmoid_cross_entropy)
  assert (lc.register_normal_predictive_distribution
          is jkfac.register_squared_error is tags.register_squared_error)
  assert jkfac.register_dense is tags.register_dense
  assert jkfac.register_conv2d is tags.register_conv2d
  assert (lc.APPROX_KRONECKER_NAME, lc.APPROX_DIAGONAL_NAME, lc.APPROX_FULL_NAME) == (
      "kron", "diagonal", "full")
