"""Progress and metrics for the examples: a progress bar, plain log lines, a CSV file.

    with Progress(total=300, description="kfac", every=25) as progress:
      for step in range(1, 301):
        loss, accuracy = ...
        window = progress.update(step, loss=loss, batch_acc=accuracy)
        if window:   # every 25 steps: the window's means and steps/s
          csv.write(step=step, train_loss=window["loss"])

On a terminal this shows a rich progress bar with the current window's mean metrics and
steps/s; elsewhere (CI logs, pipes, pytest) it prints one plain line per window instead.
The clock starts after the first update, so a first step that compiles is not timed.
"""

from __future__ import annotations

import csv
import math
import os
import sys
import time
from types import TracebackType
from typing import Sequence

import rich.console
import rich.progress


def format_metrics(metrics: dict[str, float], steps_per_second: float | None) -> str:
  """`loss 0.1234  batch acc 0.950  steps/s 12.3`: names with spaces for underscores."""
  parts = [f"{name.replace('_', ' ')} {value:.4f}" for name, value in metrics.items()]
  rate = "-" if steps_per_second is None else f"{steps_per_second:.1f}"
  return "  ".join(parts + [f"steps/s {rate:>6}"])


class Progress:
  """Shows training progress; `update(step, **metrics)` once per step.

  Args:
    total: the last step.
    description: the name shown before the bar or at the start of each line.
    every: steps per window: metrics are averaged over a window, lines printed per window.
    start: the step before the first update (a resumed run's checkpoint step).
    console: where to draw; a bar only where it is a terminal (default: stdout).
  """

  def __init__(self, total: int, description: str, *, every: int = 25, start: int = 0,
               console: rich.console.Console | None = None) -> None:
    self.total, self.description, self.every, self.start = total, description, every, start
    self.console = console or rich.console.Console(file=sys.stdout)
    self._window: dict[str, list[float]] = {}
    self._clock: tuple[int, float] | None = None   # (step, time) of the first update
    self._last: tuple[int, float] | None = None    # (step, time) at the last window's end
    self._rate: float | None = None
    self._bar: rich.progress.Progress | None = None
    self._task: rich.progress.TaskID | None = None

  def __enter__(self) -> "Progress":
    if self.console.is_terminal:
      self._bar = rich.progress.Progress(
          rich.progress.TextColumn("[bold]{task.description}"), rich.progress.BarColumn(),
          rich.progress.MofNCompleteColumn(), rich.progress.TextColumn("{task.fields[text]}"),
          rich.progress.TimeElapsedColumn(), rich.progress.TimeRemainingColumn(),
          console=self.console)
      self._bar.start()
      self._task = self._bar.add_task(self.description, total=self.total,
                                      completed=self.start, text="")
    return self

  def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
               traceback: TracebackType | None) -> None:
    if self._bar is not None:
      self._bar.stop()

  @property
  def seconds(self) -> float:
    """Seconds since the first update (0 before the second)."""
    return 0.0 if self._clock is None else time.perf_counter() - self._clock[1]

  @property
  def steps_per_second(self) -> float:
    """Steps per second since the first update (NaN before the second)."""
    if self._clock is None or self._last is None or self._last[0] == self._clock[0]:
      return math.nan
    return (self._last[0] - self._clock[0]) / (self._last[1] - self._clock[1])

  def update(self, step: int, **metrics: float) -> dict[str, float] | None:
    """Records one step; at a window's end returns its mean metrics and `steps_per_second`."""
    now = time.perf_counter()
    if self._clock is None:
      self._clock = self._last = (step, now)
    for name, value in metrics.items():
      self._window.setdefault(name, []).append(float(value))
    means = {name: sum(values) / len(values) for name, values in self._window.items()}
    end = step % self.every == 0 or step == self.total
    if end:
      last_step, last_time = self._last
      self._rate = (step - last_step) / (now - last_time) if step > last_step else None
      self._last, self._window = (step, now), {}
    text = format_metrics(means, self._rate)
    if self._bar is not None:
      self._bar.update(self._task, completed=step, text=text)
    elif end:
      print(f"{self.description} step {step:5d}  {text}", file=self.console.file, flush=True)
    return {**means, "steps_per_second": self._rate} if end else None


class MetricsCSV:
  """Writes rows of metrics to a CSV file, flushed row by row.

  Fields missing from a row are left empty. With `append`, an existing file with the same
  header keeps its rows (a resumed run adds its own); otherwise the file is rewritten.
  """

  def __init__(self, path: str | os.PathLike, fields: Sequence[str], *,
               append: bool = False) -> None:
    self.fields = list(fields)
    keep = append and os.path.isfile(path) and os.path.getsize(path) > 0
    if keep:
      with open(path, newline="") as f:
        header = next(csv.reader(f), [])
      if header != self.fields:
        raise ValueError(f"{path}: header {header} is not {self.fields}; cannot append")
    self._file = open(path, "a" if keep else "w", newline="")
    self._writer = csv.DictWriter(self._file, self.fields)
    if not keep:
      self._writer.writeheader()

  def write(self, **row: object) -> None:
    """Appends one row; a field not in the header is an error."""
    self._writer.writerow(row)
    self._file.flush()

  def close(self) -> None:
    self._file.close()

  def __enter__(self) -> "MetricsCSV":
    return self

  def __exit__(self, *exc_info: object) -> None:
    self.close()
