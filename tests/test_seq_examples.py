"""The sequence examples (transformer_lm.py, lstm.py), their corpus and `benchmarks.compare`.

The examples run in-process through their `main(argv)` on tiny configurations.
"""

import csv
import math
import pathlib
import sys

import numpy as np
import pytest

from tests import _nets

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY_LM = ["--steps", "3", "--eval-every", "2", "--batch-size", "4", "--length", "16",
           "--d-model", "16", "--num-heads", "2", "--num-layers", "1", "--max-bytes", "300000",
           "--eval-batches", "1"]
TINY_LSTM = ["--steps", "3", "--eval-every", "2", "--batch-size", "8", "--length", "4",
             "--hidden", "8", "--embed-dim", "4", "--eval-batches", "1"]


@pytest.fixture(scope="module")
def lm():
  return _nets.import_script(ROOT / "examples" / "transformer_lm.py", "transformer_lm_example")


@pytest.fixture(scope="module")
def lstm():
  return _nets.import_script(ROOT / "examples" / "lstm.py", "lstm_example")


@pytest.fixture(scope="module")
def text_data():
  return _nets.import_script(ROOT / "examples" / "text_data.py", "text_data_example")


def _rows(path) -> list[dict[str, str]]:
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    assert tuple(reader.fieldnames) == ("run", "step", "seconds", "train_loss", "eval_loss")
    return list(reader)


def _runs(result) -> dict:
  return {f"{name} lr {lr:g}": run for name, sweep in result["sweeps"].items()
          for lr, run in sweep.runs.items()}


def _check_outputs(result, csv_path, png_path, names, steps):
  runs = _runs(result)
  assert [label.split()[0] for label in runs] == list(names)
  for run in runs.values():
    assert not run.diverged
    assert list(run.steps) == list(range(1, steps + 1))
    assert np.all(np.isfinite(run.losses)) and run.compile_seconds > 0
    assert [step for step, _, _ in run.evals] == [2, 3]
    assert all(math.isfinite(m["eval_loss"]) for _, _, m in run.evals)
  rows = _rows(csv_path)
  assert len(rows) == steps * len(names)
  assert [row["run"] for row in rows[::steps]] == list(runs)
  assert [row["eval_loss"] != "" for row in rows[:steps]] == [False, True, True]
  assert 0 < float(rows[0]["seconds"]) <= float(rows[1]["seconds"])  # Real steps only.
  assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow  # an example end to end; run with -m slow
def test_transformer_all_optimizers(lm, tmp_path, capsys):
  csv_path, png_path = tmp_path / "m.csv", tmp_path / "m.png"
  result = lm.main([*TINY_LM, "--describe", "--metrics-csv", str(csv_path),
                    "--plot", str(png_path)])
  out = capsys.readouterr().out
  _check_outputs(result, csv_path, png_path, ("kfac", "adamw", "muon"), 3)
  assert "tied_embedding" in out and "K-FAC state" in out  # --describe's table.
  assert "target AdamW loss: adamw lr 0.003's final eval loss" in out
  assert "steps to AdamW loss" in out and "steps to Muon loss" in out and "s x muon" in out


@pytest.mark.slow  # an example end to end; run with -m slow
def test_lstm_kfac_and_adam(lstm, tmp_path, capsys):
  csv_path, png_path = tmp_path / "l.csv", tmp_path / "l.png"
  result = lstm.main([*TINY_LSTM, "--metrics-csv", str(csv_path), "--plot", str(png_path),
                      "--kfac-kwargs", '{"cov_ema_decay": 0.9, "invert_every": 2}'])
  _check_outputs(result, csv_path, png_path, ("kfac", "adam"), 3)
  assert "steps to Adam loss" in capsys.readouterr().out


def test_unsupported_kfac_keyword_is_skipped(lstm, capsys):
  result = lstm.main([*TINY_LSTM, "--optimizer", "kfac", "--kfac-kwargs", '{"no_such": 1}'])
  (run,) = result["sweeps"]["kfac"].runs.values()
  assert run.reason == "unsupported keyword no_such" and result["sweeps"]["kfac"].best is None
  assert "skipped: unsupported keyword no_such" in capsys.readouterr().out


@pytest.mark.slow  # an example end to end; run with -m slow
def test_sweep_and_divergence(lm, tmp_path, capsys):
  result = lm.main([*TINY_LM, "--optimizer", "adamw", "--sweep"])
  sweep = result["sweeps"]["adamw"]
  assert list(sweep.runs) == list(lm.OPTIMIZERS["adamw"].sweep) and sweep.best in sweep.runs
  result = lm.main([*TINY_LM, "--optimizer", "adamw", "--lr", "1e4"])
  sweep = result["sweeps"]["adamw"]
  (run,) = sweep.runs.values()
  assert run.diverged and len(run.losses) < 3 and sweep.best is None
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
