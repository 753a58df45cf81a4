"""The documentation builds, and its Python snippets run.

Conventions for documentation snippets:

- Every ```python fenced block of the files in `SNIPPET_FILES` runs, in file order, in
  one namespace per file: a block may use what an earlier block of its file defined.
  Keep them small (tiny models, a step or two) so this file stays under about a minute.
- A block that cannot run here (it needs real data, several devices, or stands for
  code with placeholders such as `learning_rate=...`) opts out with this comment as
  its first line, optionally followed by the reason:

      # doc-test: skip  (needs 8 devices)

- Blocks in other languages (```bash, plain ```) never run.
- `mkdocs build --strict` fails on any warning: a broken link, a nav entry without its
  page, or a `::: jkfac.name` reference the API page cannot resolve.
"""

import os
import pathlib
import re
import subprocess
import sys
import types

import jax
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SKIP_MARKER = "# doc-test: skip"
SNIPPET_FILES = ("README.md", "docs/index.md", "docs/usage.md", "docs/stateful_models.md",
                 "docs/sequence_models.md", "docs/equinox.md")
# README blocks that need the marker but do not have it yet, by their first line. (This
# test may not edit README.md; once the README marks them, delete the entry.)
UNMARKED_SKIPS: dict[str, tuple[str, ...]] = {}  # first lines to skip without the marker
_FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)


def python_blocks(text: str) -> list[str]:
  """The ```python fenced blocks of a Markdown text, in order."""
  return [match.group(1) for match in _FENCE.finditer(text)]


def _skipped(block: str, name: str) -> bool:
  first = block.lstrip().splitlines()[0].strip() if block.strip() else ""
  return first.startswith(SKIP_MARKER) or first.startswith(UNMARKED_SKIPS.get(name, ()))


def test_python_blocks_parser():
  text = "a\n```python\nx = 1\n```\n```bash\nls\n```\n```python\n# doc-test: skip\ny\n```\n"
  blocks = python_blocks(text)
  assert blocks == ["x = 1\n", "# doc-test: skip\ny\n"]
  assert not _skipped(blocks[0], "x.md") and _skipped(blocks[1], "x.md")


def _wait_for(namespace: dict) -> None:
  """Blocks on every array a snippet left behind: JAX dispatches asynchronously, so a
  step's work (and its errors) would otherwise spill into the next test."""
  values = [v for v in namespace.values() if isinstance(v, (jax.Array, dict, list, tuple))]
  jax.block_until_ready([x for x in jax.tree_util.tree_leaves(values)
                         if isinstance(x, jax.Array)])


@pytest.mark.parametrize("name", SNIPPET_FILES)
def test_snippets_run(name: str):
  blocks = python_blocks((ROOT / name).read_text())
  runnable = [b for b in blocks if not _skipped(b, name)]
  assert runnable, f"{name} has no runnable ```python block"
  # A real module, so that Flax modules defined in a snippet find their module.
  module = types.ModuleType(f"doc_snippets_{pathlib.Path(name).stem}")
  sys.modules[module.__name__] = module
  try:
    for index, block in enumerate(runnable):
      code = compile(block, f"{name} (python block {index + 1} of {len(runnable)} run)", "exec")
      exec(code, module.__dict__)  # noqa: S102 (the documentation's own code)
    _wait_for(module.__dict__)
  finally:
    del sys.modules[module.__name__]


def test_mkdocs_build_strict(tmp_path):
  pytest.importorskip("mkdocs", reason="mkdocs is not installed: pip install -e '.[docs]'")
  pytest.importorskip("mkdocstrings", reason="mkdocstrings is not installed: "
                      "pip install -e '.[docs]'")
  env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
  result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d",
                           str(tmp_path / "site")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}{result.stderr}"
  assert (tmp_path / "site" / "api" / "index.html").exists()


def test_api_page_lists_every_public_name_and_only_existing_ones():
  """Every name of `jkfac.__all__` appears on docs/api.md as `jkfac.NAME`, and every
  `::: path` directive there names something that exists."""
  import importlib

  import jkfac
  text = (ROOT / "docs" / "api.md").read_text()
  missing = [n for n in jkfac.__all__ if not re.search(rf"jkfac\.{re.escape(n)}\b", text)]
  assert not missing, f"docs/api.md lacks {missing}"
  for path in re.findall(r"^::: (\S+)", text, re.MULTILINE):
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):  # the longest importable module prefix
      try:
        obj = importlib.import_module(".".join(parts[:cut]))
        break
      except ImportError:
        continue
    for attr in parts[cut:]:
      assert hasattr(obj, attr), f"docs/api.md: ::: {path} does not exist"
      obj = getattr(obj, attr)
