"""Runs several documented commands in one Python process, as `python` would run each.

    python tests/_doc_command_runner.py '[["-m", "benchmarks.x", "--flag"], ["a.py"]]'

Each entry is the argument list after `python`: `["-m", MODULE, ...]` runs the module as
`__main__` from the current folder, `[SCRIPT, ...]` runs the file with its folder first on
`sys.path`. They run one after the other, so JAX and the libraries are imported once
(tests/test_doc_commands.py). For each it prints `== ok SECONDS COMMAND` or
`== FAILED SECONDS COMMAND` and the traceback; it exits 1 if any failed.
"""

import json
import os
import runpy
import sys
import time
import traceback


def _forget_local_modules(before: set[str]) -> None:
  """Drops the modules first imported by the last command from the current folder (the
  examples, the benchmarks package): a fresh `python` would import them again, and
  `benchmarks/__init__.py` puts the examples' folder on `sys.path` only when it runs."""
  here = os.getcwd() + os.sep
  for name in set(sys.modules) - before:
    path = getattr(sys.modules[name], "__file__", None) or ""
    if path.startswith(here) and not name.startswith("jkfac"):
      del sys.modules[name]


def run(argv: list[str]) -> None:
  saved_argv, saved_path, saved_modules = sys.argv[:], sys.path[:], set(sys.modules)
  try:
    if argv[0] == "-m":
      sys.argv = [argv[1], *argv[2:]]
      sys.path.insert(0, os.getcwd())
      runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
      sys.argv = list(argv)
      sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
      runpy.run_path(argv[0], run_name="__main__")
  except SystemExit as e:
    if e.code not in (None, 0):
      raise
  finally:
    sys.argv, sys.path[:] = saved_argv, saved_path
    _forget_local_modules(saved_modules)


def main() -> int:
  failed = 0
  for argv in json.loads(sys.argv[1]):
    command = "python " + " ".join(argv)
    start = time.perf_counter()
    try:
      run(argv)
      print(f"== ok {time.perf_counter() - start:.1f} {command}", flush=True)
    except BaseException:  # noqa: BLE001 (a script's SystemExit(1) too)
      failed += 1
      print(f"== FAILED {time.perf_counter() - start:.1f} {command}\n"
            f"{traceback.format_exc()}", flush=True)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
