"""The package's shape: imports point one way (no cycle), no module reaches another's
private names, and no module is over `MAX_LINES` lines (one idea per file)."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "jkfac"
MAX_LINES = 400


def _modules() -> dict[str, pathlib.Path]:
  modules = {}
  for path in sorted(PACKAGE.rglob("*.py")):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    modules[name] = path
  return modules


MODULES = _modules()


def _imports(name: str, path: pathlib.Path) -> tuple[dict[str, str], set[str]]:
  """`(aliases, targets)`: local names bound to jkfac modules, and every jkfac module it
  imports (also inside functions)."""
  aliases, targets = {}, set()
  package = name if path.name == "__init__.py" else name.rpartition(".")[0]
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name in MODULES:
          targets.add(alias.name)
          aliases[alias.asname or alias.name] = alias.name
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative
        base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                        + ([base] if base else []))
      for alias in node.names:
        full = f"{base}.{alias.name}"
        if full in MODULES:  # `from jkfac import blocks`: the submodule
          targets.add(full)
          aliases[alias.asname or alias.name] = full
        elif base in MODULES:
          targets.add(base)
          if alias.name.startswith("_") and not alias.name.startswith("__"):
            raise AssertionError(f"{name} imports the private name {full}")
  targets.discard(name)
  return aliases, targets


def test_no_import_cycle():
  graph = {name: _imports(name, path)[1] - {"jkfac"} for name, path in MODULES.items()}
  graph["jkfac"] = set()  # the public namespace re-exports; nothing inside imports it

  def visit(node, trail):
    if node in trail:
      cycle = trail[trail.index(node):] + [node]
      pytest.fail("import cycle: " + " -> ".join(cycle))
    for target in graph.get(node, ()):
      # A submodule's import runs its package's __init__ first; that is not a cycle.
      if not node.startswith(target + "."):
        visit(target, trail + [node])

  for name in graph:
    visit(name, [])


def test_no_private_name_across_modules():
  found = []
  for name, path in MODULES.items():
    aliases, _ = _imports(name, path)
    for node in ast.walk(ast.parse(path.read_text())):
      if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
          and node.value.id in aliases and node.attr.startswith("_")
          and not node.attr.startswith("__")):
        found.append(f"{name}: {node.value.id}.{node.attr}")
  assert not found, found


def test_no_module_over_max_lines():
  long = {name: n for name, path in MODULES.items()
          if (n := len(path.read_text().splitlines())) > MAX_LINES}
  assert not long, f"modules over {MAX_LINES} lines: {long}"


def _module_map() -> str:
  """The code block of docs/architecture.md's "Module map" section."""
  text = (PACKAGE.parent / "docs" / "architecture.md").read_text()
  section = text.split("## Module map", 1)[1].split("\n## ", 1)[0]
  return section.split("```", 2)[1]


def test_architecture_module_map_lists_every_module():
  listed = {line.split()[0] for line in _module_map().splitlines()[1:] if line.strip()}
  files = {str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py")}
  assert not files - listed, f"docs/architecture.md's module map lacks {sorted(files - listed)}"
  assert not listed - files - {"jkfac/"}, (
      f"docs/architecture.md's module map lists missing modules {sorted(listed - files)}")


def test_architecture_module_map_is_in_import_order():
  """Each module imports only modules listed above it (a package's `__init__` aside)."""
  order = []
  for line in _module_map().splitlines()[1:]:
    if line.strip():
      parts = pathlib.Path(line.split()[0]).with_suffix("").parts
      order.append(".".join(("jkfac",) + (parts[:-1] if parts[-1] == "__init__" else parts)))
  position = {name: i for i, name in enumerate(order)}
  for name, path in MODULES.items():
    if path.name != "__init__.py":
      below = sorted(t for t in _imports(name, path)[1] if position[t] > position[name])
      assert not below, f"{name} imports {below}, listed below it in docs/architecture.md"
