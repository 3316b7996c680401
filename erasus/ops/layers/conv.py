"""Convolutions. ``nn.Conv1d`` / ``nn.Conv2d`` with groups 1 and integer zero padding: a linear map over unfolded
output positions (or the grouped weight-gradient convolution). Grouped / depthwise convolutions, 'same' or
non-zero padding modes, ``nn.Conv3d`` and the transposed convolutions: exact per-sample gradients of the layer's
own parameters by torch.func (slower)."""
from __future__ import annotations

import torch
from torch import nn

from erasus.ops.layers._math import (common_dtype, conv_as_linear, conv_padding, has_trainable_bias, own_trainable,
                                     weight_bias)
from erasus.ops.layers._registry import register_layer
from erasus.ops.layers.fallback import fallback_fisher, fallback_norms
from erasus.ops.linear_grads import norms_unchecked, squares_unchecked


def _closed_form(module) -> bool:
    """Groups 1 and integer zero padding: the unfold / grouped weight-gradient paths; anything else (grouped or
    depthwise convolutions, 'same' padding, reflect / circular padding) takes the exact torch.func path."""
    return module.groups == 1 and module.padding_mode == "zeros" and (not isinstance(module.padding, str)
                                                                      or module.padding == "valid")


def conv_norms(module, inputs, grad, backend):
    if not _closed_form(module):
        return fallback_norms(module, inputs, grad, backend)
    if module.in_channels >= GROUPED_CONV_MIN_CHANNELS and backend in (None, "reference"):
        return weight_bias(module, _grouped_conv_weight_sq(module, inputs[0], grad),
                            grad.reshape(grad.shape[0], grad.shape[1], -1).float().sum(2).double().square().sum(1))
    a, g = conv_as_linear(module, inputs[0], grad)
    a, g = common_dtype(a, g)
    res = norms_unchecked(a, g, backend=backend, with_bias=has_trainable_bias(module), out_dtype=torch.float64)
    return weight_bias(module, res.weight, res.bias)


# With this many input channels, the per-sample weight gradients of a convolution (B x C_out x C_in x k, small
# next to the activations) are cheapest formed by the backend's own weight-gradient convolution, grouped by
# sample; with fewer, unfold + bmm is faster (measured on the bench CNN: 4.6 vs 9.8 ms at 32 channels, 4.8 vs
# 3.1 ms at 3).
GROUPED_CONV_MIN_CHANNELS = 16


def _grouped_conv_weight_sq(module, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    padding = conv_padding(module)
    batch = x.shape[0]
    weight_grad = torch.nn.grad.conv1d_weight if isinstance(module, nn.Conv1d) else torch.nn.grad.conv2d_weight
    if x.dtype != grad.dtype:
        x, grad = x.float(), grad.float()
    per_sample = weight_grad(x.reshape(1, batch * x.shape[1], *x.shape[2:]),
                             (batch * module.out_channels, module.in_channels, *module.kernel_size),
                             grad.reshape(1, batch * grad.shape[1], *grad.shape[2:]), stride=module.stride,
                             padding=padding, dilation=module.dilation, groups=batch)
    return per_sample.reshape(batch, -1).double().square().sum(1)


def conv_fisher(module, inputs, grad, backend):
    if not _closed_form(module):
        return fallback_fisher(module, inputs, grad, backend)
    a, g = common_dtype(*conv_as_linear(module, inputs[0], grad))
    res = squares_unchecked(a, g, backend, with_bias=has_trainable_bias(module))
    return own_trainable(module, {"weight": res.weight.reshape(module.weight.shape), "bias": res.bias})


register_layer(nn.Conv1d, nn.Conv2d, norms=conv_norms, fisher=conv_fisher)
# No closed form here yet; exact per-sample gradients of just the layer's parameters (torch.func), slower
register_layer(nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, norms=fallback_norms,
               fisher=fallback_fisher)
