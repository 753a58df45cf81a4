"""MNIST for the examples, as numpy arrays: the bundled digits, a download, or fake data.

Every loader returns ``{"train": (images, labels), "test": (images, labels)}``
with images float32 in [0, 1] of shape (N, 28, 28, 1) and labels int32 in
[0, 10). Nothing here imports JAX; the training loop does the device work.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import shutil
import urllib.error
import urllib.request
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
      "leave --data-dir out for the bundled digits, or use --dataset download where a network "
      "is reachable"
  )


def _split_in_order(data: Split, test_size: int) -> Dataset:
  """Splits one (x, y) pair into leading "train" and trailing "test" parts."""
  x, y = data
  if not 0 < test_size < len(x):
    raise ValueError(f"test_size must be in (0, {len(x)}), got {test_size}")
  cut = len(x) - test_size
  return {"train": (x[:cut], y[:cut]), "test": (x[cut:], y[cut:])}


# Full MNIST (60,000 train / 10,000 test) from TFDS's mirror, each file checked against
# the size and SHA-256 that TFDS records for it (tensorflow_datasets/url_checksums/mnist.txt).
MNIST_URL = "https://storage.googleapis.com/cvdf-datasets/mnist/"
CHECKSUMS = {
    "train-images-idx3-ubyte.gz":
        (9912422, "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
    "train-labels-idx1-ubyte.gz":
        (28881, "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
    "t10k-images-idx3-ubyte.gz":
        (1648877, "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
    "t10k-labels-idx1-ubyte.gz":
        (4542, "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
}
CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "jkfac", "mnist")


def load_download(data_dir: str | None = None, *, base_url: str | None = None,
                  timeout: float = 30.0) -> Dataset:
  """Full MNIST, downloaded once into ``data_dir`` (default ``~/.cache/jkfac/mnist``).

  Files already there with the recorded size and SHA-256 are reused; missing ones are
  fetched from ``base_url`` (default ``MNIST_URL``; standard library only: no TensorFlow, no TFDS) and checked
  before they are kept. Raises ``ConnectionError`` (one line) where the server cannot
  be reached and ``ValueError`` where a download does not match its checksum.
  """
  data_dir, base_url = data_dir or CACHE_DIR, base_url or MNIST_URL
  os.makedirs(data_dir, exist_ok=True)
  for name, (size, sha256) in CHECKSUMS.items():
    path = os.path.join(data_dir, name)
    if not _matches(path, size, sha256):
      _fetch(base_url + name, path, size, sha256, timeout)
  return {split: _read_pair(data_dir, *IDX_FILES[split]) for split in IDX_FILES}


def _matches(path: str, size: int, sha256: str) -> bool:
  """Whether ``path`` exists with the given size and SHA-256."""
  if not os.path.isfile(path) or os.path.getsize(path) != size:
    return False
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest() == sha256


def _fetch(url: str, path: str, size: int, sha256: str, timeout: float) -> None:
  """Downloads ``url`` to ``path`` through a temporary file, kept only if it checks out."""
  partial = path + ".part"
  try:
    with urllib.request.urlopen(url, timeout=timeout) as response, open(partial, "wb") as f:
      shutil.copyfileobj(response, f)
  except (OSError, urllib.error.URLError) as e:  # Includes timeouts and HTTP errors.
    if os.path.exists(partial):
      os.remove(partial)
    reason = getattr(e, "reason", None) or e
    raise ConnectionError(
        f"could not download {url} ({reason}); offline, use the bundled digits "
        "(the default, --dataset idx)") from e
  if not _matches(partial, size, sha256):
    got = os.path.getsize(partial)
    os.remove(partial)
    raise ValueError(f"{url}: the download ({got} bytes) does not match the recorded size "
                     f"{size} and SHA-256 {sha256[:12]}...; nothing was kept")
  os.replace(partial, path)


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
