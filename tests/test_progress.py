"""benchmarks/progress.py: the progress bar and line log, and the metrics CSV."""

import io

import pytest
import rich.console

from tests import _nets
from tests.test_examples import ROOT


@pytest.fixture(scope="module")
def progress():
  return _nets.import_script(ROOT / "benchmarks" / "progress.py", "progress")


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
