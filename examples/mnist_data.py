"""MNIST for the examples, as numpy arrays: IDX files, TFDS, or fake data.

Every loader returns ``{"train": (images, labels), "test": (images, labels)}``
with images float32 in [0, 1] of shape (N, 28, 28, 1) and labels int32 in
[0, 10). Nothing here imports JAX; the training loop does the device work.
"""

from __future__ import annotations

import gzip
import importlib.util
import math
import os
from collections.abc import Iterator, Sequence

import numpy as np

Split = tuple[np.ndarray, np.ndarray]
Dataset = dict[str, Split]

# The bundled MNIST test split (10,000 real digits; CC BY-SA 3.0, see its NOTICE): the
# examples' offline default, split 8,000 train / 2,000 test.
BUNDLED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "mnist")

IMAGE_SHAPE = (28, 28, 1)
NUM_CLASSES = 10

# (images, labels) file names of the two MNIST pairs, as LeCun ships them.
IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

# IDX type codes (third magic byte) -> big-endian numpy dtypes.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str) -> np.ndarray:
  """Reads one gzipped IDX file into a native-endian array of its dims.

  The header is two zero bytes, a type code, the rank, then one big-endian
  uint32 per dimension; the body is the row-major big-endian data.
  """
  with gzip.open(path, "rb") as f:
    raw = f.read()
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
    raise ValueError(f"{path}: bad IDX magic number {raw[:4].hex() or '(empty)'}")
  dtype = np.dtype(_IDX_DTYPES[raw[2]])
  ndim = raw[3]
  offset = 4 + 4 * ndim
  if len(raw) < offset:
    raise ValueError(f"{path}: IDX header truncated")
  dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
  expected = math.prod(dims) * dtype.itemsize
  if len(raw) - offset != expected:
    raise ValueError(
        f"{path}: IDX body has {len(raw) - offset} bytes, dims {dims} need {expected}"
    )
  data = np.frombuffer(raw, dtype, offset=offset).reshape(dims)
  return data.astype(dtype.newbyteorder("="))


def _read_pair(data_dir: str, images_name: str, labels_name: str) -> Split:
  """Reads an MNIST images/labels IDX pair and converts it to model dtypes."""
  images = read_idx(os.path.join(data_dir, images_name))
  labels = read_idx(os.path.join(data_dir, labels_name))
  if images.dtype != np.uint8 or images.shape[1:] != IMAGE_SHAPE[:2]:
    raise ValueError(f"{images_name}: want uint8 (N, 28, 28), got {images.dtype} {images.shape}")
  if labels.ndim != 1 or len(labels) != len(images):
    raise ValueError(f"{labels_name}: expected {len(images)} labels, got shape {labels.shape}")
  return _to_model_dtypes(images, labels)


def _to_model_dtypes(images: np.ndarray, labels: np.ndarray) -> Split:
  """uint8 (N, 28, 28[, 1]) pixels -> float32 [0, 1] NHWC; labels -> int32."""
  x = images.reshape(-1, *IMAGE_SHAPE).astype(np.float32) / np.float32(255.0)
  return x, labels.astype(np.int32)


def load_idx(data_dir: str = BUNDLED_DIR, *, test_size: int = 2000) -> Dataset:
  """Loads MNIST from the gzipped IDX files in ``data_dir``.

  With both pairs present, returns the usual 60k/10k split. With only one
  pair (e.g. a folder holding just the t10k files), that pair is split in
  order: the last ``test_size`` examples are "test", the rest "train", so a
  run still has held-out data.
  """
  present = {
      split: all(os.path.isfile(os.path.join(data_dir, n)) for n in names)
      for split, names in IDX_FILES.items()
  }
  if present["train"] and present["test"]:
    return {split: _read_pair(data_dir, *IDX_FILES[split]) for split in IDX_FILES}
  for split in ("test", "train"):
    if present[split]:
      return _split_in_order(_read_pair(data_dir, *IDX_FILES[split]), test_size)
  raise FileNotFoundError(
      f"no MNIST IDX pair ({' + '.join(IDX_FILES['test'])}) in {data_dir!r}; "
      "use --fake-data, or --dataset tfds where a download works"
  )


def _split_in_order(data: Split, test_size: int) -> Dataset:
  """Splits one (x, y) pair into leading "train" and trailing "test" parts."""
  x, y = data
  if not 0 < test_size < len(x):
    raise ValueError(f"test_size must be in (0, {len(x)}), got {test_size}")
  cut = len(x) - test_size
  return {"train": (x[:cut], y[:cut]), "test": (x[cut:], y[cut:])}


def load_tfds(data_dir: str | None = None) -> Dataset:
  """Loads MNIST through ``tfds.data_source`` (array_record records, PIL decode).

  Reading a prepared array_record copy needs no TensorFlow, unlike
  ``tfds.load``, which builds a ``tf.data`` pipeline. Preparing MNIST the
  first time needs a network and, in TFDS 4.9.10, TensorFlow; without
  TensorFlow this fails at once instead of downloading first.
  """
  try:
    return _load_tfds(data_dir)
  except Exception as e:  # Import, download and prepare failures all end here.
    cause = (str(e).strip().splitlines() or [""])[0][:200]
    raise RuntimeError(
        f"tfds could not load mnist here ({type(e).__name__}: {cause}); "
        "use --data-dir DIR with MNIST IDX files, or --fake-data"
    ) from e


def _load_tfds(data_dir: str | None) -> Dataset:
  """Reads a prepared copy, preparing one only where TensorFlow exists."""
  import tensorflow_datasets as tfds  # Lazy: an optional, heavy import.

  kwargs = dict(
      split=["train", "test"],
      data_dir=data_dir,
      builder_kwargs={"file_format": "array_record"},
  )
  try:
    sources = tfds.data_source("mnist", download=False, **kwargs)
  except Exception as e:
    if not _has_tensorflow():
      where = data_dir or "the default TFDS data_dir"
      raise ModuleNotFoundError(
          f"mnist is not prepared in {where} and TFDS needs tensorflow to prepare it"
      ) from e
    sources = tfds.data_source("mnist", download=True, **kwargs)
  return {name: _source_arrays(src) for name, src in zip(("train", "test"), sources)}


def _has_tensorflow() -> bool:
  """Whether TensorFlow is importable, without importing it."""
  return importlib.util.find_spec("tensorflow") is not None


def _source_arrays(source: Sequence[dict[str, np.ndarray]], chunk: int = 4096) -> Split:
  """Decodes a random-access TFDS source into stacked image/label arrays."""
  images, labels = [], []
  for start in range(0, len(source), chunk):
    keys = list(range(start, min(start + chunk, len(source))))
    for example in source.__getitems__(keys):
      images.append(np.asarray(example["image"]))
      labels.append(np.asarray(example["label"]))
  return _to_model_dtypes(np.stack(images), np.stack(labels))


def fake_data(num_train: int = 1024, num_test: int = 256, seed: int = 0) -> Dataset:
  """Random MNIST-shaped data for smoke runs and tests.

  Each image is noise plus a fixed random template of its class, so a model
  can learn it and a smoke run's loss visibly falls.
  """
  rng = np.random.default_rng(seed)
  templates = rng.random((NUM_CLASSES, *IMAGE_SHAPE), dtype=np.float32)

  def split(n: int) -> Split:
    y = rng.integers(0, NUM_CLASSES, size=n, dtype=np.int32)
    noise = rng.random((n, *IMAGE_SHAPE), dtype=np.float32)
    return 0.5 * noise + 0.5 * templates[y], y

  return {"train": split(num_train), "test": split(num_test)}


def batches(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    *,
    seed: int,
    drop_remainder: bool = True,
) -> Iterator[dict[str, np.ndarray]]:
  """Yields ``{"image", "label"}`` batches forever, reshuffling every epoch.

  With ``drop_remainder`` every batch has ``batch_size`` rows (one jit
  trace); otherwise each epoch ends with a smaller batch.
  """
  n = len(x)
  if len(y) != n:
    raise ValueError(f"x has {n} rows but y has {len(y)}")
  if batch_size <= 0 or n == 0 or (drop_remainder and batch_size > n):
    raise ValueError(f"cannot draw batches of {batch_size} from {n} examples")
  stop = n - n % batch_size if drop_remainder else n
  rng = np.random.default_rng(seed)
  while True:
    order = rng.permutation(n)
    for start in range(0, stop, batch_size):
      idx = order[start : start + batch_size]
      yield {"image": x[idx], "label": y[idx]}
