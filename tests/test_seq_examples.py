"""The sequence examples (transformer_lm.py, lstm.py), their corpus and their harness.

The examples run in-process through their `main(argv)` on tiny configurations.
"""

import csv
import importlib.util
import math
import pathlib
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY_LM = ["--steps", "3", "--eval-every", "2", "--batch-size", "4", "--length", "16",
           "--d-model", "16", "--num-heads", "2", "--num-layers", "1", "--max-bytes", "300000",
           "--eval-batches", "1"]
TINY_LSTM = ["--steps", "3", "--eval-every", "2", "--batch-size", "8", "--length", "4",
             "--hidden", "8", "--embed-dim", "4", "--eval-batches", "1"]


def _load(name: str):
  spec = importlib.util.spec_from_file_location(f"{name}_example", ROOT / "examples" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # Flax's dataclasses look their module up there.
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def lm():
  return _load("transformer_lm")


@pytest.fixture(scope="module")
def lstm():
  return _load("lstm")


@pytest.fixture(scope="module")
def text_data():
  return _load("text_data")


@pytest.fixture(scope="module")
def timing():
  return _load("_timing")


def _rows(path) -> list[dict[str, str]]:
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    assert tuple(reader.fieldnames) == ("optimizer", "lr", "step", "seconds", "train_loss",
                                        "eval_loss")
    return list(reader)


def _check_outputs(result, csv_path, png_path, names, steps):
  runs = result["runs"]
  assert [run.optimizer for run in runs] == list(names)
  for run in runs:
    assert not run.diverged
    assert run.train.steps == list(range(1, steps + 1))
    assert all(math.isfinite(x) for x in run.train.losses + run.eval.losses)
    assert run.eval.steps == [2, 3]
  rows = _rows(csv_path)
  assert len(rows) == steps * len(names)
  assert [row["optimizer"] for row in rows[::steps]] == list(names)
  assert [row["eval_loss"] != "" for row in rows[:steps]] == [False, True, True]
  assert float(rows[0]["seconds"]) == 0.0  # The compiling first step is not timed.
  assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_transformer_all_optimizers(lm, tmp_path, capsys):
  csv_path, png_path = tmp_path / "m.csv", tmp_path / "m.png"
  result = lm.main([*TINY_LM, "--describe", "--metrics-csv", str(csv_path),
                    "--plot", str(png_path)])
  out = capsys.readouterr().out
  _check_outputs(result, csv_path, png_path, ("kfac", "adamw", "muon"), 3)
  assert "tied_embedding" in out and "K-FAC state" in out  # --describe's table.
  assert "K-FAC reaches AdamW's" in out or "K-FAC never reaches AdamW's" in out
  assert "Muon's final eval loss" in out


def test_lstm_kfac_and_adam(lstm, tmp_path, capsys):
  csv_path, png_path = tmp_path / "l.csv", tmp_path / "l.png"
  result = lstm.main([*TINY_LSTM, "--metrics-csv", str(csv_path), "--plot", str(png_path),
                      "--kfac-kwargs", '{"cov_ema_decay": 0.9, "invert_every": 2}'])
  _check_outputs(result, csv_path, png_path, ("kfac", "adam"), 3)
  assert "Adam's final eval loss" in capsys.readouterr().out


def test_sweep_and_divergence(lm, tmp_path, capsys):
  result = lm.main([*TINY_LM, "--optimizer", "adamw", "--sweep"])
  assert [run.lr for run in result["runs"]] == list(lm.OPTIMIZERS["adamw"].sweep)
  assert result["best"]["adamw"] in result["runs"]
  result = lm.main([*TINY_LM, "--optimizer", "adamw", "--lr", "1e4"])
  (run,) = result["runs"]
  assert run.diverged and len(run.train.steps) < 3 and result["best"]["adamw"] is None
  assert "diverged" in capsys.readouterr().out


def test_bag_of_tokens_cannot_tell_the_label(lstm):
  """Shuffling a sequence keeps its bag and changes first == last for many examples."""
  batch = lstm.first_equals_last(2000, 12, np.random.default_rng(0))
  assert 0.45 < batch["label"].mean() < 0.55
  assert np.all(batch["label"] == (batch["inputs"][:, 0] == batch["inputs"][:, -1]))
  shuffled = np.random.default_rng(1).permuted(batch["inputs"], axis=1)
  assert np.mean((shuffled[:, 0] == shuffled[:, -1]) != batch["label"]) > 0.3


def test_split_by_file_is_disjoint(text_data):
  files = text_data.read_corpus(max_bytes=300_000)
  assert sum(len(data) for _, data in files) <= 300_000
  assert [name for name, _ in files] == sorted(name for name, _ in files)
  train, held_out = text_data.split_by_file(files)
  train_names, eval_names = {n for n, _ in train}, {n for n, _ in held_out}
  assert train_names and eval_names and not train_names & eval_names
  assert train_names | eval_names == {n for n, _ in files}
  assert text_data.split_by_file(files) == (train, held_out)


def test_split_needs_eval_files(text_data):
  with pytest.raises(ValueError, match="none for eval"):
    text_data.split_by_file([("a.py", b"x")] * 3)


def test_windows_are_deterministic_for_a_seed(text_data):
  data = np.arange(1000, dtype=np.uint8)  # Wraps at 256: still a valid id sequence.
  first = [next(text_data.batches(data, 4, 8, seed=3)) for _ in range(2)]
  assert all(np.array_equal(first[0][k], first[1][k]) for k in ("inputs", "targets"))
  stream = text_data.batches(data, 4, 8, seed=3)
  a, b = next(stream), next(stream)
  assert not np.array_equal(a["inputs"], b["inputs"])
  assert a["inputs"].shape == a["targets"].shape == (4, 8) and a["inputs"].dtype == np.int32
  np.testing.assert_array_equal(a["targets"][:, :-1], a["inputs"][:, 1:])
  np.testing.assert_array_equal((a["targets"] - a["inputs"]) % 256, 1)  # Consecutive bytes.
  other = next(text_data.batches(data, 4, 8, seed=4))
  assert not np.array_equal(a["inputs"], other["inputs"])


def test_time_to_target_interpolates(timing):
  curve = timing.Curve(steps=[10, 20, 30, 40], seconds=[1.0, 3.0, 5.0, 7.0],
                       losses=[4.0, 3.0, 2.0, 1.0])
  assert timing.time_to_target(curve, 2.5) == pytest.approx((25.0, 4.0))
  assert timing.time_to_target(curve, 3.0) == pytest.approx((20.0, 3.0))
  assert timing.time_to_target(curve, 5.0) == (10.0, 1.0)  # Already there at the start.
  assert timing.time_to_target(curve, 0.5) is None
  bumpy = timing.Curve([1, 2, 3], [0.0, 1.0, 2.0], [3.0, 1.0, 2.0])
  assert timing.time_to_target(bumpy, 2.0) == pytest.approx((1.5, 0.5))  # The first arrival.


def test_compare_to_a_reference(timing):
  reference = timing.Curve([100, 200, 300], [10.0, 20.0, 30.0], [3.0, 2.5, 2.0])
  fast = timing.Curve([100, 200, 300], [20.0, 40.0, 60.0], [2.5, 1.5, 1.0])
  c = timing.compare(fast, reference)
  assert c.target == 2.0 and (c.reference_steps, c.reference_seconds) == (300.0, 30.0)
  assert (c.steps, c.seconds) == pytest.approx((150.0, 30.0))  # 2.5 -> 1.5 halfway.
  assert (c.step_ratio, c.seconds_ratio) == pytest.approx((0.5, 1.0))
  never = timing.compare(reference._replace(losses=[9.0, 8.0, 7.0]), reference)
  assert never.steps is None and math.isnan(never.step_ratio)
