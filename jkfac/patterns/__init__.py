"""Automatic registration: tags untagged dense, conv, embedding and norm layers in a jaxpr.

Layers are recognised by their structure, not by module names, so they survive `jit`, `remat`,
`scan` and dtype promotion: dense (`dot_general`, also `DenseGeneral`) and channels-last conv
layers with a parameter weight and an optional bias `add`, embedding lookups (`gather` of rows),
tied output projections (`x @ table.T`) and norm layers' scale and shift. A dense weight that
is a concatenation (or stack) of parameters, as in Flax's `OptimizedLSTMCell`, is split back
into one dense layer per parameter. `register_layers` puts a layer tag after each recognised
layer, so the tracer treats it like a hand-tagged one; weights whose uses disagree stay
untagged (generic). The exact forms are listed in docs/architecture.md.

Modules, in data-flow order: `records` (what a match and a level are), `tracking`
(following parameters through casts, broadcasts and joins), one matcher module per form
(`dense`, `lookups`, `norms`, `bias`), `matching` (one level's layers), `rewrite`
(tagging), `register` (`register_layers`).
"""

from jkfac.patterns.register import register_layers

__all__ = ["register_layers"]
