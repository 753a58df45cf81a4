"""Runs of examples/mnist.py, called in-process through its `main(argv)`, and its helpers."""

import csv
import io
import math
import os
import pathlib
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests import _nets
import rich.console

ROOT = pathlib.Path(__file__).resolve().parents[1]
MNIST_DIR = str(ROOT / "examples" / "data" / "mnist")  # the bundled t10k pair
SMOKE = ["--steps", "3", "--batch-size", "32", "--log-every", "1"]


@pytest.fixture(scope="module")
def mnist():
  return _nets.import_script(ROOT / "examples" / "mnist.py", "mnist")


@pytest.fixture(scope="module")
def progress():
  return _nets.import_script(ROOT / "benchmarks" / "progress.py", "progress")


def _check_run(out: str, result: dict, name: str, steps: int = 3) -> None:
  """One plain line per step (stdout is no terminal here), the summary, no divergence."""
  for step in range(1, steps + 1):
    assert f"{name} step {step:5d}  loss " in out
  assert f"{name}: test loss" in out and "test accuracy" in out
  assert len(result["losses"]) == steps
  assert not result["diverged"]
  assert "\x1b" not in out  # no terminal control codes in a log


@pytest.mark.slow  # an example end to end; run with -m slow
def test_kfac_learns_fake_data(mnist, capsys):
  """Fake digits are noisy class templates: 20 K-FAC steps get well above chance (0.1)."""
  results = mnist.main(["--fake-data", "--steps", "20", "--batch-size", "32", "--log-every", "5"])
  out = capsys.readouterr().out
  assert list(results) == ["kfac"]
  result = results["kfac"]
  assert [line.split()[2] for line in out.splitlines() if line.startswith("kfac step")] == [
      "5", "10", "15", "20"]
  assert result["test_accuracy"] > 0.5, result["test_accuracy"]  # 0.83 on this CPU
  assert result["test_loss"] < 0.75 * math.log(10)
  assert np.mean(result["losses"][-5:]) < np.mean(result["losses"][:5]) - 0.3


def test_adam_fake_data(mnist, capsys):
  results = mnist.main(["--fake-data", "--optimizer", "adam", *SMOKE])
  _check_run(capsys.readouterr().out, results["adam"], "adam")


@pytest.mark.slow  # an example end to end; run with -m slow
def test_plot_and_metrics_csv_both(mnist, capsys, tmp_path):
  png, table = tmp_path / "loss.png", tmp_path / "metrics.csv"
  results = mnist.main(["--fake-data", "--optimizer", "both", "--steps", "2", "--batch-size",
                        "32", "--log-every", "1", "--plot", str(png), "--metrics-csv", str(table)])
  out = capsys.readouterr().out
  assert list(results) == ["kfac", "adam"]
  assert out.count("test accuracy") == 2
  assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  with open(table, newline="") as f:
    rows = list(csv.DictReader(f))
  assert list(rows[0]) == list(mnist.CSV_FIELDS)
  assert [(row["optimizer"], row["step"]) for row in rows] == [
      ("kfac", "1"), ("kfac", "2"), ("adam", "1"), ("adam", "2")]
  for name, (window, final) in (("kfac", rows[:2]), ("adam", rows[2:])):
    result = results[name]
    assert float(window["train_loss"]) == result["losses"][0] and window["test_loss"] == ""
    assert float(final["test_loss"]) == result["test_loss"]
    assert float(final["test_accuracy"]) == result["test_accuracy"]
    assert float(final["seconds"]) == result["seconds"][-1]


def test_checkpoint_resume_is_bit_identical(mnist, capsys, tmp_path):
  """6 steps in one run equal 3 steps, stopped, and resumed to 6, parameters and state.

  Inverses every 2 steps: one is recomputed after the resume.
  """
  common = ["--fake-data", "--batch-size", "32", "--invert-every", "2", "--checkpoint-every", "3"]
  through = mnist.main([*common, "--steps", "6", "--checkpoint-dir", str(tmp_path / "a")])
  assert sorted(os.listdir(tmp_path / "a" / "kfac")) == ["3", "6"]
  mnist.main([*common, "--steps", "3", "--checkpoint-dir", str(tmp_path / "b")])
  capsys.readouterr()
  resumed = mnist.main([*common, "--steps", "6", "--checkpoint-dir", str(tmp_path / "b")])
  out = capsys.readouterr().out
  assert f"kfac: resumed from step 3 ({tmp_path / 'b' / 'kfac' / '3'})" in out
  assert resumed["kfac"]["steps"] == [4, 5, 6]
  assert resumed["kfac"]["losses"] == through["kfac"]["losses"][3:]
  with ocp.StandardCheckpointer() as checkpointer:  # no target: dicts and lists of arrays
    saved = [checkpointer.restore(tmp_path / run / "kfac" / "6") for run in ("a", "b")]
  assert jax.tree_util.tree_structure(saved[0]) == jax.tree_util.tree_structure(saved[1])
  assert len(jax.tree_util.tree_leaves(saved[0]["opt_state"])) > 10
  for a, b in zip(*map(jax.tree_util.tree_leaves, saved)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(*(jax.tree_util.tree_leaves(r["kfac"]["params"]) for r in (through, resumed))):
    np.testing.assert_array_equal(a, b)


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


@pytest.mark.slow  # an example end to end; run with -m slow
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


# --- benchmarks/progress.py --------------------------------------------------------------------


def _console(terminal: bool) -> rich.console.Console:
  return rich.console.Console(file=io.StringIO(), force_terminal=terminal, width=120)


def test_progress_without_a_terminal_prints_one_line_per_window(progress):
  console = _console(terminal=False)
  windows = {}
  with progress.Progress(5, "sgd", every=2, console=console) as bar:
    for step in range(1, 6):
      windows[step] = bar.update(step, loss=float(step), batch_acc=0.5)
  lines = console.file.getvalue().splitlines()
  assert [line.split()[:3] for line in lines] == [["sgd", "step", str(s)] for s in (2, 4, 5)]
  assert lines[1].startswith("sgd step     4  loss 3.5000  batch acc 0.5000  steps/s ")
  assert windows[1] is windows[3] is None
  assert windows[2]["steps_per_second"] > 0 and windows[4]["loss"] == 3.5
  assert windows[5]["loss"] == 5.0 and bar.steps_per_second > 0


def test_progress_on_a_terminal_draws_a_bar(progress):
  console = _console(terminal=True)
  with progress.Progress(4, "kfac", every=2, start=1, console=console) as bar:
    for step in range(2, 5):
      bar.update(step, loss=0.25)
  out = console.file.getvalue()
  assert "\x1b[" in out and "4/4" in out and "loss 0.2500" in out
  assert "kfac step" not in out  # no plain lines besides the bar


def test_metrics_csv_appends_only_to_the_same_header(progress, tmp_path):
  path = tmp_path / "m.csv"
  with progress.MetricsCSV(path, ["step", "loss"]) as table:
    table.write(step=1, loss=0.5)
  with progress.MetricsCSV(path, ["step", "loss"], append=True) as table:
    table.write(step=2)
  assert path.read_text().splitlines() == ["step,loss", "1,0.5", "2,"]
  with pytest.raises(ValueError, match="header"):
    progress.MetricsCSV(path, ["step", "accuracy"], append=True)
  with progress.MetricsCSV(path, ["step", "loss"]) as table:  # no append: a fresh file
    pass
  assert path.read_text().splitlines() == ["step,loss"]
