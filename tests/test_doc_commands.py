"""Every shell command that README.md and docs/*.md show runs, in a smoke mode.

How a command of a ```bash / ```sh block is treated (`classify`):

- set-up steps are recognised and not run: `python3 -m venv .venv`, `. .venv/bin/activate`,
  `pip install ...` (its extras must exist in pyproject.toml), `mkdocs ...` (the site is
  built by tests/test_docs.py);
- `python -m pytest ...` must be the command .ci/run runs; it is not run from inside the
  suite;
- `wait` and a leading `# doc-test: skip` line (a block that needs several hosts or a
  cluster) are skipped;
- every other command runs, from a scratch folder that links the checkout's `examples/`,
  `benchmarks/` and `jkfac/`, with `JKFAC_SMOKE=1` (the examples run 3 steps; the
  benchmarks' harness builds one K-FAC configuration per model) and the script's entry of
  `SMOKE_FLAGS` appended (a later flag wins in argparse). A script without an entry fails
  `test_every_command_is_recognised`: add its smoke flags.

All of them run in the default suite. The README's first command runs on its own (its
output is checked); the other single-process commands, once each however many pages show
them, run one after the other in one of three Python processes (`tests/_doc_command_runner.py`:
JAX is imported once per process); a block that starts several processes (`&`), and the scripts of
`OWN_PROCESS`, run through bash. Keep the smoke flags small: every second here is a second
of every CI run.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shlex
import socket
import subprocess
import sys
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
_BLOCK = re.compile(r"^```(?:bash|sh|shell)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
SETUP = (re.compile(r"^python3? -m venv \S+$"), re.compile(r"^\. \S*/bin/activate$"),
         re.compile(r"^mkdocs\b"))
# Flags that make each script a quick check (appended after the documented flags).
SMOKE_FLAGS = {
    "examples/mnist.py": ["--batch-size", "32"],
    "examples/laplace.py": ["--steps", "3", "--train-size", "256", "--num-samples", "2",
                            "--queries", "2"],
    "examples/multihost.py": ["--steps", "3", "--batch-size", "16"],
    "benchmarks.convergence": ["--steps", "2", "--eval-every", "1", "--batch-size", "16",
                               "--classifier-adam-lrs", "1e-3", "--classifier-sgd-lrs", "0.1",
                               "--lstm-adam-lrs", "1e-3"],
    "benchmarks.step_time": ["--model", "mlp", "--rounds", "1", "--steps", "2", "--configs",
                             "kfac default"],
    "benchmarks.robustness": ["--models", "regression", "--steps", "12", "--adam-rates",
                              "1e-3"],
    "benchmarks.batch_scaling": ["--models", "mlp", "--batch-sizes", "32", "--steps", "12"],
    "benchmarks.inverse_time": ["--sizes", "65", "--rounds", "1"],
    "benchmarks.step_breakdown": ["--model", "tiny", "--rounds", "1", "--steps", "1"],
    "benchmarks.conv_statistics": ["--rounds", "1", "--batch", "8", "--steps", "0"],
    "benchmarks.parallel": ["--model", "tiny", "--rounds", "1", "--steps", "1", "--devices",
                            "2", "--placements", "round_robin", "--batch", "16", "--repeats",
                            "1"],
}
# Documented commands whose smoke run keeps one model of their list (each model compiles
# a K-FAC step and baselines): appended after SMOKE_FLAGS. Every key must be documented.
SMOKE_EXTRA = {
    "python -m benchmarks.convergence --models convnet,mlp,autoencoder --plot convergence.png":
        ["--models", "convnet"],
    "python -m benchmarks.convergence --models lm,lstm --plot convergence_seq.png":
        ["--models", "lstm"],
    'python -m benchmarks.convergence --models lm,lstm --kfac-configs "kfac default"':
        ["--models", "lstm"],
    'python -m benchmarks.convergence --models lm,lstm --kfac-configs '
    '"kfac default,eigen adam lr 0.003,eigen adam lr 0.01"': ["--models", "lstm"],
    "python -m benchmarks.robustness --models deepmlp,convae,vit,gru,dropout --steps 200 "
    "--batch-sizes 32,512": ["--batch-sizes", "32"],
    "python -m benchmarks.robustness --steps 200 --eigen-adam-rates 3e-3,1e-2":
        ["--eigen-adam-rates", "1e-2"],
    "python -m benchmarks.robustness --models deepmlp,convae,vit,gru,dropout,conv1d,tied,"
    "multilabel,onehot,zerohead,bf16 --steps 100 --batch-sizes 1024 --adam-rates 3e-3,1e-2 "
    '--kfac-variants "max_statistics_examples=None"': ["--models", "tied"],
    "python -m benchmarks.robustness --models conv1d,tied,multilabel,onehot,zerohead,bf16 "
    "--steps 200 --batch-sizes 32,128 --adam-rates 3e-4,1e-3,3e-3,1e-2,3e-2":
        ["--models", "bf16", "--batch-sizes", "32"],
    "python -m benchmarks.robustness --models vae --batch-sizes 16,128,512":
        ["--models", "vae", "--batch-sizes", "16"],
    "python -m benchmarks.robustness --models groupnorm,deeptanh,unet,tiedae,tokenlstm "
    "--batch-sizes 16,128,512": ["--models", "tokenlstm", "--batch-sizes", "16"],
}
# Scripts that need a process of their own: parallel.py sets XLA_FLAGS before JAX loads.
OWN_PROCESS = {"benchmarks.parallel"}
_SCRIPT = re.compile(r"python3? (?:-m (\S+)|(\S+\.py))")


def commands(text: str) -> list[str]:
  """The shell blocks of a Markdown text, one string each (continuation lines joined,
  comments dropped); a block whose first line is `# doc-test: skip` gives none."""
  found = []
  for block in _BLOCK.findall(text):
    if block.lstrip().startswith("# doc-test: skip"):
      continue
    lines = [line.split(" #")[0].strip() for line in block.replace("\\\n", " ").splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    if lines:
      found.append("\n".join(lines))
  return found


def classify(part: str) -> tuple[str, list[str]]:
  """`("setup" | "tests" | "wait" | "run", smoke flags)` of one `&&`-separated part."""
  if any(p.match(part) for p in SETUP) or part.startswith("pip install"):
    return "setup", []
  if part.startswith("python -m pytest"):
    return "tests", []
  if part == "wait":
    return "wait", []
  match = _SCRIPT.search(part)
  if not match or (match.group(1) or match.group(2)) not in SMOKE_FLAGS:
    raise ValueError(f"no smoke flags for {part!r}: add its script to SMOKE_FLAGS")
  return "run", SMOKE_FLAGS[match.group(1) or match.group(2)] + SMOKE_EXTRA.get(part, [])


def _parts(block: str) -> list[str]:
  return [p.strip() for line in block.splitlines() for p in line.split("&&")]


def smoke_script(block: str) -> str:
  """`block` with its set-up parts dropped and smoke flags appended to each run; one
  line per part, a background part (`... &`) kept in the background."""
  kept = []
  for part in _parts(block):
    kind, flags = classify(part.rstrip("&").strip())
    if kind == "run":
      line = part.rstrip("&").strip() + " " + " ".join(map(shlex.quote, flags))
      kept.append(line + (" &" if part.endswith("&") else ""))
    elif kind == "wait":
      kept.append("wait")
  return "\n".join(kept)


def _all_commands() -> list[tuple[str, str]]:
  return [(name, c) for name in DOCS for c in commands((ROOT / name).read_text())]


def test_commands_parser():
  text = ("```bash\npython a.py \\\n  --x 1   # note\n# comment\nwait\n```\n"
          "```bash\n# doc-test: skip (two hosts)\npython b.py\n```\n```python\nx\n```\n")
  assert commands(text) == ["python a.py    --x 1\nwait"]
  assert smoke_script('python3 -m venv .venv && . .venv/bin/activate && pip install -e '
                      '".[examples]" && python examples/mnist.py') == (
                          "python examples/mnist.py --batch-size 32")
  with pytest.raises(ValueError, match="SMOKE_FLAGS"):
    classify("python examples/unknown.py")


def test_every_command_is_recognised():
  """Each documented command is a set-up step, CI's test command, or has smoke flags;
  installs name extras that exist."""
  extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
      "optional-dependencies"])
  ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.strip().startswith("python -m pytest")]
  assert _all_commands()
  parts = {p.rstrip("&").strip() for _, c in _all_commands() for p in _parts(c)}
  assert not set(SMOKE_EXTRA) - parts, f"SMOKE_EXTRA names undocumented commands"
  for name, command in _all_commands():
    for part in _parts(command):
      kind, _ = classify(part.rstrip("&").strip())
      if kind == "tests":
        assert [part] == ci, f"{name}: {part!r} is not what .ci/run runs ({ci})"
      for extra in re.findall(r"\.\[(\w+)\]", part):
        assert extra in extras, f"{name}: pip install names a missing extra {extra!r}"


def _scratch(tmp_path: pathlib.Path) -> dict[str, str]:
  """Links the checkout's folders into `tmp_path`; the environment to run commands with."""
  for folder in ("examples", "benchmarks", "jkfac"):
    (tmp_path / folder).symlink_to(ROOT / folder)
  env = dict(os.environ, JKFAC_SMOKE="1", PYTHONPATH=str(tmp_path), MPLBACKEND="Agg")
  env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
  return env


def _run(command: str, tmp_path: pathlib.Path) -> subprocess.CompletedProcess:
  env = _scratch(tmp_path)
  script = "set -e\n" + smoke_script(command).replace("\nwait", "\nwait $!")
  return subprocess.run(["bash", "-c", script], cwd=tmp_path,
                        env=env, capture_output=True, text=True, timeout=1800)


def _own_process(command: str) -> bool:
  lines = smoke_script(command).splitlines()
  return any(line.endswith("&") or line == "wait" or
             (_SCRIPT.search(line).group(1) or "") in OWN_PROCESS for line in lines)


def _plan() -> tuple[list[list[str]], list[tuple[str, str]]]:
  """Every documented command but the README's first, once: the argument lists (after
  `python`) to run in one process, and the `(page, block)`s to run through bash."""
  one_process, own, seen = [], [], set()
  for name, command in _all_commands()[1:]:
    script = smoke_script(command)
    if not script or script in seen:
      continue
    seen.add(script)
    if _own_process(command):
      own.append((name, command))
    else:
      one_process += [shlex.split(line)[1:] for line in script.splitlines()]
  return one_process, own


def test_readme_first_command_trains_and_reports(tmp_path):
  """The README's first command (less the install) on the bundled digits, 3 steps."""
  first = commands((ROOT / "README.md").read_text())[0]
  assert first.endswith("python examples/mnist.py")
  run = _run(first, tmp_path)
  assert run.returncode == 0, run.stderr[-3000:]
  assert run.stdout.startswith("8000 training and 2000 test digits")
  assert "kfac step 3/3" in run.stdout and "adam step 3/3" in run.stdout
  assert re.search(r"^kfac +[\d.]+ +[\d.]+ +[01]\.\d{4} ", run.stdout, re.MULTILINE)
  assert re.search(r"^adam +[\d.]+ +[\d.]+ +[01]\.\d{4} ", run.stdout, re.MULTILINE)
  assert (tmp_path / "mnist.png").is_file()


PROCESS_PARTS = 3


@pytest.mark.parametrize("part", range(PROCESS_PARTS))
def test_documented_commands_run_in_one_process(part, tmp_path):
  """The single-process commands of README.md and docs/*.md, in smoke mode, in turn: every
  third one in each of three tests, which the suite's workers fit between the others."""
  argvs = _plan()[0][part::PROCESS_PARTS]
  assert argvs
  env = _scratch(tmp_path)
  run = subprocess.run([sys.executable, str(ROOT / "tests" / "_doc_command_runner.py"),
                        json.dumps(argvs)], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=1800)
  print("\n".join(line for line in run.stdout.splitlines() if line.startswith("== ")))
  failed = [line for line in run.stdout.splitlines() if line.startswith("== FAILED")]
  assert run.returncode == 0 and not failed, (
      f"{failed}\n{run.stdout[-6000:]}\n{run.stderr[-3000:]}")
  assert run.stdout.count("\n== ok ") + run.stdout.startswith("== ok ") == len(argvs)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.parametrize("name,command", _plan()[1],
                         ids=[f"{n}:{c[:40]}" for n, c in _plan()[1]])
def test_documented_command_runs_in_own_process(name, command, tmp_path):
  """A block with background processes (loopback port made free), or an OWN_PROCESS one."""
  command = re.sub(r"127\.0\.0\.1:\d+", f"127.0.0.1:{_free_port()}", command)
  run = _run(command, tmp_path)
  assert run.returncode == 0, f"{name}: {command}\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}"
