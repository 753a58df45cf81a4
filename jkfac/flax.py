"""Flax linen drop-ins: tagged `Dense` and `Conv`, and a `TrainState` that passes the batch.

`jkfac.flax.Dense` and `jkfac.flax.Conv` take the arguments of `flax.linen.Dense` and
`flax.linen.Conv` (they are subclasses), create the same parameters, compute the same
function, and tag their output for K-FAC. `approximation` picks the layer's
approximation ("kron", "diagonal" or "full"; None defers to the transform).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from jkfac import tags

Array = jax.Array


class Dense(nn.Dense):
  """`flax.linen.Dense`, tagged for K-FAC."""
  approximation: str | None = None

  @nn.compact
  def __call__(self, inputs: Array) -> Array:
    kernel = self.param("kernel", self.kernel_init, (jnp.shape(inputs)[-1], self.features),
                        self.param_dtype)
    bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
    dot_general = (self.dot_general_cls() if self.dot_general_cls is not None
                   else self.dot_general or jax.lax.dot_general)
    y = dot_general(inputs, kernel, (((inputs.ndim - 1,), (0,)), ((), ())),
                    precision=self.precision)
    if bias is not None:
      y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
    return tags.register_dense(y, inputs, kernel, bias, approximation=self.approximation)


def _pairs(value: Any, rank: int) -> tuple[int, ...]:
  if value is None:
    value = 1
  return (value,) * rank if isinstance(value, int) else tuple(value)


_REGISTER_CONV = {1: tags.register_conv1d, 2: tags.register_conv2d, 3: tags.register_conv3d}
_LAYOUTS = {1: ("NWC", "WIO", "NWC"), 2: ("NHWC", "HWIO", "NHWC"),
            3: ("NDHWC", "DHWIO", "NDHWC")}


class Conv(nn.Conv):
  """`flax.linen.Conv` (1-D, 2-D or 3-D, channels last), tagged for K-FAC.

  Supports strides, every padding mode, input and kernel dilation, feature groups
  (grouped and depthwise convs) and one batch axis; a mask, or inputs without a
  batch axis or with several, raise `NotImplementedError` (plain `flax.linen.Conv`
  with one batch axis is registered automatically).
  """
  approximation: str | None = None

  @nn.compact
  def __call__(self, inputs: Array) -> Array:
    kernel_size = _pairs(self.kernel_size, 1)  # an int is a 1-D kernel, as in Flax.
    rank = len(kernel_size)
    if rank not in _REGISTER_CONV or inputs.ndim != rank + 2:
      raise NotImplementedError(f"jkfac.flax.Conv supports 1-D to 3-D convolutions on (batch, "
                                f"*spatial, channels) inputs; got kernel {kernel_size}, "
                                f"inputs {inputs.shape}.")
    if self.mask is not None:
      raise NotImplementedError("jkfac.flax.Conv does not support a kernel mask.")
    groups = self.feature_group_count
    if inputs.shape[-1] % groups or self.features % groups:
      raise ValueError(f"feature_group_count {groups} must divide the input channels "
                       f"({inputs.shape[-1]}) and the features ({self.features}).")
    strides, input_dilation, kernel_dilation = (
        _pairs(v, rank) for v in (self.strides, self.input_dilation, self.kernel_dilation))
    padding = nn.linear.canonicalize_padding(self.padding, rank)
    dilated = [(k - 1) * d + 1 for k, d in zip(kernel_size, kernel_dilation)]
    if padding in ("CIRCULAR", "REFLECT"):
      pads = [(0, 0)] + [((k - 1) // 2, k // 2) for k in dilated] + [(0, 0)]
      inputs = jnp.pad(inputs, pads, mode={"CIRCULAR": "wrap", "REFLECT": "reflect"}[padding])
      padding = "VALID"
    elif padding == "CAUSAL":
      if rank != 1:
        raise ValueError("CAUSAL padding is for 1-D convolutions.")
      inputs = jnp.pad(inputs, [(0, 0), (dilated[0] - 1, 0), (0, 0)])
      padding = "VALID"

    kernel = self.param("kernel", self.kernel_init,
                        kernel_size + (inputs.shape[-1] // groups, self.features),
                        self.param_dtype)
    bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
    conv = (self.conv_general_dilated_cls() if self.conv_general_dilated_cls is not None
            else self.conv_general_dilated or jax.lax.conv_general_dilated)
    conv_params = dict(window_strides=strides, padding=padding, lhs_dilation=input_dilation,
                       rhs_dilation=kernel_dilation, feature_group_count=groups)
    y = conv(inputs, kernel, **conv_params, dimension_numbers=_LAYOUTS[rank],
             precision=self.precision)
    if bias is not None:
      y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
    return _REGISTER_CONV[rank](y, inputs, kernel, bias, approximation=self.approximation,
                                **conv_params)


class TrainState(train_state.TrainState):
  """`flax.training.train_state.TrainState` whose `apply_gradients` forwards the batch.

  Plain Flax alternative, two lines:
    updates, opt_state = tx.update(grads, state.opt_state, state.params, batch=batch)
    state = state.replace(params=optax.apply_updates(state.params, updates),
                          opt_state=opt_state, step=state.step + 1)
  """

  def apply_gradients(self, *, grads: Any, batch: Any = None, **kwargs: Any) -> "TrainState":
    extra = {} if batch is None else {"batch": batch}
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params, **extra)
    fields = dict(step=self.step + 1, params=optax.apply_updates(self.params, updates),
                  opt_state=opt_state)
    return self.replace(**{**fields, **kwargs})
