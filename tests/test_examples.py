"""Smoke runs of examples/mnist.py, called in-process through its `main(argv)`."""

import importlib.util
import os
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
MNIST_DIR = os.environ.get("JKFAC_MNIST_DIR", str(ROOT.parent / "shared" / "data" / "mnist"))
SMOKE = ["--steps", "3", "--batch-size", "32", "--log-every", "1"]


@pytest.fixture(scope="module")
def mnist():
  spec = importlib.util.spec_from_file_location("mnist_example", ROOT / "examples" / "mnist.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # Flax's dataclasses look their module up there.
  spec.loader.exec_module(module)
  return module


def _check_run(out: str, result: dict, name: str) -> None:
  assert f"{name} step     3" in out
  assert f"{name}: test loss" in out and "test accuracy" in out
  assert len(result["losses"]) == 3
  assert not result["diverged"]
  assert 0.0 <= result["test_accuracy"] <= 1.0


def test_kfac_fake_data(mnist, capsys):
  results = mnist.main(["--fake-data", *SMOKE])
  _check_run(capsys.readouterr().out, results["kfac"], "kfac")
  assert list(results) == ["kfac"]


def test_adam_fake_data(mnist, capsys):
  results = mnist.main(["--fake-data", "--optimizer", "adam", *SMOKE])
  _check_run(capsys.readouterr().out, results["adam"], "adam")


def test_plot_both(mnist, capsys, tmp_path):
  png = tmp_path / "loss.png"
  results = mnist.main(["--fake-data", "--optimizer", "both", "--steps", "2", "--batch-size",
                        "32", "--plot", str(png)])
  out = capsys.readouterr().out
  assert list(results) == ["kfac", "adam"]
  assert out.count("test accuracy") == 2
  assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(not os.path.isdir(MNIST_DIR),
                    reason=f"no MNIST IDX files at {MNIST_DIR} (set JKFAC_MNIST_DIR)")
def test_kfac_real_data(mnist, capsys):
  results = mnist.main(["--data-dir", MNIST_DIR, *SMOKE])
  out = capsys.readouterr().out
  _check_run(out, results["kfac"], "kfac")
  assert "data: idx" in out


def test_missing_data_dir_is_one_line_error(mnist, capsys, tmp_path):
  with pytest.raises(SystemExit) as exit_info:
    mnist.main(["--data-dir", str(tmp_path / "missing"), "--steps", "1"])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("mnist.py: error: ")
  assert "--fake-data" in err and "Traceback" not in err


@pytest.mark.multidevice
@pytest.mark.parametrize("mode", [[], ["--sharding"]], ids=["pmap", "sharding"])
def test_data_parallel_runs(mode):
  """`--devices 4` (pmap) and `--devices 4 --sharding` (jit over a mesh) train and report.

  Runs in a subprocess: the host-device flag must be set before JAX starts.
  """
  import subprocess
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
         "PYTHONPATH": str(ROOT)}
  run = subprocess.run([sys.executable, str(ROOT / "examples" / "mnist.py"), "--fake-data",
                        *SMOKE, "--devices", "4", *mode], env=env, capture_output=True,
                       text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "kfac step     3" in run.stdout and "test accuracy" in run.stdout


def test_devices_beyond_what_jax_sees_is_a_clear_error(mnist, capsys):
  with pytest.raises(SystemExit) as exit_info:
    mnist.main(["--fake-data", *SMOKE, "--devices", "64"])
  assert exit_info.value.code == 2
  assert "xla_force_host_platform_device_count" in capsys.readouterr().err
