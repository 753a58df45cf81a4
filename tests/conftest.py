"""Suite-wide settings: compile fast, since most of the suite's time is XLA compiling tiny
programs. These flags change how fast XLA compiles and how fast the code it generates
runs, not what it computes; both sides of every comparison in the suite use them.
A test that sets XLA_FLAGS for a subprocess (several host devices) keeps these flags.

- `--xla_backend_optimization_level=0`: LLVM does not optimise the generated code.
- `--xla_cpu_use_fusion_emitters=false`: XLA:CPU's older fusion emitters, which compile a
  small program faster (the suite took 42% less time on test_conv_nd + test_equinox,
  2026-12-06). A jaxlib that no longer knows the flag would abort at start-up, so it is
  used only if a probe process accepts it.
"""

import os
import subprocess
import sys

_FAST_COMPILE = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")
_PROBE = "import jax.numpy as jnp; jnp.zeros(1).block_until_ready()"


def _with(flags: str, flag: str) -> str:
  return f"{flags} {flag}".strip()


def _accepted(flags: str) -> bool:
  """Whether JAX starts with XLA_FLAGS=`flags` (XLA aborts on an unknown flag)."""
  env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True,
                        timeout=120).returncode == 0


# The first process to load this file (pytest, or xdist's controller) decides; workers
# and subprocesses inherit XLA_FLAGS.
_flags = os.environ.get("XLA_FLAGS", "")
for _flag in _FAST_COMPILE:
  if _flag.split("=")[0] not in _flags and _accepted(_with(_flags, _flag)):
    _flags = _with(_flags, _flag)
os.environ["XLA_FLAGS"] = _flags
