"""Normalisation layers (y = x_hat * weight + bias): each per-sample gradient of their affine parameters is only
d numbers, so it is formed directly, and one function per layer type serves both the norms and the Fisher."""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from erasus.errors import UnsupportedLayerError
from erasus.ops.layers._math import own_trainable
from erasus.ops.layers._registry import register_layer
from erasus.ops.layers.fallback import fallback_fisher, fallback_norms

# (module, inputs, output_grad) -> {parameter attribute name: (B, d) per-sample gradients}
AffineGrads = Callable[[nn.Module, tuple, torch.Tensor], "dict[str, torch.Tensor]"]


def register_affine(layer_type: type, per_sample_grads: AffineGrads) -> None:
    """Register a layer type by its per-sample affine gradients, for both the norms and the Fisher."""
    def norms(module, inputs, grad, backend):
        grads = own_trainable(module, per_sample_grads(module, inputs, grad))
        return sum(v.double().square().sum(1) for v in grads.values())  # float64: squares may underflow

    def fisher(module, inputs, grad, backend):
        grads = own_trainable(module, per_sample_grads(module, inputs, grad))
        return {k: v.square().sum(0) for k, v in grads.items()}

    register_layer(layer_type, norms=norms, fisher=fisher)


def _flat(x: torch.Tensor, batch: int, dims: int) -> torch.Tensor:
    """(B, ..., *normalized) -> (B, T, D) float32, D the product of the ``dims`` normalised dimensions."""
    return x.reshape(batch, -1, math.prod(x.shape[x.dim() - dims:])).float()


def layer_norm_grads(module, inputs, grad):
    """LayerNorm over its last ``len(normalized_shape)`` dimensions (one or more)."""
    dims, batch = len(module.normalized_shape), grad.shape[0]
    x_hat = F.layer_norm(inputs[0].float(), module.normalized_shape, eps=module.eps)
    x_hat, g = _flat(x_hat, batch, dims), _flat(grad, batch, dims)
    return {"weight": (x_hat * g).sum(1), "bias": g.sum(1)}


def rms_norm_grads(eps_of: Callable[[nn.Module, torch.Tensor], float]) -> AffineGrads:
    """RMSNorm over its weight's dimensions (``nn.RMSNorm``'s normalized_shape, one or more; Llama's: the last)."""
    def grads(module, inputs, grad):
        dims, batch = module.weight.dim(), grad.shape[0]
        x, g = _flat(inputs[0], batch, dims), _flat(grad, batch, dims)
        x_hat = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps_of(module, inputs[0]))
        return {"weight": (x_hat * g).sum(1)}
    return grads


def batch_norm_grads(module, inputs, grad):
    """Eval-mode BatchNorm: y = x_hat * weight + bias with x_hat from the running statistics, per channel
    (dim 1), summed over the other positions of each sample. (In training mode the batch statistics mix the
    samples; _capture refuses that before we get here.)"""
    if module.running_mean is None:
        raise UnsupportedLayerError(f"{type(module).__name__} without running statistics normalises with batch "
                                    "statistics, which mix the samples: per-sample gradients are undefined")
    x = inputs[0].float()
    shape = (1, -1) + (1,) * (x.dim() - 2)
    x_hat = (x - module.running_mean.reshape(shape)) * torch.rsqrt(module.running_var.reshape(shape) + module.eps)
    g = grad.float()
    batch, channels = x.shape[0], x.shape[1]
    return {"weight": (x_hat * g).reshape(batch, channels, -1).sum(2), "bias": g.reshape(batch, channels, -1).sum(2)}


def group_norm_grads(module, inputs, grad):
    """GroupNorm: x_hat from each sample's own group statistics (no mixing across samples), per channel (dim 1)
    summed over the other positions."""
    x_hat = F.group_norm(inputs[0].float(), module.num_groups, eps=module.eps)
    g = grad.float()
    batch, channels = x_hat.shape[0], x_hat.shape[1]
    return {"weight": (x_hat * g).reshape(batch, channels, -1).sum(2), "bias": g.reshape(batch, channels, -1).sum(2)}


register_affine(nn.LayerNorm, layer_norm_grads)
register_affine(nn.GroupNorm, group_norm_grads)
# InstanceNorm normalises each sample on its own (or, tracking running statistics in eval mode, with fixed ones):
# exact per-sample gradients of its affine parameters by torch.func
register_layer(nn.modules.instancenorm._InstanceNorm, norms=fallback_norms, fisher=fallback_fisher)
register_affine(nn.modules.batchnorm._BatchNorm, batch_norm_grads)
if hasattr(nn, "RMSNorm"):
    register_affine(nn.RMSNorm, rms_norm_grads(lambda m, x: m.eps if m.eps is not None else torch.finfo(x.dtype).eps))
