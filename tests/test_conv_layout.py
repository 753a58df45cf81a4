"""`conv_layout.conv` is `lax.conv_general_dilated`: values, forward and reverse
derivatives (oracle: JAX's own rules, in float64), for several layouts, groupings,
strides and dilations; and K-FAC statistics taken inside `lax.cond` equal those outside."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jkfac
from jkfac import conv_layout, interpreter, layer_table
from tests import _nets

CASES = {
    # name: (lhs shape, rhs shape, conv_general_dilated keywords)
    "2d NHWC HWIO": ((3, 7, 6, 4), (3, 3, 4, 5),
                     dict(window_strides=(1, 1), padding="SAME",
                          dimension_numbers=("NHWC", "HWIO", "NHWC"))),
    "2d NCHW OIHW strided dilated": ((2, 4, 9, 8), (6, 4, 3, 2),
                                     dict(window_strides=(2, 1), padding=((1, 0), (0, 2)),
                                          rhs_dilation=(2, 1), lhs_dilation=(1, 2),
                                          dimension_numbers=("NCHW", "OIHW", "NCHW"))),
    "2d grouped": ((2, 6, 6, 4), (3, 3, 2, 6),
                   dict(window_strides=(1, 1), padding="VALID", feature_group_count=2,
                        dimension_numbers=("NHWC", "HWIO", "NHWC"))),
    "1d NWC WIO": ((2, 10, 3), (4, 3, 5),
                   dict(window_strides=(3,), padding="SAME",
                        dimension_numbers=("NWC", "WIO", "NWC"))),
    "3d NDHWC DHWIO": ((2, 4, 5, 4, 2), (2, 3, 2, 2, 3),
                       dict(window_strides=(1, 2, 1), padding="SAME",
                            dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))),
}


def _params(lhs, rhs, keywords):
  """The bind parameters JAX records for `conv_general_dilated(lhs, rhs, **keywords)`."""
  jaxpr = jax.make_jaxpr(lambda x, w: jax.lax.conv_general_dilated(x, w, **keywords))(lhs, rhs)
  (eqn,) = [e for e in jaxpr.jaxpr.eqns if e.primitive is jax.lax.conv_general_dilated_p]
  return eqn.params


@pytest.mark.parametrize("case", list(CASES))
def test_conv_matches_lax_in_value_jvp_and_vjp(case):
  lhs_shape, rhs_shape, keywords = CASES[case]
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    lhs, rhs, lhs_dot, rhs_dot = (jnp.asarray(rng.standard_normal(s)) for s in
                                  (lhs_shape, rhs_shape, lhs_shape, rhs_shape))
    params = _params(lhs, rhs, keywords)

    def reference(x, w):
      return jax.lax.conv_general_dilated(x, w, **keywords)

    def mine(x, w):
      return conv_layout.conv(x, w, **params)

    expected, expected_dot = jax.jvp(reference, (lhs, rhs), (lhs_dot, rhs_dot))
    found, found_dot = jax.jvp(mine, (lhs, rhs), (lhs_dot, rhs_dot))
    np.testing.assert_allclose(found, expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(found_dot, expected_dot, rtol=1e-12, atol=1e-12)

    cotangent = jnp.asarray(rng.standard_normal(expected.shape))
    expected_grads = jax.vjp(reference, lhs, rhs)[1](cotangent)
    found_grads = jax.jit(lambda x, w, c: jax.lax.cond(
        True, lambda: jax.vjp(mine, x, w)[1](c), lambda: (x * 0, w * 0)))(lhs, rhs, cotangent)
    for found_grad, expected_grad in zip(found_grads, expected_grads):
      np.testing.assert_allclose(found_grad, expected_grad, rtol=1e-12, atol=1e-12)


def test_statistics_inside_cond_equal_those_outside():
  """The test convnet's layer statistics (inputs, output gradients of sampled targets)
  from `linearize(..., in_branch=True)`, its convs by `conv_layout.conv`, inside
  `lax.cond`, equal those of the plain pass, in float64."""
  with jax.enable_x64(True):
    _, params, batch, loss_fn = _nets.make_problem(_nets.CONVNET, dtype=jnp.float64)
    trace = layer_table.trace_layers(loss_fn, params, batch)

    def statistics(in_branch):
      linearization = interpreter.linearize(loss_fn, params, batch, in_branch=in_branch)
      return jkfac.statistics.layer_statistics(trace, linearization, jax.random.PRNGKey(1),
                                               "fisher")

    expected = jax.jit(lambda: statistics(False))()
    found = jax.jit(lambda: jax.lax.cond(True, lambda: statistics(True),
                                         lambda: statistics(False)))()
    assert jax.tree_util.tree_leaves(found)
    jax.tree_util.tree_map(
        lambda f, e: np.testing.assert_allclose(f, e, rtol=1e-10, atol=1e-12), found, expected)
