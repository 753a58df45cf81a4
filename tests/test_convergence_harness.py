"""Tests for benchmarks/_harness.py against hand-made curves with closed-form answers,
and for the target table of benchmarks/convergence.py. No wall-clock thresholds."""

from __future__ import annotations

import importlib.util
import math
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _import(name: str, path: pathlib.Path):
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  spec.loader.exec_module(module)
  return module


harness = _import("_harness", ROOT / "benchmarks" / "_harness.py")


def _run(losses, seconds=None, diverged=False, evals=()) -> "harness.Run":
  losses = np.asarray(losses, np.float64)
  seconds = np.arange(1, len(losses) + 1) * 0.5 if seconds is None else np.asarray(seconds)
  return harness.Run(losses, seconds, list(evals), diverged, 0.0, 1)


@pytest.mark.parametrize("window", [1, 3, 5])
def test_running_mean_of_a_ramp(window):
  n = 12
  values = np.arange(1, n + 1, dtype=np.float64)        # 1, 2, ..., n
  i = np.arange(n)
  # The mean of the consecutive integers from max(1, i - w + 2) to i + 1.
  expected = np.where(i >= window - 1, i + 1 - (window - 1) / 2, (i + 2) / 2)
  np.testing.assert_allclose(harness.running_mean(values, window), expected)


def test_time_to_target_geometric_curve():
  k = np.arange(1, 21)
  losses, seconds = 2.0 ** -k, 0.5 * k
  # window 1: 2^-k <= 1/16 first at k = 4.
  assert harness.time_to_target(losses, seconds, 1 / 16, window=1) == (4, 2.0)
  # window 2: (2^-(k-1) + 2^-k) / 2 = 3 * 2^-(k+1) <= 3/64 first at k = 5.
  assert harness.time_to_target(losses, seconds, 3 / 64, window=2) == (5, 2.5)
  assert harness.time_to_target(losses, seconds, 0.0, window=2) is None
  assert harness.time_to_target(losses, seconds, math.nan) is None


def test_time_to_target_sparse_accuracy():
  steps, seconds, accs = [20, 40, 60], [1.0, 2.0, 3.0], [0.9, 0.981, 0.99]
  hit = harness.time_to_target(accs, seconds, 0.98, window=1, steps=steps, higher_is_better=True)
  assert hit == (40, 2.0)
  assert harness.time_to_target(accs, seconds, 0.995, window=1, steps=steps,
                                higher_is_better=True) is None


def test_final_loss():
  assert harness.final_loss([5.0, 1.0, 2.0, 3.0], window=3) == 2.0
  assert math.isnan(harness.final_loss([], window=3))


def test_sweep_picks_lowest_final_loss_among_finite_runs():
  curves = {1: _run([3.0, 2.0]), 2: _run([3.0, 1.0]), 3: _run([3.0, 0.1], diverged=True)}
  result = harness.sweep(curves.__getitem__, [1, 2, 3], window=1)
  assert result.best == 2 and set(result.runs) == {1, 2, 3}
  assert harness.sweep(lambda v: _run([1.0], diverged=True), [1, 2]).best is None


@jax.jit
def _halve(state, batch):
  return state * batch, state  # loss = the state before the step


@pytest.mark.parametrize("sync_every", [1, 3])
def test_run_trains_real_steps(sync_every):
  syncs = []
  result = harness.run(_halve, jnp.float32(8.0), iter(lambda: 0.5, None),
                       lambda s: {"x": float(s)}, steps=7,
                       eval_every=2, sync_every=sync_every,
                       on_sync=lambda step, loss, sec: syncs.append(step))
  np.testing.assert_allclose(result.losses, 8.0 * 0.5 ** np.arange(7))
  assert len(result.seconds) == 7 and np.all(np.diff(result.seconds) >= 0)
  assert not result.diverged and result.compile_seconds > 0
  assert float(result.state) == pytest.approx(8.0 * 0.5 ** 7)
  # Evaluations at the first synchronisation at or after each multiple of 2, and at the end.
  assert [step for step, _, _ in result.evals] == {1: [2, 4, 6, 7], 3: [3, 6, 7]}[sync_every]
  assert syncs == {1: [1, 2, 3, 4, 5, 6, 7], 3: [3, 6, 7]}[sync_every]
  assert result.evals[-1][2] == {"x": pytest.approx(8.0 * 0.5 ** 7)}


def test_run_stops_on_divergence():
  # Losses 1, 2, 4, 8, 16: the fifth passes 10x the first.
  result = harness.run(_halve, jnp.float32(1.0), iter(lambda: 2.0, None), steps=50)
  assert result.diverged and len(result.losses) == 5
  result = harness.run(_halve, jnp.float32(1.0), iter(lambda: jnp.nan, None), steps=50)
  assert result.diverged and len(result.losses) == 2


def test_try_build_reports_unsupported_keywords_and_values():
  def factory(a, *, b=1):
    if b < 0:
      raise ValueError("b must be >= 0")
    return a + b

  assert harness.try_build(factory, 1, b=2) == 3
  assert harness.try_build(factory, 1, c=2) == harness.Skipped("unsupported keyword c")
  assert harness.try_build(factory, 1, b=-1).reason.startswith("unsupported value (b must")


def test_format_table():
  table = harness.format_table(["a", "bb"], [["x", 1.23456], [None, math.nan]])
  assert table.splitlines() == ["| a | bb    |", "| - | ----- |", "| x | 1.235 |",
                                "| - | nan   |"]


def test_plot_writes_png(tmp_path):
  path = tmp_path / "curves.png"
  harness.plot({"toy": {"a": _run([3.0, 2.0, 1.0]), "b": _run([1.0], diverged=True)}}, str(path))
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_target_rows_ratios_to_adam():
  convergence = _import("convergence", ROOT / "benchmarks" / "convergence.py")
  k = np.arange(1, 11)
  runs = {"adam lr 0.001": _run(1.0 / k, seconds=0.1 * k,
                                evals=[(5, 0.5, {"test_acc": 0.97}), (10, 1.0,
                                                                     {"test_acc": 0.985})]),
          "kfac": _run(1.0 / (2 * k), seconds=0.4 * k, evals=[(5, 2.0, {"test_acc": 0.99})]),
          "kfac adaptive": harness.Skipped("unsupported keyword adapt_damping"),
          "sgd": _run(1.0 / k, diverged=True)}
  rows = {row[0]: row for row in convergence.target_rows(runs, 0.2, 0.98)}
  assert rows["kfac adaptive"][-1] == "skipped: unsupported keyword adapt_damping"
  assert rows["sgd"][-1] == "diverged" and rows["sgd"][3] is None
  assert rows["kfac"][7:12] == [0.99, 5, 2.0, 0.5, 2.0]  # 98%: step 5 / 10, 2.0 s / 1.0 s
  harmonic = np.cumsum(1.0 / k) / k  # the running mean of 1/k (window 20 > 10 steps)
  target = float(harmonic[-1])  # adam reaches its own final loss at step 10
  rows = {row[0]: row for row in convergence.target_rows(runs, target, None)}
  kfac_step = int(np.argmax(harmonic / 2 <= target)) + 1
  assert rows["adam lr 0.001"][3:7] == [10, 1.0, 1.0, 1.0]
  assert rows["kfac"][3:7] == [kfac_step, pytest.approx(0.4 * kfac_step),
                               kfac_step / 10, pytest.approx(0.4 * kfac_step / 1.0)]
