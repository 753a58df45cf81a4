"""A byte-level text corpus that every machine has: the Python standard library's sources.

    files = read_corpus(max_bytes=2**21)          # [(name, bytes)], sorted by name
    train, test = split_by_file(files)            # every 10th file is held out
    for batch in batches(concatenate(train), batch_size=32, length=64, seed=0): ...

Bytes are token ids 0..255. The split is by file, so no file contributes to both sides,
and the windows come from a seeded numpy generator, so every optimizer trained with the
same seed sees the same batches.
"""

from __future__ import annotations

import pathlib
import sysconfig
from typing import Iterator, Sequence

import numpy as np

VOCAB_SIZE = 256
DEFAULT_MAX_BYTES = 2 ** 21  # 2 MiB: far more than a few hundred small batches read.


def stdlib_dir() -> pathlib.Path:
  """The folder of this interpreter's pure-Python standard library."""
  return pathlib.Path(sysconfig.get_paths()["stdlib"])


def read_corpus(max_bytes: int = DEFAULT_MAX_BYTES,
                root: str | pathlib.Path | None = None) -> list[tuple[str, bytes]]:
  """`(name, contents)` of the sorted top-level `*.py` files of `root`, whole files only.

  Files are read in name order until the next one would pass `max_bytes` (files larger
  than what is left are skipped), so the corpus is fixed for a given Python installation.
  `root` defaults to the standard library.
  """
  root = pathlib.Path(root) if root is not None else stdlib_dir()
  files, total = [], 0
  for path in sorted(root.glob("*.py")):
    data = path.read_bytes()
    if data and total + len(data) <= max_bytes:
      files.append((path.name, data))
      total += len(data)
  if not files:
    raise ValueError(f"no *.py files of at most {max_bytes} bytes in {root}")
  return files


def split_by_file(files: Sequence[tuple[str, bytes]], eval_every: int = 10
                  ) -> tuple[list[tuple[str, bytes]], list[tuple[str, bytes]]]:
  """`(train, eval)`: every `eval_every`-th file (in the given order) goes to eval."""
  if eval_every < 2:
    raise ValueError(f"eval_every must be at least 2, got {eval_every}")
  train = [f for i, f in enumerate(files) if i % eval_every != eval_every - 1]
  held_out = [f for i, f in enumerate(files) if i % eval_every == eval_every - 1]
  if not held_out:
    raise ValueError(f"{len(files)} files leave none for eval (every {eval_every}th); "
                     "read more bytes")
  return train, held_out


def concatenate(files: Sequence[tuple[str, bytes]]) -> np.ndarray:
  """The files' bytes, one after the other, as a uint8 array of token ids."""
  return np.frombuffer(b"".join(data for _, data in files), dtype=np.uint8)


def random_windows(data: np.ndarray, batch_size: int, length: int,
                   rng: np.random.Generator) -> np.ndarray:
  """`(batch_size, length + 1)` int32 windows at uniform random offsets of `data`."""
  if len(data) <= length:
    raise ValueError(f"{len(data)} tokens cannot hold a window of {length + 1}")
  starts = rng.integers(0, len(data) - length, size=batch_size)
  return data[starts[:, None] + np.arange(length + 1)].astype(np.int32)


def to_batch(windows: np.ndarray) -> dict[str, np.ndarray]:
  """Next-token prediction: `inputs` are the first `length` ids, `targets` the next ones."""
  return {"inputs": windows[:, :-1], "targets": windows[:, 1:]}


def batches(data: np.ndarray, batch_size: int, length: int,
            seed: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """An endless stream of random-window batches, the same for the same `seed`."""
  rng = np.random.default_rng(seed)
  while True:
    yield to_batch(random_windows(data, batch_size, length, rng))


def eval_batches(data: np.ndarray, num_batches: int, batch_size: int, length: int,
                 seed: int = 0) -> list[dict[str, np.ndarray]]:
  """A fixed list of `num_batches` batches of `data`, for a comparable eval loss."""
  stream = batches(data, batch_size, length, seed=seed)
  return [next(stream) for _ in range(num_batches)]
