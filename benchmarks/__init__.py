"""The measuring machinery and the benchmarks; run them from the repository root.

    python -m benchmarks.convergence --steps 300
    python -m benchmarks.step_time

`harness` (timing, divergence, time to target, sweeps, plots), `progress` (a progress bar,
CSV) and `compare` (the sequence examples' flags and summary) are imported as
`benchmarks.harness` etc. The benchmarks reuse the examples' models: the examples are
scripts that import their siblings by plain name (`import mnist_data`), so their folder is
made importable here, once.
"""

import os as _os
import sys as _sys

_EXAMPLES = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))),
                          "examples")
if _EXAMPLES not in _sys.path:
  _sys.path.append(_EXAMPLES)
