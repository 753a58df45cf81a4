"""Layer kinds as matrices: the view every curvature block works in.

At each of its positions a dense or conv layer computes `y_t = W^T a_t`, with `a_t` the
input (or input patch) plus a trailing 1 for the bias and `W` a `(d_in [+1], d_out)`
matrix. The functions here map a layer's inputs, output gradients and parameters to
that view and back, so blocks need not know the layer kind: embeddings (one-hot inputs,
only counted), tied embeddings, scale-and-shift layers, grouped convs (a leading group
axis), and multi-use layers (uses as extra positions). docs/architecture.md has the
details per kind.

Modules: `matrices` (parameter matrices), `patches` (conv patches), `inputs` (input
views and output rows), `uses` (every use of a layer for a block's statistics).
"""

from jkfac.layers.inputs import (
                                 LayerInputs,
                                 covariance_diagonal,
                                 embedding_counts,
                                 layer_inputs,
                                 output_rows,
)
from jkfac.layers.matrices import (
                                 feature_groups,
                                 matrix_shape,
                                 param_matrix,
                                 split_param_matrix,
)
from jkfac.layers.patches import (
                                 AUTO_MIN_INPUT_RATIO,
                                 AUTO_PATCH_ROWS_PER_DIMENSION,
                                 conv_kernel_size,
                                 patch_slices,
                                 sample_rows,
                                 stack_features,
)
from jkfac.layers.uses import block_inputs, scan_axes_first, tied_inputs

__all__ = [
    "AUTO_MIN_INPUT_RATIO", "AUTO_PATCH_ROWS_PER_DIMENSION", "LayerInputs", "block_inputs",
    "conv_kernel_size", "covariance_diagonal", "embedding_counts", "feature_groups",
    "layer_inputs", "matrix_shape", "output_rows", "param_matrix", "patch_slices",
    "sample_rows", "scan_axes_first", "split_param_matrix", "stack_features", "tied_inputs",
]
