"""examples/laplace.py end to end on fake digits, through its `main(argv)`."""

import pathlib

import numpy as np
import pytest

from tests import _nets

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow  # an example end to end (about a minute of CPU); run with -m slow
def test_laplace_example_runs_on_fake_data(tmp_path, capsys):
  laplace = _nets.import_script(ROOT / "examples" / "laplace.py", "laplace_example")
  plot = tmp_path / "influence.png"
  results = laplace.main(["--fake-data", "--steps", "5", "--train-size", "256",
                          "--num-samples", "5", "--queries", "2", "--plot", str(plot)])
  out = capsys.readouterr().out
  methods = ("point estimate", "last-layer K-FAC LA", "all-layer K-FAC LA")
  for name in methods[1:]:
    assert results[name]["prior_precision"] > 0 and np.isfinite(results[name]["log_evidence"])
  for split in ("test", "rotated 45°"):
    assert set(results[split]) == set(methods)
    for found in results[split].values():
      assert 0 <= found["ece"] <= 1 and np.isfinite(found["nll"])
  assert results["influence"].shape == (256, 2)
  assert plot.stat().st_size > 0
  assert "most helpful training digits" in out
