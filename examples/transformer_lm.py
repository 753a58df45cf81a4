"""A byte-level transformer language model on the Python standard library's sources.

A decoder-only transformer (pre-LayerNorm, causal self-attention, GELU MLP, learned
positions, input embedding tied to the output projection) predicts the next byte of
random windows of the stdlib's `*.py` files (`text_data`; every 10th file is held out
for the eval loss). jkfac, AdamW and Muon (`optax.contrib.muon`) each train it from the
same initialization on the same batches, optionally over a small learning-rate sweep.

    PYTHONPATH=. python examples/transformer_lm.py --steps 400 --sweep --plot lm.png
    PYTHONPATH=. python examples/transformer_lm.py --optimizer kfac --describe --steps 50
    PYTHONPATH=. python examples/transformer_lm.py --optimizer kfac \
        --kfac-kwargs '{"approximations": {"*/mlp_*": "diagonal"}}'

The model is made of standard flax.linen modules only -- `nn.Embed` (with `attend` for
the logits), `nn.LayerNorm`, `nn.MultiHeadDotProductAttention`, `nn.Dense` -- which jkfac
finds in the loss's jaxpr without tags. The loss is the mean over all N*T tokens, and
`jkfac.register_softmax_cross_entropy` gets the `(N, T, 256)` logits.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import jkfac

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
from benchmarks import compare as _compare  # noqa: E402
import text_data  # noqa: E402

OPTIMIZERS = {spec.name: spec for spec in (
    _compare.kfac_spec(1e-2, (3e-3, 1e-2, 2e-2)),
    _compare.adamw_spec(3e-3, (1e-3, 3e-3, 1e-2)),
    _compare.muon_spec(2e-2, (1e-2, 2e-2, 5e-2)),
)}
# Tried on this CPU (150 steps): regular momentum stalls or diverges above lr 1e-3;
# preconditioning the raw-gradient momentum with more damping trains fastest.
KFAC_DEFAULTS = dict(damping=3e-2, momentum_type="adam")
EVAL_SEED = 12345  # The eval windows do not depend on --seed.
SMALL_INIT = nn.initializers.normal(0.02)  # GPT-2's: near-uniform logits at the start.


class Block(nn.Module):
  """Pre-LayerNorm transformer block: `x + attention(norm(x))`, then `x + mlp(norm(x))`."""
  num_heads: int
  mlp_ratio: int = 4

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    d_model = x.shape[-1]
    h = nn.LayerNorm(name="attention_norm")(x)
    x = x + nn.MultiHeadDotProductAttention(self.num_heads, name="attention")(h, mask=mask)
    h = nn.LayerNorm(name="mlp_norm")(x)
    h = nn.gelu(nn.Dense(self.mlp_ratio * d_model, name="mlp_in")(h))
    return x + nn.Dense(d_model, name="mlp_out")(h)


class TransformerLM(nn.Module):
  """Decoder-only transformer over byte ids; returns `(N, T, vocab_size)` logits."""
  vocab_size: int = text_data.VOCAB_SIZE
  d_model: int = 64
  num_layers: int = 2
  num_heads: int = 4
  max_length: int = 64

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    embed = nn.Embed(self.vocab_size, self.d_model, embedding_init=SMALL_INIT, name="embed")
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)  # Batch axis 0.
    x = embed(tokens) + nn.Embed(self.max_length, self.d_model, embedding_init=SMALL_INIT,
                                 name="positions")(positions)
    mask = nn.make_causal_mask(tokens)
    for i in range(self.num_layers):
      x = Block(self.num_heads, name=f"block_{i}")(x, mask)
    return embed.attend(nn.LayerNorm(name="final_norm")(x))  # Tied output projection.


def make_loss_fn(model: TransformerLM):
  """Mean next-byte cross-entropy over all N*T positions, registered for K-FAC."""

  def loss_fn(params, batch):
    logits = model.apply({"params": params}, batch["inputs"])
    logits = jkfac.register_softmax_cross_entropy(logits, batch["targets"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()

  return loss_fn


def muon_dimension_numbers(params) -> Any:
  """Muon for the attention and MLP matrices; the embeddings, norms and biases get Adam.

  The attention kernels are `(d_model, heads, head_dim)` for query/key/value and
  `(heads, head_dim, d_model)` for the output: each is one matrix between d_model and
  heads*head_dim, so Muon orthogonalizes it whole.
  """
  dims = optax.contrib.MuonDimensionNumbers

  def rule(path, x):
    names = [getattr(key, "key", "") for key in path]
    if names[-1] != "kernel" or not names[0].startswith("block_"):
      return None
    if x.ndim == 2:
      return dims(0, 1)
    return dims(0, (1, 2)) if names[-2] in ("query", "key", "value") else dims((0, 1), 2)

  return jax.tree_util.tree_map_with_path(rule, params)


def make_task(args) -> _compare.Task:
  files = text_data.read_corpus(args.max_bytes)
  train_files, eval_files = text_data.split_by_file(files)
  train, held_out = text_data.concatenate(train_files), text_data.concatenate(eval_files)
  model = TransformerLM(d_model=args.d_model, num_layers=args.num_layers,
                        num_heads=args.num_heads, max_length=args.length)
  tokens = jnp.zeros((args.batch_size, args.length), jnp.int32)
  print(f"corpus: {len(train_files)} train files ({len(train):,} bytes), {len(eval_files)} "
        f"eval files ({len(held_out):,} bytes) from {text_data.stdlib_dir()}", flush=True)
  return _compare.Task(
      title=(f"byte-level transformer LM, {args.num_layers} layers, d_model {args.d_model}, "
             f"T={args.length}, batch {args.batch_size}"),
      loss_fn=make_loss_fn(model),
      init_params=lambda key: model.init(key, tokens)["params"],
      train_batches=lambda seed: text_data.batches(train, args.batch_size, args.length, seed),
      eval_batches=text_data.eval_batches(held_out, args.eval_batches, args.batch_size,
                                          args.length, seed=EVAL_SEED),
      muon_dimension_numbers=muon_dimension_numbers)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  """The shared flags (`benchmarks.compare`) with K-FAC's defaults for this model, and the model's."""
  parser = _compare.make_parser("transformer_lm.py", __doc__.split("\n\n")[0], OPTIMIZERS)
  parser.set_defaults(**KFAC_DEFAULTS)
  model = parser.add_argument_group("model and data")
  model.add_argument("--d-model", type=int, default=64, help="(default: 64)")
  model.add_argument("--num-layers", type=int, default=2, help="(default: 2)")
  model.add_argument("--num-heads", type=int, default=4, help="(default: 4)")
  model.add_argument("--length", type=int, default=64, help="window length T (default: 64)")
  model.add_argument("--max-bytes", type=int, default=text_data.DEFAULT_MAX_BYTES,
                     help=f"corpus size cap (default: {text_data.DEFAULT_MAX_BYTES})")
  model.add_argument("--eval-batches", type=int, default=8,
                     help="held-out batches per eval (default: 8)")
  return _compare.parse_args(parser, argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  return _compare.main(make_task(args), OPTIMIZERS, args)


if __name__ == "__main__":
  main()
