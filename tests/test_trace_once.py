"""What a model costs to start: `loss_fn` is traced at most once by jkfac per compiled step
(the jaxpr traced at `init` is reused by every statistics, curvature-product and
line-search evaluation), and `tx.init` compiles a handful of programs, not one per
operation."""

import jax
import pytest

import jkfac
from tests import _nets


def _count_traces(make_tx) -> tuple[int, int]:
  """Python calls of `loss_fn` inside `tx.update` while `jax.jit` traces one full step,
  and the calls of the user's own `jax.grad` in that step."""
  _, params, batch, loss_fn = _nets.make_problem(_nets.NETS["mlp"])
  calls = []

  def counted(params, batch):
    calls.append(1)
    return loss_fn(params, batch)

  tx = make_tx(counted, batch)
  state = tx.init(params)

  user = []

  def step(params, state, batch):
    grads = jax.grad(counted)(params, batch)
    user.append(len(calls))
    return tx.update(grads, state, params, batch=batch)

  calls.clear()
  jax.jit(step).lower(params, state, batch)
  return len(calls) - user[0], user[0]


@pytest.mark.parametrize("make_tx", [
    lambda loss_fn, batch: jkfac.precondition(loss_fn, batch, damping=1e-2),
    lambda loss_fn, batch: jkfac.kfac(loss_fn, batch),
], ids=["precondition", "kfac"])
def test_loss_fn_traced_at_most_once_per_compiled_step(make_tx):
  jkfac_calls, user_calls = _count_traces(make_tx)
  assert user_calls == 1
  assert jkfac_calls <= 1


@pytest.mark.parametrize("make_tx", [
    lambda loss_fn, batch: jkfac.kfac(loss_fn, batch),
    lambda loss_fn, batch: jkfac.kfac(loss_fn, batch, factor_block_size=4),
    lambda loss_fn, batch: jkfac.eigen_adam(loss_fn, batch, learning_rate=1e-3),
], ids=["kfac", "blocked", "eigen_adam"])
def test_init_compiles_few_programs(make_tx):
  """Built op by op, the state compiled one program per operation (42 for this small MLP,
  over 150 and 5 s for the MLP 784-512-256-10); its zeros and identities are now built in
  one. Small programs cached by earlier tests only lower the count."""
  _, params, batch, loss_fn = _nets.make_problem(_nets.NETS["mlp"])
  tx = make_tx(loss_fn, batch)
  compiles = []

  def listener(event, duration, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
      compiles.append(duration)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    jax.block_until_ready(tx.init(params))
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert 1 <= len(compiles) <= 20, len(compiles)
