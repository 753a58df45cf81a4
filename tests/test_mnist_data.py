"""Tests for examples/mnist_data.py: IDX parsing, splits, the download, fake data, batches."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import pathlib
import socket
import struct
import threading

import numpy as np
import pytest

from tests import _nets

_REPO = pathlib.Path(__file__).resolve().parents[1]
# The bundled MNIST t10k pair (real digits, CC BY-SA 3.0; see its NOTICE).
_BUNDLED_MNIST = _REPO / "examples" / "data" / "mnist"


mnist_data = _nets.import_script(_REPO / "examples" / "mnist_data.py", "mnist_data")

_TYPE_CODES = {">u1": 0x08, ">i1": 0x09, ">i2": 0x0B, ">i4": 0x0C, ">f4": 0x0D, ">f8": 0x0E}


def _write_idx(path: pathlib.Path, array: np.ndarray) -> None:
  """Writes ``array`` as a gzipped big-endian IDX file (independent of the reader)."""
  big = array.astype(array.dtype.newbyteorder(">"))
  code = _TYPE_CODES[big.dtype.str.replace("|", ">")]
  header = struct.pack(">BBBB", 0, 0, code, array.ndim)
  header += struct.pack(f">{array.ndim}I", *array.shape)
  with gzip.open(path, "wb") as f:
    f.write(header + big.tobytes())


def _write_pair(folder: pathlib.Path, split: str, images: np.ndarray, labels: np.ndarray) -> None:
  images_name, labels_name = mnist_data.IDX_FILES[split]
  _write_idx(folder / images_name, images)
  _write_idx(folder / labels_name, labels)


def _tiny(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
  labels = rng.integers(0, 10, size=n, dtype=np.uint8)
  return images, labels


def _check_mnist_split(x: np.ndarray, y: np.ndarray, n: int) -> None:
  assert x.shape == (n, 28, 28, 1) and x.dtype == np.float32
  assert y.shape == (n,) and y.dtype == np.int32
  assert 0.0 <= x.min() and x.max() <= 1.0
  assert 0 <= y.min() and y.max() < 10


@pytest.mark.parametrize("dtype", [">u1", ">i1", ">i2", ">i4", ">f4", ">f8"])
def test_read_idx_round_trips_every_type_code(tmp_path, dtype):
  array = (np.arange(24) - 7).reshape(2, 3, 4).astype(dtype)
  _write_idx(tmp_path / "a.gz", array)
  out = mnist_data.read_idx(str(tmp_path / "a.gz"))
  assert out.dtype.isnative and out.shape == (2, 3, 4)
  np.testing.assert_array_equal(out, array)


def test_load_idx_round_trips_both_pairs(tmp_path):
  train, test = _tiny(5, seed=0), _tiny(3, seed=1)
  _write_pair(tmp_path, "train", *train)
  _write_pair(tmp_path, "test", *test)
  data = mnist_data.load_idx(str(tmp_path))
  for split, (images, labels) in (("train", train), ("test", test)):
    x, y = data[split]
    _check_mnist_split(x, y, len(labels))
    np.testing.assert_array_equal(x[..., 0], images.astype(np.float32) / 255)
    np.testing.assert_array_equal(y, labels)


def test_load_idx_splits_a_lone_test_pair_in_order(tmp_path):
  images, labels = _tiny(10, seed=2)
  _write_pair(tmp_path, "test", images, labels)
  data = mnist_data.load_idx(str(tmp_path), test_size=3)
  np.testing.assert_array_equal(data["train"][1], labels[:7])
  np.testing.assert_array_equal(data["test"][1], labels[7:])
  np.testing.assert_array_equal(data["test"][0][..., 0], images[7:] / np.float32(255))


def test_load_idx_rejects_bad_magic_and_truncated_files(tmp_path):
  images, labels = _tiny(2, seed=3)
  _write_pair(tmp_path, "test", images, labels)
  path = tmp_path / "t10k-images-idx3-ubyte.gz"
  with gzip.open(path) as f:
    good = f.read()
  for raw, match in ((b"\x12\x34" + good[2:], "magic"), (good[:-1], "body"), (good[:10], "header")):
    with gzip.open(path, "wb") as f:
      f.write(raw)
    with pytest.raises(ValueError, match=match):
      mnist_data.load_idx(str(tmp_path))


def test_load_idx_rejects_mismatched_label_count(tmp_path):
  images, labels = _tiny(2, seed=4)
  _write_pair(tmp_path, "test", images, labels[:1])
  with pytest.raises(ValueError, match="labels"):
    mnist_data.load_idx(str(tmp_path))


def test_load_idx_splits_bundled_t10k_into_8000_and_2000():
  assert mnist_data.BUNDLED_DIR == str(_BUNDLED_MNIST)
  data = mnist_data.load_idx()  # the bundled pair is the default
  _check_mnist_split(*data["train"], 8000)
  _check_mnist_split(*data["test"], 2000)
  assert set(np.unique(data["test"][1])) == set(range(10))
  assert 0.05 < data["train"][0].mean() < 0.3  # Real digits: mostly dark.


def test_load_idx_missing_folder_names_folder_and_options(tmp_path):
  missing = tmp_path / "nowhere"
  with pytest.raises(FileNotFoundError) as info:
    mnist_data.load_idx(str(missing))
  message = str(info.value)
  assert "\n" not in message
  assert str(missing) in message and "bundled" in message and "--dataset download" in message


def test_fake_data_has_mnist_shapes_and_is_seeded():
  data = mnist_data.fake_data(num_train=64, num_test=16, seed=1)
  _check_mnist_split(*data["train"], 64)
  _check_mnist_split(*data["test"], 16)
  again = mnist_data.fake_data(num_train=64, num_test=16, seed=1)
  np.testing.assert_array_equal(data["train"][0], again["train"][0])
  other = mnist_data.fake_data(num_train=64, num_test=16, seed=2)
  assert not np.array_equal(data["train"][1], other["train"][1])


def test_batches_cover_each_epoch_and_reshuffle():
  x = np.arange(12, dtype=np.float32).reshape(12, 1, 1, 1)
  y = np.arange(12, dtype=np.int32)
  it = mnist_data.batches(x, y, 4, seed=0)
  epochs = [[next(it) for _ in range(3)] for _ in range(2)]
  for epoch in epochs:
    assert all(b["image"].shape == (4, 1, 1, 1) and b["label"].shape == (4,) for b in epoch)
    assert all(np.array_equal(b["image"][:, 0, 0, 0], b["label"]) for b in epoch)
    assert sorted(np.concatenate([b["label"] for b in epoch])) == list(range(12))
  first, second = (np.concatenate([b["label"] for b in e]) for e in epochs)
  assert not np.array_equal(first, second)


def test_batches_remainder_and_seed():
  x, y = np.zeros((10, 28, 28, 1), np.float32), np.arange(10, dtype=np.int32)
  kept = mnist_data.batches(x, y, 4, seed=3, drop_remainder=False)
  assert [len(next(kept)["label"]) for _ in range(6)] == [4, 4, 2, 4, 4, 2]
  dropped = mnist_data.batches(x, y, 4, seed=3)
  assert [len(next(dropped)["label"]) for _ in range(4)] == [4, 4, 4, 4]
  a, b = mnist_data.batches(x, y, 4, seed=5), mnist_data.batches(x, y, 4, seed=5)
  assert all(np.array_equal(next(a)["label"], next(b)["label"]) for _ in range(5))
  with pytest.raises(ValueError):
    next(mnist_data.batches(x, y, 11, seed=0))


# --- --dataset download: a local file server on 127.0.0.1, never the network ------------------


@pytest.fixture
def mnist_server(tmp_path):
  """Serves tiny MNIST-format files from a folder on 127.0.0.1; yields (url, folder, data)."""
  served = tmp_path / "served"
  served.mkdir()
  data = {"train": _tiny(6, seed=10), "test": _tiny(4, seed=11)}
  for split, pair in data.items():
    _write_pair(served, split, *pair)
  handler = functools.partial(_QuietHandler, directory=str(served))
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  yield f"http://127.0.0.1:{server.server_address[1]}/", served, data
  server.shutdown()
  server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
  """Serves files without a log line per request on stderr."""

  def log_message(self, *args) -> None:
    pass


def _record(monkeypatch, folder: pathlib.Path, corrupt: str | None = None) -> None:
  """Records the served files' sizes and SHA-256 sums as `CHECKSUMS` (one altered)."""
  sums = {}
  for name in mnist_data.CHECKSUMS:
    raw = (folder / name).read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    sums[name] = (len(raw), "0" * 64 if name == corrupt else digest)
  monkeypatch.setattr(mnist_data, "CHECKSUMS", sums)


def test_recorded_checksums_match_the_bundled_test_pair():
  for name in mnist_data.IDX_FILES["test"]:
    raw = (_BUNDLED_MNIST / name).read_bytes()
    assert mnist_data.CHECKSUMS[name] == (len(raw), hashlib.sha256(raw).hexdigest())


def test_load_download_fetches_checks_reads_and_caches(monkeypatch, mnist_server, tmp_path):
  url, served, data = mnist_server
  _record(monkeypatch, served)
  cache = tmp_path / "cache"
  loaded = mnist_data.load_download(str(cache), base_url=url)
  for split, (images, labels) in data.items():
    _check_mnist_split(*loaded[split], len(labels))  # both pairs: no 8,000/2,000 split
    np.testing.assert_array_equal(loaded[split][0][..., 0], images.astype(np.float32) / 255)
    np.testing.assert_array_equal(loaded[split][1], labels)
  assert sorted(p.name for p in cache.iterdir()) == sorted(mnist_data.CHECKSUMS)
  for name in mnist_data.CHECKSUMS:  # The server gone, the checked copies are reused.
    (served / name).unlink()
  again = mnist_data.load_download(str(cache), base_url=url)
  np.testing.assert_array_equal(again["train"][1], data["train"][1])


def test_load_download_rejects_a_checksum_mismatch_and_keeps_nothing(monkeypatch, mnist_server,
                                                                     tmp_path):
  url, served, _ = mnist_server
  _record(monkeypatch, served, corrupt="train-labels-idx1-ubyte.gz")
  cache = tmp_path / "cache"
  with pytest.raises(ValueError, match="train-labels-idx1-ubyte.gz: the download .* does not "
                                       "match the recorded size"):
    mnist_data.load_download(str(cache), base_url=url)
  assert not (cache / "train-labels-idx1-ubyte.gz").exists()
  assert not list(cache.glob("*.part"))


def test_load_download_unreachable_is_one_line_connection_error(tmp_path):
  with socket.socket() as s:  # A port nothing listens on: refused at once.
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  with pytest.raises(ConnectionError) as info:
    mnist_data.load_download(str(tmp_path), base_url=f"http://127.0.0.1:{port}/", timeout=5)
  message = str(info.value)
  assert "\n" not in message and message.startswith("could not download http://127.0.0.1")
  assert "bundled" in message and "--dataset idx" in message
  assert not list(tmp_path.iterdir())
