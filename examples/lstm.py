"""A bidirectional LSTM classifier on a task that needs the recurrence: first == last?

Each example is a random sequence of digits 0..9; the label says whether its first digit
equals its last (half the examples, by construction). A bag-of-tokens model cannot
solve it: permuting a sequence changes the label but not the bag, and at the default
length (12 > 10 digits) every bag has a repeated digit, so every bag of two or more
distinct digits can be ordered either way -- such a model stays near the chance loss
ln 2 = 0.693. The LSTM must
carry the first digit through the whole sequence to compare it with the last.

    PYTHONPATH=. python examples/lstm.py --sweep --plot lstm.png
    PYTHONPATH=. python examples/lstm.py --optimizer kfac --describe --steps 50

The model: `nn.Embed`, then `nn.Bidirectional` of two `nn.RNN(nn.LSTMCell)`s, the forward
state after the last digit and the backward state after the first, a ReLU `nn.Dense`
and a 2-way `nn.Dense`. jkfac finds every layer without tags; each LSTM gate's dense
layer runs once per position inside the scan and gets a `"kron_indep"` block. (Flax's
`OptimizedLSTMCell` fuses the gates in a way jkfac does not recognise: only diagonal
blocks.) The flags and summary are `transformer_lm.py`'s (`benchmarks.compare`).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jkfac

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
from benchmarks import compare as _compare  # noqa: E402

OPTIMIZERS = {spec.name: spec for spec in (
    _compare.kfac_spec(3e-3, (1e-3, 3e-3, 1e-2)),
    _compare.adam_spec(3e-3, (1e-3, 3e-3, 1e-2)),
)}
NUM_DIGITS = 10
EVAL_SEED = 12345  # The eval set does not depend on --seed.


def first_equals_last(batch_size: int, length: int, rng: np.random.Generator
                      ) -> dict[str, np.ndarray]:
  """`inputs` `(batch_size, length)` digits and `label` 1 where the first equals the last.

  The label is a fair coin; for label 0 the last digit is drawn from the other nine.
  """
  digits = rng.integers(0, NUM_DIGITS, size=(batch_size, length))
  label = rng.integers(0, 2, size=batch_size)
  other = (digits[:, 0] + rng.integers(1, NUM_DIGITS, size=batch_size)) % NUM_DIGITS
  digits[:, -1] = np.where(label == 1, digits[:, 0], other)
  return {"inputs": digits.astype(np.int32), "label": label.astype(np.int32)}


def batches(batch_size: int, length: int, seed: int) -> Iterator[dict[str, np.ndarray]]:
  """An endless stream of fresh examples, the same for the same `seed`."""
  rng = np.random.default_rng(seed)
  while True:
    yield first_equals_last(batch_size, length, rng)


class BiLSTMClassifier(nn.Module):
  """Embeds digits, reads them both ways with LSTMs, classifies the two end states."""
  hidden: int = 32
  embed_dim: int = 16
  num_classes: int = 2

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = nn.Embed(NUM_DIGITS, self.embed_dim, name="embed")(tokens)
    y = nn.Bidirectional(nn.RNN(nn.LSTMCell(self.hidden)), nn.RNN(nn.LSTMCell(self.hidden)),
                         name="bilstm")(x)  # (N, T, 2 * hidden): forward, then backward.
    ends = jnp.concatenate([y[:, -1, :self.hidden], y[:, 0, self.hidden:]], axis=-1)
    h = nn.relu(nn.Dense(self.hidden, name="hidden")(ends))
    return nn.Dense(self.num_classes, name="logits")(h)


def make_loss_fn(model: BiLSTMClassifier):
  """Mean cross-entropy of the label, registered for K-FAC."""

  def loss_fn(params, batch):
    logits = model.apply({"params": params}, batch["inputs"])
    logits = jkfac.register_softmax_cross_entropy(logits, batch["label"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

  return loss_fn


def make_task(args) -> _compare.Task:
  model = BiLSTMClassifier(hidden=args.hidden, embed_dim=args.embed_dim)
  tokens = jnp.zeros((args.batch_size, args.length), jnp.int32)
  eval_stream = batches(args.batch_size, args.length, EVAL_SEED)
  return _compare.Task(
      title=(f"BiLSTM (hidden {args.hidden}) on first == last, length {args.length}, "
             f"batch {args.batch_size}"),
      loss_fn=make_loss_fn(model),
      init_params=lambda key: model.init(key, tokens)["params"],
      train_batches=lambda seed: batches(args.batch_size, args.length, seed),
      eval_batches=[next(eval_stream) for _ in range(args.eval_batches)])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  """The shared flags (`benchmarks.compare`) and the model's."""
  parser = _compare.make_parser("lstm.py", __doc__.split("\n\n")[0], OPTIMIZERS, steps=400,
                               batch_size=64)
  model = parser.add_argument_group("model and data")
  model.add_argument("--hidden", type=int, default=32, help="LSTM width (default: 32)")
  model.add_argument("--embed-dim", type=int, default=16, help="(default: 16)")
  model.add_argument("--length", type=int, default=12, help="sequence length (default: 12)")
  model.add_argument("--eval-batches", type=int, default=16,
                     help="held-out batches per eval (default: 16)")
  args = _compare.parse_args(parser, argv)
  if args.length < 2:
    parser.error("--length must be at least 2")
  return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  return _compare.main(make_task(args), OPTIMIZERS, args)


if __name__ == "__main__":
  main()
