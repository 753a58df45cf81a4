"""Suite-wide settings: compile fast, since most of the suite's time is XLA compiling tiny
programs. LLVM's optimisation level changes the generated code's speed, not its results.
A test that sets XLA_FLAGS for a subprocess (several host devices) keeps its own flags."""

import os

_FAST_COMPILE = "--xla_backend_optimization_level=0"
if _FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FAST_COMPILE}".strip()
