"""The names of the curvature approximations a layer can get.

Written apart from the blocks that implement them (`jkfac.blocks.REGISTRY`, which checks
that it implements exactly these), so that the tags, which sit below the blocks, can
reject an unknown name when a layer is registered.
"""

APPROXIMATIONS: tuple[str, ...] = (
    "kron",           # A ⊗ G (K-FAC)
    "kron_indep",     # A ⊗ G, the uses of a multi-use layer as independent positions
    "kron_reduce",    # A ⊗ G from inputs averaged and gradients summed over positions
    "kron_in_diag",   # diag(A) ⊗ G
    "kron_out_diag",  # A ⊗ diag(G)
    "diagonal",       # the diagonal of the Fisher
    "full",           # the whole block of the layer
    "ekfac",          # A ⊗ G's eigenbases with a re-estimated diagonal scaling (EK-FAC)
)


def check(approx: str | None) -> None:
  """Raises `ValueError` for an approximation name that is not one of `APPROXIMATIONS`."""
  if approx is not None and approx not in APPROXIMATIONS:
    raise ValueError(f"Unknown K-FAC approximation {approx!r}; expected one of "
                     f"{APPROXIMATIONS}.")
