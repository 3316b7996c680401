"""transformers' layer types, registered lazily: GPT-2's ``Conv1D`` (y = x W + b, W stored as d_in x d_out) and
Llama's ``LlamaRMSNorm``. Registered on the first rule lookup after the caller has imported transformers (a
transformers model implies it); erasus never imports transformers on its own."""
from __future__ import annotations

import sys

from erasus.ops.layers._registry import register_lazy, register_layer
from erasus.ops.layers.linear import linear_norms, transposed_linear_fisher
from erasus.ops.layers.normalization import register_affine, rms_norm_grads


def _register() -> bool:
    if "transformers" not in sys.modules:
        return False
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return True  # a transformers without these types: nothing to register, do not try again
    register_layer(Conv1D, norms=linear_norms, fisher=transposed_linear_fisher)
    try:
        from transformers.models.llama.modeling_llama import LlamaRMSNorm
    except ImportError:
        return True
    register_affine(LlamaRMSNorm, rms_norm_grads(lambda m, x: m.variance_epsilon))
    return True


register_lazy(_register)
