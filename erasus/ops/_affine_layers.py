"""Normalisation layers (y = x_hat * weight + bias): each per-sample gradient of their affine parameters is
only d numbers, so it is formed directly, and one function per layer type serves both the gradient norms
and the Fisher. Also registers the transformers layer types, once the caller has imported transformers."""
from __future__ import annotations

import sys
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from erasus.errors import UnsupportedLayerError
from erasus.ops import _capture
from erasus.ops.fisher import register_fisher_sampler, transposed_linear_fisher
from erasus.ops.model_grad_norms import linear_norms, register_norm_sampler

# (module, inputs, output_grad) -> {parameter attribute name: (B, d) per-sample gradients}
AffineGrads = Callable[[nn.Module, tuple, torch.Tensor], "dict[str, torch.Tensor]"]


def register_affine(layer_type: type, per_sample_grads: AffineGrads) -> None:
    """Register a layer type by its per-sample affine gradients, for both norms and Fisher."""
    def norms(module, inputs, grad, backend):
        grads = _capture.own_trainable(module, per_sample_grads(module, inputs, grad))
        return sum(v.double().square().sum(1) for v in grads.values())  # float64: squares may underflow

    def fisher(module, inputs, grad, backend):
        grads = _capture.own_trainable(module, per_sample_grads(module, inputs, grad))
        return {k: v.square().sum(0) for k, v in grads.items()}

    register_norm_sampler(layer_type)(norms)
    register_fisher_sampler(layer_type)(fisher)


def _batched(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return x.reshape(like.shape[0], -1, x.shape[-1]).float()


def layer_norm_grads(module, inputs, grad):
    if len(module.normalized_shape) != 1:
        raise UnsupportedLayerError("LayerNorm over more than the last dimension is not supported")
    x, g = _batched(inputs[0], grad), _batched(grad, grad)
    x_hat = F.layer_norm(x, module.normalized_shape, eps=module.eps)
    return {"weight": (x_hat * g).sum(1), "bias": g.sum(1)}


def rms_norm_grads(eps_of: Callable[[nn.Module, torch.Tensor], float]) -> AffineGrads:
    def grads(module, inputs, grad):
        x, g = _batched(inputs[0], grad), _batched(grad, grad)
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


register_affine(nn.LayerNorm, layer_norm_grads)
register_affine(nn.modules.batchnorm._BatchNorm, batch_norm_grads)
if hasattr(nn, "RMSNorm"):
    register_affine(nn.RMSNorm, rms_norm_grads(
        lambda m, x: m.eps if m.eps is not None else torch.finfo(x.dtype).eps))

_transformers_registered = False


def register_transformers_layers() -> None:
    """GPT-2's Conv1D (y = x W + b, W stored as d_in x d_out) and Llama's RMSNorm, once the caller has
    imported transformers (a transformers model implies it); erasus never imports it on its own."""
    global _transformers_registered
    if _transformers_registered or "transformers" not in sys.modules:
        return
    _transformers_registered = True
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return
    register_norm_sampler(Conv1D)(linear_norms)
    register_fisher_sampler(Conv1D)(transposed_linear_fisher)
    try:
        from transformers.models.llama.modeling_llama import LlamaRMSNorm
    except ImportError:
        return
    register_affine(LlamaRMSNorm, rms_norm_grads(lambda m, x: m.variance_epsilon))
