"""examples/mnist.py, called in-process through its `main(argv)`. The README's first command
(both optimizers on the bundled digits, the table, the plot) runs end to end in
tests/test_doc_commands.py."""

import math
import pathlib
import socket

import numpy as np
import pytest

from tests import _nets

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mnist():
  return _nets.import_script(ROOT / "examples" / "mnist.py", "mnist")


def test_evaluate_is_the_mean_over_every_example(mnist):
  """`make_evaluate` in chunks equals the loss function on the whole set at once."""
  import jax
  model = mnist.ConvNet()
  x = np.random.default_rng(0).random((7, 28, 28, 1), np.float32)
  y = np.arange(7, dtype=np.int32) % 10
  params = model.init(jax.random.PRNGKey(0), x[:1])["params"]
  loss, accuracy = mnist.make_loss_fn(model)(params, {"image": x, "label": y})
  got = mnist.make_evaluate(model, batch_size=3)(params, x, y)
  np.testing.assert_allclose(got, (float(loss), float(accuracy)), rtol=1e-5)


def test_missing_data_dir_is_one_line_error(mnist, capsys, tmp_path):
  with pytest.raises(SystemExit) as exit_info:
    mnist.main(["--data-dir", str(tmp_path / "missing"), "--steps", "1"])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert err.splitlines()[-1].startswith("mnist.py: error: no MNIST IDX pair")
  assert "bundled" in err and "Traceback" not in err


def test_download_offline_is_one_line_error(mnist, capsys, monkeypatch, tmp_path):
  with socket.socket() as s:  # a port nothing listens on: refused at once, no network
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  monkeypatch.setattr(mnist.mnist_data, "MNIST_URL", f"http://127.0.0.1:{port}/")
  with pytest.raises(SystemExit) as exit_info:
    mnist.main(["--dataset", "download", "--data-dir", str(tmp_path), "--steps", "1"])
  assert exit_info.value.code == 2
  last = capsys.readouterr().err.splitlines()[-1]
  assert last.startswith(f"mnist.py: error: could not download http://127.0.0.1:{port}/")
  assert "bundled" in last


@pytest.mark.slow  # an example end to end; run with -m slow
def test_kfac_learns_fake_data(mnist, capsys):
  """Fake digits are noisy class templates: 20 K-FAC steps get well above chance (0.1)."""
  results = mnist.main(["--dataset", "fake", "--optimizer", "kfac", "--steps", "20",
                        "--batch-size", "32", "--log-every", "5", "--plot", ""])
  out = capsys.readouterr().out
  assert [line.split()[2] for line in out.splitlines() if line.startswith("kfac step")] == [
      "5/20:", "10/20:", "15/20:", "20/20:"]
  result = results["kfac"]
  assert result["test_accuracy"] > 0.5, result["test_accuracy"]
  assert result["test_loss"] < 0.75 * math.log(10)
  assert np.mean(result["losses"][-5:]) < np.mean(result["losses"][:5]) - 0.3
