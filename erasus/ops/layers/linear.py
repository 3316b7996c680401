"""``nn.Linear`` (and peft's LoRA factors, which are Linear layers): y = x W^T + b."""
from __future__ import annotations

import torch
from torch import nn

from erasus.ops.layers._math import batched, common_dtype, has_trainable_bias, own_trainable, weight_bias
from erasus.ops.layers._registry import register_layer
from erasus.ops.linear_grads import norms_unchecked, squares_unchecked


def linear_norms(module, inputs, grad, backend):
    a, g = common_dtype(batched(inputs[0]), batched(grad))
    res = norms_unchecked(a, g, backend=backend, with_bias=has_trainable_bias(module), out_dtype=torch.float64)
    return weight_bias(module, res.weight, res.bias)


def linear_fisher(module, inputs, grad, backend):
    a, g = common_dtype(batched(inputs[0]), batched(grad))
    res = squares_unchecked(a, g, backend, with_bias=has_trainable_bias(module))
    return own_trainable(module, {"weight": res.weight, "bias": res.bias})


def transposed_linear_fisher(module, inputs, grad, backend):
    """y = x W + b with W stored as (d_in, d_out) (transformers' Conv1D): the Linear Fisher, transposed."""
    values = linear_fisher(module, inputs, grad, backend)
    if "weight" in values:
        values["weight"] = values["weight"].T
    return values


register_layer(nn.Linear, norms=linear_norms, fisher=linear_fisher)
