"""mkdocs hooks: the site hides the documentation test's markers (tests/test_docs.py)."""

import re

_MARKER = re.compile(r"^[ \t]*# doc-test: skip.*\n", re.MULTILINE)


def on_page_markdown(markdown: str, **kwargs) -> str:
  """Drops `# doc-test: skip ...` lines, which tell the tests not to run a block."""
  return _MARKER.sub("", markdown)
