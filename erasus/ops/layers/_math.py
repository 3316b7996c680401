"""Layer math shared by the rules (a leaf module: it imports no rule): batch-first reshapes, dtype unification,
convolutions as linear maps, per-token embedding gradient sums, trainable-part filtering."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from erasus.errors import UnsupportedLayerError


def batched(x: torch.Tensor) -> torch.Tensor:
    """(B, ..., f) -> (B, T, f)."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


def common_dtype(a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixed precision (autocast) hands a layer float32 inputs and bfloat16 output grads: compute in float32."""
    if a.dtype != g.dtype:
        return a.float(), g.float()
    return a, g


def own_trainable(module: nn.Module, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of ``values`` (keyed by parameter attribute name) whose parameter is trainable."""
    return {k: v for k, v in values.items()
            if isinstance(getattr(module, k, None), torch.Tensor) and getattr(module, k).requires_grad}


def has_trainable_bias(module: nn.Module, name: str | None = "bias") -> bool:
    """Whether the module has a trainable bias called ``name`` (None: a map without bias)."""
    bias = None if name is None else getattr(module, name, None)
    return isinstance(bias, torch.Tensor) and bias.requires_grad


def weight_bias(module: nn.Module, weight_sq: torch.Tensor, bias_sq: torch.Tensor) -> torch.Tensor:
    """The per-sample squared norm over the module's trainable weight and bias."""
    return sum(own_trainable(module, {"weight": weight_sq, "bias": bias_sq}).values(), torch.zeros_like(weight_sq))


def conv_padding(module) -> tuple[int, ...]:
    """Integer zero padding of a convolution; anything else is refused by name."""
    if module.groups != 1:
        raise UnsupportedLayerError(f"{type(module).__name__} with groups={module.groups} is not supported")
    if module.padding_mode != "zeros" or isinstance(module.padding, str) and module.padding != "valid":
        raise UnsupportedLayerError(f"{type(module).__name__} with padding={module.padding!r}, padding_mode="
                                    f"{module.padding_mode!r} is not supported; use integer zero padding")
    return (0,) * len(module.kernel_size) if isinstance(module.padding, str) else tuple(module.padding)


def conv_as_linear(module, x: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unfold a convolution into a linear map over output positions: (B, L, C_in k) and (B, L, C_out)."""
    padding = conv_padding(module)
    if isinstance(module, nn.Conv1d):
        cols = F.unfold(x.unsqueeze(2), (1, module.kernel_size[0]), dilation=(1, module.dilation[0]),
                        padding=(0, padding[0]), stride=(1, module.stride[0]))
    else:
        cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride)
    return cols.transpose(1, 2), grad.reshape(grad.shape[0], grad.shape[1], -1).transpose(1, 2)


def token_grad_sums(module: nn.Embedding, inputs: tuple, grad: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per (sample, token) sums of an embedding's output gradients: ``sum_{t: x_t = v} g_t`` for each distinct
    token v of each sample -- exactly the non-zero rows of the per-sample embedding gradients -- via one
    index_add, O(B T p), with no T x T mask and no V x p buffer. Returns (sample index, token id, sums)."""
    if module.scale_grad_by_freq:
        raise UnsupportedLayerError("nn.Embedding(scale_grad_by_freq=True) scales gradients by batch-wide token "
                                    "counts, so per-sample gradients are not defined by the layer alone")
    ids = inputs[0].reshape(grad.shape[0], -1)
    g = grad.reshape(ids.shape[0], ids.shape[1], -1).float()
    if module.padding_idx is not None:
        g = g * (ids != module.padding_idx).unsqueeze(-1)
    keys = torch.arange(ids.shape[0], device=ids.device)[:, None] * module.num_embeddings + ids
    uniq, inverse = torch.unique(keys.reshape(-1), return_inverse=True)
    sums = torch.zeros(uniq.numel(), g.shape[-1], device=g.device).index_add_(0, inverse, g.reshape(-1, g.shape[-1]))
    return uniq // module.num_embeddings, uniq % module.num_embeddings, sums
