"""Smoke runs of examples/autoencoder.py on fake data with a small model, in-process."""

from __future__ import annotations

import csv
import importlib.util
import pathlib
import sys

import jax
import numpy as np
import optax
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMALL = ["--fake-data", "--steps", "3", "--batch-size", "16", "--widths", "16,4,16", "--quiet"]


@pytest.fixture(scope="module")
def autoencoder():
  spec = importlib.util.spec_from_file_location("autoencoder_example",
                                                ROOT / "examples" / "autoencoder.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # Flax's dataclasses look their module up there.
  spec.loader.exec_module(module)
  return module


def test_loss_is_the_batch_mean_of_per_image_pixel_sums(autoencoder):
  model = autoencoder.Autoencoder((8, 2, 8))
  x = np.random.default_rng(0).random((5, 28, 28, 1), dtype=np.float32)
  params = model.init(jax.random.PRNGKey(0), x.reshape(5, -1))["params"]
  logits = model.apply({"params": params}, x.reshape(5, -1))
  expected = np.mean(np.sum(optax.sigmoid_binary_cross_entropy(logits, x.reshape(5, -1)), -1))
  loss = autoencoder.make_loss_fn(model)(params, {"image": x})
  np.testing.assert_allclose(loss, expected, rtol=1e-6)


@pytest.mark.slow  # an example end to end; run with -m slow
def test_all_optimizers_few_steps(autoencoder, tmp_path, capsys):
  path = tmp_path / "metrics.csv"
  results = autoencoder.main([*SMALL, "--optimizer", "all", "--adam-lrs", "1e-3",
                              "--sgd-lrs", "1e-3", "--metrics-csv", str(path)])
  out = capsys.readouterr().out
  runs = {k: r for k, r in results.items() if not hasattr(r, "reason")}
  assert {"kfac fixed", "adam lr 0.001", "sgd lr 0.001"} <= set(runs)
  for label, r in runs.items():
    assert len(r.losses) == 3 and np.all(np.isfinite(r.losses)) and not r.diverged, label
    assert np.isfinite(r.evals[-1][2]["test_loss"])
  for label, r in results.items():
    if hasattr(r, "reason"):
      assert f"skipped: {r.reason}" in out
  rows = list(csv.DictReader(path.open()))
  assert len(rows) == 3 * len(runs)
  assert list(rows[0]) == ["run", "step", "seconds", "train_loss", "test_loss", "test_sq_err"]
  assert [row["test_loss"] != "" for row in rows[:3]] == [False, False, True]  # at the end
  assert float(rows[2]["test_loss"]) == pytest.approx(runs[rows[0]["run"]].evals[-1][2][
      "test_loss"], rel=1e-5)
  assert "| run" in out


def test_one_baseline_with_plot(autoencoder, tmp_path):
  png = tmp_path / "ae.png"
  results = autoencoder.main([*SMALL, "--optimizer", "adam", "--adam-lrs", "1e-3,1e-2",
                              "--plot", str(png)])
  assert list(results) == ["adam lr 0.001", "adam lr 0.01"]
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
